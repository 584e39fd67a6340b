"""``Registry.pull``: write the files of a version into a directory, re-hashing every byte.

The files are staged beside ``dest`` and renamed into place at the end, so a
failed or killed pull leaves nothing at ``dest`` (the next pull for the same
destination removes a killed one's staging directory).
"""

from __future__ import annotations

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
    remove_stale_staging,
    staging_path,
    storage_error,
    write_atomic,
)
from adapterhub.manifest import FileEntry, check_relpath
from adapterhub.progress import Progress, ProgressFactory, start
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "digest": self.digest,
            "dest": str(self.dest),
            "files": [f.to_dict() for f in self.files],
            "size": self.size,
            "seconds": round(self.seconds, 3),
        }


def pull(
    reg: Registry,
    ref: str | Ref,
    dest: str | os.PathLike,
    *,
    force: bool = False,
    progress: ProgressFactory | None = None,
    on_staged: OnStaged | None = None,
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
            _write_files(reg, root, dest, entries, bar)
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


def _write_files(reg: Registry, root: Path, dest: Path, entries: list[FileEntry], bar: Progress) -> None:
    """Copy each blob to ``root``, re-hashed on the way: a damaged blob is an IntegrityError."""
    real_root = root.resolve()
    for f in entries:
        target = root / check_relpath(f.path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, str(target.parent)) from e
        if real_root not in target.parent.resolve().parents and target.parent.resolve() != real_root:
            raise UnsafePathError(f"{dest}/{f.path} would be written outside {dest} (symlink)")
        blob = reg.blobs.path(f.sha256)
        if not blob.exists():
            raise IntegrityError(
                f"the blob for {f.path} is missing from the registry", hint="run `adapterhub fsck`"
            )
        try:
            write_atomic(target, blob, mode=0o644, expected_sha256=f.sha256, progress=bar.update)
        except IntegrityError:
            raise IntegrityError(
                f"{f.path}: the stored blob does not match its sha256 {f.sha256[:12]}…",
                hint="the registry store is damaged; run `adapterhub fsck`",
            ) from None
