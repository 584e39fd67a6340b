"""PEFT LoRA adapters as GGUF LoRA adapters: what converts, and with which scale.

A GGUF LoRA holds ``<base tensor>.lora_a`` (PEFT's A, [r, in]) and
``.lora_b`` (PEFT's B, [out, r]) and one ``adapter.lora.alpha``. llama.cpp
scales each pair by ``alpha / rank`` with the rank read from B's shape (by
the user's scale alone when alpha is 0). PEFT's scale is per module:
``alpha_m / r_m``, or ``alpha_m / sqrt(r_m)`` with rsLoRA, where
``rank_pattern`` and ``alpha_pattern`` pick r_m and alpha_m. So B is written
multiplied by ``f_m = s_m · r_m / alpha``: llama.cpp then applies exactly
``s_m`` to every module (f_m = 1 for a plain LoRA, whose B is written
unchanged). Per-module scales come from ``peft_plan`` (the merge's own
reading of PEFT's rules).

For the Llama family, B's rows on q_proj and k_proj are reordered as the
base's rows are (``gguf_arch.permute_rows``).

What a GGUF LoRA cannot express is refused, with the reason and the way out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapterhub.errors import InvalidArtifactError

from adapterhub.converters.formats.gguf_arch import Layout

_EXTRACT = "`adapterhub convert ADAPTER --to lora` approximates it as a plain LoRA (by SVD of its weight delta), which then converts"
_MERGE = "or merge it into its base and export that: `adapterhub merge ADAPTER --base BASE --to gguf -o OUT.gguf`"

#: Methods with weights a GGUF LoRA cannot hold -> why.
_REFUSED = {
    "IA3": "IA3 scales activations element-wise; a GGUF LoRA only adds B·A to a weight",
    "LOHA": "LoHa's delta is a Hadamard product of two low-rank products, not one B·A",
    "LOKR": "LoKr's delta is a Kronecker product, not one B·A",
    "ADALORA": "AdaLoRA adapters are not converted to GGUF yet",
    "VERA": "VeRA adapters are not converted to GGUF yet",
    "OFT": "OFT rotates weights by an orthogonal matrix; a GGUF LoRA only adds B·A",
    "BOFT": "BOFT rotates weights by butterfly-factored orthogonal matrices; a GGUF LoRA only adds B·A",
}
#: Methods without weights to convert.
_NO_WEIGHTS = ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CPT")


@dataclass(frozen=True)
class LoraEntry:
    module: str  # PEFT module path, base_model.model. stripped
    gguf: str  # base tensor name in GGUF, e.g. blk.0.attn_q.weight
    a_key: str
    b_key: str
    rank: int
    scale: float  # PEFT's scale for this module
    factor: float  # multiplies B, so that llama.cpp's alpha/rank gives ``scale``
    permute_heads: int | None
    embedding: bool

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "gguf": self.gguf, "rank": self.rank, "scale": self.scale, "factor": self.factor}


def refuse_unconvertible(config: Mapping[str, Any], keys: Sequence[str]) -> None:
    """Raise why this adapter cannot become a GGUF LoRA (nothing when it can)."""
    method = str(config.get("peft_type", "")).upper()
    if not method:
        raise InvalidArtifactError("adapter_config.json has no peft_type: not a PEFT adapter")
    if method in _NO_WEIGHTS:
        raise InvalidArtifactError(
            f"a GGUF LoRA cannot express {method}: it adds virtual tokens or prefixes instead of changing weights, "
            "so there are no weights to convert",
            hint="keep it as a PEFT adapter and load it with PEFT",
        )
    if method in _REFUSED:
        raise InvalidArtifactError(f"a GGUF LoRA cannot express {method}: {_REFUSED[method]}", hint=f"{_EXTRACT}; {_MERGE}")
    if method != "LORA":
        raise InvalidArtifactError(f"a GGUF LoRA cannot express {method} adapters", hint=f"{_EXTRACT}; {_MERGE}")
    if config.get("use_dora") or any(k.endswith(".lora_magnitude_vector") for k in keys):
        raise InvalidArtifactError(
            "a GGUF LoRA cannot express DoRA: DoRA rescales every output row by a learned magnitude "
            "over the norm of W + B·A, and llama.cpp only adds B·A",
            hint=f"{_EXTRACT}; {_MERGE}",
        )
    mts = config.get("modules_to_save") or []
    if mts:
        names = [mts] if isinstance(mts, str) else [str(m) for m in mts]
        raise InvalidArtifactError(
            f"a GGUF LoRA cannot express modules_to_save ({', '.join(names)}): they replace whole modules "
            "with trained copies, and a GGUF LoRA holds only low-rank pairs",
            hint=f"{_MERGE}; {_EXTRACT} (for the saved modules too)",
        )
    if config.get("alora_invocation_tokens"):
        raise InvalidArtifactError("activated LoRA (alora_invocation_tokens) is not converted to GGUF yet")


def plan_lora(
    config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]], layout: Layout, base_config: Mapping[str, Any],
    unchanged: Callable[[str, str], bool | None] = lambda key, name: None,
) -> tuple[float, list[LoraEntry]]:
    """(the alpha to write, one entry per adapted module), checked against the base's shapes.

    ``unchanged(adapter key, base tensor name)`` says whether a whole weight the
    adapter saved equals the base's (None: the base's weights are not at hand).
    PEFT saves targeted embeddings that way; an unchanged copy is dropped.
    """
    from adapterhub.converters.formats.peft_plan import parse_adapter

    refuse_unconvertible(config, list(shapes))
    plan = parse_adapter(config, shapes)
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise InvalidArtifactError(f"adapter_config.json: lora_alpha must be a number, not {alpha!r}")
    expected = layout.expected_shapes()
    tmap = layout.name_map()
    entries: list[LoraEntry] = []
    for op in plan.ops:
        if op.kind == "replace":
            if not op.options.get("own_copy") and unchanged(op.tensors["value"], f"{op.module}.{op.param}"):
                continue
            raise InvalidArtifactError(
                f"a GGUF LoRA cannot carry the saved weight {op.module}.{op.param} (a whole tensor, not a low-rank pair)",
                hint=_MERGE,
            )
        if op.kind == "lora_bias":
            raise InvalidArtifactError(f"a GGUF LoRA cannot carry the trained LoRA bias on {op.module}", hint=_MERGE)
        if op.fan_in_fan_out:
            raise InvalidArtifactError(f"{op.module}: fan_in_fan_out LoRA (Conv1D layers) has no GGUF form here")
        entries.append(_entry(op, shapes, layout, expected, tmap, float(alpha), base_config))
    if not entries:
        raise InvalidArtifactError("the adapter holds no LoRA pairs to convert")
    return float(alpha), entries


def _entry(op: Any, shapes: Mapping[str, Sequence[int]], layout: Layout, expected: Mapping[str, tuple[int, ...]], tmap: Any, alpha: float, base_config: Mapping[str, Any]) -> LoraEntry:
    module = op.module
    embedding = op.kind == "lora_embedding"
    a, b = tuple(shapes[op.tensors["A"]]), tuple(shapes[op.tensors["B"]])
    want = expected.get(module)
    if want is None:
        raise InvalidArtifactError(
            f"the adapter targets {module}, which the base ({layout.arch.hf}, {layout.n_layers} layers) does not have",
            hint="--base must be the model the adapter was trained on",
        )
    # Linear: A [r, in], B [out, r]; weight [out, in]. Embedding: A [r, vocab], B [dim, r]; weight [vocab, dim].
    got = (a[1], b[0]) if embedding else (b[0], a[1])
    if got != want:
        raise InvalidArtifactError(
            f"the adapter does not fit the base: {module} is {list(want)} in the base, the adapter's LoRA implies {list(got)}",
            hint="--base must be the model the adapter was trained on",
        )
    if module == "lm_head" and base_config.get("tie_word_embeddings"):
        raise InvalidArtifactError(
            "the adapter targets lm_head, but the base ties it to the embeddings: its GGUF has no separate output tensor",
            hint=_MERGE,
        )
    rank = a[0]
    factor = op.scale * rank / alpha if alpha else op.scale
    if abs(factor - 1.0) < 1e-12:  # a plain LoRA: B unchanged, bit for bit
        factor = 1.0
    gguf_name = layout.gguf_name(f"{module}.weight", tmap)
    assert gguf_name is not None
    return LoraEntry(
        module=module,
        gguf=gguf_name,
        a_key=op.tensors["A"],
        b_key=op.tensors["B"],
        rank=rank,
        scale=op.scale,
        factor=factor,
        permute_heads=None if embedding else layout.permute_heads(f"{module}.weight"),
        embedding=embedding,
    )


def lora_pair(entry: LoraEntry, a: Any, b: Any) -> tuple[Any, Any]:
    """(lora_a, lora_b) as llama.cpp reads them, from PEFT's A and B (torch, float32)."""
    from adapterhub.converters.formats.gguf_arch import permute_rows

    if entry.factor != 1.0:
        b = b * entry.factor
    if entry.permute_heads is not None:
        b = permute_rows(b, entry.permute_heads)
    if entry.embedding:
        # llama.cpp applies a token-embedding LoRA with A and B swapped and A transposed.
        a = a.T.contiguous()
    return a, b
