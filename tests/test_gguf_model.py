"""GGUF models proved in llama.cpp itself (llama-cpp-python), and against llama.cpp's own converter.

Every file written here is loaded by llama.cpp; its logits are compared with
transformers' on the trained fixture (tests/trained_lm.py), per GGUF type;
tokenization is compared for a SentencePiece and two BPE tokenizers; each
supported architecture runs; transformers' GGUF loader reads f32/f16/bf16
back to the source tensors exactly; and our f16 tensors are byte-identical
to those of llama.cpp's ``convert_hf_to_gguf.py`` (run from the
llama-cpp-python sdist that scripts/setup.sh unpacks into .cache/).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, require_all

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the test extra")

from adapterhub.converters.formats.safetensors_io import file_map  # noqa: E402
from adapterhub.converters.gguf import model_to_gguf  # noqa: E402
from adapterhub.verify.gguf import llama_logits, open_llama  # noqa: E402
from tests.trained_lm import build_small_model, sample_texts  # noqa: E402

# (max relative logit error, min mean top-1 agreement) against transformers on
# the trained fixture, sample texts. Measured (llama.cpp): f32 7e-5/1.0,
# f16 2.1e-4/0.996, bf16 1.5e-3/1.0, q8_0 6.0e-3/0.984, q4_0 0.043/0.941,
# q4_1 0.049/0.937, q5_0 0.024/0.971, q5_1 0.024/0.968 (docs/gguf.md).
BOUNDS = {
    "f32": (1e-3, 1.0),
    "f16": (1e-3, 0.98),
    "bf16": (5e-3, 0.98),
    "q8_0": (0.02, 0.96),
    "q4_0": (0.12, 0.88),
    "q4_1": (0.12, 0.88),
    "q5_0": (0.06, 0.93),
    "q5_1": (0.06, 0.93),
}


def peer_dir() -> Path | None:
    """llama.cpp's sources from the llama-cpp-python sdist (scripts/setup.sh puts them in .cache/)."""
    env = os.environ.get("ADAPTERHUB_LLAMA_CPP_SRC")
    cands = [Path(env)] if env else sorted((REPO / ".cache").glob("llama_cpp_python-*/vendor/llama.cpp"))
    found = [c for c in cands if (c / "convert_hf_to_gguf.py").is_file()]
    return found[-1] if found else None


def need_peer() -> Path:
    d = peer_dir()
    if d is None:
        msg = "llama.cpp's converter is not in .cache/ (scripts/setup.sh downloads the llama-cpp-python sdist there)"
        if require_all():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return d


