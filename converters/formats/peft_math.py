"""PEFT adapters as per-tensor merge operations, as pure functions.

PEFT 0.21.2 is the reference for every formula here; each function names the
PEFT code it mirrors, and the operations are done in the same order so that a
float32 merge is bit-identical to ``merge_and_unload()``.

Three steps, each a pure function over names, shapes and tensors:

1. ``parse_adapter(config, shapes)`` reads ``adapter_config.json`` and the
   adapter's tensor names and shapes into an ``AdapterPlan``: one ``ModuleOp``
   per adapted module (keyed by PEFT's module path, ``base_model.model.``
   stripped) plus whole-tensor replacements (``modules_to_save``, saved
   embeddings, trained biases).
2. ``resolve_plan(plan, base_shapes, base_config)`` binds those to the base
   checkpoint's tensor names (a checkpoint may carry a prefix such as
   ``model.`` that the PEFT path lacks, or the reverse), checks every shape and
   returns a ``MergePlan``: for each output tensor, where it is read from and
   which operations apply. Nothing is read but names and shapes, so a wrong
   base fails here, before any output exists.
3. ``apply_ops(tensor, ops, get, device)`` merges one base tensor in float32.

>>> plan = parse_adapter(cfg, {k: src.spec(k).shape for k in src.keys()})  # doctest: +SKIP
>>> mp = resolve_plan(plan, {k: base.spec(k).shape for k in base.keys()}, base_cfg)  # doctest: +SKIP
>>> for t in mp.tensors:  # doctest: +SKIP
...     merged = apply_ops(base.get(t.source), t.ops, src.get, "cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError

if TYPE_CHECKING:
    import torch

    from adapterhub.converters.formats.safetensors_io import Workspace

Shape = tuple[int, ...]
PEFT_PREFIX = "base_model.model."

# --------------------------------------------------------------------------- methods

#: Methods whose adapters add virtual tokens or modules instead of changing weights.
NOT_MERGEABLE: dict[str, str] = {
    "PROMPT_TUNING": "prompt tuning adds trainable virtual tokens in front of the input",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning adds trainable virtual tokens in front of the input",
    "P_TUNING": "p-tuning adds virtual tokens produced by a prompt encoder",
    "PREFIX_TUNING": "prefix tuning adds trainable key/value prefixes to every attention layer",
    "ADAPTION_PROMPT": "adaption-prompt (LLaMA-Adapter) adds gated prompt tokens to the top attention layers",
    "CPT": "context-aware prompt tuning adds trainable virtual tokens in front of the input",
    "BOTTLENECK": "bottleneck adapters insert new down/up projection modules between layers",
}

#: Methods this module merges.
SUPPORTED = ("LORA", "ADALORA", "IA3", "LOHA", "LOKR", "VERA")

# LoRA options that change what the adapter computes beyond W + s·BA; merging
# them as plain LoRA would be wrong (or PEFT itself cannot merge them).
_LORA_UNSUPPORTED_OPTIONS = {
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens, so it has no fixed weight delta",
    "arrow_config": "Arrow routes tokens between several LoRA experts at run time",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "use_qalora": "QA-LoRA pools inputs group-wise before lora_A",
    "target_parameters": "LoRA on bare parameters (e.g. MoE experts)",
    "layer_replication": "layer replication changes the model's structure",
    "trainable_token_indices": "trainable tokens",
}

# init_lora_weights values that also rewrite the base weights at initialisation:
# the saved adapter is relative to a residual base, not to the original one.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def _not_mergeable_message(method: str) -> str:
    why = NOT_MERGEABLE[method]
    return (
        f"{method} adapters cannot be merged: {why}, rather than changing existing weights, "
        "so there is no weight delta to fold into the base model"
    )


def check_mergeable(config: Mapping[str, Any]) -> str:
    """Return the adapter's method (``LORA``, ``IA3``, ...) or raise why it cannot be merged.

    ``config`` is ``adapter_config.json`` (PEFT) or the ``adapters`` library's config.
    """
    if "peft_type" not in config:
        if _is_adapters_library(config):
            arch = _adapters_architecture(config)
            if arch in ("lora", "ia3"):
                raise InvalidArtifactError(
                    f"not supported yet: {arch} adapters from the `adapters` library (their key layout differs from PEFT's)",
                    hint="keep the adapter as is and load it with the `adapters` library",
                )
            raise InvalidArtifactError(
                _not_mergeable_message("BOTTLENECK"),
                hint="keep the adapter as is and load it with the `adapters` library",
            )
        raise InvalidArtifactError("adapter_config.json has no peft_type: not a PEFT adapter")
    method = str(config["peft_type"]).upper()
    if method in NOT_MERGEABLE:
        raise InvalidArtifactError(
            _not_mergeable_message(method), hint="keep the adapter as is and load it with PEFT on top of the base"
        )
    if method not in SUPPORTED:
        raise InvalidArtifactError(
            f"not supported yet: merging {method} adapters is not implemented in adapterhub",
            hint="keep the adapter as is, or merge it with PEFT's merge_and_unload()",
        )
    if method == "LORA":
        for key, what in _LORA_UNSUPPORTED_OPTIONS.items():
            if config.get(key):
                raise InvalidArtifactError(
                    f"not supported yet: this LoRA uses {key} ({what})",
                    hint="keep the adapter as is, or merge it with PEFT's merge_and_unload()",
                )
    if method in ("LORA", "ADALORA"):
        init = config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
            raise InvalidArtifactError(
                f"this LoRA was initialised with {init!r}, which also rewrites the base weights, "
                "so it does not apply to the original base",
                hint="save it with save_pretrained(..., path_initial_model_for_weight_conversion=...) "
                "to get a plain LoRA, then merge that",
            )
    return method


def _is_adapters_library(config: Mapping[str, Any]) -> bool:
    version = str(config.get("version", ""))
    return version.startswith("adapters.") or ("config" in config and "model_class" in config)


def _adapters_architecture(config: Mapping[str, Any]) -> str:
    inner = config.get("config")
    if isinstance(inner, Mapping):
        return str(inner.get("architecture") or "bottleneck").lower()
    return "bottleneck"


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class ModuleOp:
    """One adapter operation on one parameter of one module.

    ``kind`` is one of ``lora``, ``lora_embedding``, ``dora``, ``dora_embedding``,
    ``lora_bias``, ``adalora``, ``loha``, ``lokr``, ``vera``, ``ia3``,
    ``ia3_bias`` or ``replace``. ``tensors`` maps a role (``A``, ``B``, ``m``,
    ...) to the adapter tensor's key. ``expected`` is the base shape the adapter
    implies, as far as it does.
    """

    kind: str
    module: str  # PEFT module path, base_model.model. stripped
    param: str  # "weight" or "bias"
    tensors: Mapping[str, str]
    scale: float = 1.0
    fan_in_fan_out: bool = False
    expected: Shape | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"{self.module}.{self.param}"

    def describe(self) -> str:
        return f"{self.kind} on {self.module}"


@dataclass(frozen=True)
class AdapterPlan:
    method: str
    ops: tuple[ModuleOp, ...]
    config: Mapping[str, Any]

    @property
    def modules(self) -> list[str]:
        seen: dict[str, None] = {}
        for op in self.ops:
            seen.setdefault(op.module)
        return list(seen)


@dataclass(frozen=True)
class TensorPlan:
    """How one output tensor is produced: read ``source`` from the base, apply ``ops``."""

    name: str
    source: str
    shape: Shape
    ops: tuple[ModuleOp, ...] = ()


@dataclass(frozen=True)
class MergePlan:
    method: str
    tensors: tuple[TensorPlan, ...]
    untied: tuple[str, ...] = ()  # output names written separately from the tensor they were tied to
    vocab_size: int | None = None  # new vocabulary size when the adapter resized the embeddings
    warnings: tuple[str, ...] = ()

    @property
    def changed(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.ops]

    @property
    def modules(self) -> list[str]:
        seen: dict[str, None] = {}
        for t in self.tensors:
            for op in t.ops:
                if op.kind != "replace":
                    seen.setdefault(op.module)
        return list(seen)


# --------------------------------------------------------------------------- parse

# Suffixes of adapter tensors, per method: suffix -> role. Longest first.
_SUFFIXES: dict[str, dict[str, str]] = {
    "LORA": {
        ".lora_A.weight": "A",
        ".lora_B.weight": "B",
        ".lora_B.bias": "B_bias",
        ".lora_embedding_A": "emb_A",
        ".lora_embedding_B": "emb_B",
        ".lora_magnitude_vector": "m",
    },
    "ADALORA": {".lora_A": "A", ".lora_B": "B", ".lora_E": "E"},
    "IA3": {".ia3_l": "l"},
    "LOHA": {
        ".hada_w1_a": "w1a",
        ".hada_w1_b": "w1b",
        ".hada_w2_a": "w2a",
        ".hada_w2_b": "w2b",
        ".hada_t1": "t1",
        ".hada_t2": "t2",
    },
    "LOKR": {
        ".lokr_w1_a": "w1a",
        ".lokr_w1_b": "w1b",
        ".lokr_w2_a": "w2a",
        ".lokr_w2_b": "w2b",
        ".lokr_w1": "w1",
        ".lokr_w2": "w2",
        ".lokr_t2": "t2",
    },
    "VERA": {".vera_lambda_b": "lambda_b", ".vera_lambda_d": "lambda_d"},
}

# Adapter-parameter names that are not in our table: refuse rather than
# mistake them for base weights.
_ADAPTER_MARKERS = re.compile(
    r"\.(lora_[A-Za-z_]+|ia3_[a-z_]+|hada_[a-z0-9_]+|lokr_[a-z0-9_]+|vera_[a-z_]+|token_adapter|"
    r"oft_[a-z_]+|boft_[a-z_]+|modules_to_save|original_module)(\.|$)"
)


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """Mirror of ``peft.utils.other.get_pattern_key``: the first pattern that matches the end of the module path."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def _rank_alpha(config: Mapping[str, Any], module: str, r_default: Any, alpha_default: Any) -> tuple[Any, Any]:
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r_default)
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha_default)
    return r, alpha


