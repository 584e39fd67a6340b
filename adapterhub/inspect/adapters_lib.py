"""Adapters of the ``adapters`` library (the AdapterHub research library):
``adapter_config.json`` with a nested ``config`` beside ``adapter.safetensors``
or ``pytorch_adapter.bin``, and an optional prediction head.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from adapterhub.artifact import Inspection
from adapterhub.errors import InvalidArtifactError
from adapterhub.inspect.files import (
    AH_HEAD_CONFIG,
    AH_HEAD_WEIGHTS,
    AH_WEIGHTS,
    PEFT_CONFIG,
    FileTree,
    compact,
    dtype_names,
    header,
    int_or_none,
    load_json,
    num,
)
from adapterhub.inspect.safetensors import TensorInfo

_LORA_KEY = re.compile(r"^(?P<mod>.+)\.loras\.[^.]+\.lora_(?P<ab>[AB])$")

_AH_KEYS = (
    "reduction_factor",
    "non_linearity",
    "mh_adapter",
    "output_adapter",
    "is_parallel",
    "scaling",
    "use_gating",
    "original_ln_before",
    "original_ln_after",
    "ln_before",
    "ln_after",
    "residual_before_ln",
    "leave_out",
    "phm_layer",
    "phm_dim",
    "inv_adapter",
    "inv_adapter_reduction_factor",
    "cross_adapter",
    "dropout",
    "r",
    "alpha",
    "selfattn_lora",
    "intermediate_lora",
    "output_lora",
    "attn_matrices",
    "composition_mode",
    "prefix_length",
    "bottleneck_size",
    "flat",
    "prompt_length",
    "layers",
)
_AH_BOTTLENECK_NAMES = {
    "pfeiffer",
    "houlsby",
    "parallel",
    "scaled_parallel",
    "pfeiffer+inv",
    "houlsby+inv",
    "seq_bn",
    "double_seq_bn",
    "par_bn",
    "scaled_par_bn",
    "seq_bn_inv",
    "double_seq_bn_inv",
    "compacter++",
    "compacter",
}


def _config(full: Mapping[str, Any], cfg_name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(architecture, the adapter config, details) of an adapters-library config."""
    conf = full.get("config")
    details: dict[str, Any] = compact(
        {
            "adapter_name": full.get("name"),
            "model_class": full.get("model_class"),
            "model_type": full.get("model_type"),
            "hidden_size": full.get("hidden_size"),
            "library_version": full.get("version"),
        }
    )
    if isinstance(conf, str):
        architecture = "bottleneck" if conf.lower() in _AH_BOTTLENECK_NAMES else conf
        details["config_name"] = conf
        conf = {}
    elif isinstance(conf, dict):
        architecture = conf.get("architecture") or "bottleneck"
    else:
        raise InvalidArtifactError(f"{cfg_name}: the adapters-library config has no 'config' object")
    architecture = str(architecture)
    details["architecture"] = architecture
    details.update(compact({k: conf.get(k) for k in _AH_KEYS}))
    details["adapter_config"] = compact(conf)
    return architecture, conf, details


def _weights(
    tree: FileTree, prefix: str, cfg_name: str, details: dict[str, Any], warnings: list[str]
) -> tuple[str, dict[str, TensorInfo], dict[str, TensorInfo]]:
    """(weights file, adapter tensors, head tensors)."""
    weights = next((w for w in AH_WEIGHTS if w in tree.files), None)
    if weights is None:
        raise InvalidArtifactError(
            f"{cfg_name}: adapters-library adapter without weights (no adapter.safetensors or pytorch_adapter.bin)"
        )
    details["weights_file"] = prefix + weights
    tensors: dict[str, TensorInfo] = {}
    if weights.endswith(".safetensors"):
        tensors = dict(header(tree, weights, prefix + weights).tensors)
    else:
        details["weights_format"] = "pickle"
        warnings.append(
            f"{prefix}{weights} is a pickle and was not read: shapes, dtypes and the parameter count are unknown"
        )
    if AH_HEAD_CONFIG in tree.files:
        head = load_json(tree, AH_HEAD_CONFIG, prefix + AH_HEAD_CONFIG)
        head_conf = head.get("config") if isinstance(head.get("config"), dict) else {}
        details["head"] = compact({k: head.get(k) for k in ("name", "model_class", "model_type")}) | compact(
            {k: head_conf.get(k) for k in ("head_type", "num_labels", "layers", "activation_function")}
        )
    head_weights = next((w for w in AH_HEAD_WEIGHTS if w in tree.files and w.endswith(".safetensors")), None)
    head_tensors = header(tree, head_weights, prefix + head_weights).tensors if head_weights else {}
    return weights, tensors, head_tensors


