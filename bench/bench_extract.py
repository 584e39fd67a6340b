"""LoRA extraction from a merged ~1B Llama: adapterhub vs mergekit-extract-lora vs the I/O floor.

Fixture (cached under ``--tmp``, default /tmp/adapterhub-bench): the base and
the rank-16 LoRA on all seven projections of ``bench_merge.py`` (0.94B
parameters, 1.75 GiB bf16, tied embeddings), and MODEL = that LoRA merged into
the base by ``adapterhub merge`` (bf16, 119 tensors changed).

Measured, each as its own child process (start-up included), median of
``--repeats`` runs in alternating order, after one unrecorded warm-up run of
each but mergekit (the page cache holds both checkpoints); mergekit runs
``--mergekit-repeats`` times (default 1: one run takes minutes on two cores):

- the I/O floor: a child that imports torch and safetensors, then reads every
  byte of every shard of MODEL and BASE;
- ``adapterhub extract MODEL --base BASE --rank 16 -o OUT`` (randomized SVD);
- ``mergekit-extract-lora --model MODEL --base-model BASE --max-rank 16``
  (mergekit 0.1.5, in its own venv: ``--mergekit`` names its executable).

Then, once, on the outputs: the adapter sizes (weights file and whole
directory, against the original adapter's), and each extraction's error: for
every module of the original LoRA, ``‖ΔW − s·B A‖_F / ‖ΔW‖_F`` in float32,
where ΔW = MODEL − BASE and s the extracted adapter's scale for the module;
the worst and the median over modules. With ``--logits`` (default up to 8
layers), a child also runs transformers on MODEL and PEFT on BASE + each
extracted adapter in float32 on fixed prompts, and prints the relative logit
error ``‖z − z_MODEL‖ / ‖z_MODEL‖`` (worst prompt). Peak RSS is the child's
own (GNU time); CPU seconds are user + system of the child; the load average
is printed with every run.

mergekit factors every linear layer with a full ``torch.linalg.svd``, so its
time grows with the layers; on a shape with fewer layers than the 0.94B one
(``--layers``), the script also prints its time scaled to 17 layers (its
fixed costs scaled too, so the figure is an upper estimate, and labelled so).

    python bench/bench_extract.py --repeats 3
    python bench/bench_extract.py --layers 4 --repeats 3   # with mergekit in minutes, not most of an hour
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import gib, machine_line, median, mib, print_table, run_child, sync, verdict

DEFAULT_TMP = "/tmp/adapterhub-bench"
MERGEKIT = Path(__file__).resolve().parent.parent / ".cache" / "mergekit-venv" / "bin" / "mergekit-extract-lora"
GOAL_FLOOR = 2.0  # adapterhub wall / floor wall
RANK = 16


def weights_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def tree_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def ensure_model(tmp: Path, layers: int) -> tuple[Path, Path, Path]:
    """(base, original adapter, merged MODEL), built on first use."""
    from bench_merge import ensure_fixtures

    base, adapter = ensure_fixtures(tmp, layers)
    merged = base.parent / "merged-r16"
    stamp = merged / ".bench-stamp.json"
    if not stamp.exists():
        print(f"merging the adapter into {merged} ...", flush=True)
        shutil.rmtree(merged, ignore_errors=True)
        from adapterhub.convert import merge

        merge(str(adapter), str(base), out=merged, device="cpu")
        stamp.write_text("{}")
    return base, adapter, merged


def child_floor(*dirs: str) -> None:
    """Import what a loader imports, then read every byte of every shard (into one reused buffer).

    ``safetensors.torch.load_file`` alone is no floor: it maps the file and
    returns tensors whose pages have not been read.
    """
    t0 = time.perf_counter()
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    t1 = time.perf_counter()
    buf = memoryview(bytearray(64 << 20))
    n = 0
    for d in dirs:
        for p in sorted(Path(d).glob("*.safetensors")):
            with open(p, "rb", buffering=0) as f:
                while k := f.readinto(buf):
                    n += k
    print(json.dumps({"import_s": round(t1 - t0, 3), "read_s": round(time.perf_counter() - t1, 3), "bytes": n}))


def child_logits(base: str, model: str, *adapters: str) -> None:
    """Relative logit error of BASE + each adapter (PEFT) against MODEL (transformers), float32, worst prompt."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (1, n), generator=g) for n in (16, 48)]

    def run(m: Any) -> list[torch.Tensor]:
        m.eval()
        with torch.no_grad():
            return [m(p).logits[0].float() for p in prompts]

    ref = run(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32))
    out = {}
    for a in adapters:
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), a)
        z = run(m)
        out[a] = max(float((x - y).norm() / y.norm()) for x, y in zip(z, ref))
        del m
    print(json.dumps(out))


