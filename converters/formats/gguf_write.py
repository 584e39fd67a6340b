"""One GGUF file, written tensor by tensor, that appears only when complete.

The ``gguf`` package's ``GGUFWriter`` writes the header, the metadata and the
tensor table; the table is planned up front from names, shapes and types
(``plan``), so each tensor's bytes can be written as soon as they exist and
then dropped: memory stays bounded by one tensor.

The tensor data after the table is written here, not by ``GGUFWriter``:
its ``write_tensor_data`` wants each tensor whole as one numpy array and
writes it through the page cache from the calling thread. Here a tensor is
encoded a slab of rows at a time straight into one of two page-aligned
staging buffers (``encode_rows``; by the C kernel where it is built, else
by torch), while a thread writes the other buffer to the file with
O_DIRECT. On the 2-core VM the page-cache copy and the
fsync that flushes it cost more than the conversion itself; with O_DIRECT
the bytes are on the disk when each write returns, and the disk works while
the next slab converts. The bytes are the ones ``GGUFWriter`` would write:
each tensor at its planned offset, zero padding to the alignment after it
(tests/test_gguf_quant.py compares whole files).

With ``digest=True`` the file's sha256 is computed as it is written
(``GGUFFile.sha256``), so a registry push can store it without reading it
again: the header up to the first buffer's offset is read back once (it is
small), then each buffer is hashed by a second thread while the I/O thread
writes it, in file order (hashlib releases the GIL). Without it nothing is
hashed and nothing is read beyond the table's last partial block.

The file is written to ``.<name>.<pid>-<random>.incomplete`` beside OUT,
fsynced once, and renamed over OUT only when every tensor is in. On any
error, Ctrl-C included, the temp file is removed and OUT is untouched. A full
disk becomes a ``StorageError`` (exit 7).

>>> with GGUFFile(out, "llama") as f:                        # doctest: +SKIP
...     f.writer.add_block_count(2)
...     f.plan([OutTensor("token_embd.weight", (512, 64), T.F16)])
...     f.encode_rows("token_embd.weight", weights)          # or f.write(name, numpy bytes)
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import ConflictError, InvalidArtifactError
from adapterhub.fsutil import DIRECT_ALIGN, clear_direct, fsync_dir, open_direct, remove_stale_staging, staging_path, storage_error

from adapterhub.converters.formats.gguf_arch import tensor_nbytes

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from concurrent.futures import Future, ThreadPoolExecutor

    import numpy as np
    from gguf import GGMLQuantizationType

STAGE_BYTES = 16 * 1024**2  # each of the two staging buffers
SLAB_ELEMENTS = 1 << 20  # values encoded per step of ``encode_rows``


@dataclass(frozen=True)
class OutTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # PyTorch order ([out, in])
    qtype: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)


class _Stages:
    """Appends bytes to a file that already holds ``start`` bytes, through two page-aligned buffers.

    The producer fills one buffer (``reserve``/``commit`` hand out room in it
    to encode into; ``append``/``zeros`` copy in), a thread writes the other.
    With O_DIRECT every write but the file's last, unaligned piece starts at
    an aligned offset of the file: the buffers start at the block holding the
    end of the tensor table, whose bytes are read back first.

    With ``digest``, ``sha`` is the sha256 of the file as written so far: the
    bytes before the first buffer (read back here), then each buffer, hashed
    on a thread of its own while the I/O thread writes it.
    """

    def __init__(self, path: Path, start: int, digest: bool = False) -> None:
        import hashlib
        import mmap
        from concurrent.futures import ThreadPoolExecutor

        import numpy as np

        self.pos = start - start % DIRECT_ALIGN  # file offset of the current buffer
        self.sha = hashlib.sha256() if digest else None
        with open(path, "rb") as f:  # the table's last partial block, rewritten whole with the first buffer
            if self.sha is not None:
                _hash_prefix(f, self.pos, self.sha)
            f.seek(self.pos)
            head = f.read(start - self.pos)
        self.fd, self.direct = open_direct(path, os.O_WRONLY, 0o644)
        self._maps = [mmap.mmap(-1, STAGE_BYTES) for _ in range(2)]
        self._bufs = [np.frombuffer(m, dtype=np.uint8) for m in self._maps]
        self._cur = 0
        self.fill = 0
        if head:
            self._bufs[0][: len(head)] = np.frombuffer(head, dtype=np.uint8)
            self.fill = len(head)
        self._reserved = 0  # bytes handed out by reserve and not yet committed
        self._spills = 0  # rooms handed out in scratch and not yet committed
        self._scratch: list[np.ndarray] = []
        self._pending: Future[None] | None = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterhub-gguf-io")
        # one thread: the buffers are hashed in the order the I/O thread hands them over
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterhub-gguf-hash") if digest else None

    def reserve(self, n: int, k: int = 0) -> np.ndarray:
        """Room for ``n`` bytes after those reserved already: in the buffer where they fit, else scratch ``k``.

        Rooms are filled in any order (by several threads) and then passed to
        ``commit`` in the order they were reserved.
        """
        import numpy as np

        at = self.fill + self._reserved
        if not self._spills and at + n <= STAGE_BYTES:
            self._reserved += n
            return self._bufs[self._cur][at : at + n]
        self._spills += 1  # this room and every later one until they are all committed
        while len(self._scratch) <= k:
            self._scratch.append(np.empty(0, dtype=np.uint8))
        if self._scratch[k].size < n:
            self._scratch[k] = np.empty(n, dtype=np.uint8)
        return self._scratch[k][:n]

    def commit(self, room: np.ndarray) -> None:
        n = room.size
        if self._reserved and _address(room) == _address(self._bufs[self._cur]) + self.fill:
            self._reserved -= n
            self._advance(n)
        else:
            self._spills -= 1
            self.append(room)

    def append(self, data: np.ndarray) -> None:
        """Copy a contiguous 1-D uint8 array in."""
        done, total = 0, data.size
        while done < total:
            n = min(total - done, STAGE_BYTES - self.fill)
            self._bufs[self._cur][self.fill : self.fill + n] = data[done : done + n]
            self._advance(n)
            done += n

    def zeros(self, n: int) -> None:
        while n:
            k = min(n, STAGE_BYTES - self.fill)
            self._bufs[self._cur][self.fill : self.fill + k] = 0
            self._advance(k)
            n -= k

    def _advance(self, n: int) -> None:
        self.fill += n
        if self.fill == STAGE_BYTES:
            self._submit()

    def _submit(self) -> None:
        """Hand the current buffer to the writing thread; wait until the other one is written."""
        fut = self._io.submit(self._write, self._cur, self.fill, self.pos)
        self.pos += self.fill
        self._wait()
        self._pending = fut
        self._cur ^= 1
        self.fill = 0

    def _wait(self) -> None:
        if self._pending is not None:
            fut, self._pending = self._pending, None
            fut.result()

    def _write(self, i: int, n: int, offset: int) -> None:
        """Write buffer ``i``'s first ``n`` bytes at ``offset`` (on the I/O thread), hashing them meanwhile."""
        mv = memoryview(self._maps[i])[:n]
        hashed = self._hasher.submit(self.sha.update, mv) if self._hasher is not None and self.sha is not None else None
        try:
            self._pwrite_all(mv, offset)
        finally:
            if hashed is not None:  # the buffer is refilled once this returns
                hashed.result()

    def _pwrite_all(self, mv: memoryview, offset: int) -> None:
        while mv:
            if self.direct and len(mv) < DIRECT_ALIGN:
                self._buffered()  # the file's unaligned last piece
            chunk = mv[: len(mv) - len(mv) % DIRECT_ALIGN] if self.direct else mv
            try:
                k = os.pwrite(self.fd, chunk, offset)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self._buffered()  # the filesystem wants more alignment than it let us open with
                continue
            if k == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            mv, offset = mv[k:], offset + k

    def _buffered(self) -> None:
        clear_direct(self.fd)
        self.direct = False

    def finish(self) -> None:
        """Write what is left and fsync."""
        if self.fill:
            self._submit()
        self._wait()
        os.fsync(self.fd)

    def close(self) -> None:
        try:
            self._wait()
        except OSError:
            pass
        finally:
            self._io.shutdown(wait=True)
            if self._hasher is not None:
                self._hasher.shutdown(wait=True)
            os.close(self.fd)


