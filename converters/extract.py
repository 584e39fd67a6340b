"""LoRA extraction: a PEFT LoRA whose application to BASE reproduces MODEL.

``extract(model, base, out)`` streams the two checkpoints one tensor pair at a
time (a reader thread fetches the next pair while this one is factored), so
memory is bounded by a tensor pair and its float32 delta, whatever the size of
the model. For each tensor:

- bytes equal in MODEL and BASE: skipped, never copied;
- a changed linear weight: the truncated SVD of ``ΔW = W_model − W_base``
  (``converters.lowrank``) gives ``lora_A``/``lora_B`` with scale 1;
- a changed input embedding: an embedding LoRA (``lora_embedding_A``/``_B``);
  when the checkpoints tie it to the output head, ``lm_head`` gets the same
  factors as a linear LoRA, so the head changes as it did in MODEL;
- changed norms and biases (1-D tensors): their module goes to
  ``modules_to_save``, with MODEL's tensors. A linear layer whose bias changed
  is saved whole (PEFT cannot put a module in both lists), with a warning.

The rank is one for all (``rank``) or chosen per module by the kept energy
(``energy``), written as ``rank_pattern`` (with ``alpha_pattern`` equal to it,
so every module has scale 1). The report gives every module's rank, kept
energy and measured relative error.

``converters.to_lora.adapter_to_lora`` runs the same factorisation on the
weight deltas of any adapter that ``converters.merge`` can merge.

Outputs are built in a temp dir beside OUT and renamed into place when
complete: on any error, nothing is left behind.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError, NotFoundError

from adapterhub.converters import lowrank
from adapterhub.converters.formats import peft_math
from adapterhub.converters.formats.mlx import block_paths
from adapterhub.converters.formats.mlx import _BLOCK as BLOCK
from adapterhub.converters.formats.safetensors_io import FileMap, FileSpan, TensorSource, TensorSpec
from adapterhub.converters.formats.shards import StreamingShardWriter
from adapterhub.converters.output import staged_dir, write_text

if TYPE_CHECKING:
    import torch

PEFT_PREFIX = peft_math.PEFT_PREFIX
REPORT_NAME = "extraction_report.json"
# Configuration fields that must agree for BASE to be MODEL's base.
ARCH_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "head_dim",
)


@dataclass(frozen=True)
class ModuleResult:
    module: str
    kind: str  # linear | embedding
    shape: tuple[int, int]
    rank: int
    kept_energy: float
    rel_error: float
    svd: str
    errors_by_rank: dict[str, float] = field(default_factory=dict)
    error_measured: bool = True  # on the residual; else from the singular values (exact identity)


@dataclass(frozen=True)
class ExtractReport:
    source: str  # model | adapter
    method: str  # what was turned into LoRA: FULL (a fine-tuned or merged model), DORA, IA3, ...
    out: str
    svd: str
    rank: int | None  # --rank, or None with --energy
    energy: float | None
    modules: tuple[ModuleResult, ...]
    modules_to_save: tuple[str, ...]
    tensors_unchanged: int
    ignored: tuple[str, ...]  # changed tensors outside --target
    adapter_bytes: int
    files: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0
    file_sha256: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["file_sha256"]
        d["modules"] = [asdict(m) for m in self.modules]
        for k in ("modules_to_save", "ignored", "files", "warnings"):
            d[k] = list(d[k])
        d["max_rel_error"] = self.max_rel_error
        d["ranks"] = dict(sorted(Counter(m.rank for m in self.modules).items()))
        d["seconds"] = round(self.seconds, 3)
        return d


@dataclass
class Delta:
    """One module's float32 weight delta, in the orientation LoRA factors it: (out, in)."""

    module: str  # PEFT module path
    kind: str  # linear | embedding
    delta: torch.Tensor
    dtype: torch.dtype  # what the factors are written as
    also: tuple[str, ...] = ()  # modules that get the same factors as a linear LoRA (a tied head)
    sq_norm: float | None = None  # ‖delta‖_F² where the reader has it already


@dataclass
class _Out:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    results: list[ModuleResult] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- shared