# --------------------------------------------------------------------------- error of an extracted adapter


def _scales(cfg: dict, modules: Sequence[str]) -> dict[str, float]:
    from adapterhub.converters.formats.peft_math import get_pattern_key

    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out = {}
    for m in modules:
        rm = rp.get(get_pattern_key(rp.keys(), m), r)
        am = ap.get(get_pattern_key(ap.keys(), m), alpha)
        out[m] = am / math.sqrt(rm) if cfg.get("use_rslora") else am / rm
    return out


def adapter_errors(adapter_dir: Path, model: Path, base: Path, modules: Sequence[str]) -> dict[str, float]:
    """‖ΔW − s·B A‖ / ‖ΔW‖ for each module, one module in memory at a time."""
    import torch
    from safetensors import safe_open

    from adapterhub.converters.formats.safetensors_io import TensorSource, file_map

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    ms, bs = TensorSource(file_map(model)), TensorSource(file_map(base))
    scales = _scales(cfg, modules)
    errs = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for m in modules:
            delta = ms.get(m + ".weight").float() - bs.get(m + ".weight").float()
            a, b = f"base_model.model.{m}.lora_A.weight", f"base_model.model.{m}.lora_B.weight"
            if a not in keys:
                errs[m] = 1.0  # the module is missing: none of its delta is recovered
                continue
            approx = (f.get_tensor(b).float() @ f.get_tensor(a).float()) * scales[m]
            errs[m] = float((delta - approx).norm() / delta.norm())
    return errs


