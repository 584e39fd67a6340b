"""Moving blob bytes: a file slice streamed up, and a download streamed to disk,
hashed as it arrives and resumed with HTTP Range.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import IntegrityError, RemoteError
from adapterhub.fsutil import DIRECT_ALIGN, clear_direct, open_direct, storage_error
from adapterhub.registry.remotes.oci.media import READ_CHUNK

if TYPE_CHECKING:
    import requests

    from adapterhub.registry.remotes.oci.client import Client


class FileSlice:
    """``length`` bytes of a file from ``offset``, streamed (requests sends Content-Length from ``len``).

    It can be sent again (each iteration reads the file afresh); progress
    counts each byte once.
    """

    resendable = True

    def __init__(self, path: Path, offset: int, length: int, progress: Any = None) -> None:
        self.path, self.offset, self.length, self.progress = path, offset, length, progress
        self._reported = 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        left = self.length
        done = 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            while left > 0:
                data = f.read(min(READ_CHUNK * 4, left))
                if not data:
                    raise IntegrityError(f"{self.path} is shorter than the registry index says")
                left -= len(data)
                done += len(data)
                if self.progress is not None and done > self._reported:
                    self.progress.update(done - self._reported)
                    self._reported = done
                yield data


STREAM_CHUNK = 4 * READ_CHUNK
STREAM_BUFFERS = 3  # one being read from the socket, two being hashed and written


class BlobWriter:
    """Writes a download to ``fd``; with O_DIRECT while offsets and lengths allow it.

    O_DIRECT sends the bytes from our buffer to the disk without a copy into
    the page cache. On the 2-core VM of ``bench/bench_remote.py`` that copy,
    and getting fresh page-cache memory for it, cost about 1 CPU-second per
    GiB, more than the hash. A filesystem or a length that refuses O_DIRECT
    (EINVAL) gets ordinary writes from there on; the file is fsynced either way.
    """

    def __init__(self, path: Path, append: bool, offset: int, direct: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        if direct and offset % DIRECT_ALIGN == 0:
            self.fd, self.direct = open_direct(path, flags, 0o600)
        else:
            self.fd, self.direct = os.open(path, flags, 0o600), False

    def _buffered(self) -> None:
        clear_direct(self.fd)
        self.direct = False

    def write(self, view: memoryview) -> None:
        if self.direct and len(view) % DIRECT_ALIGN:
            self._buffered()  # the last, short chunk: the offset after it is not aligned
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self._buffered()


def _paced(chunks: Iterator[Any], pace: Any) -> Iterator[Any]:
    """``chunks`` with ``pace()`` called before each is read (it arms the chunk's deadline)."""
    while True:
        pace()
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        yield chunk


def _stream(resp: requests.Response, path: Path, mode: str, h: Any, bar: Any, expected: int, offset: int = 0,
            client: Client | None = None) -> None:
    """Write the body to ``path`` (appending from ``offset`` in mode ``ab``), hashing it into ``h``.

    The main thread reads the socket; one thread hashes and another writes
    each chunk (hashlib and os.write drop the GIL), so reading, hashing and
    writing overlap. Both read the same buffer, which is refilled only once
    its hash and its write are done. With ``client``, each chunk must arrive
    within its read timeout plus its size at the minimum rate (the client's
    watchdog cuts a slower body off).
    """
    # http.client's readinto fills our buffers straight from the socket;
    # urllib3's read(amt) allocates and copies every chunk (about 2x the CPU).
    fp = getattr(resp.raw, "_fp", None)
    direct = fp is not None and hasattr(fp, "readinto") and not resp.headers.get("Content-Encoding")
    n = 0
    try:
        out = BlobWriter(path, mode == "ab", offset, direct)
    except BaseException:
        resp.close()
        raise

    def pace() -> None:
        if client is not None:
            left = max(1, min(STREAM_CHUNK, expected - n))
            client.watchdog.arm(client.settings.timeout + client.settings.body_time(left))

    try:
        inflight: list[tuple[Any, Any]] = []
        with ThreadPoolExecutor(1) as hasher, ThreadPoolExecutor(1) as writer:
            try:
                chunks = _readinto_chunks(fp) if direct else resp.iter_content(chunk_size=STREAM_CHUNK)
                for chunk in _paced(iter(chunks), pace):
                    if not chunk:
                        continue
                    view = memoryview(chunk)
                    inflight.append((hasher.submit(h.update, view), writer.submit(out.write, view)))
                    if len(inflight) >= STREAM_BUFFERS:
                        for fut in inflight.pop(0):
                            fut.result()
                    n += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                    if n > expected:
                        break
            except Exception as e:  # noqa: BLE001 - requests', urllib3's, http.client's and socket errors alike
                if client is not None and client.watchdog.fired:
                    raise _too_slow(client, n) from None
                if not _network(e):
                    raise  # the disk, not the network (ENOSPC is reported by the caller)
                raise RemoteError(f"the download broke off after {n} bytes: {type(e).__name__}: {e}",
                                  hint="run the same pull again: it resumes where it stopped") from None
            finally:
                if client is not None:
                    client.watchdog.disarm()
                for pair in inflight:
                    for fut in pair:
                        fut.exception()  # wait: the buffers are refilled only once both are done
            for pair in inflight:
                for fut in pair:
                    fut.result()
        if client is not None and client.watchdog.fired and n < expected:
            raise _too_slow(client, n)
        os.fsync(out.fd)
    finally:
        os.close(out.fd)
        resp.close()


def _too_slow(client: Client, n: int) -> RemoteError:
    return RemoteError(
        f"the download of a blob from {client.host} was cut off after {n} bytes: it came slower than "
        f"{client.settings.min_rate:g} bytes/s (ADAPTERHUB_REMOTE_MIN_RATE)",
        hint="run the same pull again later: it resumes where it stopped",
    )


def _network(e: BaseException) -> bool:
    """Is ``e`` from the connection rather than from the file being written?"""
    import http.client
    import socket

    import requests
    import urllib3

    kinds = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError,
             socket.timeout)
    return isinstance(e, kinds) or getattr(e, "errno", None) in (
        errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT)


