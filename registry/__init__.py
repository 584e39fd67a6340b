"""The local adapter registry: a content-addressed blob store plus a SQLite index."""

from adapterhub.registry.index import Index, VersionInfo
from adapterhub.registry.registry import (
    FsckReport,
    PullResult,
    PushResult,
    Registry,
    RemovePlan,
    ShowInfo,
)

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
