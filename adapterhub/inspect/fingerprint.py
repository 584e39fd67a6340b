"""Base fingerprints: what a checkpoint is (architecture, sizes, the shape of
every 2-D weight), and whether an adapter's expectation of its base fits one.

>>> fingerprint_matches({"modules": {"q_proj": [8, None]}}, {"modules": {"model.q_proj": [8, 16]}})
[]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["checkpoint_fingerprint", "digest", "fingerprint_matches"]


def digest(obj: Any) -> str:
    """``sha256:<hex>`` of a JSON value in canonical form."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def checkpoint_fingerprint(config: Mapping[str, Any], modules: Mapping[str, list[int]]) -> dict[str, Any]:
    """Base fingerprint: architecture, sizes and the ``[out, in]`` of every 2-D weight."""
    tc = config.get("text_config")
    text: Mapping[str, Any] = tc if isinstance(tc, dict) else {}

    def pick(*keys: str) -> Any:
        for src in (config, text):
            for k in keys:
                if src.get(k) is not None:
                    return src[k]
        return None

    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    fp: dict[str, Any] = {
        "architecture": arch or model_type,
        "model_type": model_type,
        "hidden_size": pick("hidden_size", "n_embd", "d_model", "dim"),
        "num_hidden_layers": pick("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
        "vocab_size": pick("vocab_size"),
        "modules": {k: list(v) for k, v in sorted(modules.items())},
    }
    fp["digest"] = digest(fp)
    return fp


def _suffix_index(names: Iterable[str]) -> dict[str, list[str]]:
    idx: dict[str, list[str]] = {}
    for n in names:
        parts = n.split(".")
        for i in range(1, len(parts)):
            idx.setdefault(".".join(parts[i:]), []).append(n)
    return idx


def _locate(name: str, modules: Mapping[str, Any], idx: Mapping[str, list[str]]) -> str | None:
    """Find ``name`` among ``modules`` allowing a different leading prefix on either side."""
    if name in modules:
        return name
    hits = idx.get(name, [])
    if len(hits) == 1:  # the checkpoint has an extra prefix (bert., model., ...)
        return hits[0]
    parts = name.split(".")
    for i in range(1, len(parts) - 1):  # the adapter has an extra prefix
        tail = ".".join(parts[i:])
        if tail in modules:
            return tail
        hits = idx.get(tail, [])
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            return None
    return None


def fingerprint_matches(expectation: Mapping[str, Any] | None, fingerprint: Mapping[str, Any] | None) -> list[str]:
    """Why an adapter (``expectation``) does not fit a base (``fingerprint``); [] if it does.

    Module names may differ by a leading prefix (``model.``, ``bert.``, ...) on
    either side. ``None`` in an expected shape means "not known from the adapter".
    """
    if not expectation or not fingerprint:
        return []
    problems: list[str] = []
    for key in ("hidden_size", "num_hidden_layers"):
        want, have = expectation.get(key), fingerprint.get(key)
        if want is not None and have is not None and want != have:
            problems.append(f"{key}: adapter expects {want}, base has {have}")
    modules: Mapping[str, list[int]] = _shape_table(fingerprint.get("modules"))
    idx = _suffix_index(modules)
    for name, shape in sorted(_shape_table(expectation.get("modules")).items()):
        found = _locate(name, modules, idx)
        if found is None:
            problems.append(f"missing module {name}: the base has no such 2-D weight")
            continue
        have_shape = list(modules[found])
        want_shape = list(shape)
        if len(want_shape) != len(have_shape) or any(
            w is not None and w != h for w, h in zip(want_shape, have_shape, strict=True)
        ):
            shown = "[" + ", ".join("?" if w is None else str(w) for w in want_shape) + "]"
            problems.append(f"shape mismatch for {name}: adapter expects {shown}, base has {have_shape}")
    return problems


def _shape_table(modules: Any) -> dict[str, list[Any]]:
    """The ``name -> shape`` entries of a fingerprint that are well formed (stored ones may not be)."""
    if not isinstance(modules, dict):
        return {}
    return {str(k): list(v) for k, v in modules.items() if isinstance(v, (list, tuple))}