def _read_json(files: FileMap, rel: str, what: str) -> dict[str, Any]:
    if rel not in files:
        raise NotFoundError(f"{what} has no {rel}: not a transformers checkpoint")
    from adapterhub import jsonio

    data = jsonio.read_json(files[rel], what=f"{what} {rel}", expect=None)  # size- and depth-capped
    if not isinstance(data, dict):
        raise InvalidArtifactError(f"{what} {rel}: not a JSON object")
    return data


def _arch(cfg: Mapping[str, Any]) -> dict[str, Any]:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), Mapping) else {}
    out = {k: cfg.get(k, text.get(k)) for k in ARCH_KEYS}
    out["architectures"] = cfg.get("architectures")
    return out


def check_same_architecture(model_cfg: Mapping[str, Any], base_cfg: Mapping[str, Any]) -> None:
    a, b = _arch(model_cfg), _arch(base_cfg)
    diff = [k for k in a if a[k] is not None and b[k] is not None and a[k] != b[k]]
    if diff:
        k = diff[0]
        raise InvalidArtifactError(
            f"BASE is another architecture: {k} is {a[k]} in MODEL and {b[k]} in BASE",
            hint="extract against the model MODEL was fine-tuned or merged from",
        )


def _matches(module: str, targets: Sequence[str] | None) -> bool:
    return targets is None or any(module == t or module.endswith("." + t) for t in targets)


def _factor(d: Delta, rank: int | None, energy: float | None, svd: str, out: _Out) -> None:
    shape = (int(d.delta.shape[0]), int(d.delta.shape[1]))
    if d.kind == "embedding":  # PEFT: delta (num, dim) = (B @ A)ᵀ with A (r, num), B (dim, r)
        work = d.delta.T
        what = f"{d.module} (embedding {shape[0]} x {shape[1]})"
    else:
        work = d.delta
        what = f"{d.module} ({shape[0]} x {shape[1]})"
    try:
        f = lowrank.factorize(work, rank=rank, energy=energy, method=svd, what=what, sq_total=d.sq_norm)
    except lowrank.NonFinite:
        raise InvalidArtifactError(
            f"{d.module}: non-finite values (inf/NaN) in MODEL or BASE, or a difference that overflows float32",
            hint="nothing was written",
        ) from None
    A, B = f.A.to(d.dtype), f.B.to(d.dtype)
    if not (peft_math.all_finite(A) and peft_math.all_finite(B)):
        raise InvalidArtifactError(f"{d.module}: the factors overflow {d.dtype}", hint="pass --dtype float32")
    pre = PEFT_PREFIX + d.module
    if d.kind == "embedding":
        out.tensors[f"{pre}.lora_embedding_A"] = A
        out.tensors[f"{pre}.lora_embedding_B"] = B
        for head in d.also:  # tied head: logits = h @ (E + Δ)ᵀ, a linear delta of Δ (num, dim) = Aᵀ Bᵀ
            out.tensors[f"{PEFT_PREFIX}{head}.lora_A.weight"] = B.T.contiguous()
            out.tensors[f"{PEFT_PREFIX}{head}.lora_B.weight"] = A.T.contiguous()
            out.ranks[head] = f.rank
    else:
        out.tensors[f"{pre}.lora_A.weight"] = A
        out.tensors[f"{pre}.lora_B.weight"] = B
    out.ranks[d.module] = f.rank
    out.results.append(
        ModuleResult(
            d.module, d.kind, shape, f.rank, f.kept_energy, f.rel_error, f.svd, f.summary()["errors_by_rank"], f.measured
        )
    )


def _targets(ranks: Mapping[str, int], base_keys: Sequence[str]) -> list[str]:
    """Short names (``self_attn.q_proj``) when the LoRA covers every block's module of that name, else full paths."""
    inside = {p: m["rest"] for p in ranks if (m := BLOCK.match(p))}
    rests = sorted(set(inside.values()))
    if rests and sorted(block_paths(base_keys, rests)) == sorted(inside):
        return rests + sorted(p for p in ranks if p not in inside)
    return sorted(ranks)