def _split_key(key: str, suffixes: Mapping[str, str]) -> tuple[str, str] | None:
    for suffix, role in suffixes.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _strip_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def _shape_str(shape: Sequence[int] | None) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]" if shape is not None else "?"


def parse_adapter(config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> AdapterPlan:
    """Turn an adapter's config and tensor names/shapes into per-module operations.

    ``shapes`` maps each adapter tensor key to its shape. Keys of PEFT adapter
    parameters become ``ModuleOp``s of the method's kind; every other key
    (``modules_to_save``, embeddings saved alongside, trained biases) becomes a
    ``replace`` of the base tensor of the same name (``.base_layer`` dropped).
    """
    method = check_mergeable(config)
    suffixes = _SUFFIXES[method]
    shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    groups: dict[str, dict[str, str]] = {}
    replacements: list[ModuleOp] = []
    mts = config.get("modules_to_save") or []
    modules_to_save = [mts] if isinstance(mts, str) else [str(m) for m in mts]
    shared: dict[str, str] = {}
    for key in shapes:
        if method == "VERA" and key in ("base_model.vera_A", "base_model.vera_B"):
            shared[key.rsplit("_", 1)[1]] = key
            continue
        split = _split_key(key, suffixes)
        if split is not None:
            module, role = split
            groups.setdefault(_strip_prefix(module), {})[role] = key
            continue
        if _ADAPTER_MARKERS.search(key):
            raise InvalidArtifactError(f"not supported yet: adapter tensor {key} is not a {method} parameter adapterhub knows")
        path = _strip_prefix(key).replace(".base_layer.", ".")
        module, _, param = path.rpartition(".")
        # modules_to_save get their own copy of the module (ModulesToSaveWrapper, matched
        # with endswith as in peft.utils.other._set_trainable); other saved weights (embeddings
        # saved alongside, trained biases) are loaded into the model's own parameter.
        own_copy = ".base_layer." not in key and any(module.endswith(t) for t in modules_to_save)
        replacements.append(
            ModuleOp(
                "replace", module, param, {"value": key}, expected=shapes[key], options={"shape": shapes[key], "own_copy": own_copy}
            )
        )

    builder = _BUILDERS[method]
    ops: list[ModuleOp] = list(replacements)
    for module, roles in groups.items():
        ops.extend(builder(config, module, roles, shapes, shared))
    if not any(op.kind != "replace" for op in ops) and not replacements:
        raise InvalidArtifactError(f"the adapter holds no {method} tensors")
    return AdapterPlan(method, tuple(ops), dict(config))


def _need(module: str, roles: Mapping[str, str], *names: str) -> None:
    missing = [n for n in names if n not in roles]
    if missing:
        raise InvalidArtifactError(f"{module}: adapter tensors incomplete (missing {', '.join(missing)})")


def _lora_ops(config: Mapping[str, Any], module: str, roles: Mapping[str, str], shapes: Mapping[str, Shape], shared: Mapping[str, str]) -> list[ModuleOp]:
    r, alpha = _rank_alpha(config, module, config.get("r", 8), config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        scale = alpha / math.sqrt(r)  # LoraLayer.update_layer
    else:
        scale = alpha / r
    dora = "m" in roles
    if "emb_A" in roles or "emb_B" in roles:  # lora.Embedding
        _need(module, roles, "emb_A", "emb_B")
        a, b = shapes[roles["emb_A"]], shapes[roles["emb_B"]]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise InvalidArtifactError(f"{module}: lora_embedding_A {_shape_str(a)} and lora_embedding_B {_shape_str(b)} do not fit")
        _check_rank(module, a[0], r)
        tensors = {"A": roles["emb_A"], "B": roles["emb_B"]}
        if dora:
            tensors["m"] = roles["m"]
        # Embedding weight is [num_embeddings, dim]; A is [r, num], B is [dim, r].
        return [ModuleOp("dora_embedding" if dora else "lora_embedding", module, "weight", tensors, scale, expected=(a[1], b[0]))]
    _need(module, roles, "A", "B")
    a, b = shapes[roles["A"]], shapes[roles["B"]]
    if len(a) != 2 or len(b) != 2:
        raise InvalidArtifactError(
            f"not supported yet: {module} has {len(a)}-d LoRA weights (convolution layers are not merged by adapterhub)"
        )
    if a[0] != b[1]:
        raise InvalidArtifactError(f"{module}: lora_A {_shape_str(a)} and lora_B {_shape_str(b)} do not fit")
    _check_rank(module, a[0], r)
    tensors = {"A": roles["A"], "B": roles["B"]}
    if dora:
        tensors["m"] = roles["m"]
        if shapes[roles["m"]] != (b[0],):
            raise InvalidArtifactError(
                f"{module}: lora_magnitude_vector {_shape_str(shapes[roles['m']])} does not fit lora_B {_shape_str(b)}"
            )
    ops = [ModuleOp("dora" if dora else "lora", module, "weight", tensors, scale, expected=(b[0], a[1]))]
    if "B_bias" in roles:
        ops.append(ModuleOp("lora_bias", module, "bias", {"b": roles["B_bias"]}, scale, expected=(b[0],)))
    return ops


def _check_rank(module: str, got: int, r: Any) -> None:
    if isinstance(r, int) and got != r:
        raise InvalidArtifactError(f"{module}: the adapter config gives rank {r} but the saved tensors have rank {got}")


def _adalora_ops(config: Mapping[str, Any], module: str, roles: Mapping[str, str], shapes: Mapping[str, Shape], shared: Mapping[str, str]) -> list[ModuleOp]:
    _need(module, roles, "A", "B", "E")
    a, b, e = shapes[roles["A"]], shapes[roles["B"]], shapes[roles["E"]]
    if len(a) != 2 or len(b) != 2 or a[0] != b[1] or e != (a[0], 1):
        raise InvalidArtifactError(f"{module}: lora_A {_shape_str(a)}, lora_E {_shape_str(e)} and lora_B {_shape_str(b)} do not fit")
    init_r = int(config.get("init_r", 12))
    alpha = config.get("lora_alpha", 8)
    # AdaLoraLayer.update_layer: scaling = alpha (not alpha/r); the delta is divided by ranknum.
    # ranknum is float(init_r) for every module: resize_modules_by_rank_pattern keeps the old value.
    scale = alpha if alpha > 0 else float(init_r)
    return [
        ModuleOp(
            "adalora",
            module,
            "weight",
            {"A": roles["A"], "B": roles["B"], "E": roles["E"]},
            scale,
            expected=(b[0], a[1]),
            options={"ranknum": float(init_r)},
        )
    ]


def _ia3_ops(config: Mapping[str, Any], module: str, roles: Mapping[str, str], shapes: Mapping[str, Shape], shared: Mapping[str, str]) -> list[ModuleOp]:
    l_shape = shapes[roles["l"]]
    if len(l_shape) != 2:
        raise InvalidArtifactError(f"not supported yet: {module} has a {len(l_shape)}-d ia3_l (convolution layers)")
    ff = config.get("feedforward_modules") or []
    # IA3Model._check_target_module_feedforward
    if isinstance(ff, str):
        is_ff = bool(re.fullmatch(ff, module))
    else:
        is_ff = any(module.endswith(t) for t in ff)
    if is_ff and l_shape[0] != 1 or not is_ff and l_shape[1] != 1:
        raise InvalidArtifactError(
            f"{module}: ia3_l {_shape_str(l_shape)} does not fit a {'feed-forward' if is_ff else 'non-feed-forward'} module"
        )
    ops = [ModuleOp("ia3", module, "weight", {"l": roles["l"]}, options={"feedforward": is_ff, "l_shape": l_shape})]
    if not is_ff:
        ops.append(ModuleOp("ia3_bias", module, "bias", {"l": roles["l"]}, expected=(l_shape[0],), options={"optional": True}))
    return ops


def _loha_ops(config: Mapping[str, Any], module: str, roles: Mapping[str, str], shapes: Mapping[str, Shape], shared: Mapping[str, str]) -> list[ModuleOp]:
    if "t1" in roles or "t2" in roles:
        raise InvalidArtifactError(f"not supported yet: {module} is a LoHa convolution (hada_t1/hada_t2)")
    _need(module, roles, "w1a", "w1b", "w2a", "w2b")
    r, alpha = _rank_alpha(config, module, config.get("r", 8), config.get("alpha", 8))
    w1a, w1b = shapes[roles["w1a"]], shapes[roles["w1b"]]
    if len(w1a) != 2 or len(w1b) != 2:
        raise InvalidArtifactError(f"not supported yet: {module} is a LoHa convolution")
    return [
        ModuleOp("loha", module, "weight", dict(roles), alpha / r, expected=(w1a[0], w1b[1]))  # LoHaLayer.update_layer
    ]


def _lokr_ops(config: Mapping[str, Any], module: str, roles: Mapping[str, str], shapes: Mapping[str, Shape], shared: Mapping[str, str]) -> list[ModuleOp]:
    if "t2" in roles:
        raise InvalidArtifactError(f"not supported yet: {module} is a LoKr convolution (lokr_t2)")
    r, alpha = _rank_alpha(config, module, config.get("r", 8), config.get("alpha", 8))

    def factor(full: str, a: str, b: str) -> Shape:
        if full in roles:
            s = shapes[roles[full]]
            if len(s) != 2:
                raise InvalidArtifactError(f"not supported yet: {module} is a LoKr convolution")
            return s
        _need(module, roles, a, b)
        sa, sb = shapes[roles[a]], shapes[roles[b]]
        if len(sa) != 2 or len(sb) != 2:
            raise InvalidArtifactError(f"not supported yet: {module} is a LoKr convolution")
        return (sa[0], sb[1])

    s1, s2 = factor("w1", "w1a", "w1b"), factor("w2", "w2a", "w2b")
    return [ModuleOp("lokr", module, "weight", dict(roles), alpha / r, expected=(s1[0] * s2[0], s1[1] * s2[1]))]


def _vera_ops(config: Mapping[str, Any], module: str, roles: Mapping[str, str], shapes: Mapping[str, Shape], shared: Mapping[str, str]) -> list[ModuleOp]:
    _need(module, roles, "lambda_b", "lambda_d")
    (out,) = shapes[roles["lambda_b"]]
    tensors = dict(roles)
    if "A" in shared and "B" in shared:
        tensors["vera_A"], tensors["vera_B"] = shared["A"], shared["B"]
    elif config.get("save_projection", True):
        raise InvalidArtifactError("VeRA adapter says save_projection but has no base_model.vera_A/vera_B")
    # in_features is known only from the base; resolve_plan fills it in.
    return [
        ModuleOp(
            "vera",
            module,
            "weight",
            tensors,
            expected=None,
            options={"out": out, "r": int(config.get("r", 256)), "prng_key": int(config.get("projection_prng_key", 0))},
        )
    ]


_BUILDERS: dict[str, Callable[..., list[ModuleOp]]] = {
    "LORA": _lora_ops,
    "ADALORA": _adalora_ops,
    "IA3": _ia3_ops,
    "LOHA": _loha_ops,
    "LOKR": _lokr_ops,
    "VERA": _vera_ops,
}

# --------------------------------------------------------------------------- resolve

# transformers' modules that store their weight [in, out] (Conv1D), by model_type.
# PEFT transposes the delta for these (fan_in_fan_out) whatever the config says:
# lora.layer.dispatch_default flips config.fan_in_fan_out per layer type, so the
# saved flag reflects only the last layer it saw.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "gpt2_ec"})
_NOT_CONV1D = re.compile(r"(^|\.)(lm_head|wte|wpe|score|classifier|qa_outputs)$")

INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared")
_EMBEDDING_NAMES = (*INPUT_EMBEDDINGS, "embeddings")
_HEAD_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_OUTPUT_NAMES = ("lm_head", "embed_out", "output")


def tied_aliases(base_shapes: Mapping[str, Shape], base_config: Mapping[str, Any]) -> dict[str, str]:
    """Names that a tied checkpoint leaves out, mapped to the tensor they share.

    transformers saves a tied ``lm_head.weight`` only once, under the input
    embedding's name. Returns e.g. ``{"lm_head.weight": "model.embed_tokens.weight"}``
    for a causal LM whose config ties them (``tie_word_embeddings``, which
    defaults to true) and whose checkpoint has no ``lm_head.weight``.
    """
    tie = base_config.get("tie_word_embeddings")
    if tie is None:
        text = base_config.get("text_config")
        tie = text.get("tie_word_embeddings") if isinstance(text, Mapping) else None
    if tie is None:
        tie = True  # PretrainedConfig's default
    archs = base_config.get("architectures") or []
    has_head = any(str(a).endswith(_HEAD_ARCHITECTURES) for a in archs)
    if not tie or not has_head or any(k == "lm_head.weight" or k.endswith(".lm_head.weight") for k in base_shapes):
        return {}
    embeds = [k for k in base_shapes if k.endswith(".weight") and k.rsplit(".", 2)[-2] in INPUT_EMBEDDINGS]
    if len(embeds) != 1:
        return {}
    return {"lm_head.weight": embeds[0]}


def _is_conv1d(module: str, weight_shape: Shape, expected: Shape | None, base_config: Mapping[str, Any]) -> bool:
    if len(weight_shape) != 2:
        return False
    if expected is not None and weight_shape != tuple(expected):
        # shapes decide unless the matrix is square
        return weight_shape == tuple(reversed(expected))
    return base_config.get("model_type") in CONV1D_MODEL_TYPES and not _NOT_CONV1D.search(module)


def _candidate_maps(module_paths: Sequence[str], keys: Iterable[str]) -> list[tuple[str, str]]:
    """(strip, add) prefix pairs that map some adapter path onto a base key."""
    keyset = set(keys)
    cands: dict[tuple[str, str], None] = {("", ""): None}
    for path in module_paths[:8]:
        for k in keyset:
            if k.endswith("." + path):
                cands.setdefault(("", k[: -len(path)]), None)
        parts = path.split(".")
        # keep at least the module's own name and the parameter: "q_proj.weight"
        for i in range(1, len(parts) - 1):
            strip = ".".join(parts[:i]) + "."
            rest = ".".join(parts[i:])
            if rest in keyset:
                cands.setdefault((strip, ""), None)
            for k in keyset:
                if k.endswith("." + rest) and k != rest:
                    cands.setdefault((strip, k[: -len(rest)]), None)
    return list(cands)


def apply_map(path: str, m: tuple[str, str]) -> str | None:
    """``path`` with the prefix ``m[0]`` taken off and ``m[1]`` put on (None if it lacks ``m[0]``)."""
    strip, add = m
    if strip:
        if not path.startswith(strip):
            return None
        path = path[len(strip) :]
    return add + path


def path_map(paths: Sequence[str], known: Collection[str]) -> tuple[str, str]:
    """The (strip, add) prefix pair that maps the most adapter ``paths`` onto ``known`` base keys.

    Checkpoints and adapters disagree on prefixes (``model.``, ``bert.``, a
    bare decoder against a causal LM, ...). Mapping nothing wins ties, and is
    the answer when every path is a base key as it stands.
    """
    if all(p in known for p in paths):
        return ("", "")
    cands = _candidate_maps(paths, known)
    return max(cands, key=lambda m: (sum(apply_map(p, m) in known for p in paths), m == ("", "")))


def resolve_plan(
    plan: AdapterPlan,
    base_shapes: Mapping[str, Sequence[int]],
    base_config: Mapping[str, Any] | None = None,
    *,
    conv1d: Callable[[str], bool] | None = None,
) -> MergePlan:
    """Bind the adapter's operations to the base checkpoint's tensors, checking every shape.

    ``base_shapes`` lists the base tensors in checkpoint order. ``conv1d``
    overrides the guess of which modules store ``[in, out]`` weights (by
    default: shapes, then ``CONV1D_MODEL_TYPES`` for square matrices).
    Raises ``InvalidArtifactError`` naming the first module that is missing
    from the base or whose shape does not fit, with both shapes.
    """
    base_config = dict(base_config or {})
    shapes: dict[str, Shape] = {k: tuple(int(d) for d in v) for k, v in base_shapes.items()}
    aliases = tied_aliases(shapes, base_config)
    known = dict(shapes)
    for alias, src in aliases.items():
        known[alias] = shapes[src]

    best = path_map([op.path for op in plan.ops], known)

    per_key: dict[str, list[ModuleOp]] = {}
    new_shapes: dict[str, Shape] = {}
    warnings: list[str] = []
    vocab: int | None = None
    for op in sorted(plan.ops, key=lambda o: o.kind != "replace"):  # replacements may resize
        key = apply_map(op.path, best)
        if key is None or key not in known:
            if op.options.get("optional"):
                continue  # e.g. the bias of an IA3 module that has none
            if op.kind == "lora_bias" and key is not None and key.removesuffix(".bias") + ".weight" in known:
                raise InvalidArtifactError(
                    f"{op.module}: the adapter trained a LoRA bias (lora_bias=True) but this layer of the base has no bias, "
                    "so it cannot be merged (PEFT refuses it too)"
                )
            looked = key or op.path
            if op.kind == "replace":
                raise InvalidArtifactError(
                    f"adapter tensor {op.tensors['value']} matches no tensor of the base model (looked for {looked})"
                )
            raise InvalidArtifactError(
                f"{op.module}: target module not found in the base model (looked for {looked}); "
                "is this the base the adapter was trained on?"
            )
        have = new_shapes.get(key) or new_shapes.get(aliases.get(key, "")) or known[key]
        op = bind_op(op, key, have, base_config, conv1d)
        if op.kind == "replace":
            want = tuple(op.options["shape"])
            if want != have:
                # A resized vocabulary (new tokens) changes only the first dimension of embeddings.
                if len(want) == 2 and len(have) == 2 and want[1] == have[1] and is_vocab_tensor(key, base_config, have):
                    new_shapes[key] = want
                    vocab = want[0]
                else:
                    raise InvalidArtifactError(
                        f"{op.module}: adapter has {op.param} {_shape_str(want)}, base has {_shape_str(have)}"
                    )
        per_key.setdefault(key, []).append(op)

    # Replacements first: later deltas apply on top of the replaced weight (PEFT loads
    # saved base_layer weights before merging).
    for key in per_key:
        per_key[key].sort(key=lambda o: o.kind != "replace")

    # Tied weights share one parameter in PEFT: a saved replacement (e.g. a resized
    # embedding saved as lm_head.base_layer.weight) is loaded into both sides. A delta
    # acts on one side only, as PEFT's forward does, so it unties them.
    untied: list[str] = []
    out_names = list(shapes)
    for alias, src in aliases.items():
        a_ops, s_ops = per_key.get(alias, []), per_key.get(src, [])
        a_rep = [o for o in a_ops if o.kind == "replace" and not o.options.get("own_copy")]
        s_rep = [o for o in s_ops if o.kind == "replace" and not o.options.get("own_copy")]
        if a_rep and not s_rep:
            s_ops = per_key[src] = a_rep + s_ops
            if alias in new_shapes:
                new_shapes[src] = new_shapes[alias]
        elif s_rep and not a_rep:
            a_ops = a_rep = s_rep + a_ops
            if src in new_shapes:
                new_shapes[alias] = new_shapes[src]
        if any(o.kind != "replace" or o.options.get("own_copy") for o in a_ops + s_ops):
            per_key[alias] = a_ops
            untied.append(alias)
            out_names.append(alias)
            warnings.append(f"tied embeddings were untied: {alias} is written separately from {src}")
        else:
            per_key.pop(alias, None)  # still tied: the replacement travels with {src}
            new_shapes.pop(alias, None)

    if vocab is not None:
        for key in out_names:
            if is_vocab_tensor(key, base_config, known[key]) and key not in new_shapes:
                if known[key][0] != vocab:
                    raise InvalidArtifactError(
                        f"{key}: the adapter resized the vocabulary to {vocab} but saved no resized {key} "
                        f"(base has {_shape_str(known[key])})"
                    )

    tensors = []
    for name in out_names:
        src = aliases.get(name, name)
        ops = tuple(per_key.get(name, ()))
        tensors.append(TensorPlan(name, src, new_shapes.get(name, known[name]), ops))
    return MergePlan(plan.method, tuple(tensors), tuple(untied), vocab, tuple(warnings))


def is_vocab_tensor(key: str, base_config: Mapping[str, Any], shape: Shape) -> bool:
    """Input or output token embeddings, by module name (their first dimension is the vocabulary)."""
    parts = key.split(".")
    return len(shape) == 2 and len(parts) >= 2 and (parts[-2] in INPUT_EMBEDDINGS or parts[-2] in _OUTPUT_NAMES)


def bind_op(op: ModuleOp, key: str, have: Shape, base_config: Mapping[str, Any], conv1d: Callable[[str], bool] | None) -> ModuleOp:
    """Check ``op`` against the base tensor ``key`` of shape ``have``; settle fan_in_fan_out."""
    from dataclasses import replace

    if op.kind == "replace":
        return op
    if op.param == "weight" and len(have) != 2:
        raise InvalidArtifactError(
            f"not supported yet: {op.module} has a {len(have)}-d weight {_shape_str(have)} (only linear and embedding layers are merged)"
        )
    if op.kind in ("lora_embedding", "dora_embedding"):
        if have != op.expected:
            raise InvalidArtifactError(f"{op.module}: adapter expects weight {_shape_str(op.expected)}, base has {_shape_str(have)}")
        return op
    if op.kind in ("lora_bias", "ia3_bias"):
        if have != op.expected:
            raise InvalidArtifactError(f"{op.module}: adapter expects bias {_shape_str(op.expected)}, base has {_shape_str(have)}")
        return op
    expected = op.expected
    if op.kind == "vera":
        out = op.options["out"]
        in_ = have[1] if have[0] == out else have[0]
        expected = (out, in_)
    elif op.kind == "ia3":
        expected = None
    fio = conv1d(op.module) if conv1d is not None else _is_conv1d(op.module, have, expected, base_config)
    if op.kind == "ia3":
        l_shape = op.options["l_shape"]
        # feed-forward: ia3_l is [1, in] (scales inputs); otherwise [out, 1] (scales outputs)
        n = l_shape[1] if op.options["feedforward"] else l_shape[0]
        side = (have[0] if fio else have[1]) if op.options["feedforward"] else (have[1] if fio else have[0])
        if n != side:
            what = "inputs" if op.options["feedforward"] else "outputs"
            raise InvalidArtifactError(
                f"{op.module}: adapter scales {n} {what} (ia3_l {_shape_str(l_shape)}), base weight is {_shape_str(have)}"
            )
        return replace(op, fan_in_fan_out=fio)
    assert expected is not None
    want = tuple(reversed(expected)) if fio else tuple(expected)
    if op.kind in ("loha", "lokr"):
        fio = False  # PEFT's LoHa/LoKr reshape the delta to the base shape; they have no Conv1D support
        if math.prod(expected) != math.prod(have):
            raise InvalidArtifactError(f"{op.module}: adapter expects weight {_shape_str(expected)}, base has {_shape_str(have)}")
        if op.kind == "loha" and tuple(expected) != have:
            raise InvalidArtifactError(f"{op.module}: adapter expects weight {_shape_str(expected)}, base has {_shape_str(have)}")
        return replace(op, fan_in_fan_out=False, expected=have)
    if have != want:
        raise InvalidArtifactError(f"{op.module}: adapter expects weight {_shape_str(want)}, base has {_shape_str(have)}")
    if op.kind == "vera":
        return replace(op, fan_in_fan_out=fio, expected=expected, options={**op.options, "in": expected[1]})
    return replace(op, fan_in_fan_out=fio)


def check_vera_projections(plan: MergePlan, shapes: Mapping[str, Sequence[int]]) -> None:
    """VeRA's shared vera_A/vera_B must be at least as large as every adapted module."""
    for t in plan.tensors:
        for op in t.ops:
            if op.kind == "vera" and "vera_A" in op.tensors:
                a, b = tuple(shapes[op.tensors["vera_A"]]), tuple(shapes[op.tensors["vera_B"]])
                if a[1] < op.options["in"] or b[0] < op.options["out"]:
                    raise InvalidArtifactError(
                        f"{op.module}: VeRA projections vera_A {_shape_str(a)} / vera_B {_shape_str(b)} are smaller than "
                        f"the module ({op.options['out']} x {op.options['in']})"
                    )


# --------------------------------------------------------------------------- apply

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


#: Bytes of float32 rows per block in ``merge_into``'s blocked path: two such
#: buffers (the rows of the weight and of the LoRA product) stay in a 1-2 MiB
#: L2 cache. Measured on the 2-core VM (one thread, bf16 weights, r=16), the
#: blocked path took 0.17x the time of whole-tensor ops for 2048x5632 and
#: 4096x14336 weights: whole-tensor float32 temporaries go to memory and back
#: five times per element.
BLOCK_BYTES = 512 * 1024
#: Block heights are multiples of this: BLAS kernels work on panels of rows,
#: and a block boundary inside a panel can change the order of a product's sums.
BLOCK_ALIGN = 32

_BLOCKABLE = frozenset({"lora", "ia3"})
# signature -> whether the blocked path gave the same bytes as whole-tensor ops
_blocked_ok: dict[tuple[Any, ...], bool] = {}


def _block_signature(
    weight: torch.Tensor, out: torch.Tensor, ops: Sequence[ModuleOp], shape_of: Callable[[str], Sequence[int]],
    device: str | torch.device,
) -> tuple[Any, ...] | None:
    """What decides how BLAS computes a blocked merge of ``ops``, or None if it cannot run block-wise."""
    import torch

    on_cpu = torch.device(device).type == weight.device.type == out.device.type == "cpu"
    if not on_cpu or weight.dim() != 2 or not out.is_floating_point():
        return None  # on a GPU, memory bandwidth is not what limits the merge
    n_out, n_in = weight.shape
    rows = max(BLOCK_ALIGN, BLOCK_BYTES // (4 * max(n_in, 1)) // BLOCK_ALIGN * BLOCK_ALIGN)
    if rows >= n_out:
        return None  # one block: the whole-tensor path is the same work
    sig: list[Any] = [n_out, n_in, rows, str(weight.dtype), str(out.dtype)]
    for op in ops:
        if op.kind not in _BLOCKABLE:
            return None
        if op.kind == "lora":
            if op.fan_in_fan_out:
                return None
            sig.append(("lora", tuple(shape_of(op.tensors["A"])), tuple(shape_of(op.tensors["B"]))))
        else:
            l_shape = tuple(shape_of(op.tensors["l"]))
            if len(l_shape) != 2:
                return None
            l_shape = l_shape[::-1] if op.fan_in_fan_out else l_shape
            if l_shape not in ((n_out, 1), (1, n_in)):
                return None
            sig.append(("ia3", l_shape))
    return tuple(sig)


def _merge_blocked(
    weight: torch.Tensor, ops: Sequence[ModuleOp], t: Callable[[str], torch.Tensor], out: torch.Tensor, ws: Any, rows: int
) -> bool:
    """``ops`` applied block by block of rows, each block's float32 temporaries kept in cache.

    Per element, the same float32 operations in the same order as
    ``apply_ops``: (B @ A) * scale added to the float32 weight, IA3 vectors
    multiplied in, then one cast to ``out``'s dtype. Returns whether every
    output value is finite.
    """
    import torch

    n_out, n_in = weight.shape
    steps: list[tuple[str, torch.Tensor, torch.Tensor | None, float]] = []
    for op in ops:
        if op.kind == "lora":
            steps.append(("lora", t(op.tensors["A"]), t(op.tensors["B"]), op.scale))
        else:
            steps.append(("ia3", _T(t(op.tensors["l"]), op.fan_in_fan_out), None, 1.0))
    wbuf = ws.tensor("block_w", (rows, n_in), torch.float32)
    pbuf = ws.tensor("block_p", (rows, n_in), torch.float32)
    finite = True
    for i in range(0, n_out, rows):
        j = min(i + rows, n_out)
        w = wbuf[: j - i]
        w.copy_(weight[i:j])
        for kind, x, y, scale in steps:
            if kind == "lora":
                assert y is not None
                p = pbuf[: j - i]
                torch.matmul(y[i:j], x, out=p)
                p.mul_(scale)
                w.add_(p)
            else:
                w.mul_(x[i:j] if x.shape[0] == n_out else x)
        o = out[i:j]
        o.copy_(w)
        finite = finite and all_finite(o)
    return finite


def merge_into(
    out: torch.Tensor,
    weight: torch.Tensor,
    ops: Sequence[ModuleOp],
    get: TensorGetter,
    device: str | torch.device,
    *,
    ws: Any,
    extra: Mapping[str, torch.Tensor] | None = None,
    shape_of: Callable[[str], Sequence[int]] | None = None,
) -> bool:
    """Write ``apply_ops(weight, ops, ...)`` cast to ``out.dtype`` into ``out``; return whether it is all finite.

    On the CPU, LoRA and IA3 ops on a matrix taller than one block run block
    by block (``_merge_blocked``), which touches memory about a sixth as
    often. Whether a product computed in row blocks has the same bits as the
    whole product depends on the BLAS kernels, so the first tensor of every
    signature (shapes, dtypes, ops) is computed both ways and compared
    bytewise: a signature whose blocks differ is computed whole from then on.
    """
    import torch

    sig = _block_signature(weight, out, ops, shape_of, device) if shape_of is not None and not extra else None
    if sig is not None and _blocked_ok.get(sig) is not False:

        def t(key: str) -> torch.Tensor:
            return get(key).to(device=device, dtype=torch.float32)

        finite = _merge_blocked(weight, ops, t, out, ws, sig[2])
        if sig in _blocked_ok or not finite:
            return finite
        ref = apply_ops(weight, ops, get, device, extra=extra, ws=ws, check=False)
        # Compared a block at a time: a whole-tensor copy in out's dtype would
        # be one more tensor-sized buffer at peak.
        rows = sig[2]
        cmp = ws.tensor("block_cmp", (rows, out.shape[1]), out.dtype)
        same = True
        for i in range(0, out.shape[0], rows):
            c = cmp[: min(rows, out.shape[0] - i)]
            c.copy_(ref[i : i + rows])
            if not torch.equal(c, out[i : i + rows]):
                same = False
                break
        _blocked_ok[sig] = same
        if not same:
            out.copy_(ref)
        # The whole-tensor buffers served this one check: a signature that
        # passed never uses them again (two float32 tensors of RSS otherwise).
        ws.release("w", "delta", "block_cmp")
        return True if same else all_finite(out)
    out.copy_(apply_ops(weight, ops, get, device, extra=extra, ws=ws, check=False))
    return all_finite(out)


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


# --------------------------------------------------------------------------- QLoRA


@dataclass(frozen=True)
class QuantSpec:
    """How the base was quantized while the adapter trained (bitsandbytes 4-bit)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    source: str = "default"  # where these settings came from

    def to_dict(self) -> dict[str, Any]:
        return {"quant_type": self.quant_type, "blocksize": self.blocksize, "double_quant": self.double_quant, "source": self.source}


def detect_qlora(config: Mapping[str, Any], card: str | None) -> QuantSpec | None:
    """Find whether an adapter was trained on a 4-bit base, where its files say so.

    PEFT < 0.7 wrote the bitsandbytes config into the adapter's README.md;
    PEFT 0.21 records nothing, so ``None`` means "not known", not "not QLoRA".
    """
    qc = config.get("quantization_config")
    if isinstance(qc, Mapping) and qc.get("load_in_4bit"):
        return QuantSpec(
            str(qc.get("bnb_4bit_quant_type", "nf4")), 64, bool(qc.get("bnb_4bit_use_double_quant", False)), "adapter_config.json"
        )
    if not card:
        return None

    def field_(name: str) -> str | None:
        m = re.search(rf"^\s*-\s*{name}:\s*(\S+)\s*$", card, re.MULTILINE)
        return m.group(1) if m else None

    if (field_("load_in_4bit") or "").lower() != "true":
        return None
    return QuantSpec(
        (field_("bnb_4bit_quant_type") or "nf4").lower(),
        64,
        (field_("bnb_4bit_use_double_quant") or "false").lower() == "true",
        "adapter model card",
    )


def quantize_roundtrip(weight: torch.Tensor, spec: QuantSpec | None = None, device: str | torch.device | None = None) -> torch.Tensor:
    """``dequant(quant(W))`` with bitsandbytes, as transformers quantizes a base for QLoRA.

    Same call as ``bitsandbytes.nn.Params4bit._quantize`` (blocksize 64,
    ``compress_statistics`` = double quantization), in ``weight``'s dtype.
    """
    import bitsandbytes.functional as bnbf

    spec = spec or QuantSpec()
    w = weight.contiguous()
    if device is not None:
        w = w.to(device)
    q, state = bnbf.quantize_4bit(w, blocksize=spec.blocksize, compress_statistics=spec.double_quant, quant_type=spec.quant_type)
    return bnbf.dequantize_4bit(q, state)
