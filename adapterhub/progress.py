"""The one progress protocol: registry operations and conversions report bytes through it.

A caller that wants a bar passes a *factory*: ``progress(description, total_bytes)``
returns an object with ``update(n)`` and ``close()`` (a ``tqdm`` bar fits).
Code that reports progress never imports a progress library; it takes the
factory from its caller, and uses :func:`no_progress` when there is none.

>>> bar = no_progress("hashing", 1024)
>>> bar.update(512); bar.close()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Progress(Protocol):
    """A running bar: ``update`` with the bytes just done, ``close`` at the end."""

    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


#: ``(description, total bytes) -> Progress``
ProgressFactory = Callable[[str, int], Progress]

#: A per-chunk callback: the bytes just done (``Progress.update`` is one).
ProgressFn = Callable[[int], None]


class NoProgress:
    """A bar that shows nothing."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def no_progress(desc: str, total: int) -> Progress:
    """The factory for callers that want no bar."""
    return NoProgress()


def threadsafe(update: ProgressFn) -> ProgressFn:
    """``update`` behind a lock, for workers that report from several threads."""
    import threading

    lock = threading.Lock()

    def locked(n: int) -> None:
        with lock:
            update(n)

    return locked


def start(progress: ProgressFactory | None, desc: str, total: int) -> Progress:
    """A bar from ``progress``, or a silent one when the caller passed none."""
    return (progress or no_progress)(desc, total)
