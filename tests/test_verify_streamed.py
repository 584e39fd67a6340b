"""``adapterhub verify --streamed``: one decoder layer of each model at a time.

The streamed path has its own decoder arithmetic and applies the adapter with
its own code, so every test here holds it to the whole-model path (transformers
+ PEFT) on the same inputs: in float32 the metrics agree within 1e-6.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from adapterhub.convert import merge, quantize
from adapterhub.errors import InvalidArtifactError, UsageError
from adapterhub.verify import verify
from adapterhub.verify.selftest import build_base, build_lora, drop_module, wrong_alpha
from tests.factories import BuiltDirs

pytestmark = pytest.mark.filterwarnings("ignore")

FLOAT_METRICS = ("rel", "cos_min", "cos_mean", "kl_mean", "kl_max", "top1", "topk")


@pytest.fixture(autouse=True)
def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


class Models(BuiltDirs):
    """Tiny trained-looking Llamas (see selftest.build_base), 3 layers, built on first use."""

    @property
    def base(self) -> Path:
        return self.get("base", lambda p: build_base(p, layers=3))

    @property
    def lora(self) -> Path:
        return self.get("lora", lambda p: build_lora(p, self.base))

    def merged(self, name: str, adapter: Path | None = None) -> Path:
        return self.get(f"merged-{name}", lambda p: merge(str(adapter or self.lora), str(self.base), out=p, device="cpu").out)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    return Models(tmp_path_factory.mktemp("streamed-models"))


def both(cand: Path, adapter: Path, base: Path, **kw):
    whole = verify(cand, adapter, base, device="cpu", record=False, **kw)
    streamed = verify(cand, adapter, base, device="cpu", record=False, streamed=True, **kw)
    assert not whole.streamed and streamed.streamed
    return whole, streamed


def assert_agree(a, b, tol: float = 1e-6) -> None:
    assert a.verdict == b.verdict, (a.failures, b.failures)
    for k in FLOAT_METRICS:
        x, y = a.metrics[k], b.metrics[k]
        assert (x is None) == (y is None), k
        if x is not None:
            assert abs(x - y) <= tol, (k, x, y)
    for k in ("max_abs", "mean_abs"):
        assert abs(a.metrics[k] - b.metrics[k]) <= tol * max(1.0, abs(a.metrics[k])), k
    assert a.metrics["clear_positions"] == b.metrics["clear_positions"]


# --------------------------------------------------------------------------- equivalence with the whole-model path


@pytest.mark.parametrize("case", ["correct", "wrong-alpha", "dropped-module"])
def test_streamed_agrees_with_whole_model_in_fp32(models, tmp_path, case):
    if case == "correct":
        cand = models.merged("correct")
    elif case == "wrong-alpha":
        cand = models.merged(case, wrong_alpha(models.lora, tmp_path / "a", 2.0))
    else:
        cand = models.merged(case, drop_module(models.lora, tmp_path / "a", "layers.2.mlp.down_proj"))
    whole, streamed = both(cand, models.lora, models.base, layers=True, decode=4)
    assert whole.verdict == ("PASS" if case == "correct" else "FAIL")
    assert_agree(whole, streamed)
    margins = ("margin_at_divergence",)
    assert {k: v for k, v in streamed.decode.items() if k not in margins} == {k: v for k, v in whole.decode.items() if k not in margins}
    for x, y in zip(streamed.decode["margin_at_divergence"], whole.decode["margin_at_divergence"]):
        assert (x is None and y is None) or abs(x - y) < 1e-4  # a key/value cache against a recomputed prefix
    for r, s in zip(whole.layers["layers"], streamed.layers["layers"]):
        assert r["layer"] == s["layer"] and abs(r["rel"] - s["rel"]) <= 1e-6
    assert whole.layers["first_divergent"] == streamed.layers["first_divergent"]
    assert streamed.format == whole.format and streamed.tolerance == whole.tolerance
    assert streamed.dtypes == {"reference": "float32", "candidate": "float32"}
    assert "one decoder layer at a time" in streamed.reference["method"]


@pytest.mark.parametrize("method", ["dora", "ia3", "rslora-pattern"])
def test_streamed_applies_other_adapters_as_peft_does(models, tmp_path, method):
    """The streamed reference's own DoRA, IA3 and rank/alpha-pattern code, against PEFT."""
    if method == "dora":
        ad = build_lora(tmp_path / "a", models.base, r=4, targets=("q_proj", "v_proj", "up_proj"), use_dora=True)
    elif method == "ia3":
        from peft import IA3Config, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        cfg = IA3Config(target_modules=["k_proj", "o_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
        pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(models.base)), cfg)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "ia3_l" in n:
                    p.mul_(1 + 0.3 * torch.randn_like(p))
        ad = tmp_path / "a"
        pm.save_pretrained(str(ad))
    else:
        ad = shutil.copytree(models.lora, tmp_path / "a")
        cfg = json.loads((ad / "adapter_config.json").read_text())
        cfg.update(use_rslora=True, alpha_pattern={"layers.1.mlp.up_proj": 24}, rank_pattern={})
        (ad / "adapter_config.json").write_text(json.dumps(cfg))
    cand = merge(str(ad), str(models.base), out=tmp_path / "m", device="cpu").out
    whole, streamed = both(cand, ad, models.base, decode=2)
    assert whole.verdict == "PASS", whole.failures
    assert_agree(whole, streamed)
    # and the base itself is no candidate for the adapter, streamed or not
    assert verify(models.base, ad, models.base, device="cpu", record=False, decode=0, streamed=True).verdict == "FAIL"


