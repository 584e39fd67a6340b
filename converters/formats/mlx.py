"""mlx-lm adapters as pure functions over names, shapes and tensors.

An mlx-lm adapter directory holds ``adapters.safetensors`` and
``adapter_config.json`` with ``fine_tune_type`` (``lora`` | ``dora`` |
``full``), ``num_layers`` and ``lora_parameters`` {``rank``, ``scale``,
``dropout``, ``keys``}. Its tensors are named by module path:
``model.layers.3.self_attn.q_proj.lora_a`` (in, r), ``.lora_b`` (r, out) and,
for DoRA, ``.m`` (out,). The output of an adapted linear layer is
``W x + scale · (x @ lora_a) @ lora_b``: PEFT's A and B, transposed.

mlx-lm gives every adapted layer one rank and one scale. A PEFT adapter whose
modules differ (rsLoRA with ``rank_pattern``, ``alpha_pattern``) is encoded
exactly: every module is zero-padded to the largest rank (zero columns of
``lora_a`` and zero rows of ``lora_b`` add nothing to the product) and its own
scale ``s_m`` lives in ``lora_b`` as the factor ``s_m / scale``. Modules whose
scale is the global one are copied bit for bit.

``lora_parameters.keys`` names modules inside each of the last ``num_layers``
blocks (``self_attn.q_proj``). mlx-lm 0.32 also matches keys against the whole
model's module paths (``lm_head``, ``model.embed_tokens``, or any full path);
an adapter that does not cover a uniform set of modules in every block it
touches is written with full paths, so that no module gets an adapter it did
not have.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError

if TYPE_CHECKING:
    import torch

MLX_WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
MLX_LEAVES = ("lora_a", "lora_b", "m")

# A module path inside a stack of blocks: "<container>.<index>.<rest>".
_BLOCK = re.compile(r"^(?P<container>(?:.*\.)?(?:layers|h|blocks|block|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")


def is_mlx_config(config: Mapping[str, Any]) -> bool:
    """True for mlx-lm's ``adapter_config.json`` (never for PEFT's or the ``adapters`` library's)."""
    if "peft_type" in config or "config" in config:
        return False
    return "fine_tune_type" in config or isinstance(config.get("lora_parameters"), Mapping)


@dataclass(frozen=True)
class Module:
    """One adapted module in PEFT's orientation: A (r, in), B (out, r), per-module scale."""

    path: str  # module path in the model (PEFT's, ``base_model.model.`` stripped)
    kind: str  # linear | embedding
    rank: int
    scale: float
    A: torch.Tensor  # (r, in) for linear; (r, num_embeddings) for embeddings
    B: torch.Tensor  # (out, r) for linear; (dim, r) for embeddings
    m: torch.Tensor | None = None  # DoRA magnitude (out,)


