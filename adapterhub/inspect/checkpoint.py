"""Hugging Face checkpoints: ``config.json`` with ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``; merged models (model card
``base_model_relation: merged``); bitsandbytes, GPTQ, AWQ and other quantized
checkpoints; and loose ``*.safetensors`` without a config.

``params`` counts logical weights: the original shape of packed 4-bit weights,
without the quantization statistics (absmax, quant_map, SCB, ...).
"""

from __future__ import annotations

import math
from typing import Any

from adapterhub.artifact import Inspection
from adapterhub.errors import InvalidArtifactError, UnsafePathError
from adapterhub.inspect.bnb import CheckpointWeights, bnb_layout, quant_from_config
from adapterhub.inspect.files import HF_CONFIG, HF_INDEX, FileTree, compact, dtype_names, header, is_pickle, load_json
from adapterhub.inspect.fingerprint import checkpoint_fingerprint
from adapterhub.manifest import check_relpath
from adapterhub.modelcard import ModelCard

__all__ = ["CheckpointWeights", "inspect_checkpoint", "read_checkpoint_weights"]

_CONFIG_HIGHLIGHTS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "torch_dtype",
    "dtype",
    "tie_word_embeddings",
    "rope_theta",
    "n_embd",
    "n_layer",
    "n_head",
    "d_model",
    "num_layers",
    "transformers_version",
)
_CARD_KEYS = ("base_model", "base_model_relation", "library_name", "license", "pipeline_tag", "tags", "datasets", "language")


def card_details(card: ModelCard) -> dict[str, Any]:
    """The model-card fields shown and indexed."""
    return compact({k: card.meta.get(k) for k in _CARD_KEYS})


# --------------------------------------------------------------------------- weights


