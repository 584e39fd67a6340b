"""Tensor bytes in GGML types: F32, F16, BF16, Q8_0 fast; Q4_0, Q4_1, Q5_0, Q5_1 through the ``gguf`` package.

The ``gguf`` package's numpy quantizers are the reference. F16, BF16 and
Q8_0 are also done here in torch, a slab of rows at a time: the same IEEE
float32 operations in the same order (Q8_0: d = max|x|/127, q = round half
away from zero of x·(1/d), d stored as f16), so the bytes are identical, and
tests/test_gguf_quant.py checks that against ``gguf.quants.quantize``.
Why: the numpy Q8_0 took 70 s for a 0.94B model here (about 50 MB/s of
float32 on this machine), against a few seconds of I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType

# Rows per slab: about 4 MiB of float32 temporaries, so they stay in cache.
_SLAB_ELEMENTS = 1 << 20


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
        return _q8_0(t)
    from gguf.quants import quantize

    return quantize(t.to(torch.float32).contiguous().numpy(), qtype)


def _q8_0(t: torch.Tensor) -> np.ndarray:
    import numpy as np
    import torch

    cols = t.shape[-1]
    rows = t.numel() // cols
    x = t.reshape(rows, cols)
    nb = cols // 32
    out = torch.empty((rows, nb, 34), dtype=torch.uint8)
    step = max(1, _SLAB_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        v = x[r0:r1].to(torch.float32, copy=True).reshape(r1 - r0, nb, 32)
        a = v.abs()
        d = a.amax(dim=2, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros((), dtype=torch.float32), 1 / d)
        v.mul_(inv)
        a.mul_(inv)  # |x|·inv == |x·inv|: the product's magnitude does not depend on the sign
        # round half away from zero, as gguf's np_roundf: sign(v) * (floor|v| + floor(2(|v| - floor|v|)))
        fl = a.floor()
        q = a.sub_(fl).mul_(2).floor_().add_(fl).copysign_(v)
        o = out[r0:r1]
        o[:, :, :2] = d.to(torch.float16).view(torch.uint8).reshape(r1 - r0, nb, 2)
        o[:, :, 2:] = q.to(torch.int8).view(torch.uint8)
    shape = (*t.shape[:-1], nb * 34)
    return out.numpy().reshape(shape).view(np.uint8)


def decode(data: Any, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 values of GGUF tensor bytes (through the ``gguf`` package's dequantizers)."""
    import numpy as np
    from gguf.quants import dequantize

    return np.asarray(dequantize(np.asarray(data), qtype), dtype=np.float32).reshape(shape)
