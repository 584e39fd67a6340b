"""Numerical verification: does a merged or quantized model compute what base + adapter compute?

The reference is the base model with the adapter applied by PEFT, unmerged
(``PeftModel.from_pretrained``). The candidate (a merged or bitsandbytes
quantized checkpoint) is loaded as a plain transformers model. Both run the
same inputs, and ``adapterhub.verify.metrics`` compares their final logits
(or, for encoders such as BERT, their last hidden states and mean-pooled
embeddings) against per-format tolerances (``plan.TOLERANCES``, measured: see
docs/verification.md). The verdict is PASS or FAIL.

A quantized candidate (NF4, FP4, int8) is also compared with a second,
**same-recipe** reference: base + adapter merged by PEFT (``merge_and_unload``)
and quantized on load by transformers + bitsandbytes with the candidate's own
``quantization_config``. Our quantizer writes what transformers writes, so a
correct candidate matches it to within a flipped quantization bucket or two,
while a dropped module or a wrong alpha lands far off; the 4-bit rounding noise
that blurs the full-precision comparison cancels out. Both comparisons must
pass (``plan.SAME_RECIPE_TOLERANCES`` bound the second).

An adapter saved with resized token embeddings (new tokens) gets the base's
embeddings resized to its vocabulary before PEFT loads it, as PEFT users do.

Three steps: :func:`~adapterhub.verify.plan.make_plan` decides everything
before a model is loaded; a runner (:class:`Runner` here, whole models, or
:class:`~adapterhub.verify.streamed.StreamedRunner`, one decoder layer at a
time) produces the outputs; :func:`~adapterhub.verify.report.judge` turns
them into the verdict and the report.

>>> from adapterhub.verify import verify                       # doctest: +SKIP
>>> rep = verify("team/qa-merged:1")                           # adapter + base from the lineage
>>> rep.verdict, rep.metrics["rel"]
('PASS', 3.1e-07)

When the candidate is in the registry the report is stored as a verification
record of its digest (``Registry.add_verification``); ``adapterhub show``
prints the last verdict and ``adapterhub search --verified`` filters on it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import UsageError
from adapterhub.progress import ProgressFactory
from adapterhub.verify import adapter_candidate
from adapterhub.verify.devices import batch_size_for, free_memory
from adapterhub.verify.inputs import pad
from adapterhub.verify.loading import load_reference, load_same_recipe, param_dtype, save_merged
from adapterhub.verify.plan import DEFAULT_DECODE, Request, VerifyPlan, make_plan, registry_if_any
from adapterhub.verify.report import ModelRun, RunOutputs, VerifyReport, judge

if TYPE_CHECKING:
    import torch

    from adapterhub.registry import Registry



class NullBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def total_ticks(plan: VerifyPlan) -> int:
    """Progress ticks: one per batch of each model (over-counted as one per sequence) and decoded sequence."""
    n, d = len(plan.inputs.seqs), len(plan.inputs.decode_seqs) if plan.inputs.decode else 0
    return 2 * (n + d) + (n if plan.want_same_recipe else 0)


class Runner:
    """Loads the models whole and runs them on the plan's inputs.

    One model in memory at a time with ``--sequential``; otherwise the
    reference and the candidate together, then the same-recipe one alone.
    """

    def __init__(self, plan: VerifyPlan, progress: ProgressFactory | None = None) -> None:
        self.plan = plan
        self.bar = (progress or (lambda desc, total: NullBar()))("verifying", total_ticks(plan))
        self.runs: dict[str, ModelRun] = {}
        self.dtypes: dict[str, str] = {}
        self.batch = 0
        self.sr_times: dict[str, float] = {}

    # ----------------------------------------------------------------- loading

    def load(self, which: str) -> tuple[Any, float]:
        p = self.plan
        t = time.perf_counter()
        if which == "reference" and adapter_candidate.reference_is_model(p.adapter_dir):
            m = adapter_candidate.load_model_reference(p.adapter_dir, p.causal, p.device, p.dtype)
        elif which == "reference":
            m = load_reference(p.base_dir, p.adapter_dir, p.causal, p.device, p.dtype, p.vocab if p.resized_vocab else None)
        else:
            m = p.loader.load(p.cand_dir, causal=p.causal, device=p.device, dtype=p.dtype, fmt=p.fmt)
        self.dtypes[which] = param_dtype(m)
        return m, time.perf_counter() - t

    def merged_dir(self, ref_model: Any | None) -> Path | None:
        """Save the PEFT merge in the recipe's dtype: the loaded reference when
        its dtype is that one (``ref_model``), else None (built later)."""
        recipe = self.plan.recipe or {}
        if ref_model is None or self.dtypes["reference"] != recipe.get("dtype"):
            return None
        t = time.perf_counter()
        out = save_merged(ref_model, self.plan.tmp / "same-recipe-merged")
        self.sr_times["merge_save_s"] = time.perf_counter() - t
        return out

    def run_same_recipe(self, merged: Path | None) -> None:
        """Build (when needed), quantize, run and free the same-recipe reference."""
        p = self.plan
        if merged is None:  # the reference ran in another dtype: merge again in the recipe's
            t = time.perf_counter()
            pm = load_reference(p.base_dir, p.adapter_dir, p.causal, p.device, (p.recipe or {})["dtype"],
                                p.vocab if p.resized_vocab else None)
            merged = save_merged(pm, p.tmp / "same-recipe-merged")
            pm = None
            free_memory()
            self.sr_times["merge_save_s"] = time.perf_counter() - t
        t = time.perf_counter()
        m = load_same_recipe(merged, p.cand_cfg, p.causal, p.device, p.dtype)
        self.dtypes["same_recipe"] = param_dtype(m)
        self.forward("same_recipe", m, time.perf_counter() - t, full=False)
        m = None
        free_memory()
        shutil.rmtree(merged, ignore_errors=True)  # the merged copy can be as big as the base

    # ----------------------------------------------------------------- running

    def forward(self, which: str, model: Any, load_s: float, full: bool = True) -> None:
        p = self.plan
        seqs = p.inputs.lists()
        if not self.batch:
            width = p.vocab if p.causal else p.hidden_size
            self.batch = batch_size_for(
                p.device, max(len(s) for s in seqs), width, p.hidden_size, p.n_layers if p.layers else 0, len(seqs)
            )
        t = time.perf_counter()
        out, hidden, self.batch = forward_all(
            model, seqs, p.inputs.pad_id, p.device, p.causal, p.layers and full, self.batch, lambda: self.bar.update(1)
        )
        decoded = margins = None
        if p.inputs.decode and full:
            decoded, margins = greedy_decode(model, p.inputs.decode_seqs, p.inputs.decode, p.device)
            self.bar.update(len(p.inputs.decode_seqs))
        self.runs[which] = ModelRun(out, hidden, decoded, load_s, time.perf_counter() - t, margins)

    def run(self) -> RunOutputs:
        import torch

        p = self.plan
        try:
            if p.sequential:
                for which in ("reference", "candidate"):
                    m, s = self.load(which)
                    self.forward(which, m, s)
                    merged = self.merged_dir(m) if (which == "reference" and p.want_same_recipe) else None
                    m = None
                    free_memory()
                    if which == "reference" and p.want_same_recipe:
                        self.run_same_recipe(merged)
            else:
                ref_m, rs = self.load("reference")
                cand_m, cs = self.load("candidate")
                self.forward("reference", ref_m, rs)
                self.forward("candidate", cand_m, cs)
                cand_m = None
                merged = self.merged_dir(ref_m) if p.want_same_recipe else None
                ref_m = None
                free_memory()
                if p.want_same_recipe:
                    self.run_same_recipe(merged)
        except torch.cuda.OutOfMemoryError:
            raise UsageError(
                "ran out of GPU memory loading or running the models", hint="use --sequential, --streamed or --device cpu"
            ) from None
        finally:
            self.bar.close()
        _, mask = pad(p.inputs.seqs, p.inputs.pad_id)
        return RunOutputs(self.runs, mask.bool(), self.dtypes, self.batch, self.sr_times)


def forward_all(
    model: Any, seqs: list[list[int]], pad_id: int, device: str, causal: bool, layers: bool, batch: int, tick: Callable[[], None]
) -> tuple[torch.Tensor, list[torch.Tensor] | None, int]:
    """Outputs of every sequence, batched and padded, kept on the CPU in fp32.
    Halves the batch on CUDA out-of-memory. Returns (output, hidden states, batch used)."""
    import torch

    t_max = max(len(s) for s in seqs)
    outs: list[torch.Tensor] = []
    hiddens: list[list[torch.Tensor]] = []
    i = 0
    while i < len(seqs):
        chunk = seqs[i : i + batch]
        ids, mask = pad(chunk, pad_id)
        try:
            with torch.inference_mode():
                o = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=layers)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise UsageError(
                    "ran out of GPU memory running one sequence", hint="use --streamed, or --device cpu"
                ) from None
            batch = max(1, batch // 2)
            torch.cuda.empty_cache()
            continue
        main = o.logits if causal else o.last_hidden_state
        width = t_max - main.shape[1]
        outs.append(torch.nn.functional.pad(main.float().cpu(), (0, 0, 0, width)))
        if layers:
            hiddens.append([torch.nn.functional.pad(h.float().cpu(), (0, 0, 0, width)) for h in o.hidden_states])
        i += len(chunk)
        tick()
    hidden = [torch.cat(per_layer) for per_layer in zip(*hiddens)] if layers else None
    return torch.cat(outs), hidden, batch


def greedy_decode(model: Any, seqs: list[list[int]], n: int, device: str) -> tuple[list[list[int]], list[list[float]]]:
    """``n`` greedy tokens after each sequence (one sequence at a time, no padding),
    and at each step the top token's lead over the runner-up in log-probability."""
    import torch

    out, margins = [], []
    with torch.inference_mode():
        for s in seqs:
            ids = torch.tensor([s], dtype=torch.long, device=device)
            new: list[int] = []
            gaps: list[float] = []
            for _ in range(n):
                logits = model(input_ids=ids).logits[0, -1]
                if not torch.isfinite(logits).all():
                    break
                t = int(logits.argmax())
                new.append(t)
                gaps.append(top_gap(logits))
                ids = torch.cat([ids, torch.tensor([[t]], device=device)], dim=1)
            out.append(new)
            margins.append(gaps)
    return out, margins