def lora_config(
    ranks: Mapping[str, int], modules_to_save: Sequence[str], base_keys: Sequence[str], *,
    base_name: str | None, task_type: str | None, fan_in_fan_out: bool = False,
) -> dict[str, Any]:
    """PEFT adapter_config.json: scale 1 for every module (alpha = rank)."""
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k)) if counts else 8
    rank_pattern = {p: k for p, k in sorted(ranks.items()) if k != r}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_name,
        "revision": None,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": _targets(ranks, base_keys) if ranks else [],
        "modules_to_save": sorted(modules_to_save) or None,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _card(base_name: str | None, source_name: str | None, report: Mapping[str, Any]) -> str:
    from adapterhub import modelcard

    meta = {
        "base_model": base_name or None,
        "base_model_relation": "adapter",
        "library_name": "peft",
        "tags": ["lora", "extracted", "adapterhub"],
    }
    lines = [""]
    what = f"`{source_name}`" if source_name else "a fine-tuned or merged model"
    lines += [
        "# Extracted LoRA",
        "",
        f"A LoRA that reproduces {what} on top of its base, by truncated SVD of each changed weight's delta.",
        "",
        f"- modules: {len(report['modules'])}, ranks {report['ranks']}",
        f"- largest relative error of a module's delta: {report['max_rel_error']:.3g}",
        f"- modules_to_save: {', '.join(report['modules_to_save']) or 'none'}",
        "",
        f"Per-module figures are in `{REPORT_NAME}`.",
    ]
    return modelcard.render(meta, "\n".join(lines) + "\n", quote=("base_model",))


