"""The decoder arithmetic of ``verify --streamed``: one Llama-family decoder
layer, its rotary embedding, norms and attention, over plain tensors.

Why not transformers' own modules: importing transformers' modeling code
(sympy, torch.distributed, dynamo) costs about 150 MB of resident memory
before the first weight is read, and PEFT with bitsandbytes another 75 MB;
on the 0.94B benchmark model that alone is a quarter of the checkpoint, which
is the whole budget of the streamed path. The functions below mirror
``transformers.models.llama.modeling_llama`` 5.x operation by operation (the
dtype of every step included), and ``tests/test_verify_streamed.py`` holds
them to the whole-model path's outputs within 1e-6 in float32.

Architectures: llama, mistral, qwen2 and qwen3 (biases and q/k norms are
taken from the checkpoint when it has them). RoPE: default, linear and llama3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterhub.errors import UsageError

if TYPE_CHECKING:
    import torch

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3")

Linear = Callable[[str, "torch.Tensor"], "torch.Tensor"]  # (module name, input) -> output
Param = Callable[[str], "torch.Tensor | None"]  # tensor name -> tensor in the stream's dtype, or None


@dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    eps: float
    vocab: int
    tied: bool
    rope_theta: float
    rope: dict[str, Any]
    sliding_window: int | None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> DecoderConfig:
        """From config.json; refuses what the streamed path does not compute."""
        mt = str(cfg.get("model_type"))
        if mt not in SUPPORTED:
            raise UsageError(
                f"--streamed runs {', '.join(SUPPORTED)} decoders; this model is {mt!r}",
                hint="verify it without --streamed",
            )
        act = cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"
        if act != "silu":
            raise UsageError(f"--streamed runs SiLU MLPs; this model uses {act!r}", hint="verify it without --streamed")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
        rtype = rope.get("rope_type") or rope.get("type") or "default"
        if rtype not in ROPE_TYPES:
            raise UsageError(f"--streamed computes {', '.join(ROPE_TYPES)} RoPE; this model uses {rtype!r}",
                             hint="verify it without --streamed")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        return cls(
            model_type=mt, hidden=hidden, heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), layers=int(cfg["num_hidden_layers"]),
            eps=float(cfg.get("rms_norm_eps", 1e-6)), vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", False)), rope_theta=theta, rope={**rope, "rope_type": rtype},
            sliding_window=int(window) if window else None,
        )

    def inv_freq(self) -> tuple[torch.Tensor, float]:
        """(inverse frequencies, attention scaling), as transformers' ROPE_INIT_FUNCTIONS compute them."""
        import torch

        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
        rtype = self.rope["rope_type"]
        if rtype == "linear":
            inv = inv / float(self.rope["factor"])
        elif rtype == "llama3":
            inv = _llama3(inv, self.rope)
        return inv, 1.0


def _llama3(inv_freq: torch.Tensor, rope: Mapping[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency scaling (``_compute_llama3_parameters``)."""
    import torch

    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv_freq
    inv_llama = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, inv_llama)


def rotary(cfg: DecoderConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for ``positions`` [B, T], in ``dtype`` (``LlamaRotaryEmbedding.forward``)."""
    import torch

    inv, scaling = cfg.inv_freq()
    freqs = positions[..., None].float() * inv.float().to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward``: the variance in float32, the scale in the input's dtype."""
    import torch

    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, t, d).reshape(b, h * n, t, d)


@dataclass
class KVCache:
    """Keys and values (after RoPE) of the decoded sequences, per layer: lists over sequences of [1, kv, L, d]."""

    keys: dict[int, list[torch.Tensor]]
    values: dict[int, list[torch.Tensor]]


def attention(
    cfg: DecoderConfig, i: int, x: torch.Tensor, linear: Linear, param: Param, cos: torch.Tensor, sin: torch.Tensor,
    cache: KVCache | None, keep: list[int] | None, step: bool,
) -> torch.Tensor:
    """``LlamaAttention.forward`` with SDPA. Prefill (``step`` False): causal over
    [B, T] and, for the rows in ``keep`` (sequence lengths), their keys and
    values into ``cache``. Decode (``step`` True): one new token per row,
    attending to that row's cache."""
    import torch
    import torch.nn.functional as F

    pre = f"model.layers.{i}.self_attn"
    b, t, _ = x.shape
    q = linear(f"{pre}.q_proj", x).view(b, t, -1, cfg.head_dim)
    k = linear(f"{pre}.k_proj", x).view(b, t, -1, cfg.head_dim)
    v = linear(f"{pre}.v_proj", x).view(b, t, -1, cfg.head_dim).transpose(1, 2)
    qn, kn = param(f"{pre}.q_norm.weight"), param(f"{pre}.k_norm.weight")
    if qn is not None and kn is not None:  # qwen3
        q, k = rms_norm(q, qn, cfg.eps), rms_norm(k, kn, cfg.eps)
    q, k = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    groups = cfg.heads // cfg.kv_heads
    scale = cfg.head_dim**-0.5
    if not step:
        out = F.scaled_dot_product_attention(q, _repeat_kv(k, groups), _repeat_kv(v, groups), is_causal=t > 1, scale=scale)
        if cache is not None and keep:
            # copies: a view would keep the whole batch's keys and values alive
            cache.keys[i] = [k[r : r + 1, :, :n].clone() for r, n in enumerate(keep)]
            cache.values[i] = [v[r : r + 1, :, :n].clone() for r, n in enumerate(keep)]
    else:
        assert cache is not None
        rows = []
        for r in range(b):
            cache.keys[i][r] = torch.cat([cache.keys[i][r], k[r : r + 1]], dim=2)
            cache.values[i][r] = torch.cat([cache.values[i][r], v[r : r + 1]], dim=2)
            kk, vv = _repeat_kv(cache.keys[i][r], groups), _repeat_kv(cache.values[i][r], groups)
            rows.append(F.scaled_dot_product_attention(q[r : r + 1], kk, vv, scale=scale))
        out = torch.cat(rows)
    out = out.transpose(1, 2).reshape(b, t, -1).contiguous()
    return linear(f"{pre}.o_proj", out)


def decoder_layer(
    cfg: DecoderConfig, i: int, h: torch.Tensor, linear: Linear, param: Param, cos: torch.Tensor, sin: torch.Tensor,
    cache: KVCache | None = None, keep: list[int] | None = None, step: bool = False,
) -> torch.Tensor:
    """``LlamaDecoderLayer.forward``: pre-norm attention and SwiGLU MLP, each with its residual."""
    import torch.nn.functional as F

    pre = f"model.layers.{i}"
    x = rms_norm(h, _need(param, f"{pre}.input_layernorm.weight"), cfg.eps)
    h = h + attention(cfg, i, x, linear, param, cos, sin, cache, keep, step)
    x = rms_norm(h, _need(param, f"{pre}.post_attention_layernorm.weight"), cfg.eps)
    gate = F.silu(linear(f"{pre}.mlp.gate_proj", x))
    mlp = linear(f"{pre}.mlp.down_proj", gate * linear(f"{pre}.mlp.up_proj", x))
    return h + mlp


def _need(param: Param, name: str) -> torch.Tensor:
    t = param(name)
    if t is None:
        from adapterhub.errors import InvalidArtifactError

        raise InvalidArtifactError(f"{name} is missing from the checkpoint")
    return t
