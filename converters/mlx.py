"""PEFT LoRA/DoRA adapters to mlx-lm adapters and back (``adapterhub.converters.mlx``).

``to_mlx`` writes ``adapters.safetensors`` + ``adapter_config.json`` that
``mlx_lm.load(model_dir, adapter_path=OUT)`` applies exactly as PEFT applies
the original: the encoding is in ``converters.formats.mlx``. What mlx-lm
cannot express is refused with the reason: other PEFT methods (convert them
with ``--to lora`` first), ``modules_to_save``, trained LoRA biases, DoRA on
embeddings (mlx-lm normalises each token's row, PEFT each embedding
dimension) and an embedding LoRA on a model with tied embeddings (mlx-lm's
embedding LoRA also changes the output head there, PEFT's does not).

``from_mlx`` writes a PEFT LoRA (``use_dora`` for mlx-lm DoRA adapters). With
``base``, every module is checked against the base checkpoint (name and
shape), and short ``target_modules`` are used when the adapter covers every
block of the base.

Both build the output in a temp dir beside OUT, renamed into place when
complete; nothing is left behind on any error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError, NotFoundError

from adapterhub.converters.formats import mlx as fmt
from adapterhub.converters.formats import peft_math
from adapterhub.converters.formats.safetensors_io import FileMap, TensorSource, TensorSpec
from adapterhub.converters.formats.shards import StreamingShardWriter
from adapterhub.converters.output import staged_dir, write_text

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MlxReport:
    direction: str  # peft->mlx | mlx->peft
    out: str
    method: str  # LORA | DORA
    modules: int
    rank: int  # mlx-lm's one rank (peft->mlx) or the PEFT r (mlx->peft)
    scale: float
    module_ranks: dict[str, int]
    files: tuple[str, ...]
    notes: tuple[str, ...] = ()
    checked_against_base: bool = False
    seconds: float = 0.0
    file_sha256: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def warnings(self) -> tuple[str, ...]:
        return ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["file_sha256"]
        d["files"] = list(self.files)
        d["notes"] = list(self.notes)
        d["seconds"] = round(self.seconds, 3)
        return d


def _read_json(files: FileMap, rel: str, what: str) -> dict[str, Any]:
    if rel not in files:
        raise NotFoundError(f"{what} has no {rel}")
    from adapterhub import jsonio

    data = jsonio.read_json(files[rel], what=f"{what} {rel}", expect=None)  # size- and depth-capped
    if not isinstance(data, dict):
        raise InvalidArtifactError(f"{what} {rel}: not a JSON object")
    return data


def _ties(base_config: dict[str, Any], base_keys: list[str]) -> bool:
    shapes = {k: (1,) for k in base_keys}
    return bool(peft_math.tied_aliases(shapes, base_config)) or (
        bool(base_config.get("tie_word_embeddings", False)) and not any(k.endswith("lm_head.weight") for k in base_keys)
    )


def _write(tmp: Path, tensors: dict[str, torch.Tensor], weights: str, config: dict[str, Any], digests: bool) -> tuple[list[str], dict[str, str]]:
    names = sorted(tensors)
    specs = [TensorSpec(n, tuple(tensors[n].shape), tensors[n].dtype) for n in names]
    w = StreamingShardWriter(tmp, specs, prefix=weights.removesuffix(".safetensors"), max_shard_bytes=1 << 62, digests=digests)
    try:
        for n in names:
            w.write(n, tensors[n])
        files = w.close()  # reopens the file and checks it against the plan
    except BaseException:
        w.abort()
        raise
    write_text(tmp / fmt.CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sorted([*files, fmt.CONFIG]), dict(w.sha256)


# --------------------------------------------------------------------------- PEFT -> MLX


def _same_as_base(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a.to(torch.float32), b.to(torch.float32)))


def _refuse(method: str, why: str, hint: str | None = None) -> InvalidArtifactError:
    return InvalidArtifactError(f"cannot convert to mlx-lm: {why}", hint=hint)


def _peft_modules(config: dict[str, Any], src: Any) -> tuple[list[fmt.Module], bool, list[peft_math.ModuleOp]]:
    """The adapter's LoRA modules (PEFT orientation, per-module scale), whether it is DoRA, and its ops."""
    method = peft_math.check_mergeable(config)
    if method != "LORA":
        raise _refuse(
            method, f"mlx-lm has LoRA and DoRA layers only, and this is a {method} adapter",
            hint="turn it into a plain LoRA first: adapterhub convert ADAPTER --to lora --base BASE --rank R",
        )
    shapes = {k: src.spec(k).shape for k in src.keys()}
    plan = peft_math.parse_adapter(config, shapes)
    modules: list[fmt.Module] = []
    dora = False
    # Refusals about the method's own layers first: they say more than a saved weight does.
    for op in sorted(plan.ops, key=lambda o: o.kind == "replace"):
        if op.kind == "lora_bias":
            raise _refuse(method, f"{op.module} has a trained LoRA bias (lora_bias=True), which mlx-lm's LoRA layers lack")
        if op.kind == "dora_embedding":
            raise _refuse(
                method, f"{op.module} is a DoRA embedding: mlx-lm normalises each token's row, PEFT each embedding "
                "dimension, so the arithmetic differs",
            )
        if op.kind == "replace":
            if op.options.get("own_copy"):
                raise _refuse(method, f"the adapter saves whole weights ({op.tensors['value']}, modules_to_save); mlx-lm adapters hold LoRA factors only")
            continue  # a saved copy of a base weight (PEFT saves targeted embeddings): checked against the base
        if op.kind not in ("lora", "dora", "lora_embedding"):
            raise _refuse(method, f"{op.module}: {op.kind} is not a LoRA layer")
        A, B = src.get(op.tensors["A"]), src.get(op.tensors["B"])
        m = src.get(op.tensors["m"]) if "m" in op.tensors else None
        dora = dora or op.kind == "dora"
        kind = "embedding" if op.kind == "lora_embedding" else "linear"
        modules.append(fmt.Module(op.module, kind, int(A.shape[0]), float(op.scale), A, B, m))
    return modules, dora, list(plan.ops)


