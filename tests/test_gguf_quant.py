"""GGUF building blocks without llama.cpp: encoders, row order, tokenizer reading, type policy."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import quantize  # noqa: E402

from adapterhub.converters.formats import gguf_arch as ga  # noqa: E402
from adapterhub.converters.formats.gguf_quant import encode  # noqa: E402
from adapterhub.converters.formats.gguf_vocab import SentencePieceModel, pre_tokenizer_family  # noqa: E402
from adapterhub.errors import InvalidArtifactError  # noqa: E402


def _awkward(rows: int = 96, cols: int = 256) -> np.ndarray:
    """Values that exercise the rounding rules: zero blocks, exact halves, tiny and large magnitudes."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((rows, cols)) * 3).astype(np.float32)
    x[0, :32] = 0
    x[1, :32] = np.float32(1e-30)
    x[2] = np.arange(cols, dtype=np.float32) * np.float32(0.5)  # ties after scaling
    x[3, :32] = np.linspace(-127, 127, 32, dtype=np.float32)
    x[4] = np.float32(60000.0)
    return x


@pytest.mark.parametrize("src", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1])
def test_encode_is_byte_identical_to_gguf_numpy_quantizers(src, qtype):
    t = torch.from_numpy(_awkward()).to(getattr(torch, src))
    ours = encode(t, qtype)
    ref = quantize(t.float().numpy(), qtype)
    assert ours.shape == ref.shape
    assert ours.tobytes() == ref.tobytes()


def test_q8_0_in_slabs_matches_whole(monkeypatch):
    from adapterhub.converters.formats import gguf_quant

    t = torch.from_numpy(_awkward(300, 64))
    whole = encode(t, T.Q8_0)
    monkeypatch.setattr(gguf_quant, "_SLAB_ELEMENTS", 64 * 7)  # 7 rows a slab: a ragged last slab
    assert encode(t, T.Q8_0).tobytes() == whole.tobytes()


def test_permute_rows_is_llama_cpps_rotary_order_and_inverts():
    # one head of 8 rows: HF [x0 x1 x2 x3 | y0 y1 y2 y3] -> llama.cpp [x0 y0 x1 y1 x2 y2 x3 y3]
    rows = np.arange(8)[:, None] * np.ones((1, 3))
    assert ga.permute_rows(rows, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    w = np.random.default_rng(1).standard_normal((48, 5))
    for heads in (1, 2, 6):
        assert np.array_equal(ga.unpermute_rows(ga.permute_rows(w, heads), heads), w)
    bias = np.arange(48.0)
    assert np.array_equal(ga.unpermute_rows(ga.permute_rows(bias, 4), 4), bias)
    with pytest.raises(InvalidArtifactError):
        ga.permute_rows(np.zeros((10, 2)), 4)


def test_tensor_types_follow_llama_cpps_converter():
    assert ga.tensor_type("blk.0.attn_norm.weight", (64,), "q8_0") == T.F32
    assert ga.tensor_type("blk.0.attn_q.bias", (64,), "f16") == T.F32
    assert ga.tensor_type("blk.0.attn_q.weight", (64, 64), "q8_0") == T.Q8_0
    assert ga.tensor_type("blk.0.attn_q.weight", (64, 40), "q8_0") == T.F16  # rows are not whole blocks
    assert ga.tensor_type("output.weight", (512, 64), "q4_0") == T.Q8_0
    assert ga.tensor_type("token_embd.weight", (512, 64), "q4_0") == T.Q4_0
    assert ga.tensor_type("blk.0.attn_q.weight.lora_b", (64, 8), "f32") == T.F32
    with pytest.raises(InvalidArtifactError, match="unknown GGUF type"):
        ga.qtype_of("q6_k")


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(InvalidArtifactError) as e:
        ga.arch_of({"architectures": ["GPT2LMHeadModel"]})
    assert "GPT2LMHeadModel" in str(e.value)
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM"):
        assert name in e.value.hint


def test_sentencepiece_model_is_read_as_sentencepiece_reads_it(trained_llama):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(trained_llama / "tokenizer.model"))
    ours = SentencePieceModel.parse((trained_llama / "tokenizer.model").read_bytes())
    assert len(ours.pieces) == sp.get_piece_size()
    for i, (piece, score, ptype) in enumerate(ours.pieces):
        assert piece == sp.id_to_piece(i)
        assert score == pytest.approx(sp.get_score(i))
        kind = 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1
        assert ptype == kind
    assert ours.add_dummy_prefix is True
    with pytest.raises(InvalidArtifactError):
        SentencePieceModel.parse(b"\x0a\x05ab")  # truncated


def test_pre_tokenizer_families(tmp_path):
    from tests.trained_lm import build_bpe_tokenizer

    for family in ("llama-bpe", "qwen2"):
        build_bpe_tokenizer(tmp_path / family, family=family, vocab_size=300)
        tok = json.loads((tmp_path / family / "tokenizer.json").read_text())
        assert pre_tokenizer_family(tok) == family
    assert pre_tokenizer_family({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    odd = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\w+"}}, {"type": "ByteLevel", "use_regex": False}]}}
    assert pre_tokenizer_family(odd) is None
