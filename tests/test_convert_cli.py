"""merge / quantize / dequantize through the CLI: inputs from paths, registry refs
and the HF cache; outputs into directories and the registry, with lineage."""

from __future__ import annotations

import json
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from .factories import lora_adapter, patch_json, tiny_llama_base  # noqa: E402


@pytest.fixture
def models(tmp_path):
    base = tiny_llama_base(tmp_path / "base")
    adapter = lora_adapter(tmp_path / "lora", base_dir=base, base_model_name_or_path=str(base))
    return base, adapter


def test_merge_quantize_dequantize_with_lineage(cli, tmp_path, models):
    base, adapter = models
    assert cli("push", base, "tiny-base").exit_code == 0
    assert cli("push", adapter, "tiny-lora").exit_code == 0

    r = cli("merge", "tiny-lora", "--base", "tiny-base", "--push", "tiny-merged", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["pushed"]["ref"] == "tiny-merged:1" and res["pushed"]["kind"] == "merged"
    assert res["report"]["modules_merged"] == 4 and res["inputs"]["base"]["origin"] == "registry"

    r = cli("quantize", "tiny-merged", "--to", "nf4", "--push", "tiny-nf4", "--json")
    assert r.exit_code == 0, r.output
    q = json.loads(r.stdout)["pushed"]
    assert q["kind"] == "quantized" and q["quant"] == "nf4"

    tree = json.loads(cli("lineage", "tiny-nf4", "--json").stdout)
    (merged,) = tree["up"]
    assert merged["refs"] == ["tiny-merged:1"] and merged["recipe"]["operation"] == "quantize"
    assert {(p["relation"], p["refs"][0]) for p in merged["up"]} == {("adapter", "tiny-lora:1"), ("base", "tiny-base:1")}
    recipe = merged["up"][0]["recipe"] if merged["up"][0]["relation"] == "adapter" else merged["up"][1]["recipe"]
    assert recipe["operation"] == "merge" and recipe["options"]["qlora_base"] == "original"
    found = json.loads(cli("search", "--derived-from", "tiny-lora", "--json").stdout)
    assert [d["ref"] for d in found] == ["tiny-merged:1", "tiny-nf4:1"]

    out = tmp_path / "deq"
    r = cli("dequantize", "tiny-nf4", "-o", out, "--dtype", "float32")
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out)(torch.arange(8)[None]).logits
    assert torch.isfinite(logits).all()
    assert json.loads(cli("fsck", "--json").stdout)["ok"] is True


def test_merge_from_paths_with_default_base(cli, tmp_path, models):
    base, adapter = models
    out = tmp_path / "merged"
    r = cli("merge", adapter, "-o", out)  # base from the adapter's base_model_name_or_path
    assert r.exit_code == 0, r.output
    assert "merge: wrote" in r.stdout
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    assert "base_model_relation: merged" in (out / "README.md").read_text()
    r = cli("merge", adapter, "-o", out)
    assert r.exit_code == 5 and "already exists" in r.stderr
    assert cli("merge", adapter, "-o", out, "--force").exit_code == 0


def test_merge_from_hf_cache(cli, tmp_path, models, monkeypatch):
    base, adapter = models
    cache = tmp_path / "hf"
    repo = cache / "models--tiny-org--tiny-llama"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in os.listdir(base):  # the cache's own layout: snapshot symlinks into blobs/
        shutil.copy(base / f, repo / "blobs" / f"blob-{f}")
        (snap / f).symlink_to(f"../../blobs/blob-{f}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    patch_json(adapter / "adapter_config.json", base_model_name_or_path="tiny-org/tiny-llama")
    r = cli("merge", adapter, "--push", "from-cache", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["inputs"]["base"]["origin"] == "hf-cache" and res["inputs"]["base"]["hub_id"] == "tiny-org/tiny-llama"
    r = cli("merge", adapter, "--base", "hf:tiny-org/not-there", "-o", tmp_path / "x")
    assert r.exit_code == 3 and "not in the local Hugging Face cache" in r.stderr


def test_convert_bad_input(cli, tmp_path, models):
    base, adapter = models
    r = cli("merge", adapter, "--base", base)  # nowhere to write
    assert r.exit_code == 2 and "-o OUT" in r.stderr
    r = cli("merge", adapter, "--base", base, "--push", "Bad Name")
    assert r.exit_code == 4
    other = tiny_llama_base(tmp_path / "other", hidden_size=32)
    r = cli("merge", adapter, "--base", other, "-o", tmp_path / "o")
    assert r.exit_code == 4 and "q_proj" in r.stderr
    assert not (tmp_path / "o").exists()
    r = cli("quantize", adapter, "--to", "int8", "--double-quant", "-o", tmp_path / "q")
    assert r.exit_code == 2
    r = cli("dequantize", base, "-o", tmp_path / "d")
    assert r.exit_code == 4 and "not" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "lora", "other"]


def test_merge_double_quant_needs_quantize_and_description_needs_push(cli, tmp_path, models):
    base, adapter = models
    r = cli("merge", adapter, "--base", base, "--double-quant", "-o", tmp_path / "m")
    assert r.exit_code == 2 and "--double-quant applies to --quantize" in r.stderr
    r = cli("quantize", base, "--to", "nf4", "-d", "qa model", "-o", tmp_path / "q")
    assert r.exit_code == 2 and "needs --push" in r.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "q").exists()


