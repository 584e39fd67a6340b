"""``Registry.pull``: write the files of a version into a directory, re-hashing every byte.

The files are staged beside ``dest`` and renamed into place at the end, so a
failed or killed pull leaves nothing at ``dest`` (the next pull for the same
destination removes a killed one's staging directory). Files are written in
parallel, one per core, each copied in the kernel while a thread re-hashes it.

With ``link``, nothing is copied: each file is a reflink of its blob
(``FICLONE``: copy-on-write, the user's file is independent of the store)
where the filesystem supports it, else a hard link to the read-only blob
(the same inode: editing it in place would change the registry's copy, which
``fsck`` then reports as corrupt), else a copy.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import ConflictError, IntegrityError, UnsafePathError
from adapterhub.fsutil import (
    check_output_dir,
    fsync_dir,
    parallel_map,
    stream_workers,
    reflink,
    remove_stale_staging,
    staging_path,
    storage_error,
    temp_beside,
    write_atomic,
)
from adapterhub.manifest import FileEntry, check_relpath
from adapterhub.progress import Progress, ProgressFactory, ProgressFn, start, threadsafe
from adapterhub.refs import Ref

if TYPE_CHECKING:
    from adapterhub.registry.index import VersionInfo
    from adapterhub.registry.registry import Registry

OnStaged = Callable[[Path, "VersionInfo", list[FileEntry], bool], None]


@dataclass(frozen=True)
class PullResult:
    ref: str
    digest: str
    dest: Path
    files: tuple[FileEntry, ...]
    size: int
    seconds: float
    materialized: str = "copy"  # copy | reflink | hardlink | mixed (several of those)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "digest": self.digest,
            "dest": str(self.dest),
            "files": [f.to_dict() for f in self.files],
            "size": self.size,
            "seconds": round(self.seconds, 3),
            "materialized": self.materialized,
        }


def pull(
    reg: Registry,
    ref: str | Ref,
    dest: str | os.PathLike,
    *,
    force: bool = False,
    progress: ProgressFactory | None = None,
    on_staged: OnStaged | None = None,
    link: bool = False,
) -> PullResult:
    """See ``Registry.pull``."""
    t0 = time.perf_counter()
    info = reg.resolve(ref)
    entries = reg.index.files(info.digest)
    dest = Path(dest)
    if force:  # writing into the home, or over a folder holding it, would overwrite registry files
        check_output_dir(dest, home=reg.home)
    nonempty = dest.is_dir() and any(dest.iterdir())
    if dest.exists() and not dest.is_dir():
        raise ConflictError(f"{dest} exists and is not a directory")
    if nonempty and not force:
        raise ConflictError(f"{dest} is not empty", hint="pass --force to write into it anyway")
    bar = start(progress, f"pulling {info.name}:{info.version}", sum(f.size for f in entries))
    staging: Path | None = None
    try:
        with reg._lock(exclusive=False):
            if force and dest.is_dir():
                root = dest
            else:
                staging = _new_staging(dest)
                root = staging
            how = _write_files(reg, root, dest, entries, bar, link)
            if on_staged is not None:
                on_staged(root, info, entries, staging is not None)
        if staging is not None:
            try:
                if dest.is_dir():
                    dest.rmdir()  # empty, checked above
                os.rename(staging, dest)
                staging = None
                fsync_dir(dest.parent)
            except OSError as e:
                raise storage_error(e, str(dest)) from e
    finally:
        bar.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return PullResult(
        ref=f"{info.name}:{info.version}",
        digest=info.digest,
        dest=dest,
        files=tuple(entries),
        size=sum(f.size for f in entries),
        seconds=time.perf_counter() - t0,
        materialized=how,
    )


def _new_staging(dest: Path) -> Path:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(dest)  # left by a killed pull
        staging = staging_path(dest)
        staging.mkdir()
    except OSError as e:
        raise storage_error(e, str(dest)) from e
    return staging


def _write_files(reg: Registry, root: Path, dest: Path, entries: list[FileEntry], bar: Progress, link: bool) -> str:
    """Write each file of ``entries`` under ``root``; return how (copy, reflink, hardlink or mixed).

    Copies are re-hashed on the way: a damaged blob is an IntegrityError.
    """
    real_root = root.resolve()
    todo = []
    for f in entries:
        target = root / check_relpath(f.path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, str(target.parent)) from e
        if real_root not in target.parent.resolve().parents and target.parent.resolve() != real_root:
            raise UnsafePathError(f"{dest}/{f.path} would be written outside {dest} (symlink)")
        blob = reg.blobs.path(f.sha256)
        try:
            size = os.stat(blob).st_size
        except FileNotFoundError:
            raise IntegrityError(
                f"the blob for {f.path} is missing from the registry", hint="run `adapterhub fsck`"
            ) from None
        if size != f.size:
            raise IntegrityError(
                f"{f.path}: the stored blob is {size} bytes, not {f.size}", hint="run `adapterhub fsck`"
            )
        todo.append((f, blob, target))
    update = threadsafe(bar.update)
    workers = None if link else stream_workers(len(todo))
    hows = parallel_map(lambda t: _write_one(*t, update, link), todo, weight=lambda t: t[0].size, workers=workers)
    if link:
        for d in {t.parent for _, _, t in todo}:
            fsync_dir(d)
    kinds = set(hows) or {"copy"}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _write_one(f: FileEntry, blob: Path, target: Path, update: ProgressFn, link: bool) -> str:
    if link:
        how = _link(blob, target)
        if how is not None:
            update(f.size)
            return how
    try:
        write_atomic(target, blob, mode=0o644, expected_sha256=f.sha256, progress=update)
    except IntegrityError:
        raise IntegrityError(
            f"{f.path}: the stored blob does not match its sha256 {f.sha256[:12]}…",
            hint="the registry store is damaged; run `adapterhub fsck`",
        ) from None
    return "copy"


def _link(blob: Path, target: Path) -> str | None:
    """``target`` as a reflink of ``blob`` (then made writable: it is the user's own), else a
    hard link (read-only: it is the blob itself); None where neither works (another filesystem)."""
    tmp = temp_beside(target)
    try:
        try:
            if reflink(blob, tmp):
                os.chmod(tmp, 0o644)
                how = "reflink"
            else:
                os.link(blob, tmp)
                how = "hardlink"
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                return None
            raise storage_error(e, str(target)) from e
        try:
            os.replace(tmp, target)
        except OSError as e:
            raise storage_error(e, str(target)) from e
        return how
    finally:
        tmp.unlink(missing_ok=True)
