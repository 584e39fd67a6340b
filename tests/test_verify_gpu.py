"""``adapterhub verify`` on a GPU. Run on a CUDA machine: ``pytest -m gpu tests/test_verify_gpu.py``
(scripts/gpu-check.sh does); everywhere else these tests skip."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

pytestmark = pytest.mark.gpu  # skipped without CUDA by conftest


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from adapterhub.convert import merge
    from adapterhub.verify.selftest import build_base, build_lora, wrong_alpha

    root = tmp_path_factory.mktemp("verify-gpu")
    base = build_base(root / "base", dtype="bfloat16")
    lora = build_lora(root / "lora", base)
    merged = merge(str(lora), str(base), out=root / "merged", device="cuda").out
    bad = merge(str(wrong_alpha(lora, root / "bad-lora")), str(base), out=root / "bad", device="cuda").out
    return {"base": base, "lora": lora, "merged": merged, "bad": bad, "root": root}


def test_cuda_verify_passes_and_reports_gpu_memory(models):
    from adapterhub.verify import verify

    rep = verify(models["merged"], models["lora"], models["base"], device="cuda", record=False)
    assert rep.device == "cuda" and rep.dtypes["reference"] == "bfloat16" and rep.format == "bf16"
    assert rep.verdict == "PASS", rep.failures
    assert rep.memory["cuda_max_allocated_mb"] > 0 and rep.batch_size >= 1
    cpu = verify(models["merged"], models["lora"], models["base"], device="cpu", record=False, decode=0)
    assert abs(rep.metrics["rel"] - cpu.metrics["rel"]) < 0.01


def test_cuda_broken_merge_fails(models):
    from adapterhub.verify import verify

    assert verify(models["bad"], models["lora"], models["base"], device="cuda", record=False).verdict == "FAIL"


def test_cuda_sequential_and_layers(models):
    from adapterhub.verify import verify

    rep = verify(models["merged"], models["lora"], models["base"], device="cuda", sequential=True, layers=True, record=False, decode=0)
    assert rep.sequential and rep.verdict == "PASS" and len(rep.layers["layers"]) == 3


@pytest.mark.parametrize("to", ["nf4", "int8"])
def test_cuda_quantized(models, to):
    pytest.importorskip("bitsandbytes")
    from adapterhub.convert import quantize
    from adapterhub.verify import verify

    q = quantize(str(models["merged"]), to=to, out=models["root"] / to, device="cuda").out
    rep = verify(q, models["lora"], models["base"], device="cuda", record=False)
    assert rep.format == to and rep.verdict == "PASS", rep.failures


def test_cuda_too_little_memory_falls_back_or_fails(models, monkeypatch):
    import adapterhub.verify.devices as d
    import adapterhub.verify.run as v
    from adapterhub.errors import UsageError

    monkeypatch.setattr(d, "_free_bytes", lambda device: 1024 if device == "cuda" else 8 << 30)
    rep = v.verify(models["merged"], models["lora"], models["base"], device="auto", record=False, decode=0)
    assert rep.device == "cpu" and any("running on the CPU" in w for w in rep.warnings)
    with pytest.raises(UsageError, match="GPU has"):
        v.verify(models["merged"], models["lora"], models["base"], device="cuda", record=False)


def test_cuda_streamed_agrees_with_whole_models(models):
    """--streamed on the GPU: each module's weights are copied to the device as it runs."""
    from adapterhub.verify import verify

    whole = verify(models["merged"], models["lora"], models["base"], device="cuda", record=False, decode=4)
    streamed = verify(models["merged"], models["lora"], models["base"], device="cuda", record=False, decode=4,
                      streamed=True, layers=True)
    assert streamed.streamed and streamed.device == "cuda" and streamed.verdict == "PASS", streamed.failures
    assert abs(streamed.metrics["rel"] - whole.metrics["rel"]) < 0.01
    assert len(streamed.layers["layers"]) == 3 and streamed.memory["cuda_max_allocated_mb"] > 0
    bad = verify(models["bad"], models["lora"], models["base"], device="cuda", record=False, decode=0, streamed=True)
    assert bad.verdict == "FAIL"
