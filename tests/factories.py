"""Builders of small, real artifacts for tests.

Every builder takes a directory (or file path), writes the artifact there and
returns its path. Models are tiny and seeded, so each call takes well under a
second after torch is imported. torch, transformers and peft are imported
inside the builders that need them, so that importing this module stays cheap.

>>> base = tiny_llama_base(tmp_path / "base")                     # doctest: +SKIP
>>> lora = lora_adapter(tmp_path / "lora", base_dir=base, r=8)     # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike


def _dir(path: PathLike) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


class BuiltDirs:
    """Artifacts that the tests of one module share, each built on first use as ``root/<key>``.

    A subclass names them: ``def base(self): return self.get("base", tiny_llama_base)``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, Path] = {}

    def get(self, key: str, make: Callable[[Path], Path]) -> Path:
        if key not in self._cache:
            self._cache[key] = make(self.root / key)
        return self._cache[key]


# --------------------------------------------------------------------------- models


def tiny_llama_config(hidden_size: int = 64, layers: int = 2, vocab: int = 128, **kw: Any) -> Any:
    from transformers import LlamaConfig

    heads = kw.pop("num_attention_heads", 4)
    return LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=kw.pop("intermediate_size", hidden_size * 2),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kw.pop("num_key_value_heads", max(1, heads // 2)),
        vocab_size=vocab,
        max_position_embeddings=kw.pop("max_position_embeddings", 256),
        **kw,
    )


def tiny_model(arch: str = "llama", seed: int = 0, **sizes: Any) -> Any:
    """An in-memory tiny model: ``llama`` (LlamaForCausalLM), ``gpt2`` (Conv1D layers) or ``bert``."""
    import torch

    torch.manual_seed(seed)
    if arch == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(tiny_llama_config(**sizes))
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        h = sizes.get("hidden_size", 64)
        return GPT2LMHeadModel(
            GPT2Config(
                n_embd=h, n_layer=sizes.get("layers", 2), n_head=4, vocab_size=sizes.get("vocab", 128), n_positions=128
            )
        )
    if arch == "bert":
        from transformers import BertConfig, BertModel

        h = sizes.get("hidden_size", 64)
        return BertModel(
            BertConfig(
                hidden_size=h,
                num_hidden_layers=sizes.get("layers", 2),
                num_attention_heads=4,
                intermediate_size=h * 2,
                vocab_size=sizes.get("vocab", 128),
                max_position_embeddings=128,
            )
        )
    raise ValueError(f"unknown tiny architecture {arch!r}")


def _load_base(base_dir: PathLike | None, arch: str, seed: int, sizes: Mapping[str, Any]) -> Any:
    if base_dir is None:
        return tiny_model(arch, seed=seed, **sizes)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base_dir))


