"""The values of ``adapter_config.json`` that adapterhub computes with, checked at the boundary.

A config is untrusted input: ``r: 0``, ``"lora_alpha": "16"``, a ``rank_pattern``
that is a list, or ``modules_to_save: 3`` would otherwise surface as a
``ZeroDivisionError`` or ``TypeError`` deep inside the merge maths. PEFT itself
checks few of these (``r: 0`` divides by zero when it loads the adapter).

:func:`config_problems` lists what is wrong, one line per field, for ``inspect``
(warnings) and ``check`` (errors of the ``peft-config`` rule);
:func:`validate_config` raises it as an ``InvalidArtifactError`` for the merge.

>>> config_problems({"peft_type": "LORA", "r": 0, "lora_alpha": "16"})
['r must be a positive integer, found 0', "lora_alpha must be a finite number, found '16'"]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from adapterhub.errors import InvalidArtifactError
from adapterhub.inspect.patterns import pattern_problem

__all__ = ["config_problems", "validate_config"]

# Methods whose r is a rank (VeRA's r is the shared projection's rank; AdaLoRA's is its target).
_RANKED = ("LORA", "LOHA", "LOKR", "VERA", "ADALORA")
_ALPHA_KEY = {"LORA": "lora_alpha", "ADALORA": "lora_alpha", "LOHA": "alpha", "LOKR": "alpha"}
_MAX_RANK = 1 << 20  # no weight has a million rows of rank


def _shown(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_rank(v: Any) -> bool:
    return _is_int(v) and 0 < v <= _MAX_RANK


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and not isinstance(v, bool) and math.isfinite(v)


def _names(v: Any) -> bool:
    """None, a string, or a list of strings (target_modules, modules_to_save, ...)."""
    return v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


def _pattern_problems(config: Mapping[str, Any], peft_type: str) -> list[str]:
    out = []
    for key, ok, want in (
        ("rank_pattern", _is_rank, "a positive integer"),
        ("alpha_pattern", _is_number, "a finite number"),
    ):
        pat = config.get(key)
        if pat is None:
            continue
        if not isinstance(pat, dict):
            out.append(f"{key} must be an object mapping module patterns to values, found {type(pat).__name__}")
            continue
        invalid = [p for p in (pattern_problem(k) for k in pat) if p]
        if invalid:
            out.append(f"{key}: {invalid[0]}")
        if peft_type == "ADALORA" and key == "rank_pattern":
            continue  # AdaLoRA keeps a mask (a list of booleans) per module
        bad = [(k, v) for k, v in pat.items() if not ok(v)]
        if bad:
            k, v = bad[0]
            more = f" ({len(bad) - 1} more)" if len(bad) > 1 else ""
            out.append(f"{key}[{k!r}] must be {want}, found {_shown(v)}{more}")
    return out


def config_problems(config: Mapping[str, Any]) -> list[str]:
    """What in a PEFT adapter config has the wrong type or an impossible value; [] when nothing."""
    peft_type = config.get("peft_type")
    if peft_type is not None and not isinstance(peft_type, str):
        return [f"peft_type must be a string, found {_shown(peft_type)}"]
    pt = (peft_type or "").upper()
    out: list[str] = []
    if pt in _RANKED and pt != "ADALORA" and "r" in config and not _is_rank(config["r"]):
        out.append(f"r must be a positive integer, found {_shown(config['r'])}")
    if pt == "ADALORA":
        for k in ("init_r", "target_r"):
            if k in config and config[k] is not None and not _is_rank(config[k]):
                out.append(f"{k} must be a positive integer, found {_shown(config[k])}")
    alpha_key = _ALPHA_KEY.get(pt)
    if alpha_key and alpha_key in config and not _is_number(config[alpha_key]):
        out.append(f"{alpha_key} must be a finite number, found {_shown(config[alpha_key])}")
    out += _pattern_problems(config, pt)
    for k in ("target_modules", "modules_to_save", "feedforward_modules", "exclude_modules"):
        if not _names(config.get(k)):
            out.append(f"{k} must be a module name, a pattern or a list of names, found {_shown(config[k])}")
    ff = config.get("feedforward_modules")
    if isinstance(ff, str) and pattern_problem(ff, whole=True):
        out.append(f"feedforward_modules: {pattern_problem(ff, whole=True)}")
    ltt = config.get("layers_to_transform")
    if ltt is not None and not (_is_int(ltt) or (isinstance(ltt, list) and all(_is_int(x) for x in ltt))):
        out.append(f"layers_to_transform must be a layer index or a list of them, found {_shown(ltt)}")
    return out


def validate_config(config: Mapping[str, Any], what: str = "adapter_config.json") -> None:
    """Raise ``InvalidArtifactError`` naming every bad field of ``config``."""
    problems = config_problems(config)
    if problems:
        raise InvalidArtifactError(f"{what}: " + "; ".join(problems))
