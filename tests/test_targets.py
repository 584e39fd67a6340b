"""check --target: the rules of serving engines (vLLM, llama.cpp, Ollama, mlx-lm, TGI), from a data table."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from adapterhub.check import TARGET_NAMES, TARGETS, check
from adapterhub.check.targets import TESTS

from .factories import adapter_from_tensors, write_safetensors_header

H, L, V, I = 32, 2, 64, 48
PFX = "base_model.model."


def header_base(root: Path, model_type: str = "llama", arch: str = "LlamaForCausalLM") -> Path:
    """A base checkpoint of headers only (sparse data): what check reads."""
    root.mkdir(parents=True)
    t = {"model.embed_tokens.weight": ("F32", (V, H)), "lm_head.weight": ("F32", (V, H)), "model.norm.weight": ("F32", (H,))}
    for i in range(L):
        p = f"model.layers.{i}"
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"{p}.self_attn.{m}.weight"] = ("F32", (H, H))
        t[f"{p}.mlp.gate_proj.weight"] = ("F32", (I, H))
        t[f"{p}.mlp.up_proj.weight"] = ("F32", (I, H))
        t[f"{p}.mlp.down_proj.weight"] = ("F32", (H, I))
    write_safetensors_header(root / "model.safetensors", t)
    (root / "config.json").write_text(json.dumps({
        "architectures": [arch], "model_type": model_type, "hidden_size": H, "num_hidden_layers": L,
        "intermediate_size": I, "vocab_size": V, "tie_word_embeddings": False, "torch_dtype": "float32",
    }))
    return root


def lora(root: Path, r: int = 8, modules=("self_attn.q_proj", "self_attn.v_proj"), layers=range(L), extra=None, **cfg) -> Path:
    rng = np.random.default_rng(0)
    t = {}
    for i in layers:
        for m in modules:
            out = I if m.endswith(("gate_proj", "up_proj")) else H
            inp = I if m.endswith("down_proj") else H
            t[f"{PFX}model.layers.{i}.{m}.lora_A.weight"] = rng.standard_normal((r, inp)).astype(np.float32)
            t[f"{PFX}model.layers.{i}.{m}.lora_B.weight"] = rng.standard_normal((out, r)).astype(np.float32)
    t.update(extra or {})
    config = {"r": r, "lora_alpha": 2 * r, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
              "base_model_name_or_path": "org/tiny", "task_type": "CAUSAL_LM"} | cfg
    return adapter_from_tensors(root, t, **config)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return header_base(tmp_path_factory.mktemp("b") / "base")


def status(rep, rule_id: str) -> str:
    return rep.rule(rule_id).status


def message(rep, rule_id: str) -> str:
    return " | ".join(f.message for f in rep.rule(rule_id).findings)


# --------------------------------------------------------------------------- the table


def test_the_table_is_complete_and_cited():
    from adapterhub.cli.check_cmds import TARGETS as CLI_TARGETS

    assert CLI_TARGETS == TARGET_NAMES == ("vllm", "llama.cpp", "ollama", "mlx", "tgi")
    ids = [r["id"] for t in TARGETS.values() for r in t["rules"]]
    assert len(ids) == len(set(ids))
    for engine, t in TARGETS.items():
        for r in t["rules"]:
            assert r["id"].startswith(engine + "/") and r["test"] in TESTS and r["title"]
            assert r["severity"] in ("error", "warning") and len(r["source"]) > 20  # every rule cites where it comes from
            assert r["fix"] is None or r["fix"] == "merge" or r["fix"].startswith("convert --to ")


def test_no_target_no_target_rules(tmp_path, base):
    rep = check(lora(tmp_path / "a"), base)
    assert not any("/" in r.id for r in rep.rules) and "targets" not in rep.to_dict()


# --------------------------------------------------------------------------- vLLM


def test_vllm_a_plain_lora_passes(tmp_path, base):
    rep = check(lora(tmp_path / "a", r=24), base, targets=["vllm"])
    vllm = [r for r in rep.rules if r.id.startswith("vllm/")]
    assert [r.id for r in vllm] == [r["id"] for r in TARGETS["vllm"]["rules"]]
    assert all(r.status == "pass" for r in vllm), [(r.id, r.status, r.summary) for r in vllm]
    assert rep.rule("vllm/max-lora-rank").summary == "rank 24: serve with --max-lora-rank 32 or more (the default is 16)"
    assert rep.ok and rep.to_dict()["targets"] == ["vllm"]


def test_vllm_refuses_dora_modules_to_save_large_ranks_and_patterns(tmp_path, base):
    mag = {f"{PFX}model.layers.{i}.self_attn.q_proj.lora_magnitude_vector": np.ones(H, np.float32) for i in range(L)}
    rep = check(lora(tmp_path / "dora", modules=("self_attn.q_proj",), extra=mag, use_dora=True), base, targets=["vllm"])
    assert status(rep, "vllm/dora") == "error" and "fix: adapterhub merge" in message(rep, "vllm/dora")
    assert rep.rule("vllm/dora").findings[0].to_dict()["fix"] == "adapterhub merge"

    saved = {f"{PFX}model.norm.weight": np.ones(H, np.float32)}
    rep = check(lora(tmp_path / "mts", extra=saved, modules_to_save=["norm"]), base, targets=["vllm"])
    assert status(rep, "vllm/modules-to-save") == "error" and "model.norm.weight" in message(rep, "vllm/modules-to-save")

    rep = check(lora(tmp_path / "big", r=1024), base, targets=["vllm"])
    assert status(rep, "vllm/max-lora-rank") == "error"
    assert "rank 1024 is above the largest --max-lora-rank (512)" in message(rep, "vllm/max-lora-rank")

    rep = check(lora(tmp_path / "pat", alpha_pattern={"v_proj": 64}), base, targets=["vllm"])
    assert status(rep, "vllm/one-scale") == "error" and "alpha_pattern" in message(rep, "vllm/one-scale")
    assert status(rep, "shapes") == "pass"  # the adapter fits the base: only vLLM cannot serve it as it is


def test_vllm_target_modules_and_extra_vocabulary(tmp_path, base):
    (tmp_path / "q2").mkdir()
    q2 = header_base(tmp_path / "q2" / "base", model_type="qwen2", arch="Qwen2ForCausalLM")
    rep = check(lora(tmp_path / "a", modules=("self_attn.q_proj", "mlp.down_proj")), q2, targets=["vllm"])
    assert status(rep, "vllm/target-modules") == "pass"
    d = lora(tmp_path / "b")
    (d / "new_embeddings.safetensors").write_bytes((tmp_path / "b" / "adapter_model.safetensors").read_bytes())
    rep = check(d, base, targets=["vllm"])
    assert status(rep, "vllm/extra-vocab") == "error" and "new_embeddings.safetensors" in message(rep, "vllm/extra-vocab")
    (tmp_path / "x").mkdir()
    other = header_base(tmp_path / "x" / "base", model_type="falcon", arch="FalconForCausalLM")
    rep = check(lora(tmp_path / "c"), other, targets=["vllm"])
    assert status(rep, "vllm/target-modules") == "skipped" and "no LoRA module list for model_type falcon" in rep.rule("vllm/target-modules").summary


def test_vllm_only_lora(tmp_path, base):
    rng = np.random.default_rng(0)
    t = {f"{PFX}model.layers.{i}.self_attn.v_proj.ia3_l": rng.standard_normal((H, 1)).astype(np.float32) for i in range(L)}
    d = adapter_from_tensors(tmp_path / "ia3", t, peft_type="IA3", target_modules=["v_proj"], feedforward_modules=[],
                             base_model_name_or_path="org/tiny")
    rep = check(d, base, targets=["vllm", "tgi"])
    assert status(rep, "vllm/method") == "error" and "fix: adapterhub convert --to lora" in message(rep, "vllm/method")
    assert status(rep, "tgi/method") == "error" and status(rep, "vllm/max-lora-rank") == "skipped"


# --------------------------------------------------------------------------- llama.cpp and Ollama


def test_llama_cpp_needs_gguf_and_one_alpha(tmp_path, base):
    rep = check(lora(tmp_path / "a", rank_pattern={"v_proj": 4}), base, targets=["llama.cpp"])
    assert status(rep, "llama.cpp/format") == "error"
    assert "fix: adapterhub convert --to gguf" in message(rep, "llama.cpp/format")
    assert status(rep, "llama.cpp/architecture") == "pass" and "llama" in rep.rule("llama.cpp/architecture").summary
    assert status(rep, "llama.cpp/one-alpha") == "pass"  # the loader takes each tensor's own rank: rank_pattern is fine
    rep = check(lora(tmp_path / "b", use_rslora=True), base, targets=["llama.cpp", "ollama"])
    assert status(rep, "llama.cpp/one-alpha") == "error" and "sqrt(r)" in message(rep, "llama.cpp/one-alpha")
    assert status(rep, "ollama/one-alpha") == "error"


def test_llama_cpp_architectures_and_tensor_names(tmp_path):
    foo = header_base(tmp_path / "foo", model_type="foo", arch="FooForCausalLM")
    rep = check(lora(tmp_path / "a"), foo, targets=["llama.cpp"])
    assert status(rep, "llama.cpp/architecture") == "error"
    assert "no converter for FooForCausalLM; no conversion makes it servable there" in message(rep, "llama.cpp/architecture")
    assert rep.rule("llama.cpp/architecture").findings[0].fix is None


def test_ollama_takes_peft_adapters_on_llama_and_gemma2_only(tmp_path, base):
    rep = check(lora(tmp_path / "a"), base, targets=["ollama"])
    assert all(status(rep, r["id"]) == "pass" for r in TARGETS["ollama"]["rules"]), [(r.id, r.status) for r in rep.rules]
    q2 = header_base(tmp_path / "q2", model_type="qwen2", arch="Qwen2ForCausalLM")
    rep = check(lora(tmp_path / "b"), q2, targets=["ollama"])
    assert status(rep, "ollama/architecture") == "error"
    assert "model_type qwen2" in message(rep, "ollama/architecture") and "fix: adapterhub convert --to gguf" in message(rep, "ollama/architecture")


# --------------------------------------------------------------------------- mlx-lm


def mlx_adapter(root: Path, num_layers: int, blocks=range(L)) -> Path:
    from safetensors.numpy import save_file

    root.mkdir(parents=True)
    t = {}
    for i in blocks:
        t[f"model.layers.{i}.self_attn.q_proj.lora_a"] = np.zeros((H, 4), np.float32)
        t[f"model.layers.{i}.self_attn.q_proj.lora_b"] = np.ones((4, H), np.float32)
    save_file(t, str(root / "adapters.safetensors"))
    (root / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": num_layers, "model": "org/tiny",
        "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]},
    }))
    return root


def test_mlx_format_architecture_and_layer_coverage(tmp_path, base):
    rep = check(lora(tmp_path / "peft"), base, targets=["mlx"])
    assert status(rep, "mlx/format") == "error" and "fix: adapterhub convert --to mlx" in message(rep, "mlx/format")
    rep = check(mlx_adapter(tmp_path / "ok", num_layers=L), base, targets=["mlx"])
    assert status(rep, "mlx/format") == "pass" and status(rep, "mlx/layer-coverage") == "pass"
    import importlib.util

    want = "pass" if importlib.util.find_spec("mlx_lm") else "skipped"
    assert status(rep, "mlx/architecture") == want
    rep = check(mlx_adapter(tmp_path / "short", num_layers=1), base, targets=["mlx"])
    assert status(rep, "mlx/layer-coverage") == "error"
    assert "blocks [0] hold adapter weights but num_layers 1 covers only blocks 1-1" in message(rep, "mlx/layer-coverage")
    rep = check(mlx_adapter(tmp_path / "long", num_layers=5), base, targets=["mlx"])
    assert "num_layers 5 is more than the base's 2 blocks" in message(rep, "mlx/layer-coverage")


# --------------------------------------------------------------------------- TGI


def test_tgi_drops_module_types_missing_from_a_block(tmp_path, base):
    rep = check(lora(tmp_path / "all", modules=("self_attn.q_proj", "mlp.up_proj")), base, targets=["tgi"])
    assert all(status(rep, r["id"]) == "pass" for r in TARGETS["tgi"]["rules"])
    rep = check(lora(tmp_path / "one", layers=[1], layers_to_transform=[1]), base, targets=["tgi"])
    assert status(rep, "tgi/layer-coverage") == "error"
    assert "q_proj in 1 of 2 blocks" in message(rep, "tgi/layer-coverage")


# --------------------------------------------------------------------------- output


def test_cli_json_junit_and_github_output(cli, tmp_path, base):
    mag = {f"{PFX}model.layers.{i}.self_attn.q_proj.lora_magnitude_vector": np.ones(H, np.float32) for i in range(L)}
    d = lora(tmp_path / "dora", modules=("self_attn.q_proj",), extra=mag, use_dora=True)
    r = cli("check", d, "--base", base, "--target", "vllm", "--json", "--junit", tmp_path / "r.xml")
    out = json.loads(r.stdout)
    assert r.exit_code == 1 and out["status"] == "incompatible" and out["targets"] == ["vllm"]
    rule = next(x for x in out["rules"] if x["id"] == "vllm/dora")
    assert rule["status"] == "error" and rule["title"] == "vLLM refuses DoRA adapters"
    assert rule["findings"][0]["fix"] == "adapterhub merge"
    assert rule["source"].startswith("vllm/lora/peft_helper.py") and "source" not in out["rules"][0]
    cases = {c.get("name"): c for c in ET.parse(tmp_path / "r.xml").getroot().iter("testcase")}
    assert cases["vllm/dora"].find("failure") is not None and cases["vllm/format"].find("failure") is None
    r = cli("check", d, "--base", base, "--target", "vllm", "--github")
    assert r.exit_code == 1
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("::") and "vllm/dora" in ln)
    assert line.startswith("::error ") and "fix: adapterhub merge" in line
    r = cli("check", d, "--base", base)  # without --target, a DoRA adapter fits its base
    assert r.exit_code == 0
    r = cli("check", d, "--base", base, "--target", "nope")
    assert r.exit_code == 2
    r = cli("check", d, "--base", base, "--target", "vllm")
    assert "vllm/dora" in r.stdout and "fix: adapterhub merge" in r.stdout