def tiny_llama_base(
    path: PathLike,
    hidden_size: int = 64,
    layers: int = 2,
    vocab: int = 128,
    sharded: bool = False,
    seed: int = 0,
    dtype: str | None = None,
    **kw: Any,
) -> Path:
    """A real ``LlamaForCausalLM`` checkpoint (``config.json`` + safetensors).

    ``sharded=True`` cuts it into several shards with ``model.safetensors.index.json``.
    """
    import torch

    out = _dir(path)
    model = tiny_model("llama", seed=seed, hidden_size=hidden_size, layers=layers, vocab=vocab, **kw)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(str(out), max_shard_size=max(total // 3, 1) if sharded else "50GB")
    return out


def tiny_gpt2_base(path: PathLike, hidden_size: int = 64, layers: int = 2, vocab: int = 128, seed: int = 0) -> Path:
    """A GPT-2 checkpoint: its Conv1D weights are stored ``[in, out]`` (PEFT's fan_in_fan_out)."""
    out = _dir(path)
    tiny_model("gpt2", seed=seed, hidden_size=hidden_size, layers=layers, vocab=vocab).save_pretrained(str(out))
    return out


def merged_checkpoint(path: PathLike, base_model: str = "org/tiny-base", seed: int = 0) -> Path:
    """A checkpoint whose model card declares it a merge of an adapter into ``base_model``."""
    out = tiny_llama_base(path, seed=seed)
    write_model_card(out, {"base_model": base_model, "base_model_relation": "merged", "library_name": "transformers"})
    return out


def write_model_card(path: PathLike, meta: Mapping[str, Any], body: str = "# Model card\n") -> Path:
    lines = ["---"]
    for k, v in meta.items():
        if isinstance(v, (list, tuple)):
            lines.append(f"{k}:")
            lines.extend(f"- {x}" for x in v)
        else:
            lines.append(f"{k}: {v}")
    lines.append("---")
    card = Path(path) / "README.md"
    card.write_text("\n".join(lines) + "\n" + body, encoding="utf-8")
    return card


# --------------------------------------------------------------------------- PEFT adapters


def peft_adapter(
    path: PathLike,
    peft_config: Any,
    base_dir: PathLike | None = None,
    arch: str = "llama",
    seed: int = 0,
    base_model_name_or_path: str | None = None,
    safe_serialization: bool = True,
    **sizes: Any,
) -> Path:
    """Any PEFT method: ``get_peft_model(base, peft_config).save_pretrained(path)``.

    ``base_model_name_or_path`` is written into ``adapter_config.json`` afterwards
    (PEFT itself records whatever path the base was loaded from).
    """
    import torch
    from peft import get_peft_model

    out = _dir(path)
    model = _load_base(base_dir, arch, seed, sizes)
    torch.manual_seed(seed + 1)
    peft_model = get_peft_model(model, peft_config)
    peft_model.save_pretrained(str(out), safe_serialization=safe_serialization)
    if base_model_name_or_path is not None:
        patch_json(out / "adapter_config.json", base_model_name_or_path=base_model_name_or_path)
    return out


def lora_adapter(
    path: PathLike,
    base_dir: PathLike | None = None,
    r: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] | str = ("q_proj", "v_proj"),
    use_dora: bool = False,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    arch: str = "llama",
    seed: int = 0,
    base_model_name_or_path: str | None = None,
    safe_serialization: bool = True,
    **kw: Any,
) -> Path:
    """A real PEFT LoRA (or DoRA / rsLoRA) adapter.

    ``init_lora_weights`` defaults to False so that lora_B is random, not zero:
    merging such an adapter changes the weights, which converter tests need.
    Remaining keyword arguments go to ``LoraConfig``.
    """
    from peft import LoraConfig

    sizes = {k: kw.pop(k) for k in ("hidden_size", "layers", "vocab") if k in kw}
    kw.setdefault("init_lora_weights", False)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        use_dora=use_dora,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        **kw,
    )
    return peft_adapter(
        path,
        cfg,
        base_dir=base_dir,
        arch=arch,
        seed=seed,
        base_model_name_or_path=base_model_name_or_path,
        safe_serialization=safe_serialization,
        **sizes,
    )


def multi_adapter(
    path: PathLike, names: Sequence[str] = ("default", "other"), root_default: bool = True, seed: int = 0
) -> Path:
    """Several named LoRA adapters saved together, the PEFT way.

    PEFT writes the adapter named ``default`` at the root and every other one in
    ``<path>/<name>/``. With ``root_default=False`` no adapter named default is
    created, so only subfolders exist.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    out = _dir(path)
    model = tiny_model("llama", seed=seed)
    torch.manual_seed(seed + 1)
    names = list(names) if root_default else [n for n in names if n != "default"]
    first, *rest = names
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), adapter_name=first)
    for i, n in enumerate(rest):
        peft_model.add_adapter(n, LoraConfig(r=2 * (i + 1), lora_alpha=4, target_modules=["v_proj"]))
    peft_model.save_pretrained(str(out), selected_adapters=names)
    return out


# The block older PEFT versions wrote into the model card of an adapter trained
# on a bitsandbytes-quantized base (PEFT 0.21 no longer writes it).
_QLORA_CARD_BLOCK = """
## Training procedure


