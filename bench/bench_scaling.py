"""How cost grows: merge time and peak RSS from 0.1B to 2B parameters; search, ls, gc and fsck from 1k to 100k artifacts.

Merge (``--merge-sizes``, in billions of parameters): Llama-shaped bf16
checkpoints with bench_merge's fixture builders (hidden 2048, intermediate
5632, vocab 32000, tied embeddings: 65.5M parameters of embeddings plus
51.4M per decoder layer, so the sizes are 1, 8, 18 and 38 layers: 0.12B,
0.48B, 0.99B and 2.02B), each with a real PEFT LoRA adapter, r=16 on all
seven projections. Built once and cached under ``--tmp``. Each size runs
``adapterhub merge ADAPTER --base BASE -o OUT --device cpu`` and the I/O
floor (safetensors ``load_file`` + ``save_file``, shard by shard) as child
processes, alternating, median of ``--repeats``; peak RSS is the child's own
(GNU time). Expected: time linear in bytes (flat seconds per GiB), peak RSS
flat (one tensor at a time, not the model).

Registry (``--search-sizes``, in artifacts): registries filled with
bench_ls_search's population (names, methods, ranks, bases, quantization
as there), here with real files: each artifact has a config and 2 KiB of
weights in ``blobs/``, and each version its record blob in ``records/``, as
a push writes them. Cached in ``--cache-dir``; ``--build-only`` fills the
cache (run it under a shared lock, the timed run under the exclusive one).
Each command is a subprocess, start-up included, median of ``--repeats``:
``ls NAME``, ``search`` with filters, ``ls`` (a page), ``ls --all``,
``gc --dry-run`` (lists the store, compares it with the index) and ``fsck``
(re-hashes every blob and record, checks every artifact's file list).

    python bench/bench_scaling.py --merge-sizes 0.1,0.5,1,2 --search-sizes none
    python bench/bench_scaling.py --merge-sizes none --search-sizes 1000,10000,100000 --build-only
    python bench/bench_scaling.py --merge-sizes none --search-sizes 1000,10000,100000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from _common import cli_argv, gib, load, machine_line, median, mib, print_table, run_child, sync

DEFAULT_TMP = "/tmp/adapterhub-bench"
MAINTENANCE = ("gc --dry-run", "fsck")
DEFAULT_CACHE = "/tmp/adapterhub-bench/registries"
EMBED_PARAMS = 32000 * 2048
LAYER_PARAMS = 4 * 2048 * 2048 + 3 * 2048 * 5632 + 2 * 2048


def layers_for(billions: float) -> int:
    return max(1, round((billions * 1e9 - EMBED_PARAMS) / LAYER_PARAMS))


def _sizes(text: str, kind=float) -> list:
    return [] if text in ("", "none") else [kind(x) for x in text.split(",")]


# --------------------------------------------------------------------------- merge


def merge_scaling(sizes: list[float], tmp: Path, repeats: int) -> None:
    import bench_merge as bm

    py = sys.executable
    cli = [py, "-m", "adapterhub.cli"]
    me = str(Path(bm.__file__).resolve())
    fixtures = []
    for b in sizes:
        layers = layers_for(b)
        base, adapter = bm.ensure_fixtures(tmp, layers)
        fixtures.append((b, layers, base, adapter, bm.weights_bytes(base)))
    print(f"\nmerge scaling ({machine_line()}); median of {repeats}, alternating with the floor; warm page cache", flush=True)
    rows = []
    for b, layers, base, adapter, nbytes in fixtures:
        out_ah, out_fl = tmp / "scaling-out-merge", tmp / "scaling-out-floor"
        steps = {
            "merge": [*cli, "merge", str(adapter), "--base", str(base), "-o", str(out_ah), "--device", "cpu", "--json"],
            "floor": [py, me, "--child", "floor", str(base), str(out_fl)],
        }
        runs: dict[str, list] = {k: [] for k in steps}
        for r in range(-1, repeats):  # one unrecorded warm-up
            for label in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
                shutil.rmtree(out_ah, ignore_errors=True)
                shutil.rmtree(out_fl, ignore_errors=True)
                sync()
                run = run_child(steps[label])
                if r >= 0:
                    runs[label].append(run)
        shutil.rmtree(out_ah, ignore_errors=True)
        shutil.rmtree(out_fl, ignore_errors=True)
        m = median([x.seconds for x in runs["merge"]])
        f = median([x.seconds for x in runs["floor"]])
        rss = median([x.maxrss_bytes for x in runs["merge"]])
        params = EMBED_PARAMS + layers * LAYER_PARAMS + 2048
        rows.append((
            f"{b:g}B", layers, f"{params / 1e9:.2f}B", gib(nbytes), f"{m:.2f}", f"{median([x.cpu_seconds for x in runs['merge']]):.1f}",
            f"{m / (nbytes / 2**30):.2f}", f"{f:.2f}", f"{m / f:.2f}", mib(rss), f"{rss / nbytes:.0%}",
            " ".join(f"{x.seconds:.2f}" for x in runs["merge"]),
        ))
        print(f"  {b:g}B done ({load()})", flush=True)
    print_table(
        ["size", "layers", "params", "checkpoint", "merge s", "CPU s", "s/GiB", "floor s", "x floor", "peak RSS",
         "RSS/ckpt", "merge runs (s)"],
        rows,
    )
    print(f"{load()} at the end of the merge part")


# --------------------------------------------------------------------------- registry


def registry_scaling(sizes: list[int], cache: Path, repeats: int, build_only: bool) -> None:
    import bench_ls_search as bls

    homes = {n: bls.cached_home(cache, n, blobs=True) for n in sizes}
    if build_only:
        return
    cli = cli_argv()
    print(f"\nregistry scaling ({machine_line()}); median of {repeats} subprocess runs each, start-up included",
          flush=True)
    commands = {
        "ls NAME": ["ls", "NAME"],
        "search --rank 16": ["search", "--rank", "16"],
        "search llama --method lora --min-rank 8": ["search", "llama", "--method", "lora", "--min-rank", "8"],
        "search --base mistral --kind adapter": ["search", "--base", "mistral", "--kind", "adapter"],
        "ls (a page)": ["ls"],
        "ls --all": ["ls", "--all"],
        "gc --dry-run": ["gc", "--dry-run"],
        "fsck": ["fsck", "--json"],
    }
    table: dict[str, dict[int, tuple[float, float]]] = {k: {} for k in commands}
    store: dict[int, str] = {}
    for n, home in homes.items():
        env = {**os.environ, "ADAPTERHUB_HOME": str(home)}
        run_child([*cli, "ls"], env)  # migrate a cached index to this schema, warm the page cache
        name = bls._busiest_name(home / "index.db")
        files = sum(1 for _ in (home / "blobs" / "sha256").glob("*/*")) + sum(1 for _ in (home / "records" / "sha256").glob("*/*"))
        store[n] = f"{(home / 'index.db').stat().st_size / 2**20:.0f} MiB index, {files:,} blob and record files"
        runs: dict[str, list] = {k: [] for k in commands}
        # The reads first, then gc and fsck: fsck reads every blob, which must not
        # push index pages out of the cache between two timed reads.
        for group in ([k for k in commands if k not in MAINTENANCE], MAINTENANCE):
            for _ in range(repeats):
                for label in group:
                    argv = [name if a == "NAME" else a for a in commands[label]]
                    runs[label].append(run_child([*cli, *argv], env))
        for label, rs in runs.items():
            table[label][n] = (median([r.seconds for r in rs]), median([r.cpu_seconds for r in rs]))
        print(f"  {n:,} artifacts done ({store[n]}; {load()})", flush=True)
    ns = list(homes)
    headers = ["command"] + [f"{n:,}: wall s (CPU s)" for n in ns]
    if len(ns) > 1:
        headers.append(f"wall {ns[-1] // ns[0]}x artifacts")
    rows = []
    for label in commands:
        cells = [f"{table[label][n][0]:.3f} ({table[label][n][1]:.3f})" for n in ns]
        if len(ns) > 1:
            cells.append(f"{table[label][ns[-1]][0] / table[label][ns[0]][0]:.1f}x")
        rows.append((label, *cells))
    print_table(headers, rows)
    for label in ("gc --dry-run", "fsck"):
        per = ", ".join(f"{n:,}: {table[label][n][0] / n * 1e6:.0f} us" for n in ns)
        print(f"  {label} wall per artifact: {per}")
    print(f"{load()} at the end of the registry part")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--merge-sizes", default="0.1,0.5,1,2", help="billions of parameters, comma-separated, or none")
    ap.add_argument("--search-sizes", default="1000,10000,100000", help="artifacts, comma-separated, or none")
    ap.add_argument("--repeats", type=int, default=3, help="median over this many runs (default 3)")
    ap.add_argument("--tmp", default=DEFAULT_TMP, help=f"merge fixtures, cached (default {DEFAULT_TMP})")
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"filled registries, cached (default {DEFAULT_CACHE})")
    ap.add_argument("--build-only", action="store_true", help="build the fixtures and registries, then stop")
    args = ap.parse_args()
    merge_sizes, search_sizes = _sizes(args.merge_sizes), _sizes(args.search_sizes, int)
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    if merge_sizes:
        if args.build_only:
            import bench_merge as bm

            for b in merge_sizes:
                bm.ensure_fixtures(tmp, layers_for(b))
        else:
            merge_scaling(merge_sizes, tmp, args.repeats)
    if search_sizes:
        registry_scaling(search_sizes, Path(args.cache_dir), args.repeats, args.build_only)


if __name__ == "__main__":
    main()
