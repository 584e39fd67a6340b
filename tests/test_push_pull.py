import json
import os

import pytest

from adapterhub.registry import Registry

from .conftest import fake_lora


def _tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_push_pull_round_trip_cli(cli, tmp_path, home):
    src = fake_lora(tmp_path / "qa")
    r = cli("push", src, "team/qa-lora", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["ref"] == "team/qa-lora:1" and out["created"] is True
    assert out["method"] == "LORA" and out["rank"] == 8
    assert out["bytes_written"] == out["size"] > 0
    # Blobs are content-addressed and read-only.
    blobs = [p for p in (home / "blobs" / "sha256").rglob("*") if p.is_file()]
    assert len(blobs) == 2
    assert all(not (p.stat().st_mode & 0o222) for p in blobs)

    dest = tmp_path / "out"
    r = cli("pull", "team/qa-lora", dest, "--json")
    assert r.exit_code == 0, r.output
    assert _tree(dest) == _tree(src)
    assert json.loads(r.stdout)["digest"] == out["digest"]


def test_versions_auto_increment_and_latest_moves(tmp_path):
    reg = Registry()
    v1 = reg.push(fake_lora(tmp_path / "a", seed=1), "qa")
    v2 = reg.push(fake_lora(tmp_path / "b", seed=2), "qa")
    assert (v1.version, v2.version) == ("1", "2")
    assert reg.resolve("qa").version == "2"
    assert reg.resolve("qa@latest").digest == v2.digest
    assert reg.resolve(f"qa@{v1.digest}").version == "1"
    v3 = reg.push(fake_lora(tmp_path / "c", seed=3), "qa:1.0.0", tags=["prod"])
    assert v3.version == "1.0.0"
    assert set(reg.resolve("qa@prod").tags) == {"latest", "prod"}
    v4 = reg.push(fake_lora(tmp_path / "d", seed=4), "qa")
    assert v4.version == "3"  # semver versions do not disturb the integer sequence


def test_identical_push_is_a_noop(tmp_path, home):
    reg = Registry()
    src = fake_lora(tmp_path / "a")
    first = reg.push(src, "qa")
    before = sorted(os.listdir(home / "blobs" / "sha256"))
    again = reg.push(src, "qa")
    assert again.created is False and again.version == first.version and again.bytes_written == 0
    assert sorted(os.listdir(home / "blobs" / "sha256")) == before
    assert len(reg.ls("qa")) == 1
    # The same content under an explicit version is an alias, not a conflict.
    alias = reg.push(src, "qa:1.0-stable")  # versions start with a digit (issue 11)
    assert alias.created is True and alias.digest == first.digest and alias.bytes_written == 0


def test_version_is_immutable(cli, tmp_path):
    assert cli("push", fake_lora(tmp_path / "a", seed=1), "qa:1.0").exit_code == 0
    r = cli("push", fake_lora(tmp_path / "b", seed=2), "qa:1.0")
    assert r.exit_code == 5
    assert "already exists" in r.stderr
    assert cli("ls", "qa", "--quiet").stdout.split() == ["qa:1.0"]


def test_same_content_under_two_names_shares_blobs(tmp_path, home):
    reg = Registry()
    src = fake_lora(tmp_path / "a")
    reg.push(src, "one")
    second = reg.push(src, "two")
    assert second.created and second.bytes_written == 0
    assert reg.show("two").other_versions == ["one:1"]


def test_pull_refuses_non_empty_dest(cli, tmp_path):
    cli("push", fake_lora(tmp_path / "a"), "qa")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    r = cli("pull", "qa", dest)
    assert r.exit_code == 5 and "not empty" in r.stderr
    assert os.listdir(dest) == ["keep.txt"]
    r = cli("pull", "qa", dest, "--force")
    assert r.exit_code == 0
    assert sorted(os.listdir(dest)) == ["adapter_config.json", "adapter_model.safetensors", "keep.txt"]


def test_pull_into_existing_empty_dir(cli, tmp_path):
    cli("push", fake_lora(tmp_path / "a"), "qa")
    dest = tmp_path / "empty"
    dest.mkdir()
    assert cli("pull", "qa", dest).exit_code == 0
    assert (dest / "adapter_config.json").exists()


def test_pull_detects_corrupt_blob_and_leaves_nothing(cli, tmp_path, home):
    reg = Registry()
    res = reg.push(fake_lora(tmp_path / "a"), "qa")
    entry = next(f for f in reg.index.files(res.digest) if f.path == "adapter_model.safetensors")
    blob = reg.blobs.path(entry.sha256)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    r = cli("pull", "qa", dest)
    assert r.exit_code == 6
    assert "adapter_model.safetensors" in r.stderr
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dest")]


def test_unknown_ref(cli):
    r = cli("pull", "nope", "x")
    assert r.exit_code == 3 and "unknown name" in r.stderr
    cli_json = cli("show", "nope:3", "--json")
    assert cli_json.exit_code == 3
    assert json.loads(cli_json.stdout)["exit_code"] == 3


def test_single_file_artifact(tmp_path):
    pytest.importorskip("gguf")
    from .factories import gguf_file

    p = gguf_file(tmp_path / "m.gguf")
    reg = Registry()
    res = reg.push(p, "tiny-gguf")
    assert res.inspection.kind in ("gguf", "adapter")
    dest = tmp_path / "out"
    reg.pull("tiny-gguf", dest)
    assert (dest / "m.gguf").read_bytes() == p.read_bytes()


def test_pull_cleans_staging_left_by_a_killed_pull(tmp_path):
    import subprocess
    import sys

    reg = Registry()
    reg.push(fake_lora(tmp_path / "a"), "qa")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".dest.{dead.stdout.strip()}-abcd1234.incomplete"
    stale.mkdir()
    (stale / "adapter_config.json").write_text("{}")
    mine = tmp_path / f".dest.{os.getpid()}-abcd1234.incomplete"  # a live process's: kept
    mine.mkdir()
    reg.pull("qa", tmp_path / "dest")
    assert not stale.exists() and mine.exists()


def test_removed_version_numbers_are_never_reused(cli, tmp_path):
    cli("push", fake_lora(tmp_path / "a", seed=1), "x/a")
    cli("push", fake_lora(tmp_path / "b", seed=2), "x/a")
    assert cli("rm", "x/a:2", "--yes").exit_code == 0
    r = cli("push", fake_lora(tmp_path / "c", seed=3), "x/a", "--json")
    assert json.loads(r.stdout)["version"] == "3"
    assert cli("rm", "x/a", "--all", "--yes").exit_code == 0
    assert cli("show", "x/a").exit_code == 3
    r = cli("push", fake_lora(tmp_path / "d", seed=4), "x/a", "--json")
    assert json.loads(r.stdout)["version"] == "4"
    # An explicit number raises the mark too.
    cli("push", fake_lora(tmp_path / "e", seed=5), "x/a:9")
    assert json.loads(cli("push", fake_lora(tmp_path / "f", seed=6), "x/a", "--json").stdout)["version"] == "10"


def test_version_mark_starts_from_versions_pushed_before_the_migration(tmp_path, home):
    import sqlite3

    reg = Registry()
    reg.push(fake_lora(tmp_path / "a", seed=1), "qa")
    reg.push(fake_lora(tmp_path / "b", seed=2), "qa")
    reg.close()
    # An index from before m006_version_seq.
    conn = sqlite3.connect(home / "index.db")
    conn.execute("alter table names drop column last_seq")
    conn.execute("delete from _sqlite_migrations where name = 'm006_version_seq'")
    conn.commit()
    conn.close()
    reg = Registry()
    reg.execute_rm(reg.plan_rm("qa:2"))
    assert reg.push(fake_lora(tmp_path / "c", seed=3), "qa").version == "3"


def _hold_registry_lock(home):
    import subprocess
    import sys

    Registry().close()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
         str(home / "registry.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_push_says_it_waits_for_the_registry_lock(tmp_path, home):
    import select
    import subprocess
    import sys

    src = fake_lora(tmp_path / "a")
    holder = _hold_registry_lock(home)
    push = subprocess.Popen(
        [sys.executable, "-m", "adapterhub.cli", "push", str(src), "qa", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "ADAPTERHUB_LOCK_TIMEOUT": "300"},
    )
    try:
        # Wait for the push to say why it waits (the guard only keeps a silent push from hanging the test).
        assert select.select([push.stderr], [], [], 120)[0], "push waited without saying so"
        notice = push.stderr.readline()
    finally:
        holder.stdin.close()
        holder.wait()
    out, err = push.communicate(timeout=120)
    assert notice.startswith(f"waiting for another adapterhub process (pid {holder.pid}) to release the registry lock")
    assert push.returncode == 0, err
    assert json.loads(out)["ref"] == "qa:1"  # the notice stays off stdout


def test_lock_timeout_comes_from_the_environment(tmp_path, home):
    from .conftest import run_cli

    holder = _hold_registry_lock(home)
    try:
        # Without ADAPTERHUB_LOCK_TIMEOUT this would wait 600 s: the guard below fails instead.
        r = run_cli("push", fake_lora(tmp_path / "a"), "qa", env={"ADAPTERHUB_LOCK_TIMEOUT": "0.2"}, timeout=120)
    finally:
        holder.stdin.close()
        holder.wait()
    assert r.returncode == 7
    assert f"error: the registry is locked by another adapterhub process (pid {holder.pid})" in r.stderr
    assert "ADAPTERHUB_LOCK_TIMEOUT" in r.stderr


# -- issue 14: pull --link ----------------------------------------------------------------


def test_pull_link_materializes_without_copying_and_fsck_sees_edits_through_links(cli, tmp_path, home):
    src = fake_lora(tmp_path / "a")
    cli("push", src, "qa")
    dest = tmp_path / "linked"
    r = cli("pull", "qa", dest, "--link", "--json")
    assert r.exit_code == 0, r.output
    how = json.loads(r.stdout)["materialized"]
    assert how in ("reflink", "hardlink")
    reg = Registry()
    for f in reg.index.files(reg.resolve("qa").digest):
        out, blob = dest / f.path, reg.blobs.path(f.sha256)
        assert out.read_bytes() == (src / f.path).read_bytes()
        if how == "hardlink":  # the blob itself: read-only, same inode
            assert os.stat(out).st_ino == os.stat(blob).st_ino
            assert oct(os.stat(out).st_mode & 0o777) == "0o444"
    # Editing a hard-linked file in place changes the blob: fsck must say so.
    weights = dest / "adapter_model.safetensors"
    if how == "hardlink":
        os.chmod(weights, 0o644)
        with open(weights, "r+b") as fh:  # same size, other bytes
            fh.seek(100)
            b = fh.read(1)
            fh.seek(100)
            fh.write(bytes([b[0] ^ 0xFF]))
        r = cli("fsck", "--json")
        assert r.exit_code == 6 and any("corrupt" in p for p in json.loads(r.stdout)["problems"])
        # A copy pull re-hashes every byte: the damage is refused, not passed on.
        r = cli("pull", "qa", tmp_path / "copied")
        assert r.exit_code == 6 and not (tmp_path / "copied").exists()


def test_pull_copy_says_so_and_writes_independent_files(cli, tmp_path, home):
    cli("push", fake_lora(tmp_path / "a"), "qa")
    r = cli("pull", "qa", tmp_path / "c", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["materialized"] == "copy"
    reg = Registry()
    for f in reg.index.files(reg.resolve("qa").digest):
        assert os.stat(tmp_path / "c" / f.path).st_ino != os.stat(reg.blobs.path(f.sha256)).st_ino
