"""End to end on a GPU: build a ~1.1B Llama, LoRA it, merge, quantize, verify.

    python bench/gpu_e2e.py                    # --size 1b --device cuda
    python bench/gpu_e2e.py --size tiny --device cpu   # the same steps in seconds, no GPU

Steps, each timed with its peak GPU memory:

1. a Llama-shaped model built from a config (TinyLlama-1.1B shape: hidden 2048,
   22 layers, 32 heads, 4 KV heads, vocab 32000) in bf16, random init with
   lm_head scaled so that logits are spread (a fresh model's are flat);
2. a LoRA r=16 on all seven linear projections with nonzero B, scaled so each
   update is 10% of its weight's norm;
3. ``adapterhub.convert.merge`` (device as given);
4. ``adapterhub.convert.quantize`` to nf4 and int8 (skipped, with a message,
   when bitsandbytes is missing);
5. ``adapterhub.verify.verify`` of each output, plus a wrong-alpha merge that
   must FAIL and a ``sequential=True`` run.

Exit status 0 when every correct output passes and the broken one fails.
No registry is used (ADAPTERHUB_HOME points into the work directory).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = {
    # TinyLlama-1.1B's shape: 1.10B parameters
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, std=0.02, lm_head_scale=4.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, std=0.1, lm_head_scale=5.0),
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _have(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):  # a broken install counts as missing
        return False


def _gpu_peak_reset(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak_mb(dev: str) -> float | None:
    import torch

    if dev != "cuda":
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / (1 << 20), 1)


def build_base(path: Path, size: str, dev: str) -> tuple[Path, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = dict(SIZES[size])
    std, scale = s.pop("std"), s.pop("lm_head_scale")
    cfg = LlamaConfig(**s, max_position_embeddings=2048, initializer_range=std, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model = model.to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(path), max_shard_size="1GB")
    del model
    return path, n


def build_lora(path: Path, base: Path, dev: str) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapterhub.verify.selftest import scale_adapter

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16, device_map={"": dev})
    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR, init_lora_weights=False))
    pm.save_pretrained(str(path))
    del pm, model
    scale_adapter(path, base, 0.1)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--workdir", type=Path, help="Where to build (default: a temporary directory, removed at the end).")
    p.add_argument("--json", type=Path, help="Also write the figures here.")
    args = p.parse_args()

    missing = [m for m in ("torch", "transformers", "peft", "safetensors", "accelerate") if not _have(m)]
    if missing:
        print(f"gpu_e2e: missing Python packages {missing}: cannot run", file=sys.stderr)
        return 2
    import peft
    import torch
    import transformers

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    has_bnb = _have("bitsandbytes")
    print(f"torch {torch.__version__} (cuda {torch.version.cuda}), transformers {transformers.__version__}, peft {peft.__version__}, "
          f"bitsandbytes {'installed' if has_bnb else 'NOT INSTALLED'}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("gpu_e2e: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
        free, total = torch.cuda.mem_get_info()
        print(f"device: {torch.cuda.get_device_name(0)}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
    if not has_bnb:
        print("bitsandbytes is not installed: the nf4 and int8 steps are SKIPPED")

    from adapterhub.convert import merge, quantize
    from adapterhub.verify import verify
    from adapterhub.verify.selftest import wrong_alpha

    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["ADAPTERHUB_HOME"] = str(work / "home")  # never touch a real registry
    dev = args.device
    steps: list[dict] = []
    verdicts: list[dict] = []
    ok = True

    def step(name: str, fn):
        _gpu_peak_reset(dev)
        t = time.perf_counter()
        out = fn()
        row = {"step": name, "seconds": round(time.perf_counter() - t, 2), "peak_gpu_mb": _gpu_peak_mb(dev)}
        steps.append(row)
        print(f"{name:<28} {row['seconds']:>8.2f} s   peak GPU {row['peak_gpu_mb'] if row['peak_gpu_mb'] is not None else '-'} MB", flush=True)
        return out

    def check(name: str, cand: Path, expect: str, **kw) -> None:
        nonlocal ok
        _gpu_peak_reset(dev)
        try:
            rep = verify(str(cand), str(adapter), str(base), device=dev, record=False, **kw)
        except Exception:  # noqa: BLE001 - report every case, then fail at the end
            traceback.print_exc()
            ok = False
            verdicts.append({"case": name, "expected": expect, "verdict": "ERROR"})
            return
        m = rep.metrics
        row = {
            "case": name, "expected": expect, "verdict": rep.verdict, "format": rep.format, "device": rep.device,
            "rel": m.get("rel"), "cos_min": m.get("cos_min"), "kl_mean": m.get("kl_mean"), "top1": m.get("top1"),
            "topk": m.get("topk"), "clear": m.get("clear_positions"), "positions": m.get("positions"),
            "max_abs": m.get("max_abs"), "decode_first_divergence": (rep.decode or {}).get("first_divergence"),
            "batch": rep.batch_size, "sequential": rep.sequential, "seconds": rep.timings["total_s"],
            "peak_gpu_mb": rep.memory.get("cuda_max_allocated_mb"), "peak_rss_mb": rep.memory.get("peak_rss_mb"),
            "failures": rep.failures, "warnings": rep.warnings,
        }
        sr = rep.same_recipe or {}
        if sr.get("metrics"):
            row["same_recipe"] = {
                "verdict": sr.get("verdict"),
                **{k: sr["metrics"].get(k) for k in ("rel", "cos_min", "kl_mean", "top1", "max_abs")},
            }
        verdicts.append(row)
        ok = ok and rep.verdict == expect
        print(
            f"verify {name:<20} {rep.verdict} (expected {expect})  rel {row['rel']:.3g}  cos_min {row['cos_min']:.5f}  "
            f"kl {row['kl_mean'] if row['kl_mean'] is None else format(row['kl_mean'], '.3g')}  top1 {row['top1'] if row['top1'] is None else format(row['top1'], '.3f')}  "
            f"clear {row['clear']}/{row['positions']}  decode {row['decode_first_divergence']}  "
            f"{row['seconds']:.1f} s  GPU {row['peak_gpu_mb']} MB  RSS {row['peak_rss_mb']} MB",
            flush=True,
        )
        if "same_recipe" in row:
            r2 = row["same_recipe"]
            print(
                f"    same-recipe reference: {r2['verdict']}  rel {r2['rel']:.3g}  cos_min {r2['cos_min']:.5f}  "
                f"max_abs {r2['max_abs']:.3g}",
                flush=True,
            )
        for f in rep.failures:
            print(f"    {f}")
        for w in rep.warnings:
            print(f"    warning: {w}")

    try:
        base, n_params = step("build base (bf16)", lambda: build_base(work / "base", args.size, dev))
        print(f"base: {n_params / 1e6:,.1f}M parameters")
        adapter = step("build LoRA r=16", lambda: build_lora(work / "lora", base, dev))
        merged = step("merge", lambda: merge(str(adapter), str(base), out=work / "merged", device=dev).out)
        bad_adapter = wrong_alpha(adapter, work / "lora-alpha2", 2.0)
        bad = step("merge (wrong alpha)", lambda: merge(str(bad_adapter), str(base), out=work / "merged-bad", device=dev).out)
        quantized = {}
        if has_bnb:
            for q in ("nf4", "int8"):
                try:
                    quantized[q] = step(f"quantize {q}", lambda q=q: quantize(str(merged), to=q, out=work / q, device=dev).out)
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
                    ok = False
        check("merged bf16", merged, "PASS")
        check("merged, sequential", merged, "PASS", sequential=True, decode=0)
        check("merged, --layers", merged, "PASS", layers=True, decode=0)
        check("wrong alpha", bad, "FAIL", decode=4)
        for q, path in quantized.items():
            check(q, path, "PASS")
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        ok = False
    finally:
        if args.json:
            args.json.write_text(json.dumps({"size": args.size, "device": dev, "steps": steps, "verify": verdicts}, indent=1, default=str))
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("gpu_e2e:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
