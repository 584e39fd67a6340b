"""PEFT adapters: ``adapter_config.json`` beside ``adapter_model.safetensors``
(or a legacy pickled ``adapter_model.bin``, listed but never unpickled), every
``peft_type``.

``rank`` is the largest rank in the tensors (the config's ``r`` and
``rank_pattern`` when there are none); a disagreement is a warning. For
AdaLoRA the tensors hold ``init_r`` and ``details["effective_ranks"]`` the ranks
left after pruning. ``rank_pattern`` keys are matched as PEFT matches them, in
bounded time (:mod:`adapterhub.inspect.patterns`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapterhub.artifact import Inspection
from adapterhub.errors import InvalidArtifactError
from adapterhub.inspect.files import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    FileTree,
    compact,
    dtype_names,
    header,
    int_or_none,
    load_json,
    num,
    sorted_if_list,
)
from adapterhub.inspect.patterns import find_pattern_key, prefetch
from adapterhub.inspect.peft_config import config_problems
from adapterhub.inspect.peft_shapes import ModuleInfo, fill_module_shapes, module_table
from adapterhub.inspect.safetensors import TensorInfo

_RANKED = ("LORA", "ADALORA", "LOHA", "LOKR", "VERA")


def _expected_rank(peft_type: str, config: Mapping[str, Any], module: str) -> int | None:
    if peft_type == "ADALORA":
        return int_or_none(config.get("init_r"))
    patterns = config.get("rank_pattern") or {}
    if isinstance(patterns, dict) and patterns:
        key = find_pattern_key(patterns, module, "adapter_config.json: rank_pattern")
        if key is not None and int_or_none(patterns[key]) is not None:
            return patterns[key]
    return int_or_none(config.get("r"))


def _rank_warnings(
    peft_type: str, config: Mapping[str, Any], module_ranks: Mapping[str, int], weights_name: str
) -> list[str]:
    if peft_type not in _RANKED:
        return []
    patterns = config.get("rank_pattern")
    try:
        if isinstance(patterns, dict) and patterns and peft_type != "ADALORA":
            prefetch(patterns, list(module_ranks), "adapter_config.json: rank_pattern")
        groups: dict[tuple[int, int], list[str]] = {}
        for module, actual in module_ranks.items():
            want = _expected_rank(peft_type, config, module)
            if want is not None and want != actual:
                groups.setdefault((want, actual), []).append(module)
    except InvalidArtifactError as e:  # an invalid or runaway regex: describe the adapter all the same
        return [f"{e}; the tensors' ranks were not compared with the config"]
    key = "init_r" if peft_type == "ADALORA" else "r"
    out = []
    for (want, actual), mods in sorted(groups.items()):
        more = f" and {len(mods) - 1} more" if len(mods) > 1 else ""
        out.append(
            f"rank mismatch: adapter_config.json gives {key}={want} (after rank_pattern) for {mods[0]}{more}, "
            f"but {weights_name} holds rank {actual}"
        )
    return out


_PROMPT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")
_PROMPT_KEYS = (
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "encoder_hidden_size",
    "encoder_num_layers",
    "encoder_reparameterization_type",
    "prefix_projection",
    "prompt_tuning_init",
    "tokenizer_name_or_path",
)
# Config fields shown at the top of details (DESIGN.md §3); the whole non-empty
# config is kept under details["peft_config"] too.
_PEFT_KEYS = (
    "r",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
    "bias",
    "init_lora_weights",
    "init_weights",
    "feedforward_modules",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "init_r",
    "target_r",
    "total_step",
    "decompose_both",
    "decompose_factor",
    "use_effective_conv2d",
    "oft_block_size",
    "block_share",
    "coft",
    "boft_block_size",
    "boft_block_num",
    "boft_n_butterfly_factor",
    "projection_prng_key",
    "save_projection",
    "d_initial",
    "adapter_len",
    "adapter_layers",
    "peft_version",
)



def _config_details(config: Mapping[str, Any], peft_type: str) -> dict[str, Any]:
    details: dict[str, Any] = {"peft_type": peft_type}
    for k in _PEFT_KEYS:
        v = config.get(k)
        if v is not None and v != {} and v != []:
            details[k] = sorted_if_list(v)
    if peft_type in _PROMPT_TYPES:
        details.update(compact({k: config.get(k) for k in _PROMPT_KEYS}))
    details["peft_config"] = compact(config)
    return details


def _read_weights(
    tree: FileTree, prefix: str, cfg_name: str, details: dict[str, Any], warnings: list[str]
) -> tuple[str, dict[str, TensorInfo]]:
    weights = next((w for w in PEFT_WEIGHTS if w in tree.files), None)
    if weights is None:
        raise InvalidArtifactError(
            f"{cfg_name}: PEFT adapter without weights (no adapter_model.safetensors or adapter_model.bin beside it)"
        )
    details["weights_file"] = prefix + weights
    if weights.endswith(".safetensors"):
        if "adapter_model.bin" in tree.files:
            warnings.append(
                f"{prefix}adapter_model.bin is stored beside {prefix}adapter_model.safetensors; PEFT loads the safetensors file"
            )
        return weights, header(tree, weights, prefix + weights).tensors
    details["weights_format"] = "pickle"
    warnings.append(
        f"{prefix}adapter_model.bin is a pickle and was not read: only the config is known (rank, alpha, "
        "targets), not shapes, dtypes or the parameter count; convert it to safetensors"
    )
    return weights, {}


def _rank(
    peft_type: str, config: Mapping[str, Any], module_ranks: dict[str, int], weights: str, warnings: list[str]
) -> int | None:
    if module_ranks:
        warnings.extend(_rank_warnings(peft_type, config, module_ranks, weights))
        return max(module_ranks.values())
    if peft_type == "ADALORA":
        return int_or_none(config.get("init_r"))
    r = int_or_none(config.get("r"))
    if peft_type in ("OFT", "BOFT") or r is None:
        return None
    rp = config.get("rank_pattern")
    if isinstance(rp, dict) and rp and all(int_or_none(v) is not None for v in rp.values()):
        return max([r, *rp.values()])
    return r


def _text(config: Mapping[str, Any], key: str, cfg_name: str, warnings: list[str]) -> str | None:
    """A string field of the config; anything else is reported and left out."""
    v = config.get(key)
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        warnings.append(f"{cfg_name}: {key} should be a string, found {type(v).__name__}; ignored")
        return None
    return v


def _fingerprint(peft_type: str, config: Mapping[str, Any], modules: Mapping[str, ModuleInfo], base_model: str | None) -> dict[str, Any]:
    expect_modules = {
        m: ([info.inp, info.out] if config.get("fan_in_fan_out") else [info.out, info.inp])
        for m, info in sorted(modules.items())
        if info.out is not None or info.inp is not None
    }
    fingerprint: dict[str, Any] = {"modules": expect_modules, "base_model": base_model}
    if peft_type in _PROMPT_TYPES:
        if int_or_none(config.get("token_dim")) is not None and peft_type != "PREFIX_TUNING":
            fingerprint["hidden_size"] = config["token_dim"]
        if int_or_none(config.get("num_layers")) is not None:
            fingerprint["num_hidden_layers"] = config["num_layers"]
    return fingerprint


def inspect_peft(tree: FileTree, prefix: str = "") -> Inspection:
    """A PEFT adapter whose files are ``tree`` (paths shown with ``prefix``)."""
    cfg_name = prefix + PEFT_CONFIG
    config = load_json(tree, PEFT_CONFIG, cfg_name)
    peft_type = str(config.get("peft_type") or "").upper()
    warnings: list[str] = [f"{cfg_name}: {p}" for p in config_problems(config)]
    details = _config_details(config, peft_type)
    weights, tensors = _read_weights(tree, prefix, cfg_name, details, warnings)

    modules, shared, other, key_names = module_table(tensors, peft_type)
    if key_names:
        warnings.append(
            f"{prefix + weights} keeps the adapter name ({', '.join(sorted(key_names))}) in its tensor names; "
            "PEFT's save_pretrained strips it and load_adapter may not find these weights"
        )
    fill_module_shapes(modules, config)
    module_ranks = {m: info.rank for m, info in sorted(modules.items()) if info.rank is not None}

    method = peft_type or None
    if peft_type == "LORA" and config.get("use_dora"):
        method = "DORA"
    if (
        peft_type == "LORA"
        and tensors
        and any("lora_magnitude_vector" in p for info in modules.values() for p in info.params)
        and not config.get("use_dora")
    ):
        warnings.append(f"{prefix + weights} has DoRA magnitude vectors but {cfg_name} does not set use_dora")

    rank = _rank(peft_type, config, module_ranks, prefix + weights, warnings)
    if module_ranks:
        details["module_ranks"] = module_ranks
    if peft_type == "ADALORA" and isinstance(config.get("rank_pattern"), dict):
        details["effective_ranks"] = {
            k: sum(bool(x) for x in v) for k, v in config["rank_pattern"].items() if isinstance(v, list)
        }
    if peft_type == "VERA" and shared:
        details["shared_tensors"] = {k: list(t.shape) for k, t in sorted(shared.items())}
    if other:
        details["full_weights"] = {k: list(t.shape) for k, t in sorted(other.items())}

    alpha = num(config.get("lora_alpha")) if peft_type in ("LORA", "ADALORA") else num(config.get("alpha"))
    base_model = _text(config, "base_model_name_or_path", cfg_name, warnings)
    return Inspection(
        kind="adapter",
        format="peft",
        method=method,
        base_model=base_model,
        base_revision=_text(config, "revision", cfg_name, warnings),
        rank=rank,
        alpha=alpha,
        task_type=_text(config, "task_type", cfg_name, warnings),
        dtypes=dtype_names(tensors.values()),
        # A pickle is never unpickled here: its parameter count is unknown, not 0.
        params=None if details.get("weights_format") == "pickle" else sum(t.numel for t in tensors.values()),
        details=details,
        fingerprint=_fingerprint(peft_type, config, modules, base_model),
        warnings=warnings,
    )
