"""`adapterhub ls` and `search` on a registry of 10,000 (or 100,000) artifacts, start-up included.

The index is filled through the real write API, ``registry.index.Index.add_version``,
with synthetic ``Manifest``/``Inspection`` objects (varied names, methods,
ranks, base models and quantization). Blob writes are skipped: what is timed
here is the read path (start-up, imports, SQLite queries, formatting), which
never opens a blob. Population also turns SQLite's ``synchronous`` off on its
own connection, since 10,000 fsynced commits would only measure the disk.
The filled index is cached in ``--cache-dir`` (100,000 artifacts take a
minute or more to fill) and copied for each run; ``--build-only`` fills it.

Each command runs as a real subprocess (the venv's ``adapterhub`` script, so
interpreter start-up is included), median of --repeats, against the floor
``python -c pass``: ``ls`` (a page of 1000), ``ls NAME``, ``ls --all`` as a
table, JSON and refs, and ``search`` with filters. Then a push of a 1 MiB
adapter into this registry against one into an empty registry, and
``python -X importtime`` checks that torch, transformers, peft and
sqlite_utils are not imported on these paths.

    python bench/bench_ls_search.py --artifacts 10000 --repeats 7
    python bench/bench_ls_search.py --artifacts 100000 --build-only   # fill the cache (shared lock)
    python bench/bench_ls_search.py --artifacts 100000 --repeats 5
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ChildRun, cli_argv, load, machine_line, median, mib, print_table, run_child, verdict

GOAL_S = 0.3
GOAL_ALL_S = 1.0  # ls of everything (--all)
DEFAULT_CACHE = "/tmp/adapterhub-bench/registries"
HEAVY = ("torch", "transformers", "peft", "sqlite_utils", "bitsandbytes")

BASES = (
    "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-13b-hf",
    "meta-llama/Meta-Llama-3-8B",
    "mistralai/Mistral-7B-v0.1",
    "mistralai/Mistral-7B-Instruct-v0.2",
    "Qwen/Qwen2-7B",
    "google/gemma-2b",
    "microsoft/phi-2",
    "tiiuae/falcon-7b",
)
METHODS = ("LORA",) * 6 + ("DORA", "IA3", "LOHA", "LOKR", "ADALORA", "VERA")
RANKS = (4, 8, 8, 16, 16, 16, 32, 64, 128)
TEAMS = ("nlp", "vision", "search", "support", "ml-infra", "research", "")
TASKS = ("qa", "summarize", "chat", "sql", "code", "translate", "classify", "ner", "rerank", "tickets")
TARGETS = (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["all-linear"])
COMMANDS = {
    "ls": ["ls"],
    "ls NAME": ["ls", "NAME"],  # NAME: the name with the most versions
    "ls --all": ["ls", "--all"],
    "ls --all --json": ["ls", "--all", "--json"],
    "ls --all --quiet": ["ls", "--all", "--quiet"],
    "ls --json": ["ls", "--json"],
    "search --rank 16": ["search", "--rank", "16"],
    "search llama --method lora --min-rank 8": ["search", "llama", "--method", "lora", "--min-rank", "8"],
    "search --base mistral --json": ["search", "--base", "mistral", "--json"],
}


POPULATION_VERSION = 2  # bump when what populate() writes changes: cached registries are rebuilt


class _FileStore:
    """Blob and record files written straight into a store's layout, without fsync.

    For filling a benchmark registry with 100,000 artifacts (300,000 files):
    the real store fsyncs each file, which would only measure the disk.
    """

    def __init__(self, root: Path) -> None:
        self.base = root / "sha256"

    def put_bytes(self, data: bytes, sha256: str) -> bool:
        d = self.base / sha256[:2]
        d.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(d / sha256, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return True


def populate(index_path: Path, n: int, seed: int = 0, blobs: bool = False) -> None:
    """``n`` artifacts, about four versions per name, through ``Index.add_version``.

    With ``blobs``, each artifact gets real files (a config and 2 KiB of
    weights) in ``blobs/`` beside the index, and every index change its record
    blob in ``records/``, as a push writes them: ``gc`` and ``fsck`` have a
    store to walk and re-hash. Without, only the index is filled (the read
    paths of ls and search never open a blob).
    """
    from adapterhub.registry.index import Index

    rng = random.Random(seed)
    index = Index(index_path)
    index.conn.execute("pragma synchronous = off")
    store = None
    if blobs:
        store = _FileStore(index_path.parent / "blobs")
        index.record_store = _FileStore(index_path.parent / "records")
    names: list[str] = []
    with index.bulk():  # one transaction: 100,000 commits would only measure the disk
        for i in range(n):
            _add_one(index, rng, names, i, seed, store)
    if blobs:  # the record blobs of superseded states (each move of `latest`) are garbage a gc would take
        from adapterhub.registry import records

        current = records.referenced(index)
        for p in (index_path.parent / "records" / "sha256").glob("*/*"):
            if p.name not in current:
                p.unlink()
    index.close()


def cached_home(cache_dir: Path, n: int, blobs: bool = False) -> Path:
    """A registry home of ``n`` artifacts, filled once and kept in ``cache_dir`` (100,000 take minutes).

    Callers that write (a push) work on a copy; commands that only read
    (ls, search, gc --dry-run, fsck) may use it in place.
    """
    import json

    home = cache_dir / f"registry-{n}{'-blobs' if blobs else ''}"
    stamp = {"version": POPULATION_VERSION, "artifacts": n, "blobs": blobs}
    try:
        if json.loads((home / ".bench-stamp.json").read_text()) == stamp:
            return home
    except (OSError, ValueError):
        pass
    shutil.rmtree(home, ignore_errors=True)
    tmp = home.with_name(home.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    print(f"filling a registry of {n:,} artifacts{' with blobs and records' if blobs else ''} in {home} ...", flush=True)
    populate(tmp / "index.db", n, blobs=blobs)
    (tmp / ".bench-stamp.json").write_text(json.dumps(stamp))
    os.rename(tmp, home)
    print(f"  {time.perf_counter() - t0:.1f} s", flush=True)
    return home


def _add_one(index, rng: random.Random, names: list[str], i: int, seed: int, store: _FileStore | None = None) -> None:
    from adapterhub.artifact import Inspection
    from adapterhub.manifest import FileEntry, Manifest

    if not names or rng.random() < 0.25:
        team = rng.choice(TEAMS)
        stem = f"{rng.choice(TASKS)}-{rng.choice(BASES).split('/')[1].lower()}-{len(names)}"
        names.append(f"{team}/{stem}" if team else stem)
    name = rng.choice(names[-50:])
    method, rank, base = rng.choice(METHODS), rng.choice(RANKS), rng.choice(BASES)
    quant = rng.choice((None, None, None, "nf4", "int8"))
    kind = "adapter" if rng.random() < 0.9 else rng.choice(("merged", "quantized", "checkpoint"))
    size = rank * 1_250_000 * 4
    sha = hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()
    files = [
        FileEntry("adapter_config.json", 700 + i % 97, hashlib.sha256(sha.encode()).hexdigest()),
        FileEntry("adapter_model.safetensors", size, sha),
    ]
    if store is not None:
        config = f'{{"peft_type": "{method}", "r": {rank}, "base_model_name_or_path": "{base}", "n": {i}}}'.encode()
        weights = bytes.fromhex(sha) * 64  # 2 KiB, different for every artifact
        files = []
        for path, data in (("adapter_config.json", config), ("adapter_model.safetensors", weights)):
            digest = hashlib.sha256(data).hexdigest()
            store.put_bytes(data, digest)
            files.append(FileEntry(path, len(data), digest))
        size = sum(f.size for f in files)
    ins = Inspection(
        kind=kind,
        format="peft",
        method=method,
        base_model=base,
        rank=rank,
        alpha=float(2 * rank),
        quant=quant if kind != "adapter" else None,
        task_type="CAUSAL_LM",
        dtypes=["float32"],
        params=size // 4,
        size=size + 700,
        files=[f.path for f in files],
        details={"target_modules": rng.choice(TARGETS), "trained_on_quant": quant},
    )
    index.add_version(name, None, Manifest.from_entries(files), ins, description=f"{name} run {i}")


def _small_adapter(root: Path, seed: int) -> Path:
    """A 1 MiB LoRA dir, different content for each seed."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((8, 4096)).astype(np.float32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((4096, 8)).astype(np.float32),
        },
        str(root / "adapter_model.safetensors"),
    )
    (root / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf", "task_type": "CAUSAL_LM",
    }))
    return root