def _index_shards(tree: FileTree, index: dict[str, Any]) -> dict[str, list[str]]:
    """shard file -> the tensors ``model.safetensors.index.json`` puts there (validated)."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidArtifactError(f"{HF_INDEX}: no weight_map")
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InvalidArtifactError(f"{HF_INDEX}: weight_map entry for {key!r} is not a file name")
        try:
            check_relpath(shard)
        except UnsafePathError as e:
            raise UnsafePathError(f"{HF_INDEX}: weight_map entry for {key!r}: {e}") from None
        shards.setdefault(shard, []).append(key)
    for shard in shards:
        if shard not in tree.files:
            raise InvalidArtifactError(f"{HF_INDEX}: shard {shard} is missing (it holds {len(shards[shard])} tensors)")
    return shards


def _indexed(tree: FileTree, details: dict[str, Any], warnings: list[str]) -> list[Any]:
    index = load_json(tree, HF_INDEX)
    shards = _index_shards(tree, index)
    weight_map = index["weight_map"]
    headers = [header(tree, s) for s in sorted(shards)]
    for h in headers:
        missing = [k for k in shards[h.name] if k not in h.tensors]
        if missing:
            raise InvalidArtifactError(
                f"{HF_INDEX}: tensor {missing[0]!r} is indexed in {h.name} but that shard does not hold it"
                + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
            )
        extra = [k for k in h.tensors if weight_map.get(k) != h.name]
        if extra:
            warnings.append(f"{h.name} holds {len(extra)} tensors that {HF_INDEX} does not list (e.g. {extra[0]})")
    stray = sorted(r for r in tree.files if r.endswith(".safetensors") and r not in shards and "/" not in r)
    if stray:
        warnings.append(f"safetensors files not named in {HF_INDEX}: {', '.join(stray)}")
    details["shards"] = len(headers)
    meta = index.get("metadata")
    for k in ("total_size", "total_parameters"):
        if isinstance(meta, dict) and meta.get(k) is not None:
            details[f"index_{k}"] = meta[k]
    return headers


def read_checkpoint_weights(tree: FileTree, rels: list[str] | None = None) -> CheckpointWeights:
    """Every tensor header of a checkpoint: the shards of its index, or ``rels``, or its top-level safetensors."""
    details: dict[str, Any] = {}
    warnings: list[str] = []
    if rels is None and HF_INDEX in tree.files:
        headers = _indexed(tree, details, warnings)
    else:
        if rels is None:
            rels = sorted(r for r in tree.files if r.endswith(".safetensors") and "/" not in r)
        headers = [header(tree, r) for r in rels]
        if len(headers) > 1:
            details["shards"] = len(headers)
    tensors: dict[str, Any] = {}
    where: dict[str, Any] = {}
    for h in headers:
        for k, t in h.tensors.items():
            if k in tensors:
                warnings.append(f"tensor {k!r} appears in both {where[k].name} and {h.name}")
            tensors[k] = t
            where[k] = h
    return CheckpointWeights(headers, tensors, where, details, warnings)


# --------------------------------------------------------------------------- quantization


def _quantization(
    w: CheckpointWeights, config: dict[str, Any] | None, warnings: list[str]
) -> tuple[str | None, dict[str, Any], dict[str, list[int]], set[str], dict[str, Any]]:
    """(quant type, details, original shapes of packed weights, statistics keys, layout facts)."""
    facts, bnb_shapes, aux = bnb_layout(w)
    quant: str | None = None
    qdetails: dict[str, Any] = {}
    qc = (config or {}).get("quantization_config")
    if isinstance(qc, dict):
        quant, qdetails = quant_from_config(qc)
    if facts:
        layout_q = facts["quant_type"]
        if quant is not None and qdetails.get("method") == "bitsandbytes" and quant != layout_q:
            warnings.append(
                f"config.json quantization_config says {quant} but the tensors are {layout_q}-quantized; reporting {layout_q}"
            )
        elif quant is None:
            warnings.append(
                f"tensors are bitsandbytes {layout_q}-quantized but config.json has no bitsandbytes quantization_config"
            )
        if (
            qdetails.get("method") == "bitsandbytes"
            and "double_quant" in qdetails
            and "double_quant" in facts
            and qdetails["double_quant"] != facts["double_quant"]
        ):
            warnings.append(
                f"config.json says bnb_4bit_use_double_quant={qdetails['double_quant']} but the tensors "
                f"{'have' if facts['double_quant'] else 'lack'} nested absmax statistics"
            )
        quant = layout_q
        qdetails["method"] = "bitsandbytes"
        qdetails.update({k: v for k, v in facts.items() if k != "quant_type"})
        if "double_quant" in facts:
            qdetails["double_quant"] = facts["double_quant"]
    elif quant is not None and qdetails.get("method") == "bitsandbytes" and w.tensors:
        warnings.append(f"config.json says bitsandbytes {quant} but no tensor is stored quantized")
    if quant is not None:
        qdetails["type"] = quant
    return quant, qdetails, bnb_shapes, aux, facts


def _kind(quant: str | None, card: ModelCard, warnings: list[str]) -> str:
    if quant is not None:
        return "quantized"
    if card.relation == "merged":
        return "merged"
    if card.relation == "quantized":
        warnings.append("the model card says base_model_relation: quantized but no quantization was found")
        return "quantized"
    if card.relation == "adapter":
        warnings.append("the model card says base_model_relation: adapter but this directory is a full checkpoint")
    return "checkpoint"


# --------------------------------------------------------------------------- the checkpoint


def _weights(tree: FileTree, details: dict[str, Any], warnings: list[str]) -> CheckpointWeights:
    pickles = sorted(r for r in tree.files if "/" not in r and is_pickle(r))
    has_st = HF_INDEX in tree.files or any(r.endswith(".safetensors") and "/" not in r for r in tree.files)
    if has_st:
        w = read_checkpoint_weights(tree)
    else:
        w = CheckpointWeights([], {}, {}, {}, [])
        if pickles:
            details["weights_format"] = "pickle"
            warnings.append(
                f"weights are pickled ({', '.join(pickles)}) and were not read: shapes, dtypes and the parameter count are unknown"
            )
        else:
            warnings.append("config.json without any weights file")
    details.update(w.details)
    warnings.extend(w.warnings)
    return w


def inspect_checkpoint(tree: FileTree, card: ModelCard) -> Inspection:
    config = load_json(tree, HF_CONFIG) if HF_CONFIG in tree.files else None
    warnings: list[str] = []
    details: dict[str, Any] = {}
    w = _weights(tree, details, warnings)
    quant, qdetails, bnb_shapes, aux, facts = _quantization(w, config, warnings)
    if quant is not None:
        details["quantization"] = compact(qdetails)

    modules: dict[str, list[int]] = {}
    params = 0
    for k, t in w.tensors.items():
        if k in aux:
            continue
        shape = bnb_shapes[k] if k in bnb_shapes else list(t.shape)
        params += math.prod(shape)
        if k.endswith(".weight") and len(shape) == 2:
            modules[k[: -len(".weight")]] = shape
    if facts.get("bits") == 4:
        skipped = sorted(m for m in modules if m + ".weight" not in bnb_shapes)
        if skipped:
            details.setdefault("quantization", {})["unquantized_modules"] = skipped

    fmt = "transformers"
    if config is None:
        fmt = "safetensors"
        warnings.append("no config.json: a bare safetensors checkpoint; architecture and sizes are unknown")
    cfg = config or {}
    fingerprint = checkpoint_fingerprint(cfg, modules) if (w.tensors or config) else None
    if config is not None:
        details["architecture"] = fingerprint["architecture"] if fingerprint else None
        details["config"] = compact({k: cfg.get(k) for k in _CONFIG_HIGHLIGHTS})
    details["tensors"] = len(w.tensors)
    card_d = card_details(card)
    if card_d:
        details["card"] = card_d
    kind = _kind(quant, card, warnings)
    base_models = card.base_models
    if len(base_models) > 1:
        details["base_models"] = base_models
    return Inspection(
        kind=kind,
        format=fmt,
        base_model=base_models[0] if base_models else None,
        quant=quant,
        dtypes=dtype_names(t for k, t in w.tensors.items() if k not in aux),
        params=params,
        details=details,
        fingerprint=fingerprint,
        warnings=warnings,
    )