def run_peer(script: str, *args: object) -> None:
    r = subprocess.run([sys.executable, str(need_peer() / script), *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def compare(gguf: Path, model_dir: Path, texts: list[str] | None = None, lora: Path | None = None, ref_model=None):
    """(max relative error, mean top-1 agreement) of llama.cpp's logits against transformers' (or ``ref_model``'s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = ref_model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    llm = open_llama(gguf, lora=lora, n_ctx=256)
    rel, top1 = [], []
    for s in texts or sample_texts():
        ids = tok(s).input_ids
        with torch.no_grad():
            r = ref(torch.tensor([ids])).logits[0].float().numpy()
        got = llama_logits(llm, ids)
        rel.append(float(np.linalg.norm(got - r) / np.linalg.norm(r)))
        top1.append(float((got.argmax(-1) == r.argmax(-1)).mean()))
    return max(rel), float(np.mean(top1))


@pytest.fixture(scope="module")
def exported(trained_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-models")
    out = {}
    for t in BOUNDS:
        out[t] = d / f"model.{t}.gguf"
        model_to_gguf(file_map(trained_llama), out[t], outtype=t)
    return out


@pytest.mark.parametrize("outtype", list(BOUNDS))
def test_every_type_loads_in_llama_cpp_with_transformers_logits(exported, trained_llama, outtype):
    rel, top1 = compare(exported[outtype], trained_llama)
    max_rel, min_top1 = BOUNDS[outtype]
    assert rel <= max_rel and top1 >= min_top1, (outtype, rel, top1)
    llm = open_llama(exported[outtype], vocab_only=True)
    meta = llm.metadata
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "llama"
    assert "[INST]" in meta["tokenizer.chat_template"]


def test_a_wrong_row_order_would_show(exported, trained_llama, tmp_path, monkeypatch):
    """The q/k reordering matters: without it llama.cpp's logits are far off (so the tests above can fail)."""
    from adapterhub.converters.formats import gguf_arch

    monkeypatch.setattr(gguf_arch.Layout, "permute_heads", lambda self, name: None)
    bad = tmp_path / "unpermuted.gguf"
    model_to_gguf(file_map(trained_llama), bad, outtype="f32")
    rel, _ = compare(bad, trained_llama)
    assert rel > 0.05


def test_spm_tokenization_matches_sentencepiece_and_the_hf_tokenizer(exported, trained_llama):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(trained_llama / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(trained_llama)
    llm = open_llama(exported["f16"], vocab_only=True)
    hf_agrees = 0
    for s in sample_texts():
        ours = llm.tokenize(s.encode(), add_bos=True, special=False)
        assert ours == [1, *sp.encode(s)], s
        if hf(s).input_ids == [1, *sp.encode(s)]:
            assert ours == hf(s).input_ids
            hf_agrees += 1
    # transformers' converted tokenizer drops a space before "  Leading ..." where SentencePiece keeps it.
    assert hf_agrees >= len(sample_texts()) - 1


@pytest.mark.parametrize("family", ["llama-bpe", "qwen2"])
def test_bpe_tokenization_matches_the_hf_tokenizer(tmp_path, family):
    from transformers import AutoTokenizer

    src = build_small_model(tmp_path / "m", "llama" if family == "llama-bpe" else "qwen2", tokenizer=family)
    out = tmp_path / "m.gguf"
    rep = model_to_gguf(file_map(src), out, outtype="f16")
    assert rep.tokenizer["kind"] == "bpe" and rep.tokenizer["pre"] == family
    hf = AutoTokenizer.from_pretrained(src)
    llm = open_llama(out, vocab_only=True)
    assert llm.metadata["tokenizer.ggml.pre"] == family
    for s in [*sample_texts(), "<|im_start|>user\nhi<|im_end|>"]:
        assert llm.tokenize(s.encode(), add_bos=True, special=True) == hf(s).input_ids, s


@pytest.mark.parametrize("arch,tok", [("mistral", "spm"), ("qwen2", "qwen2"), ("qwen3", "qwen2"), ("phi3", "spm"), ("llama", "llama-bpe")])
def test_each_architecture_runs_in_llama_cpp(tmp_path, arch, tok):
    src = build_small_model(tmp_path / arch, arch, tokenizer=tok)
    out = tmp_path / f"{arch}.gguf"
    model_to_gguf(file_map(src), out, outtype="f32")
    rel, top1 = compare(out, src)
    assert rel < 1e-3 and top1 == 1.0, (arch, rel, top1)


@pytest.mark.parametrize("dtype,outtype", [("float32", "f32"), ("float16", "f16"), ("bfloat16", "bf16")])
def test_transformers_gguf_loader_reads_the_source_tensors_back_exactly(tmp_path, dtype, outtype):
    from transformers import AutoModelForCausalLM

    src = build_small_model(tmp_path / "m", "llama", dtype=getattr(torch, dtype))
    model_to_gguf(file_map(src), tmp_path / "m.gguf", outtype=outtype)
    want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("arch,tok", [("trained", "spm"), ("qwen2", "spm")])  # the peer knows no custom BPE
def test_f16_tensors_are_byte_identical_to_llama_cpps_converter(trained_llama, tmp_path, arch, tok):
    src = trained_llama if arch == "trained" else build_small_model(tmp_path / arch, arch, tokenizer=tok, dtype=torch.bfloat16)
    ours, peer = tmp_path / "ours.gguf", tmp_path / "peer.gguf"
    model_to_gguf(file_map(src), ours, outtype="f16")
    run_peer("convert_hf_to_gguf.py", src, "--outtype", "f16", "--outfile", peer)
    a, b = _tensors(ours), _tensors(peer)
    assert set(a) == set(b)
    for name in b:
        assert a[name] == b[name], name


def test_modelfile_beside_the_gguf(trained_llama, tmp_path):
    rep = model_to_gguf(file_map(trained_llama), tmp_path / "m.gguf", outtype="q8_0", modelfile=True)
    assert rep.files == ("m.gguf", "Modelfile")
    text = (tmp_path / "Modelfile").read_text()
    assert "FROM ./m.gguf" in text and 'TEMPLATE """' in text and "[INST] {{ .Content }} [/INST]" in text
