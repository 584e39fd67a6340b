"""Tensor bytes in GGML types: F32, F16, BF16, Q8_0 fast; Q4_0, Q4_1, Q5_0, Q5_1 through the ``gguf`` package.

The ``gguf`` package's numpy quantizers are the reference. F16, BF16 and
Q8_0 are also done here in torch, a slab of rows at a time, straight into
the caller's output buffer (``encode_into``): the same IEEE float32
operations as the reference, so the bytes are identical, and
tests/test_gguf_quant.py checks that against ``gguf.quants.quantize``.

Q8_0, per block of 32: d = max|x|/127, q = round half away from zero of
x·(1/d), d stored as f16. The rounding is ``trunc(y + C·sign(y))`` with
C the largest float32 below 0.5: for |y| < 2^22 that equals gguf's
``sign(y)·(floor|y| + floor(2(|y| - floor|y|)))`` bit for bit (adding C
rounds up to the next integer exactly when the fraction is at least one
half; adding 0.5 itself would wrongly round 0.49999997 up), in two
elementwise passes and the cast, where the reference takes eight.
Why: the numpy Q8_0 took 70 s for a 0.94B model here (about 50 MB/s of
float32 on this machine), against a few seconds of I/O.

Where the C kernel is built (converters/_c/ggml_kernels.c, loaded through
``native.load("ggml")``), F32, F16, BF16 and Q8_0 are encoded by it instead,
the same bits again (tests/test_gguf_native.py): ``Rows`` describes a
tensor's rows for it (a numpy array or a CPU torch tensor, any strided view
whose rows are contiguous), ``encode_rows_into`` encodes a range of them.
It reads bf16 straight from the checkpoint's memory map, so the export of a
checkpoint needs no torch at all. Without it (not built, or
``ADAPTERHUB_NO_NATIVE=1``), the torch code below runs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType

# Elements per Q8_0 slab: about 1 MiB of float32 temporaries, so they stay in cache.
_SLAB_ELEMENTS = 1 << 18

# The largest float32 below one half (0x3EFFFFFF).
_HALF_BELOW = 0.49999997019767761


def encode(t: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """``t`` (any float dtype, on the CPU) as the bytes of ``qtype``, ready to write.

    F32 and F16 come back as float arrays of ``t``'s shape, every other type
    as a uint8 array of GGUF's byte shape.
    """
    import numpy as np
    from gguf import GGMLQuantizationType as T

    rows = Rows.of(t) if int(qtype) in KERNEL_TYPES else None
    if rows is not None:
        if qtype in (T.F32, T.F16):
            out = np.empty(t.shape, dtype=np.float32 if qtype == T.F32 else np.float16)
        else:
            out = np.empty((*t.shape[:-1], encoded_nbytes(t.shape[-1], qtype)), dtype=np.uint8)
        encode_rows_into(rows, 0, rows.rows, qtype, out.reshape(-1).view(np.uint8))
        return out
    import torch

    if qtype == T.F32:
        return t.to(torch.float32).contiguous().numpy()
    if qtype == T.F16:
        return t.to(torch.float16).contiguous().numpy()
    if qtype == T.BF16:
        b = t.to(torch.bfloat16).contiguous()
        return b.view(torch.int16).numpy().view(np.uint8)
    if qtype == T.Q8_0:
        cols = t.shape[-1]
        out = torch.empty(t.numel() // 32 * 34, dtype=torch.uint8)
        encode_into(t, qtype, out)
        return out.numpy().reshape(*t.shape[:-1], cols // 32 * 34)
    from gguf.quants import quantize

    return quantize(t.to(torch.float32).contiguous().numpy(), qtype)


def encoded_nbytes(numel: int, qtype: GGMLQuantizationType) -> int:
    """Bytes of ``numel`` values (whole blocks) in ``qtype``."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return numel // block * size


# --------------------------------------------------------------------------- the C kernel

#: GGML type numbers the kernel writes (F32, F16, Q8_0, BF16) and reads (F32, F16, BF16).
KERNEL_TYPES = (0, 1, 8, 30)
_SOURCE_TYPES = {"float32": 0, "float16": 1, "bfloat16": 30, "uint16": 30}
_configured: set[int] = set()


