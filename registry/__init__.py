"""The local adapter registry: a content-addressed blob store plus a SQLite index."""

from .index import Index, VersionInfo
from .registry import FsckReport, PullResult, PushResult, Registry, RemovePlan, ShowInfo

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