The following `bitsandbytes` quantization config was used during training:
- quant_method: bitsandbytes
- load_in_8bit: {int8}
- load_in_4bit: {four}
- llm_int8_threshold: 6.0
- llm_int8_skip_modules: None
- llm_int8_enable_fp32_cpu_offload: False
- llm_int8_has_fp16_weight: False
- bnb_4bit_quant_type: {qtype}
- bnb_4bit_use_double_quant: True
- bnb_4bit_compute_dtype: bfloat16

### Framework versions


- PEFT 0.6.2
"""


def qlora_adapter(
    path: PathLike,
    mode: str = "nf4",
    base_dir: PathLike | None = None,
    r: int = 8,
    seed: int = 0,
    old_card: bool = True,
) -> Path:
    """A LoRA trained (well, initialised) on a bitsandbytes-quantized base.

    With ``old_card`` the adapter's README carries the quantization block that
    older PEFT versions wrote, which is the only record of QLoRA in the files.
    """
    from peft import LoraConfig

    base = bnb_model(mode, base_dir=base_dir, seed=seed)
    out = _dir(path)
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed + 1)
    pm = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pm.save_pretrained(str(out))
    if old_card:
        card = out / "README.md"
        text = card.read_text(encoding="utf-8") if card.exists() else "---\nlibrary_name: peft\n---\n"
        block = _QLORA_CARD_BLOCK.format(
            int8=mode == "int8", four=mode in ("nf4", "fp4"), qtype=mode if mode in ("nf4", "fp4") else "fp4"
        )
        card.write_text(text + block, encoding="utf-8")
    return out


# --------------------------------------------------------------------------- bitsandbytes


def bnb_config(
    mode: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    skip_modules: Sequence[str] | None = None,
) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if mode in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=mode,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
            llm_int8_skip_modules=list(skip_modules) if skip_modules else None,
        )
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules) if skip_modules else None)
    raise ValueError(f"unknown bitsandbytes mode {mode!r}")


def bnb_model(mode: str = "nf4", base_dir: PathLike | None = None, seed: int = 0, **cfg: Any) -> Any:
    """A tiny Llama loaded with bitsandbytes quantization on the CPU."""
    import tempfile

    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        src = base_dir if base_dir is not None else tiny_llama_base(Path(tmp) / "base", seed=seed)
        return LlamaForCausalLM.from_pretrained(str(src), quantization_config=bnb_config(mode, **cfg), device_map="cpu")


def bnb_checkpoint(
    path: PathLike,
    mode: str = "nf4",
    base_dir: PathLike | None = None,
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    skip_modules: Sequence[str] | None = None,
    seed: int = 0,
) -> Path:
    """A real bitsandbytes checkpoint (``nf4``, ``fp4`` or ``int8``) saved by transformers."""
    out = _dir(path)
    model = bnb_model(
        mode,
        base_dir=base_dir,
        seed=seed,
        double_quant=double_quant,
        compute_dtype=compute_dtype,
        skip_modules=skip_modules,
    )
    model.save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------- `adapters` library


def bottleneck_adapter(
    path: PathLike,
    name: str = "sst2",
    hidden_size: int = 64,
    layers: int = 2,
    reduction_factor: int = 16,
    architecture: str = "bottleneck",
    r: int = 8,
    alpha: int = 16,
    safetensors: bool = True,
    model_name: str = "bert-base-uncased",
    seed: int = 0,
) -> Path:
    """An adapter in the layout the ``adapters`` library saves.

    The library pins transformers~=4.57 and cannot be installed beside ours,
    so this follows its documented layout (src/adapters/utils.py and
    loading.py): ``adapter_config.json`` from ``build_full_config`` (model_type,
    hidden_size, model_name, name, model_class, nested ``config``, version) and
    the weights in ``adapter.safetensors`` (or ``pytorch_adapter.bin``) under
    the model's module names, e.g.
    ``bert.encoder.layer.0.output.adapters.<name>.adapter_down.0.weight``.
    ``architecture="lora"`` writes the library's LoRA instead
    (``...attention.self.query.loras.<name>.lora_A``).
    """
    import numpy as np

    out = _dir(path)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    if architecture == "bottleneck":
        down = hidden_size // reduction_factor
        conf: dict[str, Any] = {
            "adapter_residual_before_ln": False,
            "cross_adapter": False,
            "dropout": 0.0,
            "factorized_phm_W": True,
            "factorized_phm_rule": False,
            "hypercomplex_nonlinearity": "glorot-uniform",
            "init_weights": "bert",
            "inv_adapter": None,
            "inv_adapter_reduction_factor": None,
            "is_parallel": False,
            "learn_phm": True,
            "leave_out": [],
            "ln_after": False,
            "ln_before": False,
            "mh_adapter": False,
            "non_linearity": "relu",
            "original_ln_after": True,
            "original_ln_before": True,
            "output_adapter": True,
            "phm_bias": True,
            "phm_c_init": "normal",
            "phm_dim": 4,
            "phm_init_range": 0.0001,
            "phm_layer": False,
            "phm_rank": 1,
            "reduction_factor": reduction_factor,
            "residual_before_ln": True,
            "scaling": 1.0,
            "shared_W_phm": False,
            "shared_phm_rule": True,
            "stochastic_depth": 0.0,
            "use_gating": False,
        }
        for i in range(layers):
            p = f"bert.encoder.layer.{i}.output.adapters.{name}"
            tensors[f"{p}.adapter_down.0.weight"] = rng.standard_normal((down, hidden_size), dtype=np.float32)
            tensors[f"{p}.adapter_down.0.bias"] = np.zeros(down, np.float32)
            tensors[f"{p}.adapter_up.weight"] = rng.standard_normal((hidden_size, down), dtype=np.float32)
            tensors[f"{p}.adapter_up.bias"] = np.zeros(hidden_size, np.float32)
    elif architecture == "lora":
        conf = {
            "alpha": alpha,
            "architecture": "lora",
            "attn_matrices": ["q", "v"],
            "composition_mode": "add",
            "dropout": 0.0,
            "init_weights": "lora",
            "intermediate_lora": False,
            "leave_out": [],
            "output_lora": False,
            "r": r,
            "selfattn_lora": True,
            "use_gating": False,
        }
        for i in range(layers):
            for m in ("query", "value"):
                p = f"bert.encoder.layer.{i}.attention.self.{m}.loras.{name}"
                tensors[f"{p}.lora_A"] = rng.standard_normal((r, hidden_size), dtype=np.float32)
                tensors[f"{p}.lora_B"] = rng.standard_normal((hidden_size, r), dtype=np.float32)
    else:
        raise ValueError(f"unknown adapters-library architecture {architecture!r}")
    full = {
        "config": conf,
        "hidden_size": hidden_size,
        "model_class": "BertAdapterModel",
        "model_name": model_name,
        "model_type": "bert",
        "name": name,
        "version": "adapters.1.2.0",
    }
    (out / "adapter_config.json").write_text(json.dumps(full, indent=2, sort_keys=True), encoding="utf-8")
    if safetensors:
        from safetensors.numpy import save_file

        save_file(tensors, str(out / "adapter.safetensors"))
    else:
        # A stand-in: inspection never unpickles this file, so its bytes do not matter.
        (out / "pytorch_adapter.bin").write_bytes(b"\x80\x02}q\x00.")
    return out


# --------------------------------------------------------------------------- GGUF


def gguf_file(
    path: PathLike,
    arch: str = "llama",
    name: str = "tiny",
    file_type: str | None = "q8_0",
    hidden_size: int = 64,
    layers: int = 2,
    vocab: int = 128,
    context_length: int = 256,
    adapter: bool = False,
    r: int = 8,
    lora_alpha: float = 16.0,
    seed: int = 0,
    split_max_tensors: int = 0,
) -> Path:
    """A GGUF model (or, with ``adapter=True``, a GGUF LoRA adapter) built with ``gguf.GGUFWriter``.

    Matrices are quantized to ``file_type`` (``q8_0``, ``f16``, ``f32``);
    norms stay f32 as llama.cpp does. ``file_type=None`` leaves
    ``general.file_type`` out, so the type must be guessed from the tensors.
    ``split_max_tensors`` writes a split model (``<stem>-00001-of-0000N.gguf``
    beside ``path``) and returns the directory that holds the parts.
    """
    import gguf
    import numpy as np

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(p), arch, split_max_tensors=split_max_tensors)
    w.add_name(name)
    qtype = {
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "f16": gguf.GGMLQuantizationType.F16,
        "f32": gguf.GGMLQuantizationType.F32,
    }[file_type or "f16"]

    def add_matrix(tname: str, out_f: int, in_f: int) -> None:
        data = rng.standard_normal((out_f, in_f)).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            w.add_tensor(tname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(tname, data.astype(np.float16))
        else:
            w.add_tensor(tname, data)

    if adapter:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora_alpha))
        for i in range(layers):
            for t in ("attn_q", "attn_v"):
                out_f = hidden_size if t == "attn_q" else hidden_size // 2
                w.add_tensor(f"blk.{i}.{t}.weight.lora_a", rng.standard_normal((r, hidden_size)).astype(np.float32))
                w.add_tensor(f"blk.{i}.{t}.weight.lora_b", rng.standard_normal((out_f, r)).astype(np.float32))
    else:
        w.add_context_length(context_length)
        w.add_embedding_length(hidden_size)
        w.add_block_count(layers)
        w.add_feed_forward_length(hidden_size * 2)
        w.add_head_count(4)
        if file_type is not None:
            w.add_file_type(
                {
                    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                    "f16": gguf.LlamaFileType.MOSTLY_F16,
                    "f32": gguf.LlamaFileType.ALL_F32,
                }[file_type]
            )
        w.add_token_list([f"t{i}" for i in range(vocab)])
        add_matrix("token_embd.weight", vocab, hidden_size)
        for i in range(layers):
            w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden_size, np.float32))
            add_matrix(f"blk.{i}.attn_q.weight", hidden_size, hidden_size)
            add_matrix(f"blk.{i}.attn_k.weight", hidden_size // 2, hidden_size)
            add_matrix(f"blk.{i}.attn_v.weight", hidden_size // 2, hidden_size)
            add_matrix(f"blk.{i}.attn_output.weight", hidden_size, hidden_size)
            add_matrix(f"blk.{i}.ffn_up.weight", hidden_size * 2, hidden_size)
            add_matrix(f"blk.{i}.ffn_down.weight", hidden_size, hidden_size * 2)
        w.add_tensor("output_norm.weight", np.ones(hidden_size, np.float32))
        add_matrix("output.weight", vocab, hidden_size)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p.parent if split_max_tensors else p


# --------------------------------------------------------------------------- adapters without torch (fast)


def make_files(root: PathLike, files: Mapping[str, bytes]) -> Path:
    """A directory holding ``{relpath: bytes}``."""
    out = _dir(root)
    for rel, data in files.items():
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return out


def fake_lora(
    root: PathLike,
    r: int = 8,
    alpha: int = 16,
    base: str = "meta-llama/Llama-2-7b-hf",
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Path:
    """A small, valid PEFT LoRA adapter dir built with numpy (no torch: fast)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(layers):
        for t in targets:
            pre = f"base_model.model.model.layers.{i}.self_attn.{t}"
            tensors[f"{pre}.lora_A.weight"] = rng.standard_normal((r, hidden)).astype(np.float32)
            tensors[f"{pre}.lora_B.weight"] = rng.standard_normal((hidden, r)).astype(np.float32)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "base_model_name_or_path": base,
        "revision": None,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return adapter_from_tensors(root, tensors, metadata=None, indent=2, **cfg)


