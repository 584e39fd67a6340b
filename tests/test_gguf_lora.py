"""PEFT LoRA -> GGUF LoRA, and one-pass merges to GGUF, proved in llama.cpp against PEFT.

The GGUF LoRA runs on a GGUF base in llama.cpp (``lora_path``) and its logits
are compared with PEFT's (base + adapter, unmerged) on the trained fixture:
a plain LoRA, and rsLoRA with rank_pattern and alpha_pattern, where
llama.cpp's own converter (run from the sdist, as the peer) gets the scales
wrong. Adapters a GGUF LoRA cannot express are refused with the reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the test extra")

from adapterhub.converters.formats.safetensors_io import file_map  # noqa: E402
from adapterhub.converters.gguf import lora_to_gguf, merge_to_gguf, model_to_gguf  # noqa: E402
from adapterhub.errors import InvalidArtifactError  # noqa: E402
from tests.test_gguf_model import compare, run_peer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(out: Path, base: Path, seed: int = 0, **cfg) -> Path:
    """A PEFT adapter on ``base`` with random, non-zero A and B (a trained adapter's effect, without training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lc = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": TARGETS, "init_lora_weights": False, **cfg})
    peft_model = get_peft_model(model, lc)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(0.3)
    peft_model.save_pretrained(out)
    return out


def peft_model(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()


@pytest.fixture(scope="module")
def base_gguf(trained_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-base") / "base.f32.gguf"
    model_to_gguf(file_map(trained_llama), out, outtype="f32")
    return out


PATTERNS = dict(
    use_rslora=True,
    rank_pattern={"layers.1.self_attn.q_proj": 4, "mlp.down_proj": 12},
    alpha_pattern={"k_proj": 5, "layers.2.mlp.up_proj": 40},
)


@pytest.mark.parametrize("kind", ["plain", "rslora-patterns"])
def test_gguf_lora_in_llama_cpp_matches_peft(trained_llama, base_gguf, tmp_path, kind):
    adapter = make_adapter(tmp_path / "a", trained_llama, **(PATTERNS if kind != "plain" else {}))
    ours, peer = tmp_path / "ours.gguf", tmp_path / "peer.gguf"
    rep = lora_to_gguf(file_map(adapter), file_map(trained_llama), ours)
    ref = peft_model(trained_llama, adapter)
    rel, top1 = compare(base_gguf, trained_llama, lora=ours, ref_model=ref)
    base_rel, _ = compare(base_gguf, trained_llama, ref_model=ref)  # the adapter's own effect
    run_peer("convert_lora_to_gguf.py", adapter, "--base", trained_llama, "--outtype", "f32", "--outfile", peer)
    peer_rel, peer_top1 = compare(base_gguf, trained_llama, lora=peer, ref_model=ref)
    print(f"\n{kind}: ours rel {rel:.3g} top1 {top1:.4f} | llama.cpp's converter rel {peer_rel:.3g} top1 {peer_top1:.4f} "
          f"| base without the adapter rel {base_rel:.3g}")
    assert base_rel > 0.1  # the adapter matters, so agreement is not trivial
    assert rel < 1e-3 and top1 == 1.0, (rel, top1)
    if kind == "plain":
        assert rep.lora["scales_folded_into_b"] == 0
        assert peer_rel < 1e-3  # both right; and the bytes agree:
        from tests.test_gguf_model import _tensors

        assert _tensors(ours) == _tensors(peer)
    else:
        assert rep.lora["scales_folded_into_b"] == rep.lora["modules"]
        assert peer_rel > 100 * rel  # one global alpha/r cannot express rsLoRA and the patterns


def test_embedding_and_lm_head_lora(trained_llama, base_gguf, tmp_path):
    adapter = make_adapter(tmp_path / "a", trained_llama, target_modules=["q_proj", "embed_tokens", "lm_head"], r=4, lora_alpha=8)
    out = tmp_path / "emb.gguf"
    lora_to_gguf(file_map(adapter), file_map(trained_llama), out)
    rel, top1 = compare(base_gguf, trained_llama, lora=out, ref_model=peft_model(trained_llama, adapter))
    assert rel < 1e-3 and top1 == 1.0, (rel, top1)


@pytest.mark.parametrize("outtype,max_rel,min_top1", [("f32", 1e-3, 1.0), ("q8_0", 0.04, 0.96)])
def test_one_pass_merge_to_gguf_matches_peft(trained_llama, tmp_path, outtype, max_rel, min_top1):
    adapter = make_adapter(tmp_path / "a", trained_llama, **PATTERNS)
    out = tmp_path / f"merged.{outtype}.gguf"
    rep = merge_to_gguf(file_map(adapter), file_map(trained_llama), out, outtype=outtype, device="cpu")
    assert rep.source == "merge" and rep.merge["modules_merged"] == 28
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", out.name]  # no 16-bit copy, no temp left
    rel, top1 = compare(out, trained_llama, ref_model=peft_model(trained_llama, adapter))
    assert rel <= max_rel and top1 >= min_top1, (rel, top1)


def _edit_config(adapter: Path, **changes) -> Path:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return adapter


@pytest.mark.parametrize(
    "make,why",
    [
        (lambda d, b: make_adapter(d, b, use_dora=True, target_modules=["q_proj"]), "DoRA"),
        (lambda d, b: make_adapter(d, b, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
        (lambda d, b: _edit_config(make_adapter(d, b, target_modules=["q_proj"]), peft_type="IA3"), "IA3"),
        (lambda d, b: _edit_config(make_adapter(d, b, target_modules=["q_proj"]), peft_type="LOHA"), "LOHA"),
        (lambda d, b: _edit_config(make_adapter(d, b, target_modules=["q_proj"]), peft_type="LOKR"), "LOKR"),
        (lambda d, b: _edit_config(make_adapter(d, b, target_modules=["q_proj"]), peft_type="PROMPT_TUNING"), "PROMPT_TUNING"),
    ],
    ids=["dora", "modules_to_save", "ia3", "loha", "lokr", "prompt-tuning"],
)
def test_what_a_gguf_lora_cannot_express_is_refused_with_the_reason(trained_llama, tmp_path, make, why):
    adapter = make(tmp_path / "a", trained_llama)
    out = tmp_path / "x.gguf"
    with pytest.raises(InvalidArtifactError) as e:
        lora_to_gguf(file_map(adapter), file_map(trained_llama), out)
    assert f"cannot express {why}" in str(e.value)
    if why == "PROMPT_TUNING":
        assert "no weights to convert" in str(e.value)
    else:
        assert "convert ADAPTER --to lora" in e.value.hint
    assert not out.exists() and list(tmp_path.glob("*.incomplete")) == []


def test_adapter_for_another_base_is_refused(trained_llama, tmp_path):
    from tests.trained_lm import build_small_model

    adapter = make_adapter(tmp_path / "a", trained_llama, target_modules=["q_proj"])
    other = build_small_model(tmp_path / "other", "llama", hidden_size=128)
    with pytest.raises(InvalidArtifactError, match="does not fit the base"):
        lora_to_gguf(file_map(adapter), file_map(other), tmp_path / "x.gguf")
    fewer = build_small_model(tmp_path / "fewer", "llama", layers=1, hidden_size=96, intermediate_size=256)
    with pytest.raises(InvalidArtifactError, match="does not have"):
        lora_to_gguf(file_map(adapter), file_map(fewer), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_only_the_bases_config_is_read(trained_llama, base_gguf, tmp_path):
    adapter = make_adapter(tmp_path / "a", trained_llama, target_modules=["v_proj"])
    config_only = tmp_path / "cfg"
    config_only.mkdir()
    shutil.copyfile(trained_llama / "config.json", config_only / "config.json")
    out = tmp_path / "v.gguf"
    lora_to_gguf(file_map(adapter), file_map(config_only), out)
    rel, _ = compare(base_gguf, trained_llama, lora=out, ref_model=peft_model(trained_llama, adapter))
    assert rel < 1e-3