def _check_peft_against_base(
    config: dict[str, Any], ops: list[peft_math.ModuleOp], modules: list[fmt.Module], base: FileMap,
    saved: Callable[[str], torch.Tensor],
) -> tuple[int | None, list[str]]:
    """Bind the adapter to the base (names, shapes); the base's block count; refusals for tied embeddings."""
    base_config = _read_json(base, "config.json", "the base")
    bsrc = TensorSource(base)
    keys = bsrc.keys()
    plan = peft_math.resolve_plan(
        peft_math.AdapterPlan("LORA", tuple(ops), config), {k: bsrc.spec(k).shape for k in keys}, base_config
    )
    notes: list[str] = []
    for t in plan.tensors:
        for op in t.ops:
            if op.kind == "replace" and not _same_as_base(saved(op.tensors["value"]), bsrc.get(t.source)):
                raise _refuse(
                    "LORA", f"the adapter saves {op.tensors['value']} and it differs from the base's {t.source} "
                    "(new tokens, or a trained copy); mlx-lm adapters hold LoRA factors only",
                )
    bound = {op.module: t.name for t in plan.tensors for op in t.ops if op.kind != "replace"}
    for mod in modules:
        if bound.get(mod.path, mod.path + ".weight") != mod.path + ".weight":
            raise _refuse("LORA", f"{mod.path} is stored as {bound[mod.path]} in the base; mlx-lm names modules as PEFT does")
    if plan.untied or (any(m.kind == "embedding" for m in modules) and _ties(base_config, keys)):
        raise _refuse(
            "LORA", "the base ties its input embeddings to the output head: mlx-lm's embedding LoRA would also change "
            "the head's logits, PEFT's does not",
        )
    n = base_config.get("num_hidden_layers")
    return (n if isinstance(n, int) else fmt.block_count(keys)), notes


def to_mlx(
    adapter: FileMap,
    out: Path | str,
    *,
    base: FileMap | None = None,
    force: bool = False,
    hash_outputs: bool = False,
) -> MlxReport:
    """Convert a PEFT LoRA or DoRA adapter into an mlx-lm adapter directory at ``out``."""
    from adapterhub.converters.merge_plan import open_adapter

    t0 = time.perf_counter()
    config, src = open_adapter(adapter)
    modules, dora, ops = _peft_modules(config, src)
    n_blocks: int | None = None
    checked = False
    if base is not None:
        n_blocks, _ = _check_peft_against_base(config, ops, modules, base, src.get)
        checked = True
    elif any(op.kind == "replace" for op in ops):
        raise _refuse(
            "LORA", "the adapter saves a copy of a base weight; only the base can tell whether it is unchanged",
            hint="pass --base BASE",
        )
    elif any(m.kind == "embedding" for m in modules):
        raise _refuse(
            "LORA", "the adapter has an embedding LoRA; whether the base ties its embeddings to the output head decides "
            "if mlx-lm can apply it", hint="pass --base BASE",
        )
    for mod in modules:
        for t in (mod.A, mod.B, mod.m):
            if t is not None and not peft_math.all_finite(t):
                raise InvalidArtifactError(f"{mod.path}: the adapter holds non-finite values (inf/NaN)")
    name = config.get("base_model_name_or_path")
    enc = fmt.peft_to_mlx(modules, dora=dora, n_blocks=n_blocks, base_model=name if isinstance(name, str) else None)
    with staged_dir(out, force=force) as tmp:
        files, sha = _write(tmp, enc.tensors, fmt.MLX_WEIGHTS, enc.config, hash_outputs)
    lp = enc.config["lora_parameters"]
    return MlxReport(
        "peft->mlx", str(out), "DORA" if dora else "LORA", len(modules), lp["rank"], lp["scale"],
        {m.path: m.rank for m in modules}, tuple(files), tuple(enc.notes), checked, time.perf_counter() - t0, sha,
    )


