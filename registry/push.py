"""``Registry.push``: hash a directory, store its blobs, record a version.

Blobs are made durable before the index row that refers to them is
committed. Content of a size no stored file has cannot be in the store, so
it is hashed while it is copied (one read); other files are hashed first, so
identical content is never written again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.artifact import Inspection
from adapterhub.manifest import FileEntry, Manifest, hash_file_sized, list_files
from adapterhub.fsutil import parallel_map, stream_workers
from adapterhub.progress import ProgressFactory, start, threadsafe
from adapterhub.refs import check_tag, parse_target

if TYPE_CHECKING:
    from adapterhub.registry.registry import Registry


@dataclass(frozen=True)
class PushResult:
    name: str
    version: str
    digest: str
    created: bool  # False: identical content was already there
    size: int
    file_count: int
    bytes_written: int  # new blob bytes; 0 for a re-push
    tags: tuple[str, ...]
    inspection: Inspection
    seconds: float

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "created": self.created,
            "size": self.size,
            "file_count": self.file_count,
            "bytes_written": self.bytes_written,
            "tags": list(self.tags),
            "kind": self.inspection.kind,
            "method": self.inspection.method,
            "base_model": self.inspection.base_model,
            "rank": self.inspection.rank,
            "quant": self.inspection.quant,
            "warnings": list(self.inspection.warnings),
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class _Request:
    """What a push was asked to record, besides the files."""

    name: str
    version: str | None
    tags: tuple[str, ...]
    description: str | None
    derived_from: Sequence[tuple[str, str]]
    recipe: dict[str, Any] | None


def push(
    reg: Registry,
    path: str | os.PathLike,
    target: str,
    *,
    tags: Sequence[str] = (),
    description: str | None = None,
    progress: ProgressFactory | None = None,
    inspection: Inspection | None = None,
    derived_from: Sequence[tuple[str, str]] = (),
    recipe: dict[str, Any] | None = None,
    verified: Mapping[str, str] | None = None,
    move_latest: bool = True,
) -> PushResult:
    """See ``Registry.push``."""
    from adapterhub.inspect import inspect_path

    t0 = time.perf_counter()
    name, version = parse_target(target)
    req = _Request(
        name, version, tuple(t for t in (check_tag(t) for t in tags) if t != "latest"),
        description, derived_from, recipe,
    )
    path = Path(path)
    ins = inspection or inspect_path(path)  # refuses non-artifacts before any hashing
    files = [(rel, p, os.stat(p).st_size) for rel, p in list_files(path)]
    digests: dict[str, str] = dict(verified or {})
    one_pass = _one_pass(reg, files) - set(digests)
    todo_hash = [(rel, p, size) for rel, p, size in files if rel not in one_pass and rel not in digests]
    sizes = {rel: size for rel, _, size in files}
    bar = start(progress, f"hashing {path.name}", sum(size for _, _, size in todo_hash))
    try:
        # Files hash in parallel, one per core (hashlib drops the GIL). The size
        # kept is what was hashed, not what was listed: a file that grew
        # meanwhile is recorded as its digest covers it (issue 16, item 2).
        update = threadsafe(bar.update)
        hashed = parallel_map(
            lambda f: hash_file_sized(f[1], update), todo_hash, weight=lambda f: f[2], workers=stream_workers(len(todo_hash))
        )
        for (rel, _, _), (digest, size) in zip(todo_hash, hashed):
            digests[rel], sizes[rel] = digest, size
    finally:
        bar.close()
    files = [(rel, p, sizes[rel]) for rel, p, _ in files]
    with reg._lock(exclusive=False):
        # Checked under the lock: gc cannot delete a blob between this
        # check and the index row that will refer to it.
        written = _store(reg, path, files, digests, sizes, one_pass, verified or {}, progress)
        manifest = Manifest.from_entries(FileEntry(rel, sizes[rel], digests[rel]) for rel, _, _ in files)
        info, created = reg.index.add_version(
            req.name, req.version, manifest, ins, description=req.description, tags=req.tags,
            derived_from=req.derived_from, recipe=req.recipe, move_latest=move_latest,
        )
    return PushResult(
        name=info.name,
        version=info.version,
        digest=info.digest,
        created=created,
        size=manifest.size,
        file_count=len(manifest),
        bytes_written=written,
        tags=info.tags,
        inspection=ins,
        seconds=time.perf_counter() - t0,
    )


def _one_pass(reg: Registry, files: list[tuple[str, Path, int]]) -> set[str]:
    """Files whose content cannot be stored yet: hashed while copied, in one read."""
    known_sizes = reg.index.file_sizes({size for _, _, size in files})
    seen: set[int] = set()
    out = set()
    for rel, _, size in files:
        if size not in known_sizes and size not in seen and size > 0:
            out.add(rel)
        seen.add(size)
    return out


def _store(
    reg: Registry,
    path: Path,
    files: list[tuple[str, Path, int]],
    digests: dict[str, str],
    sizes: dict[str, int],
    one_pass: set[str],
    verified: Mapping[str, str],
    progress: ProgressFactory | None,
) -> int:
    """Write the blobs the store lacks; fill ``digests`` and ``sizes`` for one-pass files; return the new bytes."""
    todo = [(rel, p, size) for rel, p, size in files if rel in one_pass or not reg.blobs.has(digests[rel], size)]
    if not todo:
        return 0
    bar = start(progress, f"storing {path.name}", sum(size for _, _, size in todo))
    update = threadsafe(bar.update)

    def store_one(item: tuple[str, Path, int]) -> tuple[str, str, int, bool]:
        rel, p, size = item
        if rel in one_pass:
            digest, size, new = reg.blobs.put_new(p, update)
            return rel, digest, size, new
        if rel in verified:
            return rel, digests[rel], size, reg.blobs.adopt(p, digests[rel], size, update)
        return rel, digests[rel], size, reg.blobs.put(p, digests[rel], size, update)

    try:
        # Two files per core: each copies in the kernel while a thread hashes
        # what was written, and its fsync overlaps the other files' work.
        done = parallel_map(store_one, todo, weight=lambda f: f[2], workers=stream_workers(len(todo)))
    finally:
        bar.close()
    written = 0
    for rel, digest, size, new in done:
        digests[rel], sizes[rel] = digest, size
        written += size if new else 0
    return written
