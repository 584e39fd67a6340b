"""GGUF export of the 0.94B Llama-shaped checkpoint: adapterhub vs llama.cpp's converter vs the I/O floor.

Fixture: bench_merge.py's bf16 base (hidden 2048, 17 layers, vocab 32000,
tied embeddings: 939M parameters, 1.75 GiB in two shards), cached under
``--tmp``, with the SentencePiece tokenizer of tests/trained_lm.py copied in
(llama.cpp pads the 768 pieces to the 32000 rows, as both converters do).

Measured, each as its own child process, median of ``--repeats`` runs in
alternating order, page cache warm (one unrecorded warm-up of each):

- adapterhub: ``adapterhub convert BASE --to gguf --outtype f16|q8_0 -o OUT``
  (it fsyncs its output); with the C kernel where it is built, else torch:
  ``ADAPTERHUB_NO_NATIVE=1`` in the environment reaches the children and
  measures the torch path;
- the peer: llama.cpp's ``convert_hf_to_gguf.py BASE --outtype f16|q8_0``,
  run from the llama-cpp-python sdist in .cache/ (``--peer-repeats``, default 1:
  its q8_0 takes minutes here; 0 leaves it out);
- the I/O floor: read every input shard and write as many bytes as the GGUF
  output has, then fsync (one child, no conversion at all).

Wall time is spawn to exit, start-up included; "+sync" adds the ``sync``
after each step, so a writer that leaves dirty pages is not flattered; CPU
is the child's user + system seconds (median).
Peak RSS is the child's own (GNU time). Correctness, on the last outputs:
every tensor of adapterhub's file equals the peer's, byte for byte, for
each type measured.

    python bench/bench_gguf.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cli_argv, load, machine_line, median, print_table, run_child, sync  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def peer_script() -> Path:
    found = sorted((REPO / ".cache").glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not found:
        raise SystemExit("llama.cpp's converter is not in .cache/: run scripts/setup.sh")
    return found[-1]


def ensure_base(tmp: Path) -> Path:
    """bench_merge's base, plus a tokenizer (hard-linked weights: adapterhub refuses symlinks out of a directory)."""
    import bench_merge

    sys.path.insert(0, str(REPO))
    from tests.trained_lm import trained_llama_dir

    base, _ = bench_merge.ensure_fixtures(tmp, 17)
    out = tmp / "llama-17l" / "base-tok"
    if not (out / "tokenizer.model").exists():
        out.mkdir(parents=True, exist_ok=True)
        for p in base.iterdir():
            if p.name.endswith((".safetensors", ".json")) and not p.name.startswith("."):
                target = out / p.name
                if not target.exists():
                    os.link(p, target)
        tok = trained_llama_dir()
        for name in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copyfile(tok / name, out / name)
    return out


def child_floor(src: str, out_bytes: str, dst: str) -> None:
    """Read every shard of SRC, write OUT_BYTES bytes to DST, fsync: no conversion."""
    buf = bytearray(64 << 20)
    mv = memoryview(buf)
    for p in sorted(Path(src).glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(mv):
                pass
    left = int(out_bytes)
    with open(dst, "wb", buffering=0) as f:
        while left:
            n = min(left, len(buf))
            f.write(mv[:n])
            left -= n
        os.fsync(f.fileno())


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_floor(*sys.argv[3:]) if sys.argv[2] == "floor" else None
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer-repeats", type=int, default=1, help="Runs of llama.cpp's converter per type (0: none at all).")
    ap.add_argument("--types", default="f16,q8_0")
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/adapterhub-bench"))
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help="Skip the unrecorded warm-up runs (the cache is warm).")
    args = ap.parse_args()
    base = ensure_base(args.tmp)
    work = args.tmp / "gguf-out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    in_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(machine_line())
    env = dict(os.environ, ADAPTERHUB_HOME=str(work / "home"))
    results: dict[str, list] = {}

    def run(label: str, argv: list[str], out: Path, record: bool = True) -> None:
        if out.exists():
            out.unlink()
        r = run_child(argv, env=env)
        t0 = time.perf_counter()
        sync()
        synced = time.perf_counter() - t0
        if record:
            results.setdefault(label, []).append((r.seconds, r.seconds + synced, r.maxrss_bytes, out.stat().st_size, r.cpu_seconds))

    for t in args.types.split(","):
        ours, peer, floor = work / f"ours.{t}.gguf", work / f"peer.{t}.gguf", work / f"floor.{t}"
        steps = {
            f"adapterhub {t}": ([*cli_argv(), "convert", str(base), "--to", "gguf", "--outtype", t, "-o", str(ours), "--force", "--quiet"], ours),
        }
        if args.peer_repeats > 0:
            steps[f"llama.cpp {t}"] = ([sys.executable, str(peer_script()), str(base), "--outtype", t, "--outfile", str(peer)], peer)
        if args.warmup:
            for label, (argv, out) in steps.items():
                run(label, argv, out, record=False)
        else:  # the page cache is warm already; the output's size is needed for the floor
            run(f"adapterhub {t}", steps[f"adapterhub {t}"][0], ours)
        out_bytes = ours.stat().st_size
        steps[f"floor {t}"] = ([sys.executable, __file__, "--child", "floor", str(base), str(out_bytes), str(floor)], floor)
        for i in range(args.repeats):
            order = list(steps.items()) if i % 2 == 0 else list(reversed(steps.items()))
            for label, (argv, out) in order:
                if label.startswith("llama.cpp") and i >= args.peer_repeats:
                    continue
                if label.startswith("adapterhub") and not args.warmup and i == 0:
                    continue  # recorded above
                run(label, argv, out)
        print(f"\n{t}: input {in_bytes / 2**30:.2f} GiB bf16, output {out_bytes / 2**30:.2f} GiB; {load()}")
        fl = median([x[0] for x in results[f"floor {t}"]])
        rows = []
        for label in (f"floor {t}", f"adapterhub {t}", f"llama.cpp {t}"):
            xs = results.get(label)
            if not xs:
                continue
            wall, synced, rss = median([x[0] for x in xs]), median([x[1] for x in xs]), max(x[2] for x in xs)
            cpu = median([x[4] for x in xs])
            rows.append((label, len(xs), f"{wall:.2f} s", f"{synced:.2f} s", f"{wall / fl:.2f}x", f"{cpu:.2f} s", f"{rss / 2**30:.2f} GiB"))
        print_table(["step", "runs", "wall", "+sync", "vs floor", "CPU", "peak RSS"], rows)
        results[f"summary {t}"] = [rows]
    if args.peer_repeats > 0:
        sys.path.insert(0, str(REPO))
        from tests.test_gguf_model import _tensors

        for t in args.types.split(","):
            same = _tensors(work / f"ours.{t}.gguf") == _tensors(work / f"peer.{t}.gguf")
            print(f"\n{t} tensors byte-identical to llama.cpp's converter: {same}")
    print(json.dumps({k: v for k, v in results.items() if k.startswith("summary")}))


if __name__ == "__main__":
    main()
