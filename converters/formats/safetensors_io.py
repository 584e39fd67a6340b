"""Streaming safetensors reading with memory bounded by one tensor.

``TensorSource`` parses each shard's header once (with ``safe_open``) and then
reads a tensor's bytes with ``pread`` straight into a tensor it owns
(``get``) or into a reused ``Workspace`` buffer (``read_into``). Keeping a
memory map open per shard would keep every page touched so far resident (on a
1 GiB shard RSS grew by 1 GiB); reopening the shard per tensor re-parses its
header every time, which on an adapter with hundreds of tensors cost close to
a second of a merge. A tensor that passes through unchanged is handed on as
the ``FileSpan`` of its bytes, for a file-to-file copy.

Writing shards is ``formats.shards``; staging an output directory is
``converters.output``.

>>> src = TensorSource(files)                                    # doctest: +SKIP
>>> specs = [src.spec(k) for k in src.keys()]
>>> w = src.get(specs[0].name)
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError, NotFoundError
from adapterhub.manifest import check_relpath
from adapterhub.platform import pread_into

if TYPE_CHECKING:
    import torch

FileMap = Mapping[str, Path]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

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
    from adapterhub import jsonio

    return jsonio.read_json(files[rel], what=rel, max_bytes=256 << 20, expect=None)  # size- and depth-capped


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
        self._specs: dict[str, TensorSpec] = {}  # made on first use: a torch dtype imports torch
        self._header: dict[str, tuple[tuple[int, ...], str]] = {}  # tensor name -> (shape, safetensors dtype)
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
                with safe_open(str(path), framework="numpy") as f:  # headers only: no torch
                    self.metadata.update(f.metadata() or {})
                    for k in f.keys():
                        sl = f.get_slice(k)
                        if k in self._where:
                            raise InvalidArtifactError(f"tensor {k} appears in both {self._where[k]} and {rel}")
                        self._where[k] = rel
                        if sl.get_dtype() not in _ST_TO_TORCH:
                            raise InvalidArtifactError(f"unsupported safetensors dtype {sl.get_dtype()}")
                        self._header[k] = (tuple(sl.get_shape()), sl.get_dtype())
                        begin, end = header[k]["data_offsets"]
                        self._span[k] = (data_start + begin, end - begin)
            except InvalidArtifactError:
                raise
            except Exception as e:  # safetensors raises its own error types
                raise InvalidArtifactError(f"{rel}: unreadable safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self._header)

    def __contains__(self, name: object) -> bool:
        return name in self._header

    def spec(self, name: str) -> TensorSpec:
        spec = self._specs.get(name)
        if spec is None:
            shape, st = self._header[name]
            spec = self._specs[name] = TensorSpec(name, shape, torch_dtype(st))
        return spec

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype name such as ``BF16``) of ``name``, without importing torch."""
        return self._header[name]

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
        spec = self.spec(name)
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
        n = pread_into(fd, mv[done:], offset + done)
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
        from adapterhub import jsonio

        try:  # size- and depth-capped, as inspection reads it
            header = jsonio.loads(fh.read(n), what=rel, max_bytes=100_000_000, max_depth=8)
        except InvalidArtifactError as e:
            raise InvalidArtifactError(f"{rel}: corrupt safetensors header ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise InvalidArtifactError(f"{rel}: truncated: tensors need {8 + n + end} bytes, the file has {size}")
    return 8 + n, header


# Names that moved to ``formats.shards`` and ``converters.output`` when writing
# was split from reading; still importable from here. Resolved on first use, so
# that this module does not import its own importers at load time.
_MOVED = {
    "DEFAULT_SHARD_BYTES": "adapterhub.converters.formats.shards",
    "STAGE_BYTES": "adapterhub.converters.formats.shards",
    "StreamingShardWriter": "adapterhub.converters.formats.shards",
    "plan_shards": "adapterhub.converters.formats.shards",
    "copy_file": "adapterhub.converters.output",
    "staged_dir": "adapterhub.converters.output",
    "write_text": "adapterhub.converters.output",
}


def __getattr__(name: str) -> Any:
    where = _MOVED.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(where), name)


def map_bytes(fd: int, offset: int, nbytes: int, rel: str, what: str) -> tuple[Any, torch.Tensor]:
    """Bytes ``offset:offset + nbytes`` of the open file ``fd``: (map, uint8 tensor over them), no copy.

    A read-only, shared memory map, populated where Linux can: its pages are
    the page cache's own, where ``pread`` copied every byte (populating a
    writable private map would copy every page). The file's size is checked
    first, because a mapped read past the end is SIGBUS, not an error: a short
    file is ``InvalidArtifactError("REL: truncated while reading WHAT")``.
    Other ``OSError``s are the caller's. Keep the map while the tensor is used.
    """
    import warnings

    import torch

    mm, at = _map(fd, offset, nbytes, rel, what)
    with warnings.catch_warnings():  # torch warns that the map is read-only: it is only read
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return mm, torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=at)


def map_array(fd: int, offset: int, nbytes: int, rel: str, what: str) -> tuple[Any, Any]:
    """``map_bytes`` as a read-only numpy uint8 array, for readers that do without torch."""
    import numpy as np

    mm, at = _map(fd, offset, nbytes, rel, what)
    return mm, np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=at)


def _map(fd: int, offset: int, nbytes: int, rel: str, what: str) -> tuple[Any, int]:
    """(the map of ``map_bytes``, where ``offset`` lies in it)."""
    import mmap

    if os.fstat(fd).st_size < offset + nbytes:
        raise InvalidArtifactError(f"{rel}: truncated while reading {what}")
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, offset + nbytes - start, flags=flags, prot=mmap.PROT_READ, offset=start), offset - start
