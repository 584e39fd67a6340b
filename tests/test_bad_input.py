"""Bad input: a one-line error, a documented exit code, and no change to the registry."""

import json
import os
import struct

import pytest

from .conftest import fake_lora, make_files


def _registry_state(home):
    blobs = sorted(str(p) for p in (home / "blobs").rglob("*")) if (home / "blobs").exists() else []
    return blobs


@pytest.fixture
def assert_unchanged(cli, home):
    """Run a failing push and check exit code, message and that nothing was stored."""

    def check(args, code, needle):
        before = _registry_state(home)
        r = cli(*args)
        assert r.exit_code == code, (r.exit_code, r.output)
        err = r.stderr.strip().splitlines()
        assert err and err[0].startswith("error: ") and needle in err[0], r.stderr
        assert _registry_state(home) == before
        assert cli("ls", "--json").stdout.strip() == "[]"
        return r

    return check


def test_not_an_artifact(assert_unchanged, tmp_path):
    d = make_files(tmp_path / "notes", {"notes.txt": b"hello"})
    assert_unchanged(("push", d, "x"), 4, "not an artifact")


def test_missing_path(assert_unchanged, tmp_path):
    assert_unchanged(("push", tmp_path / "nope", "x"), 3, "nope")


def test_malformed_json(assert_unchanged, tmp_path):
    d = fake_lora(tmp_path / "a")
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,')
    r = assert_unchanged(("push", d, "x"), 4, "adapter_config.json")
    assert "line 1" in r.stderr  # says where the JSON breaks


def test_truncated_safetensors(assert_unchanged, tmp_path):
    d = fake_lora(tmp_path / "a")
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_unchanged(("push", d, "x"), 4, "adapter_model.safetensors")


def test_header_claims_more_than_file(assert_unchanged, tmp_path):
    d = fake_lora(tmp_path / "a")
    f = d / "adapter_model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    f.write_bytes(struct.pack("<Q", n + 10_000) + data[8:])
    assert_unchanged(("push", d, "x"), 4, "adapter_model.safetensors")


def test_garbage_safetensors(assert_unchanged, tmp_path):
    d = fake_lora(tmp_path / "a")
    (d / "adapter_model.safetensors").write_bytes(os.urandom(64))
    assert_unchanged(("push", d, "x"), 4, "adapter_model.safetensors")


@pytest.mark.parametrize("name", ["Bad", "../up", "a/b/c", "a" * 200, "x:", "_lead", "a@b"])
def test_invalid_names(assert_unchanged, tmp_path, name):
    d = fake_lora(tmp_path / "a")
    assert_unchanged(("push", d, name), 4, "")


def test_weight_map_traversal(assert_unchanged, tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    d = make_files(tmp_path / "ckpt", {"config.json": json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}).encode()})
    save_file({"w.weight": np.zeros((2, 2), np.float32)}, str(d / "model-00001-of-00001.safetensors"))
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"w.weight": "../../etc/passwd"}})
    )
    assert_unchanged(("push", d, "x"), 4, "passwd")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {"w.weight": "/etc/passwd"}}))
    assert_unchanged(("push", d, "x"), 4, "passwd")


def test_symlink_outside(assert_unchanged, tmp_path):
    d = fake_lora(tmp_path / "a")
    secret = tmp_path / "secret.txt"
    secret.write_text("s")
    (d / "README.md").symlink_to(secret)
    assert_unchanged(("push", d, "x"), 4, "outside")


def test_unknown_refs(cli):
    for args in (("pull", "ghost", "out"), ("show", "ghost:1"), ("tag", "ghost@prod", "x"), ("rm", "ghost:1", "--yes")):
        r = cli(*args)
        assert r.exit_code == 3, args
        assert r.stderr.startswith("error: unknown")


def test_pull_dest_is_a_file(cli, tmp_path):
    cli("push", fake_lora(tmp_path / "a"), "qa")
    f = tmp_path / "file"
    f.write_text("x")
    r = cli("pull", "qa", f)
    assert r.exit_code == 5 and "not a directory" in r.stderr


