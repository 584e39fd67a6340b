"""The local adapter registry: a content-addressed blob store plus a SQLite index.

``Registry`` (registry.py) is the facade; push.py, pull.py and maintenance.py
(rm, gc, fsck) hold the operations; index.py, blobs.py and the side-table
modules (signatures.py, verifications.py, trust_tables.py) own the storage.
All SQL in adapterhub lives in this package.
"""

from adapterhub.registry.index import Index, VersionInfo
from adapterhub.registry.maintenance import FsckReport, RemovePlan
from adapterhub.registry.pull import PullResult
from adapterhub.registry.push import PushResult
from adapterhub.registry.registry import Registry, ShowInfo

__all__ = [
    "FsckReport",
    "Index",
    "PullResult",
    "PushResult",
    "Registry",
    "RemovePlan",
    "ShowInfo",
    "VersionInfo",
]