# --------------------------------------------------------------------------- MLX -> PEFT


def open_mlx(files: FileMap) -> tuple[dict[str, Any], TensorSource, fmt.MlxAdapter]:
    config = _read_json(files, fmt.CONFIG, "the mlx-lm adapter")
    if not fmt.is_mlx_config(config):
        raise InvalidArtifactError(f"{fmt.CONFIG} is not an mlx-lm adapter config (no fine_tune_type or lora_parameters)")
    if fmt.MLX_WEIGHTS not in files:
        raise NotFoundError(f"the mlx-lm adapter has no {fmt.MLX_WEIGHTS}")
    src = TensorSource(files, weights=[fmt.MLX_WEIGHTS])
    parsed = fmt.parse_mlx(config, {k: src.spec(k).shape for k in src.keys()})
    return config, src, parsed


def _kinds_from_base(parsed: fmt.MlxAdapter, src: TensorSource, base: FileMap) -> tuple[dict[str, str], list[str], dict[str, Any]]:
    """Check every module against the base; linear or embedding for each."""
    base_config = _read_json(base, "config.json", "the base")
    bsrc = TensorSource(base)
    kinds: dict[str, str] = {}
    for path, roles in sorted(parsed.modules.items()):
        key = path + ".weight"
        if key not in bsrc:
            raise InvalidArtifactError(
                f"mlx-lm adapter tensor {roles['lora_a']}: the base has no module {path} (no {key})",
                hint="is this the base the adapter was trained on?",
            )
        (n_in, r), (_, n_out) = src.spec(roles["lora_a"]).shape, src.spec(roles["lora_b"]).shape
        have = bsrc.spec(key).shape
        # mlx-lm's embedding LoRA: lora_a (num_embeddings, r), lora_b (r, dim); a linear one: (in, r), (r, out).
        embedding = path.rsplit(".", 1)[-1] in peft_math.INPUT_EMBEDDINGS
        want = (n_in, n_out) if embedding else (n_out, n_in)
        if have != want:
            raise InvalidArtifactError(
                f"{path}: the adapter fits a weight of {list(want)} (lora_a {[n_in, r]}, lora_b {[r, n_out]}), "
                f"the base has {list(have)}"
            )
        kinds[path] = "embedding" if embedding else "linear"
        if kinds[path] == "embedding" and _ties(base_config, bsrc.keys()):
            raise InvalidArtifactError(
                f"{path}: an embedding LoRA on a base with tied embeddings changes mlx-lm's output head too; "
                "not supported yet"
            )
    return kinds, bsrc.keys(), base_config


def from_mlx(
    mlx: FileMap,
    out: Path | str,
    *,
    base: FileMap | None = None,
    base_name: str | None = None,
    force: bool = False,
    hash_outputs: bool = False,
) -> MlxReport:
    """Convert an mlx-lm LoRA/DoRA adapter into a PEFT adapter directory at ``out``."""
    t0 = time.perf_counter()
    _, src, parsed = open_mlx(mlx)
    notes: list[str] = []
    all_blocks: list[str] | None = None
    if base is not None:
        kinds, base_keys, _ = _kinds_from_base(parsed, src, base)
        rests = sorted({m["rest"] for p in parsed.modules if (m := fmt._BLOCK.match(p))})
        all_blocks = fmt.block_paths(base_keys, rests)
    else:
        kinds = {p: ("embedding" if p.rsplit(".", 1)[-1] in peft_math.INPUT_EMBEDDINGS else "linear") for p in parsed.modules}
    tensors: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    for path, roles in sorted(parsed.modules.items()):
        a, b = src.get(roles["lora_a"]), src.get(roles["lora_b"])
        m = src.get(roles["m"]) if "m" in roles else None
        for t in (a, b, m):
            if t is not None and not peft_math.all_finite(t):
                raise InvalidArtifactError(f"{path}: the adapter holds non-finite values (inf/NaN)")
        r = fmt.trimmed_rank(a, b)
        ranks[path] = r
        tensors.update(fmt.mlx_to_peft_tensors(path, kinds[path], a, b, r, m))
    trimmed = sum(1 for r in ranks.values() if r < parsed.rank)
    if trimmed:
        notes.append(f"{trimmed} modules were zero-padded to rank {parsed.rank}; written at their own rank (rank_pattern)")
    config = fmt.peft_config_for(parsed, ranks, kinds, all_blocks=all_blocks, base_model=base_name)
    with staged_dir(out, force=force) as tmp:
        files, sha = _write(tmp, tensors, "adapter_model.safetensors", config, hash_outputs)
    return MlxReport(
        "mlx->peft", str(out), "DORA" if parsed.fine_tune_type == "dora" else "LORA", len(ranks), int(config["r"]),
        parsed.scale, ranks, tuple(files), tuple(notes), base is not None, time.perf_counter() - t0, sha,
    )
