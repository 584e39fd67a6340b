import json
import os

import pytest

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


# -- issue 16: sizes, same-size damage, staging areas -----------------------------------


def _tamper_same_size(path):
    """Flip one byte of a read-only blob in place: same size, other content."""
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_fsck_rehashes_a_same_size_change(cli, tmp_path):
    """fsck must compare hashes, not sizes; this needs nothing but adapterhub (never skipped)."""
    reg = Registry()
    res = reg.push(fake_lora(tmp_path / "a"), "qa")
    weights = next(f for f in reg.index.files(res.digest) if f.path.endswith(".safetensors"))
    blob = reg.blobs.path(weights.sha256)
    size = blob.stat().st_size
    _tamper_same_size(blob)
    assert blob.stat().st_size == size
    r = cli("fsck", "--json")
    assert r.exit_code == 6
    assert any("corrupt" in p and weights.sha256 in p for p in json.loads(r.stdout)["problems"])


def test_a_file_that_grows_while_pushed_is_recorded_with_the_bytes_hashed(tmp_path):
    """Issue 16, item 2: the size recorded is what the digest covers, never an earlier stat."""
    src = fake_lora(tmp_path / "a")
    (src / "extra-1.bin").write_bytes(b"x" * 4096)
    grows = src / "extra-2.bin"
    grows.write_bytes(b"y" * 4096)  # same size as extra-1: hashed before it is stored
    grown = []

    class Bar:
        def update(self, n):
            if not grown:  # the file grows after its first chunk was hashed
                with open(grows, "ab") as fh:
                    fh.write(b"z" * 1000)
                grown.append(n)

        def close(self):
            pass

    reg = Registry()
    res = reg.push(src, "qa", progress=lambda desc, total: Bar())
    assert grown
    entry = next(f for f in reg.index.files(res.digest) if f.path == "extra-2.bin")
    assert entry.size == 5096 == reg.blobs.path(entry.sha256).stat().st_size
    assert res.size == sum(p.stat().st_size for p in src.iterdir())
    assert reg.fsck().ok
    out = reg.pull("qa", tmp_path / "out")
    assert (tmp_path / "out" / "extra-2.bin").stat().st_size == entry.size and out.size == res.size


def test_fsck_compares_every_blob_size_with_every_file_row(cli, tmp_path):
    reg = Registry()
    res = reg.push(fake_lora(tmp_path / "a"), "qa")
    f = reg.index.files(res.digest)[0]
    # A row that lies about the size of an intact blob (the artifact's totals agree with it).
    reg.index.conn.execute("update files set size = size + 7 where digest = ? and path = ?", (res.digest, f.path))
    reg.index.conn.execute("update artifacts set size = size + 7 where digest = ?", (res.digest,))
    r = cli("fsck", "--json")
    assert r.exit_code == 6
    problems = json.loads(r.stdout)["problems"]
    assert any(f"recorded as {f.size + 7} bytes" in p and f.path in p for p in problems), problems


def test_every_staging_area_in_the_home_is_reported_and_collected(cli, tmp_path, home):
    """Issue 16, item 6: a killed merge --push, sign or Hub import leaves a staging dir in the home."""
    import subprocess
    import time

    dead = subprocess.Popen(["true"])
    dead.wait()
    reg = Registry()
    left = []
    for purpose in ("convert", "view", "hf-import", "anything-new"):
        d = home / f".{purpose}.{dead.pid}-0badcafe.incomplete"
        (d / "out").mkdir(parents=True)
        (d / "out" / "model.safetensors").write_bytes(b"w" * 1000)
        left.append(d)
    mine = reg.staging_dir("convert")  # a live process's: never touched
    assert mine.name.startswith(f".convert.{os.getpid()}-") and mine.name.endswith(".incomplete")
    legacy = home / ".convert-abc123de"  # made before staging dirs carried a pid
    legacy.mkdir()
    old = time.time() - 2 * 24 * 3600
    os.utime(legacy, (old, old))
    fresh_legacy = home / ".view-0123abcd.incomplete"
    fresh_legacy.mkdir()
    fsck = json.loads(cli("fsck", "--json").stdout)
    assert fsck["ok"] is True
    assert set(map(str, [*left, legacy])) <= set(fsck["temp_files"])
    assert str(mine) not in fsck["temp_files"] and str(fresh_legacy) not in fsck["temp_files"]
    r = cli("gc", "--yes", "--json")
    assert r.exit_code == 0
    assert not any(d.exists() for d in [*left, legacy])
    assert mine.exists() and fresh_legacy.exists()


@pytest.mark.slow
def test_a_killed_merge_push_leaves_a_staging_dir_that_gc_collects(cli, tmp_path, home):
    """kill -9 while merge --push writes its output into the home: fsck reports it, gc removes it."""
    from ._crash import signal_when, spawn
    from .factories import lora_adapter, tiny_llama_base

    base = tiny_llama_base(tmp_path / "base", hidden_size=512, layers=8, vocab=4096)
    adapter = lora_adapter(tmp_path / "lora", base_dir=base, hidden_size=512, layers=8, vocab=4096)
    Registry().close()

    def writing() -> bool:
        return any(p.name.startswith(".convert.") and any(p.rglob("*.safetensors*")) for p in home.iterdir())

    proc = spawn("merge", adapter, "--base", base, "--push", "team/merged", home=home)
    sent, _, err = signal_when(proc, writing)
    assert sent, err
    left = [p for p in home.iterdir() if p.name.startswith(".convert.")]
    assert len(left) == 1
    fsck = json.loads(cli("fsck", "--json").stdout)
    assert fsck["ok"] is True and str(left[0]) in fsck["temp_files"]
    assert cli("gc", "--yes").exit_code == 0 and not left[0].exists()
