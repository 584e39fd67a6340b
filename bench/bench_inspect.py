"""`inspect_path` on a Llama-7B-shaped checkpoint and a LoRA adapter for it.

Writing 13 GB to time a header reader would only measure the disk, so the
safetensors files are sparse: a valid header with the real data offsets,
then ``os.truncate`` to the full size, which leaves the data region a hole.
They are real, valid safetensors files whose tensors read as zeros (and
``safe_open`` accepts them), next to a real ``config.json`` and
``model.safetensors.index.json``.

- checkpoint: 32 layers, hidden 4096, intermediate 11008, vocab 32000,
  bf16, 3 shards, 6.74B parameters (12.55 GiB);
- adapter: PEFT LoRA r=16 on all 7 linear projections of that model, fp32
  (40M parameters, 152 MiB).

Times ``inspect_path`` in this process (the first call, which pays for the
imports, then the median of --repeats) and ``adapterhub inspect DIR --json``
as a subprocess (median of --repeats, start-up included), against
``python -c pass``. Goal: at most 1 s.

    python bench/bench_inspect.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import tempfile
import time
from pathlib import Path

from _common import cli_argv, gib, load, machine_line, median, mib, print_table, run_child, verdict

GOAL_S = 1.0
LAYERS, HIDDEN, INTER, VOCAB = 32, 4096, 11008, 32000
PROJ = {  # module -> (out, in) of its weight
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}
ITEMSIZE = {"BF16": 2, "F32": 4}

Tensors = list[tuple[str, tuple[int, ...]]]


def write_sparse_safetensors(path: Path, tensors: Tensors, dtype: str) -> int:
    """A valid safetensors file whose data region is a hole; returns the data bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def llama_tensors() -> Tensors:
    out: Tensors = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        out += [(f"model.layers.{i}.{m}.weight", shape) for m, shape in PROJ.items()]
        out += [(f"model.layers.{i}.input_layernorm.weight", (HIDDEN,))]
        out += [(f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,))]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def make_checkpoint(root: Path, shards: int = 3) -> tuple[int, int]:
    """Sparse Llama-7B checkpoint; returns (params, bytes)."""
    root.mkdir()
    tensors = llama_tensors()
    params = sum(math.prod(s) for _, s in tensors)
    per_shard = params * 2 / shards
    groups: list[Tensors] = [[] for _ in range(shards)]
    seen = 0
    for name, shape in tensors:  # cut shards by bytes, keeping tensor order
        groups[min(int(seen / per_shard), shards - 1)].append((name, shape))
        seen += math.prod(shape) * 2
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{shards:05d}.safetensors"
        total += write_sparse_safetensors(root / fname, group, "BF16")
        weight_map.update({name: fname for name, _ in group})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return params, dir_size(root)


def make_lora(root: Path, r: int = 16) -> tuple[int, int]:
    """Sparse PEFT LoRA adapter (all 7 projections, every layer); returns (params, bytes)."""
    root.mkdir()
    tensors: Tensors = []
    for i in range(LAYERS):
        for m, (out, inp) in PROJ.items():
            prefix = f"base_model.model.model.layers.{i}.{m}"
            tensors += [(f"{prefix}.lora_A.weight", (r, inp)), (f"{prefix}.lora_B.weight", (out, r))]
    write_sparse_safetensors(root / "adapter_model.safetensors", tensors, "F32")
    (root / "adapter_config.json").write_text(json.dumps(lora_config(r), indent=2))
    return sum(math.prod(s) for _, s in tensors), dir_size(root)


def lora_config(r: int, **extra: object) -> dict[str, object]:
    """adapter_config.json of a PEFT LoRA on all 7 projections of the 7B shape."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.05,
        "target_modules": [m.split(".")[1] for m in PROJ],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        **extra,
    }


def dir_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.iterdir())


def allocated(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="median over this many runs (default 5)")
    ap.add_argument("--tmp", default="/tmp", help="where to put the sparse files (default /tmp)")
    args = ap.parse_args()

    cli = cli_argv()
    with tempfile.TemporaryDirectory(prefix="adapterhub-bench-", dir=args.tmp) as tmp_:
        tmp = Path(tmp_)
        fixtures = {
            "llama-7b checkpoint": (tmp / "llama-7b", make_checkpoint(tmp / "llama-7b")),
            "lora r=16 adapter": (tmp / "lora-r16", make_lora(tmp / "lora-r16")),
        }
        print(f"adapterhub inspect benchmark ({machine_line()})")
        for label, (path, (params, size)) in fixtures.items():
            print(f"  {label}: {params / 1e9:.2f}B params, {gib(size)} apparent, {mib(allocated(path))} on disk")

        t0 = time.perf_counter()
        from adapterhub.inspect import inspect_path

        import_s = time.perf_counter() - t0
        floor = median([run_child([sys.executable, "-c", "pass"]).seconds for _ in range(args.repeats)])
        rows = [("python -c pass (floor)", "-", "-", f"{floor:.3f}", "1.00", "-", "-")]
        for label, (path, (params, _)) in fixtures.items():
            t0 = time.perf_counter()
            ins = inspect_path(path)
            first = time.perf_counter() - t0
            assert ins.params == params, f"{label}: inspect_path counted {ins.params} params, expected {params}"
            warm = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                inspect_path(path)
                warm.append(time.perf_counter() - t0)
            runs = [run_child(cli + ["inspect", str(path), "--json"]) for _ in range(args.repeats)]
            out = json.loads(runs[-1].stdout)
            assert (out["kind"], out["params"]) == (ins.kind, params)
            sub = median([r.seconds for r in runs])
            print(f"  {label}: kind={ins.kind} format={ins.format} method={ins.method} rank={ins.rank} dtypes={ins.dtypes}")
            rows.append(
                (
                    label,
                    f"{first:.3f}",
                    f"{median(warm):.3f}",
                    f"{sub:.3f}",
                    f"{sub / floor:.2f}",
                    f"{median([r.cpu_seconds for r in runs]):.3f}",
                    f"{mib(max(r.maxrss_bytes for r in runs))}  {verdict(sub <= GOAL_S)}",
                )
            )
    print(f"\nimporting adapterhub.inspect in this process: {import_s:.3f} s\n")
    print_table(
        ["artifact", "in-process 1st s", "in-process median s", "CLI median s", "CLI x python", "CLI CPU s", f"CLI peak RSS, <= {GOAL_S} s"],
        rows,
    )
    print(f"\ngoal: `adapterhub inspect` <= {GOAL_S} s including start-up (median of {args.repeats})")
    print(f"{load()} at the end")


if __name__ == "__main__":
    main()
