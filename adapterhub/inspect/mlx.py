"""mlx-lm adapters: ``adapter_config.json`` (``fine_tune_type``, ``num_layers``,
``lora_parameters``) beside ``adapters.safetensors``.

Tensors are named ``<module path>.lora_a`` (in, r), ``.lora_b`` (r, out) and,
for DoRA, ``.m`` (out,). From the header alone this gives the method (LORA or
DORA), the rank, the scale, the adapted blocks (``layers``) and, as the
fingerprint, the ``[out, in]`` shape every adapted module expects of its base.
mlx-lm has no alpha: ``alpha`` is ``scale · rank``, what PEFT would call it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from adapterhub.artifact import Inspection
from adapterhub.errors import InvalidArtifactError
from adapterhub.inspect.files import PEFT_CONFIG, FileTree, dtype_names, header, load_json

MLX_WEIGHTS = "adapters.safetensors"
_LEAVES = ("lora_a", "lora_b", "m")
_BLOCK = re.compile(r"^(?:.*\.)?(?:layers|h|blocks|block|layer)\.(\d+)\.")


def is_mlx_adapter(config: Mapping[str, Any], tree: FileTree) -> bool:
    """An mlx-lm adapter config: no ``peft_type``, and ``fine_tune_type`` or ``lora_parameters``."""
    if "peft_type" in config or "config" in config:
        return False
    return "fine_tune_type" in config or isinstance(config.get("lora_parameters"), Mapping) or (
        MLX_WEIGHTS in tree.files and "num_layers" in config
    )


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def inspect_mlx(tree: FileTree, prefix: str = "") -> Inspection:
    cfg_name = prefix + PEFT_CONFIG
    config = load_json(tree, PEFT_CONFIG, cfg_name)
    ftt = str(config.get("fine_tune_type", "lora"))
    lp = config.get("lora_parameters") if isinstance(config.get("lora_parameters"), Mapping) else {}
    warnings: list[str] = []
    if MLX_WEIGHTS not in tree.files:
        raise InvalidArtifactError(f"{cfg_name}: mlx-lm adapter without weights (no {MLX_WEIGHTS} beside it)")
    tensors = header(tree, MLX_WEIGHTS, prefix + MLX_WEIGHTS).tensors
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, t in tensors.items():
        path, _, leaf = key.rpartition(".")
        if leaf in _LEAVES and path:
            modules.setdefault(path, {})[leaf] = t.shape
        elif ftt != "full":
            warnings.append(f"{prefix}{MLX_WEIGHTS}: {key} is not an mlx-lm adapter tensor")
    expect: dict[str, list[int | None]] = {}
    ranks: dict[str, int] = {}
    for path, p in sorted(modules.items()):
        a, b = p.get("lora_a"), p.get("lora_b")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            warnings.append(f"{path}: lora_a {list(a or [])} and lora_b {list(b or [])} do not fit")
            continue
        ranks[path] = a[1]
        emb = path.rsplit(".", 1)[-1] in ("embed_tokens", "wte", "word_embeddings", "tok_embeddings")
        expect[path] = [a[0], b[1]] if emb else [b[1], a[0]]
    rank = _int(lp.get("rank"))
    if ranks and rank is not None and set(ranks.values()) != {rank}:
        warnings.append(f"{cfg_name} gives rank {rank}, the tensors have {sorted(set(ranks.values()))}")
    if rank is None and ranks:
        rank = max(ranks.values())
    scale = lp.get("scale")
    scale = float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None
    layers = sorted({int(m.group(1)) for p in modules if (m := _BLOCK.match(p))})
    method = {"lora": "LORA", "dora": "DORA", "full": "FULL"}.get(ftt, ftt.upper())
    base = config.get("model") if isinstance(config.get("model"), str) else None
    details: dict[str, Any] = {
        "fine_tune_type": ftt,
        "scale": scale,
        "num_layers": _int(config.get("num_layers")),
        "layers": layers,
        "target_modules": sorted({str(k) for k in lp.get("keys") or []}) or None,
        "module_ranks": ranks,
        "weights_file": prefix + MLX_WEIGHTS,
        "mlx_config": {k: v for k, v in config.items() if k in ("fine_tune_type", "num_layers", "lora_parameters", "model")},
    }
    return Inspection(
        kind="adapter",
        format="mlx",
        method=method,
        base_model=base,
        rank=rank,
        alpha=scale * rank if scale is not None and rank is not None else None,
        task_type="CAUSAL_LM",
        dtypes=dtype_names(tensors.values()),
        params=sum(t.numel for t in tensors.values()),
        details={k: v for k, v in details.items() if v is not None},
        fingerprint={"modules": expect, "base_model": base},
        warnings=warnings,
    )