def push_into_full_and_empty(cli: list[str], env_full: dict[str, str], tmp: Path, repeats: int, n: int) -> None:
    """``adapterhub push`` of a 1 MiB adapter into this registry and into an empty one, alternating."""
    empty = tmp / "empty-home"
    env_empty = {**env_full, "ADAPTERHUB_HOME": str(empty)}
    run_child(cli + ["ls"], env_empty)  # create it: the first push into a new home also makes the index
    times: dict[str, list[float]] = {"full": [], "empty": []}
    for r in range(repeats):
        for which, env in (("full", env_full), ("empty", env_empty)):
            src = _small_adapter(tmp / f"push-{which}-{r}", seed=1000 + r)
            run = run_child(cli + ["push", str(src), f"bench/push-{which}"], env)
            times[which].append(run.seconds)
    full, emp = median(times["full"]), median(times["empty"])
    print(f"\npush of a 1 MiB adapter (median of {repeats}, alternating): into {n:,} artifacts {full:.3f} s, "
          f"into an empty registry {emp:.3f} s: ratio {full / emp:.2f} {verdict(full <= emp * 1.10)} (goal <= 1.10)")
    print("  all runs: full " + " ".join(f"{t:.3f}" for t in times["full"])
          + "; empty " + " ".join(f"{t:.3f}" for t in times["empty"]))


