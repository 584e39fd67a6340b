"""The operating-system calls that exist only on some platforms, each with its fallback.

adapterhub runs on Linux and macOS. Linux offers faster paths for a few
things: copies inside the kernel (``copy_file_range``), writes that skip the
page cache (``O_DIRECT``), copy-on-write clones (the ``FICLONE`` ioctl),
vectored reads (``preadv``), ``fdatasync``, the cores this process may run
on (``sched_getaffinity``) and facts from ``/proc``. macOS lacks each of
them, and so can a Linux filesystem (tmpfs, network filesystems, a copy
across filesystems). Every helper here falls back to a portable call that
gives the same bytes, or returns ``None``/``False`` where the fact is only
nice to have (who holds a lock, free memory). Nothing else in the tree calls
those primitives directly; ``tests/test_platform.py`` takes each one away in
turn and checks the result is unchanged.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

#: Errors from ``copy_file_range`` that mean "the kernel cannot copy between
#: these two files" rather than a failed copy: another filesystem (EXDEV), an
#: old kernel or a seccomp filter (ENOSYS), a filesystem or descriptor that
#: does not take part (EINVAL, EOPNOTSUPP, ETXTBSY, EBADF for O_APPEND).
NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ETXTBSY, errno.EBADF})

#: O_DIRECT wants buffers, file offsets and lengths aligned to the device's block size.
DIRECT_ALIGN = 4096

#: linux/fs.h: _IOW(0x94, 9, int). Other systems number their ioctls differently.
FICLONE = 0x40049409

#: Where Linux shows its process and kernel facts; a test points it elsewhere.
PROC = Path("/proc")


def is_linux() -> bool:
    return sys.platform.startswith("linux")


def kernel_copy(src: int, dst: int, count: int, offset: int | None = None) -> int | None:
    """``os.copy_file_range(src, dst, count, offset)``: bytes copied, or ``None`` where the kernel cannot.

    ``None`` means nothing was copied and the caller copies through its own
    buffers: no ``copy_file_range`` on this system (macOS), or one of
    :data:`NO_KERNEL_COPY`. Other errors (a full disk) are raised.
    """
    fn = getattr(os, "copy_file_range", None)
    if fn is None:
        return None
    try:
        return int(fn(src, dst, count, offset))
    except OSError as e:
        if e.errno in NO_KERNEL_COPY:
            return None
        raise


def pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Read into ``buf`` from ``offset`` of ``fd``; return the bytes read (0 at the end of the file).

    ``preadv`` reads straight into the buffer. Without it (macOS before 11,
    Python builds without it) ``pread`` returns a new bytes object, which is
    copied in.
    """
    fn = getattr(os, "preadv", None)
    if fn is not None:
        try:
            return int(fn(fd, [buf], offset))
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
    data = os.pread(fd, len(buf), offset)
    buf[: len(data)] = data
    return len(data)


def fdatasync(fd: int) -> None:
    """Flush ``fd``'s data to the disk: ``fdatasync`` where there is one, else ``fsync`` (macOS)."""
    fn = getattr(os, "fdatasync", None)
    if fn is not None:
        try:
            fn(fd)
            return
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EINVAL):
                raise
    os.fsync(fd)


#: linux/fs.h: start writing the range's dirty pages, do not wait for them.
SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: object = None  # libc's function once looked up; False where there is none


def start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Start writing ``nbytes`` at ``offset`` of ``fd`` to the disk without waiting; False where it cannot.

    Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, called through libc.
    A copy that calls it behind each step keeps the disk busy while it goes
    on, so the final ``fsync`` has little left to wait for; without it the
    kernel starts writing only once a tenth of memory is dirty. It is only a
    hint: durability still comes from ``fsync``. Elsewhere (macOS, a libc
    without it) nothing happens.
    """
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = _find_sync_file_range()
    if _sync_file_range is False:
        return False
    return _sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) == 0  # type: ignore[operator]


def _find_sync_file_range() -> object:
    if not is_linux():
        return False
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def cpu_count() -> int:
    """Cores this process may run on: its affinity mask on Linux (a container's or taskset's
    limit), else every core the system has."""
    fn = getattr(os, "sched_getaffinity", None)
    if fn is not None:
        try:
            return max(1, len(fn(0)))
        except OSError:
            pass
    return os.cpu_count() or 1


def open_direct(path: str | os.PathLike, flags: int, mode: int) -> tuple[int, bool]:
    """Open ``path`` with O_DIRECT where the platform and filesystem allow it.

    Returns (fd, whether O_DIRECT is on). Without O_DIRECT (macOS), or on a
    filesystem that refuses it (EINVAL: tmpfs, some network filesystems), the
    descriptor is an ordinary one and writes go through the page cache. With
    O_EXCL, a file that the refused open created is removed first.
    """
    direct = getattr(os, "O_DIRECT", None)
    if direct is not None:
        try:
            return os.open(path, flags | direct, mode), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            if flags & os.O_EXCL:
                Path(path).unlink(missing_ok=True)
    return os.open(path, flags, mode), False


def clear_direct(fd: int) -> None:
    """Turn O_DIRECT off on ``fd``: what follows is written through the page cache."""
    direct = getattr(os, "O_DIRECT", None)
    if direct is None:
        return  # never on: open_direct cannot have set it
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~direct)


def clone_file(fd_src: int, fd_dst: int) -> bool:
    """Make the empty file ``fd_dst`` share ``fd_src``'s blocks, copy-on-write; False where it cannot.

    Linux's FICLONE ioctl (btrfs, XFS, bcachefs). Elsewhere, and on
    filesystems without shared extents, the answer is False and the caller
    links or copies instead. The request number is Linux's, so it is never
    sent to another kernel.
    """
    if not is_linux():
        return False
    try:
        import fcntl

        fcntl.ioctl(fd_dst, FICLONE, fd_src)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS, errno.EBADF):
            return False
        raise
    return True


def read_proc(name: str) -> str | None:
    """The text of ``/proc/<name>``, or ``None`` where there is no such file (not Linux, no /proc mounted)."""
    try:
        with open(PROC / name, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def available_memory() -> int | None:
    """Bytes of memory available to new allocations, or ``None`` where nothing says.

    psutil where it is installed (every platform), else Linux's
    ``/proc/meminfo``, else ``sysconf`` (Linux and some BSDs).
    """
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    meminfo = read_proc("meminfo")
    if meminfo is not None:
        for line in meminfo.splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "MemAvailable:" and fields[1].isdigit():
                return int(fields[1]) * 1024
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes (``ru_maxrss`` is in KiB on Linux, bytes on macOS)."""
    import resource

    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024
