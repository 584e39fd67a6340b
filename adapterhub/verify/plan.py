"""The frozen plan of one verification: what is compared with what, on which
inputs and device, held how, and judged by which bounds.

:func:`make_plan` resolves the candidate, adapter and base (from the arguments
or the registry lineage), reads their configs and headers, and decides
everything before any model is loaded, so that a wrong input fails in
seconds. The runner (:mod:`run`, or :mod:`streamed`) executes the plan and
the judge (:mod:`report`) turns the outputs into a verdict.

>>> plan = make_plan(stack, reg, Request("team/qa-merged:1"))     # doctest: +SKIP
>>> plan.fmt, plan.tolerance["rel"], plan.mode
('bf16', 0.04, 'whole')
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError, NotFoundError, UsageError
from adapterhub.sources import Source, resolve_base, resolve_source
from adapterhub.verify import devices
from adapterhub.verify.candidates import CandidateLoader, detect_format, pick_loader, read_config
from adapterhub.verify.inputs import InputSet, make_inputs
from adapterhub.verify.loading import BNB_FORMATS, DTYPES, FMT_DTYPES, adapter_vocab, quant_recipe

if TYPE_CHECKING:
    from adapterhub.registry import Registry

FORMATS = ("fp32", "fp16", "bf16", "int8", "nf4", "fp4")  # from finest to coarsest

# Default tolerances per candidate format, picked between the worst figure over
# correct conversions and the best over broken ones (wrong alpha, a dropped
# module, another adapter) measured by bench/verify_tolerances.py on scaled tiny
# Llamas and all-MiniLM-L6-v2; docs/verification.md has the figures. rel: max
# ‖cand − ref‖/‖ref‖; cos: min cosine over positions; kl: max mean KL(ref ‖
# cand) in nats; top1/topk: min agreement at clear positions.
# The 4-bit bounds only catch gross errors (wrong alpha, wrong adapter): their
# own rounding noise is as large as one dropped module's effect. Quantized
# candidates are also held to SAME_RECIPE_TOLERANCES, which catch the rest.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"rel": 1e-3, "cos": 0.9999, "kl": 1e-4, "top1": 1.0, "topk": 0.99, "decode": 1.0},
    "bf16": {"rel": 0.04, "cos": 0.995, "kl": 0.01, "top1": 0.98, "topk": 0.95, "decode": 1.0},
    "fp16": {"rel": 0.01, "cos": 0.999, "kl": 1e-3, "top1": 0.99, "topk": 0.95, "decode": 1.0},
    "int8": {"rel": 0.07, "cos": 0.99, "kl": 0.02, "top1": 0.98, "topk": 0.9, "decode": 1.0},
    "nf4": {"rel": 0.38, "cos": 0.5, "kl": 1.0, "top1": 0.55, "topk": 0.58},
    "fp4": {"rel": 0.52, "cos": 0.45, "kl": 1.5, "top1": 0.5, "topk": 0.5},
}
# Bounds of the same-recipe comparison (candidate vs base + adapter merged by
# PEFT and quantized by transformers with the candidate's recipe), from
# bench/verify_tolerances.py on the same models: every correct candidate
# (fp32 and bf16 merges; nf4 with and without double quant, fp4, int8;
# MiniLM) gave exactly 0, the closest broken one (a dropped module) rel 0.086
# (int8), 0.112 (nf4), 0.142 (fp4) and cos ≥ 0.014 below 1. The bounds leave
# room for buckets that flip where two merges round 1 ulp apart (other
# devices and kernels). top1 alone does not separate a dropped module (0.991).
SAME_RECIPE_TOLERANCES: dict[str, dict[str, float]] = {
    fmt: {"rel": 0.01, "cos": 0.999, "kl": 1e-3, "top1": 0.99, "topk": 0.95} for fmt in ("int8", "nf4", "fp4")
}
# Greedy decoding (bound "decode": the share of decoded sequences that never
# leave the reference's tokens where it was sure). A divergence counts where
# the reference's top token led the runner-up by at least this many nats: any
# lead for fp32, a lead that the format's rounding cannot flip for the others
# (on the trained fixture, correct 16-bit and int8 merges never diverged,
# broken ones diverged at leads of 0.06 to 0.6 nats; docs/verification.md).
# 4-bit rounding flips leads over 1 nat, so no "decode" bound is set for it.
DECODE_MARGINS = {"fp32": 0.01, "fp16": 0.25, "bf16": 0.25, "int8": 0.5, "nf4": 1.0, "fp4": 1.0}
DEFAULT_DECODE = 8
_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


@dataclass(frozen=True)
class Request:
    """What the caller asked for (the arguments of :func:`adapterhub.verify.verify`)."""

    candidate: str | os.PathLike
    adapter: str | os.PathLike | None = None
    base: str | os.PathLike | None = None
    device: str = "auto"
    prompts: str | os.PathLike | None = None
    tolerance: Mapping[str, float] = field(default_factory=dict)  # parsed overrides
    layers: bool = False
    sequential: bool = False
    streamed: bool = False
    decode: int = DEFAULT_DECODE
    dtype: str | None = None
    record: bool = True
    same_recipe: bool = True


@dataclass(frozen=True)
class Bounds:
    """The tolerances a comparison is judged by, and how its metrics are computed."""

    tolerance: dict[str, float]
    same_recipe: dict[str, float]  # quantized candidates' second block ({} otherwise)
    tol_key: str  # the format whose defaults they are
    margin: float
    k: int
    decode_margin: float = 1.0  # the lead (nats) at which a greedy divergence counts


@dataclass(frozen=True)
class VerifyPlan:
    """Everything decided before a model is loaded."""

    candidate: Source
    adapter: Source
    base: Source
    digest: str | None  # the candidate's, when the registry holds it
    loader: CandidateLoader
    cand_dir: Path
    adapter_dir: Path
    base_dir: Path
    tmp: Path  # scratch space, removed after the run
    cand_cfg: dict[str, Any]
    base_cfg: dict[str, Any]
    fmt: str
    causal: bool
    bounds: Bounds
    recipe: dict[str, Any] | None  # quantized candidates: how they were quantized
    same_recipe_skip: str | None  # why the same-recipe block is not run, when it is not
    device: str
    mode: str  # whole | sequential | streamed
    dtype: str | None
    layers: bool
    inputs: InputSet
    vocab: int
    resized_vocab: tuple[int, int] | None  # (base, adapter) when the adapter resized the embeddings
    record: bool
    warnings: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return self.fmt in BNB_FORMATS

    @property
    def want_same_recipe(self) -> bool:
        return self.quantized and self.same_recipe_skip is None

    @property
    def sequential(self) -> bool:
        return self.mode == "sequential"

    @property
    def streamed(self) -> bool:
        return self.mode == "streamed"

    @property
    def hidden_size(self) -> int:
        return int(self.base_cfg.get("hidden_size") or 1)

    @property
    def n_layers(self) -> int:
        return int(self.base_cfg.get("num_hidden_layers") or 1)


# --------------------------------------------------------------------------- files and configs


def as_dir(src: Source, tmp: Path, name: str) -> Path:
    """A directory transformers can load: the source's own, or links to its registry blobs."""
    if src.root is not None and src.root.is_dir():
        return src.root
    d = tmp / name
    for rel, path in src.files.items():
        target = d / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path, target)
    return d


