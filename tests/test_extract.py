"""LoRA extraction from merged or fine-tuned weights, and any adapter to LoRA.

The reference is always a real client: transformers runs MODEL, PEFT runs
BASE + the extracted LoRA, and their float32 logits are compared.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests import factories as F

REL = 1e-4
PROMPTS = [[1, 5, 9, 33, 2, 100, 7, 300, 41, 12, 600, 3], [1, 250, 251, 252, 19, 88]]
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.trained_lm import trained_llama_dir

    dst = tmp_path_factory.mktemp("trained") / "llama"
    shutil.copytree(trained_llama_dir(), dst)
    return dst


def logits(model_dir: Path, adapter: Path | None = None) -> list:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0] for p in PROMPTS]


def rel(a: list, b: list) -> float:
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))


def weights_size(d: Path) -> int:
    return os.path.getsize(d / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def merged_lora(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(adapter, merged model): a rank-8 LoRA on all seven projections, merged in float32."""
    from adapterhub.convert import merge

    root = tmp_path_factory.mktemp("merged")
    adapter = F.lora_adapter(root / "lora", base_dir=llama, r=8, alpha=16, target_modules=ALL7)
    merge(str(adapter), str(llama), out=root / "merged", device="cpu")
    return adapter, root / "merged"


@pytest.mark.parametrize("svd", ["randomized", "exact"])
def test_true_rank_reproduces_the_merge(llama: Path, merged_lora: tuple[Path, Path], tmp_path: Path, svd: str) -> None:
    from adapterhub.convert.extract import extract

    adapter, merged = merged_lora
    res = extract(merged, base=llama, rank=8, svd=svd, out=tmp_path / "x")
    rep = res.report.to_dict()
    assert rep["ranks"] == {8: 4 * 7} and rep["tensors_unchanged"] > 0 and rep["modules_to_save"] == []
    assert rep["max_rel_error"] < 1e-5
    assert rel(logits(llama, tmp_path / "x"), logits(merged)) <= REL
    assert weights_size(tmp_path / "x") <= 1.5 * weights_size(adapter)
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(["self_attn." + m for m in ALL7[:4]] + ["mlp." + m for m in ALL7[4:]])
    assert cfg["rank_pattern"] == {} and cfg["lora_alpha"] == cfg["r"] == 8
    # Unchanged tensors are never copied: only LoRA factors of the seven projections.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "x" / "adapter_model.safetensors"), "pt") as f:
        assert all(".lora_A." in k or ".lora_B." in k for k in f.keys()) and len(list(f.keys())) == 2 * 4 * 7
    report = json.loads((tmp_path / "x" / "extraction_report.json").read_text())
    assert {"module", "rank", "kept_energy", "rel_error"} <= set(report["modules"][0])


def test_energy_picks_ranks_per_module(llama: Path, merged_lora: tuple[Path, Path], tmp_path: Path) -> None:
    from adapterhub.convert.extract import extract

    _, merged = merged_lora
    res = extract(merged, base=llama, energy=0.9, out=tmp_path / "x")
    rep = res.report.to_dict()
    ranks = {m["module"]: m["rank"] for m in rep["modules"]}
    assert all(1 <= r <= 8 for r in ranks.values()) and len(set(ranks.values())) > 1
    assert all(m["kept_energy"] >= 0.9 - 1e-6 for m in rep["modules"])
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"] == cfg["rank_pattern"]
    assert {**{m: cfg["r"] for m in ranks}, **cfg["rank_pattern"]} == ranks
    # PEFT applies exactly what the report says: its logits sit between base and MODEL.
    assert rel(logits(llama, tmp_path / "x"), logits(merged)) < rel(logits(llama), logits(merged))


def test_target_limits_the_modules(llama: Path, merged_lora: tuple[Path, Path], tmp_path: Path) -> None:
    from adapterhub.convert.extract import extract

    _, merged = merged_lora
    res = extract(merged, base=llama, rank=8, targets=["q_proj", "v_proj"], out=tmp_path / "x")
    rep = res.report.to_dict()
    assert {m["module"].rsplit(".", 1)[1] for m in rep["modules"]} == {"q_proj", "v_proj"}
    assert len(rep["ignored"]) == 4 * 5 and rep["warnings"]


