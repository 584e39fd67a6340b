"""GGUF building blocks without llama.cpp: encoders, row order, tokenizer reading, type policy.

The encoders run twice: through the C kernel (where it is built) and through
torch (``ADAPTERHUB_NO_NATIVE=1``); both must give the reference's bytes.
tests/test_gguf_native.py tests the kernel on its own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import quantize  # noqa: E402

from adapterhub.converters.formats import gguf_arch as ga  # noqa: E402
from adapterhub.converters.formats import native  # noqa: E402
from adapterhub.converters.formats.gguf_quant import encode  # noqa: E402
from adapterhub.converters.formats.gguf_vocab import SentencePieceModel, pre_tokenizer_family  # noqa: E402
from adapterhub.errors import InvalidArtifactError  # noqa: E402
from tests.test_gguf_native import q8_0_edges  # noqa: E402


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    """The encoding path under test: the C kernel, or torch with the kernel switched off."""
    if request.param == "kernel":
        if not native.built("ggml"):
            pytest.skip("the ggml kernel is not built")
        monkeypatch.delenv("ADAPTERHUB_NO_NATIVE", raising=False)
    else:
        monkeypatch.setenv("ADAPTERHUB_NO_NATIVE", "1")
    return request.param


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
def test_encode_is_byte_identical_to_gguf_numpy_quantizers(path, src, qtype):
    t = torch.from_numpy(_awkward()).to(getattr(torch, src))
    ours = encode(t, qtype)
    ref = quantize(t.float().numpy(), qtype)
    assert ours.shape == ref.shape
    assert ours.tobytes() == ref.tobytes()


def test_q8_0_in_slabs_matches_whole(monkeypatch):
    from adapterhub.converters.formats import gguf_quant

    monkeypatch.setenv("ADAPTERHUB_NO_NATIVE", "1")  # the torch path's slabs
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


def test_q8_0_rounds_half_away_from_zero_at_every_edge(path):
    # A block whose max|x| is 127 has d = 1 and scale 1: each other value is rounded as it is.
    blocks = q8_0_edges()
    ours = encode(torch.from_numpy(blocks), T.Q8_0)
    assert ours.tobytes() == quantize(blocks, T.Q8_0).tobytes()


@pytest.mark.parametrize("sources", ["torch", "numpy"])
@pytest.mark.parametrize("workers", [1, 2])
def test_whole_file_is_byte_identical_to_gguf_writers_own(tmp_path, monkeypatch, path, workers, sources):
    """Our tensor data (slabs into staging buffers, O_DIRECT, threads) against GGUFWriter's own
    ``write_tensors_to_file`` with gguf's numpy quantizers: the same file, byte for byte, with
    buffers and slabs small enough that tensors straddle buffers and split into many slabs.
    Sources are torch tensors (as a merge hands them over) or numpy arrays, bf16 as uint16
    bits (as a checkpoint is read for the kernel)."""
    from adapterhub.converters.formats import gguf_write
    from adapterhub.converters.formats.gguf_write import GGUFFile, OutTensor

    monkeypatch.setattr(gguf_write, "STAGE_BYTES", 4096)
    monkeypatch.setattr(gguf_write, "SLAB_ELEMENTS", 100)
    rng = np.random.default_rng(0)
    tensors = [  # name, float32 values, type, heads whose q/k row order applies
        ("a", (rng.standard_normal((96, 256)) * 3).astype(np.float32), T.Q8_0, None),
        ("b", rng.standard_normal(5).astype(np.float32), T.F32, None),
        ("c", rng.standard_normal((64, 96)).astype(np.float32), T.F16, 4),
        ("d", rng.standard_normal((128, 64)).astype(np.float32), T.Q8_0, 2),
        ("e", rng.standard_normal((33, 64)).astype(np.float32), T.BF16, None),
        ("f", rng.standard_normal((64, 64)).astype(np.float32), T.Q4_0, None),
    ]
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    with GGUFFile(ours, "llama", workers=workers) as f:
        f.writer.add_block_count(2)
        f.writer.add_string("general.note", "x" * 5000)  # a header that ends inside a later block
        f.plan([OutTensor(n, x.shape, q) for n, x, q, _ in tensors])
        for n, x, q, heads in tensors:
            t = torch.from_numpy(x).to(torch.bfloat16) if n == "a" else torch.from_numpy(x)
            if sources == "numpy":
                t = t.view(torch.int16).numpy().view(np.uint16) if n == "a" else x
            f.encode_rows(n, ga.permuted_view(t, heads) if heads else t)
    w = gguf.GGUFWriter(str(ref), "llama")
    w.add_block_count(2)
    w.add_string("general.note", "x" * 5000)
    for n, x, q, heads in tensors:
        if n == "a":
            x = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
        if heads:
            x = np.ascontiguousarray(ga.permute_rows(x, heads))
        if q == T.F32:
            w.add_tensor(n, x)
        elif q == T.F16:
            w.add_tensor(n, x.astype(np.float16))
        else:
            w.add_tensor(n, quantize(x, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert ours.read_bytes() == ref.read_bytes()