def test_layers_name_the_layer_of_a_wrong_alpha(models, tmp_path):
    """A merge with a wrong alpha on one module of layer 1 (of 3) is reported at layer 1."""
    bad = shutil.copytree(models.lora, tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"model.layers.1.self_attn.v_proj": cfg["lora_alpha"] * 3}
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    cand = merge(str(bad), str(models.base), out=tmp_path / "m", device="cpu").out
    rep = verify(cand, models.lora, models.base, device="cpu", record=False, streamed=True, layers=True, decode=0)
    rows = rep.layers["layers"]
    assert rep.verdict == "FAIL" and len(rows) == 4  # embeddings, layers 0, 1, 2 (final norm)
    assert rows[0]["rel"] == 0 and rows[1]["rel"] < 1e-5  # layer 0 is right
    assert rows[2]["rel"] > 100 * rep.tolerance["rel"]  # layer 1 is where it goes wrong
    assert rep.layers["first_divergent"] == 2


def test_bf16_merge_streamed(tmp_path):
    base = build_base(tmp_path / "base", dtype="bfloat16")
    ad = build_lora(tmp_path / "a", base)
    cand = merge(str(ad), str(base), out=tmp_path / "m", device="cpu").out
    whole, streamed = both(cand, ad, base, decode=2)
    assert streamed.verdict == "PASS" and streamed.dtypes == {"reference": "bfloat16", "candidate": "bfloat16"}
    assert 1e-4 < streamed.metrics["rel"] < streamed.tolerance["rel"]  # bf16 rounding is there, and inside the bound
    assert abs(streamed.metrics["rel"] - whole.metrics["rel"]) < 1e-3


# --------------------------------------------------------------------------- quantized candidates


@pytest.mark.parametrize("to", ["nf4", "int8"])
def test_streamed_quantized_candidates(models, tmp_path, to):
    pytest.importorskip("bitsandbytes")
    q = quantize(str(models.merged("correct")), to=to, out=tmp_path / to, device="cpu").out
    rep = verify(q, models.lora, models.base, device="cpu", record=False, streamed=True, decode=2)
    assert rep.verdict == "PASS", (rep.failures, rep.metrics)
    assert rep.metrics["rel"] > 1e-3  # the quantization error is real
    sr = rep.same_recipe
    assert sr["verdict"] == "PASS" and sr["metrics"]["rel"] <= sr["tolerance"]["rel"]
    assert set(rep.dtypes) == {"reference", "candidate", "same_recipe"}
    # a dropped module: inside the loose 4-bit bounds, far outside the same-recipe ones
    bad = merge(str(drop_module(models.lora, tmp_path / "d", "layers.1.mlp.down_proj")), str(models.base),
                out=tmp_path / "md", device="cpu").out
    qb = quantize(str(bad), to=to, out=tmp_path / f"{to}-bad", device="cpu").out
    rep = verify(qb, models.lora, models.base, device="cpu", record=False, streamed=True, decode=0)
    assert rep.verdict == "FAIL" and rep.same_recipe["verdict"] == "FAIL"
    assert rep.same_recipe["metrics"]["rel"] > 5 * rep.same_recipe["tolerance"]["rel"]


def test_4bit_layers_the_cpu_kernels_cannot_run_are_streamed(models, tmp_path):
    """Hidden size 96: q_proj takes inputs of width 96, which bitsandbytes' CPU kernels end on with
    a raw error (on AVX512-BF16 CPUs); the whole-model path is not tried, streaming is, and says so."""
    pytest.importorskip("bitsandbytes")
    base = build_base(tmp_path / "base", hidden=96)
    ad = build_lora(tmp_path / "a", base)
    m = merge(str(ad), str(base), out=tmp_path / "m", device="cpu").out
    q = quantize(str(m), to="nf4", out=tmp_path / "q", device="cpu").out
    rep = verify(q, ad, base, device="cpu", record=False, decode=0)
    assert rep.streamed and rep.verdict == "PASS", (rep.failures, rep.metrics)
    why = [w for w in rep.warnings if "(--streamed)" in w]
    assert len(why) == 1 and "takes inputs of width 96, not a multiple of the 4-bit block size 64" in why[0], rep.warnings
    # widths the kernels take (hidden size 64) run whole, as before
    q64 = quantize(str(models.merged("correct")), to="nf4", out=tmp_path / "q64", device="cpu").out
    rep = verify(q64, models.lora, models.base, device="cpu", record=False, decode=0)
    assert not rep.streamed and not any("(--streamed)" in w for w in rep.warnings)