@dataclass
class Encoded:
    """An mlx-lm adapter ready to write: tensors, config and how it was encoded."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- PEFT -> MLX


def _layout(paths: Sequence[str], n_blocks: int | None) -> tuple[int, list[str]]:
    """(num_layers, keys) for mlx-lm: block-relative keys when the adapter covers the
    same modules in every block from some index to the end, else full module paths."""
    per_block: dict[int, set[str]] = {}
    outside: list[str] = []
    containers = set()
    for p in paths:
        m = _BLOCK.match(p)
        if m is None:
            outside.append(p)
            continue
        containers.add(m["container"])
        per_block.setdefault(int(m["index"]), set()).add(m["rest"])
    if per_block and len(containers) == 1 and not outside:
        first, last = min(per_block), max(per_block)
        rests = per_block[first]
        uniform = all(per_block.get(i) == rests for i in range(first, last + 1))
        if uniform and first == 0 and (n_blocks is None or last == n_blocks - 1):
            return -1, sorted(rests)  # -1: every block (mlx-lm's convention)
        if uniform and n_blocks is not None and last == n_blocks - 1:
            return n_blocks - first, sorted(rests)
    # Full paths: mlx-lm matches them against the whole model. num_layers 0
    # selects no block-relative key (none is given).
    return 0, sorted(paths)


def peft_to_mlx(
    modules: Sequence[Module],
    *,
    dora: bool,
    n_blocks: int | None = None,
    base_model: str | None = None,
) -> Encoded:
    """Encode PEFT modules as one mlx-lm adapter (one rank, one scale), exactly."""
    import torch

    if not modules:
        raise InvalidArtifactError("the adapter has no LoRA modules to convert")
    rank = max(m.rank for m in modules)
    # The most common scale is the global one: those modules are copied bit for bit.
    counts = Counter(m.scale for m in modules)
    scale = max(counts, key=lambda s: (counts[s], s))
    tensors: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    padded = folded = 0
    for mod in sorted(modules, key=lambda m: m.path):
        r = mod.rank
        a = mod.A.T  # (in, r)
        b = mod.B.T  # (r, out)
        if mod.scale != scale:
            b = (b.to(torch.float32) * (mod.scale / scale)).to(mod.B.dtype)
            folded += 1
        if r < rank:
            a = torch.cat([a, a.new_zeros(a.shape[0], rank - r)], dim=1)
            b = torch.cat([b, b.new_zeros(rank - r, b.shape[1])], dim=0)
            padded += 1
        tensors[f"{mod.path}.lora_a"] = a.contiguous()
        tensors[f"{mod.path}.lora_b"] = b.contiguous()
        if mod.m is not None:
            tensors[f"{mod.path}.m"] = mod.m.contiguous()
    if padded:
        notes.append(f"{padded} modules zero-padded from their own rank to rank {rank}")
    if folded:
        notes.append(f"{folded} modules carry their own scale in lora_b (factor s_module / {scale:g})")
    num_layers, keys = _layout([m.path for m in modules], n_blocks)
    config: dict[str, Any] = {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": keys},
    }
    if base_model:
        config["model"] = base_model
    config["adapterhub"] = {
        "converted_from": "peft",
        "module_ranks": {m.path: m.rank for m in sorted(modules, key=lambda m: m.path)},
        "module_scales": {m.path: m.scale for m in sorted(modules, key=lambda m: m.path)},
    }
    return Encoded(tensors, config, notes)


# --------------------------------------------------------------------------- MLX -> PEFT


@dataclass(frozen=True)
class MlxAdapter:
    """An mlx-lm adapter read back: per-module factors in mlx-lm's orientation."""

    fine_tune_type: str
    rank: int
    scale: float
    num_layers: int | None
    keys: tuple[str, ...] | None
    modules: dict[str, dict[str, str]]  # module path -> {"lora_a"|"lora_b"|"m": tensor name}
    base_model: str | None


