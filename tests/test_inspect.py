"""adapterhub.inspect: metadata from JSON and tensor headers, for every supported format."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapterhub.errors import InvalidArtifactError, NotFoundError, UnsafePathError
from adapterhub.inspect import fingerprint_matches, inspect_path, parse_front_matter

try:
    from tests import factories as f
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import factories as f  # type: ignore[no-redef]

H, L, V = 64, 2, 128  # the tiny Llama every factory builds by default


def llama_params(h: int = H, layers: int = L, vocab: int = V) -> int:
    kv = h // 2  # 4 heads, 2 kv heads
    per_layer = h * h * 2 + kv * h * 2 + 3 * (2 * h) * h + 2 * h
    return 2 * vocab * h + layers * per_layer + h


# --------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return f.tiny_llama_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def base_info(base: Path):
    return inspect_path(base)


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory, base: Path) -> Path:
    return f.lora_adapter(tmp_path_factory.mktemp("lora"), base_dir=base, base_model_name_or_path="org/tiny-llama")


# --------------------------------------------------------------------------- checkpoints


def test_plain_checkpoint(base: Path, base_info) -> None:
    info = base_info
    assert info.kind == "checkpoint"
    assert info.format == "transformers"
    assert info.params == llama_params() == 90432
    assert info.dtypes == ["float32"]
    assert info.quant is None and info.method is None
    assert info.files == ["config.json", "generation_config.json", "model.safetensors"]
    assert info.size == sum(os.path.getsize(base / p) for p in info.files)
    assert info.details["architecture"] == "LlamaForCausalLM"
    assert info.details["tensors"] == 2 + 9 * L + 1
    assert info.warnings == []
    fp = info.fingerprint
    assert fp["architecture"] == "LlamaForCausalLM" and fp["model_type"] == "llama"
    assert (fp["hidden_size"], fp["num_hidden_layers"], fp["vocab_size"]) == (H, L, V)
    assert fp["modules"]["model.layers.0.self_attn.q_proj"] == [64, 64]
    assert fp["modules"]["model.layers.1.self_attn.k_proj"] == [32, 64]
    assert fp["modules"]["model.layers.0.mlp.down_proj"] == [64, 128]
    assert fp["modules"]["model.embed_tokens"] == [128, 64]
    assert "model.norm" not in fp["modules"]  # 1-D weights are not modules
    assert len(fp["modules"]) == 2 + 7 * L
    assert fp["digest"].startswith("sha256:") and len(fp["digest"]) == 71


def test_sharded_checkpoint_has_same_fingerprint(tmp_path: Path, base_info) -> None:
    d = f.tiny_llama_base(tmp_path / "sharded", sharded=True)
    assert (d / "model.safetensors.index.json").exists()
    info = inspect_path(d)
    assert info.kind == "checkpoint"
    assert info.details["shards"] >= 2
    assert info.details["index_total_parameters"] == info.params == base_info.params
    assert info.fingerprint == base_info.fingerprint
    assert info.warnings == []


def test_fingerprint_ignores_dtype_but_not_shapes(tmp_path: Path, base_info) -> None:
    bf16 = inspect_path(f.tiny_llama_base(tmp_path / "bf16", dtype="bfloat16"))
    assert bf16.dtypes == ["bfloat16"]
    assert bf16.fingerprint["digest"] == base_info.fingerprint["digest"]
    wider = inspect_path(f.tiny_llama_base(tmp_path / "wide", hidden_size=96))
    assert wider.fingerprint["digest"] != base_info.fingerprint["digest"]


def test_merged_checkpoint_from_model_card(tmp_path: Path) -> None:
    info = inspect_path(f.merged_checkpoint(tmp_path / "m", base_model="org/tiny-base"))
    assert info.kind == "merged"
    assert info.base_model == "org/tiny-base"
    assert info.details["card"]["base_model_relation"] == "merged"


def test_loose_safetensors_dir_and_single_file(tmp_path: Path) -> None:
    st = f.write_safetensors_header(
        tmp_path / "loose" / "weights.safetensors",
        {"a.weight": ("F16", (4, 8)), "a.bias": ("F16", (4,))},
        sparse=False,
    )
    info = inspect_path(tmp_path / "loose")
    assert (info.kind, info.format) == ("checkpoint", "safetensors")
    assert info.params == 36 and info.dtypes == ["float16"]
    assert info.fingerprint["modules"] == {"a": [4, 8]}
    assert any("no config.json" in w for w in info.warnings)
    single = inspect_path(st)
    assert single.files == ["weights.safetensors"] and single.params == 36


def test_llama7b_headers_inspect_fast(tmp_path: Path) -> None:
    d = f.sharded_header_checkpoint(tmp_path / "7b", f.llama7b_shapes(), f.LLAMA7B_CONFIG, shards=3)
    t0 = time.perf_counter()
    info = inspect_path(d)
    elapsed = time.perf_counter() - t0
    assert info.params == 6_738_415_616
    assert info.size > 13_000_000_000  # sparse files: the bytes are holes
    assert info.details["shards"] == 3
    assert info.fingerprint["modules"]["model.layers.31.mlp.down_proj"] == [4096, 11008]
    assert info.dtypes == ["bfloat16"]
    assert elapsed < 1.0, f"inspecting 7B headers took {elapsed:.3f}s"


# --------------------------------------------------------------------------- PEFT LoRA family


def test_lora_adapter(lora: Path, base_info) -> None:
    info = inspect_path(lora)
    assert (info.kind, info.format, info.method) == ("adapter", "peft", "LORA")
    assert info.rank == 8 and info.alpha == 16.0
    assert info.base_model == "org/tiny-llama"
    assert info.task_type is None
    assert set(info.details["target_modules"]) == {"q_proj", "v_proj"}
    assert info.details["use_rslora"] is False and info.details["use_dora"] is False
    ranks = info.details["module_ranks"]
    assert len(ranks) == 2 * L and set(ranks.values()) == {8}
    # q: A 8x64 + B 64x8, v: A 8x64 + B 32x8, in each layer
    assert info.params == L * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8) == 3584
    assert info.dtypes == ["float32"]
    assert set(info.files) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert info.warnings == []
    exp = info.fingerprint
    assert exp["base_model"] == "org/tiny-llama"
    assert exp["modules"] == {
        f"model.layers.{i}.self_attn.{m}": shape
        for i in range(L)
        for m, shape in (("q_proj", [64, 64]), ("v_proj", [32, 64]))
    }
    assert fingerprint_matches(exp, base_info.fingerprint) == []


def test_lora_with_embedding_task_and_modules_to_save(tmp_path: Path, base_info) -> None:
    d = f.lora_adapter(
        tmp_path / "a",
        r=4,
        alpha=8,
        target_modules=["q_proj", "embed_tokens"],
        task_type="CAUSAL_LM",
        modules_to_save=["lm_head"],
    )
    info = inspect_path(d)
    assert info.task_type == "CAUSAL_LM"
    assert info.details["modules_to_save"] == ["lm_head"]
    assert info.details["module_ranks"]["model.embed_tokens"] == 4
    # lora_embedding_A is r x vocab, lora_embedding_B is hidden x r: the base weight is vocab x hidden
    assert info.fingerprint["modules"]["model.embed_tokens"] == [128, 64]
    assert "base_model.model.lm_head.weight" in info.details["full_weights"]
    assert fingerprint_matches(info.fingerprint, base_info.fingerprint) == []


def test_dora_rank_pattern_and_rslora(tmp_path: Path, base_info) -> None:
    d = f.lora_adapter(
        tmp_path / "d",
        r=8,
        alpha=16,
        use_dora=True,
        use_rslora=True,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"q_proj": 4},
    )
    info = inspect_path(d)
    assert info.method == "DORA"
    assert info.details["use_dora"] is True and info.details["use_rslora"] is True
    assert info.details["rank_pattern"] == {"q_proj": 2}
    assert info.details["alpha_pattern"] == {"q_proj": 4}
    ranks = info.details["module_ranks"]
    assert ranks["model.layers.0.self_attn.q_proj"] == 2
    assert ranks["model.layers.0.self_attn.v_proj"] == 8
    assert info.rank == 8
    assert info.warnings == []  # rank_pattern explains the rank-2 modules
    # DoRA magnitude vectors (one per output row) are counted too
    assert info.params == L * ((2 * 64 + 64 * 2 + 64) + (8 * 64 + 32 * 8 + 32))
    assert fingerprint_matches(info.fingerprint, base_info.fingerprint) == []


def test_rank_disagreement_warns(tmp_path: Path) -> None:
    d = f.lora_adapter(tmp_path / "r", r=8)
    f.patch_json(d / "adapter_config.json", r=16)
    info = inspect_path(d)
    assert info.rank == 8  # the tensors win
    (w,) = [w for w in info.warnings if "rank mismatch" in w]
    assert "r=16" in w and "rank 8" in w and "adapter_model.safetensors" in w and "3 more" in w

    f.patch_json(d / "adapter_config.json", r=8, rank_pattern={"v_proj": 4})
    info = inspect_path(d)
    (w,) = [w for w in info.warnings if "rank mismatch" in w]
    assert "r=4" in w and "v_proj" in w


def test_fan_in_fan_out_gpt2(tmp_path: Path) -> None:
    base = f.tiny_gpt2_base(tmp_path / "gpt2")
    b = inspect_path(base)
    assert b.fingerprint["modules"]["transformer.h.0.attn.c_attn"] == [64, 192]  # Conv1D: [in, out]
    d = f.lora_adapter(tmp_path / "a", base_dir=base, r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    info = inspect_path(d)
    assert info.details["fan_in_fan_out"] is True
    assert info.fingerprint["modules"]["transformer.h.0.attn.c_attn"] == [64, 192]
    assert fingerprint_matches(info.fingerprint, b.fingerprint) == []


def test_legacy_bin_adapter_is_not_unpickled(tmp_path: Path) -> None:
    d = f.lora_adapter(tmp_path / "bin", r=8, safe_serialization=False)
    assert (d / "adapter_model.bin").exists() and not (d / "adapter_model.safetensors").exists()
    # Garbage instead of a pickle: unpickling it would fail, inspecting must not.
    (d / "adapter_model.bin").write_bytes(b"not a pickle \x00\xff")
    info = inspect_path(d)
    assert info.method == "LORA" and info.rank == 8 and info.alpha == 16.0
    assert info.params is None and info.dtypes == []  # unknown, not 0: the pickle is never read
    assert info.details["weights_format"] == "pickle"
    assert any("pickle" in w and "adapter_model.bin" in w for w in info.warnings)
    from tests.conftest import run_cli

    assert "params:      unknown" in run_cli("inspect", d).stdout


def test_qlora_model_card(tmp_path: Path) -> None:
    d = f.qlora_adapter(tmp_path / "q", mode="nf4")
    info = inspect_path(d)
    assert info.method == "LORA" and info.rank == 8
    assert info.quant is None
    assert info.details["trained_on_quant"] == "nf4"
    assert info.details["trained_on_quant_config"]["bnb_4bit_use_double_quant"] == "True"
    # the LoRA sits on 4-bit layers yet sees the original [out, in]
    assert info.fingerprint["modules"]["model.layers.0.self_attn.q_proj"] == [64, 64]


def test_qlora_card_int8_and_absent(tmp_path: Path, lora: Path) -> None:
    d = f.qlora_adapter(tmp_path / "q8", mode="int8")
    assert inspect_path(d).details["trained_on_quant"] == "int8"
    assert "trained_on_quant" not in inspect_path(lora).details


# --------------------------------------------------------------------------- every other peft_type


def _peft(tmp_path: Path, cfg) -> object:
    return inspect_path(f.peft_adapter(tmp_path / "a", cfg))


def test_ia3(tmp_path: Path, base_info) -> None:
    from peft import IA3Config

    info = _peft(tmp_path, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    assert info.method == "IA3" and info.rank is None and info.alpha is None
    assert info.details["feedforward_modules"] == ["down_proj"]
    mods = info.fingerprint["modules"]
    assert mods["model.layers.0.mlp.down_proj"] == [None, 128]  # (1, in): scales the input
    assert mods["model.layers.0.self_attn.k_proj"] == [32, None]  # (out, 1)
    assert info.params == L * (128 + 32)
    assert fingerprint_matches(info.fingerprint, base_info.fingerprint) == []


def test_adalora(tmp_path: Path) -> None:
    from peft import AdaLoraConfig

    info = _peft(
        tmp_path, AdaLoraConfig(init_r=12, target_r=8, lora_alpha=32, target_modules=["q_proj"], total_step=10)
    )
    assert info.method == "ADALORA"
    assert info.rank == 12  # the tensors hold init_r
    assert info.alpha == 32.0
    assert info.details["target_r"] == 8 and info.details["init_r"] == 12
    assert set(info.details["module_ranks"].values()) == {12}
    assert info.warnings == []
    assert info.fingerprint["modules"]["model.layers.0.self_attn.q_proj"] == [64, 64]


def test_loha(tmp_path: Path, base_info) -> None:
    from peft import LoHaConfig

    info = _peft(tmp_path, LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert (info.method, info.rank, info.alpha) == ("LOHA", 4, 8.0)
    assert info.fingerprint["modules"]["model.layers.1.self_attn.v_proj"] == [32, 64]
    assert fingerprint_matches(info.fingerprint, base_info.fingerprint) == []


def test_lokr(tmp_path: Path, base_info) -> None:
    from peft import LoKrConfig

    info = _peft(tmp_path, LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert (info.method, info.rank, info.alpha) == ("LOKR", 4, 8.0)
    # kron(w1, w2) rebuilds the full [out, in]
    assert info.fingerprint["modules"]["model.layers.0.self_attn.v_proj"] == [32, 64]
    assert fingerprint_matches(info.fingerprint, base_info.fingerprint) == []


def test_lokr_decomposed_rank_from_tensors(tmp_path: Path) -> None:
    from peft import LoKrConfig

    d = f.peft_adapter(
        tmp_path / "a", LoKrConfig(r=2, alpha=4, target_modules=["gate_proj"]), hidden_size=128, layers=1
    )
    info = inspect_path(d)
    assert info.details["module_ranks"] == {"model.layers.0.mlp.gate_proj": 2}
    assert info.fingerprint["modules"]["model.layers.0.mlp.gate_proj"] == [256, 128]


def test_vera(tmp_path: Path) -> None:
    from peft import VeraConfig

    info = _peft(tmp_path, VeraConfig(r=16, target_modules=["q_proj", "v_proj"], save_projection=True))
    assert info.method == "VERA" and info.rank == 16
    assert info.details["save_projection"] is True
    assert info.details["shared_tensors"]["base_model.vera_A"] == [16, 64]
    assert info.fingerprint["modules"]["model.layers.0.self_attn.v_proj"] == [32, None]


def test_oft_and_boft(tmp_path: Path, base_info) -> None:
    from peft import BOFTConfig, OFTConfig

    oft = inspect_path(f.peft_adapter(tmp_path / "oft", OFTConfig(r=0, oft_block_size=16, target_modules=["q_proj"])))
    assert oft.method == "OFT" and oft.rank is None
    assert oft.details["oft_block_size"] == 16
    assert oft.fingerprint["modules"]["model.layers.0.self_attn.q_proj"] == [None, 64]
    boft = inspect_path(f.peft_adapter(tmp_path / "boft", BOFTConfig(boft_block_size=8, target_modules=["v_proj"])))
    assert boft.method == "BOFT" and boft.details["boft_block_size"] == 8
    assert boft.fingerprint["modules"]["model.layers.0.self_attn.v_proj"] == [32, 64]
    assert fingerprint_matches(oft.fingerprint, base_info.fingerprint) == []
    assert fingerprint_matches(boft.fingerprint, base_info.fingerprint) == []


@pytest.mark.parametrize("kind", ["PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"])
def test_prompt_methods(tmp_path: Path, kind: str, base_info) -> None:
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    cls = {"PROMPT_TUNING": PromptTuningConfig, "PREFIX_TUNING": PrefixTuningConfig, "P_TUNING": PromptEncoderConfig}[
        kind
    ]
    info = _peft(tmp_path, cls(task_type="CAUSAL_LM", num_virtual_tokens=5))
    assert info.method == kind and info.rank is None
    assert info.task_type == "CAUSAL_LM"
    assert info.details["num_virtual_tokens"] == 5
    assert info.details["num_layers"] == L
    if kind == "PREFIX_TUNING":
        # past key values for every layer: 2 * layers * kv dim
        assert info.params == 5 * 2 * L * 32
    else:
        assert info.params == 5 * H
        assert info.fingerprint["hidden_size"] == H
    assert fingerprint_matches(info.fingerprint, base_info.fingerprint) == []


def test_prompt_tuning_on_wrong_base(tmp_path: Path, base_info) -> None:
    from peft import PromptTuningConfig

    d = f.peft_adapter(tmp_path / "a", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), hidden_size=32)
    problems = fingerprint_matches(inspect_path(d).fingerprint, base_info.fingerprint)
    assert problems == ["hidden_size: adapter expects 32, base has 64"]


def test_adaption_prompt(tmp_path: Path) -> None:
    from peft import AdaptionPromptConfig

    info = _peft(tmp_path, AdaptionPromptConfig(adapter_len=4, adapter_layers=1, task_type="CAUSAL_LM"))
    assert info.method == "ADAPTION_PROMPT"
    assert info.details["adapter_len"] == 4 and info.details["adapter_layers"] == 1
    assert info.params == 4 * H + 1


def test_adapter_name_left_in_tensor_names(tmp_path: Path, lora: Path) -> None:
    import shutil

    from safetensors.numpy import load_file, save_file

    d = tmp_path / "named"
    shutil.copytree(lora, d)
    st = str(d / "adapter_model.safetensors")
    # what saving model.state_dict() by hand produces: lora_A.default.weight
    save_file({k.replace(".weight", ".default.weight"): v for k, v in load_file(st).items()}, st)
    info = inspect_path(d)
    assert info.rank == 8 and set(info.details["module_ranks"].values()) == {8}
    assert info.fingerprint["modules"]["model.layers.0.self_attn.v_proj"] == [32, 64]
    assert any("keeps the adapter name (default)" in w for w in info.warnings)


def test_unknown_peft_type_reported_as_is(tmp_path: Path, lora: Path) -> None:
    d = tmp_path / "new"
    d.mkdir()
    f.write_safetensors_header(
        d / "adapter_model.safetensors",
        {"base_model.model.model.layers.0.self_attn.q_proj.shiny_w": ("F32", (4, 64))},
        sparse=False,
    )
    (d / "adapter_config.json").write_text(
        json.dumps({"peft_type": "SHINY", "r": 4, "alpha": 2, "target_modules": ["q_proj"], "task_type": None}),
        encoding="utf-8",
    )
    info = inspect_path(d)
    assert (info.kind, info.method, info.rank, info.alpha) == ("adapter", "SHINY", 4, 2.0)
    assert info.params == 256
    assert info.details["target_modules"] == ["q_proj"]


# --------------------------------------------------------------------------- named adapters


def test_named_adapters_in_subfolders(tmp_path: Path) -> None:
    d = f.multi_adapter(tmp_path / "multi", names=("default", "other", "third"))
    assert (d / "adapter_config.json").exists() and (d / "other" / "adapter_config.json").exists()
    info = inspect_path(d)
    assert info.method == "LORA" and info.rank == 4  # the root adapter
    subs = info.details["adapters"]
    assert set(subs) == {"other", "third"}
    assert subs["other"]["rank"] == 2 and subs["third"]["rank"] == 4
    assert subs["other"]["target_modules"] == ["v_proj"]
    assert "other/adapter_model.safetensors" in info.files
    root_params = L * (4 * 64 + 64 * 4)
    assert info.params == root_params + L * (2 * 64 + 32 * 2) + L * (4 * 64 + 32 * 4)


def test_only_named_subfolders(tmp_path: Path) -> None:
    d = f.multi_adapter(tmp_path / "multi", names=("alpha", "beta"), root_default=False)
    assert not (d / "adapter_config.json").exists()
    info = inspect_path(d)
    assert info.kind == "adapter" and info.method == "LORA"
    assert set(info.details["adapters"]) == {"alpha", "beta"}
    assert info.rank == 4 and info.alpha is None  # alphas differ (8 and 4)
    mods = info.fingerprint["modules"]
    assert mods["model.layers.0.self_attn.q_proj"] == [64, 64] and mods["model.layers.0.self_attn.v_proj"] == [32, 64]

    one = f.multi_adapter(tmp_path / "one", names=("solo",), root_default=False)
    solo = inspect_path(one)
    assert solo.details["adapter_name"] == "solo" and solo.rank == 4 and solo.alpha == 8.0


# --------------------------------------------------------------------------- adapters library


def test_bottleneck_adapter(tmp_path: Path) -> None:
    info = inspect_path(f.bottleneck_adapter(tmp_path / "bn", name="sst2", reduction_factor=16))
    assert (info.kind, info.format, info.method) == ("adapter", "adapters", "BOTTLENECK")
    assert info.base_model == "bert-base-uncased"
    assert info.details["reduction_factor"] == 16
    assert info.details["bottleneck_sizes"] == [4]
    assert info.details["adapter_name"] == "sst2"
    assert info.details["non_linearity"] == "relu"
    assert info.rank is None
    assert info.params == L * (4 * 64 + 4 + 64 * 4 + 64)
    assert info.fingerprint["hidden_size"] == 64


def test_adapters_library_lora_and_pickle(tmp_path: Path) -> None:
    info = inspect_path(f.bottleneck_adapter(tmp_path / "l", architecture="lora", r=8, alpha=16))
    assert (info.format, info.method, info.rank, info.alpha) == ("adapters", "LORA", 8, 16.0)
    assert info.fingerprint["modules"]["bert.encoder.layer.0.attention.self.query"] == [64, 64]
    pk = inspect_path(f.bottleneck_adapter(tmp_path / "p", safetensors=False))
    assert pk.method == "BOTTLENECK" and pk.params == 0
    assert any("pytorch_adapter.bin" in w for w in pk.warnings)


def test_adapters_library_lora_matches_bert(tmp_path: Path) -> None:
    bert = tmp_path / "bert"
    f.tiny_model("bert").save_pretrained(str(bert))
    b = inspect_path(bert)
    a = inspect_path(f.bottleneck_adapter(tmp_path / "l", architecture="lora", r=8))
    # bert checkpoints saved by BertModel have no "bert." prefix: tolerated
    assert "encoder.layer.0.attention.self.query" in b.fingerprint["modules"]
    assert fingerprint_matches(a.fingerprint, b.fingerprint) == []


# --------------------------------------------------------------------------- bitsandbytes


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_bnb_4bit(tmp_path: Path, mode: str, base: Path, base_info) -> None:
    d = f.bnb_checkpoint(
        tmp_path / mode, mode=mode, base_dir=base, double_quant=mode == "nf4", skip_modules=["lm_head"]
    )
    info = inspect_path(d)
    assert (info.kind, info.quant) == ("quantized", mode)
    q = info.details["quantization"]
    assert q["method"] == "bitsandbytes" and q["bits"] == 4 and q["type"] == mode
    assert q["block_size"] == 64
    assert q["double_quant"] is (mode == "nf4")
    assert q["compute_dtype"] == "bfloat16"
    assert q["skipped_modules"] == ["lm_head"]
    assert q["quantized_modules"] == 7 * L
    assert q["unquantized_modules"] == ["lm_head", "model.embed_tokens"]
    assert info.warnings == []
    # logical parameters and shapes, as if unquantized
    assert info.params == base_info.params
    assert info.fingerprint["modules"]["model.layers.0.mlp.down_proj"] == [64, 128]
    assert info.fingerprint["digest"] == base_info.fingerprint["digest"]
    assert "uint8" in info.dtypes


def test_bnb_int8(tmp_path: Path, base: Path, base_info) -> None:
    info = inspect_path(f.bnb_checkpoint(tmp_path / "i8", mode="int8", base_dir=base))
    assert (info.kind, info.quant) == ("quantized", "int8")
    q = info.details["quantization"]
    assert q["bits"] == 8 and q["quantized_modules"] == 7 * L
    assert info.params == base_info.params
    assert info.fingerprint["digest"] == base_info.fingerprint["digest"]
    assert "int8" in info.dtypes and info.warnings == []


def test_bnb_config_and_layout_disagree(tmp_path: Path, base: Path) -> None:
    d = f.bnb_checkpoint(tmp_path / "nf4", mode="nf4", base_dir=base)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    cfg["quantization_config"]["bnb_4bit_use_double_quant"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    info = inspect_path(d)
    assert info.quant == "nf4"  # the tensors win
    assert any("says fp4" in w and "nf4" in w for w in info.warnings)
    assert any("double_quant" in w for w in info.warnings)

    f.patch_json(d / "config.json", quantization_config=None)
    info = inspect_path(d)
    assert info.quant == "nf4" and any("no bitsandbytes quantization_config" in w for w in info.warnings)


def test_lora_on_bnb_base_matches_quantized_fingerprint(tmp_path: Path, base: Path, lora: Path) -> None:
    q = inspect_path(f.bnb_checkpoint(tmp_path / "nf4", mode="nf4", base_dir=base))
    assert fingerprint_matches(inspect_path(lora).fingerprint, q.fingerprint) == []


@pytest.mark.parametrize(
    "qc, quant, expect",
    [
        (
            {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
            "gptq",
            {"bits": 4, "group_size": 128},
        ),
        (
            {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm", "zero_point": True},
            "awq",
            {"bits": 4, "group_size": 64, "version": "gemm"},
        ),
    ],
)
def test_gptq_awq_from_config(tmp_path: Path, qc: dict, quant: str, expect: dict) -> None:
    d = tmp_path / quant
    f.write_safetensors_header(
        d / "model.safetensors",
        {
            "model.layers.0.self_attn.q_proj.qweight": ("I32", (8, 64)),
            "model.layers.0.self_attn.q_proj.scales": ("F16", (1, 64)),
        },
        sparse=False,
    )
    (d / "config.json").write_text(json.dumps({**f.LLAMA7B_CONFIG, "quantization_config": qc}))
    info = inspect_path(d)
    assert (info.kind, info.quant) == ("quantized", quant)
    q = info.details["quantization"]
    assert q["method"] == quant and q["type"] == quant
    for k, v in expect.items():
        assert q[k] == v


# --------------------------------------------------------------------------- GGUF


def test_gguf_model(tmp_path: Path) -> None:
    p = f.gguf_file(tmp_path / "tiny-q8_0.gguf", file_type="q8_0", name="tiny", context_length=256)
    info = inspect_path(p)
    assert (info.kind, info.format, info.quant) == ("gguf", "gguf", "q8_0")
    d = info.details
    assert d["architecture"] == "llama" and d["name"] == "tiny"
    assert d["context_length"] == 256 and d["block_count"] == L and d["embedding_length"] == H
    assert d["tensors"] == 2 + 7 * L + 1
    assert d["vocab_size"] == V
    assert d["gguf_metadata"]["tokenizer.ggml.tokens"] == {"array_length": V}
    per_layer = H + H * H * 2 + (H // 2) * H * 2 + 2 * (2 * H) * H
    assert info.params == 2 * V * H + L * per_layer + H
    assert info.dtypes == ["f32", "q8_0"]
    assert info.files == ["tiny-q8_0.gguf"]
    assert info.fingerprint["modules"]["blk.0.ffn_up"] == [128, 64]  # reversed GGUF dims
    assert info.fingerprint["hidden_size"] == H


def test_gguf_type_guessed_from_tensors_and_in_dir(tmp_path: Path) -> None:
    f.gguf_file(tmp_path / "d" / "model.gguf", file_type=None)
    (tmp_path / "d" / "notes.txt").write_text("hi")
    info = inspect_path(tmp_path / "d")
    assert info.quant == "f16" and info.kind == "gguf"
    assert info.files == ["model.gguf", "notes.txt"]


def test_gguf_lora_adapter(tmp_path: Path) -> None:
    info = inspect_path(f.gguf_file(tmp_path / "lora.gguf", adapter=True, r=8, lora_alpha=16))
    assert (info.kind, info.format, info.method) == ("adapter", "gguf", "LORA")
    assert info.rank == 8 and info.alpha == 16.0 and info.quant is None
    assert info.fingerprint["modules"]["blk.0.attn_v"] == [32, 64]


def test_split_gguf(tmp_path: Path) -> None:
    d = f.gguf_file(tmp_path / "split" / "m.gguf", split_max_tensors=6)
    parts = sorted(p.name for p in d.iterdir())
    assert parts[0] == "m-00001-of-00003.gguf" and len(parts) == 3
    info = inspect_path(d)
    assert info.details["split_files"] == parts
    assert info.details["tensors"] == 2 + 7 * L + 1
    assert info.details["name"] == "tiny" and info.quant == "q8_0"
    (d / parts[1]).unlink()
    with pytest.raises(InvalidArtifactError, match="split GGUF m has 2 of 3 parts: m-00002-of-00003.gguf missing"):
        inspect_path(d)


def test_gguf_header_parser_agrees_with_gguf_reader(tmp_path: Path) -> None:
    import gguf

    from adapterhub.inspect.gguf import _read

    for p in (f.gguf_file(tmp_path / "m.gguf"), f.gguf_file(tmp_path / "a.gguf", adapter=True)):
        meta, tensors = _read(p, p.name)
        reader = gguf.GGUFReader(p)
        assert [(t[0], t[1], t[2], t[3]) for t in tensors] == [
            (t.name, t.tensor_type.name, [int(x) for x in reversed(t.shape.tolist())], int(t.n_elements))
            for t in reader.tensors
        ]
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            want = field.contents()
            if isinstance(want, list) and len(want) > 16:
                assert meta[key] == {"array_length": len(want)}
            else:
                assert meta[key] == pytest.approx(want), key


def test_gguf_with_large_vocabulary_is_fast(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    p = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_token_list([f"token{i}" for i in range(100_000)])
    w.add_token_scores([0.0] * 100_000)
    w.add_token_merges([f"a{i} b{i}" for i in range(100_000)])
    w.add_tensor("output.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t0 = time.perf_counter()
    info = inspect_path(p)
    elapsed = time.perf_counter() - t0
    assert info.details["vocab_size"] == 100_000
    assert info.details["gguf_metadata"]["tokenizer.ggml.merges"] == {"array_length": 100_000}
    assert elapsed < 1.0, f"{elapsed:.2f}s"  # gguf.GGUFReader needs ~20 s for this header


def test_gguf_truncated(tmp_path: Path) -> None:
    p = f.gguf_file(tmp_path / "m.gguf")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 500])
    with pytest.raises(InvalidArtifactError, match="m.gguf"):
        inspect_path(p)
    p.write_bytes(b"GGUF" + b"\x00" * 3)
    with pytest.raises(InvalidArtifactError, match="m.gguf"):
        inspect_path(p)


# --------------------------------------------------------------------------- fingerprint_matches


def test_fingerprint_matches_reports_shape_and_missing() -> None:
    base = {
        "modules": {
            "model.layers.0.self_attn.q_proj": [64, 64],
            "model.layers.0.self_attn.v_proj": [32, 64],
            "model.layers.0.self_attn.o_proj": [64, 64],
        }
    }
    exp = {
        "modules": {
            "model.layers.0.self_attn.q_proj": [128, 64],
            "model.layers.0.self_attn.v_proj": [32, None],  # unknown input side: fine
            "model.layers.0.self_attn.o_proj": [32, None],
            "model.layers.0.mlp.gate_proj": [128, 64],
        }
    }
    problems = fingerprint_matches(exp, base)
    assert problems == [
        "missing module model.layers.0.mlp.gate_proj: the base has no such 2-D weight",
        "shape mismatch for model.layers.0.self_attn.o_proj: adapter expects [32, ?], base has [64, 64]",
        "shape mismatch for model.layers.0.self_attn.q_proj: adapter expects [128, 64], base has [64, 64]",
    ]


def test_fingerprint_matches_tolerates_prefixes() -> None:
    shapes = {"layers.0.attn.q": [8, 8], "layers.1.attn.q": [8, 8]}
    with_prefix = {f"model.{k}": v for k, v in shapes.items()}
    assert fingerprint_matches({"modules": with_prefix}, {"modules": shapes}) == []
    assert fingerprint_matches({"modules": shapes}, {"modules": with_prefix}) == []
    bert = {f"bert.encoder.{k}": v for k, v in shapes.items()}
    assert fingerprint_matches({"modules": {f"encoder.{k}": v for k, v in shapes.items()}}, {"modules": bert}) == []
    # an ambiguous suffix is not guessed
    amb = {"a.layers.0.attn.q": [8, 8], "b.layers.0.attn.q": [8, 8]}
    assert fingerprint_matches({"modules": {"layers.0.attn.q": [8, 8]}}, {"modules": amb}) == [
        "missing module layers.0.attn.q: the base has no such 2-D weight"
    ]


def test_lora_against_wrong_base(tmp_path: Path, lora: Path) -> None:
    wide = inspect_path(f.tiny_llama_base(tmp_path / "wide", hidden_size=96))
    problems = fingerprint_matches(inspect_path(lora).fingerprint, wide.fingerprint)
    assert len(problems) == 2 * L
    assert "shape mismatch for model.layers.0.self_attn.q_proj: adapter expects [64, 64], base has [96, 96]" in problems


# --------------------------------------------------------------------------- bad input


def test_not_an_artifact(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidArtifactError, match="is not an artifact: no adapter_config.json, config.json"):
        inspect_path(tmp_path)
    with pytest.raises(InvalidArtifactError, match="not an artifact"):
        inspect_path(tmp_path / "notes.txt")
    with pytest.raises(NotFoundError):
        inspect_path(tmp_path / "nope")


@pytest.mark.parametrize("name", ["adapter_config.json", "config.json"])
def test_malformed_json_names_file_line_col(tmp_path: Path, lora: Path, base: Path, name: str) -> None:
    import shutil

    d = tmp_path / "x"
    shutil.copytree(lora if name == "adapter_config.json" else base, d)
    (d / name).write_text('{\n  "r": 8,\n  "peft_type": LORA\n}\n')
    with pytest.raises(InvalidArtifactError) as e:
        inspect_path(d)
    assert str(e.value).startswith(f"{name}: malformed JSON at line 3, column 16")
    assert "\n" not in str(e.value)


def test_truncated_safetensors(tmp_path: Path, lora: Path) -> None:
    import shutil

    d = tmp_path / "t"
    shutil.copytree(lora, d)
    st = d / "adapter_model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[:-100])
    with pytest.raises(
        InvalidArtifactError, match=r"adapter_model.safetensors: tensor '.+' ends at byte \d+ .* \(truncated file\?\)"
    ):
        inspect_path(d)
    st.write_bytes(data[:5])
    with pytest.raises(InvalidArtifactError, match="adapter_model.safetensors: truncated safetensors file"):
        inspect_path(d)
    (n,) = struct.unpack("<Q", data[:8])
    st.write_bytes(data[: 8 + n // 2])
    with pytest.raises(InvalidArtifactError, match=f"adapter_model.safetensors: safetensors header claims {n} bytes"):
        inspect_path(d)
    st.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    with pytest.raises(InvalidArtifactError, match="adapter_model.safetensors: safetensors header length"):
        inspect_path(d)


def test_tensor_size_disagrees_with_shape(tmp_path: Path) -> None:
    p = tmp_path / "bad.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(
        InvalidArtifactError, match=r"bad.safetensors: tensor 'w' is declared F32 \[2, 2\] \(16 bytes\) but spans 12"
    ):
        inspect_path(p)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "a/../../b.safetensors"])
def test_unsafe_weight_map(tmp_path: Path, shard: str) -> None:
    d = f.tiny_llama_base(tmp_path / "s", sharded=True)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafePathError, match="model.safetensors.index.json"):
        inspect_path(d)


def test_missing_shard_and_missing_key(tmp_path: Path) -> None:
    d = f.tiny_llama_base(tmp_path / "s", sharded=True)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["lm_head.weight"]
    index["weight_map"]["model.extra.weight"] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidArtifactError, match=f"'model.extra.weight' is indexed in {shard}"):
        inspect_path(d)
    del index["weight_map"]["model.extra.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / shard).unlink()
    with pytest.raises(InvalidArtifactError, match=f"shard {shard} is missing"):
        inspect_path(d)


def test_symlink_escaping_is_refused(tmp_path: Path, lora: Path) -> None:
    import shutil

    d = tmp_path / "ln"
    shutil.copytree(lora, d)
    outside = tmp_path / "outside.safetensors"
    shutil.move(d / "adapter_model.safetensors", outside)
    (d / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(UnsafePathError):
        inspect_path(d)


def test_adapter_config_without_weights_or_type(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(InvalidArtifactError, match="adapter_config.json: PEFT adapter without weights"):
        inspect_path(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(InvalidArtifactError, match="adapter_config.json: neither a PEFT adapter config"):
        inspect_path(tmp_path)


# --------------------------------------------------------------------------- model cards and import cost


def test_front_matter_subset() -> None:
    text = (
        "---\nbase_model:\n- org/a\n- 'org/b'\nbase_model_relation: merged # note\nlicense: apache-2.0\n"
        'tags: [x, "y"]\nmodel-index:\n  - name: foo\n    results: []\n---\n# body\n'
    )
    meta = parse_front_matter(text)
    assert meta == {
        "base_model": ["org/a", "org/b"],
        "base_model_relation": "merged",
        "license": "apache-2.0",
        "tags": ["x", "y"],
    }
    assert parse_front_matter("# no front matter") == {}


def test_inspect_does_not_import_torch() -> None:
    code = "import adapterhub.inspect, sys; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_inspecting_does_not_import_torch(tmp_path: Path, lora: Path, base: Path) -> None:
    gg = f.gguf_file(tmp_path / "m.gguf")
    code = (
        "import sys\nfrom adapterhub.inspect import inspect_path\n"
        f"for p in {[str(lora), str(base), str(gg)]!r}: inspect_path(p)\n"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- mlx-lm adapters


def test_mlx_lm_adapter(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    d = tmp_path / "mlx"
    d.mkdir()
    r, h = 4, 16
    tensors = {}
    for i in (2, 3):
        for m in ("q_proj", "v_proj"):
            tensors[f"model.layers.{i}.self_attn.{m}.lora_a"] = np.zeros((h, r), np.float32)
            tensors[f"model.layers.{i}.self_attn.{m}.lora_b"] = np.zeros((r, h // 2 if m == "v_proj" else h), np.float32)
    save_file(tensors, str(d / "adapters.safetensors"))
    cfg = {"fine_tune_type": "lora", "num_layers": 2, "model": "org/tiny", "lora_parameters": {"rank": r, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]}}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    info = inspect_path(d)
    assert (info.kind, info.format, info.method, info.rank, info.alpha) == ("adapter", "mlx", "LORA", 4, 8.0)
    assert info.base_model == "org/tiny" and info.details["layers"] == [2, 3]
    # [out, in] of every adapted module, as a PEFT adapter would expect of its base
    assert info.fingerprint["modules"]["model.layers.2.self_attn.v_proj"] == [h // 2, h]
    (d / "adapter_config.json").write_text(json.dumps({"peft": 1}))
    with pytest.raises(InvalidArtifactError, match="nor an mlx-lm adapter config"):
        inspect_path(d)


# --------------------------------------------------------------------------- model cards


def test_model_card_writer_reads_back() -> None:
    from adapterhub import modelcard

    meta = {"base_model": "org/m", "base_model_relation": "merged", "tags": ["lora", "4-bit", "true", "8", ""], "license": None, "n": 3}
    text = modelcard.render(meta, "\n# Card\n")
    assert text.startswith("---\nbase_model: org/m\nbase_model_relation: merged\ntags:\n- lora\n- 4-bit\n")
    # strings YAML would read as a bool, a number or nothing are quoted; None values are left out
    assert '- "true"\n- "8"\n- ""\n' in text and "license" not in text
    assert parse_front_matter(text) == {"base_model": "org/m", "base_model_relation": "merged", "tags": ["lora", "4-bit", "true", "8", ""], "n": "3"}
    assert 'base_model: "org/m"' in modelcard.render(meta, "", quote=("base_model",))
    import yaml

    assert yaml.safe_load(modelcard.split_front_matter(text)[0]) == {k: v for k, v in meta.items() if v is not None}


def test_model_card_metadata_refuses_aliases_and_depth() -> None:
    from adapterhub import modelcard

    meta, body = modelcard.read_metadata("---\nlicense: mit\nmodel-index:\n- name: x\n  results: []\n---\ntext\n")
    assert meta == {"license": "mit", "model-index": [{"name": "x", "results": []}]} and body == "text\n"
    assert modelcard.read_metadata("no front matter") == (None, "no front matter")
    assert modelcard.read_metadata("---\n- a list\n---\nbody")[0] is None
    bomb = "---\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b]\n---\n"
    with pytest.raises(InvalidArtifactError, match="aliases"):
        modelcard.read_metadata(bomb)
    with pytest.raises(InvalidArtifactError, match="nested deeper"):
        modelcard.read_metadata("---\na: " + "[" * 200 + "]" * 200 + "\n---\n")
