"""Push and pull of a ~1 GB sharded checkpoint against `cp -r` and the I/O floor.

Builds a fake Llama-shaped fp16 checkpoint (config.json, shards written with
``safetensors.numpy.save_file``, model.safetensors.index.json) that
``inspect_path`` accepts as a checkpoint, then times, median of --repeats:

- ``cp -r SRC DST`` and ``cp -r`` followed by ``sync`` (push and pull fsync;
  cp does not);
- ``adapterhub ls`` on a new empty home (start-up plus creating the index,
  once per registry), then ``adapterhub push`` through the real CLI into
  that existing, empty registry, and, once more, ``adapterhub push`` into a
  brand-new home (the creation included);
- a re-push of identical content (time, and bytes written: PushResult's
  ``bytes_written``, the child's /proc/<pid>/io ``write_bytes`` and the blob
  directory before/after);
- ``adapterhub pull`` into a fresh directory;
- floors in this process: one sha256 pass over every byte, a plain 8 MiB
  read+write copy (with and without fsync), and safetensors
  ``load_file`` + ``save_file`` shard by shard.

Source files stay in the page cache (warm), as after training; every step
starts after ``sync`` so none pays for the previous one's writeback.

Every step that writes is "primed": just before it, a scratch file of the
fixture's size is written, deleted and synced. On the VM this was written
on, giving the page cache fresh memory is slow and erratic, while memory
that was just freed is reused at full speed, so without priming a step's
time depends on whether the step before it happened to free 1 GB. Pull
follows a re-push that frees nothing; unprimed it took 7.6 s and 4.3 CPU
seconds, primed 2.1 s and 1.6 (the difference is kernel time spent getting
pages). ``--no-prime`` shows the unprimed figures.

    python bench/bench_push_pull.py --size-gb 1 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from _common import (
    ChildRun,
    cli_argv,
    gib,
    load,
    machine_line,
    median,
    mib,
    print_table,
    run_child,
    sync,
    timed,
    timed_cpu,
    verdict,
)

GOAL = 1.5  # push and pull at most this many times `cp -r`
CHUNK = 8 * 1024 * 1024
HF_INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------- fixture


def _llama_shapes(target_bytes: int) -> tuple[dict[str, int], list[list[tuple[str, tuple[int, ...]]]]]:
    """A Llama-shaped config near ``target_bytes`` of fp16, and its tensors split into shards."""
    h, inter = (2048, 5632) if target_bytes >= 2**29 else (512, 1376)
    vocab = 32000
    per_layer = 2 * (4 * h * h + 3 * h * inter + 2 * h)
    layers = max(1, round((target_bytes - 2 * vocab * h) / per_layer))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": h // 128,
        "num_key_value_heads": h // 128,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "torch_dtype": "float16",
    }
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(min(3, layers))]
    shards[0].append(("model.embed_tokens.weight", (vocab, h)))
    for shard, ids in zip(shards, np.array_split(np.arange(layers), len(shards))):
        for i in ids:
            p = f"model.layers.{i}."
            shard += [(p + f"self_attn.{m}_proj.weight", (h, h)) for m in "qkvo"]
            shard += [(p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h))]
            shard += [(p + "mlp.down_proj.weight", (h, inter))]
            shard += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    shards[-1].append(("model.norm.weight", (h,)))
    return config, shards


def make_checkpoint(root: Path, target_bytes: int, seed: int = 0) -> int:
    """Write the fixture; return its size in bytes."""
    rng = np.random.default_rng(seed)
    config, shards = _llama_shapes(target_bytes)
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    weight_map: dict[str, str] = {}
    total = 0
    for n, shard in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        # Random finite fp16 (bit patterns below 0x7C00, the start of inf/nan):
        # incompressible, so no layer of the stack can cheat on it.
        tensors = {k: rng.integers(0, 0x7C00, size=s, dtype=np.uint16).view(np.float16) for k, s in shard}
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({k: fname for k in tensors})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / HF_INDEX).write_text(json.dumps(index, indent=2))
    return tree_size(root)


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def files_of(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- floors (in-process)


def floor_sha256(src: Path) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for p in files_of(src):
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])


def floor_copy(src: Path, dst: Path, fsync: bool) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    dst.mkdir()
    for p in files_of(src):
        with open(p, "rb", buffering=0) as fi, open(dst / p.name, "wb", buffering=0) as fo:
            while n := fi.readinto(buf):
                fo.write(view[:n])
            if fsync:
                os.fsync(fo.fileno())


def floor_safetensors(src: Path, dst: Path) -> None:
    dst.mkdir()
    for p in files_of(src):
        if p.suffix == ".safetensors":
            save_file(load_file(str(p)), str(dst / p.name), metadata={"format": "pt"})
        else:
            shutil.copyfile(p, dst / p.name)


# --------------------------------------------------------------------------- the run


def prime(tmp: Path, size: int) -> None:
    """Write and delete ``size`` bytes, so the next step can reuse just-freed page cache."""
    scratch = tmp / "prime"
    buf = bytes(CHUNK)
    with open(scratch, "wb", buffering=0) as f:
        for _ in range(0, size, CHUNK):
            f.write(buf)
    scratch.unlink()
    sync()


def blob_bytes(home: Path) -> int:
    blobs = home / "blobs"
    return tree_size(blobs) if blobs.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="fixture size in GiB (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="median over this many runs (default 3)")
    ap.add_argument("--tmp", default="/tmp", help="where to put the temp data (default /tmp)")
    ap.add_argument("--no-prime", dest="prime", action="store_false", help="do not prime before writing steps")
    args = ap.parse_args()

    from adapterhub.inspect import inspect_path

    cli = cli_argv()
    with tempfile.TemporaryDirectory(prefix="adapterhub-bench-", dir=args.tmp) as tmp_:
        tmp = Path(tmp_)
        src = tmp / "src"
        size = make_checkpoint(src, int(args.size_gb * 2**30))
        ins = inspect_path(src)
        assert ins.kind == "checkpoint", f"inspect_path says {ins.kind}, expected a checkpoint"
        print(f"adapterhub push/pull benchmark ({machine_line()})")
        print(
            f"fixture: {len(files_of(src))} files, {gib(size)}; inspect_path: kind={ins.kind} "
            f"format={ins.format} params={ins.params:,} dtypes={ins.dtypes}"
        )
        primed = "primed with a free of the same size" if args.prime else "not primed"
        print(f"CLI: {' '.join(cli)}; source warm in the page cache; sync before every step; writers {primed}\n")
        sync()

        wall: dict[str, list[float]] = defaultdict(list)
        cpu: dict[str, list[float]] = defaultdict(list)
        rss: dict[str, list[int]] = defaultdict(list)
        written: dict[str, list[int]] = defaultdict(list)  # /proc/<pid>/io write_bytes
        repush_reported: list[int] = []
        repush_blob_delta: list[int] = []

        def ready() -> None:
            if args.prime:
                prime(tmp, size)

        def step(label: str, fn: Callable[[], tuple[float, float]], *cleanup: Path) -> None:
            """An in-process or non-adapterhub step; ``cleanup`` marks it as a writer."""
            if cleanup:
                ready()
            w, c = fn()
            wall[label].append(w)
            cpu[label].append(c)
            for p in cleanup:
                shutil.rmtree(p, ignore_errors=True)
            sync()

        def child(label: str, argv: list[str], env: dict[str, str]) -> ChildRun:
            run = run_child(argv, env)
            wall[label].append(run.seconds)
            cpu[label].append(run.cpu_seconds)
            rss[label].append(run.maxrss_bytes)
            written[label].append(run.write_bytes)
            sync()
            return run

        def cp(dst: Path, then_sync: bool) -> tuple[float, float]:
            run = run_child(["cp", "-r", str(src), str(dst)])
            return run.seconds + (timed(sync) if then_sync else 0.0), run.cpu_seconds

        for r in range(args.repeats):
            dst = tmp / "dst"
            home = tmp / f"home{r}"
            env = {**os.environ, "ADAPTERHUB_HOME": str(home)}

            step("cp -r", lambda: cp(dst, False), dst)
            step("cp -r + sync", lambda: cp(dst, True), dst)

            # Creating a registry happens once: start-up plus creating the index.
            child("adapterhub ls, new home", cli + ["ls"], env)

            ready()
            push = child("adapterhub push", cli + ["push", str(src), "bench/ckpt", "--json"], env)
            assert json.loads(push.stdout)["bytes_written"] == size

            ready()  # the first push of all, creating the registry as it goes
            fresh = {**os.environ, "ADAPTERHUB_HOME": str(tmp / "fresh")}
            child("adapterhub push, new home", cli + ["push", str(src), "bench/ckpt", "--json"], fresh)
            shutil.rmtree(tmp / "fresh")
            sync()

            before = blob_bytes(home)
            again = child("adapterhub push (again)", cli + ["push", str(src), "bench/ckpt", "--json"], env)
            res = json.loads(again.stdout)
            assert not res["created"], "a re-push of identical content created a new version"
            repush_reported.append(res["bytes_written"])
            repush_blob_delta.append(blob_bytes(home) - before)

            ready()
            child("adapterhub pull", cli + ["pull", "bench/ckpt", str(dst), "--json"], env)
            subprocess.run(["cmp", "-s", str(src / HF_INDEX), str(dst / HF_INDEX)], check=True)
            assert tree_size(dst) == size
            shutil.rmtree(dst)
            shutil.rmtree(home)
            sync()

            step("floor: sha256 of every byte", lambda: timed_cpu(floor_sha256, src))
            step("floor: read+write 8 MiB", lambda: timed_cpu(floor_copy, src, dst, False), dst)
            step("floor: read+write+fsync", lambda: timed_cpu(floor_copy, src, dst, True), dst)
            step("floor: safetensors load+save", lambda: timed_cpu(floor_safetensors, src, dst), dst)
            print(f"  repeat {r + 1}/{args.repeats} done ({load()})", flush=True)

    med = {k: median(v) for k, v in wall.items()}
    cp_s, cps_s = med["cp -r"], med["cp -r + sync"]
    print(f"\nmedian of {args.repeats} ({gib(size)}); CPU = user+sys of the step's processes:")
    print_table(
        ["step", "wall s", "GiB/s", "x cp", "x cp+sync", "CPU s", "peak RSS", "all runs (wall s)"],
        [
            (
                k,
                f"{m:.3f}",
                f"{size / 2**30 / m:.2f}",
                f"{m / cp_s:.2f}",
                f"{m / cps_s:.2f}",
                f"{median(cpu[k]):.2f}",
                mib(max(rss[k])) if k in rss else "-",
                " ".join(f"{t:.2f}" for t in wall[k]),
            )
            for k, m in med.items()
        ],
    )
    push_s, pull_s, again_s = med["adapterhub push"], med["adapterhub pull"], med["adapterhub push (again)"]
    print("\nratios (goal: push and pull <= 1.5x cp):")
    for what, t in (("push", push_s), ("pull", pull_s)):
        print(f"  {what} / cp          = {t / cp_s:5.2f}   {verdict(t / cp_s <= GOAL)}")
        print(f"  {what} / (cp+sync)   = {t / cps_s:5.2f}   {verdict(t / cps_s <= GOAL)}")
    print(f"  re-push / push     = {again_s / push_s:5.2f}   ({again_s:.3f} s for an unchanged {gib(size)})")
    sha_s = med["floor: sha256 of every byte"]
    floor_s = max(sha_s, cps_s)
    new_s = med["adapterhub push, new home"]
    print("issue 14 goals (push <= 1.15x max(sha256 pass, cp+sync); pull <= 1.3x the sha256 pass):")
    print(f"  push / max(sha256, cp+sync)            = {push_s / floor_s:5.2f}   {verdict(push_s / floor_s <= 1.15)}")
    print(f"  push, new home / max(sha256, cp+sync)  = {new_s / floor_s:5.2f}   (creating the registry included)")
    print(f"  push / sha256 pass                     = {push_s / sha_s:5.2f}")
    print(f"  pull / sha256 pass                     = {pull_s / sha_s:5.2f}   {verdict(pull_s / sha_s <= 1.3)}")
    print("re-push bytes written (goal: 0 blob bytes; max over repeats):")
    print(f"  PushResult.bytes_written   = {max(repush_reported):,}   (first push: {size:,})")
    print(f"  blob dir growth            = {max(repush_blob_delta):,}   {verdict(max(repush_blob_delta) == 0)}")
    print(
        f"  /proc/<pid>/io write_bytes = {max(written['adapterhub push (again)']):,}   "
        f"(SQLite -shm/-wal upkeep; first push: {median(written['adapterhub push']):,.0f})"
    )
    print("peak RSS of the adapterhub child (max over repeats):")
    for k in ("adapterhub push", "adapterhub push (again)", "adapterhub pull"):
        print(f"  {k:<24} {mib(max(rss[k]))}")
    print(f"{load()} at the end")


if __name__ == "__main__":
    main()