def _lora_modules(tensors: Mapping[str, TensorInfo]) -> tuple[dict[str, list[int | None]], dict[str, int]]:
    """LoRA modules of the library: ``<module>.loras.<name>.lora_A`` is ``[r, in]``, ``lora_B`` ``[out, r]``."""
    modules: dict[str, list[int | None]] = {}
    ranks: dict[str, int] = {}
    for k, t in tensors.items():
        m = _LORA_KEY.match(k)
        if m and len(t.shape) == 2:
            shape = modules.setdefault(m["mod"], [None, None])
            if m["ab"] == "A":
                shape[1] = t.shape[1]
                ranks[m["mod"]] = t.shape[0]
            else:
                shape[0] = t.shape[0]
    return modules, ranks


def inspect_adapters_lib(tree: FileTree, prefix: str = "") -> Inspection:
    cfg_name = prefix + PEFT_CONFIG
    full = load_json(tree, PEFT_CONFIG, cfg_name)
    architecture, conf, details = _config(full, cfg_name)
    warnings: list[str] = []
    weights, tensors, head_tensors = _weights(tree, prefix, cfg_name, details, warnings)

    # Bottleneck: ...adapters.<name>.adapter_down.<i>.weight is [bottleneck, hidden].
    sizes = sorted(
        {
            t.shape[0]
            for k, t in tensors.items()
            if ".adapter_down." in k and k.endswith(".weight") and len(t.shape) == 2
        }
    )
    if sizes:
        details["bottleneck_sizes"] = sizes
    modules, ranks = _lora_modules(tensors)
    method = "BOTTLENECK" if architecture.lower() == "bottleneck" else architecture.upper()
    want = int_or_none(conf.get("r"))
    rank = max(ranks.values()) if ranks else want
    if ranks:
        details["module_ranks"] = dict(sorted(ranks.items()))
        bad = sorted(m for m, r in ranks.items() if want is not None and r != want)
        if bad:
            warnings.append(
                f"rank mismatch: {cfg_name} gives r={want} but {prefix + weights} holds rank {ranks[bad[0]]} for {bad[0]}"
            )
    alpha = num(conf.get("alpha")) if architecture.lower() == "lora" else None
    base_model = full.get("model_name") if isinstance(full.get("model_name"), str) else None
    fingerprint: dict[str, Any] = {"modules": dict(sorted(modules.items())), "base_model": base_model or None}
    if int_or_none(full.get("hidden_size")) is not None:
        fingerprint["hidden_size"] = full["hidden_size"]
    all_tensors = list(tensors.values()) + list(head_tensors.values())
    return Inspection(
        kind="adapter",
        format="adapters",
        method=method,
        base_model=base_model or None,
        rank=rank,
        alpha=alpha,
        dtypes=dtype_names(all_tensors),
        params=sum(t.numel for t in all_tensors),
        details=details,
        fingerprint=fingerprint,
        warnings=warnings,
    )


def is_adapters_lib(config: Mapping[str, Any], tree: FileTree) -> bool:
    if "peft_type" in config:
        return False
    return "config" in config and (
        any(w in tree.files for w in AH_WEIGHTS)
        or "model_name" in config
        or str(config.get("version", "")).startswith("adapters.")
    )
