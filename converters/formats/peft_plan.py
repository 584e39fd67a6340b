"""PEFT adapters as plans: which method, which modules, which operations (names and shapes only).

``parse_adapter(config, shapes)`` reads ``adapter_config.json`` and the
adapter's tensor names and shapes into an ``AdapterPlan``: one ``ModuleOp``
per adapted module (keyed by PEFT's module path, ``base_model.model.``
stripped) plus whole-tensor replacements (``modules_to_save``, saved
embeddings, trained biases). ``check_mergeable`` refuses, with the reason,
the methods and options that have no weight delta to fold in.

PEFT 0.21.2 is the reference; each rule names the PEFT code it mirrors.
Binding a plan to a base checkpoint is ``peft_resolve``; the arithmetic is
``peft_deltas`` (and ``peft_blocked`` on the CPU).

>>> plan = parse_adapter(cfg, {k: src.spec(k).shape for k in src.keys()})  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapterhub.errors import InvalidArtifactError
from adapterhub.inspect.peft_config import validate_config

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
    """Mirror of ``peft.utils.other.get_pattern_key``: the first pattern that matches the end of the module path.

    The keys come from the adapter: they are matched in bounded time (``(a+)+b`` does not hang),
    and an invalid one is an InvalidArtifactError.
    """
    from adapterhub.inspect.patterns import get_pattern_key as bounded

    return bounded(pattern_keys, key_to_match, "adapter_config.json: rank_pattern/alpha_pattern")


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
    validate_config(config)  # r, alpha, patterns and module lists: the maths below trusts their types
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
        from adapterhub.inspect.patterns import fullmatch

        is_ff = fullmatch(ff, module, "adapter_config.json: feedforward_modules")
    else:
        is_ff = isinstance(ff, (list, tuple)) and any(isinstance(t, str) and module.endswith(t) for t in ff)
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
