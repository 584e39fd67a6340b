"""What a PEFT adapter's tensors say about each module: its rank and the
``[out, in]`` of the base weight it applies to, method by method.

Keys look like ``base_model.model.<module>.lora_A.weight``; the module is the
part before the first adapter-parameter component (``lora_``, ``ia3_``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adapterhub.inspect.safetensors import TensorInfo

# PEFT saves adapter tensors under the wrapped model's names.
PEFT_PREFIX = "base_model.model."
# Per-module adapter parameters start with one of these components.
_ADAPTER_PARAM_PREFIXES = (
    "lora_",
    "ia3_",
    "hada_",
    "lokr_",
    "vera_",
    "oft_",
    "boft_",
    "adaption_",
    "ranknum",
)


def split_peft_key(key: str, extra_prefixes: tuple[str, ...]) -> tuple[str, str] | None:
    """``(module, param)`` for a per-module adapter tensor, else None."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if i and part.startswith(_ADAPTER_PARAM_PREFIXES + extra_prefixes):
            module = ".".join(parts[:i])
            if module == "base_model":
                return None  # shared across modules, e.g. VeRA's base_model.vera_A
            return module.removeprefix(PEFT_PREFIX), ".".join(parts[i:])
    return None


@dataclass
class ModuleInfo:
    rank: int | None = None
    out: int | None = None
    inp: int | None = None
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)  # param name -> shape


def module_table(
    tensors: Mapping[str, TensorInfo], peft_type: str
) -> tuple[dict[str, ModuleInfo], dict[str, TensorInfo], dict[str, TensorInfo], set[str]]:
    """Group adapter tensors by module: (modules, shared, other, adapter names found in keys)."""
    extra = (peft_type.lower() + "_",) if peft_type else ()
    modules: dict[str, ModuleInfo] = {}
    shared: dict[str, TensorInfo] = {}
    other: dict[str, TensorInfo] = {}
    names: set[str] = set()
    for key, t in tensors.items():
        split = split_peft_key(key, extra)
        if split is None:
            if key.startswith("base_model.") and not key.startswith(PEFT_PREFIX):
                shared[key] = t  # e.g. VeRA's vera_A / vera_B
            else:
                other[key] = t
            continue
        module, param = split
        parts = param.split(".")
        # Keys saved from a raw state_dict keep the adapter name
        # (lora_A.default.weight); PEFT's own save strips it.
        if len(parts) == 3 and parts[2] == "weight":
            names.add(parts[1])
            param = f"{parts[0]}.weight"
        elif len(parts) == 2 and parts[1] not in ("weight", "bias"):
            names.add(parts[1])
            param = parts[0]
        modules.setdefault(module, ModuleInfo()).params[param] = t.shape
    return modules, shared, other, names


Shape = tuple[int, ...]


def _two_d(p: Mapping[str, Shape], name: str) -> Shape | None:
    s = p.get(name)
    return s if s is not None and len(s) == 2 else None


def _shapes_lora(m: ModuleInfo, config: Mapping[str, Any]) -> None:
    p = m.params
    a = p.get("lora_A.weight") or p.get("lora_A")  # AdaLoRA drops ".weight"
    b = p.get("lora_B.weight") or p.get("lora_B")
    if a is not None:
        m.rank = a[0]  # conv layers: [r, in, kh, kw]
        if b is not None and len(a) == 2 and len(b) == 2:
            m.out, m.inp = b[0], a[1]
    ea, eb = _two_d(p, "lora_embedding_A"), _two_d(p, "lora_embedding_B")
    if ea is not None:
        m.rank = ea[0]
        if eb is not None:
            # An embedding weight is [num_embeddings, dim]; A is r x num, B is dim x r.
            m.out, m.inp = ea[1], eb[0]
    mag = p.get("lora_magnitude_vector") or p.get("lora_magnitude_vector.weight")
    if mag is not None and m.out is None and len(mag) == 1:
        m.out = mag[0]


def _shapes_ia3(m: ModuleInfo, config: Mapping[str, Any]) -> None:
    s = _two_d(m.params, "ia3_l")
    if s is not None:
        if s[0] == 1:  # a feed-forward module: the vector scales the input
            m.inp = s[1]
        else:
            m.out = s[0]


def _shapes_loha(m: ModuleInfo, config: Mapping[str, Any]) -> None:
    w1a, w1b = _two_d(m.params, "hada_w1_a"), _two_d(m.params, "hada_w1_b")
    if w1a is not None:
        m.rank, m.out = w1a[1], w1a[0]
    if w1b is not None and "hada_t1" not in m.params:
        m.inp = w1b[1]


def _shapes_lokr(m: ModuleInfo, config: Mapping[str, Any]) -> None:
    # Each Kronecker factor is stored whole (lokr_w1) or as a low-rank pair
    # (lokr_w1_a @ lokr_w1_b); only the pairs have a rank.
    dims: list[tuple[int, int]] = []
    for n in ("w1", "w2"):
        full = _two_d(m.params, f"lokr_{n}")
        fa, fb = _two_d(m.params, f"lokr_{n}_a"), _two_d(m.params, f"lokr_{n}_b")
        if full is not None:
            dims.append((full[0], full[1]))
        elif fa is not None and fb is not None:
            dims.append((fa[0], fb[1]))
            m.rank = fa[1]
    if len(dims) == 2 and "lokr_t2" not in m.params:
        m.out, m.inp = dims[0][0] * dims[1][0], dims[0][1] * dims[1][1]


def _shapes_vera(m: ModuleInfo, config: Mapping[str, Any]) -> None:
    d, b = m.params.get("vera_lambda_d"), m.params.get("vera_lambda_b")
    if d is not None and len(d) == 1:
        m.rank = d[0]
    if b is not None and len(b) == 1:
        m.out = b[0]


def _shapes_oft(m: ModuleInfo, config: Mapping[str, Any]) -> None:
    r = _two_d(m.params, "oft_R.weight")
    bs = config.get("oft_block_size")
    if r is not None and not config.get("block_share"):
        # Cayley-parametrised blocks store b(b-1)/2 values each.
        b = (1 + math.isqrt(1 + 8 * r[1])) // 2
        if b * (b - 1) // 2 == r[1] and (not bs or bs == b):
            m.inp = r[0] * b


def _shapes_boft(m: ModuleInfo, config: Mapping[str, Any]) -> None:
    r, s = m.params.get("boft_R"), _two_d(m.params, "boft_s")
    if s is not None:
        m.out = s[0]
    if r is not None and len(r) == 4:  # [butterfly factors, blocks, b, b]
        m.inp = r[1] * r[2]


_SHAPE_RULES = {
    "lora_": _shapes_lora,
    "ia3_": _shapes_ia3,
    "hada_": _shapes_loha,
    "lokr_": _shapes_lokr,
    "vera_": _shapes_vera,
    "oft_": _shapes_oft,
    "boft_": _shapes_boft,
}


def fill_module_shapes(modules: Mapping[str, ModuleInfo], config: Mapping[str, Any]) -> None:
    """Per-module rank and base weight ``[out, in]``, where the tensors tell them."""
    for m in modules.values():
        for prefix, rule in _SHAPE_RULES.items():
            if any(k.startswith(prefix) for k in m.params):
                rule(m, config)
                break
