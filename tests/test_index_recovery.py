"""Issue 16, items 3 and 4: a lost, empty or damaged index.db is damage, never a new registry.

Every change to the index is also written as a record blob (registry/records.py),
and ``fsck --rebuild-index`` rebuilds the index from them.
"""

from __future__ import annotations

import json
import os

import pytest

from adapterhub.registry import Registry

from .conftest import fake_lora

COMMANDS = (("ls",), ("show", "team/qa"), ("fsck",), ("gc", "--yes"), ("search", "lora"), ("pull", "team/qa", "OUT"))


def _populate(cli, tmp_path):
    cli("push", fake_lora(tmp_path / "a", seed=1), "team/qa", "--tag", "prod")
    cli("push", fake_lora(tmp_path / "b", seed=2), "team/qa", "-d", "second")
    cli("push", fake_lora(tmp_path / "c", seed=3), "other:1.0.0")
    cli("tag", "team/qa:1", "stable")
    cli("policy", "set", "require-signature", "--namespace", "acme")
    return json.loads(cli("ls", "--json").stdout)


def _blobs(home):
    return sorted(p.name for p in (home / "blobs" / "sha256").rglob("*") if p.is_file())


def _damage(home, how):
    db = home / "index.db"
    for side in ("index.db-wal", "index.db-shm"):
        (home / side).unlink(missing_ok=True)
    if how == "empty":
        db.write_bytes(b"")
    elif how == "missing":
        db.unlink()
    elif how == "truncated":
        with open(db, "r+b") as fh:
            fh.truncate(db.stat().st_size // 2)
    elif how == "header":
        with open(db, "r+b") as fh:
            fh.write(b"this is not sqlite" * 4)


@pytest.mark.parametrize("how", ["empty", "missing", "truncated", "header"])
def test_a_lost_or_damaged_index_is_an_integrity_error_everywhere(cli, tmp_path, home, how):
    _populate(cli, tmp_path)
    Registry().close()
    before = _blobs(home)
    _damage(home, how)
    for args in COMMANDS:
        args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
        r = cli(*args)
        assert r.exit_code == 6, (args, r.output)
        assert "fsck --rebuild-index" in r.stderr and "unexpected error" not in r.stderr, (args, r.stderr)
    assert _blobs(home) == before  # gc refused: nothing was deleted
    assert not (home / "index.db").exists() or how != "missing"


@pytest.mark.parametrize("how", ["empty", "missing", "truncated", "header"])
def test_fsck_rebuild_index_restores_versions_tags_and_policy(cli, tmp_path, home, how):
    listed = _populate(cli, tmp_path)
    Registry().close()
    _damage(home, how)
    r = cli("fsck", "--rebuild-index", "--json")
    assert r.exit_code == 0, r.output
    rebuilt = json.loads(r.stdout)["rebuilt"]
    assert rebuilt["restored"]["version"] == 3 and rebuilt["skipped"] == []
    if how in ("truncated", "header"):
        assert rebuilt["kept_aside"] and os.path.exists(rebuilt["kept_aside"])
    assert json.loads(cli("ls", "--json").stdout) == listed  # tags, times, descriptions and all
    assert json.loads(cli("show", "team/qa@stable", "--json").stdout)["version"] == "1"
    assert json.loads(cli("policy", "show", "--json").stdout)[0]["namespace"] == "acme"
    # The registry works as before: the next push gets the next number.
    r = cli("push", fake_lora(tmp_path / "d", seed=4), "team/qa", "--json")
    assert json.loads(r.stdout)["version"] == "3"


def test_what_was_removed_stays_removed_after_a_rebuild(cli, tmp_path, home):
    _populate(cli, tmp_path)
    cli("untag", "team/qa@stable")
    cli("rm", "other:1.0.0", "--yes")
    cli("policy", "unset", "require-signature", "--namespace", "acme")
    Registry().close()
    _damage(home, "empty")
    assert cli("fsck", "--rebuild-index").exit_code == 0
    assert [v["ref"] for v in json.loads(cli("ls", "--json").stdout)] == ["team/qa:1", "team/qa:2"]
    assert cli("show", "team/qa@stable").exit_code == 3
    assert json.loads(cli("policy", "show", "--json").stdout) == []


def test_rebuild_restores_signatures_and_trusted_keys(cli, tmp_path, home):
    pytest.importorskip("model_signing")
    assert cli("keys", "generate", "alice").exit_code == 0
    cli("push", fake_lora(tmp_path / "a"), "team/qa")
    assert cli("sign", "team/qa", "--key", "alice").exit_code == 0
    before = cli("verify-signature", "team/qa")
    assert before.exit_code == 0, before.output
    Registry().close()
    _damage(home, "header")
    assert cli("fsck", "--rebuild-index").exit_code == 0
    assert cli("verify-signature", "team/qa").exit_code == 0
    assert json.loads(cli("trust", "ls", "--json").stdout)[0]["name"] == "alice"


def test_gc_collects_superseded_records_but_keeps_current_ones(cli, tmp_path, home):
    _populate(cli, tmp_path)
    cli("tag", "team/qa:2", "stable")  # the tag's old record is superseded
    plan = json.loads(cli("gc", "--dry-run", "--json").stdout)
    assert plan["records"] >= 1
    assert cli("gc", "--yes").exit_code == 0
    assert json.loads(cli("gc", "--dry-run", "--json").stdout)["records"] == 0
    Registry().close()
    _damage(home, "empty")
    assert cli("fsck", "--rebuild-index").exit_code == 0
    assert json.loads(cli("show", "team/qa@stable", "--json").stdout)["version"] == "2"


def test_an_index_from_before_records_can_write_them(cli, tmp_path, home):
    _populate(cli, tmp_path)
    reg = Registry()
    reg.index.conn.execute("delete from records")  # as an older adapterhub left it
    reg.close()
    fsck = json.loads(cli("fsck", "--json").stdout)
    assert fsck["ok"] and fsck["unrecorded_versions"] == 3
    assert "fsck --write-records" in cli("fsck").stdout
    assert cli("fsck", "--write-records").exit_code == 0
    assert json.loads(cli("fsck", "--json").stdout)["unrecorded_versions"] == 0
    _damage(home, "empty")
    assert cli("fsck", "--rebuild-index").exit_code == 0
    assert len(json.loads(cli("ls", "--json").stdout)) == 3


def test_a_new_registry_is_still_created_where_there_is_nothing(cli, tmp_path, home):
    home.mkdir(parents=True)
    (home / "index.db").write_bytes(b"")  # a kill -9 during the very first open
    assert cli("ls").exit_code == 0
    assert cli("push", fake_lora(tmp_path / "a"), "qa").exit_code == 0
