"""PEFT <-> mlx-lm adapters, proved with the real clients on a small trained Llama.

mlx-lm loads the Hugging Face directory itself (``mlx_lm.load(dir,
adapter_path=...)``) and its logits are compared with PEFT's in float32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests import factories as F

mx = pytest.importorskip("mlx.core", reason="mlx[cpu] is in the test extra")
pytest.importorskip("mlx_lm", reason="mlx-lm is in the test extra")

REL = 1e-4
PROMPTS = [[1, 5, 9, 33, 2, 100, 7, 300, 41, 12, 600, 3], [1, 250, 251, 252, 19, 88]]
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared trained Llama (SentencePiece tokenizer, fp32), copied so that nothing can change the cache."""
    from tests.trained_lm import trained_llama_dir

    dst = tmp_path_factory.mktemp("trained") / "llama"
    shutil.copytree(trained_llama_dir(), dst)
    return dst


def peft_logits(base: Path, adapter: Path | None) -> list:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0] for p in PROMPTS]


def mlx_logits(model) -> list:
    import numpy as np
    import torch

    return [torch.from_numpy(np.array(model(mx.array([p]))[0].astype(mx.float32))) for p in PROMPTS]


def mlx_load(base: Path, adapter: Path | None):
    import mlx_lm

    model, _tok = mlx_lm.load(str(base), adapter_path=str(adapter) if adapter else None)
    return model


def rel(a: list, b: list) -> float:
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))


def _perturb_magnitudes(adapter: Path, seed: int = 3) -> None:
    """A DoRA adapter as training leaves it: magnitudes away from the base's row norms."""
    import torch
    from safetensors.torch import load_file, save_file

    p = adapter / "adapter_model.safetensors"
    sd = load_file(p)
    g = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if k.endswith("lora_magnitude_vector"):
            sd[k] = v * (1 + 0.2 * torch.rand(v.shape, generator=g))
    save_file(sd, p)


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param({"r": 8, "alpha": 16, "target_modules": ALL7}, id="lora-all7"),
        pytest.param(
            {
                "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": True,
                "rank_pattern": {"layers.1.self_attn.q_proj": 12, "down_proj": 6}, "alpha_pattern": {"v_proj": 3.0},
            },
            id="rslora-patterns",
        ),
    ],
)
def test_peft_to_mlx_matches_peft_logits(llama: Path, tmp_path: Path, kw: dict) -> None:
    from adapterhub.convert.mlx import to_mlx

    adapter = F.lora_adapter(tmp_path / "lora", base_dir=llama, **kw)
    res = to_mlx(adapter, base=llama, out=tmp_path / "mlx")
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["lora_parameters"]["rank"] == max(
        [kw["r"], *kw.get("rank_pattern", {}).values()]
    )
    ref = peft_logits(llama, adapter)
    assert rel(peft_logits(llama, None), ref) > 0.01  # the adapter changes the output
    assert rel(mlx_logits(mlx_load(llama, tmp_path / "mlx")), ref) <= REL
    assert res.report.to_dict()["checked_against_base"] is True


def test_peft_dora_to_mlx_dora_layers(llama: Path, tmp_path: Path) -> None:
    from adapterhub.convert.mlx import to_mlx

    adapter = F.lora_adapter(tmp_path / "dora", base_dir=llama, r=4, alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True)
    _perturb_magnitudes(adapter)
    to_mlx(adapter, base=llama, out=tmp_path / "mlx")
    assert json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    assert rel(mlx_logits(mlx_load(llama, tmp_path / "mlx")), peft_logits(llama, adapter)) <= REL


