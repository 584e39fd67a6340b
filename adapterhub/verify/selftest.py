"""``adapterhub verify --self-test``: prove that verification can fail.

Builds a tiny Llama whose logits are not flat (weights drawn with a larger
standard deviation than a fresh model's, so most positions have a clear top-1),
a LoRA on every linear projection whose update is a set fraction of each
weight (as a trained adapter's is, not the near-zero update of a fresh one),
and then three merges made with ``adapterhub.convert.merge``:

- ``correct``: the adapter as saved; verify must PASS;
- ``wrong-alpha``: lora_alpha doubled in adapter_config.json; must FAIL;
- ``dropped-module``: one module's LoRA tensors deleted from the adapter; must FAIL;

and, when bitsandbytes is installed, the correct and the dropped-module merges
quantized to NF4 (``correct-nf4`` must PASS, ``dropped-module-nf4`` must FAIL).
NF4's own rounding hides a dropped module from the full-precision comparison;
the same-recipe reference is what catches it.

The builders are also what ``bench/verify_tolerances.py`` measures with.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_base(
    path: str | Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 256,
    std: float = 0.1,
    lm_head_scale: float = 5.0,
) -> Path:
    """A tiny LlamaForCausalLM with weights ~ N(0, std²) and lm_head scaled by
    ``lm_head_scale``: a fresh model's logits are nearly flat, these spread
    over several nats, as a trained model's do, so that top-1 means something."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, initializer_range=std,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    model = model.to(getattr(torch, dtype))
    out = Path(path)
    model.save_pretrained(str(out))
    return out


