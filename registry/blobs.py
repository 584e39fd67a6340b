"""Content-addressed blob store: ``blobs/sha256/ab/abcdef…``.

Blobs are written to ``<final>.<random>.incomplete`` in the same directory,
hashed while they are written, fsynced, made read-only and renamed into place,
and the directory is fsynced after the rename. A blob therefore either exists
complete under its own digest or not at all, whatever happens to the process.
Leftover ``.incomplete`` files from a killed writer are harmless and are
removed by ``gc``.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from adapterhub.errors import IntegrityError
from adapterhub.fsutil import TMP_SUFFIX, copy_durably, fsync_dir, storage_error, temp_beside, write_atomic
from adapterhub.progress import ProgressFn


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    path: Path
    size: int


class BlobStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.base = self.root / "sha256"

    def path(self, sha256: str) -> Path:
        return self.base / sha256[:2] / sha256

    def has(self, sha256: str, size: int | None = None) -> bool:
        try:
            st = os.stat(self.path(sha256))
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def _present(self, sha256: str, size: int, progress: ProgressFn | None) -> bool:
        """True if the blob is stored already (its bytes then count as done for ``progress``)."""
        if not self.has(sha256, size):
            return False
        if progress:
            progress(size)
        return True

    def put(
        self, src: str | os.PathLike, sha256: str, size: int, progress: ProgressFn | None = None
    ) -> bool:
        """Store ``src`` as blob ``sha256``; return False if it was already there."""
        final = self.path(sha256)
        if self._present(sha256, size, progress):
            return False
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, str(final.parent)) from e
        write_atomic(final, src, mode=0o444, expected_sha256=sha256, progress=progress)
        return True

    def put_bytes(self, data: bytes, sha256: str) -> bool:
        """Store ``data`` (a signature bundle) as blob ``sha256``; return False if it was already there."""
        final = self.path(sha256)
        if self.has(sha256, len(data)):
            return False
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, str(final.parent)) from e
        write_atomic(final, data=data, mode=0o444, expected_sha256=sha256)
        return True

    def adopt(self, src: str | os.PathLike, sha256: str, size: int, progress: ProgressFn | None = None) -> bool:
        """Store ``src``, whose sha256 the caller has verified, by hard link (no copy).

        For files a remote pull has just downloaded and hashed into a staging
        directory on the same filesystem. Falls back to :meth:`put` (copy and
        re-hash) across filesystems. Returns False if the blob was already there.
        """
        final = self.path(sha256)
        if self._present(sha256, size, progress):
            return False
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_beside(final)
            try:
                os.link(src, tmp)
            except OSError as e:
                if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    return self.put(src, sha256, size, progress)
                raise
            try:
                if os.stat(tmp).st_size != size:
                    raise IntegrityError(f"{src} is not {size} bytes long")
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.chmod(tmp, 0o444)
                os.replace(tmp, final)
                fsync_dir(final.parent)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as e:
            raise storage_error(e, str(final)) from e
        if progress:
            progress(size)
        return True

    def put_new(self, src: str | os.PathLike, progress: ProgressFn | None = None) -> tuple[str, int, bool]:
        """Store ``src`` hashing it while it is copied; return (sha256, size, written).

        For content that cannot be in the store yet (no stored file has its
        size), so a push reads it once instead of hashing first and copying
        after. The temp file lives in ``sha256/tmp/`` and is renamed to its
        digest; if a concurrent push stored the same content meanwhile, the
        copy is dropped.
        """
        tmp_dir = self.base / "tmp"
        try:
            tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, str(tmp_dir)) from e
        tmp = tmp_dir / f"{secrets.token_hex(8)}{TMP_SUFFIX}"
        try:
            try:
                digest = copy_durably(src, tmp, progress)
                size = os.stat(tmp).st_size  # what the digest covers, whatever stat said before
                final = self.path(digest)
                if final.exists():
                    return digest, size, False
                final.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(tmp, 0o444)
                os.replace(tmp, final)
                fsync_dir(final.parent)
            except OSError as e:
                raise storage_error(e, str(src)) from e
            return digest, size, True
        finally:
            tmp.unlink(missing_ok=True)

    def verify(self, sha256: str) -> str | None:
        """Re-hash a blob; return a problem description, or None if it is intact."""
        from adapterhub.manifest import hash_file

        p = self.path(sha256)
        if not p.exists():
            return f"blob {sha256} is missing"
        got = hash_file(p)
        if got != sha256:
            return f"blob {sha256} is corrupt (its content hashes to {got})"
        return None

    def __iter__(self) -> Iterator[BlobInfo]:
        if not self.base.is_dir():
            return
        for d in sorted(self.base.iterdir()):
            if not d.is_dir():
                continue
            for p in sorted(d.iterdir()):
                if p.name.endswith(TMP_SUFFIX):
                    continue
                try:
                    size = p.stat().st_size
                except FileNotFoundError:  # deleted by a concurrent gc since the listing
                    continue
                yield BlobInfo(p.name, p, size)

    def temp_files(self) -> Iterator[Path]:
        if not self.base.is_dir():
            return
        for d in self.base.iterdir():
            if d.is_dir():
                yield from (p for p in d.iterdir() if p.name.endswith(TMP_SUFFIX))

    def remove(self, sha256: str) -> None:
        p = self.path(sha256)
        try:
            # Blobs are read-only; the directory's write bit is what unlink needs.
            os.unlink(p)
        except FileNotFoundError:
            return
        fsync_dir(p.parent)


def is_readonly(path: Path) -> bool:
    return not (os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
