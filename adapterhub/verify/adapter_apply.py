"""A PEFT adapter applied the way PEFT applies it, unmerged, one module at a
time: the reference of ``verify --streamed``.

This is deliberately not the merge code of :mod:`adapterhub.converters`: a
reference that shared the converter's arithmetic would share its bugs. Each
formula follows PEFT 0.21's forward pass (``lora.Linear.forward``,
``DoraLinearLayer.forward``, ``ia3.Linear.forward``, ``lora.Embedding``),
dtype casts included, and ``tests/test_verify_streamed.py`` checks the result
against PEFT itself in float32.

Supported: LoRA (rsLoRA, ``rank_pattern``, ``alpha_pattern``, embeddings),
DoRA and IA3 on linear layers, and full weights saved with the adapter
(``modules_to_save``, resized embeddings). Anything else is refused with a
clear message, and the whole-model path (plain ``verify``) still takes it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError, UsageError
from adapterhub.jsonio import read_json
from adapterhub.verify.weights import SafetensorsWeights, canonical

if TYPE_CHECKING:
    import torch

PREFIX = "base_model.model."
_WRAPPERS = (".base_layer", ".modules_to_save.default", ".original_module")
_ROLES = {  # tensor name suffix -> (kind, role)
    ".lora_A.weight": ("lora", "A"),
    ".lora_B.weight": ("lora", "B"),
    ".lora_magnitude_vector": ("dora", "m"),
    ".lora_magnitude_vector.weight": ("dora", "m"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
    ".ia3_l": ("ia3", "l"),
}
# adapter_config.json settings the streamed reference does not implement
_UNSUPPORTED = {
    "lora_bias": "a trained LoRA bias (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D layers)",
    "trainable_token_indices": "trainable token indices",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
}


@dataclass(frozen=True)
class ModuleAdapter:
    """The adapter of one module: its kind, scale and tensor names."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    kind: str  # lora | dora | ia3 | embedding
    scale: float
    tensors: dict[str, str]  # role (A, B, m, l) -> name in the adapter file
    feedforward: bool = False  # IA3: scales the input, not the output


def pattern_key(patterns: Any, key: str) -> str | None:
    """The first pattern that matches the end of ``key`` at a name boundary (PEFT's rule), or None.

    Matched in bounded time (the patterns come from the adapter: ``(a+)+b`` must not hang verify).
    """
    from adapterhub.inspect.patterns import find_pattern_key

    return find_pattern_key(patterns or (), key, "adapter_config.json: rank_pattern/alpha_pattern")


class AdapterWeights:
    """An adapter directory, read lazily: per module, the operation PEFT runs."""

    def __init__(self, adapter_dir: Path, device: str = "cpu") -> None:
        self.device = device
        self.cfg = read_json(adapter_dir / "adapter_config.json")
        ptype = str(self.cfg.get("peft_type", "")).upper()
        if ptype not in ("LORA", "IA3"):
            raise UsageError(
                f"--streamed applies LoRA, DoRA and IA3 adapters; this one is {ptype or 'of unknown type'}",
                hint="verify it without --streamed",
            )
        for key, what in _UNSUPPORTED.items():
            if self.cfg.get(key):
                raise UsageError(f"--streamed does not apply {what}", hint="verify it without --streamed")
        if not (adapter_dir / "adapter_model.safetensors").exists():
            raise InvalidArtifactError("--streamed reads adapter_model.safetensors; this adapter has none")
        self.src = SafetensorsWeights(adapter_dir)
        self.modules: dict[str, ModuleAdapter] = {}
        self.replaced: dict[str, str] = {}  # base tensor name -> full tensor saved with the adapter
        parts: dict[str, dict[str, tuple[str, str]]] = {}
        for name in self.src.keys():
            stem = name.removeprefix(PREFIX)
            for suffix, (kind, role) in _ROLES.items():
                if stem.endswith(suffix):
                    parts.setdefault(canonical(stem.removesuffix(suffix)), {})[role] = (kind, name)
                    break
            else:
                for w in _WRAPPERS:
                    stem = stem.replace(w, "")
                self.replaced[canonical(stem)] = name
        for module, roles in parts.items():
            self.modules[module] = self._module(module, roles)

    def _module(self, module: str, roles: dict[str, tuple[str, str]]) -> ModuleAdapter:
        names = {role: name for role, (_, name) in roles.items()}
        if "l" in roles:
            shape = self.src.shape(names["l"])
            return ModuleAdapter(module, "ia3", 1.0, names, feedforward=len(shape) == 2 and shape[0] == 1 and shape[1] > 1)
        if "A" not in names or "B" not in names:
            raise InvalidArtifactError(f"the adapter holds only part of {module}'s LoRA tensors ({', '.join(sorted(names))})")
        embedding = roles["A"][0] == "embedding"
        r_file = self.src.shape(names["A"])[0]
        r = int(self.cfg.get("rank_pattern", {}).get(pattern_key(self.cfg.get("rank_pattern"), module), self.cfg.get("r", r_file)))
        alpha = float(self.cfg.get("alpha_pattern", {}).get(pattern_key(self.cfg.get("alpha_pattern"), module), self.cfg.get("lora_alpha", r)))
        if r != r_file:
            raise InvalidArtifactError(f"{module}: adapter_config.json gives rank {r}, its lora_A has {r_file} rows")
        scale = alpha / math.sqrt(r) if self.cfg.get("use_rslora") else alpha / r
        kind = "embedding" if embedding else ("dora" if "m" in names else "lora")
        return ModuleAdapter(module, kind, scale, names)

    def tensor(self, name: str) -> torch.Tensor:
        """An adapter tensor as PEFT holds it: 16-bit ones upcast to float32
        (``autocast_adapter_dtype``)."""
        import torch

        t = self.src.get(name).to(self.device)
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    def release(self, op: ModuleAdapter) -> None:
        for n in op.tensors.values():
            self.src.release(n)

    def close(self) -> None:
        self.src.close()