def scale_adapter(adapter_dir: str | Path, base_dir: str | Path, rel_delta: float) -> Path:
    """Rescale each LoRA B so that the module's update s·B·A has norm ``rel_delta`` × ‖W‖."""
    from safetensors.torch import load_file, save_file

    adir = Path(adapter_dir)
    cfg = json.loads((adir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(str(adir / "adapter_model.safetensors"))
    base: dict[str, Any] = {}
    for f in sorted(Path(base_dir).glob("*.safetensors")):
        base.update(load_file(str(f)))
    for key in [k for k in tensors if k.endswith("lora_B.weight")]:
        mod = key.removesuffix(".lora_B.weight").removeprefix("base_model.model.")
        w = base[f"{mod}.weight"].float()
        a = tensors[key.replace("lora_B", "lora_A")].float()
        b = tensors[key].float()
        delta = scale * (b @ a)
        factor = rel_delta * float(w.norm()) / max(float(delta.norm()), 1e-12)
        tensors[key] = (b * factor).to(tensors[key].dtype)
    save_file(tensors, str(adir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return adir


def build_lora(
    path: str | Path,
    base_dir: str | Path,
    *,
    seed: int = 1,
    r: int = 8,
    alpha: int = 16,
    targets: tuple[str, ...] = ALL_LINEAR,
    rel_delta: float = 0.2,
    use_dora: bool = False,
) -> Path:
    """A PEFT LoRA (or DoRA) adapter on ``base_dir`` with a nonzero, sized update."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_dora=use_dora, init_lora_weights=False)
    pm = get_peft_model(model, cfg)
    out = Path(path)
    pm.save_pretrained(str(out))
    return scale_adapter(out, base_dir, rel_delta)


def train_lora(
    path: str | Path,
    base_dir: str | Path,
    texts: list[str],
    *,
    seed: int = 1,
    r: int = 8,
    alpha: int = 16,
    targets: tuple[str, ...] = ALL_LINEAR,
    steps: int = 60,
    lr: float = 5e-3,
    seq_len: int = 64,
    batch: int = 8,
) -> Path:
    """A LoRA actually trained on ``texts`` (tokenized with the base's tokenizer):
    its update has the structure and size a fine-tune gives, on a base whose
    logits are peaked. One thread: tiny matmuls gain nothing from two."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t, add_special_tokens=False)["input_ids"])
        ids.append(tok.eos_token_id)
    data = torch.tensor(ids, dtype=torch.long)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pm.train()
        for _ in range(steps):
            starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g).tolist()
            b = torch.stack([data[s : s + seq_len + 1] for s in starts])
            loss = pm(input_ids=b, labels=b).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    out = Path(path)
    pm.save_pretrained(str(out))
    return out


def swap_ab(src: str | Path, dst: str | Path) -> Path:
    """A copy of the adapter with A and B swapped (and transposed) on its square
    modules: the merge then adds ΔWᵀ instead of ΔW there, as a transposition bug would."""
    from safetensors.torch import load_file, save_file

    out = Path(dst)
    shutil.copytree(src, out)
    f = out / "adapter_model.safetensors"
    tensors = load_file(str(f))
    swapped = 0
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        bkey = key.replace("lora_A", "lora_B")
        a, b = tensors[key], tensors[bkey]
        if a.shape[1] == b.shape[0]:  # in == out
            tensors[key], tensors[bkey] = b.T.contiguous(), a.T.contiguous()
            swapped += 1
    if not swapped:
        raise ValueError("the adapter has no square module to swap A and B on")
    save_file(tensors, str(f), metadata={"format": "pt"})
    return out


def wrong_alpha(src: str | Path, dst: str | Path, factor: float = 2.0) -> Path:
    """A copy of the adapter whose lora_alpha is ``factor`` times the real one."""
    out = Path(dst)
    shutil.copytree(src, out)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * factor
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def drop_module(src: str | Path, dst: str | Path, module: str = "layers.0.self_attn.q_proj") -> Path:
    """A copy of the adapter without the tensors of modules whose name contains ``module``."""
    from safetensors.torch import load_file, save_file

    out = Path(dst)
    shutil.copytree(src, out)
    f = out / "adapter_model.safetensors"
    tensors = load_file(str(f))
    kept = {k: v for k, v in tensors.items() if module not in k}
    if len(kept) == len(tensors):
        raise ValueError(f"no adapter tensor matches {module!r}")
    save_file(kept, str(f), metadata={"format": "pt"})
    return out


@dataclass
class SelfTestCase:
    name: str
    expected: str  # PASS | FAIL
    verdict: str
    rel: float | None
    cos_min: float | None
    top1: float | None
    failures: list[str]
    same_recipe_rel: float | None = None  # quantized cases: rel against the same-recipe reference

    @property
    def ok(self) -> bool:
        return self.verdict == self.expected

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


def self_test(device: str = "cpu", workdir: str | Path | None = None) -> list[SelfTestCase]:
    """Build the merges (and NF4 quantizations) and verify each; every case's ``ok`` must be True."""
    from adapterhub.convert import merge, quantize
    from adapterhub.verify import verify

    with tempfile.TemporaryDirectory(prefix="adapterhub-selftest-", dir=workdir) as tmp:
        t = Path(tmp)
        base = build_base(t / "base")
        adapter = build_lora(t / "adapter", base)
        broken = {
            "correct": adapter,
            "wrong-alpha": wrong_alpha(adapter, t / "adapter-alpha"),
            "dropped-module": drop_module(adapter, t / "adapter-dropped", "layers.1.mlp.down_proj"),
        }
        cases = []
        merged: dict[str, Path] = {}
        for name, ad in broken.items():
            merged[name] = t / f"merged-{name}"
            merge(str(ad), str(base), out=merged[name], device=device)
        candidates = dict(merged)
        if _has_bitsandbytes():
            for name in ("correct", "dropped-module"):
                q = t / f"nf4-{name}"
                quantize(str(merged[name]), to="nf4", out=q, device=device)
                candidates[f"{name}-nf4"] = q
        for name, cand in candidates.items():
            rep = verify(str(cand), str(adapter), str(base), device=device, record=False, decode=4)
            m = rep.metrics
            sr = (rep.same_recipe or {}).get("metrics") or {}
            cases.append(
                SelfTestCase(
                    name, "PASS" if name.startswith("correct") else "FAIL", rep.verdict, m.get("rel"), m.get("cos_min"),
                    m.get("top1"), rep.failures, sr.get("rel"),
                )
            )
        return cases


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True
