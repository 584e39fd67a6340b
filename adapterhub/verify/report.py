"""The judge: from the outputs of a run and the plan's bounds to a verdict and
the report (``VerifyReport``) that ``verify`` returns, prints and records.

The whole-model and the layer-streamed runners hand the judge the same
``RunOutputs``, so the report and the verdict do not depend on how the models
were held.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError

if TYPE_CHECKING:
    import torch

    from adapterhub.verify.plan import VerifyPlan


@dataclass
class ModelRun:
    """One model's outputs on the plan's inputs."""

    out: torch.Tensor  # [N, T, D] float32 on the CPU: logits (causal LMs) or last hidden states
    hidden: list[torch.Tensor] | None  # per layer, [N, T, H] (whole-model runs with --layers)
    decoded: list[list[int]] | None  # greedy tokens per decoded sequence
    load_s: float = 0.0
    run_s: float = 0.0
    # per decoded sequence and step: the top token's lead over the runner-up (nats)
    decode_margins: list[list[float]] | None = None


@dataclass
class RunOutputs:
    """What a runner hands to the judge."""

    runs: dict[str, ModelRun]  # reference, candidate, and same_recipe for quantized candidates
    mask: torch.Tensor  # [N, T] bool: real positions
    dtypes: dict[str, str]
    batch: int
    same_recipe_times: dict[str, float] = field(default_factory=dict)
    # streamed runs compare layer by layer on the way and hand over the rows
    layer_rows: dict[str, Any] | None = None
    # first layer whose output holds a non-finite value, per model (streamed runs)
    nonfinite_layer: dict[str, int] = field(default_factory=dict)


@dataclass
class VerifyReport:
    verdict: str  # PASS | FAIL
    format: str
    model_kind: str  # causal-lm | encoder
    candidate: dict[str, Any]
    adapter: dict[str, Any]
    base: dict[str, Any]
    device: str
    dtypes: dict[str, str]
    inputs: dict[str, Any]
    metrics: dict[str, Any]
    tolerance: dict[str, Any]  # the bounds used, and "from": the format whose defaults they are
    failures: list[str]
    pooled: dict[str, Any] | None = None
    decode: dict[str, Any] | None = None
    layers: dict[str, Any] | None = None
    # quantized candidates: the comparison with the same-recipe reference, or {"skipped": why}
    same_recipe: dict[str, Any] | None = None
    reference: dict[str, Any] = field(default_factory=dict)  # how the reference was built
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 0
    sequential: bool = False
    versions: dict[str, str | None] = field(default_factory=dict)
    recorded: bool = False
    created_at: str = ""
    streamed: bool = False  # run one decoder layer at a time

    @property
    def ok(self) -> bool:
        return self.verdict == "PASS"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    def summary(self) -> dict[str, Any]:
        """The short form that ``show`` prints and provenance can carry."""
        keys = ("rel", "cos_min", "kl_mean", "top1", "max_abs")
        out = {
            "verdict": self.verdict,
            "format": self.format,
            "device": self.device,
            "metrics": {k: self.metrics.get(k) for k in keys},
            "failures": self.failures,
            "created_at": self.created_at,
        }
        sr = self.same_recipe or {}
        if "metrics" in sr:
            out["same_recipe"] = {"verdict": sr["verdict"], "metrics": {k: sr["metrics"].get(k) for k in keys}}
        return out


# --------------------------------------------------------------------------- the judge


def _decode_block(plan: VerifyPlan, ref: ModelRun, cnd: ModelRun) -> dict[str, Any] | None:
    """Where the greedy decodes part, and whether they part where the reference was sure.

    A divergence counts against the candidate ("clear") when, at that step,
    the reference's top token led the runner-up by at least ``decode_margin``
    nats (per format: ``plan.DECODE_MARGINS``): where the reference hesitates,
    the format's rounding may pick the other token, as for top-1 agreement.
    """
    from adapterhub.verify import metrics as vm

    if not plan.inputs.decode or ref.decoded is None or cnd.decoded is None:
        return None
    divs = [vm.first_divergence(a, b) for a, b in zip(ref.decoded, cnd.decoded)]
    margins = ref.decode_margins or [[] for _ in divs]
    clear = [
        d is not None and (d >= min(len(m), len(c)) or m[d] >= plan.bounds.decode_margin)  # a stop (non-finite logits) counts
        for d, m, c in zip(divs, margins, cnd.decoded)
    ]
    return {
        "tokens": plan.inputs.decode,
        "sequences": len(divs),
        "first_divergence": divs,
        "all_equal": all(d is None for d in divs),
        # the reference's lead (nats) at the step where the candidate left it
        "margin_at_divergence": [m[d] if d is not None and d < len(m) else None for d, m in zip(divs, margins)],
        "clear_divergence": clear,
        "agree": 1 - sum(clear) / len(divs) if divs else None,
    }


def _same_recipe_block(plan: VerifyPlan, outs: RunOutputs, fails: list[str]) -> dict[str, Any] | None:
    """The same-recipe comparison of a quantized candidate; appends its failures to ``fails``."""
    from adapterhub.verify import metrics as vm

    if not plan.quantized:
        return None
    info: dict[str, Any] = {"recipe": plan.recipe}
    sr = outs.runs.get("same_recipe")
    if sr is None:
        info["skipped"] = plan.same_recipe_skip
        return info
    b = plan.bounds
    metrics = vm.compare(sr.out, outs.runs["candidate"].out, outs.mask, logits=plan.causal, margin=b.margin, k=b.k)
    sr_fails = vm.failures(metrics, b.same_recipe)
    fails += [f"same-recipe: {f}" for f in sr_fails]
    recipe = plan.recipe or {}
    info.update(
        reference=(
            f"base + adapter merged by PEFT (merge_and_unload) in {recipe.get('dtype')}, "
            f"quantized to {plan.fmt} by transformers + bitsandbytes with the candidate's quantization_config"
        ),
        verdict="FAIL" if sr_fails else "PASS",
        metrics=metrics,
        tolerance=dict(b.same_recipe),
        failures=sr_fails,
        timings={
            "merge_save_s": round(outs.same_recipe_times.get("merge_save_s", 0.0), 3),
            "load_s": round(sr.load_s, 3),
            "run_s": round(sr.run_s, 3),
        },
    )
    return info


def _layer_block(plan: VerifyPlan, outs: RunOutputs, ref: ModelRun, cnd: ModelRun) -> dict[str, Any] | None:
    from adapterhub.verify import metrics as vm

    if not plan.layers:
        return None
    if outs.layer_rows is not None:
        return outs.layer_rows
    if ref.hidden is None or cnd.hidden is None:
        return None
    return vm.layer_drift(ref.hidden, cnd.hidden, outs.mask, rel_tol=plan.bounds.tolerance.get("rel"))


def _nonfinite_note(outs: RunOutputs, fails: list[str]) -> list[str]:
    """Say at which layer non-finite values first appeared, where the runner knows it."""
    where = {"candidate": "the candidate", "reference": "the reference"}
    out = []
    for f in fails:
        for which, layer in outs.nonfinite_layer.items():
            if f.startswith(where.get(which, which) + " produced") and "non-finite" in f:
                f = f"{f}, first in the output of decoder layer {layer}"
        out.append(f)
    return out


def _memory(device: str) -> dict[str, Any]:
    from adapterhub.verify.devices import peak_rss_mb

    memory: dict[str, Any] = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if device == "cuda":
        import torch

        memory["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / (1 << 20), 1)
        memory["gpu"] = torch.cuda.get_device_name(0)
    return memory


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {p: version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")}


def judge(plan: VerifyPlan, outs: RunOutputs, t0: float) -> VerifyReport:
    """Metrics against the plan's bounds: the verdict and the full report."""
    import torch

    from adapterhub.verify import metrics as vm

    ref, cnd = outs.runs["reference"], outs.runs["candidate"]
    if ref.out.shape != cnd.out.shape:
        raise InvalidArtifactError(
            f"the outputs differ in shape (reference {tuple(ref.out.shape)}, candidate {tuple(cnd.out.shape)}): "
            "the candidate was not made from this base and adapter"
        )
    b, mask, warnings = plan.bounds, outs.mask, list(plan.warnings)
    metrics = vm.compare(ref.out, cnd.out, mask, logits=plan.causal, margin=b.margin, k=b.k)
    metrics["margin"], metrics["k"] = b.margin, b.k
    decode = _decode_block(plan, ref, cnd)
    if decode is not None:
        metrics["decode_agree"], metrics["decode_margin"] = decode["agree"], b.decode_margin
    fails = _nonfinite_note(outs, vm.failures(metrics, b.tolerance))
    if plan.causal and metrics.get("clear_positions") == 0:
        warnings.append(f"no position has a clear top-1 (margin ≥ {b.margin:g} nats): top-1/top-k were not checked")
    pooled = None
    if not plan.causal:
        pr, pc = vm.mean_pool(ref.out, mask), vm.mean_pool(cnd.out, mask)
        pm = torch.ones(pr.shape[0], 1, dtype=torch.bool)
        pooled = vm.compare(pr.unsqueeze(1), pc.unsqueeze(1), pm, logits=False)
    sr_info = _same_recipe_block(plan, outs, fails)
    reference: dict[str, Any] = {"method": "PEFT, unmerged", "resized_vocab": list(plan.resized_vocab) if plan.resized_vocab else None}
    if plan.streamed:
        reference["method"] = "the adapter applied unmerged, as PEFT applies it, one decoder layer at a time"
    report = VerifyReport(
        verdict="FAIL" if fails else "PASS",
        format=plan.fmt,
        model_kind="causal-lm" if plan.causal else "encoder",
        candidate={**plan.candidate.to_dict(), "digest": plan.digest},
        adapter=plan.adapter.to_dict(),
        base=plan.base.to_dict(),
        device=plan.device,
        dtypes=outs.dtypes,
        inputs=plan.inputs.describe(),
        metrics=metrics,
        tolerance={**b.tolerance, "from": b.tol_key},
        failures=fails,
        pooled=pooled,
        decode=decode,
        layers=_layer_block(plan, outs, ref, cnd),
        same_recipe=sr_info,
        reference=reference,
        warnings=warnings,
        timings={
            "load_reference_s": round(ref.load_s, 3),
            "run_reference_s": round(ref.run_s, 3),
            "load_candidate_s": round(cnd.load_s, 3),
            "run_candidate_s": round(cnd.run_s, 3),
            "total_s": round(time.perf_counter() - t0, 3),
        },
        memory=_memory(plan.device),
        batch_size=outs.batch,
        sequential=plan.sequential,
        versions=_versions(),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        streamed=plan.streamed,
    )
    return report
