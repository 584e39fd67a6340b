"""The registry lock: pushes and pulls share it, deleting blobs takes it alone.

A ``flock`` on ``$ADAPTERHUB_HOME/registry.lock``. Waiting is bounded by
``$ADAPTERHUB_LOCK_TIMEOUT`` (600 s by default), and a wait longer than a
second is announced once, naming the pids that hold the lock where Linux's
``/proc/locks`` tells them.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from adapterhub.errors import StorageError
from adapterhub.platform import read_proc

LOCK_TIMEOUT_S = 600.0  # default of $ADAPTERHUB_LOCK_TIMEOUT
LOCK_NOTICE_AFTER_S = 1.0  # a wait longer than this is announced


def lock_timeout() -> float:
    """Seconds to wait for the registry lock: ``$ADAPTERHUB_LOCK_TIMEOUT`` (0 to a week), else 600."""
    from adapterhub.config import env_number

    return env_number("ADAPTERHUB_LOCK_TIMEOUT", LOCK_TIMEOUT_S, low=0, high=7 * 86400)


def lock_holders(path: Path) -> list[int]:
    """Pids holding a flock on ``path``, from Linux's /proc/locks (empty where unknown: macOS)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    text = read_proc("locks")
    if text is None:
        return []
    lines = text.splitlines()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = set()
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF"; waiters have "->" after the id.
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == dev and fields[4].isdigit():
            pids.add(int(fields[4]))
    pids.discard(os.getpid())
    pids.discard(0)  # a holder in another pid namespace
    return sorted(pids)


def _pids(path: Path) -> str:
    pids = lock_holders(path)
    return f" (pid {', '.join(map(str, pids))})" if pids else ""


@contextmanager
def registry_lock(home: Path, exclusive: bool, on_wait: Callable[[str], None] | None) -> Iterator[None]:
    """Hold the registry lock of ``home`` (shared, or ``exclusive``) for the ``with`` block."""
    path = home / "registry.lock"
    with open(path, "a") as fh:
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        timeout = lock_timeout()
        start = time.monotonic()
        announced = False
        while True:
            try:
                fcntl.flock(fh, op | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited > timeout:
                    raise StorageError(
                        f"the registry is locked by another adapterhub process{_pids(path)}",
                        hint=f"retry when it has finished (waited {timeout:g} s; ADAPTERHUB_LOCK_TIMEOUT sets the wait)",
                    ) from None
                if not announced and waited >= LOCK_NOTICE_AFTER_S:
                    announced = True
                    if on_wait is not None:
                        on_wait(
                            f"waiting for another adapterhub process{_pids(path)} to release the registry lock"
                            f" (up to {timeout:g} s)…"
                        )
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