def test_unexpected_errors_are_reported_not_dumped(cli, tmp_path, monkeypatch):
    import adapterhub.registry.registry as rr

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(rr.Registry, "ls_rows", boom)  # what `ls` calls
    r = cli("ls")
    assert r.exit_code == 1
    assert "unexpected error: RuntimeError: kaboom" in r.stderr and "ADAPTERHUB_DEBUG" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_optional_dependency_is_explained(cli, monkeypatch):
    import adapterhub.registry.registry as rr

    def needs_torch(*a, **k):
        import adapterhub_no_such_module  # noqa: F401

    monkeypatch.setattr(rr.Registry, "ls_rows", needs_torch)
    r = cli("ls")
    assert r.exit_code == 1
    assert "needs the Python package 'adapterhub_no_such_module'" in r.stderr and "adapterhub[ml]" in r.stderr


# --------------------------------------------------------------------------- hostile regexes and nesting (issue 16)

EVIL = "(a+)+b"  # exponential for a backtracking engine on a long run of a's


def evil_lora(root, rank=4):
    """A LoRA whose module names hold long runs of "a" and whose rank/alpha patterns are catastrophic regexes."""
    import numpy as np

    from tests.factories import adapter_from_tensors

    rng = np.random.default_rng(0)
    mod = "base_model.model.model.layers.0." + "a" * 40 + ".q_proj"
    tensors = {
        f"{mod}.lora_A.weight": rng.standard_normal((rank, 16)).astype(np.float32),
        f"{mod}.lora_B.weight": rng.standard_normal((16, rank)).astype(np.float32),
    }
    return adapter_from_tensors(
        root, tensors, r=rank, lora_alpha=8, rank_pattern={EVIL: 2}, alpha_pattern={EVIL: 3},
        base_model_name_or_path="org/tiny", task_type="CAUSAL_LM",
    )