def _write(
    out: Path | str, result: _Out, config: dict[str, Any], make_report: Callable[[tuple[str, ...], int], ExtractReport],
    *, force: bool, hash_outputs: bool, base_name: str | None, source_name: str | None,
) -> ExtractReport:
    names = sorted(result.tensors)
    specs = [TensorSpec(n, tuple(result.tensors[n].shape), result.tensors[n].dtype) for n in names]
    with staged_dir(out, force=force) as tmp:
        w = StreamingShardWriter(tmp, specs, prefix="adapter_model", max_shard_bytes=1 << 62, digests=hash_outputs)
        try:
            for n in names:
                w.write(n, result.tensors[n])
            files = w.close()
        except BaseException:
            w.abort()
            raise
        write_text(tmp / "adapter_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        files = sorted([*files, "adapter_config.json", REPORT_NAME, "README.md"])
        report = make_report(tuple(files), w.bytes_written)
        rd = report.to_dict()
        write_text(tmp / REPORT_NAME, json.dumps(rd, indent=2, sort_keys=True) + "\n")
        write_text(tmp / "README.md", _card(base_name, source_name, rd))
    from dataclasses import replace

    return replace(report, file_sha256=dict(w.sha256))


def _task_type(cfg: Mapping[str, Any]) -> str | None:
    archs = [str(a) for a in cfg.get("architectures") or []]
    return "CAUSAL_LM" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else None


# --------------------------------------------------------------------------- model - base


@dataclass
class _Pair:
    model: TensorSource
    base: TensorSource
    names: list[str]  # in checkpoint order
    tied_head: str | None  # lm_head module path when both checkpoints tie it to the embedding


def _open_pair(model: FileMap, base: FileMap) -> tuple[_Pair, dict[str, Any], dict[str, Any]]:
    from adapterhub.converters.merge_plan import check_base_config

    mcfg, bcfg = _read_json(model, "config.json", "MODEL"), _read_json(base, "config.json", "BASE")
    check_base_config(mcfg)
    check_base_config(bcfg)
    check_same_architecture(mcfg, bcfg)
    msrc, bsrc = TensorSource(model), TensorSource(base)
    mk, bk = set(msrc.keys()), set(bsrc.keys())
    if mk != bk:
        extra, missing = sorted(mk - bk), sorted(bk - mk)
        k = (extra or missing)[0]
        where = "MODEL but not in BASE" if extra else "BASE but not in MODEL"
        raise InvalidArtifactError(
            f"BASE is another architecture: tensor {k} is in {where} ({len(extra)} + {len(missing)} names differ)"
        )
    for k in bsrc.keys():
        if msrc.spec(k).shape != bsrc.spec(k).shape:
            raise InvalidArtifactError(
                f"BASE is another shape: {k} is {list(msrc.spec(k).shape)} in MODEL and {list(bsrc.spec(k).shape)} in BASE"
            )
    aliases = peft_math.tied_aliases({k: bsrc.spec(k).shape for k in bk}, bcfg)
    tied = next((a.removesuffix(".weight") for a in aliases), None) if peft_math.tied_aliases({k: msrc.spec(k).shape for k in mk}, mcfg) else None
    return _Pair(msrc, bsrc, bsrc.keys(), tied), mcfg, bcfg


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    if a.dtype == b.dtype:
        return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    return bool(torch.equal(a.float(), b.float()))


def _check_finite(name: str, m: torch.Tensor, b: torch.Tensor) -> None:
    for t, which in ((m, "MODEL"), (b, "BASE")):
        if not peft_math.all_finite(t):
            raise InvalidArtifactError(f"{which} has non-finite values (inf/NaN) in {name}", hint="nothing was written")


COMPARE_CHUNK = 8 * 1024**2


def _spans_equal(a: FileSpan, b: FileSpan) -> bool:
    """Whether two tensors' stored bytes are equal, read chunk by chunk (stops at the first difference)."""
    if a.nbytes != b.nbytes:
        return False
    fa, fb = os.open(a.path, os.O_RDONLY), os.open(b.path, os.O_RDONLY)
    try:
        done = 0
        while done < a.nbytes:
            n = min(COMPARE_CHUNK, a.nbytes - done)
            x, y = os.pread(fa, n, a.offset + done), os.pread(fb, n, b.offset + done)
            if len(x) != n or len(y) != n:
                raise InvalidArtifactError(f"{a.rel if len(x) != n else b.rel}: truncated while reading a tensor")
            if x != y:
                return False
            done += n
        return True
    finally:
        os.close(fa)
        os.close(fb)


def _prefetch(pair: _Pair, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor | None, torch.Tensor | None]]:
    """(name, model tensor, base tensor) of the 1-D tensors, in order; the next pair is read while the caller works.

    Tensors whose stored bytes are equal in both are compared chunk by chunk
    and yielded as (name, None, None).
    """
    pool = ThreadPoolExecutor(1, thread_name_prefix="adapterhub-read")

    def read(i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        n = names[i]
        if pair.model.spec(n).dtype == pair.base.spec(n).dtype and _spans_equal(pair.model.span(n), pair.base.span(n)):
            return None, None
        return pair.model.get(n), pair.base.get(n)

    pending: Future[tuple[torch.Tensor | None, torch.Tensor | None]] | None = pool.submit(read, 0) if names else None
    try:
        for i, n in enumerate(names):
            assert pending is not None
            m, b = pending.result()
            pending = pool.submit(read, i + 1) if i + 1 < len(names) else None
            yield n, m, b
            del m, b
    finally:
        if pending is not None:
            pending.cancel()
        pool.shutdown(wait=True)


def _vectors(pair: _Pair, targets: Sequence[str] | None, out: _Out) -> tuple[set[str], int, list[str]]:
    """First pass over 1-D tensors (norms, biases): modules that go to modules_to_save."""
    names = [n for n in pair.names if len(pair.base.spec(n).shape) <= 1]
    saved: set[str] = set()
    unchanged, ignored = 0, []
    for n, m, b in _prefetch(pair, names):
        if m is None or b is None or _same(m, b):
            unchanged += 1
            continue
        _check_finite(n, m, b)
        module = n.rpartition(".")[0]
        if not _matches(module, targets):
            ignored.append(n)
            continue
        saved.add(module)
    return saved, unchanged, ignored


def _deltas(pair: _Pair, saved: set[str], targets: Sequence[str] | None, dtype: Any, out: _Out, counts: list[int], ignored: list[str]) -> Iterator[Delta]:
    """The float32 delta of every changed 2-D weight, in checkpoint order.

    A reader thread forms the next delta (``extract_read``: block by block,
    unchanged blocks never converted) while the caller factors this one; the
    two alternate between two buffers, so a delta is valid until the next
    one is asked for.
    """
    from adapterhub.converters.extract_read import DeltaReader, PairDelta

    names = [n for n in pair.names if len(pair.base.spec(n).shape) == 2 and n.rpartition(".")[0] not in saved]
    reader = DeltaReader(pair.model, pair.base)

    def read(i: int) -> PairDelta:  # its block ops share torch's thread setting (process-wide) with the caller's BLAS
        return reader.delta(names[i], i % 2)

    pool = ThreadPoolExecutor(1, thread_name_prefix="adapterhub-read")
    pending: Future[PairDelta] | None = pool.submit(read, 0) if names else None
    try:
        for i, n in enumerate(names):
            assert pending is not None
            pd = pending.result()
            pending = pool.submit(read, i + 1) if i + 1 < len(names) else None
            if pd.delta is None:
                counts[0] += 1
                continue
            module = n.rpartition(".")[0]
            if not n.endswith(".weight"):
                raise InvalidArtifactError(f"not supported yet: the 2-D tensor {n} changed and is not a module's weight")
            if not _matches(module, targets):
                ignored.append(n)
                continue
            kind = "embedding" if module.rpartition(".")[2] in peft_math.INPUT_EMBEDDINGS else "linear"
            also = (pair.tied_head,) if kind == "embedding" and pair.tied_head else ()
            yield Delta(module, kind, pd.delta, dtype or pd.dtype, also, pd.sq_norm)
            del pd
    finally:
        if pending is not None:
            pending.cancel()
        pool.shutdown(wait=True)
        reader.close()


def _saved_tensors(pair: _Pair, saved: set[str], out: _Out) -> None:
    for n in pair.names:
        if n.rpartition(".")[0] in saved:
            out.tensors[PEFT_PREFIX + n] = pair.model.get(n)
    for module in sorted(saved):
        out.modules_to_save.append(module)
        if any(n.startswith(module + ".") and len(pair.base.spec(n).shape) == 2 for n in pair.names):
            out.warnings.append(
                f"{module}: its bias changed, so the whole module is in modules_to_save (its weight is stored in full)"
            )


def _resolve_dtype(dtype: Any) -> Any:
    if dtype is None:
        return None
    from adapterhub.converters.merge_plan import _resolve_dtype as resolve

    return resolve(dtype)


def extract(
    model: FileMap,
    base: FileMap,
    out: Path | str,
    *,
    rank: int | None = None,
    energy: float | None = None,
    targets: Sequence[str] | None = None,
    svd: str = "randomized",
    dtype: Any = None,
    force: bool = False,
    hash_outputs: bool = False,
    base_name: str | None = None,
    model_name: str | None = None,
    progress: Any = None,
) -> ExtractReport:
    """Extract a PEFT LoRA from MODEL − BASE into ``out``. See the module doc."""
    t0 = time.perf_counter()
    _check_settings(rank, energy, svd)
    pair, mcfg, bcfg = _open_pair(model, base)
    res = _Out()
    saved, unchanged, ignored = _vectors(pair, targets, res)
    counts = [0]
    bar = progress("extract", len(pair.names)) if progress is not None else None
    import torch

    # Leave a core to the reader thread, which forms the next delta meanwhile: on two cores,
    # two BLAS threads beside it spun against each other (0.94B model, quiet machine:
    # 10.7 s with two, 4.0 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    try:
        for d in _deltas(pair, saved, targets, _resolve_dtype(dtype), res, counts, ignored):
            _factor(d, rank, energy, svd, res)
            if bar is not None:
                bar.update(1)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    _saved_tensors(pair, saved, res)
    if not res.results and not res.modules_to_save:
        why = f" (the changed tensors lie outside --target: {', '.join(ignored[:3])})" if ignored else ""
        raise InvalidArtifactError(f"MODEL and BASE hold the same weights: nothing to extract{why}")
    if ignored:
        res.warnings.append(f"{len(ignored)} changed tensors outside --target were left out, e.g. {ignored[0]}")
    config = lora_config(res.ranks, res.modules_to_save, pair.names, base_name=base_name, task_type=_task_type(bcfg))
    return _write(
        out, res, config,
        lambda files, nbytes: ExtractReport(
            "model", "FULL", str(out), svd, rank, energy, tuple(res.results), tuple(res.modules_to_save),
            unchanged + counts[0], tuple(ignored), nbytes, files, tuple(res.warnings), time.perf_counter() - t0,
        ),
        force=force, hash_outputs=hash_outputs, base_name=base_name, source_name=model_name,
    )


def _check_settings(rank: int | None, energy: float | None, svd: str) -> None:
    from adapterhub.errors import UsageError

    if (rank is None) == (energy is None):
        raise UsageError("give exactly one of --rank R and --energy E")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, not {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UsageError(f"--energy is a fraction of the delta's energy: 0 < E ≤ 1, not {energy}")
    if svd not in lowrank.METHODS:
        raise UsageError(f"--svd must be randomized or exact, not {svd!r}")
