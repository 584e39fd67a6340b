"""merge --quantize (one pass, no 16-bit copy) and QLoRA merges into dequant(quant(W))."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from safetensors.torch import load_file  # noqa: E402

from adapterhub.converters import quantize as conversions
from adapterhub.converters.formats import bnb
from adapterhub.converters.merge import merge  # noqa: E402
from adapterhub.converters.formats.safetensors_io import TensorSource, file_map  # noqa: E402

from .factories import lora_adapter, tiny_gpt2_base, tiny_llama_base  # noqa: E402


def _all_tensors(d):
    src = TensorSource(file_map(d))
    return {k: src.get(k) for k in src.keys()}


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_merge_quantize_equals_merge_then_quantize(tmp_path, mode):
    base = tiny_llama_base(tmp_path / "base")
    adapter = lora_adapter(tmp_path / "lora", base_dir=base)
    merge(file_map(adapter), file_map(base), tmp_path / "merged", device="cpu")
    conversions.quantize(file_map(tmp_path / "merged"), tmp_path / "two-pass", to=mode, device="cpu")
    rep = merge(file_map(adapter), file_map(base), tmp_path / "one-pass", device="cpu", quantize=mode)
    assert rep.quantized["to"] == mode and rep.quantized["tensors"] == 14  # 2 layers x 7 projections
    one, two = _all_tensors(tmp_path / "one-pass"), _all_tensors(tmp_path / "two-pass")
    assert one.keys() == two.keys()
    for k in one:
        assert torch.equal(one[k], two[k]), k
    cfg = json.loads((tmp_path / "one-pass" / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((tmp_path / "two-pass" / "config.json").read_text())["quantization_config"]
    card = (tmp_path / "one-pass" / "README.md").read_text()
    assert "base_model_relation: merged" in card and f"- {mode}" in card

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "one-pass", device_map="cpu")
    ids = torch.arange(16).reshape(2, 8)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9


def test_merge_quantize_double_quant_loads(tmp_path):
    base = tiny_llama_base(tmp_path / "base")
    adapter = lora_adapter(tmp_path / "lora", base_dir=base)
    merge(file_map(adapter), file_map(base), tmp_path / "out", device="cpu", quantize="nf4", double_quant=True)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8)[None]).logits).all()


def test_merge_quantize_bad_options_fail_before_writing(tmp_path):
    from adapterhub.errors import UsageError

    base = tiny_llama_base(tmp_path / "base")
    adapter = lora_adapter(tmp_path / "lora", base_dir=base)
    with pytest.raises(UsageError):
        merge(file_map(adapter), file_map(base), tmp_path / "out", quantize="int8", double_quant=True)
    assert not (tmp_path / "out").exists()


def test_qlora_dequantized_base_matches_bitsandbytes_for_conv1d(tmp_path):
    """GPT-2 stores Conv1D weights (in, out); transformers quantizes them transposed."""
    base = tiny_gpt2_base(tmp_path / "base")
    # B = 0: the merge changes nothing, so the output is exactly the requantized base.
    adapter = lora_adapter(tmp_path / "lora", base_dir=base, arch="gpt2", target_modules=["c_attn"],
                           init_lora_weights=True, fan_in_fan_out=True)
    rep = merge(file_map(adapter), file_map(base), tmp_path / "m", device="cpu", qlora_base="dequantized")
    assert rep.tensors_requantized > 0
    conversions.quantize(file_map(base), tmp_path / "q", to="nf4", double_quant=True, device="cpu")
    conversions.dequantize(file_map(tmp_path / "q"), tmp_path / "dq", dtype="float32", device="cpu")
    merged = load_file(tmp_path / "m" / "model.safetensors")
    deq = _all_tensors(tmp_path / "dq")
    checked = 0
    for k, v in deq.items():
        if k.endswith(("c_fc.weight", "c_proj.weight", "c_attn.weight")):
            torch.testing.assert_close(merged[k].float(), v.float(), rtol=0, atol=1e-6)
            checked += 1
    assert checked == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 layers