def _goal(label: str) -> float:
    return GOAL_ALL_S if "--all" in label else GOAL_S


def _busiest_name(index_db: Path) -> str:
    import sqlite3

    conn = sqlite3.connect(f"file:{index_db}?mode=ro", uri=True)
    try:
        return conn.execute("select name from versions group by name order by count(*) desc, name limit 1").fetchone()[0]
    finally:
        conn.close()


def imported_modules(argv: list[str], env: dict[str, str]) -> set[str]:
    """Top-level packages ``python -X importtime`` reports for ``adapterhub <argv>``."""
    cmd = [sys.executable, "-X", "importtime", "-m", "adapterhub.cli", *argv]
    err = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stderr
    mods = set()
    for line in err.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            mods.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return mods


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", type=int, default=10_000, help="artifacts in the index (default 10000)")
    ap.add_argument("--repeats", type=int, default=7, help="median over this many runs (default 7, at least 5)")
    ap.add_argument("--tmp", default="/tmp", help="where to put the temp registry (default /tmp)")
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE,
                    help=f"keep the filled index here between runs (default {DEFAULT_CACHE}); each run copies it")
    ap.add_argument("--build-only", action="store_true", help="fill the cached index and stop (run it under a shared lock)")
    args = ap.parse_args()
    if args.repeats < 5:
        ap.error("--repeats must be at least 5")

    cached = cached_home(Path(args.cache_dir), args.artifacts) / "index.db"
    if args.build_only:
        return
    cli = cli_argv()
    with tempfile.TemporaryDirectory(prefix="adapterhub-bench-", dir=args.tmp) as tmp_:
        home = Path(tmp_) / "home"
        home.mkdir()
        env = {**os.environ, "ADAPTERHUB_HOME": str(home)}
        shutil.copyfile(cached, home / "index.db")  # the push below writes into it
        print(f"adapterhub ls/search benchmark ({machine_line()})")
        print(
            f"index: {args.artifacts:,} artifacts filled via Index.add_version (cached in {cached.parent}; "
            f"no blobs written); index.db {(home / 'index.db').stat().st_size / 2**20:.1f} MiB"
        )
        print(f"CLI: {' '.join(cli)}; median of {args.repeats} subprocess runs, start-up included\n")
        run_child(cli + ["ls"], env)  # migrate a cached index to this schema, and warm the page cache
        busiest = _busiest_name(home / "index.db")
        commands = {label: [busiest if a == "NAME" else a for a in argv] for label, argv in COMMANDS.items()}

        floors = {"python -c pass (floor)": [sys.executable, "-c", "pass"], "adapterhub --version": cli + ["--version"]}
        timed = {f"adapterhub {label}": cli + argv for label, argv in commands.items()}
        runs: dict[str, list[ChildRun]] = {label: [] for label in [*floors, *timed]}
        for _ in range(args.repeats):  # interleaved, so drift hits every command alike
            for label, argv in {**floors, **timed}.items():
                runs[label].append(run_child(argv, env))

        py = median([r.seconds for r in runs["python -c pass (floor)"]])
        rows = []
        for label, rs in runs.items():
            m = median([r.seconds for r in rs])
            rows.append(
                (
                    label,
                    f"{m:.3f}",
                    f"{m / py:.2f}",
                    f"{median([r.cpu_seconds for r in rs]):.3f}",
                    f"{rs[-1].stdout.count(chr(10)):,}",
                    mib(max(r.maxrss_bytes for r in rs)),
                    verdict(m <= _goal(label)) if label in timed else "-",
                    f"{_goal(label)}" if label in timed else "-",
                )
            )
        print_table(["command", "median s", "x python", "CPU s", "stdout lines", "peak RSS", "goal", "goal s"], rows)
        worst = max(median([r.seconds for r in runs[label]]) for label in timed if "--all" not in label)
        print(f"\nslowest command but --all: {worst:.3f} s = {worst / py:.1f}x python start-up; goal <= {GOAL_S} s each; "
              f"--all: goal <= {GOAL_ALL_S} s")
        print("peak RSS of --all counts the pages of index.db read through SQLite's memory map (page cache, shared)")

        push_into_full_and_empty(cli, env, Path(tmp_), args.repeats, args.artifacts)

        print("\nheavy imports on the read path (python -X importtime -m adapterhub.cli ...):")
        for label, argv in commands.items():
            heavy = sorted(imported_modules(argv, env) & set(HEAVY))
            print(f"  {label:<42} {', '.join(heavy) if heavy else 'none of ' + ', '.join(HEAVY)}")
        print(f"{load()} at the end")


if __name__ == "__main__":
    main()
