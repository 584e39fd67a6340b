"""Where verification runs and how much it may hold: device choice, free
memory, batch sizes and the whole-model / one-at-a-time / layer-streamed
decision.

>>> pick_device("cpu")                                               # doctest: +SKIP
'cpu'
>>> plan_device("cuda", False, 6 << 30, 6 << 30, [], "auto")       # doctest: +SKIP
('cuda', True)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapterhub.errors import UsageError

GIB = 1 << 30
# Share of free memory the models may take: the rest is for activations, the
# CUDA context or, on the CPU, the page cache and everything else running.
BUDGET = 0.85

@dataclass(frozen=True)
class Fit:
    """Bytes the models need: whole (reference: base + adapter; candidate) and
    per decoder layer (0 when the candidate cannot be streamed)."""

    ref_bytes: int
    cand_bytes: int
    layer_bytes: int = 0

    @property
    def streamable(self) -> bool:
        return self.layer_bytes > 0


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available", hint="use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r} (auto, cuda or cpu)")
    return device


def weights_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.suffix in (".safetensors", ".bin", ".gguf") and p.is_file())


def _free_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    from adapterhub.platform import available_memory

    free = available_memory()  # psutil, else /proc/meminfo, else sysconf
    return 8 << 30 if free is None else free


def plan_device(device: str, sequential: bool, ref_bytes: int, cand_bytes: int, warnings: list[str], requested: str) -> tuple[str, bool]:
    """Fit the whole models into GPU memory: both at once, one at a time, or fall back to the CPU."""
    if device != "cuda":
        return device, sequential
    free = _free_bytes("cuda")
    budget = BUDGET * free  # leave room for activations and the CUDA context
    if not sequential and ref_bytes + cand_bytes > budget and max(ref_bytes, cand_bytes) <= budget:
        warnings.append(
            f"reference and candidate ({(ref_bytes + cand_bytes) / GIB:.1f} GiB) do not fit in "
            f"{free / GIB:.1f} GiB of free GPU memory together: loading one at a time (--sequential)"
        )
        return device, True
    if max(ref_bytes, cand_bytes) > budget:
        msg = f"the models need {max(ref_bytes, cand_bytes) / GIB:.1f} GiB each but the GPU has {free / GIB:.1f} GiB free"
        if requested == "auto":
            warnings.append(msg + ": running on the CPU instead")
            return "cpu", sequential
        raise UsageError(msg, hint="use --device cpu, or free GPU memory")
    return device, sequential


def needs_streaming(device: str, sequential: bool, fit: Fit, warnings: list[str]) -> bool:
    """Whether the whole models cannot be held on ``device`` while one decoder
    layer of each can: then verification runs layer by layer (``--streamed``)."""
    if not fit.streamable:
        return False
    free = _free_bytes(device)
    budget = BUDGET * free
    need = max(fit.ref_bytes, fit.cand_bytes) if (sequential or device == "cuda") else fit.ref_bytes + fit.cand_bytes
    if need <= budget or 2 * fit.layer_bytes > budget:
        return False
    warnings.append(
        f"the models ({need / GIB:.1f} GiB) do not fit in {free / GIB:.1f} GiB of free "
        f"{'GPU' if device == 'cuda' else 'memory'}: verifying one decoder layer at a time (--streamed)"
    )
    return True


def batch_size_for(device: str, seq_len: int, width: int, hidden: int, n_hidden: int, n: int) -> int:
    """Sequences per batch from free memory: logits/hidden kept in fp32, with headroom for activations."""
    per_seq = seq_len * (width * 4 * 4 + hidden * 4 * (n_hidden + 1) * 2 + hidden * 64)
    return max(1, min(n, 64, int(0.3 * _free_bytes(device) // max(per_seq, 1))))


def peak_rss_mb() -> float:
    from adapterhub.platform import peak_rss_bytes

    return peak_rss_bytes() / 1024**2  # ru_maxrss: KiB on Linux, bytes on macOS


def free_memory() -> None:
    """Give freed model memory back (and the CUDA cache, where there is one)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