def kernel() -> Any:
    """The ggml kernel library (ctypes), or None where it is not built or ``ADAPTERHUB_NO_NATIVE`` is set."""
    from adapterhub.converters.formats import native

    lib = native.load("ggml")
    if lib is not None and id(lib) not in _configured:
        import ctypes

        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.ah_ggml_encode_rows.argtypes = [ptr, ctypes.c_int, ptr, i64, i64, i64, ptr, ctypes.c_int]
        lib.ah_ggml_encode_rows.restype = ctypes.c_int
        lib.ah_ggml_simd.argtypes = [ctypes.c_int]
        lib.ah_ggml_simd.restype = ctypes.c_int
        _configured.add(id(lib))
    return lib


def address(a: Any) -> int:
    """Where the first element of a numpy array or torch tensor lies in memory."""
    return a.data_ptr() if hasattr(a, "data_ptr") else a.__array_interface__["data"][0]


@dataclass(frozen=True)
class Rows:
    """A tensor's rows as the kernel reads them: row r (in C order over the leading
    dimensions) starts ``offsets[r]`` bytes after ``ptr`` (``r * stride`` without
    offsets) and holds ``cols`` contiguous values of GGML type ``st``."""

    ptr: int
    st: int
    rows: int
    cols: int
    stride: int
    offsets: Any  # int64 numpy array of byte offsets, or None
    owner: Any  # the array the rows belong to, kept alive
    lib: Any  # the kernel library

    @classmethod
    def of(cls, src: Any) -> Rows | None:
        """``src`` (a numpy array, uint16 meaning bf16 bits, or a CPU torch tensor) as rows, if the kernel can read it."""
        lib = kernel()
        if lib is None:
            return None
        import numpy as np

        if isinstance(src, np.ndarray):
            name, itemsize, strides = src.dtype.name, src.itemsize, src.strides
            if src.dtype.byteorder == ">":
                return None
        else:
            if not hasattr(src, "data_ptr") or name_of(src) == "uint16" or src.device.type != "cpu":
                return None
            name, itemsize = name_of(src), src.element_size()
            strides = tuple(s * itemsize for s in src.stride())
        st = _SOURCE_TYPES.get(name)
        shape = tuple(src.shape)
        if st is None or not shape or (shape[-1] > 1 and strides[-1] != itemsize and 0 not in shape):
            return None
        cols, lead = shape[-1], shape[:-1]
        rows = int(np.prod(lead)) if lead else 1
        offsets, stride = None, strides[0] if len(lead) == 1 else 0
        if len(lead) > 1:
            offsets = np.zeros((), dtype=np.int64)
            for n, s in zip(lead, strides[:-1]):
                offsets = offsets[..., None] + np.arange(n, dtype=np.int64) * s
            offsets = np.ascontiguousarray(offsets.reshape(-1))
        return cls(address(src), st, rows, cols, stride, offsets, src, lib)


def name_of(t: Any) -> str:
    """A torch dtype's name (``bfloat16``), as numpy names its own."""
    return str(t.dtype).removeprefix("torch.")


def encode_rows_into(rows: Rows, r0: int, r1: int, qtype: GGMLQuantizationType, dst: Any) -> None:
    """Rows ``r0:r1`` of ``rows`` in ``qtype`` into ``dst`` (a contiguous uint8 numpy array of exactly their bytes)."""
    n = encoded_nbytes((r1 - r0) * rows.cols, qtype)
    if dst.nbytes != n or (n and not dst.flags.c_contiguous):
        raise ValueError(f"internal: {dst.nbytes} bytes of room for {n}")
    if r1 <= r0:
        return
    if rows.offsets is not None:
        ptr, offs, stride = rows.ptr, rows.offsets.ctypes.data + 8 * r0, 0
    else:
        ptr, offs, stride = rows.ptr + r0 * rows.stride, None, rows.stride
    rc = rows.lib.ah_ggml_encode_rows(ptr, rows.st, offs, stride, r1 - r0, rows.cols, address(dst), int(qtype))
    if rc:
        raise ValueError(f"internal: the ggml kernel refused {qtype.name} of {rows.cols} columns (code {rc})")


