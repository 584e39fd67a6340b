"""`adapterhub check` of a LoRA against a Llama-7B-shaped sharded base.

- base: the sparse 7B header set of bench_inspect.py (32 layers, hidden 4096,
  intermediate 11008, vocab 32000, bf16, 3 shards, 12.55 GiB apparent, a few
  KiB on disk): `check` reads only its headers;
- adapter: PEFT LoRA r=16 on all 7 linear projections, fp32, with real random
  values (40M parameters, 152 MiB written), because `check` scans the
  adapter's tensors for inf/NaN and all-zero B matrices.

Times `adapterhub check ADAPTER --base BASE --json` as a subprocess (median of
--repeats, start-up included) twice: with this environment as it is, and with
Python's bytecode cache enabled in a temp dir (what an installed package
has; `PYTHONDONTWRITEBYTECODE=1` makes every start compile adapterhub's
modules again). Also the same with `--github --junit FILE --strict`, and
`check()` in this process. Goal: at most 1 s of CLI wall time; no torch import.

    python bench/bench_check.py --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    cli_argv,
    gib,
    load,
    machine_line,
    median,
    mib,
    print_table,
    run_child,
    verdict,
)
from bench_inspect import (
    HIDDEN,
    INTER,
    LAYERS,
    PROJ,
    allocated,
    dir_size,
    lora_config,
    make_checkpoint,
)

GOAL_S = 1.0


def make_lora(root: Path, r: int = 16, seed: int = 0) -> int:
    """A PEFT LoRA with random (trained-looking) values on all 7 projections; returns parameters."""
    import numpy as np
    from safetensors.numpy import save_file

    root.mkdir()
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(LAYERS):
        for m, (out, inp) in PROJ.items():
            prefix = f"base_model.model.model.layers.{i}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, inp), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((out, r), dtype=np.float32) * 0.01
    save_file(tensors, str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = lora_config(r, revision=None, peft_version="0.21.2")
    (root / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return sum(t.size for t in tensors.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="median over this many runs (default 7)")
    ap.add_argument("--tmp", default="/tmp", help="where to put the fixtures (default /tmp)")
    args = ap.parse_args()

    cli = cli_argv()
    with tempfile.TemporaryDirectory(prefix="adapterhub-bench-", dir=args.tmp) as tmp_:
        tmp = Path(tmp_)
        base, lora = tmp / "Llama-2-7b-hf", tmp / "lora-r16"
        params, size = make_checkpoint(base)
        lora_params = make_lora(lora)
        print(f"adapterhub check benchmark ({machine_line()})")
        print(f"  base: {params / 1e9:.2f}B params, {gib(size)} apparent, {mib(allocated(base))} on disk")
        print(f"  adapter: LoRA r=16 on {len(PROJ)} projections x {LAYERS} layers, {lora_params / 1e6:.1f}M params, {mib(dir_size(lora))}")
        print(f"  shapes: hidden {HIDDEN}, intermediate {INTER}")

        env_as_is = dict(os.environ)
        env_cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env_cached["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
        argv = cli + ["check", str(lora), "--base", str(base)]
        junit = tmp / "report.xml"

        def runs(extra: list[str], env: dict[str, str]) -> list:
            run_child(argv + extra, env=env, check=False)  # warm the page cache (and the bytecode cache)
            return [run_child(argv + extra, env=env, check=False) for _ in range(args.repeats)]

        floor = median([run_child([sys.executable, "-c", "pass"]).seconds for _ in range(args.repeats)])
        numpy_floor = median([run_child([sys.executable, "-c", "import numpy"]).seconds for _ in range(args.repeats)])
        cases = {
            "check --json": runs(["--json"], env_as_is),
            "check --json (bytecode cached)": runs(["--json"], env_cached),
            "check --github --junit --strict (cached)": runs(["--github", "--junit", str(junit), "--strict"], env_cached),
        }
        out = json.loads(cases["check --json"][-1].stdout)
        assert out["status"] == "ok", out
        assert cases["check --github --junit --strict (cached)"][-1].returncode == 0

        t0 = time.perf_counter()
        from adapterhub.check import check

        import_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = check(lora, base)
        first = time.perf_counter() - t0
        warm = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            check(lora, base)
            warm.append(time.perf_counter() - t0)
        assert report.status == "ok" and "torch" not in sys.modules, (report.status, "torch" in sys.modules)

        rows = [
            ("python -c pass (floor)", f"{floor:.3f}", "1.00", "-", "-"),
            ("python -c 'import numpy'", f"{numpy_floor:.3f}", f"{numpy_floor / floor:.2f}", "-", "-"),
        ]
        for label, rs in cases.items():
            wall = median([r.seconds for r in rs])
            rows.append(
                (
                    label,
                    f"{wall:.3f}",
                    f"{wall / floor:.2f}",
                    f"{median([r.cpu_seconds for r in rs]):.3f}",
                    f"{mib(max(r.maxrss_bytes for r in rs))}  {verdict(wall <= GOAL_S)}",
                )
            )
    print()
    print_table(["command", "CLI median s", "x python", "CPU s", f"peak RSS, <= {GOAL_S} s"], rows)
    print(
        f"\nin this process: import adapterhub.check {import_s:.3f} s, first check() {first:.3f} s, "
        f"then median {median(warm):.3f} s (report: {report.status}; torch imported: {'torch' in sys.modules})"
    )
    print(f"goal: `adapterhub check` <= {GOAL_S} s including start-up (median of {args.repeats})")
    print(f"{load()} at the end")


if __name__ == "__main__":
    main()