def _mlx_trained_adapter(llama: Path, out: Path, *, num_layers: int, rank: int, scale: float, dora: bool = False) -> object:
    """An adapter made by mlx-lm's own tooling: LoRA layers, then its trainable parameters saved."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = mlx_load(llama, None)
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0}
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    mx.random.seed(7)
    # Training would move lora_b away from zero (and m for DoRA): do it at random.
    updates = [
        (k, mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else v * (1 + 0.1 * mx.random.uniform(shape=v.shape)) if k.endswith(".m") else v)
        for k, v in tree_flatten(model.trainable_parameters())
    ]
    model.load_weights(updates, strict=False)
    trained = dict(tree_flatten(model.trainable_parameters()))
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), trained)
    (out / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "dora" if dora else "lora", "num_layers": num_layers, "lora_parameters": params, "model": str(llama)})
    )
    assert isinstance(model, nn.Module)
    return model


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_mlx_tooling_adapter_to_peft(llama: Path, tmp_path: Path, dora: bool) -> None:
    from adapterhub.convert.mlx import to_peft

    model = _mlx_trained_adapter(llama, tmp_path / "mlx", num_layers=2, rank=4, scale=10.0, dora=dora)
    want = mlx_logits(model)
    res = to_peft(tmp_path / "mlx", base=llama, out=tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is dora and cfg["r"] == 4 and cfg["lora_alpha"] == 40.0
    # Only the last two blocks were adapted: full module paths, never every q_proj.
    assert all(".layers.2." in t or ".layers.3." in t for t in cfg["target_modules"])
    assert rel(peft_logits(llama, tmp_path / "peft"), want) <= REL
    assert rel(mlx_logits(mlx_load(llama, tmp_path / "mlx")), want) <= 1e-6  # mlx-lm reads back its own adapter
    assert res.report.to_dict()["modules"] == 2 * 7


def test_round_trip_keeps_ranks_and_bytes(llama: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from adapterhub.convert.mlx import to_mlx, to_peft

    adapter = F.lora_adapter(tmp_path / "lora", base_dir=llama, r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                             rank_pattern={"v_proj": 2})
    to_mlx(adapter, out=tmp_path / "mlx")
    to_peft(tmp_path / "mlx", base=llama, out=tmp_path / "back")
    a, b = load_file(adapter / "adapter_model.safetensors"), load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["self_attn.q_proj", "self_attn.v_proj"]  # every block: the short names
    assert rel(peft_logits(llama, tmp_path / "back"), peft_logits(llama, adapter)) <= REL


# --------------------------------------------------------------------------- refusals and bad input


def test_refuses_what_mlx_cannot_express(llama: Path, tmp_path: Path) -> None:
    from peft import IA3Config, LoraConfig

    from adapterhub.convert.mlx import to_mlx
    from adapterhub.errors import InvalidArtifactError

    ia3 = F.peft_adapter(tmp_path / "ia3", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), base_dir=llama)
    with pytest.raises(InvalidArtifactError, match="LoRA and DoRA layers only") as e:
        to_mlx(ia3, out=tmp_path / "o1")
    assert "--to lora" in (e.value.hint or "")
    mts = F.peft_adapter(tmp_path / "mts", LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["model.norm"]), base_dir=llama)
    with pytest.raises(InvalidArtifactError, match="modules_to_save"):
        to_mlx(mts, out=tmp_path / "o2")
    emb = F.lora_adapter(tmp_path / "emb", base_dir=llama, r=2, target_modules=["embed_tokens"], use_dora=True)
    with pytest.raises(InvalidArtifactError, match="DoRA embedding"):
        to_mlx(emb, base=llama, out=tmp_path / "o3")
    assert not any(p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir())


def test_embedding_lora_goes_to_mlx_on_untied_base(llama: Path, tmp_path: Path) -> None:
    from adapterhub.convert.mlx import to_mlx
    from adapterhub.errors import InvalidArtifactError

    adapter = F.lora_adapter(tmp_path / "emb", base_dir=llama, r=4, target_modules=["embed_tokens", "q_proj", "lm_head"])
    with pytest.raises(InvalidArtifactError) as e:
        to_mlx(adapter, out=tmp_path / "nobase")
    assert e.value.hint == "pass --base BASE"
    to_mlx(adapter, base=llama, out=tmp_path / "mlx")
    keys = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["lora_parameters"]["keys"]
    assert {"model.embed_tokens", "lm_head", "model.layers.0.self_attn.q_proj"} <= set(keys)  # full paths
    assert rel(mlx_logits(mlx_load(llama, tmp_path / "mlx")), peft_logits(llama, adapter)) <= REL


def test_mlx_keys_not_in_base(llama: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    from adapterhub.convert.mlx import to_peft
    from adapterhub.errors import InvalidArtifactError

    _mlx_trained_adapter(llama, tmp_path / "mlx", num_layers=1, rank=2, scale=4.0)
    sd = load_file(tmp_path / "mlx" / "adapters.safetensors")
    sd = {k.replace("layers.3.", "layers.9."): v for k, v in sd.items()}
    save_file(sd, tmp_path / "mlx" / "adapters.safetensors")
    with pytest.raises(InvalidArtifactError, match=r"layers\.9\..*not|no module model\.layers\.9") as e:
        to_peft(tmp_path / "mlx", base=llama, out=tmp_path / "peft")
    assert e.value.exit_code == 4
    assert not (tmp_path / "peft").exists()
    other = F.tiny_llama_base(tmp_path / "other", hidden_size=64, layers=4, vocab=768)
    sd = {k.replace("layers.9.", "layers.3."): v for k, v in sd.items()}
    save_file(sd, tmp_path / "mlx" / "adapters.safetensors")
    with pytest.raises(InvalidArtifactError, match="the base has"):
        to_peft(tmp_path / "mlx", base=other, out=tmp_path / "peft")


def test_non_finite_adapter_refused(llama: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from adapterhub.convert.mlx import to_mlx
    from adapterhub.errors import InvalidArtifactError

    adapter = F.lora_adapter(tmp_path / "lora", base_dir=llama, r=2, target_modules=["q_proj"])
    p = adapter / "adapter_model.safetensors"
    sd = load_file(p)
    k = sorted(sd)[0]
    sd[k][0, 0] = float("nan")
    save_file(sd, p)
    with pytest.raises(InvalidArtifactError, match="non-finite"):
        to_mlx(adapter, out=tmp_path / "mlx")
    assert not (tmp_path / "mlx").exists()
    assert torch.isnan(load_file(p)[k]).any()


def test_full_fine_tune_is_not_an_adapter(tmp_path: Path) -> None:
    from adapterhub.converters.formats.mlx import parse_mlx
    from adapterhub.errors import InvalidArtifactError

    with pytest.raises(InvalidArtifactError, match="full fine-tune"):
        parse_mlx({"fine_tune_type": "full", "lora_parameters": {"rank": 8, "scale": 20.0}}, {})
    with pytest.raises(InvalidArtifactError, match="rank"):
        parse_mlx({"fine_tune_type": "lora", "lora_parameters": {"rank": 8, "scale": 2.0}},
                  {"model.layers.0.q.lora_a": (16, 4), "model.layers.0.q.lora_b": (4, 16)})


# --------------------------------------------------------------------------- registry


def test_inspect_push_search_recognise_mlx(llama: Path, tmp_path: Path) -> None:
    from adapterhub.inspect import inspect_path
    from adapterhub.registry import Registry

    _mlx_trained_adapter(llama, tmp_path / "mlx", num_layers=2, rank=4, scale=10.0)
    info = inspect_path(tmp_path / "mlx")
    assert (info.kind, info.format, info.method, info.rank) == ("adapter", "mlx", "LORA", 4)
    assert info.details["scale"] == 10.0 and info.details["layers"] == [2, 3]
    assert info.fingerprint["modules"]["model.layers.3.self_attn.q_proj"] == [96, 96]
    reg = Registry()
    pushed = reg.push(tmp_path / "mlx", "team/mlx-lora")
    assert pushed.created
    found = reg.search(method="LORA")
    assert [f"{v.name}:{v.version}" for v in found] == [pushed.ref]


def test_push_records_converted_from(llama: Path, tmp_path: Path) -> None:
    from adapterhub.convert.mlx import to_mlx
    from adapterhub.registry import Registry

    adapter = F.lora_adapter(tmp_path / "lora", base_dir=llama, r=2, target_modules=["q_proj"])
    reg = Registry()
    src = reg.push(adapter, "team/src-lora")
    res = to_mlx("team/src-lora:1", push="team/src-mlx", registry=reg)
    parents = reg.index.parents(res.pushed.digest)
    assert [(p["digest"], p["relation"]) for p in parents] == [(src.digest, "converted_from")]


def test_cli_convert_to_mlx_and_back(cli, llama: Path, tmp_path: Path) -> None:
    adapter = F.lora_adapter(tmp_path / "lora", base_dir=llama, r=4, target_modules=["q_proj", "v_proj"])
    r = cli("convert", adapter, "--to", "mlx", "--base", llama, "-o", tmp_path / "mlx")
    assert r.exit_code == 0, r.output
    assert "rank 4" in r.stdout
    r = cli("convert", tmp_path / "mlx", "--to", "peft", "--base", llama, "-o", tmp_path / "peft", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["report"]["direction"] == "mlx->peft"
    assert cli("convert", adapter, "--to", "mlx", "--rank", 4, "-o", tmp_path / "x").exit_code == 2  # --rank is for --to lora
    other = F.tiny_llama_base(tmp_path / "other", hidden_size=64, layers=4, vocab=768)
    assert cli("convert", tmp_path / "mlx", "--to", "peft", "--base", other, "-o", tmp_path / "y").exit_code == 4
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_check_reads_mlx_adapters(cli, llama: Path, tmp_path: Path) -> None:
    _mlx_trained_adapter(llama, tmp_path / "mlx", num_layers=2, rank=4, scale=10.0)
    assert cli("check", tmp_path / "mlx", "--base", llama).exit_code == 0
    other = F.tiny_llama_base(tmp_path / "other", hidden_size=64, layers=4, vocab=768)
    r = cli("check", tmp_path / "mlx", "--base", other)
    assert r.exit_code == 1 and "INCOMPATIBLE" in r.output