def numpy_llama_base(path: PathLike, hidden: int = 32, layers: int = 2, vocab: int = 64) -> Path:
    """A Llama-shaped base (attention projections and embeddings, zeros) written with numpy: what
    ``fake_lora`` adapters of the same ``hidden`` fit. For checks, which read headers only."""
    import numpy as np
    from safetensors.numpy import save_file

    out = _dir(path)
    w = {f"model.layers.{i}.self_attn.{m}.weight": np.zeros((hidden, hidden), np.float32)
         for i in range(layers) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    w["model.embed_tokens.weight"] = np.zeros((vocab, hidden), np.float32)
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": 4, "vocab_size": vocab, "torch_dtype": "float32",
    }))
    return out


def synthetic_base(path: PathLike, hidden: int = 32, layers: int = 2, *, vocab: int = 64, seed: int = 0, tie: bool = False, **cfg: Any) -> Path:
    """A Llama-named checkpoint (attention projections, norms, embeddings; random
    weights) written with safetensors directly, plus config.json. No transformers."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"model.layers.{i}.self_attn.{m}.weight"] = torch.randn(hidden, hidden, generator=g)
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
    t["model.norm.weight"] = torch.ones(hidden)
    if not tie:
        t["lm_head.weight"] = torch.randn(vocab, hidden, generator=g)
    path = _dir(path)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "vocab_size": vocab, "tie_word_embeddings": tie, **cfg}
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text("{}")
    (path / "tokenizer_config.json").write_text("{}")
    return path


def adapter_from_tensors(
    path: PathLike, tensors: Mapping[str, Any], *, metadata: Mapping[str, str] | None = None, indent: int | None = None, **config: Any
) -> Path:
    """A PEFT adapter dir from ``{key: tensor}`` (numpy arrays or torch tensors) and config fields.

    The config is ``config`` as given over a minimal LoRA default (r 4, alpha 8,
    ``q_proj``); callers name the rest (base model, task type).
    """
    out = _dir(path)
    target = str(out / "adapter_model.safetensors")
    meta = dict(metadata) if metadata else None
    if tensors and type(next(iter(tensors.values()))).__module__.startswith("torch"):
        from safetensors.torch import save_file as save_torch

        save_torch({k: v.contiguous() for k, v in tensors.items()}, target, metadata=meta)
    else:
        from safetensors.numpy import save_file as save_numpy

        save_numpy(dict(tensors), target, metadata=meta)
    cfg = dict(config)  # in the caller's order: the bytes, and so the digest, stay the caller's
    for k, v in {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}.items():
        cfg.setdefault(k, v)
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=indent), encoding="utf-8")
    return out


# --------------------------------------------------------------------------- raw safetensors


def write_safetensors_header(
    path: PathLike,
    tensors: Mapping[str, tuple[str, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
    sparse: bool = True,
) -> Path:
    """A safetensors file with the given ``{name: (dtype, shape)}`` and no real data.

    With ``sparse`` the data section is a hole (``truncate``), so a 12 GiB
    7B-shaped shard costs no disk and no time; inspection reads only headers.
    """
    from adapterhub.inspect.safetensors import DTYPE_BITS

    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for k, (dtype, shape) in tensors.items():
        n = (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        if sparse:
            f.truncate(8 + len(blob) + offset)
        else:
            f.write(b"\0" * offset)
    return p


def llama7b_shapes(
    layers: int = 32, hidden: int = 4096, inter: int = 11008, vocab: int = 32000
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor names and bf16 shapes of a Llama-2-7B checkpoint (6.74B parameters)."""
    t: dict[str, tuple[str, tuple[int, ...]]] = {"model.embed_tokens.weight": ("BF16", (vocab, hidden))}
    for i in range(layers):
        p = f"model.layers.{i}"
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"{p}.self_attn.{m}.weight"] = ("BF16", (hidden, hidden))
        t[f"{p}.mlp.gate_proj.weight"] = ("BF16", (inter, hidden))
        t[f"{p}.mlp.up_proj.weight"] = ("BF16", (inter, hidden))
        t[f"{p}.mlp.down_proj.weight"] = ("BF16", (hidden, inter))
        t[f"{p}.input_layernorm.weight"] = ("BF16", (hidden,))
        t[f"{p}.post_attention_layernorm.weight"] = ("BF16", (hidden,))
    t["model.norm.weight"] = ("BF16", (hidden,))
    t["lm_head.weight"] = ("BF16", (vocab, hidden))
    return t