# --------------------------------------------------------------------------- PEFT's forward passes


def lora_linear(x: torch.Tensor, base_out: torch.Tensor, op: ModuleAdapter, aw: AdapterWeights, rows: slice | None = None) -> torch.Tensor:
    """``lora.Linear.forward``: base(x) + B(A(x)) * scale in the adapter's dtype, cast back."""
    import torch.nn.functional as F

    A, B = aw.tensor(op.tensors["A"]), aw.tensor(op.tensors["B"])
    if rows is not None:
        B = B[rows]
    xa = x.to(A.dtype) if x.dtype != A.dtype else x
    return (base_out + F.linear(F.linear(xa, A), B) * op.scale).to(base_out.dtype)


def dora_linear(
    x: torch.Tensor, base_out: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, op: ModuleAdapter,
    aw: AdapterWeights, rows: slice | None = None,
) -> torch.Tensor:
    """``DoraLinearLayer.forward`` in eval mode: the magnitude over the norm of
    W + scale·BA (rows of the full weight), applied to the base output."""
    import torch
    import torch.nn.functional as F

    A, B, m = aw.tensor(op.tensors["A"]), aw.tensor(op.tensors["B"]), aw.tensor(op.tensors["m"])
    if rows is not None:
        B, m = B[rows], m[rows]
    dtype = A.dtype
    xa = x.to(dtype) if x.dtype != dtype else x
    eye = torch.eye(A.shape[1], dtype=dtype, device=A.device)
    lora_weight = F.linear(F.linear(eye, A), B).T.to(dtype)
    weight_norm = torch.linalg.norm(weight.to(dtype) + op.scale * lora_weight, dim=1).to(dtype)
    mag_norm_scale = (m / weight_norm).view(1, -1)
    base_result = base_out - bias if bias is not None else base_out
    result_dora = (mag_norm_scale - 1) * base_result + mag_norm_scale * F.linear(F.linear(xa, A), B) * op.scale
    return (base_out + result_dora).to(base_out.dtype)


def ia3_input(x: torch.Tensor, op: ModuleAdapter, aw: AdapterWeights) -> torch.Tensor:
    """``ia3.Linear.forward``, feed-forward modules: the input scaled by l before the base layer."""
    lvec = aw.tensor(op.tensors["l"]).flatten()
    return (x.to(lvec.dtype) * lvec).to(x.dtype)


def ia3_output(base_out: torch.Tensor, op: ModuleAdapter, aw: AdapterWeights, rows: slice | None = None) -> torch.Tensor:
    """``ia3.Linear.forward``, other modules: the output scaled by l."""
    lvec = aw.tensor(op.tensors["l"]).flatten()
    if rows is not None:
        lvec = lvec[rows]
    return (base_out * lvec).to(base_out.dtype)


def lora_embedding(ids: torch.Tensor, base_out: torch.Tensor, op: ModuleAdapter, aw: AdapterWeights) -> torch.Tensor:
    """``lora.Embedding.forward``: base(ids) + (embed(ids, Aᵀ) @ Bᵀ) * scale."""
    import torch.nn.functional as F

    A, B = aw.tensor(op.tensors["A"]), aw.tensor(op.tensors["B"])
    after_a = F.embedding(ids, A.T)
    return (base_out + (after_a @ B.T) * op.scale).to(base_out.dtype)


# --------------------------------------------------------------------------- PEFT's merge (same-recipe stream)


def merged_weight(weight: torch.Tensor, op: ModuleAdapter, aw: AdapterWeights) -> torch.Tensor:
    """W after ``merge_and_unload`` (PEFT's ``merge``): computed in float32, cast to W's dtype."""
    import torch

    w32 = weight.float()
    if op.kind == "ia3":
        lvec = aw.tensor(op.tensors["l"]).float()
        return (w32 * (lvec.flatten() if op.feedforward else lvec.reshape(-1, 1))).to(weight.dtype)
    A, B = aw.tensor(op.tensors["A"]).float(), aw.tensor(op.tensors["B"]).float()
    delta = (B @ A) * op.scale
    if op.kind == "dora":
        m = aw.tensor(op.tensors["m"]).float()
        norm = torch.linalg.norm(w32 + delta, dim=1)
        return ((m / norm).view(-1, 1) * (w32 + delta)).to(weight.dtype)
    return (w32 + delta).to(weight.dtype)
