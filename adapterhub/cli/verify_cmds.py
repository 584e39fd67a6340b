"""verify: numerical verification of a merged or quantized model."""

from __future__ import annotations

from pathlib import Path

import click

from adapterhub.cli._output import Output, echo, json_option, quiet_option, table


def _fmt(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _quiet_transformers() -> None:
    """transformers' loading bars would bury the report (its warnings are off already, unless -v)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _print_report(rep) -> None:
    from adapterhub.verify.metrics import TOLERANCE_KEYS

    m = rep.metrics
    echo(f"candidate: {rep.candidate.get('ref') or rep.candidate.get('path') or rep.candidate.get('spec')}  ({rep.format}, {rep.model_kind}; {rep.tolerance.get('from')} bounds)")
    resized = (rep.reference or {}).get("resized_vocab")
    note = f"; base embeddings resized {resized[0]} → {resized[1]} tokens to fit the adapter" if resized else ""
    echo(f"reference: base {rep.base.get('ref') or rep.base.get('path') or rep.base.get('spec')} + adapter {rep.adapter.get('ref') or rep.adapter.get('path') or rep.adapter.get('spec')} (PEFT, unmerged{note})")
    echo(
        f"inputs: {rep.inputs['sequences']} {rep.inputs['source']} sequences, lengths {rep.inputs['lengths']}; "
        f"device {rep.device}, dtypes {rep.dtypes.get('reference')}/{rep.dtypes.get('candidate')}, batch {rep.batch_size}"
        + (", sequential" if rep.sequential else "")
        + (", streamed one decoder layer at a time" if getattr(rep, "streamed", False) else "")
    )
    sr = rep.same_recipe or {}
    if "metrics" in sr:
        echo(f"same-recipe reference: {sr['reference']}")
    elif sr.get("skipped"):
        echo(f"same-recipe reference: skipped ({sr['skipped']})")
    by_metric = {metric: (key, direction) for key, (metric, direction) in TOLERANCE_KEYS.items()}

    def check(metric: str, value, tolerance: dict, failures: list[str]) -> tuple[str | None, str | None]:
        key, direction = by_metric.get(metric, (None, None))
        tol = tolerance.get(key) if key else None
        bound = f"{'≤' if direction == 'max' else '≥'} {tol:g}" if tol is not None else None
        ok = None if tol is None or value is None else ("FAIL" if any(f.startswith(metric + " ") for f in failures) else "ok")
        return bound, ok

    rows = []
    for metric in ("max_abs", "mean_abs", "rel", "cos_min", "cos_mean", "kl_mean", "kl_max", "top1", "topk", "decode_agree"):
        if metric not in m:
            continue
        row = (metric, _fmt(m[metric]), *check(metric, m[metric], rep.tolerance, rep.failures))
        if "metrics" in sr:  # the same-recipe block beside the full-precision one
            v = sr["metrics"].get(metric)
            row += (_fmt(v), *check(metric, v, sr["tolerance"], sr["failures"]))
        rows.append(row)
    head = ("metric", "value", "tolerance", "check")
    if "metrics" in sr:
        head += ("same-recipe", "tolerance", "check")
    table(head, rows)
    if "clear_positions" in m:
        echo(f"clear positions (top-1 margin ≥ {m['margin']:g} nats): {m['clear_positions']} of {m['positions']}; top-k with k={m['k']}")
    if rep.pooled:
        echo(f"pooled embeddings: rel {_fmt(rep.pooled['rel'])}, min cosine {_fmt(rep.pooled['cos_min'])}")
    if rep.decode:
        d = rep.decode
        state = "identical" if d["all_equal"] else f"first divergent position per sequence {d['first_divergence']}"
        if not d["all_equal"] and "clear_divergence" in d:
            state += f" ({sum(d['clear_divergence'])} where the reference's top token led by ≥ {rep.metrics.get('decode_margin', 1):g} nats)"
        echo(f"greedy decode ({d['tokens']} tokens × {d['sequences']} sequences): {state}")
    if rep.layers:
        lr = rep.layers
        table(("layer", "rel", "cos min", "max abs"), [
            ("embeddings" if r["layer"] == 0 else r["layer"], _fmt(r["rel"]), _fmt(r["cos_min"]), _fmt(r["max_abs"])) for r in lr["layers"]
        ])
        if lr["first_divergent"] is not None:
            echo(f"first layer past the rel tolerance: {lr['first_divergent']}")
    t, mem = rep.timings, rep.memory
    st = sr.get("timings") or {}
    gpu = f", GPU peak {mem['cuda_max_allocated_mb']:.0f} MB" if "cuda_max_allocated_mb" in mem else ""
    extra = f", same-recipe {sum(st.values()):.1f} s" if st else ""
    echo(
        f"time: load {t['load_reference_s'] + t['load_candidate_s']:.1f} s, run {t['run_reference_s'] + t['run_candidate_s']:.1f} s{extra}, "
        f"total {t['total_s']:.1f} s; peak RSS {mem['peak_rss_mb']:.0f} MB{gpu}"
    )
    for f in rep.failures:
        echo(f"  fail: {f}")
    echo(f"{rep.verdict}" + (" (recorded in the registry)" if rep.recorded else ""))


@click.command(name="verify")
@click.argument("candidate", required=False)
@click.option("--adapter", "-a", help="The adapter (dir, registry ref or cached Hub id). Default: from the registry lineage.")
@click.option("--base", "-b", help="The base model. Default: from the lineage, else the adapter's base_model_name_or_path.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Text prompts, one per line (needs a tokenizer). Default: seeded token sequences.")
@click.option("--decode", type=click.IntRange(0, 256), default=8, show_default=True, help="Greedy-decode N tokens from both (causal LMs) and report where they diverge.")
@click.option("--layers", is_flag=True, help="Also compare every layer's hidden states, to find the first that drifts.")
@click.option("--tolerance", "tolerance", multiple=True, metavar="KEY=VALUE", help="Override a bound: rel, cos, kl, top1, topk, max_abs, mean_abs (and margin, k); same.KEY for the same-recipe block.")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
    help="auto uses a GPU when there is one (and falls back to the CPU when the models do not fit).",
)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Load both models in this dtype (default: each its own).")
@click.option("--sequential", is_flag=True, help="Load one model at a time (reference, same-recipe reference, candidate) to cut peak memory.")
@click.option(
    "--streamed", is_flag=True,
    help="Run both models one decoder layer at a time: memory for about one layer of each (Llama-family decoders; "
    "chosen by itself when the models do not fit).",
)
@click.option(
    "--no-same-recipe", is_flag=True,
    help="Quantized candidates: skip the second reference (PEFT merge quantized with the candidate's recipe), and its cost.",
)
@click.option("--no-record", is_flag=True, help="Do not store the report in the registry.")
@click.option("--self-test", "self_test", is_flag=True, help="Build a correct and two broken merges (and NF4 quantizations) and check that only the correct ones pass.")
@json_option
@quiet_option
def verify_cmd(candidate, adapter, base, prompts, decode, layers, tolerance, device, dtype, sequential, streamed, no_same_recipe, no_record, self_test, json_, quiet):
    """Check numerically that a merged or quantized model matches base + adapter.

    The reference is BASE with ADAPTER applied by PEFT (unmerged); CANDIDATE
    is loaded as a plain transformers model (bitsandbytes for NF4/FP4/int8).
    Both run the same inputs; the final logits (hidden states for encoders)
    are compared against tolerances for the candidate's format. A quantized
    candidate must also match, within tight bounds (--tolerance same.rel=…), base +
    adapter merged by PEFT and quantized with the candidate's own recipe
    (--no-same-recipe skips this). Exit code 0
    on PASS, 1 on FAIL (non-finite output fails). A candidate in the registry
    gets the report stored with it: `show` prints the last verdict and
    `search --verified` finds versions that passed.

    \b
    Examples:
      adapterhub verify team/qa-merged:1                 # adapter + base from the lineage
      adapterhub verify ./qa-merged --adapter ./qa-lora --base ./Llama-2-7b-hf
      adapterhub verify team/qa-nf4 --layers --json
      adapterhub verify ./qa-merged -a ./qa-lora --prompts prompts.txt --tolerance rel=0.01
      adapterhub verify --self-test
    """
    out = Output(json_, quiet)
    ctx = click.get_current_context()
    _quiet_transformers()
    if self_test:
        from adapterhub.verify.selftest import self_test as run_self_test

        cases = run_self_test(device="cpu" if device == "auto" else device)
        ok = all(c.ok for c in cases)
        out.result(
            {"ok": ok, "cases": [c.to_dict() for c in cases]},
            lambda: (
                table(("case", "expected", "verdict", "rel", "cos min", "same-recipe rel", "check"),
                      [(c.name, c.expected, c.verdict, _fmt(c.rel), _fmt(c.cos_min), _fmt(c.same_recipe_rel), "ok" if c.ok else "WRONG") for c in cases]),
                echo("self-test passed: broken merges fail" if ok else "self-test FAILED: verification did not tell broken merges apart"),
            ),
        )
        ctx.exit(0 if ok else 1)
    if not candidate:
        raise click.UsageError("missing CANDIDATE (or pass --self-test)")
    from adapterhub.verify import verify

    rep = verify(
        candidate, adapter, base, device=device, prompts=prompts, tolerance=list(tolerance), layers=layers,
        sequential=sequential, streamed=streamed, decode=decode, dtype=dtype, record=not no_record, progress=out.steps("batch"),
        same_recipe=not no_same_recipe,
    )
    for w in rep.warnings:
        out.warn(w)
    out.result(rep.to_dict(), lambda: echo(rep.verdict) if quiet else _print_report(rep))
    ctx.exit(0 if rep.ok else 1)
