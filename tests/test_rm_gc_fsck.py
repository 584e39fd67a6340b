import json
import os

from adapterhub.registry import Registry

from .conftest import fake_lora


def _blob_count(home):
    return sum(1 for p in (home / "blobs" / "sha256").rglob("*") if p.is_file())


def test_rm_plans_then_acts(cli, tmp_path, home):
    shared = fake_lora(tmp_path / "a", seed=1)
    cli("push", shared, "qa")
    cli("push", fake_lora(tmp_path / "b", seed=2), "qa")
    cli("push", shared, "other")  # shares blobs with qa:1
    assert _blob_count(home) == 3  # one shared config blob + two weight blobs
    r = cli("rm", "qa:1", "--dry-run", "--json")
    plan = json.loads(r.stdout)
    assert r.exit_code == 0 and plan["executed"] is False
    assert plan["versions"] == ["qa:1"] and plan["freed_bytes"] == 0  # `other` still uses them
    assert cli("show", "qa:1").exit_code == 0

    r = cli("rm", "qa:2")  # not a terminal, no --yes
    assert r.exit_code == 2 and "--yes" in r.output
    assert cli("show", "qa:2").exit_code == 0

    r = cli("rm", "qa:2", "--yes", "--json")
    plan = json.loads(r.stdout)
    assert plan["executed"] is True and plan["freed_bytes"] > 0
    assert cli("show", "qa:2").exit_code == 3
    assert json.loads(cli("show", "qa", "--json").stdout)["version"] == "1"  # latest falls back
    assert _blob_count(home) == 2


def test_rm_all_and_gc(cli, tmp_path, home):
    cli("push", fake_lora(tmp_path / "a", seed=1), "qa")
    cli("push", fake_lora(tmp_path / "b", seed=2), "qa")
    r = cli("rm", "qa", "--all", "--yes")
    assert r.exit_code == 0 and "frees" in r.stdout
    assert cli("ls", "--json").stdout.strip() == "[]"
    assert _blob_count(home) == 0
    assert json.loads(cli("fsck", "--json").stdout)["ok"] is True


def test_gc_removes_orphans_and_temp_files(cli, tmp_path, home):
    reg = Registry()
    res = reg.push(fake_lora(tmp_path / "a"), "qa")
    orphan = reg.blobs.path("ab" * 32)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"orphan")
    temp = reg.blobs.path(res.digest[7:]).with_name("x.123.incomplete")
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.write_bytes(b"partial")
    fsck = json.loads(cli("fsck", "--json").stdout)
    assert fsck["ok"] is True  # leftovers are reclaimable, not damage
    assert fsck["unreferenced_blobs"] == ["ab" * 32] and len(fsck["temp_files"]) == 1
    r = cli("gc", "--dry-run")
    assert r.exit_code == 0 and orphan.exists()
    r = cli("gc", "--yes", "--json")
    assert json.loads(r.stdout)["freed_bytes"] == 6
    assert not orphan.exists() and not temp.exists()
    assert cli("pull", "qa", tmp_path / "out").exit_code == 0


def test_gc_removes_work_dirs_of_killed_hub_imports(cli, tmp_path, home):
    import subprocess

    # A Hub import killed mid-way leaves .hf-import.<pid>-<hex>.incomplete in the home.
    dead = subprocess.Popen(["true"])
    dead.wait()
    Registry().close()
    left = home / f".hf-import.{dead.pid}-0badcafe.incomplete"
    (left / "qa").mkdir(parents=True)
    (left / "qa" / "adapter_model.safetensors").write_bytes(b"partial")
    mine = home / f".hf-import.{os.getpid()}-00c0ffee.incomplete"  # a live process: not touched
    mine.mkdir()
    fsck = json.loads(cli("fsck", "--json").stdout)
    assert fsck["ok"] is True and str(left) in fsck["temp_files"] and str(mine) not in fsck["temp_files"]
    r = cli("gc", "--yes", "--json")
    assert r.exit_code == 0 and str(left) in json.loads(r.stdout)["temp_files"]
    assert not left.exists() and mine.exists()


def test_fsck_lists_every_problem(cli, tmp_path, home):
    reg = Registry()
    res = reg.push(fake_lora(tmp_path / "a"), "qa")
    files = reg.index.files(res.digest)
    missing, corrupt = reg.blobs.path(files[0].sha256), reg.blobs.path(files[1].sha256)
    os.unlink(missing)
    os.chmod(corrupt, 0o644)
    corrupt.write_bytes(b"tampered")
    reg.index.conn.execute("insert into tags (name, tag, version, updated_at) values ('qa', 'ghost', '9', 'x')")
    r = cli("fsck", "--json")
    assert r.exit_code == 6
    problems = json.loads(r.stdout)["problems"]
    assert any("missing" in p and files[0].sha256 in p for p in problems)
    assert any("corrupt" in p and files[1].sha256 in p for p in problems)
    assert any("qa@ghost" in p for p in problems)
    r = cli("fsck")
    assert r.exit_code == 6 and r.stdout.count("problem:") == 3


def test_rm_plan_warns_about_derived_artifacts(cli, tmp_path, home):
    reg = Registry()
    parent = reg.push(fake_lora(tmp_path / "a", seed=1), "team/minilm")
    reg.push(fake_lora(tmp_path / "m", seed=2), "team/minilm-merged", derived_from=[(parent.digest, "adapter")])
    reg.close()
    r = cli("rm", "team/minilm:1", "--dry-run")
    assert r.exit_code == 0
    assert (
        "warning: 1 artifact was derived from it: team/minilm-merged:1; its lineage will point at a digest"
        in r.stderr
    )
    r = cli("rm", "team/minilm:1", "--dry-run", "--json")
    assert json.loads(r.stdout)["dependents"] == ["team/minilm-merged:1"]
    r = cli("rm", "team/minilm:1", "--yes")  # still allowed
    assert r.exit_code == 0 and "derived from it" in r.stderr
    assert cli("show", "team/minilm-merged:1").exit_code == 0
    # Removing the child too: nothing left to warn about.
    cli("push", tmp_path / "a", "team/minilm")
    r = cli("rm", "team/minilm-merged", "--all", "--dry-run")
    assert r.exit_code == 0 and "derived" not in r.stderr


def test_rm_all_with_a_version_says_to_give_the_name(cli, tmp_path):
    cli("push", fake_lora(tmp_path / "a"), "team/qa-lora")
    r = cli("rm", "team/qa-lora:1", "--all", "--yes")
    assert r.exit_code == 2
    assert r.stderr.splitlines()[-1] == "error: --all takes a NAME, not a version (team/qa-lora)"
    assert cli("show", "team/qa-lora:1").exit_code == 0
