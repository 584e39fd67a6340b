"""File helpers shared by the registry and the converters: durable and atomic
writes, the storage error, staging directories beside a destination (and
cleaning up after killed runs), and O_DIRECT files. The Linux-only calls
behind them (and their fallbacks elsewhere) live in :mod:`adapterhub.platform`.

There is one atomic writer in the tree, :func:`write_atomic` (a temp file
``<name>.<random>.incomplete`` in the same directory, created with mode 0600,
fsynced, renamed into place, the directory fsynced), and one way to turn an
``OSError`` into the user's ``StorageError``, :func:`storage_error`.

A pull or a conversion builds its output in ``.<dest>.<pid>-<random>.incomplete``
beside ``<dest>`` and renames it into place at the end. A ``kill -9`` leaves
that directory behind; the next run for the same destination removes those
whose process is gone.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from adapterhub.errors import IntegrityError, StorageError
# DIRECT_ALIGN, clear_direct and open_direct are imported from here by the writers.
from adapterhub.platform import (  # noqa: F401
    DIRECT_ALIGN,
    clear_direct,
    clone_file,
    cpu_count,
    kernel_copy,
    open_direct,
    start_writeback,
)
from adapterhub.progress import ProgressFn

T = TypeVar("T")
R = TypeVar("R")
SUFFIX = ".incomplete"
TMP_SUFFIX = SUFFIX
CHUNK = 8 * 1024 * 1024
COPY_STEP = 16 * 1024 * 1024  # one copy_file_range call; the hash starts after the first
HASH_WINDOW = 16 * 1024 * 1024  # bytes hashed per mapping


def storage_error(e: OSError, what: str) -> StorageError:
    """``e`` as the ``StorageError`` (exit 7) a user reads: a full disk, a refusal, or else."""
    if e.errno == errno.ENOSPC:
        return StorageError(f"no space left on device while writing {what}", hint="free some space, then retry")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write {what}: {e.strerror}")
    return StorageError(f"cannot write {what}: {e}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_beside(final: Path) -> Path:
    """``<name>.<random>.incomplete`` in ``final``'s directory (same filesystem: rename is atomic).

    The name starts with the final name, so a blob's temp file sits in its
    prefix directory under its digest (tests watch for it there), and ends in
    ``.incomplete``, so ``gc``, ``fsck`` and ``push`` know it for what it is.
    """
    return final.with_name(f"{final.name}.{secrets.token_hex(6)}{SUFFIX}")


def write_atomic(
    final: str | os.PathLike,
    src: str | os.PathLike | None = None,
    *,
    data: bytes | None = None,
    mode: int = 0o644,
    expected_sha256: str | None = None,
    progress: ProgressFn | None = None,
) -> str:
    """Write ``final`` from the file ``src`` or from ``data``, all or nothing; return its sha256 hex.

    The temp file is created with mode 0600 (a secret is never readable by
    others, not even for a moment), written, fsynced, given ``mode`` and
    renamed over ``final``; the directory is fsynced after the rename. If
    ``expected_sha256`` is given and the bytes written hash differently, the
    temp file is removed and ``IntegrityError`` is raised: nothing is written.
    ``OSError`` comes out as :func:`storage_error`.
    """
    if (src is None) == (data is None):
        raise TypeError("write_atomic needs exactly one of src and data")
    final = Path(final)
    tmp = temp_beside(final)
    try:
        try:
            if src is not None:
                digest = copy_durably(src, tmp, progress)
            else:
                digest = hashlib.sha256(data).hexdigest()
                _write_new(tmp, data)
        except OSError as e:
            raise storage_error(e, str(final)) from e
        if expected_sha256 is not None and digest != expected_sha256:
            raise IntegrityError(
                f"{src or final} changed while it was being copied "
                f"(sha256 {digest[:12]}…, expected {expected_sha256[:12]}…)"
            )
        try:
            os.chmod(tmp, mode)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except OSError as e:
            raise storage_error(e, str(final)) from e
        return digest
    finally:
        tmp.unlink(missing_ok=True)


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def io_workers(n_items: int) -> int:
    """Threads for per-file work that hashes (hashlib and the kernel's copies drop the GIL):
    one per core, at most one per file, at most 8; ``$ADAPTERHUB_IO_THREADS`` overrides."""
    env = os.environ.get("ADAPTERHUB_IO_THREADS", "")
    if env.isdigit() and int(env) > 0:
        cores = int(env)
    else:
        cores = cpu_count()
    return max(1, min(cores, n_items, 8))


def stream_workers(n_items: int) -> int:
    """Files copied and hashed at once: twice :func:`io_workers` (at most 8 and one per file).

    A sha256 cannot be split across cores, so with one file per core the
    cores idle at the end: three shards of 439, 308 and 308 MB on two cores
    took as long as hashing 616 MB on one. With more files than cores in
    flight the cores share them and finish together, and the kernel's copies
    fill the gaps.
    """
    return max(1, min(2 * io_workers(n_items), n_items, 8))


def parallel_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    weight: Callable[[T], int] | None = None,
    workers: int | None = None,
) -> list[R]:
    """``[fn(x) for x in items]`` on ``workers`` threads (default :func:`io_workers`), results in the order of ``items``.

    The heaviest items (by ``weight``) start first, so that one large file
    does not start last and run alone. The first exception (in the order of
    ``items``) is raised once the running items are done; the rest never start.
    """
    workers = io_workers(len(items)) if workers is None else max(1, min(workers, len(items)))
    if workers <= 1:
        return [fn(x) for x in items]
    order = sorted(range(len(items)), key=lambda i: -weight(items[i])) if weight else range(len(items))
    pool = ThreadPoolExecutor(workers)
    try:
        futures = {i: pool.submit(fn, items[i]) for i in order}
        return [futures[i].result() for i in range(len(items))]
    except BaseException:
        # Ctrl-C or a failed item: the items not started yet never start; the
        # running ones finish their file (and clean up their temp files).
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


def reflink(src: str | os.PathLike, dst: str | os.PathLike) -> bool:
    """Make ``dst`` (new) share ``src``'s blocks, copy-on-write (FICLONE); False where the
    filesystem or the platform cannot (then ``dst`` does not exist)."""
    fd_src = os.open(src, os.O_RDONLY)
    try:
        fd_dst = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            ok = clone_file(fd_src, fd_dst)
        finally:
            os.close(fd_dst)
    finally:
        os.close(fd_src)
    if not ok:
        Path(dst).unlink(missing_ok=True)
    return ok


def copy_hashed(src: str | os.PathLike, dst_fd: int, progress: ProgressFn | None = None) -> str:
    """Copy ``src`` into ``dst_fd`` and return the sha256 hex of what was copied.

    Hashing runs in a second thread on the previous chunk while this thread
    writes the current one (both drop the GIL), so the hash costs almost
    nothing on top of the copy.
    """
    h = hashlib.sha256()
    bufs = [bytearray(CHUNK), bytearray(CHUNK)]
    pending = None
    with open(src, "rb", buffering=0) as f, ThreadPoolExecutor(1) as pool:
        i = 0
        while True:
            buf = bufs[i & 1]
            n = f.readinto(buf)
            if not n:
                break
            view = memoryview(buf)[:n]
            # Writing and hashing read the same buffer; the other buffer is
            # only reused after its hash has finished.
            fut = pool.submit(h.update, view)
            mv = view
            while mv:
                mv = mv[os.write(dst_fd, mv):]
            if pending is not None:
                pending.result()
            pending = fut
            if progress:
                progress(n)
            i += 1
        if pending is not None:
            pending.result()
    return h.hexdigest()


def copy_and_hash(
    src: str | os.PathLike, dst_fd: int, progress: ProgressFn | None = None, *, fsync: bool = False
) -> str:
    """Copy ``src`` into ``dst_fd`` and return the sha256 hex of the bytes copied.

    The kernel copies (``copy_file_range``: no trip through Python buffers)
    in one thread while this one hashes. Where ``dst_fd`` is open for reading
    too (``O_RDWR``, as :func:`copy_durably` opens it), the hash is of the
    bytes written, read back through a mapping of what is already copied,
    straight from the page cache (no copy into a buffer), so a digest always
    covers exactly the file handed on; otherwise the source is hashed from the
    page cache beside the copy. With ``fsync``, ``dst_fd`` is fsynced as soon
    as the copy is done, while the hash is still running, so the wait for
    the disk mostly disappears. The source's size and mtime are compared
    before and after, so a file changed mid-copy is an error rather than a
    blob whose name lies. Falls back to :func:`copy_hashed` where the kernel
    cannot copy (macOS, other filesystems, old kernels).
    """
    from adapterhub.manifest import hash_file

    with open(src, "rb", buffering=0) as f:
        before = os.fstat(f.fileno())
        size = before.st_size
        first = kernel_copy(f.fileno(), dst_fd, min(COPY_STEP, size)) if size else 0
        if first and fsync:
            start_writeback(dst_fd, 0, first)
        if first is None:
            digest = copy_hashed(src, dst_fd, progress)
            if fsync:
                os.fsync(dst_fd)
            return digest
        copier = _Copier(f.fileno(), dst_fd, size, first, fsync)
        with ThreadPoolExecutor(1) as pool:
            if _readable(dst_fd):
                copied = pool.submit(copier.run)
                try:
                    digest = _hash_behind(dst_fd, copier, progress)
                except BaseException:
                    copier.stop()
                    raise
                finally:
                    copier.stop_waiting()
                done = copied.result()
            else:
                fut = pool.submit(hash_file, src)
                done = copier.run(progress)
                digest = fut.result()
        after = os.fstat(f.fileno())
    if done != size or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise IntegrityError(f"{src} changed while it was being copied")
    return digest


def _readable(fd: int) -> bool:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR


class _Copier:
    """``copy_file_range`` from ``src_fd`` to ``dst_fd`` in steps, telling a hasher how far it got."""

    def __init__(self, src_fd: int, dst_fd: int, size: int, done: int, fsync: bool) -> None:
        import threading

        self.src_fd, self.dst_fd, self.size, self.fsync = src_fd, dst_fd, size, fsync
        self.done = done
        self.finished = False  # no more bytes will come (the end, a failure, or a stop)
        self.stopped = False
        self.cond = threading.Condition()

    def run(self, progress: ProgressFn | None = None) -> int:
        if progress and self.done:
            progress(self.done)
        try:
            while self.done < self.size and not self.stopped:
                n = os.copy_file_range(self.src_fd, self.dst_fd, min(COPY_STEP, self.size - self.done))
                if n == 0:  # the source shrank: the caller reports it
                    break
                with self.cond:
                    self.done += n
                    self.cond.notify_all()
                if self.fsync:  # the disk writes while the copy goes on; fsync waits for less
                    start_writeback(self.dst_fd, self.done - n, n)
                if progress:
                    progress(n)
        finally:
            with self.cond:
                self.finished = True
                self.cond.notify_all()
        if self.fsync and not self.stopped:
            os.fsync(self.dst_fd)
        return self.done

    def wait_for(self, offset: int) -> int:
        """Block until ``offset`` bytes are copied or no more will be; return how many are."""
        with self.cond:
            while self.done < offset and not self.finished:
                self.cond.wait()
            return self.done

    def stop(self) -> None:
        with self.cond:
            self.stopped = True

    def stop_waiting(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()


def _hash_behind(dst_fd: int, copier: _Copier, progress: ProgressFn | None) -> str:
    """sha256 of what ``copier`` writes into ``dst_fd``, a window at a time as it is written.

    Each window is mapped only once it is fully copied, so no page past the
    end of the file is ever touched. MAP_POPULATE maps a window's pages in
    one call instead of one fault per few pages.
    """
    import mmap

    h = hashlib.sha256()
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    offset = 0
    while True:
        ready = copier.wait_for(min(offset + HASH_WINDOW, copier.size))
        n = min(ready, offset + HASH_WINDOW) - offset
        if n <= 0:
            break
        m = mmap.mmap(dst_fd, n, flags=flags, prot=mmap.PROT_READ, offset=offset)
        try:
            h.update(m)  # hashlib drops the GIL for large buffers
        finally:
            m.close()
        offset += n
        if progress:
            progress(n)
    return h.hexdigest()


def copy_durably(src: str | os.PathLike, tmp: Path, progress: ProgressFn | None = None) -> str:
    """Copy ``src`` into the new file ``tmp`` (mode 0600) and fsync it; return the sha256 of what was copied.

    The caller renames ``tmp`` into place, and removes it if anything fails.
    """
    # Read-write: the hash is read back from what was written (see copy_and_hash).
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        digest = copy_and_hash(src, fd, progress, fsync=True)
    finally:
        os.close(fd)
    return digest

def staging_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_staging(dest: Path) -> list[Path]:
    """Staging dirs for ``dest`` whose process no longer exists."""
    stale = []
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(\d+)-[0-9a-f]+{re.escape(SUFFIX)}$")
    for p in sorted(glob.glob(os.path.join(glob.escape(str(dest.parent)), f".{glob.escape(dest.name)}.*{SUFFIX}"))):
        m = pattern.match(os.path.basename(p))
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            stale.append(Path(p))
    return stale


_ANY_STAGING = re.compile(rf"^\.(.+)\.(\d+)-[0-9a-f]+{re.escape(SUFFIX)}$")


def stale_staging_in(parent: Path) -> list[Path]:
    """Staging dirs in ``parent``, for any destination, whose process no longer exists."""
    stale = []
    try:
        names = sorted(os.listdir(parent))
    except FileNotFoundError:
        return []
    for name in names:
        m = _ANY_STAGING.match(name)
        if m and int(m.group(2)) != os.getpid() and not _alive(int(m.group(2))):
            stale.append(parent / name)
    return stale


def remove_stale_staging(dest: Path) -> list[Path]:
    """Remove staging dirs for ``dest`` left by processes that no longer exist."""
    removed = stale_staging(dest)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def _forms(path: str | os.PathLike) -> set[Path]:
    """``path`` as written (absolute, normalised) and with every symlink resolved."""
    p = Path(os.path.abspath(os.fspath(path)))
    return {p, p.resolve()}


def check_output_dir(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike] = (),
    *,
    home: str | os.PathLike | None = None,
) -> None:
    """Refuse an output directory that is, contains or lies inside an input or the registry home.

    Every command that writes or replaces a directory (merge, quantize,
    dequantize, convert, extract, ``pull --force``) calls this before any
    work: replacing such an OUT would delete the inputs (with OUT = the base,
    the base weights; with OUT = a parent of the inputs or ``$ADAPTERHUB_HOME``,
    the whole registry). ``inputs`` are the input files and directories. Paths
    are compared both as written and with symlinks resolved, so a symlink to
    an input, or an input file that is a symlink, is caught too. Raises
    ``ConflictError`` (exit 5) naming the input.
    """
    from adapterhub.errors import ConflictError

    outs = _forms(out)

    def overlap(p: Path) -> str | None:
        for o in outs:
            if o == p or o in p.parents:
                return "holds"
            if p in o.parents:
                return "lies inside"
        return None

    if home is not None:
        for h in _forms(home):
            how = overlap(h)
            if how is not None:
                raise ConflictError(
                    f"{out} {'holds' if how == 'holds' else 'lies inside'} the registry home {home}; "
                    "replacing it would delete registry data",
                    hint="write the output somewhere outside ADAPTERHUB_HOME",
                )
    for src in inputs:
        for p in _forms(src):
            how = overlap(p)
            if how is not None:
                raise ConflictError(f"{out} {how} the input {src}; write the output somewhere else")
