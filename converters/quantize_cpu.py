"""``quantize`` on the CPU without torch: the C kernel between the page cache and the shard writer.

``import torch`` alone costs 1.0-1.8 s of CPU on the 2-core VM, about as long
as the rest of quantizing a 0.94B model once the C kernel
(converters/_c/bnb_kernels.c) does the arithmetic. So where that kernel is
built and the work is on the CPU, :func:`adapterhub.converters.quantize.quantize`
plans from the safetensors headers by dtype name (:class:`RawSpec`), a reader
thread maps the next weight from the page cache while this one is quantized
on every core (``formats.bnb_native``), and the output bytes go to the shard
writer as they are. The files are the torch path's, byte for byte
(tests/test_bnb_native.py compares whole outputs of both).

Double quantization (its nested 8-bit step and the offsets' pre-pass are
torch code) and models with Conv1D (transposed) weights take the torch path.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from adapterhub.errors import InvalidArtifactError
from adapterhub.platform import pread_into

from adapterhub.converters.formats.bnb_layout import CONV1D_MODEL_TYPES, QuantSettings, quant_state_json, quantized_layout
from adapterhub.converters.formats.safetensors_io import TensorSource

# safetensors dtype -> torch's dtype name, and bytes per element
_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64",
}
_SIZES = {"float32": 4, "int8": 1, "uint8": 1}


@dataclass(frozen=True)
class RawSpec:
    """A planned tensor by dtype name: what ``StreamingShardWriter`` and ``Quantizer.wants`` read of a spec."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch's name: bfloat16, uint8, ...
    nbytes: int


def no_gpu() -> bool:
    """On Linux, no NVIDIA, ROCm or WSL GPU device node: CUDA cannot be available, so ``auto`` is the CPU."""
    nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")
    return sys.platform == "linux" and not any(os.path.exists(p) for p in nodes)


def usable(settings: QuantSettings, config: Mapping[str, Any], device: str) -> bool:
    """Whether this quantization runs here without torch."""
    if device != "cpu" or settings.double_quant or settings.mode not in ("nf4", "fp4", "int8"):
        return False
    if config.get("model_type") in CONV1D_MODEL_TYPES or sys.byteorder != "little":  # the files are little-endian
        return False
    from adapterhub.converters.formats import bnb_native

    return bnb_native.available() and (settings.mode == "int8" or settings.blocksize <= bnb_native.MAX_BLOCKSIZE)


def source_spec(src: TensorSource, name: str) -> RawSpec:
    shape, st = src.header(name)
    return RawSpec(name, tuple(shape), _NAMES[st], src.span(name).nbytes)


def output_specs(settings: QuantSettings, spec: RawSpec) -> list[RawSpec]:
    """The tensors that replace the weight ``spec``, as ``Quantizer.specs`` plans them."""
    layout = quantized_layout(spec.name.removesuffix(".weight"), spec.shape, spec.dtype, settings.mode,
                              blocksize=settings.blocksize)
    return [RawSpec(n, dims, dt, math.prod(dims) * _SIZES[dt]) for n, dims, dt in layout]


class _Buffer:
    """A reusable anonymous mapping, grown to the largest request, and its address for the kernel."""

    def __init__(self) -> None:
        self._map: mmap.mmap | None = None
        self._pin: Any = None
        self.addr = 0

    def view(self, nbytes: int) -> memoryview:
        if self._map is None or len(self._map) < nbytes:
            self._map = mmap.mmap(-1, max(nbytes, mmap.PAGESIZE))
            self._pin = ctypes.c_char.from_buffer(self._map)  # keeps the mapping (and the address) alive
            self.addr = ctypes.addressof(self._pin)
        return memoryview(self._map)[:nbytes]


def _read(src: TensorSource, name: str, buf: _Buffer) -> tuple[memoryview, int]:
    """``name``'s bytes read into ``buf``: (a view of them, their address)."""
    span = src.span(name)
    mv = buf.view(span.nbytes)
    try:
        fd = os.open(span.path, os.O_RDONLY)
        try:
            done = 0
            while done < span.nbytes:
                n = pread_into(fd, mv[done:], span.offset + done)
                if n == 0:
                    raise InvalidArtifactError(f"{span.rel}: truncated while reading tensor {name}")
                done += n
        finally:
            os.close(fd)
    except OSError as e:
        raise InvalidArtifactError(f"{span.rel}: cannot read tensor {name} ({e.strerror or e})") from None
    return mv, buf.addr


