"""Files of an artifact, their hashes, and the artifact digest.

The artifact digest is the OpenSSF model-signing root digest for the ``files``
method with sha256: sha256 over the concatenated raw (32-byte) sha256 digests of
every file, in the order model-signing sorts them (``PurePosixPath`` order, that
is component by component). An artifact id therefore equals the subject digest
of its model-signing signature.

>>> m = Manifest.from_dir("path/to/adapter")   # doctest: +SKIP
>>> m.digest                                   # doctest: +SKIP
'sha256:4f1c...'
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from adapterhub.errors import InvalidArtifactError, NotFoundError, UnsafePathError
from adapterhub.progress import ProgressFn

CHUNK = 8 * 1024 * 1024

# What model-signing leaves out of the files it signs, exactly (hashing.Config
# with ignore_git_paths=True, and the signature file passed as an ignored
# path, as `model_signing sign` and adapterhub's signing do): these names *at
# the top level of the artifact only*, and everything below them. The same
# names further down are content, and so is a nested model.sig (issue 16,
# item 5): leaving them out would make the digest differ from the subject
# of the artifact's signature.
IGNORED_TOP_LEVEL = frozenset({".git", ".gitattributes", ".github", ".gitignore", "model.sig"})
IGNORED_NAMES = IGNORED_TOP_LEVEL  # the old name; top level only

# A name ending in this is a file being written (a download, an atomic write,
# a killed run's leftover). model-signing would sign it as it is; a push
# refuses it rather than store half a file, or silently leave it out.
UNFINISHED_SUFFIX = ".incomplete"

_HEX64 = re.compile(r"[0-9a-f]{64}")  # with fullmatch: `$` would let a trailing newline through



def sort_key(relpath: str) -> tuple[str, ...]:
    """Order used by model-signing (PurePosixPath compares part by part)."""
    return tuple(relpath.split("/"))


def check_relpath(relpath: str) -> str:
    """Return ``relpath`` if it is a safe relative POSIX path, else raise.

    Rejects absolute paths, ``..`` and ``.`` components, backslashes, empty
    components and NUL bytes, so that no stored name can escape a directory.
    """
    if not relpath or "\x00" in relpath or "\\" in relpath:
        raise UnsafePathError(f"unsafe path {relpath!r}")
    if relpath.startswith("/") or re.match(r"^[A-Za-z]:", relpath):
        raise UnsafePathError(f"absolute path {relpath!r} is not allowed")
    for part in relpath.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePathError(f"path {relpath!r} escapes its directory")
    return relpath


@dataclass(frozen=True)
class FileEntry:
    path: str  # POSIX path relative to the artifact root
    size: int
    sha256: str  # lowercase hex, no prefix

    def to_dict(self) -> dict:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    files: tuple[FileEntry, ...]

    @classmethod
    def from_entries(cls, entries: Iterable[FileEntry]) -> Manifest:
        files = tuple(sorted(entries, key=lambda e: sort_key(e.path)))
        seen = set()
        for f in files:
            check_relpath(f.path)
            if not _HEX64.fullmatch(f.sha256):
                raise InvalidArtifactError(f"bad sha256 for {f.path!r}: {f.sha256!r}")
            if f.path in seen:
                raise InvalidArtifactError(f"duplicate path {f.path!r}")
            seen.add(f.path)
        return cls(files)

    @classmethod
    def from_dir(cls, root: str | os.PathLike, progress: ProgressFn | None = None) -> Manifest:
        root = Path(root)
        entries = []
        for rel, p in list_files(root):
            digest, size = hash_file_sized(p, progress)
            entries.append(FileEntry(rel, size, digest))
        return cls.from_entries(entries)

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            h.update(bytes.fromhex(f.sha256))
        return "sha256:" + h.hexdigest()

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def __iter__(self) -> Iterator[FileEntry]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def to_dict(self) -> dict:
        return {"digest": self.digest, "size": self.size, "files": [f.to_dict() for f in self.files]}


def hash_file(path: str | os.PathLike, progress: ProgressFn | None = None) -> str:
    """sha256 hex of a file, read once in large chunks."""
    return hash_file_sized(path, progress)[0]


def hash_file_sized(path: str | os.PathLike, progress: ProgressFn | None = None) -> tuple[str, int]:
    """(sha256 hex, bytes hashed) of a file, read once in large chunks.

    The size is what was hashed, not what ``stat`` said before: a file that
    grows while it is read is recorded with the bytes its digest covers.
    """
    h = hashlib.sha256()
    total = 0
    with open(path, "rb", buffering=0) as f:
        # No larger than the file (one byte more sees its end in one read), 64 KiB at least: fsck
        # re-hashes 300,000 small blobs in a registry of 100,000 artifacts, and
        # zeroing an 8 MiB buffer for each took most of its time. A file that
        # grows meanwhile is still read to its end, a buffer at a time.
        buf = bytearray(min(CHUNK, max(1 << 16, os.fstat(f.fileno()).st_size + 1)))
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])  # hashlib drops the GIL for large buffers
            total += n
            if progress:
                progress(n)
    return h.hexdigest(), total


def _hf_cache_repo(root: Path) -> Path | None:
    """``models--org--name`` dir when ``root`` is a Hugging Face cache snapshot."""
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(
        ("models--", "datasets--", "spaces--")
    ):
        return root.parent.parent
    return None


def list_files(root: str | os.PathLike) -> list[tuple[str, Path]]:
    """Regular files of an artifact, as ``(posix relpath, path)`` in digest order.

    A single file is an artifact of one file. Symlinks are followed only when
    they stay inside ``root`` (or, for a Hugging Face cache snapshot, inside the
    repo's ``blobs/`` or the cache-wide ``<cache>/blobs/`` store, where
    huggingface_hub keeps Xet files shared between repos); anything else is
    refused rather than silently skipped.
    """
    root = Path(root)
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise NotFoundError(f"no such file or directory: {root}") from None
    if stat.S_ISREG(st.st_mode):
        return [(root.name, root)]
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArtifactError(f"{root} is neither a file nor a directory")
    real_root = root.resolve()
    allowed = [real_root]
    hf_repo = _hf_cache_repo(root.absolute())
    if hf_repo is not None:
        allowed.append((hf_repo / "blobs").resolve())
        shared = hf_repo.parent / "blobs"  # huggingface_hub.utils._shared_blobs
        if shared.is_dir():
            allowed.append(shared.resolve())
    out: list[tuple[str, Path]] = []

    def walk(d: Path, prefix: str) -> None:
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if not prefix and e.name in IGNORED_TOP_LEVEL:
                continue
            rel = f"{prefix}{e.name}"
            if e.name.endswith(UNFINISHED_SUFFIX):
                raise InvalidArtifactError(
                    f"{rel} is an unfinished file (its name ends in {UNFINISHED_SUFFIX}): "
                    "a download or write that has not completed, or a killed one's leftover",
                    hint="let it finish, or remove it, then try again; nothing was stored",
                )
            p = Path(e.path)
            if e.is_symlink():
                target = p.resolve()
                if not any(target == a or a in target.parents for a in allowed):
                    raise UnsafePathError(
                        f"symlink {rel} points outside the artifact ({target})",
                        hint="copy the file into the directory, or push the directory it points into",
                    )
                if not target.exists():
                    raise InvalidArtifactError(f"symlink {rel} is dangling")
            if e.is_dir(follow_symlinks=True):
                walk(p, rel + "/")
            elif e.is_file(follow_symlinks=True):
                out.append((check_relpath(rel), p))
            # sockets, fifos and devices are not artifact content: skip them

    walk(root, "")
    out.sort(key=lambda t: sort_key(t[0]))
    return out