def is_causal(config: Mapping[str, Any]) -> bool:
    archs = config.get("architectures") or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def check_architecture(base_cfg: Mapping[str, Any], cand_cfg: Mapping[str, Any]) -> None:
    """Refuse early when the candidate cannot have been derived from the base."""
    diff = [
        f"{k} {cand_cfg.get(k)!r} vs {base_cfg.get(k)!r}"
        for k in _ARCH_KEYS
        if k in base_cfg and k in cand_cfg and base_cfg[k] != cand_cfg[k]
    ]
    if diff or is_causal(base_cfg) != is_causal(cand_cfg):
        raise InvalidArtifactError(
            "the candidate's architecture differs from the base's (" + (", ".join(diff) or "model class") + "): "
            "it was not made from this base",
            hint="pass the --base the candidate was merged into",
        )


# --------------------------------------------------------------------------- registry and lineage


def registry_if_any(registry: Registry | None) -> Registry | None:
    if registry is not None:
        return registry
    from adapterhub import config

    if not (config.home() / "index.db").exists():
        return None
    from adapterhub.registry import Registry

    return Registry()


def registry_digest(reg: Registry | None, src: Source) -> str | None:
    """The candidate's digest when the registry holds it (a ref, or a directory with the same content)."""
    if reg is None:
        return None
    digest = src.digest
    if digest is None:
        # A file of a size no stored file has cannot be in the registry: then
        # there is nothing to look up, and no reason to hash the whole model.
        sizes = {os.stat(p).st_size for p in src.files.values()}
        if reg.index.file_sizes(sizes) != sizes:
            return None
        from adapterhub.convert._service import digest_of

        digest = digest_of(src)
    return digest if reg.index.has_artifact(digest) else None


