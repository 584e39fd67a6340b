"""Staging directories beside a destination, cleaning up after killed runs, and O_DIRECT files.

A pull or a conversion builds its output in ``.<dest>.<pid>-<random>.incomplete``
beside ``<dest>`` and renames it into place at the end. A ``kill -9`` leaves
that directory behind; the next run for the same destination removes those
whose process is gone.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import secrets
import shutil
from pathlib import Path

SUFFIX = ".incomplete"

#: O_DIRECT wants buffers, file offsets and lengths aligned to the device's block size.
DIRECT_ALIGN = 4096


def open_direct(path: str | os.PathLike, flags: int, mode: int) -> tuple[int, bool]:
    """Open ``path`` for writing with O_DIRECT where the platform and filesystem allow it.

    Returns (fd, whether O_DIRECT is on). A filesystem that refuses O_DIRECT
    (EINVAL: tmpfs, some network filesystems) gets an ordinary descriptor.
    With O_EXCL, a file that the refused open created is removed first.
    """
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, mode), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            if flags & os.O_EXCL:
                Path(path).unlink(missing_ok=True)
    return os.open(path, flags, mode), False


def clear_direct(fd: int) -> None:
    """Turn O_DIRECT off on ``fd``: what follows is written through the page cache."""
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


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


def remove_stale_staging(dest: Path) -> list[Path]:
    """Remove staging dirs for ``dest`` left by processes that no longer exist."""
    removed = stale_staging(dest)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
