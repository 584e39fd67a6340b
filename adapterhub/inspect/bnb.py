"""The bitsandbytes layout of a checkpoint (transformers' way of saving one).

4-bit, per module: ``weight`` (packed uint8), ``weight.absmax``,
``weight.quant_map``, with double quantization ``weight.nested_absmax`` and
``weight.nested_quant_map``, and ``weight.quant_state.bitsandbytes__nf4`` (or
``__fp4``): a uint8 tensor holding JSON with the quant type, block size and
original shape, the only tensor data inspection reads. 8-bit: ``weight``
(int8), ``SCB`` and ``weight_format``. ``config.json`` carries the
``quantization_config`` (bitsandbytes, GPTQ, AWQ, ...).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adapterhub import jsonio
from adapterhub.errors import InvalidArtifactError
from adapterhub.inspect.files import compact
from adapterhub.inspect.safetensors import SafetensorsHeader, TensorInfo

# bitsandbytes 4-bit: statistics saved beside the packed weight (transformers layout).
_BNB4_AUX = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_BNB4_STATE = re.compile(r"^(?P<w>.+)\.quant_state\.bitsandbytes__(?P<t>nf4|fp4)$")
_MAX_STATE_BYTES = 1 << 16  # a quant_state holds a few hundred bytes of JSON


@dataclass
class CheckpointWeights:
    """The tensors of a checkpoint over all its safetensors files."""

    headers: list[SafetensorsHeader]
    tensors: dict[str, TensorInfo]
    where: dict[str, SafetensorsHeader]  # tensor -> header it lives in
    details: dict[str, Any]
    warnings: list[str]


def _quant_state(f: Any, h: SafetensorsHeader, key: str) -> dict[str, Any]:
    """The JSON that a ``quant_state`` tensor holds."""
    info = h.tensors[key]
    if info.end - info.start > _MAX_STATE_BYTES:
        raise InvalidArtifactError(f"{h.name}: {key} holds {info.end - info.start} bytes, too many for a quant_state")
    f.seek(info.start)
    raw = f.read(info.end - info.start)
    try:
        state = jsonio.loads(raw, what=f"{h.name}: {key}")
    except InvalidArtifactError:
        state = None
    if not isinstance(state, dict):
        raise InvalidArtifactError(f"{h.name}: {key} does not hold bitsandbytes quant_state JSON")
    return state


def bnb_layout(w: CheckpointWeights) -> tuple[dict[str, Any], dict[str, list[int]], set[str]]:
    """What the tensors say about bitsandbytes quantization.

    Returns (facts, original shape by weight key, keys that are quantization
    statistics rather than weights).
    """
    facts: dict[str, Any] = {}
    shapes: dict[str, list[int]] = {}
    aux: set[str] = set()
    types: Counter[str] = Counter()
    blocksizes: set[int] = set()
    nested = False
    per_file: dict[str, list[str]] = {}
    for k in w.tensors:
        m = _BNB4_STATE.match(k)
        if m:
            per_file.setdefault(w.where[k].name, []).append(k)
    for h in w.headers:
        keys = per_file.get(h.name)
        if not keys:
            continue
        with open(h.path, "rb") as f:
            for k in keys:
                m = _BNB4_STATE.match(k)
                assert m is not None
                aux.add(k)
                state = _quant_state(f, h, k)
                types[str(state.get("quant_type", m["t"]))] += 1
                if isinstance(state.get("blocksize"), int) and not isinstance(state["blocksize"], bool):
                    blocksizes.add(state["blocksize"])
                if "nested_blocksize" in state:
                    nested = True
                shape = state.get("shape")
                if isinstance(shape, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape):
                    shapes[m["w"]] = list(shape)
                elif "shape" in state:
                    raise InvalidArtifactError(f"{h.name}: {k} records the shape {shape!r}, not a list of sizes")
                for a in _BNB4_AUX:
                    if f"{m['w']}.{a}" in w.tensors:
                        aux.add(f"{m['w']}.{a}")
    int8 = 0
    for k in w.tensors:
        if k.endswith(".SCB"):
            aux.add(k)
            mod = k[: -len(".SCB")]
            if f"{mod}.weight" in w.tensors and w.tensors[f"{mod}.weight"].dtype == "I8":
                int8 += 1
        elif k.endswith(".weight_format"):
            aux.add(k)
    if types:
        facts["quant_type"] = types.most_common(1)[0][0]
        if len(types) > 1:
            facts["quant_types"] = dict(types)
        facts["bits"] = 4
        facts["quantized_modules"] = sum(types.values())
        if blocksizes:
            facts["block_size"] = max(blocksizes) if len(blocksizes) > 1 else next(iter(blocksizes))
            if len(blocksizes) > 1:
                facts["block_sizes"] = sorted(blocksizes)
        facts["double_quant"] = nested
    elif int8:
        facts["quant_type"] = "int8"
        facts["bits"] = 8
        facts["quantized_modules"] = int8
    return facts, shapes, aux


def quant_from_config(qc: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    method = str(qc.get("quant_method") or "").lower()
    if hasattr(qc.get("quant_method"), "value"):
        method = str(qc["quant_method"].value).lower()
    d: dict[str, Any] = {"method": method or None}
    if method == "bitsandbytes" or (not method and ("load_in_4bit" in qc or "load_in_8bit" in qc)):
        d["method"] = "bitsandbytes"
        if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            q = str(qc.get("bnb_4bit_quant_type") or "fp4").lower()
            d.update(
                compact(
                    {
                        "bits": 4,
                        "double_quant": bool(qc.get("bnb_4bit_use_double_quant")),
                        "compute_dtype": qc.get("bnb_4bit_compute_dtype"),
                        "quant_storage": qc.get("bnb_4bit_quant_storage"),
                    }
                )
            )
        elif qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
            q = "int8"
            d.update(
                compact(
                    {
                        "bits": 8,
                        "threshold": qc.get("llm_int8_threshold"),
                        "has_fp16_weight": qc.get("llm_int8_has_fp16_weight"),
                    }
                )
            )
        else:
            q = None
        skipped = qc.get("llm_int8_skip_modules")
        if isinstance(skipped, str):
            skipped = [skipped]
        if isinstance(skipped, list) and skipped:
            d["skipped_modules"] = [str(x) for x in skipped]
        return q, d
    if method in ("gptq", "awq"):
        d.update(
            compact(
                {
                    "bits": qc.get("bits", qc.get("w_bit")),
                    "group_size": qc.get("group_size", qc.get("q_group_size")),
                    "desc_act": qc.get("desc_act"),
                    "sym": qc.get("sym"),
                    "zero_point": qc.get("zero_point"),
                    "version": qc.get("version"),
                    "backend": qc.get("backend"),
                    "checkpoint_format": qc.get("checkpoint_format"),
                    "skipped_modules": qc.get("modules_to_not_convert"),
                }
            )
        )
        return method, d
    if method:
        d.update(
            compact(
                {
                    "bits": qc.get("bits"),
                    "group_size": qc.get("group_size"),
                    "skipped_modules": qc.get("modules_to_not_convert"),
                }
            )
        )
        return method, d
    return None, d
