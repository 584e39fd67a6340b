"""The one read of tensor data in a check: the adapter's own tensors (small
next to the base), scanned once for non-finite values and all-zero LoRA B
matrices, through one reused buffer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from adapterhub.errors import InvalidArtifactError
from adapterhub.inspect.safetensors import SafetensorsHeader

# safetensors dtype -> (numpy dtype to view the bytes as, mask of the exponent bits or None for a float view)
_VIEWS: dict[str, tuple[str, int | None]] = {
    "F64": ("<f8", None),
    "F32": ("<f4", None),
    "F16": ("<f2", None),
    "BF16": ("<u2", 0x7F80),  # numpy has no bfloat16: all-ones exponent bits mean inf or NaN
    "F8_E5M2": ("u1", 0x7C),
    "F8_E4M3": ("u1", 0x7F),  # e4m3fn has no inf; S.1111.111 is NaN
    "F8_E8M0": ("u1", 0xFF),
}
_CHUNK = 1 << 22  # elements per bit-twiddling step (bounded temporaries)
_READ_BYTES = 16 << 20  # the read buffer: tensors larger than this are scanned in pieces


def _nonfinite(arr: Any, mask: int | None) -> int:
    import numpy as np

    if mask is None:
        # Fast path: a finite sum proves every element finite; only a non-finite sum needs the exact count.
        acc = np.float32 if arr.dtype == np.float16 else arr.dtype
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(arr.sum(dtype=acc)):
                return 0
        return int(arr.size - np.count_nonzero(np.isfinite(arr)))
    n = 0
    for i in range(0, arr.size, _CHUNK):
        part = arr[i : i + _CHUNK]
        n += int(np.count_nonzero((part & mask) == mask))
    return n


def _is_zero(arr: Any, mask: int | None) -> bool:
    if mask is None:
        return not bool(arr.any())
    sign_off = 0x7FFF if arr.dtype.itemsize == 2 else 0x7F
    return not any(bool((arr[i : i + _CHUNK] & sign_off).any()) for i in range(0, arr.size, _CHUNK))


@dataclass
class Scan:
    nonfinite: dict[str, int] = field(default_factory=dict)  # tensor -> count
    zero: set[str] = field(default_factory=set)  # of the tensors asked about
    tensors: int = 0
    bytes: int = 0


def scan(header: SafetensorsHeader, zero_candidates: set[str]) -> Scan:
    """Read every float tensor of the adapter once, in file order, through one reused buffer.

    A buffer rather than a memory map keeps the resident set at one chunk
    (a 150 MB adapter would otherwise stay mapped in full) at the same speed.
    """
    import numpy as np

    out = Scan()
    todo = sorted(
        ((k, t) for k, t in header.tensors.items() if t.dtype in _VIEWS and t.numel), key=lambda kt: kt[1].start
    )
    if not todo:
        return out
    buf = bytearray(min(_READ_BYTES, max(t.end - t.start for _, t in todo)))
    with open(header.path, "rb", buffering=0) as f:
        for key, t in todo:
            dtype, mask = np.dtype(_VIEWS[t.dtype][0]), _VIEWS[t.dtype][1]
            step = len(buf) - len(buf) % dtype.itemsize
            bad, zero = 0, key in zero_candidates
            f.seek(t.start)
            pos = t.start
            while pos < t.end:
                n = min(step, t.end - pos)
                view = memoryview(buf)[:n]
                got = 0
                while got < n:
                    r = f.readinto(view[got:])
                    if not r:
                        raise InvalidArtifactError(f"{header.name}: unexpected end of file in tensor {key!r}")
                    got += r
                arr = np.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize)
                bad += _nonfinite(arr, mask)
                if zero and not _is_zero(arr, mask):
                    zero = False
                del arr, view
                pos += n
            out.tensors += 1
            out.bytes += t.end - t.start
            if bad:
                out.nonfinite[key] = bad
            if zero:
                out.zero.add(key)
    return out


_ZERO_INIT = re.compile(r"^(.+)\.(?:lora_B|lora_embedding_A)(?:\.[^.]+){0,2}$")


def zero_candidates(header: SafetensorsHeader | None, method: str | None) -> dict[str, str]:
    """LoRA-family tensors that PEFT initialises to zero (B, or A for embeddings): key -> module."""
    if header is None or method not in ("LORA", "DORA", "ADALORA"):
        return {}
    out = {}
    for k in header.tensors:
        # lora_B.weight (LoRA), lora_B (AdaLoRA), lora_embedding_A; raw state dicts keep the adapter name.
        m = _ZERO_INIT.match(k)
        if m and not k.endswith(".bias"):
            out[k] = m.group(1).removeprefix("base_model.model.")
    return out
