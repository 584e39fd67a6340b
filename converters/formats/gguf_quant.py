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
"""

from __future__ import annotations

import threading
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
    import torch
    from gguf import GGMLQuantizationType as T

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
