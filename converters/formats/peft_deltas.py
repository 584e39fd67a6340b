"""Per-method weight deltas, in float32, as PEFT computes them.

``apply_ops(tensor, ops, get, device)`` merges one base tensor: each
``ModuleOp`` kind (LoRA, DoRA, AdaLoRA, LoHa, LoKr, VeRA, IA3, replacements)
has one function here that names the PEFT code it mirrors and does the same
float32 operations in the same order, so that a float32 merge is
bit-identical to ``merge_and_unload()``. ``peft_blocked`` runs LoRA and IA3
block by block on the CPU with the same per-element operations.

>>> for t in mp.tensors:  # doctest: +SKIP
...     merged = apply_ops(base.get(t.source), t.ops, src.get, "cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError

from adapterhub.converters.formats.peft_plan import MergePlan, ModuleOp

if TYPE_CHECKING:
    import torch

    from adapterhub.converters.formats.safetensors_io import Workspace

TensorGetter = Callable[[str], "torch.Tensor"]


def apply_ops(
    weight: torch.Tensor,
    ops: Sequence[ModuleOp],
    get: TensorGetter,
    device: str | torch.device = "cpu",
    *,
    extra: Mapping[str, torch.Tensor] | None = None,
    ws: Workspace | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Merge ``ops`` into one base tensor; returns a float32 tensor on ``device``.

    ``get`` reads an adapter tensor by key. ``extra`` supplies tensors that are
    not in the adapter (VeRA's regenerated projections). With a workspace
    ``ws`` (on ``device``), LoRA ops run in place in reused buffers and the
    result is a view of its ``w`` buffer, valid until the next call; the
    float32 operations and their order are the same either way.

    ``check`` tests the result of every op for inf/NaN, to name the op that
    broke. A caller that tests the final output itself may pass False and
    call again with True to explain a failure.
    """
    import torch

    if ws is not None:
        # A float32 copy we own, in a reused buffer: in-place ops may write it.
        w = ws.tensor("w", weight.shape, torch.float32)
        w.copy_(weight)  # casts, and moves across devices
    else:
        w = weight.to(device=device, dtype=torch.float32)

    def t(key: str) -> torch.Tensor:
        if extra is not None and key in extra:
            return extra[key].to(device=device, dtype=torch.float32)
        return get(key).to(device=device, dtype=torch.float32)

    for op in ops:
        inplace = _APPLY_INPLACE.get(op.kind) if ws is not None and ws.holds("w", w) else None
        w = inplace(w, op, t, ws) if inplace is not None else _APPLY[op.kind](w, op, t)
        if check and not all_finite(w):
            raise InvalidArtifactError(
                f"{op.module}: merging gives non-finite values ({op.kind}); the adapter's {op.param} looks broken",
                hint="nothing was written; check the adapter's tensors for inf/NaN or huge values",
            )
    return w