def _hash_prefix(f: Any, n: int, sha: Any) -> None:
    """Feed the first ``n`` bytes of the open file ``f`` to ``sha``."""
    buf = bytearray(min(n, 1 << 20))
    mv = memoryview(buf)
    f.seek(0)
    while n:
        k = f.readinto(mv[: min(n, len(buf))])
        if not k:
            raise OSError(errno.EIO, f"{f.name} ends before its tensor table does")
        sha.update(mv[:k])
        n -= k


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


_torch_threads = threading.local()
_ENCODERS = "adapterhub-gguf-encode"  # the name of encode_rows' threads


def _torch_encode(src: Any, qtype: GGMLQuantizationType, room: np.ndarray) -> None:
    """The torch path of one slab; the thread runs torch ops on one core (the number is per thread under OpenMP)."""
    import torch

    from adapterhub.converters.formats.gguf_quant import encode_into

    if not getattr(_torch_threads, "one", False) and threading.current_thread().name.startswith(_ENCODERS):
        torch.set_num_threads(1)  # in the file's own threads only, never the caller's
        _torch_threads.one = True
    encode_into(src, qtype, torch.from_numpy(room))


def _torch_slabs(src: Any, qtype: GGMLQuantizationType) -> Iterator[tuple[int, Callable[[np.ndarray], None]]]:
    """(bytes, encode into a room) for each slab of whole leading entries of ``src`` (a view stays a view)."""
    import functools

    from adapterhub.converters.formats.gguf_quant import encoded_nbytes

    if not hasattr(src, "data_ptr"):  # a numpy array where the kernel is off: uint16 holds bf16 bits
        import warnings

        import torch

        with warnings.catch_warnings():  # read-only maps are only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(src)
        src = t.view(torch.bfloat16) if src.dtype.name == "uint16" else t
    lead = src.shape[0] if src.dim() > 1 else 1
    step = max(1, SLAB_ELEMENTS // max(src.numel() // lead, 1))
    for i in range(0, lead, step):
        part = src[i : i + step] if src.dim() > 1 else src
        yield encoded_nbytes(part.numel(), qtype), functools.partial(_torch_encode, part, qtype)


def _kernel_slabs(rows: Any, qtype: GGMLQuantizationType) -> Iterator[tuple[int, Callable[[np.ndarray], None]]]:
    """(bytes, encode into a room) for each slab of about ``SLAB_ELEMENTS`` values, by the C kernel."""
    import functools

    from adapterhub.converters.formats.gguf_quant import encode_rows_into, encoded_nbytes

    step = max(1, SLAB_ELEMENTS // max(rows.cols, 1))
    for r0 in range(0, rows.rows, step):
        r1 = min(rows.rows, r0 + step)
        yield encoded_nbytes((r1 - r0) * rows.cols, qtype), functools.partial(encode_rows_into, rows, r0, r1, qtype)


class GGUFFile:
    """A context manager around ``GGUFWriter`` for one atomically written file."""

    def __init__(
        self, out: str | os.PathLike, arch: str, *, force: bool = False, workers: int | None = None, digest: bool = False
    ) -> None:
        import gguf

        from adapterhub.platform import cpu_count

        self.out = Path(out)
        if self.out.exists() and not force:
            raise ConflictError(f"{self.out} already exists", hint="pass --force to replace it")
        if self.out.is_dir():
            raise ConflictError(f"{self.out} is a directory; a GGUF output is one file")
        self.writer = gguf.GGUFWriter(None, arch)
        self._tmp: Path | None = None
        self._stages: _Stages | None = None
        self._order: list[OutTensor] = []
        self._next = 0
        self.bytes_written = 0
        self.digest = digest
        #: with ``digest``: the sha256 (hex) of the whole file, once it is complete
        self.sha256: str | None = None
        # encode_rows' threads (each keeps its own float32 temporaries)
        w = self.workers = max(1, min(4, workers if workers is not None else cpu_count()))
        self._pool: ThreadPoolExecutor | None = None
        if w > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(w, thread_name_prefix=_ENCODERS)

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self._commit()
            else:
                self._abort()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def plan(self, tensors: Sequence[OutTensor]) -> None:
        """Declare every tensor, in the order they will be written; then open the file and write the header."""
        import numpy as np
        from gguf import GGMLQuantizationType as T

        for t in tensors:
            if t.qtype in (T.F32, T.F16):
                dtype = np.float32 if t.qtype == T.F32 else np.float16
                self.writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), t.nbytes, raw_dtype=t.qtype)
            else:
                from gguf.quants import quant_shape_to_byte_shape

                byte_shape = quant_shape_to_byte_shape(t.shape, t.qtype)
                self.writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
        self._order = list(tensors)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(self.out)  # left by a killed run
            self._tmp = staging_path(self.out)
            self.writer.write_header_to_file(path=self._tmp)
            self.writer.write_kv_data_to_file()
            self.writer.write_ti_data_to_file()
            assert self.writer.fout is not None
            end = self.writer.fout[0].tell()
            self.writer.close()  # the header is in the file; the tensor data is written through _Stages
            self._stages = _Stages(self._tmp, end, self.digest)
            self._stages.zeros(self._pad(end))
        except OSError as e:
            raise storage_error(e, str(self.out)) from e

    def _pad(self, n: int) -> int:
        a = self.writer.data_alignment
        return -n % a

    def _begin(self, name: str, nbytes: int | None = None) -> OutTensor:
        if self._next >= len(self._order) or self._order[self._next].name != name:
            expected = self._order[self._next].name if self._next < len(self._order) else "nothing"
            raise InvalidArtifactError(f"internal: GGUF tensor {name} written out of order (expected {expected})")
        spec = self._order[self._next]
        if nbytes is not None and nbytes != spec.nbytes:
            raise InvalidArtifactError(f"internal: GGUF tensor {name} has {nbytes} bytes, planned {spec.nbytes}")
        return spec

    def _end(self, spec: OutTensor) -> None:
        assert self._stages is not None
        self._stages.zeros(self._pad(spec.nbytes))
        self._next += 1
        self.bytes_written += spec.nbytes

    def write(self, name: str, data: np.ndarray) -> None:
        """Write the next tensor's bytes (in planned order), given whole."""
        import numpy as np

        spec = self._begin(name, data.nbytes)
        assert self._stages is not None
        flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        try:
            self._stages.append(flat)
            self._end(spec)
        except OSError as e:
            raise storage_error(e, str(self.out)) from e

    def encode_rows(self, name: str, src: Any) -> None:
        """Encode the next tensor in its planned type, a slab at a time, straight into the staging buffers.

        ``src`` is a torch tensor or a numpy array (uint16 holding bf16 bits);
        its rows in C order are the tensor's rows, and it may be a strided
        view (the q/k row permutation is a 4-D one). The C kernel encodes
        slabs of rows where it is built and reads ``src``'s type; else torch
        encodes slabs of whole leading entries. Slabs are encoded by
        ``workers`` threads at once (ctypes and torch release the GIL), each
        into its own reserved room, and committed in order; all are done
        when this returns.
        """
        from adapterhub.converters.formats.gguf_quant import KERNEL_TYPES, Rows, encoded_nbytes

        spec = self._begin(name)
        numel = src.numel() if hasattr(src, "numel") else int(src.size)
        self._begin(name, encoded_nbytes(numel, spec.qtype))
        rows = Rows.of(src) if int(spec.qtype) in KERNEL_TYPES else None
        slabs = _kernel_slabs(rows, spec.qtype) if rows is not None else _torch_slabs(src, spec.qtype)
        st = self._stages
        assert st is not None
        window = 2 * self.workers  # slabs in flight: every thread busy, memory a few slabs
        inflight: deque[tuple[np.ndarray, Future[None] | None]] = deque()
        try:
            for k, (nbytes, fill) in enumerate(slabs):
                room = st.reserve(nbytes, k % window)
                if self._pool is None:
                    fill(room)
                    inflight.append((room, None))
                else:
                    inflight.append((room, self._pool.submit(fill, room)))
                while len(inflight) >= window or (inflight and inflight[0][1] is None):
                    self._commit_next(inflight)
            while inflight:  # the caller may reuse src's memory once this returns
                self._commit_next(inflight)
            self._end(spec)
        except OSError as e:
            raise storage_error(e, str(self.out)) from e
        finally:
            for _, fut in inflight:
                if fut is not None:
                    fut.cancel()
                    try:
                        fut.result()
                    except Exception:  # noqa: BLE001 - the first error is already on its way up
                        pass

    def _commit_next(self, inflight: deque[tuple[np.ndarray, Future[None] | None]]) -> None:
        assert self._stages is not None
        room, fut = inflight.popleft()
        if fut is not None:
            fut.result()
        self._stages.commit(room)

    def _commit(self) -> None:
        if self._next != len(self._order):
            self._abort()
            raise InvalidArtifactError(f"internal: {len(self._order) - self._next} GGUF tensors were never written")
        try:
            assert self._stages is not None and self._tmp is not None
            self._stages.finish()
            if self._stages.sha is not None:
                self.sha256 = self._stages.sha.hexdigest()
            self._stages.close()
            self._stages = None
            os.replace(self._tmp, self.out)
            fsync_dir(self.out.parent)
        except OSError as e:
            self._abort()
            raise storage_error(e, str(self.out)) from e
        self._tmp = None

    def _abort(self) -> None:
        try:
            self.writer.close()
        except OSError:
            pass
        if self._stages is not None:
            self._stages.close()
            self._stages = None
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None
