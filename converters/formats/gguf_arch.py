"""Hugging Face architectures as GGUF models: names, metadata, row order, tensor types.

What llama.cpp expects, per architecture, from a converted checkpoint:

- the metadata keys its loader reads (``<arch>.context_length``, heads, rope, ...),
  written from ``config.json``;
- every tensor under its GGUF name (the ``gguf`` package's tensor-name map);
- for the Llama family (Llama, Mistral), the rows of ``q_proj`` and ``k_proj``
  per head in llama.cpp's rotary order: Hugging Face stores each head as
  [first halves of the rotary pairs, second halves]; llama.cpp wants the pairs
  interleaved. Qwen2, Qwen3 and Phi-3 use the NeoX layout and need nothing;
- which tensors stay float32 (norms and other 1-d tensors) and which take
  the requested type.

Only names, shapes and config values are handled here; the bytes are
``gguf_quant``'s, the file ``gguf_write``'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError

if TYPE_CHECKING:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

#: Output types of ``convert --to gguf --outtype``.
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


@dataclass(frozen=True)
class Arch:
    hf: str  # config.json architectures[0]
    gguf: str  # llama.cpp's architecture name
    permute_qk: bool  # Llama family: q/k rows into llama.cpp's rotary order


#: Hugging Face architecture -> how it converts. Mistral is llama.cpp's "llama".
ARCHS: dict[str, Arch] = {
    a.hf: a
    for a in (
        Arch("LlamaForCausalLM", "llama", True),
        Arch("MistralForCausalLM", "llama", True),
        Arch("Qwen2ForCausalLM", "qwen2", False),
        Arch("Qwen3ForCausalLM", "qwen3", False),
        Arch("Phi3ForCausalLM", "phi3", False),
    )
}


def supported_list() -> str:
    return ", ".join(ARCHS)


def arch_of(config: Mapping[str, Any]) -> Arch:
    """The conversion of ``config``'s architecture, or an InvalidArtifactError listing the supported ones."""
    archs = config.get("architectures")
    name = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if name is None:
        raise InvalidArtifactError(
            "config.json names no architecture (no `architectures` list)",
            hint=f"GGUF export supports {supported_list()}",
        )
    if name not in ARCHS:
        raise InvalidArtifactError(
            f"GGUF export does not support {name} yet",
            hint=f"supported architectures: {supported_list()}",
        )
    return ARCHS[name]


def _int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    v = config.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise InvalidArtifactError(f"config.json: {key} must be a positive integer, not {v!r}")
    return v


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """Rope settings in one dict, whichever transformers version wrote the config."""
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rp, Mapping):
        raise InvalidArtifactError("config.json: rope_parameters/rope_scaling must be an object")
    out = dict(rp)
    if "rope_theta" not in out and "rope_theta" in config:
        out["rope_theta"] = config["rope_theta"]
    if "rope_type" not in out and "type" in out:
        out["rope_type"] = out["type"]
    return out