def _source_for(reg: Registry, digest: str, relation: str, recipe: dict[str, Any] | None) -> Source:
    refs = reg.index.refs_of(digest)
    if refs:
        return resolve_source(refs[0], reg)
    inp = ((recipe or {}).get("inputs") or {}).get(relation) or {}
    if inp.get("path") and Path(inp["path"]).exists():
        return resolve_source(inp["path"], reg)
    if inp.get("hub_id"):
        return resolve_source(f"hf:{inp['hub_id']}" + (f"@{inp['revision']}" if inp.get("revision") else ""), reg)
    raise NotFoundError(
        f"the {relation} {digest[:19]}… named by the lineage is neither in this registry nor at its recorded path",
        hint=f"pass --{relation} explicitly",
    )


def lineage_inputs(reg: Registry, digest: str, *, max_depth: int = 8) -> tuple[Source, Source]:
    """(adapter, base) recorded for ``digest``, walking up through ``source`` links
    (a quantized model made from a merged one)."""
    d = digest
    for _ in range(max_depth):
        parents = {p["relation"]: p for p in reg.index.parents(d)}
        ref = next((r for r in ("adapter", "converted_from", "extracted_from") if r in parents), None)
        if ref is not None and "base" in parents:  # converted_from/extracted_from: adapter_candidate.py
            a, b = parents[ref], parents["base"]
            return _source_for(reg, a["digest"], "adapter", a["recipe"]), _source_for(reg, b["digest"], "base", b["recipe"])
        if "source" not in parents:
            break
        d = parents["source"]["digest"]
    raise NotFoundError(
        "the registry records no adapter and base for this candidate",
        hint="pass --adapter ADAPTER --base BASE",
    )


def resolve_inputs(reg: Registry | None, req: Request, cand: Source, digest: str | None) -> tuple[Source, Source]:
    """(adapter, base): as given, else from the candidate's lineage in the registry."""
    if req.adapter is None:
        if req.base is not None:
            raise UsageError("--base needs --adapter (or neither, to read both from the registry lineage)")
        if digest is None or reg is None:
            raise UsageError(
                f"{cand.spec} is not in the registry, so its adapter and base are unknown",
                hint="pass --adapter ADAPTER --base BASE",
            )
        a_src, b_src = lineage_inputs(reg, digest)
    else:
        a_src = resolve_source(req.adapter, reg)
        b_src = resolve_base(a_src, req.base, reg)
    from adapterhub.verify.adapter_candidate import model_reference_ok

    if "adapter_config.json" not in a_src.files and not model_reference_ok(cand, a_src):
        raise InvalidArtifactError(f"{a_src.spec} has no adapter_config.json: --adapter takes a PEFT adapter")
    if "config.json" not in b_src.files:
        raise InvalidArtifactError(f"{b_src.spec} has no config.json: --base takes a transformers model directory")
    return a_src, b_src