def parse_mlx(config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> MlxAdapter:
    """Check an mlx-lm adapter's config and tensor names/shapes; group its tensors by module."""
    ftt = str(config.get("fine_tune_type", "lora"))
    if ftt == "full":
        raise InvalidArtifactError(
            "this mlx-lm adapter is a full fine-tune (fine_tune_type: full): it holds whole weights, not LoRA factors",
            hint="use `adapterhub extract` on the fine-tuned model to get a LoRA from it",
        )
    if ftt not in ("lora", "dora"):
        raise InvalidArtifactError(f"adapter_config.json: unknown fine_tune_type {ftt!r} (lora, dora or full)")
    lp = config.get("lora_parameters")
    if not isinstance(lp, Mapping):
        raise InvalidArtifactError("adapter_config.json: no lora_parameters (rank, scale)")
    rank, scale = lp.get("rank"), lp.get("scale")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidArtifactError(f"adapter_config.json: lora_parameters.rank must be a positive integer, not {rank!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise InvalidArtifactError(f"adapter_config.json: lora_parameters.scale must be a number, not {scale!r}")
    modules: dict[str, dict[str, str]] = {}
    for key in shapes:
        path, _, leaf = key.rpartition(".")
        if leaf not in MLX_LEAVES or not path:
            raise InvalidArtifactError(f"{MLX_WEIGHTS}: {key} is not an mlx-lm adapter tensor (…lora_a, …lora_b or …m)")
        modules.setdefault(path, {})[leaf] = key
    if not modules:
        raise InvalidArtifactError(f"{MLX_WEIGHTS} holds no tensors")
    for path, roles in modules.items():
        if "lora_a" not in roles or "lora_b" not in roles:
            raise InvalidArtifactError(f"{path}: lora_a and lora_b are both needed")
        a, b = tuple(shapes[roles["lora_a"]]), tuple(shapes[roles["lora_b"]])
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise InvalidArtifactError(f"{path}: lora_a {list(a)} and lora_b {list(b)} do not fit (want (in, r) and (r, out))")
        if a[1] != rank:
            raise InvalidArtifactError(f"{path}: the config gives rank {rank} but lora_a has rank {a[1]}")
        if "m" in roles:
            if ftt != "dora":
                raise InvalidArtifactError(f"{path}: a DoRA magnitude (m) in an adapter whose fine_tune_type is {ftt}")
            if tuple(shapes[roles["m"]]) != (b[1],):
                raise InvalidArtifactError(f"{path}: m {list(shapes[roles['m']])} does not fit lora_b {list(b)}")
        elif ftt == "dora":
            raise InvalidArtifactError(f"{path}: a DoRA adapter without the magnitude m")
    keys = lp.get("keys")
    nl = config.get("num_layers")
    return MlxAdapter(
        ftt, rank, float(scale), nl if isinstance(nl, int) else None,
        tuple(str(k) for k in keys) if isinstance(keys, list) else None, modules,
        str(config["model"]) if isinstance(config.get("model"), str) else None,
    )


def trimmed_rank(a: torch.Tensor, b: torch.Tensor) -> int:
    """The rank left once trailing zero columns of lora_a and zero rows of lora_b (padding) are dropped."""
    r = a.shape[1]
    while r > 1 and not bool(a[:, r - 1].any()) and not bool(b[r - 1].any()):
        r -= 1
    return r


def peft_config_for(
    adapter: MlxAdapter,
    ranks: Mapping[str, int],
    kinds: Mapping[str, str],
    *,
    all_blocks: Sequence[str] | None = None,
    base_model: str | None = None,
) -> dict[str, Any]:
    """PEFT ``adapter_config.json`` that applies exactly the modules in ``ranks``.

    Every module keeps the adapter's scale: its alpha is ``scale · rank``.
    ``all_blocks`` lists every module path of the base that the block-relative
    names would match: when the adapter covers all of them the short names are
    used, otherwise full paths (PEFT matches a name as a dotted suffix).
    """
    paths = sorted(ranks)
    r = max(Counter(ranks.values()).items(), key=lambda kv: (kv[1], kv[0]))[0]
    targets: list[str] = []
    short = sorted({m["rest"] for p in paths if (m := _BLOCK.match(p))})
    if all_blocks is not None and short and sorted(all_blocks) == paths:
        targets = short
    else:
        targets = paths
    rank_pattern = {p: k for p, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or adapter.base_model,
        "revision": None,
        "r": r,
        "lora_alpha": adapter.scale * r,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {p: adapter.scale * k for p, k in rank_pattern.items()},
        "target_modules": targets,
        "use_dora": adapter.fine_tune_type == "dora",
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def mlx_to_peft_tensors(path: str, kind: str, a: torch.Tensor, b: torch.Tensor, r: int, m: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """PEFT tensors of one module from mlx-lm's lora_a (in, R) and lora_b (R, out), cut to rank r."""
    pre = PEFT_PREFIX + path
    A, B = a[:, :r].T.contiguous(), b[:r].T.contiguous()
    if kind == "embedding":
        out = {f"{pre}.lora_embedding_A": A, f"{pre}.lora_embedding_B": B}
    else:
        out = {f"{pre}.lora_A.weight": A, f"{pre}.lora_B.weight": B}
    if m is not None:
        out[f"{pre}.lora_magnitude_vector"] = m.contiguous()
    return out


def block_paths(base_keys: Sequence[str], rests: Sequence[str]) -> list[str]:
    """Every module path in the base's blocks whose block-relative name is in ``rests``."""
    want = set(rests)
    out = []
    for k in base_keys:
        if not k.endswith(".weight"):
            continue
        m = _BLOCK.match(k.removesuffix(".weight"))
        if m and m["rest"] in want:
            out.append(k.removesuffix(".weight"))
    return out


def block_count(base_keys: Sequence[str]) -> int | None:
    idx = {int(m["index"]) for k in base_keys if (m := _BLOCK.match(k))}
    return max(idx) + 1 if idx else None
