"""Trusted keys, scopes and the fail-closed policy on pull and conversions."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("model_signing")

from registry import Registry

from .conftest import fake_lora


def test_policy_require_signature_fails_closed_on_pull(cli, tmp_path):
    cli("push", fake_lora(tmp_path / "a"), "team/qa")
    cli("push", fake_lora(tmp_path / "b", seed=2), "other/qa")
    assert cli("policy", "set", "require-signature", "--namespace", "team").exit_code == 0
    r = cli("pull", "team/qa", tmp_path / "d")
    assert r.exit_code == 8 and "team/qa:1 is not signed, and the trust policy requires a signature" in r.output
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.*"))
    assert cli("pull", "other/qa", tmp_path / "o").exit_code == 0  # another namespace: no rule
    cli("keys", "generate")
    assert cli("sign", "team/qa").exit_code == 0
    r = cli("pull", "team/qa", tmp_path / "d", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["trust"]["signature"]["key_name"] == "default"
    assert (tmp_path / "d" / "model.sig").exists()
    rules = json.loads(cli("policy", "show", "--json").stdout)
    assert [(x["namespace"], x["rule"]) for x in rules] == [("team", "require-signature")]
    assert cli("policy", "unset", "require-signature", "--namespace", "team").exit_code == 0
    assert cli("policy", "unset", "require-signature").exit_code == 3


def test_global_policy_and_revocation_from_then_on(cli, tmp_path):
    cli("keys", "generate")
    cli("push", fake_lora(tmp_path / "a"), "qa", "--sign")
    cli("policy", "set", "require-signature")
    assert cli("pull", "qa", tmp_path / "d1").exit_code == 0
    cli("keys", "revoke", "default")
    r = cli("pull", "qa", tmp_path / "d2")
    assert r.exit_code == 8 and "was revoked" in r.output and not (tmp_path / "d2").exists()


def test_pull_force_with_policy_checks_only_the_artifact(cli, tmp_path):
    cli("keys", "generate")
    cli("push", fake_lora(tmp_path / "a"), "qa", "--sign")
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    r = cli("pull", "qa", dest, "--force", "--require-signature")
    assert r.exit_code == 0, r.output
    assert (dest / "notes.txt").exists() and (dest / "model.sig").exists()
    cli("keys", "revoke", "default")
    (dest / "adapter_config.json").write_text("kept")
    r = cli("pull", "qa", dest, "--force", "--require-signature")
    assert r.exit_code == 8 and (dest / "adapter_config.json").read_text() == "kept"  # nothing overwritten


def test_scoped_key(cli, tmp_path, home):
    cli("keys", "generate", "alice", "--no-trust")
    pub = tmp_path / "alice.pub"
    pub.write_text(cli("keys", "export", "alice").stdout)
    assert cli("trust", "add", pub, "--name", "alice", "--scope", "team").exit_code == 0
    cli("push", fake_lora(tmp_path / "a"), "team/qa", "--sign", "--key", "alice")
    cli("push", fake_lora(tmp_path / "b", seed=3), "other/qa", "--sign", "--key", "alice")
    assert cli("verify-signature", "team/qa").exit_code == 0
    r = cli("verify-signature", "other/qa")
    assert r.exit_code == 8 and "trusted only for team, not for namespace 'other'" in r.output
    ls = json.loads(cli("trust", "ls", "--json").stdout)
    assert ls[0]["scopes"] == ["team"] and ls[0]["name"] == "alice"


def test_merge_require_signature_refuses_unsigned_inputs_before_work(cli, tmp_path):
    cli("push", fake_lora(tmp_path / "a"), "team/qa")
    cli("push", fake_lora(tmp_path / "b", seed=2), "team/base")
    r = cli("merge", "team/qa", "--base", "team/base", "--push", "team/merged", "--require-signature")
    assert r.exit_code == 8 and "adapter input" in r.output and "is not signed" in r.output
    assert [v.name for v in Registry().ls()] == ["team/base", "team/qa"]
    # A policy does the same without the flag; a directory input needs a model.sig.
    cli("policy", "set", "require-signature")
    r = cli("quantize", tmp_path / "b", "--to", "int8", "-o", tmp_path / "q")
    assert r.exit_code == 8 and "is not signed (no model.sig)" in r.output and not (tmp_path / "q").exists()


def test_keys_import_rm_and_trust_add_rm(cli, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    k = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "k.pem"
    pem.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    assert cli("keys", "import", "ci", pem).exit_code == 0
    ed = tmp_path / "ed.pem"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    r = cli("keys", "import", "ed", ed)
    assert r.exit_code == 4 and "only EC keys" in r.output
    pub = tmp_path / "ci.pub"
    pub.write_text(cli("keys", "export", "ci").stdout)
    assert cli("trust", "add", pub, "--name", "ci").exit_code == 0
    assert cli("trust", "rm", "ci").exit_code == 0
    assert cli("trust", "rm", "ci").exit_code == 3
    assert cli("keys", "rm", "ci", "--yes").exit_code == 0
    assert json.loads(cli("keys", "list", "--json").stdout) == []


def test_trust_tables_come_from_a_migration():
    from sqlite_utils import Database

    from registry.migrations import migrations

    db = Database(memory=True)
    migrations.apply(db)
    assert {"trusted_keys", "policy"} <= set(db.table_names())
    assert "kind" in db["signatures"].columns_dict
    assert db["policy"].pks == ["namespace", "rule"]
