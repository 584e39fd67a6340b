"""Writing safetensors shards in a fixed order, one tensor at a time, with memory bounded by one tensor.

``StreamingShardWriter`` is given every output tensor's name, shape and dtype
up front, so each shard's header (with its data offsets) is written first and
tensor bytes are appended as they are produced. ``safetensors``' own
``save_file`` needs a whole shard in memory at once, which is what bounds RSS
by shard size in other tools. Shards are cut by bytes as transformers cuts
them, with ``model.safetensors.index.json`` for more than one. Every shard is
reopened with ``safe_open`` and checked against the plan before the writer
reports success.

>>> with staged_dir(out, force=False) as tmp:                   # doctest: +SKIP
...     w = StreamingShardWriter(tmp, specs)
...     for s in specs:
...         w.write(s.name, src.get(s.name))
...     w.close()
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError, StorageError
from adapterhub.fsutil import DIRECT_ALIGN, clear_direct, open_direct, storage_error, write_atomic
from adapterhub.platform import fdatasync, kernel_copy, pread_into

from adapterhub.converters.formats.safetensors_io import INDEX_NAME, FileSpan, TensorSpec, st_dtype

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import torch

DEFAULT_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size ("5GB")
SYNC_EVERY_BYTES = 256 * 1024**2  # start background writeback after this many new bytes


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Cut the ordered specs into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": st_dtype(s.dtype), "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


STAGE_BYTES = 8 * 1024**2  # each of _ShardFile's two staging buffers


class _ShardFile:
    """Appends bytes to a new file, with O_DIRECT where the filesystem allows it.

    Through the page cache, every byte written is copied into page-cache
    memory the kernel first has to find and zero, and the fsync at the end
    then writes it out. On the 2-core VM that copy cost 2-4 s per 1.6 GiB
    and varied fivefold between runs, where O_DIRECT writes of the same
    bytes took 1.4-1.6 s every time, on disk when they return. Bytes are
    gathered in two page-aligned staging buffers: one is filled (a torch copy,
    which runs without the GIL) while a thread writes the other. A filesystem
    that refuses O_DIRECT (tmpfs, some network filesystems) gets ordinary
    writes, as does the unaligned last piece of the file.
    """

    def __init__(self, path: Path, *, direct: bool = True, digest: bool = False) -> None:
        import hashlib

        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        self.path = path
        # sha256 of every byte written, in order (on the I/O thread with O_DIRECT)
        self.sha256 = hashlib.sha256() if digest else None
        if direct:
            self.fd, self.direct = open_direct(path, flags, 0o644)
        else:
            self.fd, self.direct = os.open(path, flags, 0o644), False
        # Appends go through the stages for the file's whole life once it is
        # opened with O_DIRECT, even if the I/O thread falls back to ordinary
        # writes: the bytes must reach the file in order.
        self.staged = self.direct
        self._io: ThreadPoolExecutor | None = None
        if not self.staged:
            return
        import mmap
        from concurrent.futures import ThreadPoolExecutor

        self._stages = [mmap.mmap(-1, STAGE_BYTES) for _ in range(2)]
        self._views = [memoryview(m) for m in self._stages]
        self._tensors: list[Any] = [None, None]  # torch views of the stages, made on first use
        self._cur = 0
        self._fill = 0
        self._pending: Any = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterhub-direct-io")

    # -- appending
    def write(self, data: bytes | memoryview) -> None:
        if not self.staged:
            if self.sha256 is not None:
                self.sha256.update(data)
            _write_all(self.fd, data)
            return
        mv = memoryview(data).cast("B")
        while mv:
            n = min(len(mv), STAGE_BYTES - self._fill)
            self._views[self._cur][self._fill : self._fill + n] = mv[:n]
            self._advance(n)
            mv = mv[n:]

    def write_tensor(self, flat_u8: torch.Tensor) -> None:
        """Append a contiguous 1-D uint8 CPU tensor."""
        if not self.staged:
            data = memoryview(flat_u8.numpy())
            if self.sha256 is not None:
                self.sha256.update(data)
            _write_all(self.fd, data)
            return
        import torch

        done, total = 0, flat_u8.numel()
        while done < total:
            n = min(total - done, STAGE_BYTES - self._fill)
            stage = self._tensors[self._cur]
            if stage is None:
                stage = self._tensors[self._cur] = torch.frombuffer(self._stages[self._cur], dtype=torch.uint8)
            stage[self._fill : self._fill + n].copy_(flat_u8[done : done + n])
            self._advance(n)
            done += n

    def copy_from(self, src: int, offset: int, nbytes: int, rel: str, name: str) -> None:
        """Append ``nbytes`` of the file ``src`` from ``offset``."""
        if not self.staged:
            _copy_range(src, self.fd, offset, nbytes, rel, name, self.sha256)
            return
        done = 0
        while done < nbytes:
            want = min(nbytes - done, STAGE_BYTES - self._fill)
            n = pread_into(src, self._views[self._cur][self._fill : self._fill + want], offset + done)
            if n == 0:
                raise InvalidArtifactError(f"{rel}: truncated while reading tensor {name}")
            self._advance(n)
            done += n

    def _advance(self, n: int) -> None:
        self._fill += n
        if self._fill == STAGE_BYTES:
            self._submit()

    def _submit(self) -> None:
        """Hand the current stage to the I/O thread; wait until the other one is free again."""
        assert self._io is not None
        fut = self._io.submit(self._write_stage, self._cur, self._fill)
        if self._pending is not None:
            self._pending.result()
        self._pending = fut
        self._cur ^= 1
        self._fill = 0

    def _write_stage(self, i: int, n: int) -> None:
        mv = self._views[i][:n]
        if self.sha256 is not None:
            self.sha256.update(mv)
        aligned = n - n % DIRECT_ALIGN
        while self.direct and aligned:
            try:
                k = os.write(self.fd, mv[:aligned])
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._buffered()  # the filesystem wants a larger alignment than it let us open with
                break
            mv, aligned = mv[k:], aligned - k
            if aligned % DIRECT_ALIGN:
                self._buffered()
        if mv:
            if self.direct:
                self._buffered()  # the file's unaligned last piece
            _write_all(self.fd, mv)

    def _buffered(self) -> None:
        clear_direct(self.fd)
        self.direct = False

    # -- ending
    def flush(self) -> None:
        """Write out everything appended so far (the file then ends unaligned, so no more appends)."""
        if not self.staged:
            return
        if self._fill:
            self._submit()
        if self._pending is not None:
            fut, self._pending = self._pending, None
            fut.result()

    def close(self, *, sync: bool) -> None:
        try:
            if sync:
                self.flush()
                os.fsync(self.fd)
        finally:
            self._release()

    def _release(self) -> None:
        if self._io is not None:
            if self._pending is not None:
                self._pending.exception()  # wait: the stage must not be unmapped under a write
                self._pending = None
            self._io.shutdown(wait=True)
            self._tensors = [None, None]
            for v in self._views:
                v.release()
            self._views = []
            for m in self._stages:
                try:
                    m.close()
                except BufferError:  # still exported somewhere: unmapped when collected
                    pass
            self._io = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StreamingShardWriter:
    """Write tensors into sharded safetensors in a fixed order, one at a time."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        specs: Sequence[TensorSpec],
        *,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: Mapping[str, str] | None = None,
        prefix: str = "model",
        direct: bool = True,
        digests: bool = False,
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the output plan")
        self.out_dir = Path(out_dir)
        self.metadata = dict(metadata if metadata is not None else {"format": "pt"})
        self.shards = plan_shards(specs, max_shard_bytes)
        n = len(self.shards)
        self.shard_names = (
            [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._order = [(si, s) for si, shard in enumerate(self.shards) for s in shard]
        self._pos = 0
        self.direct = direct
        self.digests = digests
        #: shard file name -> sha256 of its bytes, for the shards closed so far (with ``digests``)
        self.sha256: dict[str, str] = {}
        self._file: _ShardFile | None = None
        self._shard = -1
        self.bytes_written = 0
        self._unsynced = 0
        self._syncer: threading.Thread | None = None
        self._sync_error: OSError | None = None

    def _open_shard(self, si: int) -> None:
        self._close_fd()
        path = self.out_dir / self.shard_names[si]
        try:
            self._file = _ShardFile(path, direct=self.direct, digest=self.digests)
            self._file.write(_header_bytes(self.shards[si], self.metadata))
        except OSError as e:
            raise storage_error(e, str(path)) from e
        self._shard = si

    def _join_syncer(self) -> None:
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None
        if self._sync_error is not None:
            e, self._sync_error = self._sync_error, None
            raise storage_error(e, str(self.out_dir / self.shard_names[self._shard]))

    def _background_sync(self) -> None:
        """Start writeback of what is written so far while the next tensors are computed.

        Without it the whole shard is flushed by the fsync at close, and the
        merge waits for the disk at the end instead of overlapping with it.
        """
        if self._file is None or self._file.direct:
            return  # O_DIRECT writes are on the disk already
        if self._unsynced < SYNC_EVERY_BYTES or (self._syncer is not None and self._syncer.is_alive()):
            return
        self._join_syncer()
        fd = self._file.fd

        def run() -> None:
            try:
                fdatasync(fd)  # type: ignore[arg-type]
            except OSError as e:
                self._sync_error = e

        self._unsynced = 0
        self._syncer = threading.Thread(target=run, name="adapterhub-writeback", daemon=True)
        self._syncer.start()

    def _close_fd(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            try:
                self._join_syncer()
                f.close(sync=True)
                if f.sha256 is not None:
                    self.sha256[f.path.name] = f.sha256.hexdigest()
            except BaseException as e:
                f.close(sync=False)
                if isinstance(e, OSError):
                    raise storage_error(e, str(f.path)) from e
                raise

    def _next(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        if self._pos >= len(self._order):
            raise ValueError(f"unexpected tensor {name}: every planned tensor was already written")
        si, spec = self._order[self._pos]
        if name != spec.name:
            raise ValueError(f"tensors must be written in plan order: expected {spec.name}, got {name}")
        if shape != spec.shape or dtype != spec.dtype:
            raise ValueError(f"{name}: planned {spec.dtype} {list(spec.shape)}, got {dtype} {list(shape)}")
        if si != self._shard:
            self._open_shard(si)
        return si

    def write(self, name: str, tensor: torch.Tensor) -> None:
        si = self._next(name, tuple(tensor.shape), tensor.dtype)
        import torch

        t = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        assert self._file is not None
        try:
            self._file.write_tensor(t)
        except OSError as e:
            raise storage_error(e, str(self.out_dir / self.shard_names[si])) from e
        self._done(t.numel())

    def write_bytes(self, name: str, shape: tuple[int, ...], dtype: Any, data: bytes | memoryview) -> None:
        """Write a tensor given as its raw little-endian bytes (no torch: planned with the same ``dtype`` object)."""
        si = self._next(name, tuple(shape), dtype)
        nbytes = memoryview(data).nbytes
        if nbytes != self._order[self._pos][1].nbytes:
            raise ValueError(f"{name}: {nbytes} bytes, {self._order[self._pos][1].nbytes} planned")
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as e:
            raise storage_error(e, str(self.out_dir / self.shard_names[si])) from e
        self._done(nbytes)

    def copy_span(self, name: str, spec: TensorSpec, span: FileSpan) -> None:
        """Write a tensor that passes through unchanged, file to file.

        With O_DIRECT the bytes are read straight into the staging buffer.
        Otherwise ``copy_file_range`` moves them inside the kernel (or shares
        extents, on filesystems that can), so they never enter this process's
        memory; a plain read/write loop is the fallback.
        """
        if span.nbytes != spec.nbytes:
            raise ValueError(f"{name}: {span.nbytes} bytes in the source, {spec.nbytes} planned")
        si = self._next(name, spec.shape, spec.dtype)
        assert self._file is not None
        try:
            src = os.open(span.path, os.O_RDONLY)
        except OSError as e:
            raise InvalidArtifactError(f"{span.rel}: cannot read tensor {name} ({e.strerror or e})") from None
        try:
            self._file.copy_from(src, span.offset, span.nbytes, span.rel, name)
        except OSError as e:
            raise storage_error(e, str(self.out_dir / self.shard_names[si])) from e
        finally:
            os.close(src)
        self._done(span.nbytes)

    def _done(self, n: int) -> None:
        self.bytes_written += n
        self._unsynced += n
        self._pos += 1
        self._background_sync()

    def close(self) -> list[str]:
        """Finish, write the index for sharded output, verify; return the files written."""
        if self._pos != len(self._order):
            missing = self._order[self._pos][1].name
            raise ValueError(f"output incomplete: {missing} and {len(self._order) - self._pos - 1} more not written")
        for si in range(len(self.shards)):  # shards with no tensors cannot happen, but be exact
            if si > self._shard:
                self._open_shard(si)
        self._close_fd()
        written = list(self.shard_names)
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for sh in self.shards for s in sh)},
                "weight_map": {s.name: self.shard_names[si] for si, sh in enumerate(self.shards) for s in sh},
            }
            write_atomic(self.out_dir / INDEX_NAME, data=(json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
            written.append(INDEX_NAME)
        self.verify()
        return written

    def abort(self) -> None:
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None
        if self._file is not None:
            f, self._file = self._file, None
            f.close(sync=False)

    def verify(self) -> None:
        """Reopen every shard with safetensors and compare it with the plan."""
        from safetensors import safe_open

        for name, shard in zip(self.shard_names, self.shards):
            with safe_open(str(self.out_dir / name), framework="numpy") as f:  # headers only: no torch
                got = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            want = {s.name: (s.shape, st_dtype(s.dtype)) for s in shard}
            if got != want:
                raise StorageError(f"{name}: written shard does not match its plan")


COPY_CHUNK = 64 * 1024**2


def _copy_range(src: int, dst: int, offset: int, nbytes: int, rel: str, name: str, sha256: Any = None) -> None:
    """Append ``nbytes`` of ``src`` from ``offset`` at ``dst``'s file position (hashing them into ``sha256``)."""
    done = 0
    kernel = sha256 is None  # bytes to hash have to pass through this process
    while done < nbytes:
        want = min(COPY_CHUNK, nbytes - done)
        if kernel:
            copied = kernel_copy(src, dst, want, offset + done)
            if copied is None:  # macOS, another filesystem: through this process from here on
                kernel = False
                continue
            n = copied
        else:
            chunk = os.pread(src, want, offset + done)
            n = len(chunk)
            if n:
                if sha256 is not None:
                    sha256.update(chunk)
                _write_all(dst, chunk)
        if n == 0:
            raise InvalidArtifactError(f"{rel}: truncated while reading tensor {name}")
        done += n


def _write_all(fd: int, data: bytes | memoryview) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]