@dataclass(frozen=True)
class Layout:
    """The shapes and names of one model, from its config."""

    arch: Arch
    n_layers: int
    hidden: int
    n_head: int
    n_kv: int
    head_dim: int
    n_ff: int
    vocab: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Layout:
        arch = arch_of(config)
        hidden = _int(config, "hidden_size")
        n_head = _int(config, "num_attention_heads")
        head_dim = config.get("head_dim") or hidden // n_head
        return cls(
            arch=arch,
            n_layers=_int(config, "num_hidden_layers"),
            hidden=hidden,
            n_head=n_head,
            n_kv=_int(config, "num_key_value_heads", n_head),
            head_dim=_int({"head_dim": head_dim}, "head_dim"),
            n_ff=_int(config, "intermediate_size"),
            vocab=_int(config, "vocab_size"),
        )

    def name_map(self) -> Any:
        import gguf

        arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.arch.gguf)
        return gguf.get_tensor_name_map(arch_enum, self.n_layers)

    def gguf_name(self, hf_name: str, tmap: Any = None) -> str | None:
        """``model.layers.1.self_attn.q_proj.weight`` -> ``blk.1.attn_q.weight``; None for tensors llama.cpp does not use."""
        if hf_name.endswith(".rotary_emb.inv_freq"):
            return None
        tmap = tmap if tmap is not None else self.name_map()
        new = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise InvalidArtifactError(
                f"tensor {hf_name} has no GGUF name for {self.arch.hf}; is this checkpoint a plain {self.arch.hf}?"
            )
        return new

    def permute_heads(self, hf_name: str) -> int | None:
        """The head count to reorder ``hf_name``'s rows by (q: heads, k: KV heads), or None."""
        if not self.arch.permute_qk:
            return None
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return self.n_head
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return self.n_kv
        return None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every linear weight a LoRA may target, by module path (from the config alone)."""
        q, kv, h, ff = self.n_head * self.head_dim, self.n_kv * self.head_dim, self.hidden, self.n_ff
        per_layer: dict[str, tuple[int, int]]
        if self.arch.hf == "Phi3ForCausalLM":
            per_layer = {
                "self_attn.qkv_proj": (q + 2 * kv, h),
                "self_attn.o_proj": (h, q),
                "mlp.gate_up_proj": (2 * ff, h),
                "mlp.down_proj": (h, ff),
            }
        else:
            per_layer = {
                "self_attn.q_proj": (q, h),
                "self_attn.k_proj": (kv, h),
                "self_attn.v_proj": (kv, h),
                "self_attn.o_proj": (h, q),
                "mlp.gate_proj": (ff, h),
                "mlp.up_proj": (ff, h),
                "mlp.down_proj": (h, ff),
            }
        out = {f"model.layers.{i}.{m}": s for i in range(self.n_layers) for m, s in per_layer.items()}
        out["lm_head"] = (self.vocab, h)
        out["model.embed_tokens"] = (self.vocab, h)
        return out


def permute_rows(x: Any, n_heads: int) -> Any:
    """Rows of q/k (or of a LoRA B on them) from Hugging Face's rotate-half order into llama.cpp's.

    Per head, HF keeps [x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}] for rotary pairs
    (x_i, y_i); llama.cpp rotates adjacent rows, so it wants x_0, y_0, x_1, y_1, ...
    Works on numpy arrays and torch tensors.
    """
    return permuted_view(x, n_heads).reshape(x.shape)


def permuted_view(x: Any, n_heads: int) -> Any:
    """``permute_rows`` without the copy: a strided view [heads, d/2, 2, ...] whose rows in C order are llama.cpp's."""
    rows = x.shape[0]
    if rows % (2 * n_heads):
        raise InvalidArtifactError(f"{rows} rows do not split into {n_heads} heads of rotary pairs")
    return x.reshape(n_heads, 2, rows // n_heads // 2, *x.shape[1:]).swapaxes(1, 2)


def unpermute_rows(x: Any, n_heads: int) -> Any:
    """The inverse of ``permute_rows`` (llama.cpp's row order back to Hugging Face's)."""
    rows = x.shape[0]
    return x.reshape(n_heads, rows // n_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


# --------------------------------------------------------------------------- tensor types


def qtype_of(outtype: str) -> GGMLQuantizationType:
    from gguf import GGMLQuantizationType as T

    if outtype not in OUTTYPES:
        raise InvalidArtifactError(f"unknown GGUF type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    return T[outtype.upper()]


def file_type_of(outtype: str) -> int:
    from gguf import LlamaFileType as F

    return F.ALL_F32 if outtype == "f32" else F["MOSTLY_" + outtype.upper()]


def tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: str) -> GGMLQuantizationType:
    """The type a tensor is written in: the one llama.cpp's own converter picks for f32/f16/bf16/q8_0.

    Norms and other 1-d tensors stay float32. A block type needs rows that are
    whole blocks, else the tensor falls back to f16. With the 4- and 5-bit
    types the output projection is kept at q8_0: it is the tensor whose
    error reaches the logits most directly (llama.cpp's own quantizer also
    gives it more bits).
    """
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith((".weight", ".lora_a", ".lora_b")):
        return T.F32
    q = qtype_of(outtype)
    if outtype in ("q4_0", "q4_1", "q5_0", "q5_1") and gguf_name == "output.weight":
        q = T.Q8_0
    block = GGML_QUANT_SIZES[q][0]
    if shape[-1] % block:
        return T.F16
    return q


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


# --------------------------------------------------------------------------- metadata


def write_metadata(w: GGUFWriter, config: Mapping[str, Any], layout: Layout, outtype: str) -> None:
    """The architecture keys llama.cpp's loader reads, from ``config.json``."""
    w.add_block_count(layout.n_layers)
    ctx = config.get("max_position_embeddings")
    if isinstance(ctx, int) and ctx > 0:
        w.add_context_length(ctx)
    w.add_embedding_length(layout.hidden)
    w.add_feed_forward_length(layout.n_ff)
    w.add_head_count(layout.n_head)
    w.add_head_count_kv(layout.n_kv)
    eps = config.get("rms_norm_eps")
    if isinstance(eps, (int, float)):
        w.add_layer_norm_rms_eps(float(eps))
    rope = rope_parameters(config)
    theta = rope.get("rope_theta")
    if isinstance(theta, (int, float)):
        w.add_rope_freq_base(float(theta))
    if "head_dim" in config:
        w.add_key_length(layout.head_dim)
        w.add_value_length(layout.head_dim)
    if layout.arch.hf == "Phi3ForCausalLM":
        rot = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        w.add_rope_dimension_count(int(rot * layout.hidden) // layout.n_head)
        orig = rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        if isinstance(orig, int):
            w.add_rope_scaling_orig_ctx_len(orig)
        w.add_sliding_window(int(config.get("sliding_window") or 0))
    elif layout.arch.gguf == "llama":
        w.add_vocab_size(layout.vocab)
        w.add_rope_dimension_count(layout.head_dim)
    _rope_scaling(w, rope, layout)
    w.add_file_type(file_type_of(outtype))
    from gguf import GGML_QUANT_VERSION

    w.add_quantization_version(GGML_QUANT_VERSION)


def _rope_scaling(w: GGUFWriter, rope: Mapping[str, Any], layout: Layout) -> None:
    from gguf import RopeScalingType

    kind = str(rope.get("rope_type") or "default").lower()
    factor = rope.get("factor")
    if kind == "default" or (kind == "llama3" and layout.arch.gguf == "llama"):
        return  # llama3's factors are a tensor (rope_freqs_tensor)
    if kind == "linear" and isinstance(factor, (int, float)):
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
        return
    if kind == "yarn" and isinstance(factor, (int, float)):
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        return
    raise InvalidArtifactError(
        f"GGUF export does not support rope scaling {kind!r} for {layout.arch.hf} yet",
        hint="supported: none, linear, yarn, and llama3 for the Llama family",
    )


def rope_freqs_tensor(config: Mapping[str, Any], layout: Layout) -> np.ndarray | None:
    """Llama 3.1-style rope scaling: llama.cpp reads per-frequency factors from a ``rope_freqs`` tensor."""
    import numpy as np

    rope = rope_parameters(config)
    if str(rope.get("rope_type") or "").lower() != "llama3" or layout.arch.gguf != "llama":
        return None
    base = float(rope.get("rope_theta", 10000.0))
    dim = layout.head_dim
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)