def lora_modules(adapter: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return sorted({k.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0] for k in f.keys() if ".lora_A." in k})


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tmp", default=DEFAULT_TMP)
    ap.add_argument("--layers", type=int, default=17, help="decoder layers (default 17: 0.94B params, 1.75 GiB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mergekit", default=str(MERGEKIT), help="mergekit-extract-lora executable ('' to skip)")
    ap.add_argument(
        "--mergekit-repeats", type=int, default=1,
        help="recorded mergekit runs (default 1, no warm-up: the other steps' warm-up already fills the page cache; "
        "one run took minutes on the 2-core VM)",
    )
    ap.add_argument("--logits", action=argparse.BooleanOptionalAction, default=None,
                    help="also measure the logit error of BASE + each extracted adapter (default: up to 8 layers)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--child-logits", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_floor(*args.child)
        return
    if args.child_logits:
        child_logits(*args.child_logits)
        return
    tmp = Path(args.tmp)
    base, adapter, model = ensure_model(tmp, args.layers)
    outs = tmp / "extract-out"
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir(parents=True)
    cli = [sys.executable, "-m", "adapterhub.cli"]
    mk = args.mergekit if args.mergekit and Path(args.mergekit).exists() else None
    if args.mergekit and not mk:
        print(f"mergekit not found at {args.mergekit}: skipped (python3 -m venv .cache/mergekit-venv; "
              ".cache/mergekit-venv/bin/pip install -c constraints.txt torch==2.13.0 mergekit==0.1.5)")
    steps = {
        "I/O floor (read MODEL + BASE)": lambda o: [sys.executable, __file__, "--child", str(model), str(base)],
        "adapterhub extract --rank 16": lambda o: [*cli, "extract", str(model), "--base", str(base), "--rank", str(RANK), "-o", str(o), "--json"],
    }
    if mk:
        steps["mergekit-extract-lora --max-rank 16"] = lambda o: [
            mk, "--model", str(model), "--base-model", str(base), "--out-path", str(o), "--max-rank", str(RANK), "--quiet",
        ]
    print(machine_line())
    times: dict[str, list[float]] = {k: [] for k in steps}
    cpus: dict[str, list[float]] = {k: [] for k in steps}
    rss: dict[str, list[int]] = {k: [] for k in steps}
    mk_label = "mergekit-extract-lora --max-rank 16"
    for rep in range(max(args.repeats, args.mergekit_repeats) + 1):  # run 0 warms the page cache and is not recorded
        order = list(steps) if rep % 2 == 0 else list(reversed(steps))
        for label in order:
            if label == mk_label and not 1 <= rep <= args.mergekit_repeats:
                continue
            if label != mk_label and rep > args.repeats:
                continue
            o = outs / f"{abs(hash(label)) % 10**6}-{rep}"
            shutil.rmtree(o, ignore_errors=True)
            sync()
            run = run_child(steps[label](o))
            print(
                f"  run {rep}: {label}: {run.seconds:.2f} s, CPU {run.cpu_seconds:.2f} s, peak RSS {gib(run.maxrss_bytes)}, "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            if rep:
                times[label].append(run.seconds)
                cpus[label].append(run.cpu_seconds)
                rss[label].append(run.maxrss_bytes)
            last_out = o
            if label.startswith("adapterhub"):
                ah_out = last_out
            elif label.startswith("mergekit"):
                mk_out = last_out
        print(f"  round {rep}{' (warm-up)' if rep == 0 else ''} done, load {os.getloadavg()[0]:.1f}", flush=True)
    floor = median(times["I/O floor (read MODEL + BASE)"])
    rows = [
        [label, f"{median(times[label]):.2f} s", f"{median(times[label]) / floor:.2f}x", f"{median(cpus[label]):.2f} s",
         gib(median(rss[label]))]
        for label in steps
    ]
    print_table(["step", "wall (median)", "vs floor", "CPU (median)", "peak RSS"], rows)
    ckpt = weights_bytes(model)
    print(f"checkpoint {gib(ckpt)} each; a tensor pair at most {mib(2 * 32000 * 2048 * 2)} (embeddings, bf16)")

    modules = lora_modules(adapter)
    size_rows = [["original LoRA (r=16, fp32)", mib(weights_bytes(adapter)), mib(tree_bytes(adapter)), "1.00x", "-", "-"]]
    for label, d in (("adapterhub", ah_out), ("mergekit", mk_out if mk else None)):
        if d is None:
            continue
        t0 = time.perf_counter()
        errs = adapter_errors(d, model, base, modules)
        print(f"  errors of {label} measured in {time.perf_counter() - t0:.1f} s", flush=True)
        vals = sorted(errs.values())
        size_rows.append([
            f"{label} (rank {RANK})", mib(weights_bytes(d)), mib(tree_bytes(d)),
            f"{weights_bytes(d) / weights_bytes(adapter):.2f}x", f"{vals[-1]:.3g}", f"{vals[len(vals) // 2]:.3g}",
        ])
    print_table(["adapter", "weights", "directory", "vs original", "max rel err", "median rel err"], size_rows)
    if args.logits if args.logits is not None else args.layers <= 8:
        outs_by = {"the original LoRA (reference: MODEL's own bf16 rounding)": adapter, "adapterhub": ah_out,
                   **({"mergekit": mk_out} if mk else {})}
        run = run_child([sys.executable, __file__, "--child-logits", str(base), str(model), *map(str, outs_by.values())])
        errs = json.loads(run.stdout.strip().splitlines()[-1])
        for label, d in outs_by.items():
            print(f"logit error of BASE + {label} against MODEL (float32, worst of 2 prompts): {errs[str(d)]:.3g}")
    ratio = median(times["adapterhub extract --rank 16"]) / floor
    print(f"adapterhub / I/O floor: {ratio:.2f}x (goal ≤ {GOAL_FLOOR}x): {verdict(ratio <= GOAL_FLOOR)}")
    if mk:
        mkt = median(times[mk_label])
        print(f"adapterhub / mergekit time: {median(times['adapterhub extract --rank 16']) / mkt:.3f}x")
        if args.layers != 17:
            print(
                f"mergekit scaled to 17 layers (upper estimate: fixed costs scaled too): "
                f"{mkt * 17 / args.layers:.0f} s wall, {median(cpus[mk_label]) * 17 / args.layers:.0f} CPU s"
            )
    print(machine_line())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