def test_catastrophic_rank_pattern_does_not_hang_inspect_push_check_merge(tmp_path):
    from tests.conftest import run_cli
    from tests.factories import tiny_llama_base

    d = evil_lora(tmp_path / "evil")
    base = tiny_llama_base(tmp_path / "base", hidden_size=16)
    env = {"ADAPTERHUB_HOME": str(tmp_path / "home")}
    # A subprocess with a limit, so a regression fails the test instead of hanging the suite.
    r = run_cli("inspect", d, "--json", env=env, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["rank"] == 4, r.stderr
    r = run_cli("push", d, "team/evil", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    r = run_cli("check", d, "--base", base, "--json", env=env, timeout=120)
    assert r.returncode in (0, 1) and json.loads(r.stdout)["exit_code"] == r.returncode, r.stderr
    r = run_cli("merge", d, "--base", base, "-o", tmp_path / "m", "--device", "cpu", env=env, timeout=120)
    assert r.returncode in (0, 4) and "Traceback" not in r.stderr and "unexpected" not in r.stderr, r.stderr


def test_catastrophic_rank_pattern_does_not_hang_a_foreign_pull(tmp_path, hf_cache):
    from tests._hf_cache import cache_snapshot
    from tests.conftest import run_cli

    d = evil_lora(tmp_path / "evil")
    cache_snapshot(hf_cache, "other-org/evil-lora", {p.name: p.read_bytes() for p in d.iterdir()})
    env = {"ADAPTERHUB_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}
    r = run_cli("pull", "hf://other-org/evil-lora", "--json", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ref"] == "other-org/evil-lora:1"


def test_invalid_regex_and_numbers_in_a_config(cli, tmp_path):
    from tests.factories import patch_json, tiny_llama_base

    base = tiny_llama_base(tmp_path / "base")
    for i, (changes, needle) in enumerate(
        [
            ({"rank_pattern": {"(": 4}}, "'(' is not a valid regular expression"),
            ({"r": 0}, "r must be a positive integer, found 0"),
            ({"lora_alpha": "16"}, "lora_alpha must be a finite number, found '16'"),
            ({"rank_pattern": {"q_proj": "x"}}, "rank_pattern['q_proj'] must be a positive integer"),
            ({"modules_to_save": 3}, "modules_to_save must be a module name"),
        ]
    ):
        d = fake_lora(tmp_path / f"a{i}", hidden=64, targets=("q_proj",))
        patch_json(d / "adapter_config.json", **changes)
        r = cli("inspect", d)  # inspection describes it, and says what is wrong
        assert r.exit_code == 0 and needle in r.stderr, r.output
        r = cli("check", d, "--base", base, "--json")  # an incompatible adapter, with the reason
        out = json.loads(r.stdout)
        rule = next(x for x in out["rules"] if x["id"] == "peft-config")
        assert r.exit_code == 1 and rule["status"] == "error" and needle in json.dumps(rule), rule
        r = cli("merge", d, "--base", base, "-o", tmp_path / f"m{i}", "--device", "cpu")  # refused by name
        assert r.exit_code == 4 and needle in r.stderr and "unexpected" not in r.stderr, r.output


def _nested_gguf(path, depth):
    """A GGUF v3 header with one metadata value: arrays nested ``depth`` deep."""
    b = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    key = b"x.nested"
    b += struct.pack("<Q", len(key)) + key + struct.pack("<I", 9)  # type: array
    for _ in range(depth - 1):
        b += struct.pack("<IQ", 9, 1)  # an array of one array
    b += struct.pack("<IQ", 0, 0)  # innermost: an empty uint8 array
    path.write_bytes(b + b"\0" * 32)
    return path


def test_deep_nesting_in_configs_and_gguf_metadata_is_refused(cli, tmp_path):
    d = fake_lora(tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(cfg)[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}")
    r = cli("inspect", d)
    assert r.exit_code == 4 and "adapter_config.json: JSON nested deeper than 64 levels" in r.stderr
    r = cli("push", d, "x")
    assert r.exit_code == 4 and "nested deeper" in r.stderr
    assert cli("inspect", _nested_gguf(tmp_path / "ok.gguf", 3)).exit_code == 0
    r = cli("inspect", _nested_gguf(tmp_path / "deep.gguf", 5000))
    assert r.exit_code == 4 and "deep.gguf: GGUF metadata nested deeper than 8 levels of arrays" in r.stderr


def test_deep_nesting_in_a_base_config_is_refused_by_the_conversions(cli, tmp_path):
    """merge and quantize read config.json themselves: capped too, not a RecursionError (exit 1)."""
    from tests.factories import tiny_llama_base

    base = tiny_llama_base(tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(cfg)[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}")
    d = fake_lora(tmp_path / "a", hidden=64, targets=("q_proj",))
    for args in (("merge", d, "--base", base, "-o", tmp_path / "m", "--device", "cpu"),
                 ("quantize", base, "--to", "nf4", "-o", tmp_path / "q"),
                 ("check", d, "--base", base)):
        r = cli(*args)
        assert r.exit_code == 4 and "nested deeper than 64 levels" in r.stderr, (args[0], r.output)
        assert "unexpected" not in r.output


def test_a_deeply_nested_bitsandbytes_quant_state_is_refused():
    """The quant_state tensor of a bitsandbytes checkpoint is JSON from the checkpoint: capped, not a RecursionError."""
    torch = pytest.importorskip("torch")
    from adapterhub.errors import InvalidArtifactError
    from converters.formats.bnb_layout import QUANT_STATE_KEY, _quant_state

    def as_tensor(data: bytes):
        return {QUANT_STATE_KEY + "nf4": torch.tensor(list(data), dtype=torch.uint8)}

    good = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4, 4]}).encode()
    assert _quant_state(as_tensor(good))[1]["quant_type"] == "nf4"
    with pytest.raises(InvalidArtifactError, match="not the JSON bitsandbytes writes"):
        _quant_state(as_tensor(b"[" * 100_000 + b"]" * 100_000))


@pytest.mark.parametrize("value", ["abc", "nan", "-1", "inf", "1e12"])
def test_out_of_range_lock_timeout_is_a_usage_error(cli, tmp_path, monkeypatch, value):
    monkeypatch.setenv("ADAPTERHUB_LOCK_TIMEOUT", value)
    r = cli("push", fake_lora(tmp_path / "a"), "x")
    assert r.exit_code == 2 and "ADAPTERHUB_LOCK_TIMEOUT" in r.stderr and "unexpected" not in r.stderr


def test_a_refused_pickle_is_invalid_input_in_merge_and_verify(cli, tmp_path):
    import pickle

    from tests.factories import tiny_llama_base

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-never-run",))

    base = tiny_llama_base(tmp_path / "base")
    d = fake_lora(tmp_path / "a", hidden=64, targets=("q_proj",))
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"w": Payload()}, protocol=2))
    r = cli("merge", d, "--base", base, "-o", tmp_path / "m", "--device", "cpu")
    assert r.exit_code == 4 and "adapter_model.bin: refused or unreadable pickle (" in r.stderr and "posix.system" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 2  # the error and its hint, one line each
    r = cli("verify", base, "--adapter", d, "--base", base)
    assert r.exit_code == 4 and "a pickled weights file was refused: " in r.stderr and "posix.system" in r.stderr, r.output
    assert "unexpected" not in r.stderr and "should-never-run" not in r.output
