"""Merge a LoRA adapter into a ~1B Llama-shaped checkpoint: adapterhub vs PEFT vs the I/O floor.

Fixture (built once and cached under ``--tmp``, default /tmp/adapterhub-bench):

- a Llama-shaped bf16 checkpoint, hidden 2048, intermediate 5632, 17 layers,
  16 heads, vocab 32000, tied embeddings: 939,071,488 parameters, 1.75 GiB in
  two shards of at most 1 GB (as ``save_pretrained(max_shard_size="1GB")``
  cuts them), with ``model.safetensors.index.json`` and a ``config.json``
  written by ``LlamaConfig.save_pretrained``. Weights are N(0, 0.02), norms 1;
  writing them directly with safetensors takes seconds where building the
  transformers model would take minutes;
- a real PEFT LoRA adapter, r=16, alpha=32, on all 7 linear projections
  (q, k, v, o, gate, up, down): ``get_peft_model`` on a meta-device copy of
  the model gives the keys, shapes and ``adapter_config.json``
  (``LoraConfig.save_pretrained``); A and B are filled with random values
  (B non-zero, so the merge changes 119 tensors) and saved in fp32, as PEFT
  saves adapters trained on a bf16 base.

Measured, each as its own child process, median of ``--repeats`` runs in an
order that alternates between repeats:

- ``python -m adapterhub.cli merge ADAPTER --base BASE -o OUT --device cpu --json``
  (the in-process ``converters.merge.merge`` time comes from its JSON report);
- PEFT: ``AutoModelForCausalLM.from_pretrained(BASE, dtype=bfloat16)`` +
  ``PeftModel.from_pretrained`` + ``merge_and_unload()`` + ``save_pretrained(OUT)``;
- the I/O floor: safetensors ``load_file`` + ``save_file``, shard by shard;
- the floor with an ``fsync`` of every output file (adapterhub fsyncs what it
  writes; PEFT and the plain floor leave dirty pages to the kernel);
- start-up: ``python -c "import torch, safetensors"``;
- ``merge --quantize nf4`` in one pass, against ``merge`` then ``quantize``
  (two passes, the second reading the 16-bit output from the page cache).

Wall time runs from spawn to exit (start-up included). The ``sync`` that
follows each step is timed too and shown as "+sync", so the writers that do
not fsync are not flattered. Peak RSS is the child's own, from GNU time
(see ``_common.run_child``).

Page cache: by default (``--cache warm``) one unrecorded warm-up run of
every step comes first, and every step then finds the checkpoint and the
Python libraries in the page cache. ``--cache cold`` (root only) syncs and
drops the page cache before every step, so every step reads the checkpoint
and the libraries from disk. It is not the default because the drop is
machine-wide: on a VM shared with other sessions it also empties the cache
that their benchmarks rely on.

Correctness (once, on the last repeat's outputs): adapterhub's and PEFT's
merged checkpoints must hold the same tensor names and shapes, with every
value within 1 bf16 ulp; the script prints the max abs diff and the ulp count.

    python bench/bench_merge.py --repeats 3
    python bench/bench_merge.py --repeats 3 --cache cold   # root; drops the page cache machine-wide
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from _common import (
    ChildRun,
    gib,
    load,
    machine_line,
    median,
    mib,
    print_table,
    run_child,
    sync,
    verdict,
)

DEFAULT_TMP = "/tmp/adapterhub-bench"
FIXTURE_VERSION = 1
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARD_BYTES = 10**9  # "1GB" as transformers' max_shard_size reads it
HF_INDEX = "model.safetensors.index.json"
DROP_CACHES = "/proc/sys/vm/drop_caches"

GOAL_FLOOR = 1.3  # adapterhub wall / floor wall
GOAL_PEFT = 0.5  # adapterhub wall / PEFT wall
GOAL_RSS = 0.25  # adapterhub peak RSS / checkpoint bytes


# --------------------------------------------------------------------------- fixture


def llama_kwargs(layers: int) -> dict[str, object]:
    return {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    }


def _meta_model(layers: int):  # -> LlamaForCausalLM on the meta device
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**llama_kwargs(layers)))


def _stamp_ok(root: Path, stamp: dict[str, object]) -> bool:
    try:
        return json.loads((root / ".bench-stamp.json").read_text()) == stamp
    except (OSError, ValueError):
        return False


def build_base(root: Path, layers: int, seed: int = 0) -> None:
    """The bf16 checkpoint: shards cut at 1 GB in the model's own tensor order."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    model = _meta_model(layers)
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items() if k != "lm_head.weight"]  # tied
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = math.prod(shape) * 2
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    gen = torch.Generator().manual_seed(seed)
    tmp = root.with_name(root.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:  # RMSNorm weights
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            total += tensors[name].nbytes
            weight_map[name] = fname
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    (tmp / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = LlamaConfig(**llama_kwargs(layers))
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp)
    shutil.rmtree(root, ignore_errors=True)
    os.rename(tmp, root)


def build_adapter(root: Path, base: Path, layers: int, r: int = 16, alpha: int = 32, seed: int = 1) -> None:
    """A PEFT LoRA adapter: keys, shapes and config from real PEFT on a meta-device model."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    lc = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(PROJECTIONS), task_type="CAUSAL_LM")
    peft_model = get_peft_model(_meta_model(layers), lc)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for k, v in get_peft_model_state_dict(peft_model).items():
        shape = tuple(v.shape)
        if ".lora_A." in k:  # (r, in): PEFT's kaiming-uniform scale
            tensors[k] = (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(shape[1])
        else:  # (out, r): trained B is small but not zero
            tensors[k] = torch.randn(shape, generator=gen) * 0.01
    tmp = root.with_name(root.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = peft_model.peft_config["default"]
    cfg.base_model_name_or_path = str(base)
    cfg.inference_mode = True
    cfg.save_pretrained(tmp)
    shutil.rmtree(root, ignore_errors=True)
    os.rename(tmp, root)


def ensure_fixtures(tmp: Path, layers: int) -> tuple[Path, Path]:
    """(base, adapter), built on first use and reused while the stamp matches."""
    root = tmp / f"llama-{layers}l"
    base, adapter = root / "base", root / "lora-r16"
    stamp = {"version": FIXTURE_VERSION, "layers": layers}
    if not _stamp_ok(base, stamp):
        print(f"building the base checkpoint in {base} ...", flush=True)
        t0 = time.perf_counter()
        build_base(base, layers)
        (base / ".bench-stamp.json").write_text(json.dumps(stamp))
        print(f"  {time.perf_counter() - t0:.1f} s", flush=True)
    if not _stamp_ok(adapter, stamp):
        print(f"building the LoRA adapter in {adapter} ...", flush=True)
        build_adapter(adapter, base, layers)
        (adapter / ".bench-stamp.json").write_text(json.dumps(stamp))
    return base, adapter


def safetensors_files(root: Path) -> list[Path]:
    return sorted(root.glob("*.safetensors"))


def weights_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in safetensors_files(root))


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- child processes


def child_peft(base: str, adapter: str, out: str) -> None:
    """PEFT's route, with a phase breakdown on stdout (JSON)."""
    t = [time.perf_counter()]
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t.append(time.perf_counter())
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    t.append(time.perf_counter())
    model = PeftModel.from_pretrained(model, adapter)
    t.append(time.perf_counter())
    model = model.merge_and_unload()
    t.append(time.perf_counter())
    model.save_pretrained(out)
    t.append(time.perf_counter())
    names = ("import", "from_pretrained", "PeftModel", "merge_and_unload", "save_pretrained")
    print(json.dumps({n: round(b - a, 3) for n, a, b in zip(names, t, t[1:])}))


def child_floor(src: str, dst: str, fsync: bool) -> None:
    """safetensors load_file + save_file, shard by shard (side files copied)."""
    t0 = time.perf_counter()
    from safetensors.torch import load_file, save_file

    t1 = time.perf_counter()
    os.makedirs(dst)
    for p in sorted(Path(src).iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        target = os.path.join(dst, p.name)
        if p.suffix == ".safetensors":
            save_file(load_file(str(p)), target, metadata={"format": "pt"})
        else:
            shutil.copyfile(p, target)
        if fsync:
            fd = os.open(target, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    print(json.dumps({"import": round(t1 - t0, 3), "copy": round(time.perf_counter() - t1, 3)}))


def child_main(argv: Sequence[str]) -> None:
    what, *rest = argv
    if what == "peft":
        child_peft(*rest)
    elif what == "floor":
        child_floor(rest[0], rest[1], fsync=False)
    elif what == "floor-fsync":
        child_floor(rest[0], rest[1], fsync=True)
    else:
        raise SystemExit(f"unknown child {what}")


# --------------------------------------------------------------------------- verification


def _ordered(bits):  # bf16 bit patterns (int16) -> integers in value order, +0 == -0
    import torch

    b = bits.to(torch.int32)
    return torch.where(b < 0, -(b & 0x7FFF), b)


def compare_outputs(a: Path, b: Path) -> dict[str, object]:
    """Tensor names, shapes and values of two checkpoints, one tensor at a time."""
    import torch
    from safetensors import safe_open

    def index(root: Path) -> dict[str, Path]:
        return {k: p for p in safetensors_files(root) for k in safe_open(str(p), framework="pt").keys()}  # noqa: SIM118 (safe_open is not iterable)

    ia, ib = index(a), index(b)
    res: dict[str, object] = {
        "only_in_adapterhub": sorted(set(ia) - set(ib)),
        "only_in_peft": sorted(set(ib) - set(ia)),
        "tensors": len(set(ia) & set(ib)),
    }
    max_abs, max_ulp, n_diff, n_total, mismatched, worst = 0.0, 0, 0, 0, [], ""
    for k in sorted(set(ia) & set(ib)):
        with safe_open(str(ia[k]), framework="pt") as fa, safe_open(str(ib[k]), framework="pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
        if x.shape != y.shape or x.dtype != y.dtype:
            mismatched.append(f"{k}: {x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}")
            continue
        n_total += x.numel()
        if x.dtype == torch.bfloat16:
            ulp = (_ordered(x.view(torch.int16)) - _ordered(y.view(torch.int16))).abs()
            u = int(ulp.max())
            n_diff += int((ulp > 0).sum())
        else:  # not expected here: any difference counts as out of tolerance
            u = 0 if torch.equal(x, y) else 10**9
            n_diff += int((x != y).sum())
        max_abs = max(max_abs, float((x.float() - y.float()).abs().max()) if x.numel() else 0.0)
        if u > max_ulp:
            max_ulp, worst = u, k
        del x, y
    res.update(
        max_abs_diff=max_abs, max_ulp=max_ulp, values_differing=n_diff, values=n_total,
        shape_or_dtype_mismatches=mismatched, worst_tensor=worst,
    )
    res["ok"] = not res["only_in_adapterhub"] and not res["only_in_peft"] and not mismatched and max_ulp <= 1
    return res


def tensors_changed(base: Path, out: Path) -> int:
    """How many tensors of ``out`` differ from the base (the merge must have touched 7 per layer)."""
    import torch
    from safetensors import safe_open

    where = {k: p for p in safetensors_files(base) for k in safe_open(str(p), framework="pt").keys()}  # noqa: SIM118 (safe_open is not iterable)
    changed = 0
    for p in safetensors_files(out):
        with safe_open(str(p), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118
                with safe_open(str(where[k]), framework="pt") as g:
                    changed += not torch.equal(f.get_tensor(k), g.get_tensor(k))
    return changed


# --------------------------------------------------------------------------- the run


def can_drop_caches() -> bool:
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def drop_caches() -> None:
    sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3")


class Bench:
    """Alternating child runs with per-step medians."""

    def __init__(self, tmp: Path, cold: bool) -> None:
        self.tmp = tmp
        self.cold = cold
        self.wall: dict[str, list[float]] = defaultdict(list)
        self.synced: dict[str, list[float]] = defaultdict(list)  # wall + the sync that follows
        self.rss: dict[str, list[int]] = defaultdict(list)
        self.cpu: dict[str, list[float]] = defaultdict(list)  # user + system seconds of the children
        self.last: dict[str, ChildRun] = {}

    def out(self, label: str) -> Path:
        return self.tmp / ("out-" + "".join(c if c.isalnum() else "-" for c in label))

    def prepare(self, *paths: Path) -> None:
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)
        if self.cold:
            drop_caches()
        else:
            sync()

    def run(self, label: str, argvs: Sequence[Sequence[str]], outs: Sequence[Path], record: bool = True) -> None:
        """Run ``argvs`` back to back (one step); wall adds up, peak RSS is the largest."""
        self.prepare(*outs)
        runs = [run_child(a) for a in argvs]
        t0 = time.perf_counter()
        sync()
        s = time.perf_counter() - t0
        if record:
            w = sum(r.seconds for r in runs)
            self.wall[label].append(w)
            self.synced[label].append(w + s)
            self.rss[label].append(max(r.maxrss_bytes for r in runs))
            self.cpu[label].append(sum(r.cpu_seconds for r in runs))
        self.last[label] = runs[-1]

    def med(self, label: str) -> float:
        return median(self.wall[label])

    def med_synced(self, label: str) -> float:
        return median(self.synced[label])

    def med_rss(self, label: str) -> float:
        return median(self.rss[label])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="median over this many runs (default 3)")
    ap.add_argument("--tmp", default=DEFAULT_TMP, help=f"fixtures (cached) and outputs (default {DEFAULT_TMP})")
    ap.add_argument("--layers", type=int, default=17, help="decoder layers (default 17: 0.94B params, 1.75 GiB)")
    ap.add_argument("--cache", choices=("warm", "cold"), default="warm",
                    help="warm (default): warm-up runs first; cold: drop the page cache before every step (root)")
    ap.add_argument("--no-peft", dest="peft", action="store_false", help="skip PEFT (the slowest step)")
    ap.add_argument("--no-quantize", dest="quantize", action="store_false", help="skip merge --quantize nf4")
    ap.add_argument("--no-verify", dest="verify", action="store_false", help="skip the adapterhub-vs-PEFT comparison")
    args = ap.parse_args()

    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    base, adapter = ensure_fixtures(tmp, args.layers)
    ckpt = weights_bytes(base)
    cold = args.cache == "cold"
    if cold and not can_drop_caches():
        raise SystemExit(f"--cache cold needs a writable {DROP_CACHES} (root)")

    py = sys.executable
    me = str(Path(__file__).resolve())
    cli = [py, "-m", "adapterhub.cli"]
    b = Bench(tmp, cold)
    o = b.out
    AH, PEFT, FLOOR, FLOOR_FS, START = (
        "adapterhub merge", "PEFT merge_and_unload", "floor: load_file+save_file", "floor + fsync",
        "start-up: import torch",
    )
    AHQ, AH2 = "adapterhub merge --quantize nf4", "adapterhub merge, then quantize nf4"
    steps: list[tuple[str, list[list[str]], list[Path]]] = [
        (AH, [cli + ["merge", str(adapter), "--base", str(base), "-o", str(o(AH)), "--device", "cpu", "--json"]], [o(AH)]),
        (FLOOR, [[py, me, "--child", "floor", str(base), str(o(FLOOR))]], [o(FLOOR)]),
        (FLOOR_FS, [[py, me, "--child", "floor-fsync", str(base), str(o(FLOOR_FS))]], [o(FLOOR_FS)]),
        (START, [[py, "-c", "import torch, safetensors.torch"]], []),
    ]
    if args.peft:
        steps.insert(1, (PEFT, [[py, me, "--child", "peft", str(base), str(adapter), str(o(PEFT))]], [o(PEFT)]))
    if args.quantize:
        steps.append((AHQ, [cli + ["merge", str(adapter), "--base", str(base), "-o", str(o(AHQ)), "--device", "cpu",
                                  "--quantize", "nf4", "--json"]], [o(AHQ)]))
        steps.append((AH2, [
            cli + ["merge", str(adapter), "--base", str(base), "-o", str(o(AH2)), "--device", "cpu", "--json"],
            cli + ["quantize", str(o(AH2)), "--to", "nf4", "-o", f"{o(AH2)}-nf4", "--device", "cpu", "--json"],
        ], [o(AH2), Path(f"{o(AH2)}-nf4")]))

    print(f"adapterhub merge benchmark ({machine_line()})")
    print(
        f"base: {base} ({args.layers} layers, {gib(ckpt)} in {len(safetensors_files(base))} shards); "
        f"adapter: {adapter} ({mib(weights_bytes(adapter))}, LoRA r=16 on {', '.join(PROJECTIONS)})"
    )
    cache_note = (
        "cold: sync + drop_caches before every step (checkpoint and libraries read from disk)"
        if cold else "warm: one unrecorded warm-up of every step first; the checkpoint stays in the page cache"
    )
    print(f"page cache: {cache_note}; order alternates between repeats\n", flush=True)

    if not cold:
        for label, argvs, outs in steps:
            b.run(label, argvs, outs, record=False)
            for p in outs:
                shutil.rmtree(p, ignore_errors=True)
        print(f"  warm-up done ({load()})", flush=True)

    for r in range(args.repeats):
        order = steps if r % 2 == 0 else steps[::-1]
        for i, (label, argvs, outs) in enumerate(order):
            b.run(label, argvs, outs)
            last = r == args.repeats - 1
            for p in outs:
                if not (last and label in (AH, PEFT) and args.verify):
                    shutil.rmtree(p, ignore_errors=True)
        print(f"  repeat {r + 1}/{args.repeats} done ({load()})", flush=True)

    # ---------------------------------------------------------------- report
    labels = [s[0] for s in steps]
    floor_s, floor_fs = b.med(FLOOR), b.med(FLOOR_FS)
    print(
        f"\nmedian of {args.repeats} (checkpoint {gib(ckpt)}); +sync: wall plus the `sync` that follows; "
        "CPU: user+sys of the child (less sensitive to other load than wall)"
    )
    print_table(
        ["step", "wall s", "+sync s", "x floor", "CPU s", "peak RSS", "RSS/ckpt", "all runs (wall s)"],
        [
            (
                k, f"{b.med(k):.2f}", f"{b.med_synced(k):.2f}", f"{b.med(k) / floor_s:.2f}", f"{median(b.cpu[k]):.1f}",
                mib(b.med_rss(k)), f"{b.med_rss(k) / ckpt:.0%}", " ".join(f"{t:.2f}" for t in b.wall[k]),
            )
            for k in labels
        ],
    )
    ah_rep = json.loads(b.last[AH].stdout)
    print(f"\nadapterhub merge in-process (converters.merge.merge, from --json report.seconds): "
          f"{ah_rep['report']['seconds']:.2f} s of {b.last[AH].seconds:.2f} s wall (last run); "
          f"tensors_changed={ah_rep['report']['tensors_changed']}")
    if args.peft:
        print(f"PEFT phases (last run): {b.last[PEFT].stdout.strip()}")
    print(f"floor phases (last run): {b.last[FLOOR].stdout.strip()}")

    ah, ah_sync, ah_rss = b.med(AH), b.med_synced(AH), b.med_rss(AH)
    print("\nratios (medians):")
    print(f"  adapterhub / floor            = {ah / floor_s:5.2f}   goal <= {GOAL_FLOOR}  {verdict(ah / floor_s <= GOAL_FLOOR)}")
    print(f"  adapterhub / (floor + fsync)  = {ah / floor_fs:5.2f}   (both fsync their output)")
    print(f"  adapterhub+sync / floor+sync  = {ah_sync / b.med_synced(FLOOR):5.2f}")
    if args.peft:
        pe = b.med(PEFT)
        print(f"  adapterhub / PEFT             = {ah / pe:5.2f}   goal <= {GOAL_PEFT}  {verdict(ah / pe <= GOAL_PEFT)}")
        print(f"  adapterhub+sync / PEFT+sync   = {ah_sync / b.med_synced(PEFT):5.2f}")
        print(f"  PEFT / floor                  = {pe / floor_s:5.2f}")
    print(f"  adapterhub peak RSS / ckpt    = {ah_rss / ckpt:5.1%}   goal <= {GOAL_RSS:.0%}  "
          f"{verdict(ah_rss / ckpt <= GOAL_RSS)}  ({mib(ah_rss)} of {gib(ckpt)})")
    print(f"  adapterhub peak RSS - import  = {mib(ah_rss - b.med_rss(START))}   (start-up alone: {mib(b.med_rss(START))})")
    if args.peft:
        print(f"  PEFT peak RSS / ckpt          = {b.med_rss(PEFT) / ckpt:5.1%}")
    if args.quantize:
        one, two = b.med(AHQ), b.med(AH2)
        print(f"  merge --quantize nf4 / (merge + quantize) = {one / two:5.2f}   "
              f"({one:.2f} s vs {two:.2f} s; peak RSS {mib(b.med_rss(AHQ))} vs {mib(b.med_rss(AH2))})")
        print(f"  merge --quantize nf4 / merge  = {one / ah:5.2f}")

    if args.verify and args.peft:
        print("\ncorrectness: adapterhub vs PEFT merged tensors (last repeat's outputs)")
        res = compare_outputs(o(AH), o(PEFT))
        for k, v in res.items():
            print(f"  {k}: {v}")
        print(f"  tensors that differ from the base (adapterhub): {tensors_changed(base, o(AH))} "
              f"(expected {len(PROJECTIONS) * args.layers})")
        print(f"  verdict: {'identical keys, every value within 1 bf16 ulp' if res['ok'] else 'MISMATCH'}")
        for p in (o(AH), o(PEFT)):
            shutil.rmtree(p, ignore_errors=True)
    print(f"{load()} at the end")


if __name__ == "__main__":
    main()