def sharded_header_checkpoint(
    path: PathLike, tensors: Mapping[str, tuple[str, Sequence[int]]], config: Mapping[str, Any], shards: int = 3
) -> Path:
    """A sharded HF checkpoint of sparse safetensors files plus index and ``config.json``."""
    out = _dir(path)
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(shards):
        chunk = names[s * per : (s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors_header(out / fname, {k: tensors[k] for k in chunk}, {"format": "pt"})
        for k in chunk:
            weight_map[k] = fname
            total += math.prod(tensors[k][1]) * 2
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8"
    )
    (out / "config.json").write_text(json.dumps(dict(config), indent=2), encoding="utf-8")
    return out


LLAMA7B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "torch_dtype": "bfloat16",
}


def header_llama_base(
    path: PathLike, *, hidden: int = 32, layers: int = 2, inter: int = 64, vocab: int = 100, tie: bool = False,
    dtype: str = "BF16", **cfg: Any,
) -> Path:
    """A Llama-shaped base of two sparse shards (headers only): what ``check`` reads.
    Name its directory like the adapters' recorded base (``Llama-2-7b-hf``) where that matters."""
    shapes = {k: (dtype, s) for k, (_, s) in llama7b_shapes(layers, hidden, inter, vocab).items()}
    if tie:
        shapes.pop("lm_head.weight")
    config = {
        **LLAMA7B_CONFIG,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
        "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype],
        **cfg,
    }
    return sharded_header_checkpoint(path, shapes, config, shards=2)


def save_raw(path: PathLike, tensors: Mapping[str, tuple[str, Sequence[int], bytes]]) -> Path:
    """A safetensors file from ``{name: (dtype, shape, raw bytes)}`` (numpy cannot write bfloat16)."""
    header: dict[str, Any] = {}
    blobs, off = [], 0
    for k, (dtype, shape, data) in tensors.items():
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    p = Path(path)
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return p


# --------------------------------------------------------------------------- editing


def patch_json(path: PathLike, **changes: Any) -> Path:
    """Set keys of a JSON file in place (``None`` removes a key)."""
    p = Path(path)
    data = json.loads(p.read_text(encoding="utf-8"))
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    p.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return p


def rename_tensors(path: PathLike, rename: Iterable[tuple[str, str]] | Mapping[str, str]) -> Path:
    """Rewrite a (small) safetensors file with some keys renamed, e.g. to drop a prefix."""
    from safetensors.numpy import load_file, save_file

    p = Path(path)
    pairs = list(rename.items()) if isinstance(rename, Mapping) else list(rename)
    tensors = load_file(str(p))
    out = {}
    for k, v in tensors.items():
        for old, new in pairs:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        out[k] = v
    save_file(out, str(p), metadata={"format": "pt"})
    return p
