"""Trusted keys, scopes and the fail-closed policy on pull and conversions."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("model_signing")

from adapterhub.registry import Registry

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

    from adapterhub.registry.migrations import migrations

    db = Database(memory=True)
    migrations.apply(db)
    assert {"trusted_keys", "policy"} <= set(db.table_names())
    assert "kind" in db["signatures"].columns_dict
    assert db["policy"].pks == ["namespace", "rule"]


def test_require_provenance_applies_to_conversions(cli, tmp_path):
    from adapterhub.trust.gate import check_inputs
    from adapterhub.sources import resolve_source

    cli("keys", "generate")
    reg = Registry()
    a = reg.push(fake_lora(tmp_path / "a"), "team/a")
    reg.push(fake_lora(tmp_path / "m", seed=3), "team/m", derived_from=[(a.digest, "adapter")], recipe={"operation": "merge"})
    assert cli("policy", "set", "require-provenance").exit_code == 0
    r = cli("quantize", "team/m:1", "--to", "int8", "-o", tmp_path / "q")
    assert r.exit_code == 8 and "source input: the provenance of team/m:1 does not verify" in r.stderr, r.output
    assert "no signed provenance" in r.stderr and not (tmp_path / "q").exists()
    assert cli("sign", "team/m", "--provenance").exit_code == 0
    assert check_inputs({"source": resolve_source("team/m:1", reg)}, reg) == {"source": {"provenance": "incomplete"}}
    assert cli("sign", "team/a").exit_code == 0
    assert check_inputs({"source": resolve_source("team/m:1", reg)}, reg) == {"source": {"provenance": "verified"}}


def test_unsigned_conversion_input_is_named_with_a_hint(cli, tmp_path):
    cli("keys", "generate")
    cli("push", fake_lora(tmp_path / "a"), "team/qa-lora", "--sign")
    cli("push", fake_lora(tmp_path / "b", seed=2), "team/llama")
    cli("policy", "set", "require-signature", "--namespace", "team")
    r = cli("merge", "team/qa-lora", "--base", "team/llama", "--push", "team/qa-merged")
    assert r.exit_code == 8
    assert "base input: team/llama:1 is not signed" in r.stderr
    assert "hint: `adapterhub sign team/llama:1` signs it" in r.stderr


def test_trust_add_of_a_listed_key_needs_replace(cli, tmp_path):
    cli("keys", "generate", "release")
    pub = tmp_path / "release.pub"
    pub.write_text(cli("keys", "export", "release").stdout)
    r = cli("trust", "add", pub, "--name", "alice2", "--scope", "team")
    assert r.exit_code == 5 and "is already trusted" in r.stderr
    assert "its name from 'release' to 'alice2'" in r.stderr and "--replace" in r.stderr
    [k] = json.loads(cli("trust", "ls", "--json").stdout)
    assert k["name"] == "release" and k["scopes"] == [] and k["not_after"] is None
    assert cli("trust", "add", pub, "--name", "release").exit_code == 0  # nothing changes: fine
    r = cli("trust", "add", pub, "--expires", "2001-01-01", "--replace")
    assert r.exit_code == 2 and "not in the future" in r.stderr
    r = cli("trust", "add", pub, "--name", "alice2", "--scope", "team", "--expires", "2999-01-01", "--replace")
    assert r.exit_code == 0, r.output
    [k] = json.loads(cli("trust", "ls", "--json").stdout)
    assert (k["name"], k["scopes"], k["not_after"]) == ("alice2", ["team"], "2999-01-01T00:00:00Z")
    r = cli("keys", "revoke", "release")
    assert r.exit_code == 0 and r.stdout.startswith("revoked key alice2 (asked for as 'release') ")
    r = cli("trust", "add", pub)
    assert r.exit_code == 5 and "was revoked on" in r.stderr and "its revocation" in r.stderr
    assert cli("trust", "add", pub, "--replace").exit_code == 0
    assert json.loads(cli("trust", "ls", "--json").stdout)[0]["revoked_at"] is None


def test_keys_export_json(cli):
    cli("keys", "generate", "release")
    data = json.loads(cli("keys", "export", "release", "--json").stdout)
    assert data["name"] == "release" and data["key_id"] == json.loads(cli("keys", "list", "--json").stdout)[0]["key_id"]
    assert data["public_key_pem"] == cli("keys", "export", "release").stdout
    assert data["public_key_pem"].startswith("-----BEGIN PUBLIC KEY-----") and "private_key_pem" not in data
    assert "PRIVATE KEY" in json.loads(cli("keys", "export", "release", "--private", "--json").stdout)["private_key_pem"]
