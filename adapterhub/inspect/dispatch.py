"""Which format a tree of files is, and the inspection of it.

A directory with ``adapter_config.json`` is an adapter (PEFT, the ``adapters``
library or mlx-lm), with named adapters possibly in subfolders; ``config.json``, a
safetensors index or loose ``*.safetensors`` make a checkpoint; ``*.gguf``
files a GGUF model or adapter. The model card adds what configs do not carry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapterhub.artifact import Inspection
from adapterhub.errors import InvalidArtifactError
from adapterhub.inspect.adapters_lib import inspect_adapters_lib, is_adapters_lib
from adapterhub.inspect.checkpoint import card_details, inspect_checkpoint
from adapterhub.inspect.files import HF_CONFIG, HF_INDEX, MODEL_CARD, PEFT_CONFIG, FileTree, compact, load_json
from adapterhub.inspect.mlx import inspect_mlx, is_mlx_adapter
from adapterhub.inspect.peft import inspect_peft
from adapterhub.modelcard import ModelCard, qlora_quant, read_card


def _inspect_adapter_dir(tree: FileTree, prefix: str = "") -> Inspection:
    config = load_json(tree, PEFT_CONFIG, prefix + PEFT_CONFIG)
    if "peft_type" in config:
        return inspect_peft(tree, prefix)
    if is_adapters_lib(config, tree):
        return inspect_adapters_lib(tree, prefix)
    if is_mlx_adapter(config, tree):
        return inspect_mlx(tree, prefix)
    raise InvalidArtifactError(
        f"{prefix}{PEFT_CONFIG}: neither a PEFT adapter config (no peft_type), an adapters-library config "
        "(no config) nor an mlx-lm adapter config (no fine_tune_type)"
    )


def _summary(info: Inspection) -> dict[str, Any]:
    return compact(
        {
            "format": info.format,
            "method": info.method,
            "base_model": info.base_model,
            "rank": info.rank,
            "alpha": info.alpha,
            "task_type": info.task_type,
            "params": info.params,
            "target_modules": info.details.get("target_modules"),
            "weights_file": info.details.get("weights_file"),
        }
    )


def _combined(subs: dict[str, Inspection]) -> Inspection:
    """One inspection for several named adapters and none at the top level."""
    infos = list(subs.values())

    def common(attr: str) -> Any:
        vals = {json.dumps(getattr(i, attr), sort_keys=True) for i in infos}
        return getattr(infos[0], attr) if len(vals) == 1 else None

    modules: dict[str, Any] = {}
    for i in infos:
        modules.update((i.fingerprint or {}).get("modules") or {})
    return Inspection(
        kind="adapter",
        format=common("format") or infos[0].format,
        method=common("method"),
        base_model=common("base_model"),
        base_revision=common("base_revision"),
        rank=max((i.rank for i in infos if i.rank is not None), default=None),
        alpha=common("alpha"),
        task_type=common("task_type"),
        dtypes=sorted({d for i in infos for d in i.dtypes}),
        params=None if any(i.params is None for i in infos) else sum(i.params for i in infos),
        fingerprint={"modules": dict(sorted(modules.items())), "base_model": common("base_model")},
        details={},
        warnings=[w for i in infos for w in i.warnings],
    )


def _with_named_adapters(tree: FileTree, primary: Inspection | None, names: list[str]) -> Inspection:
    """Merge the root adapter (if any) with the adapters saved in subfolders."""
    subs = {n: _inspect_adapter_dir(tree.under(n), n + "/") for n in names}
    if primary is None and len(subs) == 1:
        ((name, primary),) = subs.items()
        primary.details["adapter_name"] = name
        primary.details["adapters"] = {name: _summary(primary)}
        return primary
    if primary is None:
        primary = _combined(subs)
    else:
        counts = [primary.params, *(i.params for i in subs.values())]
        primary.params = None if any(c is None for c in counts) else sum(counts)  # a pickle's count is unknown
        primary.dtypes = sorted(set(primary.dtypes).union(*(i.dtypes for i in subs.values())))
        primary.warnings += [w for i in subs.values() for w in i.warnings]
    primary.details["adapters"] = {n: _summary(i) for n, i in subs.items()}
    return primary


def _add_card(info: Inspection, card: ModelCard) -> Inspection:
    """Adapters: model-card facts that the configs do not carry."""
    if card.meta:
        info.details["card"] = card_details(card)
        if info.base_model is None and card.base_models:
            info.base_model = card.base_models[0]
            if info.fingerprint is not None:
                info.fingerprint["base_model"] = info.base_model
    if card.qlora is not None:
        info.details["trained_on_quant_config"] = card.qlora
        q = qlora_quant(card.qlora)
        if q:
            info.details["trained_on_quant"] = q
    return info


def _gguf(tree: FileTree, rels: list[str]) -> Inspection:
    from adapterhub.inspect.gguf import inspect_gguf

    return inspect_gguf(tree.files, rels)


def not_an_artifact(root: Path) -> InvalidArtifactError:
    return InvalidArtifactError(
        f"{root} is not an artifact: no adapter_config.json, config.json, *.safetensors or *.gguf",
        hint="point at an adapter directory, a checkpoint directory or a .gguf file",
    )


def inspect_tree(tree: FileTree) -> Inspection:
    """Inspect the files of ``tree`` (``files`` and ``size`` are left to the caller)."""
    root = tree.root
    if tree.is_file:
        (rel,) = tree.files
        if rel.endswith(".gguf"):
            return _gguf(tree, [rel])
        if rel.endswith(".safetensors"):
            return inspect_checkpoint(tree, ModelCard())
        raise InvalidArtifactError(
            f"{root} is not an artifact: a single file must be .gguf or .safetensors",
            hint="point at the directory that holds it",
        )
    top = tree.top()
    sub_adapters = sorted({r.split("/")[0] for r in tree.files if r.count("/") == 1 and r.endswith("/" + PEFT_CONFIG)})
    card = read_card(tree.files.get(MODEL_CARD))
    if PEFT_CONFIG in top:
        info = _inspect_adapter_dir(tree)
        if sub_adapters:
            info = _with_named_adapters(tree, info, sub_adapters)
    elif sub_adapters and HF_CONFIG not in top:
        info = _with_named_adapters(tree, None, sub_adapters)
    elif HF_CONFIG in top or HF_INDEX in top or any(r.endswith(".safetensors") for r in top):
        return inspect_checkpoint(tree, card)
    else:
        ggufs = [r for r in top if r.endswith(".gguf")]
        if ggufs:
            return _gguf(tree, ggufs)
        raise not_an_artifact(root)
    return _add_card(info, card)
