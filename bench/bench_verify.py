"""Verify a bf16 merge of the 0.94B Llama shape: whole models vs ``--streamed``.

Fixture: ``bench_merge.py``'s (a Llama-shaped bf16 checkpoint, hidden 2048,
intermediate 5632, 17 layers, vocab 32000, tied embeddings: 939M parameters,
1.75 GiB in two shards; a PEFT LoRA r=16 on all seven projections), cached
under ``--tmp``, and its merge by ``adapterhub merge`` (cached beside it).

Measured, each as its own child process (``python -m adapterhub.cli verify
MERGED -a ADAPTER -b BASE --device cpu --no-record --json``), median of
``--repeats`` runs alternating between the two:

- the whole-model path (base + adapter by PEFT, and the candidate, both held);
- ``--streamed`` (one decoder layer of each at a time).

Wall time runs from spawn to exit (start-up included); peak RSS is the
child's own, from GNU time (see ``_common.run_child``). One unrecorded
warm-up run of each comes first, so both find the checkpoint and the libraries
in the page cache. Goals (issue 18): streamed peak RSS ≤ 25% of the
checkpoint (the whole-model path needs more than 200%), streamed time ≤ 1.5×
the whole-model path's. The two reports must agree: same verdict, and the
streamed metrics close to the whole-model ones (bf16 arithmetic in both).

    python bench/bench_verify.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import gib, load, machine_line, median, print_table, run_child, verdict  # noqa: E402
from bench_merge import DEFAULT_TMP, ensure_fixtures, weights_bytes  # noqa: E402

GOAL_RSS = 0.25  # streamed peak RSS / checkpoint bytes
GOAL_WHOLE_RSS = 2.0  # the whole-model path needs more than this
GOAL_TIME = 1.5  # streamed wall / whole-model wall


def ensure_merged(root: Path, base: Path, adapter: Path) -> Path:
    out = root / "merged-bf16"
    if not (out / "config.json").exists():
        print(f"merging into {out} ...", flush=True)
        run_child([sys.executable, "-m", "adapterhub.cli", "merge", str(adapter), "--base", str(base), "-o", str(out),
                   "--device", "cpu", "--json"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="median over this many runs of each (default 2)")
    ap.add_argument("--tmp", default=DEFAULT_TMP, help=f"fixtures, cached (default {DEFAULT_TMP})")
    ap.add_argument("--layers", type=int, default=17, help="decoder layers (default 17: 0.94B params, 1.75 GiB)")
    ap.add_argument("--decode", type=int, default=8, help="greedy tokens per decoded sequence (default 8, verify's)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    args = ap.parse_args()

    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    base, adapter = ensure_fixtures(tmp, args.layers)
    merged = ensure_merged(base.parent, base, adapter)
    ckpt = weights_bytes(merged)
    argv = [sys.executable, "-m", "adapterhub.cli", "verify", str(merged), "-a", str(adapter), "-b", str(base),
            "--device", "cpu", "--no-record", "--json", "--decode", str(args.decode)]
    modes = {"whole models": argv, "--streamed": argv + ["--streamed"]}
    print(f"adapterhub verify benchmark ({machine_line()})")
    print(f"candidate: {merged} ({gib(ckpt)}, bf16 merge of a LoRA r=16 on all seven projections)")
    wall: dict[str, list[float]] = {m: [] for m in modes}
    rss: dict[str, list[int]] = {m: [] for m in modes}
    reports: dict[str, dict] = {}
    if args.warmup:
        for m, a in modes.items():
            run_child(a, check=False)
    for i in range(args.repeats):
        for m, a in (modes.items() if i % 2 == 0 else reversed(list(modes.items()))):
            r = run_child(a, check=False)
            if r.returncode not in (0, 1):
                raise SystemExit(f"{m}: exit {r.returncode}\n{r.stderr[-2000:]}")
            wall[m].append(r.seconds)
            rss[m].append(r.maxrss_bytes)
            reports[m] = json.loads(r.stdout)
            print(f"  run {i + 1} {m}: {r.seconds:.1f} s, peak RSS {gib(r.maxrss_bytes)} ({load()})", flush=True)
    rows = []
    for m in modes:
        rep = reports[m]
        rows.append((m, f"{median(wall[m]):.1f} s", gib(median(rss[m])), f"{median(rss[m]) / ckpt:.0%}", rep["verdict"],
                     f"{rep['metrics']['rel']:.4g}", f"{rep['metrics']['top1']}"))
    print_table(("path", "wall (median)", "peak RSS", "of checkpoint", "verdict", "rel", "top1"), rows)
    w, s = median(wall["whole models"]), median(wall["--streamed"])
    r_w, r_s = median(rss["whole models"]) / ckpt, median(rss["--streamed"]) / ckpt
    same = reports["whole models"]["verdict"] == reports["--streamed"]["verdict"]
    print(f"streamed peak RSS {r_s:.0%} of the checkpoint (goal ≤ {GOAL_RSS:.0%}): {verdict(r_s <= GOAL_RSS)}")
    print(f"whole-model peak RSS {r_w:.0%} of the checkpoint (expected > {GOAL_WHOLE_RSS:.0%}): {verdict(r_w > GOAL_WHOLE_RSS)}")
    print(f"streamed / whole-model time {s / w:.2f}× (goal ≤ {GOAL_TIME}×): {verdict(s / w <= GOAL_TIME)}")
    print(f"same verdict: {verdict(same)}; rel {reports['whole models']['metrics']['rel']:.4g} vs "
          f"{reports['--streamed']['metrics']['rel']:.4g}")
    print(f"done at {time.strftime('%H:%M')}, {load()}")


if __name__ == "__main__":
    main()