def all_finite(x: torch.Tensor) -> bool:
    """True if no element of ``x`` is inf or NaN.

    A sum is finite only if every element is, so one reduction answers the
    common case; only a non-finite sum (a bad value, or finite values whose
    sum overflows) pays for the elementwise test. The sum runs in ``x``'s own
    dtype: upcasting bf16 first costs 40 times more.
    """
    import torch

    if not x.is_floating_point():
        return True
    if math.isfinite(float(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def _lora_delta_into(ws: Workspace, shape: Sequence[int], A: torch.Tensor, B: torch.Tensor, scale: float, transpose: bool) -> torch.Tensor:
    import torch

    prod = ws.tensor("delta", (B.shape[0], A.shape[1]), torch.float32)
    torch.matmul(B, A, out=prod)
    prod.mul_(scale)
    return prod.T if transpose else prod


def _inplace_lora(w: torch.Tensor, op: ModuleOp, t: Callable[[str], torch.Tensor], ws: Workspace) -> torch.Tensor:
    # Same float32 operations as _apply_lora: (B @ A) * scale, transposed, added.
    return w.add_(_lora_delta_into(ws, w.shape, t(op.tensors["A"]), t(op.tensors["B"]), op.scale, op.fan_in_fan_out))


def _inplace_lora_embedding(w: torch.Tensor, op: ModuleOp, t: Callable[[str], torch.Tensor], ws: Workspace) -> torch.Tensor:
    return w.add_(_lora_delta_into(ws, w.shape, t(op.tensors["A"]), t(op.tensors["B"]), op.scale, True))


def _inplace_ia3(w: torch.Tensor, op: ModuleOp, t: Callable[[str], torch.Tensor], ws: Workspace) -> torch.Tensor:
    return w.mul_(_T(t(op.tensors["l"]), op.fan_in_fan_out))


def _T(x: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    # peft.utils.other.transpose
    return x.T if fan_in_fan_out else x


def lora_delta(A: torch.Tensor, B: torch.Tensor, scale: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """lora.Linear.get_delta_weight: ``transpose(B @ A, fan_in_fan_out) * scaling``.

    Scaled in place (same float32 multiply, one buffer less at peak).
    """
    return _T(B @ A, fan_in_fan_out).mul_(scale)


def _apply_replace(w: torch.Tensor, op: ModuleOp, t: Callable[[str], torch.Tensor]) -> torch.Tensor:
    return t(op.tensors["value"])


def _apply_lora(w: torch.Tensor, op: ModuleOp, t: Callable[[str], torch.Tensor]) -> torch.Tensor:
    # lora.Linear.merge (safe_merge=False): weight.data += get_delta_weight()
    return w + lora_delta(t(op.tensors["A"]), t(op.tensors["B"]), op.scale, op.fan_in_fan_out)


def _apply_lora_embedding(w: torch.Tensor, op: ModuleOp, t: Callable[[str], torch.Tensor]) -> torch.Tensor:
    # lora.Embedding.get_delta_weight: transpose(B @ A, True) * scaling
    return w + lora_delta(t(op.tensors["A"]), t(op.tensors["B"]), op.scale, True)


def _apply_dora(w: torch.Tensor, op: ModuleOp, t: Callable[[str], torch.Tensor]) -> torch.Tensor:
    import torch

    # variants.DoraLinearVariant.merge_unsafe with DoraLinearLayer.get_weight_norm(scaling=1)
    fio = op.fan_in_fan_out
    delta = lora_delta(t(op.tensors["A"]), t(op.tensors["B"]), op.scale, fio)
    weight_norm = torch.linalg.norm(_T(w, fio) + 1 * _T(delta, fio), dim=1)
    dora_factor = _T((t(op.tensors["m"]) / weight_norm).view(-1, 1), fio)
    return dora_factor * (w + delta)


def _apply_dora_embedding(w: torch.Tensor, op: ModuleOp, t: Callable[[str], torch.Tensor]) -> torch.Tensor:
    import torch

    # variants.DoraEmbeddingVariant.merge_unsafe: the norm runs over the embedding
    # dimension's columns (DoraEmbeddingLayer has fan_in_fan_out=True).
    delta = lora_delta(t(op.tensors["A"]), t(op.tensors["B"]), op.scale, True)
    weight_norm = torch.linalg.norm(w.T + 1 * delta.T, dim=1)
    dora_factor = (t(op.tensors["m"]) / weight_norm).view(1, -1)
    return dora_factor * (w + delta)


def _apply_lora_bias(w: torch.Tensor, op: ModuleOp, t: Callable[[str], torch.Tensor]) -> torch.Tensor:
    # lora.Linear.merge: bias.data += lora_B.bias * scaling
    return w + t(op.tensors["b"]) * op.scale


def _apply_adalora(w: torch.Tensor, op: ModuleOp, t: Callable[[str], torch.Tensor]) -> torch.Tensor:
    import torch

    # adalora.SVDLinear.get_delta_weight
    A, B, E = t(op.tensors["A"]), t(op.tensors["B"]), t(op.tensors["E"])
    ranknum = torch.tensor([op.options["ranknum"]], dtype=torch.float32, device=w.device)
    return w + _T(B @ (A * E), op.fan_in_fan_out) * op.scale / (ranknum + 1e-5)


def _apply_loha(w: torch.Tensor, op: ModuleOp, t: Callable[[str], torch.Tensor]) -> torch.Tensor:
    import torch

    # loha.layer.HadaWeight.forward with scale=torch.tensor(scaling)
    T = op.tensors
    scale = torch.tensor(op.scale).to(w.device)
    delta = ((t(T["w1a"]) @ t(T["w1b"])) * (t(T["w2a"]) @ t(T["w2b"]))) * scale
    return w + delta.reshape(w.shape)


def _apply_lokr(w: torch.Tensor, op: ModuleOp, t: Callable[[str], torch.Tensor]) -> torch.Tensor:
    import torch

    # lokr.LoKrLayer.get_delta_weight + make_kron
    T = op.tensors
    w1 = t(T["w1"]) if "w1" in T else t(T["w1a"]) @ t(T["w1b"])
    w2 = t(T["w2"]) if "w2" in T else t(T["w2a"]) @ t(T["w2b"])
    delta = torch.kron(w1, w2.contiguous()) * op.scale
    return w + delta.reshape(w.shape)


def _apply_vera(w: torch.Tensor, op: ModuleOp, t: Callable[[str], torch.Tensor]) -> torch.Tensor:
    # vera.Linear.get_delta_weight
    out, in_ = op.options["out"], op.options["in"]
    A = t(op.tensors.get("vera_A", "__vera_A__"))[:, :in_]
    B = t(op.tensors.get("vera_B", "__vera_B__"))[:out, :]
    lambda_b = t(op.tensors["lambda_b"]).unsqueeze(-1)
    lambda_d = t(op.tensors["lambda_d"]).unsqueeze(-1)
    return w + _T((lambda_b * B) @ (lambda_d * A), op.fan_in_fan_out)


def _apply_ia3(w: torch.Tensor, op: ModuleOp, t: Callable[[str], torch.Tensor]) -> torch.Tensor:
    import torch

    # ia3.Linear.merge: torch.mul(weight, transpose(ia3_l, fan_in_fan_out))
    return torch.mul(w, _T(t(op.tensors["l"]), op.fan_in_fan_out))


def _apply_ia3_bias(w: torch.Tensor, op: ModuleOp, t: Callable[[str], torch.Tensor]) -> torch.Tensor:
    import torch

    # ia3.Linear.merge: bias * ia3_l.reshape(bias.shape), output-side modules only
    return torch.mul(w, t(op.tensors["l"]).reshape(w.shape))


_APPLY: dict[str, Callable[[Any, ModuleOp, Callable[[str], Any]], Any]] = {
    "replace": _apply_replace,
    "lora": _apply_lora,
    "lora_embedding": _apply_lora_embedding,
    "dora": _apply_dora,
    "dora_embedding": _apply_dora_embedding,
    "lora_bias": _apply_lora_bias,
    "adalora": _apply_adalora,
    "loha": _apply_loha,
    "lokr": _apply_lokr,
    "vera": _apply_vera,
    "ia3": _apply_ia3,
    "ia3_bias": _apply_ia3_bias,
}


_APPLY_INPLACE: dict[str, Callable[[Any, ModuleOp, Callable[[str], Any], Any], Any]] = {
    "lora": _inplace_lora,
    "lora_embedding": _inplace_lora_embedding,
    "ia3": _inplace_ia3,
}


def vera_projections(plan: MergePlan, r: int, prng_key: int) -> dict[str, torch.Tensor]:
    """Regenerate VeRA's shared projections for adapters saved with ``save_projection=False``.

    Mirrors ``VeraModel._find_dim`` (the largest out and in over the adapted
    modules) and ``_init_vera_A_vera_B`` (kaiming-uniform from a seeded
    generator, vera_A then vera_B).
    """
    import torch

    out = in_ = 0
    for t in plan.tensors:
        for op in t.ops:
            if op.kind == "vera":
                out, in_ = max(out, op.options["out"]), max(in_, op.options["in"])
    generator = torch.Generator(device="cpu").manual_seed(prng_key)

    def kaiming(shape: tuple[int, int]) -> torch.Tensor:
        # vera.model._kaiming_init: fan_in = shape[1], gain sqrt(2)
        std = math.sqrt(2) / math.sqrt(shape[1])
        bound = math.sqrt(3.0) * std
        with torch.no_grad():
            return torch.empty(shape).uniform_(-bound, bound, generator=generator)

    vera_A = kaiming((r, in_))
    vera_B = kaiming((out, r))
    return {"__vera_A__": vera_A, "__vera_B__": vera_B}