def _map(src: TensorSource, name: str, buf: _Buffer) -> tuple[Any, int]:
    """``name``'s bytes mapped from the page cache (read-only, populated): (a holder to keep, their address).

    ``pread`` copies every byte once more (0.3 s of system time per 1.75 GiB
    on the 2-core VM); the map shares the page cache's pages. The file's size
    is checked first: a mapped read past its end is SIGBUS, not an error. A
    file that cannot be mapped is read into ``buf``.
    """
    import numpy as np

    span = src.span(name)
    if not span.nbytes:
        return _read(src, name, buf)
    try:
        fd = os.open(span.path, os.O_RDONLY)
    except OSError as e:
        raise InvalidArtifactError(f"{span.rel}: cannot read tensor {name} ({e.strerror or e})") from None
    try:
        if os.fstat(fd).st_size < span.offset + span.nbytes:
            raise InvalidArtifactError(f"{span.rel}: truncated while reading tensor {name}")
        start = span.offset - span.offset % mmap.ALLOCATIONGRANULARITY
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(fd, span.offset + span.nbytes - start, flags=flags, prot=mmap.PROT_READ, offset=start)
    except OSError:
        return _read(src, name, buf)
    finally:
        os.close(fd)
    view = np.frombuffer(mm, dtype=np.uint8, count=span.nbytes, offset=span.offset - start)
    return view, int(view.ctypes.data)


def _code_bytes(mode: str) -> bytes:
    from adapterhub.converters.formats.bnb_cpu import FP4_CODE, NF4_CODE

    return struct.pack("<16f", *(NF4_CODE if mode == "nf4" else FP4_CODE))  # float32, as torch.tensor rounds


def _non_finite(module: str) -> InvalidArtifactError:
    return InvalidArtifactError(f"{module}.weight has non-finite values (NaN or inf); refusing to quantize it")


def quantize_weight(
    spec: RawSpec, data: int, settings: QuantSettings, outs: Sequence[_Buffer]
) -> list[bytes | memoryview]:
    """The bytes of each tensor ``output_specs(settings, spec)`` plans, from the weight at address ``data``."""
    from adapterhub.converters.formats import bnb_native

    module = spec.name.removesuffix(".weight")
    rows, cols = spec.shape
    n = rows * cols
    if settings.mode == "int8":
        cb, scb = outs[0].view(n), outs[1].view(4 * rows)
        if bnb_native.int8_rowwise(data, spec.dtype, rows, cols, outs[0].addr, outs[1].addr):
            outs[2].view(4 * -(-n // 64))
            if bnb_native.block_absmax(data, spec.dtype, n, 64, outs[2].addr):
                raise _non_finite(module)
            raise InvalidArtifactError(f"{module}.weight overflows float16, which int8 quantization goes through")
        return [cb, scb, b"\0"]  # weight_format 0: the row layout
    bs, mode = settings.blocksize, settings.mode
    packed, absmax = outs[0].view((n + 1) // 2), outs[1].view(4 * -(-n // bs))
    if bnb_native.quantize_4bit(data, spec.dtype, n, bs, mode, outs[0].addr, outs[1].addr):
        raise _non_finite(module)
    return [packed, absmax, _code_bytes(mode), quant_state_json(mode, (rows, cols), spec.dtype, blocksize=bs)]


def quantize_tensors(
    src: TensorSource,
    settings: QuantSettings,
    wanted: set[str],
    writer: Any,
    advance: Callable[[int], None],
    specs: Mapping[str, RawSpec],
    done: list[str],
) -> None:
    """Quantize the ``wanted`` tensors of ``src`` in order into ``writer``; copy the others file to file.

    A reader thread maps the next weight (``mmap`` drops the GIL while it
    populates) while this one is quantized.
    """
    keys = src.keys()
    reads = [k for k in keys if k in wanted]
    ins, outs = (_Buffer(), _Buffer()), (_Buffer(), _Buffer(), _Buffer())
    pending: dict[str, Future[tuple[memoryview, int]]] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="adapterhub-read") as reader:

        def prefetch(r: int) -> None:
            if r < len(reads):
                pending[reads[r]] = reader.submit(_map, src, reads[r], ins[r % 2])

        try:
            prefetch(0)
            r = 0
            for k in keys:
                spec = source_spec(src, k)
                if k in wanted:
                    held, addr = pending.pop(k).result()
                    r += 1
                    prefetch(r)  # a read falls back to the other buffer: tensor r - 1's is free again
                    for o, data in zip(output_specs(settings, spec), quantize_weight(spec, addr, settings, outs)):
                        writer.write_bytes(o.name, o.shape, o.dtype, data)
                    done.append(k.removesuffix(".weight"))
                    del held
                else:
                    writer.copy_span(k, specs[k], src.span(k))  # unchanged: file to file
                advance(spec.nbytes)
        finally:
            for f in pending.values():
                f.cancel()