# --------------------------------------------------------------------------- torch


def encode_into(src: torch.Tensor, qtype: GGMLQuantizationType, dst: torch.Tensor, scratch: Any = None) -> None:
    """Write the bytes of ``src`` in ``qtype`` into ``dst`` (a contiguous uint8 tensor of exactly that size).

    ``src`` may be any strided view (a q/k row permutation, say): its rows in
    C order are the output's rows, its last dimension a row. Nothing the size
    of ``src`` is allocated for F32, F16, BF16 and Q8_0; ``scratch`` (a
    ``Scratch``; by default the calling thread's) lends Q8_0 its float32
    temporaries.
    """
    import torch
    from gguf import GGMLQuantizationType as T

    casts = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
    if qtype in casts:
        dst.view(casts[qtype]).view(src.shape).copy_(src)
    elif qtype == T.Q8_0:
        _q8_0_into(src, dst, scratch if scratch is not None else Scratch.of_this_thread())
    else:
        from gguf.quants import quantize

        x = src.to(torch.float32).contiguous().reshape(-1, src.shape[-1]).numpy()
        dst.numpy()[:] = quantize(x, qtype).reshape(-1)


class Scratch:
    """Two float32 buffers reused from slab to slab (fresh large allocations fault their pages in again)."""

    _local = threading.local()

    @classmethod
    def of_this_thread(cls) -> Scratch:
        s = getattr(cls._local, "scratch", None)
        if s is None:
            s = cls._local.scratch = cls()
        return s

    def __init__(self) -> None:
        self._bufs: list[Any] = [None, None]

    def get(self, i: int, n: int) -> torch.Tensor:
        import torch

        b = self._bufs[i]
        if b is None or b.numel() < n:
            b = self._bufs[i] = torch.empty(n, dtype=torch.float32)
        return b[:n]


def _q8_0_into(src: torch.Tensor, dst: torch.Tensor, scratch: Scratch) -> None:
    import torch

    cols = src.shape[-1]
    nb = cols // 32
    rows = src.numel() // cols
    out = dst.view(rows, nb, 34)
    if src.dim() > 2:  # a permuted view: slabs of whole leading entries keep it a view
        lead = src.shape[0]
        per = rows // lead
        step = max(1, _SLAB_ELEMENTS // max(per * cols, 1))
        for i0 in range(0, lead, step):
            i1 = min(lead, i0 + step)
            _q8_0_slab(src[i0:i1], out[i0 * per : i1 * per], scratch)
        return
    x = src.reshape(rows, cols)
    step = max(1, _SLAB_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        _q8_0_slab(x[r0:r1], out[r0:r1], scratch)


def _q8_0_slab(src: torch.Tensor, out: torch.Tensor, scratch: Scratch) -> None:
    """Q8_0 of the rows of ``src`` into ``out`` ([rows, blocks, 34] uint8).

    Seven passes over the slab (cast, abs, max, scale, sign, add, cast),
    each a plain vectorised torch loop; ``1 / d`` is ``d.reciprocal()``, as
    torch computes it, and a block's scale is written straight to its two
    bytes as float16.
    """
    import torch

    m = out.shape[0] * out.shape[1]
    v = scratch.get(0, m * 32)
    v.view(src.shape).copy_(src)  # to float32 (and into row order)
    v = v.view(m, 32)
    s = scratch.get(1, m * 32).view(m, 32)
    d = torch.abs(v, out=s).amax(dim=1, keepdim=True).div_(127)  # max|x| of each block, / 127
    inv = d.reciprocal().masked_fill_(d == 0, 0)
    v.mul_(inv)
    v.add_(torch.sign(v, out=s), alpha=_HALF_BELOW)  # the cast to int8 truncates: round half away from zero
    o = out.reshape(m, 34)
    o.view(torch.int16)[:, 0].view(torch.float16).copy_(d.view(m))
    o[:, 2:].view(torch.int8).copy_(v)


def decode(data: Any, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 values of GGUF tensor bytes (through the ``gguf`` package's dequantizers)."""
    import numpy as np
    from gguf.quants import dequantize

    return np.asarray(dequantize(np.asarray(data), qtype), dtype=np.float32).reshape(shape)