# --------------------------------------------------------------------------- the plan


def make_bounds(fmt: str, base_fmt: str, overrides: Mapping[str, float], loader: CandidateLoader | None = None) -> Bounds:
    """Default bounds for the coarser of the two formats (a candidate kind's own,
    ``loader.tolerances``, for formats of its own), with the user's overrides."""
    from adapterhub.verify import metrics as vm

    if fmt in TOLERANCES:
        # An fp32 merge of a bf16 base is compared with a bf16 reference: the
        # coarser of the two sets the bounds.
        tol_key = max(fmt, base_fmt, key=FORMATS.index) if base_fmt in FORMATS else fmt
        defaults = TOLERANCES[tol_key]
    else:
        tol_key, defaults = fmt, (getattr(loader, "tolerances", None) or {}).get(fmt)
        if defaults is None:
            raise InvalidArtifactError(f"no default tolerances for candidates of format {fmt!r}")
    pre = vm.SAME_RECIPE_PREFIX
    tol = {**defaults, **{k: v for k, v in overrides.items() if not k.startswith(pre)}}
    same = {k.removeprefix(pre): v for k, v in overrides.items() if k.startswith(pre)}
    margin = tol.pop("margin", vm.DEFAULT_MARGIN)
    k = int(tol.pop("k", vm.DEFAULT_K))
    decode_margin = tol.pop("decode_margin", DECODE_MARGINS.get(tol_key, margin))
    same_tol = {**SAME_RECIPE_TOLERANCES[fmt], **same} if fmt in SAME_RECIPE_TOLERANCES else {}
    return Bounds(tol, same_tol, tol_key, margin, k, decode_margin)


def _same_recipe_skip(req: Request, recipe: dict[str, Any] | None, warnings: list[str]) -> str | None:
    if recipe is None:
        return None
    if not req.same_recipe:
        return "--no-same-recipe"
    if recipe["blocksize"] not in (None, 64):
        skip = f"block size {recipe['blocksize']}: transformers quantizes with 64 only, so it cannot rebuild this recipe"
        warnings.append(f"same-recipe reference skipped: {skip}")
        return skip
    return None


def _mode(req: Request, loader: CandidateLoader, base_cfg: dict[str, Any], base_dir: Path, adapter_dir: Path,
          cand_dir: Path, warnings: list[str]) -> tuple[str, str]:
    """(device, mode): whole, sequential (one model at a time) or streamed (one
    decoder layer of each at a time), from the request and the models' sizes."""
    from adapterhub.verify.streamed import layer_bytes

    requested = req.device
    dev = devices.pick_device(req.device)
    if req.streamed:
        return dev, "streamed"
    ref_bytes = devices.weights_bytes(base_dir) + devices.weights_bytes(adapter_dir)
    cand_bytes = devices.weights_bytes(cand_dir)
    streamable = getattr(loader, "streamable", False)
    fit = devices.Fit(ref_bytes, cand_bytes, layer_bytes(base_cfg, base_dir, ref_bytes) if streamable else 0)
    if devices.needs_streaming(dev, req.sequential, fit, warnings):
        return dev, "streamed"
    dev, sequential = devices.plan_device(dev, req.sequential, ref_bytes, cand_bytes, warnings, requested)
    if dev != requested and devices.needs_streaming(dev, sequential, fit, warnings):
        return dev, "streamed"  # fell back to the CPU, where the models do not fit either
    return dev, "sequential" if sequential else "whole"


def _cpu_4bit_mode(mode: str, loader: CandidateLoader, base_cfg: dict[str, Any], base_dir: Path, cand_dir: Path,
                   warnings: list[str]) -> str:
    """``mode``, or streamed when bitsandbytes cannot run the candidate's 4-bit layers on the CPU
    (the streamed path dequantizes them instead); where it cannot stream either, a UsageError."""
    from adapterhub.verify.loading import cpu_4bit_problem
    from adapterhub.verify.streamed import can_stream

    problem = cpu_4bit_problem(cand_dir)
    if problem is None:
        return mode
    if getattr(loader, "streamable", False) and can_stream(base_cfg, base_dir):
        warnings.append(f"{problem}: bitsandbytes cannot run it on the CPU, so verifying one decoder layer at a time (--streamed)")
        return "streamed"
    raise UsageError(f"{problem}: bitsandbytes cannot run it on the CPU", hint="verify it on a GPU (--device cuda)")