def _readinto_chunks(fp: Any) -> Iterator[memoryview]:
    """Views of :data:`STREAM_BUFFERS` rotating page-aligned buffers (anonymous
    maps, as O_DIRECT needs). A buffer is refilled only after the caller has
    waited for the hash and the write of the view it last held."""
    bufs = [mmap.mmap(-1, STREAM_CHUNK) for _ in range(STREAM_BUFFERS)]
    i = 0
    while True:
        buf = bufs[i % STREAM_BUFFERS]
        k = fp.readinto(buf)
        if not k:
            return
        yield memoryview(buf)[:k]
        i += 1


def download(client: Client, repo: str, digest_hex: str, size: int, blobs: Path, bar: Any, stats: dict[str, int]) -> Path:
    """Download one blob into ``blobs/<hex>``, resuming ``<hex>.partial`` with Range, hashing as it streams."""
    final = blobs / digest_hex
    partial = blobs / f"{digest_hex}.partial"
    for attempt in range(2):
        offset = 0
        h = hashlib.sha256()
        try:
            if final.exists():
                os.rename(final, partial)  # re-verified below, as a resume of the whole size
            if partial.exists():
                offset = partial.stat().st_size
                if offset > size:
                    partial.unlink()
                    offset = 0
                else:
                    with open(partial, "rb", buffering=0) as f:
                        while chunk := f.read(8 * READ_CHUNK):
                            h.update(chunk)
            if offset < size or size == 0:
                resp = client.get_blob(repo, "sha256:" + digest_hex, offset=offset)
                if resp.status_code == 200 and offset:
                    offset, h = 0, hashlib.sha256()  # the server ignored Range: start over
                    mode = "wb"
                elif resp.status_code == 416:
                    client.watchdog.disarm()
                    resp.close()
                    mode = ""
                else:
                    mode = "ab" if offset else "wb"
                if mode:
                    stats["resumed_bytes"] += offset
                    if bar is not None and offset:
                        bar.update(offset)
                    _stream(resp, partial, mode, h, bar, size - offset, offset, client)
            elif bar is not None:
                bar.update(size)
                stats["resumed_bytes"] += size
        except OSError as e:
            if e.errno == errno.ENOSPC:
                partial.unlink(missing_ok=True)
                raise storage_error(e, "a download") from e
            raise
        got_size = partial.stat().st_size
        if got_size == size and h.hexdigest() == digest_hex:
            os.replace(partial, final)
            return final
        partial.unlink(missing_ok=True)
        if offset and attempt == 0:
            continue  # the kept prefix may have been bad: one fresh download
        raise IntegrityError(
            f"{client.host}/{repo}: blob sha256:{digest_hex[:12]}… does not match its digest "
            f"({got_size} bytes, sha256 {h.hexdigest()[:12]}…)",
            hint="the registry holds damaged data; nothing was imported",
        )
    raise AssertionError("unreachable")
