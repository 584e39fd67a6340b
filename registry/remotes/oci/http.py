"""The HTTP underneath the OCI client: settings, deadlines, and waits between tries.

``requests`` has only a per-read timeout, so a registry that sends one byte
a second keeps a request alive for as long as it likes. Every request here
also has an overall deadline, enforced by a :class:`Watchdog` that shuts the
request's socket down when it passes, and a body has to arrive at a minimum
rate: a streamed body is read in chunks, each given ``timeout + size / rate``.

Settings (environment, read when a client is made; out-of-range values are
refused with a clear error):

- ``ADAPTERHUB_REMOTE_TIMEOUT`` (s, default 30): the per-read timeout;
- ``ADAPTERHUB_REMOTE_DEADLINE`` (s, default 300): status line, headers and a
  small body (JSON) of one request, and an upload beyond its minimum-rate time;
- ``ADAPTERHUB_REMOTE_MIN_RATE`` (bytes/s, default 8192, 0 = none): blob bodies;
- ``ADAPTERHUB_REMOTE_RETRIES`` (default 3): further tries after a connection
  error, a 5xx or a 429;
- ``ADAPTERHUB_REMOTE_MAX_WAIT`` (s, default 60): the longest ``Retry-After``
  honoured; a registry asking for more is reported instead of waited for.
"""

from __future__ import annotations

import email.utils
import math
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from adapterhub.errors import UsageError

_current = threading.local()  # the watchdog of the request this thread is sending


def _setting(name: str, default: float, *, low: float, high: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (low <= value <= high):  # NaN fails too
        raise UsageError(f"{name}={raw!r} is not a number from {low:g} to {high:g}")
    return value


@dataclass(frozen=True)
class Settings:
    timeout: float = 30.0
    deadline: float = 300.0
    min_rate: float = 8192.0
    retries: int = 3
    max_wait: float = 60.0

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            timeout=_setting("ADAPTERHUB_REMOTE_TIMEOUT", 30.0, low=0.05, high=86400),
            deadline=_setting("ADAPTERHUB_REMOTE_DEADLINE", 300.0, low=0.05, high=7 * 86400),
            min_rate=_setting("ADAPTERHUB_REMOTE_MIN_RATE", 8192.0, low=0, high=1e12),
            retries=int(_setting("ADAPTERHUB_REMOTE_RETRIES", 3, low=0, high=20)),
            max_wait=_setting("ADAPTERHUB_REMOTE_MAX_WAIT", 60.0, low=0, high=86400),
        )

    def body_time(self, nbytes: int) -> float:
        """Seconds a body of ``nbytes`` may take at the minimum rate (beyond one read timeout)."""
        return nbytes / self.min_rate if self.min_rate > 0 else math.inf


class Watchdog:
    """Shuts down the sockets of the request being sent when its deadline passes.

    Connections register themselves (see :func:`session`) while this
    watchdog is the thread's current one; :meth:`arm` starts the clock,
    :meth:`disarm` stops it. ``fired`` tells a broken read from a deadline.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: list[Any] = []
        self._timer: threading.Timer | None = None
        self.fired = False

    def begin(self) -> None:
        """A new request: forget the connections of the last one."""
        self.disarm()
        with self._lock:
            self._conns.clear()
            self.fired = False

    def track(self, conn: Any) -> None:
        with self._lock:
            self._conns.append(conn)

    def arm(self, seconds: float) -> None:
        self.disarm()
        if math.isinf(seconds):
            return
        t = threading.Timer(max(0.0, seconds), self._fire)
        t.daemon = True
        self._timer = t
        t.start()

    def disarm(self) -> None:
        t, self._timer = self._timer, None
        if t is not None:
            t.cancel()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            conns = list(self._conns)
        for conn in conns:
            sock = getattr(conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class sending:
    """``with sending(watchdog):`` connections opened or reused inside register with it."""

    def __init__(self, watchdog: Watchdog) -> None:
        self.watchdog = watchdog

    def __enter__(self) -> Watchdog:
        _current.watchdog = self.watchdog
        return self.watchdog

    def __exit__(self, *exc: Any) -> None:
        _current.watchdog = None


_SESSION_CLASSES: dict[str, Any] = {}


def _adapter_class() -> Any:
    """An HTTPAdapter whose connections register with the current watchdog (made once, lazily)."""
    if "adapter" in _SESSION_CLASSES:
        return _SESSION_CLASSES["adapter"]
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class Tracked:
        def request(self, *a: Any, **kw: Any) -> Any:
            wd = getattr(_current, "watchdog", None)
            if wd is not None:
                wd.track(self)
            return super().request(*a, **kw)  # type: ignore[misc]

    class TrackedHTTP(Tracked, HTTPConnection):
        pass

    class TrackedHTTPS(Tracked, HTTPSConnection):
        pass

    class Pool(HTTPConnectionPool):
        ConnectionCls = TrackedHTTP

    class PoolS(HTTPSConnectionPool):
        ConnectionCls = TrackedHTTPS

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *a: Any, **kw: Any) -> None:
            super().init_poolmanager(*a, **kw)
            self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": PoolS}

    _SESSION_CLASSES["adapter"] = Adapter
    return Adapter


def session() -> Any:
    """A ``requests.Session`` whose requests a :class:`Watchdog` can cut short."""
    import requests

    s = requests.Session()
    adapter = _adapter_class()
    s.mount("http://", adapter())
    s.mount("https://", adapter())
    s.headers["User-Agent"] = "adapterhub"
    return s


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff(attempt: int, *, base: float = 0.25, cap: float = 8.0) -> float:
    """Full-jitter exponential backoff before try ``attempt`` (1, 2, ...): uniform in [0, min(cap, base*2^(attempt-1))]."""
    return random.uniform(0, min(cap, base * 2 ** max(0, attempt - 1)))
