"""verify with an extracted or converted adapter as the candidate."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests import factories as F


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.trained_lm import trained_llama_dir

    dst = tmp_path_factory.mktemp("trained") / "llama"
    shutil.copytree(trained_llama_dir(), dst)
    return dst


@pytest.fixture(scope="module")
def merged(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from adapterhub.convert import merge

    root = tmp_path_factory.mktemp("m")
    adapter = F.lora_adapter(root / "lora", base_dir=llama, r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    merge(str(adapter), str(llama), out=root / "merged", device="cpu")
    return adapter, root / "merged"


def test_extracted_adapter_against_the_model(llama: Path, merged: tuple[Path, Path], tmp_path: Path) -> None:
    from adapterhub.convert.extract import extract
    from adapterhub.verify import verify

    _, model = merged
    extract(model, base=llama, rank=8, out=tmp_path / "x8")
    rep = verify(tmp_path / "x8", model, llama, device="cpu", decode=0)
    assert rep.verdict == "PASS" and rep.metrics["rel"] < 1e-4
    extract(model, base=llama, rank=1, out=tmp_path / "x1")
    low = verify(tmp_path / "x1", model, llama, device="cpu", decode=0)
    assert low.verdict == "FAIL" and low.metrics["rel"] > 1e-3  # a truncated extraction is told apart
    stated = verify(tmp_path / "x1", model, llama, device="cpu", decode=0, tolerance=[f"rel={low.metrics['rel'] * 2}", "cos=0", "kl=10", "top1=0", "topk=0"])
    assert stated.verdict == "PASS"


def test_converted_adapter_against_the_original(llama: Path, tmp_path: Path) -> None:
    from peft import LoHaConfig

    from adapterhub.convert.extract import to_lora
    from adapterhub.verify import verify

    loha = F.peft_adapter(tmp_path / "loha", LoHaConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False), base_dir=llama)
    to_lora(loha, base=llama, rank=4, out=tmp_path / "lora")
    rep = verify(tmp_path / "lora", loha, llama, device="cpu", decode=0)
    assert rep.verdict == "PASS", rep.failures


def test_registry_lineage_names_the_reference(llama: Path, merged: tuple[Path, Path]) -> None:
    from adapterhub.convert.extract import extract
    from adapterhub.registry import Registry
    from adapterhub.verify import verify

    _, model = merged
    reg = Registry()
    reg.push(model, "team/merged")
    reg.push(llama, "team/base")
    res = extract("team/merged:1", base="team/base:1", rank=8, push="team/x", registry=reg)
    rep = verify(res.pushed.ref, registry=reg, device="cpu", decode=0)
    assert rep.verdict == "PASS" and rep.recorded