def test_dora_merge_states_the_error_at_each_rank(llama: Path, tmp_path: Path) -> None:
    """A DoRA merge is not low-rank: the report gives the error at every rank tried."""
    from adapterhub.convert import merge
    from adapterhub.convert.extract import extract
    from tests.test_mlx import _perturb_magnitudes

    dora = F.lora_adapter(tmp_path / "dora", base_dir=llama, r=4, alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True)
    _perturb_magnitudes(dora)
    merge(str(dora), str(llama), out=tmp_path / "merged", device="cpu")
    errors = {}
    for r in (2, 4, 16):
        res = extract(tmp_path / "merged", base=llama, rank=r, out=tmp_path / f"x{r}")
        rep = res.report.to_dict()
        errors[r] = rep["max_rel_error"]
        first = rep["modules"][0]
        assert str(r) in first["errors_by_rank"] and first["errors_by_rank"][str(r)] == pytest.approx(first["rel_error"], rel=1e-3)
        assert "1" in first["errors_by_rank"]
    assert errors[2] > errors[4] > errors[16] > 1e-3  # the magnitude's row scaling is full rank
    exact = extract(tmp_path / "merged", base=llama, rank=96, svd="exact", out=tmp_path / "full")
    assert exact.report.max_rel_error < 1e-5


def test_changed_embeddings_and_norms(llama: Path, tmp_path: Path) -> None:
    """A full fine-tune that touched the embeddings and a norm: embedding LoRA + modules_to_save."""
    import torch
    from safetensors.torch import load_file, save_file

    from adapterhub.convert.extract import extract

    model = tmp_path / "ft"
    shutil.copytree(llama, model)
    p = model / "model.safetensors"
    sd = load_file(p)
    g = torch.Generator().manual_seed(0)
    E = sd["model.embed_tokens.weight"]
    sd["model.embed_tokens.weight"] = E + 0.05 * torch.randn(E.shape[0], 3, generator=g) @ torch.randn(3, E.shape[1], generator=g)
    W = sd["model.layers.1.self_attn.o_proj.weight"]
    sd["model.layers.1.self_attn.o_proj.weight"] = W + 0.05 * torch.randn(W.shape[0], 2, generator=g) @ torch.randn(2, W.shape[1], generator=g)
    sd["model.norm.weight"] = sd["model.norm.weight"] * 1.1
    save_file(sd, p, metadata={"format": "pt"})
    res = extract(model, base=llama, rank=4, out=tmp_path / "x")
    rep = res.report.to_dict()
    kinds = {m["module"]: m["kind"] for m in rep["modules"]}
    assert kinds == {"model.embed_tokens": "embedding", "model.layers.1.self_attn.o_proj": "linear"}
    assert rep["modules_to_save"] == ["model.norm"]
    assert rel(logits(llama, tmp_path / "x"), logits(model)) <= REL


# --------------------------------------------------------------------------- any adapter -> LoRA


def _adapters(llama: Path, root: Path) -> dict[str, tuple[Path, int | None]]:
    """(adapter, the rank at which its delta is exact; None: full rank, asked as --energy 1)."""
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, VeraConfig

    t = ["q_proj", "v_proj"]
    made = {
        "IA3": (F.peft_adapter(root / "ia3", IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False), base_dir=llama), None),
        "LOHA": (F.peft_adapter(root / "loha", LoHaConfig(r=2, target_modules=t, init_weights=False), base_dir=llama), 4),
        "LOKR": (F.peft_adapter(root / "lokr", LoKrConfig(r=2, target_modules=t, init_weights=False), base_dir=llama), None),
        "ADALORA": (F.peft_adapter(root / "adalora", AdaLoraConfig(init_r=4, target_r=4, target_modules=t, total_step=10, init_lora_weights=False), base_dir=llama), 4),
        "VERA": (F.peft_adapter(root / "vera", VeraConfig(r=8, target_modules=["q_proj"], init_weights=False, save_projection=True), base_dir=llama), 8),
    }
    return made


def test_any_adapter_to_lora(llama: Path, tmp_path: Path) -> None:
    from adapterhub.convert.extract import to_lora

    for method, (adapter, exact_rank) in _adapters(llama, tmp_path).items():
        want = logits(llama, adapter)
        how = {"rank": exact_rank} if exact_rank else {"energy": 1.0}
        res = to_lora(adapter, base=llama, out=tmp_path / f"{method}-exact", **how)
        rep = res.report.to_dict()
        assert rep["method"] == method
        assert rep["max_rel_error"] < 1e-4, method
        assert rel(logits(llama, tmp_path / f"{method}-exact"), want) <= REL, method
        low = to_lora(adapter, base=llama, rank=1, out=tmp_path / f"{method}-r1").report.to_dict()
        assert all("rel_error" in m for m in low["modules"])


def test_dora_to_lora_reports_the_error(llama: Path, tmp_path: Path) -> None:
    from adapterhub.convert.extract import to_lora

    dora = F.lora_adapter(tmp_path / "dora", base_dir=llama, r=4, alpha=8, target_modules=["q_proj"], use_dora=True)
    from tests.test_mlx import _perturb_magnitudes

    _perturb_magnitudes(dora)
    low = to_lora(dora, base=llama, rank=4, out=tmp_path / "r4").report
    high = to_lora(dora, base=llama, rank=96, out=tmp_path / "r96").report
    assert low.method == "DORA" and low.max_rel_error > 1e-3 and high.max_rel_error < 1e-5
    assert rel(logits(llama, tmp_path / "r96"), logits(llama, dora)) <= REL


