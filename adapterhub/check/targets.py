"""``adapterhub check --target ENGINE``: the rules of a serving engine, from :mod:`.targets_table`.

Each rule of the table names a test here. A test looks at :class:`TargetFacts`
(what the check already read: the adapter's format, method, config, modules
and saved weights, and the base's config and tensor shapes) and returns the
problems it finds, or why it does not apply. A failing rule's finding names
the conversion that makes the adapter servable (``adapterhub merge``,
``adapterhub convert --to gguf``, ...).

>>> from adapterhub.check import check                        # doctest: +SKIP
>>> rep = check("./qa-dora", "./Llama-2-7b-hf", targets=["vllm"])  # doctest: +SKIP
>>> rep.rule("vllm/dora").status                                # doctest: +SKIP
'error'
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub.check.report import ERROR, INFO, WARNING, Finding, RuleResult, result, skipped
from adapterhub.check.targets_table import TARGET_NAMES, TARGETS
from adapterhub.errors import UsageError

__all__ = ["TARGET_NAMES", "TargetFacts", "run_targets"]

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


@dataclass(frozen=True)
class TargetFacts:
    """What the target rules look at; built by :func:`adapterhub.check.check` from what it read."""

    format: str  # peft | adapters | mlx
    method: str | None  # LORA, DORA, IA3, ... (inspect's method)
    config: Mapping[str, Any]  # adapter_config.json
    rank: int | None
    modules: tuple[str, ...]  # adapted module paths, without PEFT's base_model.model. prefix
    saved: tuple[str, ...]  # full weights the adapter carries (modules_to_save, saved layers)
    extra_vocab: str | None  # why the adapter brings its own vocabulary, if it does
    base_config: Mapping[str, Any]
    base_shapes: Mapping[str, tuple[int, ...]]
    details: Mapping[str, Any]  # inspect's details of the adapter (mlx: num_layers, layers)
    weights_file: str | None = None

    @property
    def model_type(self) -> str | None:
        mt = self.base_config.get("model_type")
        return mt if isinstance(mt, str) else None

    @property
    def architecture(self) -> str | None:
        archs = self.base_config.get("architectures")
        return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None

    @property
    def n_blocks(self) -> int | None:
        for src in (self.base_config, self.base_config.get("text_config") or {}):
            if isinstance(src, Mapping):
                for k in ("num_hidden_layers", "n_layer", "num_layers"):
                    v = src.get(k)
                    if isinstance(v, int) and not isinstance(v, bool):
                        return v
        return None


# A test returns (problems, notes) or a str: why the rule does not apply.
Outcome = tuple[list[str], list[str]] | str
Test = Callable[[TargetFacts, Mapping[str, Any]], Outcome]


def _shown(items: Iterable[str], n: int = 5) -> str:
    items = sorted(set(items))
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _format(f: TargetFacts, p: Mapping[str, Any]) -> Outcome:
    if f.format in p["formats"]:
        return [], [f"a {f.format} adapter"]
    return [f"this is a{'n' if f.format[0] in 'aeiou' else ''} {f.format} adapter"], []


def _methods(f: TargetFacts, p: Mapping[str, Any]) -> Outcome:
    method = f.method or "unknown"
    if method in p["methods"]:
        return [], [f"method {method}"]
    return [f"method {method}: only {', '.join(p['methods'])} adapters load"], []


def _no_dora(f: TargetFacts, p: Mapping[str, Any]) -> Outcome:
    if f.method == "DORA" or (f.format == "peft" and bool(f.config.get("use_dora"))):
        return ["a DoRA adapter (use_dora, magnitude vectors)"], []
    return [], ["not DoRA"]


def _no_modules_to_save(f: TargetFacts, p: Mapping[str, Any]) -> Outcome:
    if f.saved:
        return [f"the adapter carries full weights: {_shown(f.saved)} (modules_to_save or saved layers)"], []
    return [], ["no full weights"]


def _rank_in(f: TargetFacts, p: Mapping[str, Any]) -> Outcome:
    if f.method not in ("LORA", "DORA"):
        return f"applies to LoRA adapters, not {f.method or 'this adapter'}"
    if f.rank is None:
        return "the adapter has no rank"
    allowed = sorted(p["ranks"])
    fits = [r for r in allowed if r >= f.rank]
    if not fits:
        return [f"rank {f.rank} is above the largest {p['option']} ({allowed[-1]})"], []
    need = fits[0]
    note = f"rank {f.rank}: serve with {p['option']} {need} or more"
    if need > p["default"]:
        note += f" (the default is {p['default']})"
    return [], [note]


def _one_scale(f: TargetFacts, p: Mapping[str, Any]) -> Outcome:
    if f.format != "peft":
        return "one rank and scale by construction"
    problems = []
    r, alpha = f.config.get("r"), f.config.get("lora_alpha")
    rp, ap = f.config.get("rank_pattern"), f.config.get("alpha_pattern")
    if isinstance(ap, dict) and any(v != alpha for v in ap.values()):
        problems.append(f"alpha_pattern gives {_shown(ap)} their own alpha, and the engine keeps one")
    if isinstance(rp, dict) and any(v != r for v in rp.values()) and not p["rank_pattern_ok"]:
        problems.append(f"rank_pattern gives {_shown(rp)} their own rank, and the engine scales every module by lora_alpha/r")
    if f.config.get("use_rslora") and not p["rslora_ok"]:
        problems.append("use_rslora scales by lora_alpha/sqrt(r), and the engine by alpha/r")
    return problems, ["one scale for every module"]


def _module_names(f: TargetFacts, p: Mapping[str, Any]) -> Outcome:
    if not f.modules:
        return "the adapter names no module"
    table: Mapping[str, list[str]] = p["modules"]
    allowed = table.get(f.model_type or "") or table.get("*")
    if allowed is None:
        return f"adapterhub's table has no LoRA module list for model_type {f.model_type or '(unknown)'}"
    bad = [m for m in f.modules if m.rsplit(".", 1)[-1] not in allowed]
    if bad:
        leaves = {m.rsplit(".", 1)[-1] for m in bad}
        return [
            f"{len(bad)} adapted module{'s' if len(bad) > 1 else ''} ({_shown(leaves)}) are not among the engine's "
            f"LoRA modules for {f.model_type or 'this model'} ({', '.join(allowed)}): their weights are ignored"
        ], []
    return [], [f"all {len(f.modules)} modules are LoRA modules the engine applies"]


def _no_extra_vocab(f: TargetFacts, p: Mapping[str, Any]) -> Outcome:
    if f.extra_vocab:
        return [f.extra_vocab], []
    return [], ["no extra vocabulary"]


def _gguf_tensors(f: TargetFacts, p: Mapping[str, Any]) -> Outcome:
    import gguf

    name = p["archs"].get(f.architecture or "") or (f.model_type or "").upper().replace("-", "_")
    if name not in gguf.MODEL_ARCH.__members__:
        return [f"llama.cpp has no converter for {f.architecture or f.model_type or 'this architecture'}"], []
    if not f.modules:
        return [], [f"architecture {name.lower()}"]
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[name], f.n_blocks or 1 + max(_blocks(f.modules), default=0))
    unmapped = [m for m in f.modules if tmap.get_name(m + ".weight", try_suffixes=(".weight",)) is None]
    if unmapped:
        return [f"{len(unmapped)} adapted modules have no {name.lower()} GGUF tensor: {_shown(unmapped)}"], []
    return [], [f"architecture {name.lower()}: all {len(f.modules)} modules map to GGUF tensors"]


def _architectures(f: TargetFacts, p: Mapping[str, Any]) -> Outcome:
    if f.format not in p.get("formats", [f.format]):
        return f"applies to {', '.join(p['formats'])} adapters"
    if f.model_type in p["model_types"]:
        return [], [f"model_type {f.model_type}"]
    return [f"model_type {f.model_type or '(unknown)'}: only {', '.join(p['model_types'])} take this adapter as it is"], []


def _mlx_model_type(f: TargetFacts, p: Mapping[str, Any]) -> Outcome:
    mt = f.model_type
    if mt is None:
        return "the base's config.json names no model_type"
    mt = p["remap"].get(mt, mt)
    try:
        spec = importlib.util.find_spec("mlx_lm")  # locates the package without importing mlx
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return "mlx-lm is not installed here, so its model list cannot be read"
    root = Path(next(iter(spec.submodule_search_locations)))
    if (root / "models" / f"{mt}.py").is_file():
        return [], [f"mlx_lm.models.{mt}"]
    return [f"mlx-lm has no model for model_type {mt}"], []


def _blocks(modules: Iterable[str]) -> list[int]:
    return [int(m.group(1)) for p in modules if (m := _BLOCK.search(p + "."))]


def _base_shape(f: TargetFacts, module: str) -> tuple[int, ...] | None:
    key = module + ".weight"
    if key in f.base_shapes:
        return f.base_shapes[key]
    hits = [s for k, s in f.base_shapes.items() if k.endswith("." + key) or key.endswith("." + k)]
    return hits[0] if len(hits) == 1 else None


def _mlx_layers(f: TargetFacts, p: Mapping[str, Any]) -> Outcome:
    problems = []
    not_2d = [m for m in f.modules if (s := _base_shape(f, m)) is not None and len(s) != 2]
    if not_2d:
        problems.append(f"mlx-lm wraps linear and embedding layers only; not {_shown(not_2d)}")
    if f.format == "mlx":
        n, total = f.details.get("num_layers"), f.n_blocks
        lp = f.config.get("lora_parameters") if isinstance(f.config.get("lora_parameters"), Mapping) else {}
        keys = [str(k) for k in lp.get("keys") or []]
        relative = bool(keys) and not any(_BLOCK.search("." + k + ".") for k in keys)
        if isinstance(n, int) and total is not None and n > total:
            problems.append(f"num_layers {n} is more than the base's {total} blocks (mlx-lm refuses it)")
        elif isinstance(n, int) and n >= 0 and total is not None and relative:
            first = total - n
            outside = sorted({b for b in _blocks(f.modules) if b < first})
            if outside:
                problems.append(
                    f"blocks {outside} hold adapter weights but num_layers {n} covers only blocks {first}-{total - 1}"
                )
    return problems, [f"{len(f.modules)} layers mlx-lm can wrap"]


def _every_block(f: TargetFacts, p: Mapping[str, Any]) -> Outcome:
    total = f.n_blocks
    if total is None:
        return "the base's number of blocks is unknown"
    by_leaf: dict[str, set[int]] = {}
    for m in f.modules:
        b = _blocks([m])
        if b:
            by_leaf.setdefault(m.rsplit(".", 1)[-1], set()).add(b[0])
    partial = {leaf: len(bs) for leaf, bs in by_leaf.items() if len(bs) != total}
    if partial:
        shown = ", ".join(f"{leaf} in {n} of {total} blocks" for leaf, n in sorted(partial.items()))
        return [f"{shown}: a module type missing from one block is dropped from all"], []
    return [], [f"every adapted module type is in all {total} blocks"]


TESTS: dict[str, Test] = {
    "format": _format,
    "methods": _methods,
    "no_dora": _no_dora,
    "no_modules_to_save": _no_modules_to_save,
    "rank_in": _rank_in,
    "one_scale": _one_scale,
    "module_names": _module_names,
    "no_extra_vocab": _no_extra_vocab,
    "gguf_tensors": _gguf_tensors,
    "architectures": _architectures,
    "mlx_model_type": _mlx_model_type,
    "mlx_layers": _mlx_layers,
    "every_block": _every_block,
}


def _fix(rule: Mapping[str, Any], f: TargetFacts) -> str | None:
    params = rule.get("params") or {}
    fix = rule.get("fix")
    if f.format in params.get("fix_from", {}):
        fix = params["fix_from"][f.format]
    if rule["test"] == "methods" and f.method == "DORA":
        fix = "merge"  # a DoRA delta depends on the base weight: merge it
    return fix


def _run_rule(engine: str, rule: Mapping[str, Any], f: TargetFacts) -> RuleResult:
    out = TESTS[rule["test"]](f, rule.get("params") or {})
    if isinstance(out, str):
        return skipped(rule["id"], out)
    problems, notes = out
    if not problems:
        return result(rule["id"], [Finding(INFO, n) for n in notes[1:]], notes[0] if notes else "ok")
    severity = ERROR if rule["severity"] == "error" else WARNING
    fix = _fix(rule, f)
    then = f"; fix: adapterhub {fix}" if fix else "; no conversion makes it servable there"
    name = TARGETS[engine]["name"]
    findings = [Finding(severity, f"{name}: {p}{then}", file=f.weights_file, fix=fix) for p in problems]
    return result(rule["id"], findings, "")


def run_targets(names: Iterable[str], facts: TargetFacts) -> tuple[RuleResult, ...]:
    """The results of every rule of the named engines, in table order."""
    out: list[RuleResult] = []
    for name in dict.fromkeys(names):
        if name not in TARGETS:
            raise UsageError(f"unknown target {name!r}", hint=f"choose from {', '.join(TARGET_NAMES)}")
        out += [_run_rule(name, rule, facts) for rule in TARGETS[name]["rules"]]
    return tuple(out)
