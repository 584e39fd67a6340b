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

    monkeypatch.setattr(rr.Registry, "ls", boom)
    r = cli("ls")
    assert r.exit_code == 1
    assert "unexpected error: RuntimeError: kaboom" in r.stderr and "ADAPTERHUB_DEBUG" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_optional_dependency_is_explained(cli, monkeypatch):
    import adapterhub.registry.registry as rr

    def needs_torch(*a, **k):
        import adapterhub_no_such_module  # noqa: F401

    monkeypatch.setattr(rr.Registry, "ls", needs_torch)
    r = cli("ls")
    assert r.exit_code == 1
    assert "needs the Python package 'adapterhub_no_such_module'" in r.stderr and "adapterhub[ml]" in r.stderr