def top_gap(logits: torch.Tensor) -> float:
    """log p(top token) − log p(runner-up), in nats."""
    import torch

    if logits.shape[-1] < 2:
        return float("inf")
    top2 = torch.log_softmax(logits.float(), dim=-1).topk(2).values
    return float(top2[0] - top2[1])


def verify(
    candidate: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    *,
    registry: Registry | None = None,
    device: str = "auto",
    prompts: str | os.PathLike | None = None,
    tolerance: Sequence[str] | dict[str, float] | None = None,
    layers: bool = False,
    sequential: bool = False,
    streamed: bool = False,
    decode: int = DEFAULT_DECODE,
    dtype: str | None = None,
    record: bool = True,
    progress: ProgressFactory | None = None,
    same_recipe: bool = True,
) -> VerifyReport:
    """Compare CANDIDATE with base + adapter (PEFT, unmerged) and judge it. See the module doc.

    ``streamed=True`` runs both one decoder layer at a time (memory for about
    one layer of each); it is also chosen when the models do not fit.
    ``same_recipe=False`` skips the second reference of quantized candidates.
    ``tolerance`` keys prefixed ``same.`` (``same.rel``) bound that comparison.
    """
    from adapterhub.verify import metrics as vm

    t0 = time.perf_counter()
    try:
        tol_over = vm.parse_tolerance(tolerance)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if streamed and sequential:
        raise UsageError("--streamed and --sequential are two ways of holding the models: pass one")
    req = Request(
        candidate, adapter, base, device=device, prompts=prompts, tolerance=tol_over, layers=layers, sequential=sequential,
        streamed=streamed, decode=decode, dtype=dtype, record=record, same_recipe=same_recipe,
    )
    with ExitStack() as stack:
        reg = registry_if_any(registry)
        if reg is not None and registry is None:
            stack.callback(reg.close)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="adapterhub-verify-")))
        plan, reg = make_plan(stack, reg, req, tmp)
        outputs = run_plan(plan, progress)
        report = judge(plan, outputs, t0)
        if plan.record and plan.digest is not None and reg is not None:
            report.recorded = True
            reg.add_verification(plan.digest, report.to_dict())
        return report


def run_plan(plan: VerifyPlan, progress: ProgressFactory | None = None) -> RunOutputs:
    """The plan's outputs, from the runner its mode asks for."""
    if plan.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    if plan.streamed:
        from adapterhub.verify.streamed import StreamedRunner

        return StreamedRunner(plan, progress).run()
    return Runner(plan, progress).run()