def make_plan(stack: ExitStack, reg: Registry | None, req: Request, tmp: Path) -> tuple[VerifyPlan, Registry | None]:
    """Resolve, read and decide (see the module doc); also the registry, opened
    here when the candidate is a registry ref. ``tmp`` holds links to registry blobs."""
    warnings: list[str] = []
    cand = resolve_source(req.candidate, reg)
    if reg is None and cand.origin == "registry":
        reg = registry_if_any(None)
        if reg is not None:
            stack.callback(reg.close)
    digest = registry_digest(reg, cand) if (cand.origin == "registry" or cand.root is not None) else None
    loader = pick_loader(cand)
    a_src, b_src = resolve_inputs(reg, req, cand, digest)
    cand_dir, a_dir, b_dir = as_dir(cand, tmp, "candidate"), as_dir(a_src, tmp, "adapter"), as_dir(b_src, tmp, "base")
    if hasattr(loader, "bind"):  # an adapter candidate runs on the base (adapter_candidate.py)
        loader.bind(b_dir)
    cand_cfg, base_cfg = loader.config(cand_dir), read_config(b_dir / "config.json")
    fmt = loader.format(cand_cfg, cand_dir)
    check_architecture(base_cfg, cand_cfg)
    causal = is_causal(base_cfg)
    own_base_fmt = detect_format(base_cfg, b_dir) if (req.dtype is None or fmt in BNB_FORMATS) else ""
    base_fmt = own_base_fmt if req.dtype is None else DTYPES[req.dtype]
    bounds = make_bounds(fmt, base_fmt, req.tolerance, loader)
    recipe = quant_recipe(cand_cfg, cand_dir, fmt, FMT_DTYPES.get(own_base_fmt, "float32")) if fmt in BNB_FORMATS else None
    sr_skip = _same_recipe_skip(req, recipe, warnings)
    resized = adapter_vocab(a_dir, b_dir, base_cfg)
    vocab = resized[1] if resized else int(base_cfg.get("vocab_size") or 2)
    cand_vocab = cand_cfg.get("vocab_size")
    if resized and cand_vocab is not None and int(cand_vocab) != vocab:
        raise InvalidArtifactError(
            f"the adapter resized the vocabulary to {vocab}, the candidate has {cand_vocab} tokens: "
            "it was not merged from this adapter"
        )
    device, mode = _mode(req, loader, base_cfg, b_dir, a_dir, cand_dir, warnings)
    if device == "cpu" and mode != "streamed" and fmt in ("nf4", "fp4"):
        mode = _cpu_4bit_mode(mode, loader, base_cfg, b_dir, cand_dir, warnings)
    max_len = int(base_cfg.get("max_position_embeddings") or 512)
    inputs = make_inputs(req.prompts, [cand_dir, b_dir, a_dir], vocab=vocab, max_len=max_len,
                         decode=max(0, int(req.decode)) if causal else 0)
    plan = VerifyPlan(
        candidate=cand, adapter=a_src, base=b_src, digest=digest, loader=loader, cand_dir=cand_dir,
        adapter_dir=a_dir, base_dir=b_dir, tmp=tmp, cand_cfg=cand_cfg, base_cfg=base_cfg, fmt=fmt, causal=causal,
        bounds=bounds, recipe=recipe, same_recipe_skip=sr_skip, device=device, mode=mode, dtype=req.dtype,
        layers=req.layers, inputs=inputs, vocab=vocab, resized_vocab=resized, record=req.record and reg is not None,
        warnings=warnings,
    )
    return plan, reg