def test_out_and_push_together_with_a_description(cli, tmp_path, models):
    base, adapter = models
    out = tmp_path / "merged"
    r = cli("merge", adapter, "--base", base, "-o", out, "--push", "tiny-merged", "-d", "QA merged into tiny llama", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["out"] == str(out) and (out / "model.safetensors").exists()
    assert res["pushed"]["ref"] == "tiny-merged:1"
    assert json.loads(cli("show", "tiny-merged", "--json").stdout)["description"] == "QA merged into tiny llama"
    r = cli("quantize", "tiny-merged", "--to", "int8", "--push", "tiny-int8", "--description", "int8 QA")
    assert r.exit_code == 0, r.output
    assert json.loads(cli("show", "tiny-int8", "--json").stdout)["description"] == "int8 QA"
    assert "write OUT, then push it" in cli("merge", "--help").stdout


def test_merging_the_same_inputs_again_is_unchanged(cli, tmp_path, models):
    base, adapter = models
    r = cli("merge", adapter, "--base", base, "--push", "tiny-merged")
    assert r.exit_code == 0 and r.stdout.startswith("pushed tiny-merged:1"), r.output
    r = cli("merge", adapter, "--base", base, "--push", "tiny-merged")  # deterministic: the same bytes
    assert r.exit_code == 0 and r.stdout.startswith("unchanged: tiny-merged:1 already holds this content"), r.output


def test_merge_quantize_reports_the_weights_dtype(cli, tmp_path, models):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file, save_file

    base, adapter = models
    weights = base / "model.safetensors"
    tensors = load_file(weights)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    tensors["model.position_ids"] = torch.arange(8, dtype=torch.int64)[None]  # an integer buffer
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "nf4"
    r = cli("merge", adapter, "--base", base, "--quantize", "nf4", "-o", out)
    assert r.exit_code == 0, r.output
    assert "dtype float32" in r.stdout and "int64" not in r.stdout, r.stdout
    assert "written as float32" in (out / "README.md").read_text()


def test_quantize_help_says_skipped_modules_keep_their_precision(cli):
    text = " ".join(cli("quantize", "--help").stdout.split())
    assert "stay in their original precision" in text and "16-bit, as transformers" not in text


def test_cli_process_exit_status_and_output_once_torch_is_loaded(tmp_path, models):
    """A command that loaded torch leaves through os._exit: its status, JSON and errors still come out whole."""
    from .conftest import run_cli

    base, adapter = models
    env = {"ADAPTERHUB_HOME": str(tmp_path / "home")}
    r = run_cli("merge", adapter, "--base", base, "-o", tmp_path / "o", "--device", "cpu", "--json", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["operation"] == "merge" and result["report"]["tensors_changed"] > 0
    assert (tmp_path / "o" / "model.safetensors").exists()
    other = tiny_llama_base(tmp_path / "other", hidden_size=32)
    r = run_cli("merge", adapter, "--base", other, "-o", tmp_path / "o2", "--json", env=env, timeout=300)
    assert r.returncode == 4
    assert json.loads(r.stdout)["exit_code"] == 4 and "q_proj" in r.stderr
    assert not (tmp_path / "o2").exists()


def test_conversion_pushes_store_weights_hashed_while_written(cli, tmp_path, models, monkeypatch):
    """merge/quantize/dequantize --push: weight files are hashed as written and hard-linked into the store, never re-read."""
    import hashlib

    from adapterhub.registry import blobs
    from adapterhub.registry import push as registry_mod  # where a push hashes its files

    base, adapter = models
    reread: list[str] = []
    real_hash, real_put_new, real_put = registry_mod.hash_file_sized, blobs.BlobStore.put_new, blobs.BlobStore.put

    def hash_file(p, *a, **k):
        reread.append(os.path.basename(p))
        return real_hash(p, *a, **k)

    def put_new(self, p, *a, **k):
        reread.append(os.path.basename(p))
        return real_put_new(self, p, *a, **k)

    def put(self, p, *a, **k):
        reread.append(os.path.basename(p))
        return real_put(self, p, *a, **k)

    monkeypatch.setattr(registry_mod, "hash_file_sized", hash_file)
    monkeypatch.setattr(blobs.BlobStore, "put_new", put_new)
    monkeypatch.setattr(blobs.BlobStore, "put", put)
    r = cli("merge", adapter, "--base", base, "--push", "m", "--json")
    assert r.exit_code == 0, r.output
    assert "model.safetensors" not in reread and "config.json" in reread
    out = tmp_path / "pulled"
    assert cli("pull", "m", out).exit_code == 0  # pull re-hashes every byte on the way out
    manifest = json.loads(cli("show", "m", "--json").stdout)["files"]
    weights = next(f for f in manifest if f["path"] == "model.safetensors")
    assert weights["sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    # quantize and dequantize pushes store their weights the same way
    for args in (("quantize", "m", "--to", "nf4", "--push", "q"), ("dequantize", "q", "--push", "d")):
        reread.clear()
        r = cli(*args)
        assert r.exit_code == 0, r.output
        assert "model.safetensors" not in reread and "config.json" in reread, args
    assert json.loads(cli("fsck", "--json").stdout)["ok"] is True

    # -o OUT and --push together: the user's file is never linked into the store
    reread.clear()
    r = cli("merge", adapter, "--base", base, "-o", tmp_path / "mine", "--push", "m2")
    assert r.exit_code == 0, r.output
    assert "model.safetensors" in reread
    assert os.stat(tmp_path / "mine" / "model.safetensors").st_nlink == 1