# --------------------------------------------------------------------------- bad input


def test_bad_input(llama: Path, merged_lora: tuple[Path, Path], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from adapterhub.convert.extract import extract
    from adapterhub.errors import InvalidArtifactError, UsageError

    _, merged = merged_lora
    out = tmp_path / "out"
    other = F.tiny_llama_base(tmp_path / "other", hidden_size=64, layers=4, vocab=768)
    with pytest.raises(InvalidArtifactError, match="another architecture|another shape") as e:
        extract(merged, base=other, rank=4, out=out)
    assert e.value.exit_code == 4
    with pytest.raises(UsageError, match="larger than") as e:
        extract(merged, base=llama, rank=97, out=out)
    assert e.value.exit_code == 2
    with pytest.raises(InvalidArtifactError, match="nothing to extract"):
        extract(llama, base=llama, rank=4, out=out)
    bad = tmp_path / "nan"
    shutil.copytree(merged, bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    sd = load_file(shard)
    k = next(k for k in sd if k.endswith("q_proj.weight"))
    sd[k][0, 0] = float("inf")
    save_file(sd, shard, metadata={"format": "pt"})
    with pytest.raises(InvalidArtifactError, match="non-finite"):
        extract(bad, base=llama, rank=4, out=out)
    with pytest.raises(UsageError, match="exactly one"):
        extract(merged, base=llama, out=out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging dir left behind
    assert torch.isinf(load_file(shard)[k]).any()


def test_push_lineage_extracted_from(llama: Path, merged_lora: tuple[Path, Path]) -> None:
    from adapterhub.convert.extract import extract
    from adapterhub.registry import Registry

    _, merged = merged_lora
    reg = Registry()
    m = reg.push(merged, "team/merged")
    b = reg.push(llama, "team/base")
    res = extract("team/merged:1", base="team/base:1", rank=8, push="team/extracted", registry=reg)
    rels = {(p["digest"], p["relation"]) for p in reg.index.parents(res.pushed.digest)}
    assert rels == {(m.digest, "extracted_from"), (b.digest, "base")}
    info = reg.resolve(res.pushed.ref)
    assert info.digest == res.pushed.digest


def test_cli_extract_exit_codes(cli, llama: Path, merged_lora: tuple[Path, Path], tmp_path: Path) -> None:
    _, merged = merged_lora
    r = cli("extract", merged, "--base", llama, "--rank", 8, "-o", tmp_path / "x", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)["report"]
    assert rep["ranks"] == {"8": 28} and rep["max_rel_error"] < 1e-5
    assert cli("extract", llama, "--base", llama, "--rank", 8, "-o", tmp_path / "y").exit_code == 4
    assert cli("extract", merged, "--base", llama, "--rank", 500, "-o", tmp_path / "y").exit_code == 2
    assert cli("extract", merged, "--base", llama, "--rank", 8, "-o", tmp_path / "x").exit_code == 5  # OUT exists
    assert cli("extract", merged, "--base", llama, "--rank", 8, "-o", llama / "sub").exit_code != 0  # OUT inside an input
    assert not (tmp_path / "y").exists() and not (llama / "sub").exists()


def test_cli_convert_to_lora(cli, llama: Path, tmp_path: Path) -> None:
    dora = F.lora_adapter(tmp_path / "dora", base_dir=llama, r=4, target_modules=["q_proj"], use_dora=True)
    r = cli("convert", dora, "--to", "lora", "--base", llama, "--energy", "0.999", "-o", tmp_path / "x", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)["report"]
    assert rep["method"] == "DORA" and rep["energy"] == 0.999
    assert cli("convert", dora, "--to", "lora", "--base", llama, "-o", tmp_path / "y").exit_code == 2  # no --rank/--energy
    assert not (tmp_path / "y").exists()


def test_tied_embeddings_change_the_head_too(tmp_path: Path) -> None:
    """Tied checkpoints: the embedding LoRA and an lm_head LoRA with the same factors."""
    import torch
    from safetensors.torch import load_file, save_file

    from adapterhub.convert.extract import extract

    base = F.tiny_llama_base(tmp_path / "base", hidden_size=64, layers=2, vocab=768, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(base / "model.safetensors")
    model = tmp_path / "ft"
    shutil.copytree(base, model)
    sd = load_file(model / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    E = sd["model.embed_tokens.weight"]
    sd["model.embed_tokens.weight"] = E + 0.1 * torch.randn(E.shape[0], 2, generator=g) @ torch.randn(2, E.shape[1], generator=g)
    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    res = extract(model, base=base, rank=2, out=tmp_path / "x")
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"model.embed_tokens", "lm_head"}
    assert res.report.max_rel_error < 1e-5
    assert rel(logits(base, tmp_path / "x"), logits(model)) <= REL
