"""bitsandbytes NF4, FP4 and int8 quantize of a ~1B Llama-shaped checkpoint: adapterhub vs an I/O floor vs transformers.

The checkpoint is ``bench_merge.py``'s fixture (0.94B parameters, bf16,
1.75 GiB in two shards), built once and cached under ``--tmp`` (default
/tmp/adapterhub-bench).

Measured, each as its own child process, median of ``--repeats`` runs in an
order that alternates between repeats:

- ``python -m adapterhub.cli quantize BASE --to nf4 -o OUT --device cpu --json``,
  and the same with ``--to fp4`` and ``--to int8`` (``--modes`` picks;
  ``nf4-dq`` and ``fp4-dq`` add ``--double-quant``);
- an I/O floor per output size: read every byte of every input shard (plain
  reads into a 64 MiB buffer; safetensors' ``load_file`` memory-maps, which
  reads nothing until touched) and write as many bytes as adapterhub's
  output holds (taken from its safetensors files), then fsync them, as
  adapterhub does;
- transformers' own route (optional, ``--no-transformers`` skips it):
  ``AutoModelForCausalLM.from_pretrained(BASE, quantization_config=
  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
  device_map="cpu")`` + ``save_pretrained(OUT)``. A first probe run is
  killed after ``--transformers-limit`` seconds (default 300); if it gets
  there, the step is skipped with a note.

adapterhub maps the input weights from the page cache where it can (no
copy), while the floor copies every byte with ``read``: with the C kernel
and no torch on the CPU path, adapterhub can finish before the floor.

Wall time runs from spawn to exit; peak RSS is the child's own (GNU time, see
``_common.run_child``). The page cache is warm: one unrecorded run of every
step comes first. Once, the adapterhub NF4 output is compared tensor by
tensor with transformers' (names, dtypes, shapes, exact values).

    python bench/bench_quantize.py --repeats 3
    python bench/bench_quantize.py --repeats 3 --no-transformers
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from _common import gib, load, machine_line, median, mib, print_table, run_child, sync
from bench_merge import DEFAULT_TMP, ensure_fixtures, safetensors_files, weights_bytes

CHUNK = 64 * 1024 * 1024


# --------------------------------------------------------------------------- child processes


def child_floor(src: str, dst: str, nbytes: int) -> None:
    """Read every input shard with plain reads; write ``nbytes`` of what was read to one file; fsync it.

    Not safetensors' ``load_file``: it memory-maps the file, so nothing is read
    until touched, and touching it page by page (faults) is slower than a read.
    """
    t0 = time.perf_counter()
    os.makedirs(dst)
    fd = os.open(os.path.join(dst, "model.safetensors"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    left = nbytes
    read = 0
    for p in sorted(Path(src).glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                read += n
                k = min(n, left)
                if k:
                    os.write(fd, view[:k])
                    left -= k
    os.fsync(fd)
    os.close(fd)
    if left:
        raise SystemExit(f"the input holds fewer than {nbytes} bytes")
    print(json.dumps({"read+write+fsync": round(time.perf_counter() - t0, 3), "read": read}))


def child_transformers(base: str, out: str) -> None:
    t = [time.perf_counter()]
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    t.append(time.perf_counter())
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=qc, device_map="cpu", dtype=torch.bfloat16)
    t.append(time.perf_counter())
    model.save_pretrained(out)
    t.append(time.perf_counter())
    names = ("import", "from_pretrained (quantizes)", "save_pretrained")
    print(json.dumps({n: round(b - a, 3) for n, a, b in zip(names, t, t[1:])}))


# --------------------------------------------------------------------------- comparison


def compare_exact(a: Path, b: Path) -> dict[str, object]:
    """Names, dtypes, shapes and exact values of two checkpoints."""
    import torch
    from safetensors import safe_open

    def index(root: Path) -> dict[str, Path]:
        return {k: p for p in safetensors_files(root) for k in safe_open(str(p), framework="pt").keys()}  # noqa: SIM118

    ia, ib = index(a), index(b)
    differing = []
    for k in sorted(set(ia) & set(ib)):
        with safe_open(str(ia[k]), framework="pt") as fa, safe_open(str(ib[k]), framework="pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            differing.append(k)
    return {
        "only_in_adapterhub": sorted(set(ia) - set(ib))[:5],
        "only_in_transformers": sorted(set(ib) - set(ia))[:5],
        "tensors_compared": len(set(ia) & set(ib)),
        "tensors_differing": len(differing),
        "first_differing": differing[:5],
    }


# --------------------------------------------------------------------------- the run


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        what, *rest = sys.argv[2:]
        if what == "floor":
            child_floor(rest[0], rest[1], int(rest[2]))
        elif what == "transformers":
            child_transformers(*rest)
        else:
            raise SystemExit(f"unknown child {what}")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="median over this many runs (default 3)")
    ap.add_argument("--tmp", default=DEFAULT_TMP, help=f"fixtures (cached) and outputs (default {DEFAULT_TMP})")
    ap.add_argument("--layers", type=int, default=17, help="decoder layers (default 17: 0.94B params, 1.75 GiB)")
    ap.add_argument("--no-transformers", dest="transformers", action="store_false", help="skip transformers' route")
    ap.add_argument("--transformers-limit", type=int, default=300, help="seconds before the probe run is given up")
    ap.add_argument("--modes", default="nf4,fp4,int8",
                    help="quantizations to measure, comma-separated (default nf4,fp4,int8; nf4-dq and fp4-dq: "
                         "with --double-quant)")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if args.transformers and "nf4" not in modes:
        ap.error("transformers' route is compared with nf4: add nf4 to --modes, or pass --no-transformers")

    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    base, _ = ensure_fixtures(tmp, args.layers)
    ckpt = weights_bytes(base)
    py, me = sys.executable, str(Path(__file__).resolve())
    cli = [py, "-m", "adapterhub.cli"]

    def out(label: str) -> Path:
        return tmp / ("out-q-" + "".join(c if c.isalnum() else "-" for c in label))

    print(f"adapterhub quantize benchmark ({machine_line()})")
    print(f"base: {base} ({args.layers} layers, {gib(ckpt)} bf16 in {len(safetensors_files(base))} shards); "
          "page cache warm (one unrecorded run of every step first); order alternates between repeats\n", flush=True)

    steps: list[tuple[str, list[str], Path]] = []
    sizes: dict[str, int] = {}
    for to in modes:
        label = f"adapterhub quantize {to}"
        how = ["--to", to.removesuffix("-dq")] + (["--double-quant"] if to.endswith("-dq") else [])
        steps.append((label, cli + ["quantize", str(base), *how, "-o", str(out(label)), "--device", "cpu",
                                    "--json"], out(label)))
    # A first run of each fixes the output size the floors must write (and warms everything up).
    reports: dict[str, dict] = {}
    for label, argv, o in steps:
        shutil.rmtree(o, ignore_errors=True)
        sync()
        run = run_child(argv)
        reports[label] = json.loads(run.stdout)["report"]
        sizes[label] = weights_bytes(o)
        shutil.rmtree(o, ignore_errors=True)
        print(f"  warm-up {label}: {run.seconds:.1f} s, output {mib(sizes[label])} ({load()})", flush=True)
    for to in modes:
        n = sizes[f"adapterhub quantize {to}"]
        label = f"floor: read input, write {to} bytes"
        sizes[label] = n
        steps.append((label, [py, me, "--child", "floor", str(base), str(out(label)), str(n)], out(label)))

    tf_note = "skipped (--no-transformers)"
    TF = "transformers nf4 (from_pretrained + save_pretrained)"
    if args.transformers:
        o = out(TF)
        shutil.rmtree(o, ignore_errors=True)
        sync()
        t0 = time.perf_counter()
        probe = subprocess.run(
            ["timeout", str(args.transformers_limit), py, me, "--child", "transformers", str(base), str(o)],
            capture_output=True, text=True, check=False,
        )
        took = time.perf_counter() - t0
        if probe.returncode == 0:
            sizes[TF] = weights_bytes(o)
            steps.append((TF, [py, me, "--child", "transformers", str(base), str(o)], o))
            tf_note = f"probe {took:.1f} s"
            print(f"  warm-up {TF}: {took:.1f} s ({load()})", flush=True)
        else:
            why = "over the limit" if probe.returncode == 124 else f"exit {probe.returncode}: {probe.stderr[-500:]}"
            tf_note = f"skipped: the probe run {why} ({took:.0f} s)"
            print(f"  {TF}: {tf_note}", flush=True)
        shutil.rmtree(o, ignore_errors=True)
    for label, argv, o in steps:
        if label.startswith("floor"):
            shutil.rmtree(o, ignore_errors=True)
            sync()
            run_child(argv)
            shutil.rmtree(o, ignore_errors=True)

    wall: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    rss: dict[str, list[int]] = defaultdict(list)
    last: dict[str, str] = {}
    kept: set[Path] = set()
    for r in range(args.repeats):
        for label, argv, o in steps if r % 2 == 0 else steps[::-1]:
            shutil.rmtree(o, ignore_errors=True)
            sync()
            run = run_child(argv)
            wall[label].append(run.seconds)
            cpu[label].append(run.cpu_seconds)
            rss[label].append(run.maxrss_bytes)
            last[label] = run.stdout.strip()
            if r == args.repeats - 1 and label in ("adapterhub quantize nf4", TF):
                kept.add(o)
            else:
                shutil.rmtree(o, ignore_errors=True)
        print(f"  repeat {r + 1}/{args.repeats} done ({load()})", flush=True)

    med = {k: median(v) for k, v in wall.items()}
    print(f"\nmedian of {args.repeats} (input {gib(ckpt)}); CPU: user+sys of the child")
    print_table(
        ["step", "wall s", "CPU s", "output", "peak RSS", "RSS/input", "all runs (wall s)"],
        [
            (
                k, f"{med[k]:.2f}", f"{median(cpu[k]):.1f}", mib(sizes[k]), mib(median(rss[k])), f"{median(rss[k]) / ckpt:.0%}", " ".join(f"{t:.2f}" for t in wall[k]),
            )
            for k in med
        ],
    )
    print("\nratios (medians):")
    for to in modes:
        a, f = med[f"adapterhub quantize {to}"], med[f"floor: read input, write {to} bytes"]
        print(f"  adapterhub {to} / floor for its output size = {a / f:6.2f}   ({a:.2f} s vs {f:.2f} s)")
        # The floor's runs spread widely on a shared VM (writeback of the runs before it):
        # the fastest floor run of the same output size is the strictest yardstick.
        fast = min(t for k, v in wall.items() if k.startswith("floor") and sizes[k] == sizes[f"adapterhub quantize {to}"]
                   for t in v)
        print(f"  adapterhub {to} / fastest floor run, same size = {a / fast:6.2f}   ({a:.2f} s vs {fast:.2f} s)")
        print(f"  adapterhub {to} peak RSS / input            = {median(rss[f'adapterhub quantize {to}']) / ckpt:6.1%}")
    if TF in med:
        a = med["adapterhub quantize nf4"]
        print(f"  adapterhub nf4 / transformers nf4          = {a / med[TF]:6.2f}   ({a:.2f} s vs {med[TF]:.2f} s)")
        print(f"  transformers nf4 peak RSS / input          = {median(rss[TF]) / ckpt:6.1%}")
        print(f"  transformers phases (last run): {last[TF]}")
        print("\nadapterhub nf4 vs transformers nf4, tensor by tensor (last repeat):")
        for k, v in compare_exact(out("adapterhub quantize nf4"), out(TF)).items():
            print(f"  {k}: {v}")
    else:
        print(f"  transformers nf4: {tf_note}")
    for label in (f"adapterhub quantize {to}" for to in modes):
        rep = reports[label]
        print(f"{label}: in-process {rep['seconds']:.2f} s (warm-up run's report)")
    for label in med:
        if label.startswith("floor"):
            print(f"{label} phases (last run): {last[label]}")
    for p in kept:
        shutil.rmtree(p, ignore_errors=True)
    print(f"{load()} at the end")


if __name__ == "__main__":
    main()
