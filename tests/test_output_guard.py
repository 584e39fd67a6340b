"""One guard for every command that writes or replaces a directory (merge,
quantize, dequantize, pull --force): OUT must not be, contain or lie inside one
of its inputs or the registry home, compared with symlinks resolved.

Before the guard, ``merge -o BASE --force`` replaced the base weights with the
merged ones, and ``merge -o $ADAPTERHUB_HOME --force`` (or a folder above the
inputs) deleted the whole registry.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub.errors import ConflictError

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from .factories import lora_adapter, tiny_llama_base  # noqa: E402


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    base = tiny_llama_base(tmp_path / "inputs" / "base")
    adapter = lora_adapter(tmp_path / "inputs" / "lora", base_dir=base, base_model_name_or_path=str(base))
    return base, adapter


def snapshot(*dirs: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}


def registry_state(cli) -> list[str]:
    r = cli("ls", "--json")
    assert r.exit_code == 0, r.output
    return sorted(json.dumps(x, sort_keys=True) for x in json.loads(r.stdout))


def out_for(case: str, tmp_path: Path, base: Path) -> Path:
    if case == "base":
        return base
    if case == "parent-of-inputs":
        return tmp_path / "inputs"
    if case == "inside-base":
        return base / "merged"
    if case == "symlink-to-base":
        link = tmp_path / "link"
        link.symlink_to(base, target_is_directory=True)
        return link
    if case == "inside-symlink-to-parent":
        link = tmp_path / "up"
        link.symlink_to(tmp_path / "inputs", target_is_directory=True)
        return link / "base"
    raise AssertionError(case)


CASES = ["base", "parent-of-inputs", "inside-base", "symlink-to-base", "inside-symlink-to-parent"]


@pytest.mark.parametrize("case", CASES)
def test_merge_refuses_an_out_that_overlaps_an_input(cli, tmp_path, models, case):
    base, adapter = models
    out = out_for(case, tmp_path, base)
    before = snapshot(base, adapter)
    r = cli("merge", adapter, "--base", base, "-o", out, "--force", "--device", "cpu")
    assert r.exit_code == 5, r.output
    assert "the input" in r.stderr and "Traceback" not in r.output
    assert snapshot(base, adapter) == before


@pytest.mark.parametrize("where", ["home", "parent-of-home", "inside-home"])
def test_merge_refuses_the_registry_home(cli, tmp_path, models, home, where):
    base, adapter = models
    assert cli("push", adapter, "team/lora").exit_code == 0
    assert cli("push", base, "team/base").exit_code == 0
    before = registry_state(cli)
    out = {"home": home, "parent-of-home": home.parent, "inside-home": home / "blobs"}[where]
    r = cli("merge", "team/lora", "--base", "team/base", "-o", out, "--force", "--device", "cpu")
    assert r.exit_code == 5, r.output
    assert "registry home" in r.stderr
    assert registry_state(cli) == before
    assert json.loads(cli("fsck", "--json").stdout)["ok"] is True


def test_quantize_refuses_an_out_inside_its_input(cli, tmp_path, models):
    base, _ = models
    before = snapshot(base)
    r = cli("quantize", base, "--to", "nf4", "-o", base / "nf4", "--force", "--device", "cpu")
    assert r.exit_code == 5 and "the input" in r.stderr, r.output
    assert snapshot(base) == before


def test_dequantize_refuses_the_registry_home(cli, tmp_path, models, home):
    base, _ = models
    q = tmp_path / "q"
    assert cli("quantize", base, "--to", "nf4", "-o", q, "--device", "cpu").exit_code == 0
    assert cli("push", base, "team/base").exit_code == 0
    before = registry_state(cli)
    r = cli("dequantize", q, "-o", home, "--force", "--device", "cpu")
    assert r.exit_code == 5 and "registry home" in r.stderr, r.output
    assert registry_state(cli) == before


@pytest.mark.parametrize("where", ["home", "parent-of-home", "inside-home"])
def test_pull_force_refuses_the_registry_home(cli, models, home, where):
    _, adapter = models
    assert cli("push", adapter, "team/lora").exit_code == 0
    before = registry_state(cli)
    listing = sorted(p.name for p in home.iterdir())
    dest = {"home": home, "parent-of-home": home.parent, "inside-home": home / "blobs"}[where]
    r = cli("pull", "team/lora", dest, "--force")
    assert r.exit_code == 5 and "registry home" in r.stderr, r.output
    assert sorted(p.name for p in home.iterdir()) == listing
    assert registry_state(cli) == before


def test_pull_force_elsewhere_still_works(cli, tmp_path, models):
    _, adapter = models
    assert cli("push", adapter, "team/lora").exit_code == 0
    dest = tmp_path / "deploy"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    assert cli("pull", "team/lora", dest, "--force").exit_code == 0
    assert (dest / "adapter_config.json").exists() and (dest / "keep.txt").exists()


# --------------------------------------------------------------------------- the guard itself


def test_guard_cases(tmp_path):
    from adapterhub.fsutil import check_output_dir

    inp = tmp_path / "in"
    (inp / "sub").mkdir(parents=True)
    f = inp / "sub" / "w.safetensors"
    f.write_bytes(b"x")
    home = tmp_path / "home"
    home.mkdir()
    for out in (inp, tmp_path, inp / "sub" / "new", f):
        with pytest.raises(ConflictError, match="the input"):
            check_output_dir(out, [inp, f])
    for out in (home, tmp_path, home / "x"):
        with pytest.raises(ConflictError, match="registry home"):
            check_output_dir(out, [], home=home)
    # siblings and look-alike names are fine
    check_output_dir(tmp_path / "out", [inp, f], home=home)
    check_output_dir(tmp_path / "in-merged", [inp, f], home=home)
    check_output_dir(tmp_path / "homework", [], home=home)


def test_guard_follows_symlinks_both_ways(tmp_path):
    from adapterhub.fsutil import check_output_dir

    real = tmp_path / "real"
    real.mkdir()
    (real / "w.safetensors").write_bytes(b"x")
    # an input file that is a symlink into another folder: that folder is an input too
    view = tmp_path / "view"
    view.mkdir()
    (view / "w.safetensors").symlink_to(real / "w.safetensors")
    with pytest.raises(ConflictError, match="the input"):
        check_output_dir(real, [view, view / "w.safetensors"])
    # an OUT that is a symlink to an input, or lies under one
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    for out in (tmp_path / "link", tmp_path / "link" / "deeper"):
        with pytest.raises(ConflictError, match="the input"):
            check_output_dir(out, [real])
