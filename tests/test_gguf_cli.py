"""``adapterhub convert --to gguf`` and ``merge --to gguf`` from the command line: outputs, lineage,
inspect/search/show, ``check ADAPTER.gguf --base MODEL.gguf``, ``verify`` naming its runtime, and
bad input (each a clear line, a documented exit code, and no .gguf left behind)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests._crash import MountRefused, signal_when, spawn, tmpfs
from tests.conftest import run_cli

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the test extra")

from tests.test_gguf_lora import make_adapter  # noqa: E402
from tests.trained_lm import build_small_model  # noqa: E402


def _no_gguf_left(d: Path) -> None:
    assert [p.name for p in d.rglob("*.gguf")] == [] and [p.name for p in d.rglob("*.incomplete")] == []


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def adapter(trained_llama, tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("gguf-cli") / "lora", trained_llama, target_modules=["q_proj", "v_proj"])


def test_convert_push_lineage_inspect_search_show(cli, trained_llama, adapter, tmp_path):
    r = cli("convert", trained_llama, "--to", "gguf", "--outtype", "q8_0", "--push", "team/tiny-gguf:1", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["report"]["tensor_types"] == {"f32": 9, "q8_0": 30} and res["pushed"]["ref"] == "team/tiny-gguf:1"
    show = json.loads(cli("show", "team/tiny-gguf:1", "--json").stdout)
    assert show["kind"] == "gguf" and show["quant"] == "q8_0" and show["inspection"]["details"]["architecture"] == "llama"
    assert [d["relation"] for d in show["lineage"]] == ["converted_from"]
    found = json.loads(cli("search", "--quant", "q8_0", "--json").stdout)
    assert [f["ref"] for f in found] == ["team/tiny-gguf:1"]
    # -o and --push together: OUT holds the same bytes as the pushed file
    r = cli("convert", adapter, "--to", "gguf", "--base", trained_llama, "-o", tmp_path / "l.gguf", "--push", "team/lora-gguf", "--json")
    assert r.exit_code == 0, r.output
    lin = json.loads(cli("show", "team/lora-gguf", "--json").stdout)
    assert lin["kind"] == "adapter" and lin["inspection"]["format"] == "gguf"
    assert sorted(d["relation"] for d in lin["lineage"]) == ["base", "converted_from"]
    ins = json.loads(cli("inspect", tmp_path / "l.gguf", "--json").stdout)
    assert ins["kind"] == "adapter" and ins["method"] == "LORA" and ins["alpha"] == 16.0


def test_merge_to_gguf_with_modelfile_then_check_and_verify(cli, trained_llama, adapter, tmp_path):
    out = tmp_path / "m.q8_0.gguf"
    r = cli("merge", adapter, "--base", trained_llama, "--to", "gguf", "-o", out, "--modelfile")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.q8_0.gguf"]
    assert "FROM ./m.q8_0.gguf" in (tmp_path / "Modelfile").read_text()
    # a GGUF LoRA against GGUF models: the right base passes, one of another shape fails (exit 1)
    assert cli("convert", trained_llama, "--to", "gguf", "-o", tmp_path / "base.gguf").exit_code == 0
    assert cli("convert", adapter, "--to", "gguf", "--base", trained_llama, "-o", tmp_path / "lora.gguf").exit_code == 0
    ok = cli("check", tmp_path / "lora.gguf", "--base", tmp_path / "base.gguf", "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["status"] == "ok", ok.output
    other = build_small_model(tmp_path / "other", "llama", hidden_size=128)
    assert cli("convert", other, "--to", "gguf", "-o", tmp_path / "other.gguf").exit_code == 0
    bad = cli("check", tmp_path / "lora.gguf", "--base", tmp_path / "other.gguf", "--json")
    assert bad.exit_code == 1
    assert {r["id"]: r["status"] for r in json.loads(bad.stdout)["rules"]}["shapes"] == "error"
    # verify runs the candidate in llama.cpp and says so
    v = cli("verify", out, "--adapter", adapter, "--base", trained_llama, "--no-record", "--json")
    rep = json.loads(v.stdout)
    assert rep["format"] == "gguf-q8_0@llama.cpp", rep
    assert v.exit_code == 0 and rep["verdict"] == "PASS", v.output


def test_verify_falls_back_to_transformers(cli, trained_llama, adapter, tmp_path, monkeypatch):
    out = tmp_path / "m.f16.gguf"
    assert cli("merge", adapter, "--base", trained_llama, "--to", "gguf", "--outtype", "f16", "-o", out).exit_code == 0
    monkeypatch.setenv("ADAPTERHUB_GGUF_RUNTIME", "transformers")
    v = cli("verify", out, "--adapter", adapter, "--base", trained_llama, "--no-record", "--json")
    rep = json.loads(v.stdout)
    assert rep["format"] == "gguf-f16@transformers" and rep["verdict"] == "PASS", v.output


def test_bad_input_exit_codes_and_no_partial_file(trained_llama, adapter, tmp_path):
    from tests.factories import tiny_model

    gpt2 = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(gpt2)
    r = run_cli("convert", gpt2, "--to", "gguf", "-o", tmp_path / "o" / "x.gguf")
    assert r.returncode == 4 and "does not support GPT2LMHeadModel" in _one_error_line(r)
    assert "Qwen3ForCausalLM" in r.stderr  # the supported list
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copyfile(trained_llama / f, no_tok / f)
    r = run_cli("convert", no_tok, "--to", "gguf", "-o", tmp_path / "o" / "x.gguf")
    assert r.returncode == 4 and "no tokenizer" in _one_error_line(r)
    other = build_small_model(tmp_path / "other", "llama", hidden_size=128)
    r = run_cli("convert", adapter, "--to", "gguf", "--base", other, "-o", tmp_path / "o" / "x.gguf")
    assert r.returncode == 4 and "does not fit the base" in _one_error_line(r)
    r = run_cli("convert", trained_llama, "--to", "gguf", "-o", trained_llama / "x.gguf")
    assert r.returncode == 5 and "lies inside the input" in _one_error_line(r)
    (tmp_path / "o").mkdir(exist_ok=True)
    (tmp_path / "o" / "x.gguf").write_text("mine")
    r = run_cli("convert", trained_llama, "--to", "gguf", "-o", tmp_path / "o" / "x.gguf")
    assert r.returncode == 5 and "already exists" in _one_error_line(r)
    assert (tmp_path / "o" / "x.gguf").read_text() == "mine"
    r = run_cli("convert", trained_llama, "--to", "gguf", "--outtype", "q6_k", "-o", tmp_path / "y.gguf")
    assert r.returncode == 2
    (tmp_path / "o" / "x.gguf").unlink()
    _no_gguf_left(tmp_path)


def test_full_disk(trained_llama, tmp_path):
    try:
        with tmpfs(tmp_path / "disk", "1m") as d:  # the f32 GGUF is 2.2 MB
            r = run_cli("convert", trained_llama, "--to", "gguf", "--outtype", "f32", "-o", d / "m.gguf")
            assert r.returncode == 7 and "no space left" in _one_error_line(r)
            assert list(d.iterdir()) == []
    except MountRefused as e:
        pytest.skip(f"needs root to mount a 1 MB tmpfs: {e}")


def test_interrupt_leaves_nothing(tmp_path):
    src = build_small_model(tmp_path / "big", "llama", hidden_size=512, intermediate_size=2048, layers=8)
    out = tmp_path / "o"
    out.mkdir()
    proc = spawn("convert", src, "--to", "gguf", "--outtype", "q8_0", "-o", out / "m.gguf", home=tmp_path / "home")
    sent, _, err = signal_when(proc, lambda: any(out.glob("*.incomplete")), signal.SIGINT)
    assert sent, "the conversion finished before it could be interrupted"
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert list(out.iterdir()) == []
