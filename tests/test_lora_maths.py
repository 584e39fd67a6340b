"""The LoRA merge maths, piece by piece (the PEFT-equivalence suite checks them whole).

Written against the mutants of ``peft_deltas`` and ``peft_plan`` that survived
mutation testing (docs/reliability.md, "Mutation testing"): PEFT's defaults
when a config leaves out ``r`` or ``lora_alpha``, the plain and the in-place
merge paths giving the same bits, and the in-place delta living in the
workspace's ``delta`` buffer that the blocked path releases.
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from adapterhub.converters.formats.peft_deltas import _lora_delta_into, apply_ops, lora_delta  # noqa: E402
from adapterhub.converters.formats.peft_plan import ModuleOp, parse_adapter  # noqa: E402
from adapterhub.converters.formats.safetensors_io import Workspace  # noqa: E402


def _ab(r: int = 4, n_in: int = 16, n_out: int = 32):
    g = torch.Generator().manual_seed(3)
    return torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)


def test_lora_delta_is_b_at_a_times_the_scale_untransposed_by_default():
    A, B = _ab()
    assert torch.equal(lora_delta(A, B, 0.75), (B @ A) * 0.75)
    assert torch.equal(lora_delta(A, B, 0.75, True), ((B @ A) * 0.75).T)


@pytest.mark.parametrize("transpose", [False, True])
def test_in_place_delta_is_the_workspace_delta_buffer(transpose):
    A, B = _ab()
    ws = Workspace()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a wrongly shaped buffer would be resized by matmul, with a warning
        d = _lora_delta_into(ws, (16, 32) if transpose else (32, 16), A, B, 0.75, transpose)
    want = (B @ A) * 0.75
    assert torch.equal(d, want.T if transpose else want)
    assert ws.holds("delta", d)  # the buffer peft_blocked releases after a blocked merge


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_plain_and_in_place_merges_give_the_same_bits(fan_in_fan_out):
    A, B = _ab()
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 32, generator=g) if fan_in_fan_out else torch.randn(32, 16, generator=g)
    tensors = {"a": A, "b": B}
    op = ModuleOp("lora", "m", "weight", {"A": "a", "B": "b"}, 1.5, fan_in_fan_out)
    want = w + (((B @ A).T if fan_in_fan_out else B @ A) * 1.5)
    plain = apply_ops(w, [op], tensors.__getitem__)
    in_place = apply_ops(w, [op], tensors.__getitem__, ws=Workspace())
    assert torch.equal(plain, want) and torch.equal(in_place, want)


@pytest.mark.parametrize(
    "given,scale",
    [({}, 1.0), ({"lora_alpha": 16}, 2.0), ({"r": 8}, 1.0), ({"r": 8, "lora_alpha": 12}, 1.5)],
)
def test_r_and_alpha_default_to_peft_s_when_the_config_leaves_them_out(given, scale):
    """LoraConfig's defaults are r=8 and lora_alpha=8."""
    config = {"peft_type": "LORA", "target_modules": ["q_proj"], **given}
    shapes = {
        "base_model.model.layers.0.q_proj.lora_A.weight": (8, 16),
        "base_model.model.layers.0.q_proj.lora_B.weight": (32, 8),
    }
    (op,) = parse_adapter(config, shapes).ops
    assert op.kind == "lora" and op.scale == scale
