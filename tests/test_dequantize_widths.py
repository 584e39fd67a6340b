"""4-bit weights whose input width is not a multiple of the block size (64), dequantized on the CPU.

bitsandbytes stores a 4-bit weight as one flat run of blocks of 64 values,
which cross row boundaries when a row is not a whole number of blocks. Its
CPU ``dequantize_4bit``, given the 2-D shape, reads every row as if it began
a block, and a 96x96 NF4 weight comes back with a relative error of about
0.27 instead of 0.09. ``adapterhub dequantize`` and ``merge --qlora-base
dequantized`` must give the weights as bitsandbytes stored them: the flat
dequantization, shaped. Models here have widths 96 (not a multiple of 64) and
192 (a multiple), so both kinds of layer are checked.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
F = pytest.importorskip("bitsandbytes.functional")

from adapterhub.converters import quantize as conversions  # noqa: E402
from adapterhub.converters.formats import bnb_quant  # noqa: E402
from adapterhub.converters.formats.qlora import QuantSpec, quantize_roundtrip  # noqa: E402
from adapterhub.converters.formats.safetensors_io import TensorSource, file_map  # noqa: E402
from adapterhub.converters.merge import merge  # noqa: E402

from .factories import lora_adapter, patch_json, tiny_llama_base  # noqa: E402

#: Largest relative error ||dequant(quant(W)) - W|| / ||W|| of Gaussian-like
#: weights (measured: NF4 0.093, FP4 0.123; the row-wise misreading gives 0.24 to 0.29).
BOUND = {"nf4": 0.11, "fp4": 0.14}
RECIPES = [(mode, dq) for mode in ("nf4", "fp4") for dq in (False, True)]
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return float((got - want).norm() / want.norm())


def _flat_reference(W: torch.Tensor, mode: str, double_quant: bool) -> torch.Tensor:
    """bitsandbytes quantizes ``W`` and dequantizes it as one flat row (its blocks' own order), shaped."""
    packed, state = F.quantize_4bit(W.contiguous(), blocksize=64, compress_statistics=double_quant, quant_type=mode)
    flat = copy.deepcopy(state)
    flat.shape = torch.Size([W.numel()])
    return F.dequantize_4bit(packed, flat).reshape(W.shape)


def _base(tmp_path: Path) -> Path:
    # q_proj 96x96, k/v_proj 48x96, o_proj 96x96, gate/up_proj 192x96: input width 96;
    # down_proj 96x192: input width 192, which bitsandbytes' CPU kernel gets right.
    return tiny_llama_base(tmp_path / "base", hidden_size=96, intermediate_size=192, layers=1, vocab=64)


@pytest.mark.parametrize("shape", [(96, 96), (192, 96), (96, 192), (48, 160)])
@pytest.mark.parametrize("mode,double_quant", RECIPES)
def test_dequantize_weight_reads_blocks_across_rows(shape, mode, double_quant):
    torch.manual_seed(0)
    W = torch.randn(*shape)
    out = bnb_quant.quantize_weight("m", W, mode, double_quant=double_quant)
    got = bnb_quant.dequantize_weight({k[2:]: v for k, v in out.items()}, module="m")
    assert got.shape == W.shape and got.dtype == W.dtype
    assert torch.equal(got, _flat_reference(W, mode, double_quant))
    assert _rel(got, W) < BOUND[mode], _rel(got, W)


@pytest.mark.parametrize("mode,double_quant", RECIPES)
def test_quantize_dequantize_round_trip_of_a_width_96_model(tmp_path, mode, double_quant):
    """`adapterhub dequantize` of a CPU-quantized model: every linear weight as bitsandbytes stored it."""
    base = _base(tmp_path)
    conversions.quantize(file_map(base), tmp_path / "q", to=mode, double_quant=double_quant, device="cpu")
    rep = conversions.dequantize(file_map(tmp_path / "q"), tmp_path / "dq", dtype="auto", device="cpu")
    assert len(rep.modules_dequantized) == 7
    orig, deq = TensorSource(file_map(base)), TensorSource(file_map(tmp_path / "dq"))
    for p in LINEAR:
        name = f"model.layers.0.{'mlp' if p.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{p}.weight"
        W, got = orig.get(name), deq.get(name)
        assert got.shape == W.shape and got.dtype == W.dtype, name
        assert torch.equal(got, _flat_reference(W, mode, double_quant)), name
        assert _rel(got, W) < BOUND[mode], (name, _rel(got, W))


@pytest.mark.parametrize("mode,double_quant", RECIPES)
def test_qlora_dequantized_base_of_a_width_96_model(tmp_path, mode, double_quant):
    """merge --qlora-base dequantized merges into dequant(quant(W)) as bitsandbytes stores it."""
    base = _base(tmp_path)
    # B = 0: the merge changes nothing, so the output is exactly the requantized base.
    ad = lora_adapter(tmp_path / "lora", base_dir=base, target_modules=["v_proj"], init_lora_weights=True)
    patch_json(ad / "adapter_config.json", quantization_config={
        "load_in_4bit": True, "bnb_4bit_quant_type": mode, "bnb_4bit_use_double_quant": double_quant,
    })
    rep = merge(file_map(ad), file_map(base), tmp_path / "m", device="cpu", qlora_base="dequantized")
    assert rep.tensors_requantized == 7
    assert rep.qlora is not None and (rep.qlora["quant_type"], rep.qlora["double_quant"]) == (mode, double_quant)
    orig, merged = TensorSource(file_map(base)), TensorSource(file_map(tmp_path / "m"))
    for p in LINEAR:
        name = f"model.layers.0.{'mlp' if p.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{p}.weight"
        W, got = orig.get(name), merged.get(name)
        assert torch.equal(got, _flat_reference(W, mode, double_quant)), name
        assert _rel(got, W) < BOUND[mode], (name, _rel(got, W))


@pytest.mark.parametrize("mode,double_quant", RECIPES)
def test_quantize_roundtrip_of_width_96(mode, double_quant):
    torch.manual_seed(1)
    W = torch.randn(96, 96, dtype=torch.bfloat16)
    got = quantize_roundtrip(W, QuantSpec(mode, 64, double_quant))
    assert got.shape == W.shape and got.dtype == W.dtype
    assert torch.equal(got, _flat_reference(W, mode, double_quant))
    assert _rel(got, W) < BOUND[mode], _rel(got, W)