# --------------------------------------------------------------------------- bad input


def test_a_missing_layer_is_named(models, tmp_path):
    from safetensors.torch import load_file, save_file

    cand = shutil.copytree(models.merged("correct"), tmp_path / "c")
    f = cand / "model.safetensors"
    t = {k: v for k, v in load_file(str(f)).items() if not k.startswith("model.layers.2.")}
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(InvalidArtifactError, match=r"model\.layers\.2\.input_layernorm\.weight is missing from the candidate"):
        verify(cand, models.lora, models.base, device="cpu", record=False, streamed=True)


def test_a_shape_mismatch_is_named(models, tmp_path):
    from safetensors.torch import load_file, save_file

    cand = shutil.copytree(models.merged("correct"), tmp_path / "c")
    f = cand / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(InvalidArtifactError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is \[96, 64\] in the candidate, \[128, 64\] in the base"):
        verify(cand, models.lora, models.base, device="cpu", record=False, streamed=True)


def test_another_layer_count_is_refused(models, tmp_path):
    deeper = build_base(tmp_path / "deeper", layers=4)
    with pytest.raises(InvalidArtifactError, match="num_hidden_layers 4 vs 3"):
        verify(deeper, models.lora, models.base, device="cpu", record=False, streamed=True)


def test_nonfinite_layer_fails_at_that_layer(models, tmp_path):
    from safetensors.torch import load_file, save_file

    cand = shutil.copytree(models.merged("correct"), tmp_path / "nan")
    f = cand / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(t, str(f), metadata={"format": "pt"})
    rep = verify(cand, models.lora, models.base, device="cpu", record=False, streamed=True, layers=True, decode=2)
    assert rep.verdict == "FAIL" and rep.metrics["rel"] is None
    assert "first in the output of decoder layer 1" in rep.failures[0]
    assert rep.layers["first_divergent"] == 2 and rep.layers["layers"][1]["rel"] < 1e-5
    assert rep.decode["first_divergence"] == [0, 0, 0, 0]  # nothing decoded from non-finite logits


def test_what_streaming_does_not_run_is_refused(models, tmp_path):
    from peft import PromptTuningConfig

    from tests.factories import peft_adapter, tiny_gpt2_base

    pt = peft_adapter(tmp_path / "pt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), base_dir=models.base)
    with pytest.raises(UsageError, match="--streamed applies LoRA, DoRA and IA3"):
        verify(models.merged("correct"), pt, models.base, device="cpu", record=False, streamed=True)
    gpt2 = tiny_gpt2_base(tmp_path / "gpt2")
    from tests.factories import lora_adapter

    ad = lora_adapter(tmp_path / "ga", base_dir=gpt2, target_modules=["c_attn"])
    with pytest.raises(UsageError, match="--streamed runs llama, mistral, qwen2, qwen3 decoders"):
        verify(gpt2, ad, gpt2, device="cpu", record=False, streamed=True)
    with pytest.raises(UsageError, match="two ways of holding the models"):
        verify(models.merged("correct"), models.lora, models.base, streamed=True, sequential=True)


# --------------------------------------------------------------------------- choosing it, and the CLI


def test_streamed_is_chosen_when_the_models_do_not_fit(models, monkeypatch):
    import adapterhub.verify.devices as d

    size = sum(p.stat().st_size for p in models.base.glob("*.safetensors"))
    monkeypatch.setattr(d, "_free_bytes", lambda device: int(1.5 * size))  # one model fits, two do not
    rep = verify(models.merged("correct"), models.lora, models.base, device="cpu", record=False, decode=0)
    assert rep.streamed and rep.verdict == "PASS"
    assert any("one decoder layer at a time (--streamed)" in w for w in rep.warnings)
    monkeypatch.setattr(d, "_free_bytes", lambda device: 100 * size)
    assert not verify(models.merged("correct"), models.lora, models.base, device="cpu", record=False, decode=0).streamed


def test_cli_streamed(models, cli):
    r = cli("verify", models.merged("correct"), "-a", models.lora, "-b", models.base, "--streamed", "--decode", "2",
            "--layers", "--no-record")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "streamed one decoder layer at a time" in r.stdout and "PASS" in r.stdout and "embeddings" in r.stdout
    r = cli("verify", models.merged("correct"), "-a", models.lora, "-b", models.base, "--streamed", "--json", "--no-record")
    rep = json.loads(r.stdout)
    assert r.exit_code == 0 and rep["streamed"] is True and rep["verdict"] == "PASS"


def test_llama3_rope_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers import LlamaConfig

    from adapterhub.verify.decoder import DecoderConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=32,
              max_position_embeddings=256, rope_parameters=rope)
    ours, _ = DecoderConfig.from_config({**kw, "model_type": "llama"}).inv_freq()
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**kw), "cpu")
    assert torch.allclose(ours, theirs, rtol=0, atol=0)
