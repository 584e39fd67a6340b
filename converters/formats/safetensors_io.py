"""Streaming safetensors I/O with memory bounded by one tensor.

Reading: ``TensorSource`` parses each shard's header once (with ``safe_open``)
and then reads a tensor's bytes with ``pread`` straight into a tensor it owns
(``get``) or into a reused buffer (``read_into``). Keeping a memory map open
per shard would keep every page touched so far resident (on a 1 GiB shard RSS
grew by 1 GiB); reopening the shard per tensor re-parses its header every
time, which on an adapter with hundreds of tensors cost close to a second of
a merge.

Writing: ``StreamingShardWriter`` is given every output tensor's name, shape
and dtype up front, so each shard's header (with its data offsets) is written
first and tensor bytes are appended as they are produced. ``safetensors``'
own ``save_file`` needs a whole shard in memory at once, which is what bounds
RSS by shard size in other tools. Every shard is reopened with ``safe_open``
and checked against the plan before the writer reports success.

Outputs are built in ``staged_dir``: a temp dir beside OUT, renamed into place
at the end and removed on any error or Ctrl-C.

>>> src = TensorSource(files)                                    # doctest: +SKIP
>>> specs = [src.spec(k) for k in src.keys()]
>>> with staged_dir(out, force=False) as tmp:
...     w = StreamingShardWriter(tmp, specs)
...     for s in specs:
...         w.write(s.name, src.get(s.name))
...     w.close()
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import shutil
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import (
    ConflictError,
    InvalidArtifactError,
    NotFoundError,
    StorageError,
)
from adapterhub.fsutil import DIRECT_ALIGN, clear_direct, open_direct
from adapterhub.manifest import check_relpath

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import torch

FileMap = Mapping[str, Path]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size ("5GB")
SYNC_EVERY_BYTES = 256 * 1024**2  # start background writeback after this many new bytes

# safetensors dtype names <-> torch dtype attribute names
_ST_TO_TORCH = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
}


def torch_dtype(st_name: str) -> torch.dtype:
    import torch

    try:
        return getattr(torch, _ST_TO_TORCH[st_name])
    except KeyError:
        raise InvalidArtifactError(f"unsupported safetensors dtype {st_name}") from None


def st_dtype(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    for st, tn in _ST_TO_TORCH.items():
        if tn == name:
            return st
    raise InvalidArtifactError(f"dtype {dtype} cannot be stored in safetensors")


_DTYPE_SIZES: dict[Any, int] = {}


def dtype_size(dtype: torch.dtype) -> int:
    size = _DTYPE_SIZES.get(dtype)
    if size is None:
        import torch

        size = 1 if dtype == torch.bool else torch.empty((), dtype=dtype).element_size()
        _DTYPE_SIZES[dtype] = size
    return size


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


def file_map(root: str | os.PathLike) -> dict[str, Path]:
    """A directory (or single file) as a FileMap."""
    from adapterhub.manifest import list_files

    return dict(list_files(root))


def _read_json(files: FileMap, rel: str) -> Any:
    try:
        with open(files[rel], "rb") as fh:
            return json.loads(fh.read())
    except json.JSONDecodeError as e:
        raise InvalidArtifactError(f"{rel}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


class TensorSource:
    """Lazy, memory-mapped access to the tensors of a checkpoint or adapter.

    Uses ``model.safetensors.index.json`` when present (every weight_map entry
    must be a safe relative path naming a file of the artifact); otherwise
    every ``*.safetensors`` file of the FileMap.
    """

    def __init__(self, files: FileMap, *, weights: Sequence[str] | None = None) -> None:
        from safetensors import safe_open

        self.files = files
        self._where: dict[str, str] = {}  # tensor name -> relpath of its shard
        self._specs: dict[str, TensorSpec] = {}
        self._span: dict[str, tuple[int, int]] = {}  # tensor name -> (file offset, nbytes)
        self.metadata: dict[str, str] = {}
        if weights is None:
            if INDEX_NAME in files:
                index = _read_json(files, INDEX_NAME)
                wm = index.get("weight_map") if isinstance(index, dict) else None
                if not isinstance(wm, dict):
                    raise InvalidArtifactError(f"{INDEX_NAME}: no weight_map")
                weights = sorted({check_relpath(v) for v in wm.values()})
            else:
                weights = sorted(r for r in files if r.endswith(".safetensors"))
        if not weights:
            raise InvalidArtifactError("no safetensors weights found")
        for rel in weights:
            if rel not in files:
                raise NotFoundError(f"shard {rel} is missing")
            path = files[rel]
            data_start, header = _check_header(rel, path)
            try:
                with safe_open(str(path), framework="pt") as f:
                    self.metadata.update(f.metadata() or {})
                    for k in f.keys():
                        sl = f.get_slice(k)
                        if k in self._where:
                            raise InvalidArtifactError(f"tensor {k} appears in both {self._where[k]} and {rel}")
                        self._where[k] = rel
                        self._specs[k] = TensorSpec(k, tuple(sl.get_shape()), torch_dtype(sl.get_dtype()))
                        begin, end = header[k]["data_offsets"]
                        self._span[k] = (data_start + begin, end - begin)
            except InvalidArtifactError:
                raise
            except Exception as e:  # safetensors raises its own error types
                raise InvalidArtifactError(f"{rel}: unreadable safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def spec(self, name: str) -> TensorSpec:
        return self._specs[name]

    def shard_of(self, name: str) -> str:
        return self._where[name]

    def get(self, name: str) -> torch.Tensor:
        """``name`` in a new tensor of its own (read with ``pread``; no memory map stays behind)."""
        import torch

        return self._read(name, torch.empty(max(self._span[name][1], 1), dtype=torch.uint8))

    def iter_tensors(self, names: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for n in names if names is not None else self.keys():
            yield n, self.get(n)

    def span(self, name: str) -> FileSpan:
        """Where the raw little-endian bytes of ``name`` lie: its shard, offset and length."""
        offset, nbytes = self._span[name]
        return FileSpan(self.files[self._where[name]], offset, nbytes, self._where[name])

    def read_into(self, name: str, ws: Workspace, role: str = "in") -> torch.Tensor:
        """Read ``name`` into the workspace buffer ``role`` (no memory map, no new allocation).

        The result is a view of that buffer: it is overwritten by the next read
        into the same role. ``get`` allocates a new tensor for every call.
        """
        return self._read(name, ws.raw(role, self._span[name][1]))

    def _read(self, name: str, buf: torch.Tensor) -> torch.Tensor:
        spec = self._specs[name]
        offset, nbytes = self._span[name]
        span = FileSpan(self.files[self._where[name]], offset, nbytes, self._where[name])
        buf = buf[:nbytes]
        try:
            fd = os.open(span.path, os.O_RDONLY)
            try:
                _pread_exact(fd, memoryview(buf.numpy()), span.offset)
            finally:
                os.close(fd)
        except OSError as e:
            raise InvalidArtifactError(f"{span.rel}: cannot read tensor {name} ({e.strerror or e})") from None
        except EOFError:
            raise InvalidArtifactError(f"{span.rel}: truncated while reading tensor {name}") from None
        return buf.view(spec.dtype).view(spec.shape) if spec.shape else buf.view(spec.dtype).reshape(())


@dataclass(frozen=True)
class FileSpan:
    """The bytes of one tensor inside a safetensors file."""

    path: Path
    offset: int
    nbytes: int
    rel: str


class Workspace:
    """Reusable buffers, one per role, each grown to the largest request.

    A merge allocates the same few temporaries for every tensor (the input,
    its float32 copy, the delta, the cast output). Above glibc's mmap
    threshold each fresh allocation is a new mapping whose pages fault in
    again; reusing them took the merge's system time from seconds to almost
    nothing and kept peak RSS at a few tensors.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = device
        self._bufs: dict[str, torch.Tensor] = {}

    def raw(self, role: str, nbytes: int) -> torch.Tensor:
        import torch

        buf = self._bufs.get(role)
        if buf is None or buf.numel() < nbytes:
            self._bufs.pop(role, None)
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
            self._bufs[role] = buf
        return buf[:nbytes]

    def release(self, *roles: str) -> None:
        """Free the buffers of ``roles``; a later request for one allocates it again."""
        for role in roles:
            self._bufs.pop(role, None)

    def holds(self, role: str, t: torch.Tensor) -> bool:
        """True if ``t`` starts at the buffer ``role`` (a view this workspace may overwrite)."""
        buf = self._bufs.get(role)
        return buf is not None and t.data_ptr() == buf.data_ptr()

    def tensor(self, role: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised ``dtype`` tensor of ``shape`` backed by the buffer ``role``."""
        n = math.prod(shape) * dtype_size(dtype)
        return self.raw(role, n).view(dtype).view(tuple(shape))


def _pread_exact(fd: int, mv: memoryview, offset: int) -> None:
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n == 0:
            raise EOFError
        done += n


def _check_header(rel: str, path: Path) -> tuple[int, dict[str, Any]]:
    """Catch truncation early with a message naming the file; return (data start, header)."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InvalidArtifactError(f"{rel}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise InvalidArtifactError(f"{rel}: header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidArtifactError(f"{rel}: corrupt safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise InvalidArtifactError(f"{rel}: truncated: tensors need {8 + n + end} bytes, the file has {size}")
    return 8 + n, header


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
            n = os.preadv(src, [self._views[self._cur][self._fill : self._fill + want]], offset + done)
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
            raise _storage(e, path) from e
        self._shard = si

    def _join_syncer(self) -> None:
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None
        if self._sync_error is not None:
            e, self._sync_error = self._sync_error, None
            raise _storage(e, self.out_dir / self.shard_names[self._shard])

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
                os.fdatasync(fd)  # type: ignore[arg-type]
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
                    raise _storage(e, f.path) from e
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
            raise _storage(e, self.out_dir / self.shard_names[si]) from e
        self._done(t.numel())

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
            raise _storage(e, self.out_dir / self.shard_names[si]) from e
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
            write_text(self.out_dir / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
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
            with safe_open(str(self.out_dir / name), framework="pt") as f:
                got = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            want = {s.name: (s.shape, st_dtype(s.dtype)) for s in shard}
            if got != want:
                raise StorageError(f"{name}: written shard does not match its plan")


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}
COPY_CHUNK = 64 * 1024**2


def _copy_range(src: int, dst: int, offset: int, nbytes: int, rel: str, name: str, sha256: Any = None) -> None:
    """Append ``nbytes`` of ``src`` from ``offset`` at ``dst``'s file position (hashing them into ``sha256``)."""
    done = 0
    kernel = sha256 is None  # bytes to hash have to pass through this process
    while done < nbytes:
        want = min(COPY_CHUNK, nbytes - done)
        if kernel:
            try:
                n = os.copy_file_range(src, dst, want, offset + done)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                kernel = False
                continue
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


def _storage(e: OSError, path: Path) -> StorageError:
    from adapterhub.registry.blobs import storage_error

    return storage_error(e, str(path))


def write_text(path: Path, text: str) -> None:
    """Write a small file via temp + fsync + rename."""
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.incomplete")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise _storage(e, path) from e
    finally:
        tmp.unlink(missing_ok=True)


def copy_file(src: Path, dst: Path) -> None:
    """Copy a side file (config, tokenizer) into the staged output."""
    from adapterhub.registry.blobs import write_atomic

    dst.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dst, src, mode=0o644)


@contextmanager
def staged_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``out``; rename it to ``out`` on success.

    On any exception (Ctrl-C included) the temp dir is removed and ``out`` is
    untouched. With ``force`` an existing ``out`` is replaced only once the
    new output is complete.
    """
    out = Path(out)
    if out.exists() and not force:
        raise ConflictError(f"{out} already exists", hint="pass --force to replace it")
    from adapterhub.fsutil import remove_stale_staging, staging_path

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)  # left by a killed run
        tmp = staging_path(out)
        tmp.mkdir()
    except OSError as e:
        raise _storage(e, out) from e
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.{secrets.token_hex(6)}.old"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        from adapterhub.registry.blobs import fsync_dir

        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
