"""Signing in the OpenSSF model-signing format: the round trip through the real
`model_signing` CLI, and one test per attack (each rejected with a message that
names what is wrong, and nothing marked trusted)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("model_signing")

from adapterhub.trust import keys
from adapterhub.trust import signing
from adapterhub.trust import policy
from adapterhub.errors import IntegrityError, TrustError
from adapterhub.registry import Registry

from .conftest import fake_lora

FILES = ("adapter_config.json", "adapter_model.safetensors")


def model_signing_verify(d: Path, pub: Path, sig: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "model_signing", "verify", "key", str(d), "--signature", str(sig or d / "model.sig"),
         "--public_key", str(pub)],
        capture_output=True, text=True,
    )


@pytest.fixture
def signed(tmp_path, cli):
    """A key, an adapter pushed with --sign, and its pulled copy."""
    assert cli("keys", "generate").exit_code == 0
    r = cli("push", fake_lora(tmp_path / "a"), "team/qa", "--sign")
    assert r.exit_code == 0 and "signed with key default" in r.stdout
    dest = tmp_path / "pulled"
    assert cli("pull", "team/qa", dest).exit_code == 0
    return dest


def _fails(cli, *args, match: str):
    r = cli(*args)
    assert r.exit_code == 8, (r.exit_code, r.output)
    assert match in r.output, r.output
    assert "verified" not in r.stdout.split("\n")[-1]
    return r


# -- the round trip -------------------------------------------------------------------


def test_round_trip_with_the_real_model_signing_cli(cli, signed, home, tmp_path):
    pub = home / "keys" / "default.pub"
    assert (signed / "model.sig").exists()
    r = model_signing_verify(signed, pub)
    assert r.returncode == 0 and "Verification succeeded" in r.stdout, r.stdout + r.stderr
    r = cli("verify-signature", "team/qa")
    assert r.exit_code == 0 and "ok    key default: verified" in r.stdout
    r = cli("verify-signature", signed, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
    r = cli("verify-signature", signed, "--key", pub)
    assert r.exit_code == 0
    # The bundle's subject is the artifact digest, and its key hint is our key id.
    show = json.loads(cli("show", "team/qa", "--json").stdout)
    b = signing.parse_bundle((signed / "model.sig").read_bytes())
    assert b.subject_digest == show["digest"]
    assert b.key_hint == keys.get("default").key_id == show["signatures"][0]["key_id"]
    assert show["signatures"][0]["kind"] == "model"


def test_signatures_by_the_real_cli_verify_with_adapterhub(cli, tmp_path, home):
    """The other direction: a bundle made by `model_signing sign key` is accepted."""
    cli("keys", "generate")
    d = fake_lora(tmp_path / "a")
    r = subprocess.run(
        [sys.executable, "-m", "model_signing", "sign", "key", str(d), "--private_key", str(home / "keys" / "default.key"),
         "--signature", str(d / "model.sig")], capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    assert cli("verify-signature", d).exit_code == 0


def test_key_files_modes_and_id(cli, home):
    cli("keys", "generate", "alice")
    k = keys.get("alice")
    assert stat.S_IMODE(os.stat(k.private_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home / "keys").st_mode) == 0o700
    import hashlib

    assert k.key_id == hashlib.sha256(k.public_path.read_bytes()).hexdigest()
    r = cli("keys", "list", "--json")
    assert [d["name"] for d in json.loads(r.stdout)] == ["alice"]
    assert "BEGIN PUBLIC KEY" in cli("keys", "export", "alice").stdout


def test_several_signatures_on_one_artifact(cli, signed):
    cli("keys", "generate", "bob")
    assert cli("sign", "team/qa", "--key", "bob").exit_code == 0
    report = json.loads(cli("verify-signature", "team/qa", "--json").stdout)
    assert len(report["signatures"]) == 2 and all(s["ok"] for s in report["signatures"])


# -- attacks ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_changed_byte_in_any_file(cli, signed, home, name):
    p = signed / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))
    _fails(cli, "verify-signature", signed, match=f"Hash mismatch for '{name}'")
    assert model_signing_verify(signed, home / "keys" / "default.pub").returncode != 0


def test_added_file(cli, signed):
    (signed / "extra.safetensors").write_bytes(b"poison")
    _fails(cli, "verify-signature", signed, match="Extra files found in model 'pulled': extra.safetensors")


def test_removed_file(cli, signed):
    (signed / "adapter_config.json").unlink()
    _fails(cli, "verify-signature", signed, match="Missing files in model 'pulled': adapter_config.json")


def test_signature_made_for_another_artifact(cli, signed, tmp_path):
    cli("push", fake_lora(tmp_path / "b", seed=7), "team/other", "--sign")
    other = Registry().signatures(Registry().resolve("team/other").digest)[0]["blob"]
    raw = Registry().read_signature(other)
    # In the registry: the bundle is refused because its subject is another digest.
    reg = Registry()
    reg.add_signature(reg.resolve("team/qa").digest, raw, "x" * 64)
    report = signing.verify_ref(reg, "team/qa")
    assert any("the signature is for another artifact" in c.reason for c in report.checks)
    # On disk: the files do not match what the other signature lists.
    (signed / "model.sig").write_bytes(raw)
    _fails(cli, "verify-signature", signed, match="Hash mismatch")
    # And with nothing but that signature, the artifact is not trusted.
    reg.index.conn.execute("delete from signatures where digest = ? and blob != ?", (reg.resolve("team/qa").digest, other))
    _fails(cli, "verify-signature", "team/qa", match="the signature is for another artifact")
    _fails(cli, "pull", "team/qa", tmp_path / "d", "--require-signature", match="the signature is for another artifact")
    assert not (tmp_path / "d").exists()


def test_wrong_key(cli, signed, tmp_path):
    cli("keys", "generate", "mallory", "--no-trust")
    pub = tmp_path / "mallory.pub"
    pub.write_text(cli("keys", "export", "mallory").stdout)
    _fails(cli, "verify-signature", signed, "--key", pub, match="not by the given key")
    # The real CLI agrees.
    assert "Key mismatch" in model_signing_verify(signed, pub).stderr + model_signing_verify(signed, pub).stdout


def test_untrusted_key_and_forged_key_hint(cli, tmp_path, home):
    cli("keys", "generate")
    cli("keys", "generate", "mallory", "--no-trust")
    d = fake_lora(tmp_path / "a")
    assert cli("push", d, "team/qa", "--sign", "--key", "mallory").exit_code == 0
    _fails(cli, "verify-signature", "team/qa", match="which is not trusted")
    # Mallory claims to be the trusted key: the hint matches, the signature does not.
    dest = tmp_path / "p"
    cli("pull", "team/qa", dest)
    doc = json.loads((dest / "model.sig").read_text())
    doc["verificationMaterial"]["publicKey"]["hint"] = keys.get("default").key_id
    (dest / "model.sig").write_text(json.dumps(doc))
    _fails(cli, "verify-signature", dest, match="the DSSE signature does not verify")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: raw[:-20], "not valid JSON"),
        (lambda raw: _edit(raw, lambda d: d["dsseEnvelope"].update(payload="%%%not-base64%%%")), "dsseEnvelope.payload is not valid base64"),
        (lambda raw: _edit(raw, lambda d: d["dsseEnvelope"]["signatures"][0].update(sig="@@")), "dsseEnvelope.signatures[0].sig is not valid base64"),
        (lambda raw: _edit(raw, lambda d: d.pop("dsseEnvelope")), "missing field dsseEnvelope"),
        (lambda raw: _edit(raw, lambda d: d["verificationMaterial"].pop("publicKey")), "missing field verificationMaterial.publicKey"),
        (lambda raw: _edit(raw, lambda d: d.update(mediaType="x")), "mediaType is 'x'"),
    ],
    ids=["bad-json", "bad-base64-payload", "bad-base64-sig", "missing-envelope", "missing-key-hint", "bad-media-type"],
)
def test_malformed_bundle(cli, signed, tmp_path, mutate, message):
    raw = (signed / "model.sig").read_bytes()
    bad = mutate(raw)
    (signed / "model.sig").write_bytes(bad)
    _fails(cli, "verify-signature", signed, match=message)
    # Stored in the registry, the same bundle is refused there too.
    reg = Registry()
    digest = reg.resolve("team/qa").digest
    reg.index.conn.execute("delete from signatures where digest = ?", (digest,))
    reg.add_signature(digest, bad, "0" * 64)
    _fails(cli, "verify-signature", "team/qa", match=message)


def _edit(raw: bytes, fn) -> bytes:
    d = json.loads(raw)
    fn(d)
    return json.dumps(d).encode()


def test_expired_key(cli, signed, tmp_path):
    pub = tmp_path / "default.pub"
    pub.write_text(cli("keys", "export", "default").stdout)
    # `trust add --expires` refuses a past date, so the key expires through the API.
    policy.add(Registry(), pub.read_bytes(), not_after="2001-01-01T00:00:00Z", replace=True)
    _fails(cli, "verify-signature", "team/qa", match="expired on 2001-01-01T00:00:00Z")
    _fails(cli, "pull", "team/qa", tmp_path / "d", "--require-signature", match="expired")
    assert not (tmp_path / "d").exists()
    assert cli("trust", "add", pub, "--expires", "2999-01-01", "--replace").exit_code == 0
    assert cli("verify-signature", "team/qa").exit_code == 0


def test_revoked_key(cli, signed, tmp_path):
    assert cli("verify-signature", "team/qa").exit_code == 0
    assert cli("keys", "revoke", "default", "--reason", "laptop stolen").exit_code == 0
    _fails(cli, "verify-signature", "team/qa", match="was revoked on")
    r = _fails(cli, "verify-signature", signed, match="laptop stolen")
    assert "revoked" in cli("trust", "ls").stdout
    # Forgetting the key instead of revoking it fails too.
    assert cli("trust", "rm", "default").exit_code == 0
    _fails(cli, "verify-signature", "team/qa", match="which is not trusted")
    del r


def test_tampered_blob_in_the_registry_store(cli, signed, tmp_path, home):
    reg = Registry()
    info = reg.resolve("team/qa")
    (entry, blob) = next((e, p) for e, p in reg.files("team/qa") if e.path == "adapter_model.safetensors")
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    r = cli("fsck")
    assert r.exit_code == 6 and f"blob {entry.sha256} is corrupt" in r.stdout
    r = cli("pull", "team/qa", tmp_path / "d")
    assert r.exit_code == 6 and "adapter_model.safetensors: the stored blob does not match" in r.output
    assert not (tmp_path / "d").exists()
    _fails(cli, "verify-signature", "team/qa", match="Hash mismatch for 'adapter_model.safetensors'")
    # Signing refuses to vouch for damaged content.
    with pytest.raises(IntegrityError, match="nothing was signed"):
        signing.sign_ref(reg, "team/qa", keys.get("default"))
    assert len(reg.signatures(info.digest)) == 1


def test_tampered_signature_blob_in_the_registry_store(cli, signed, tmp_path):
    reg = Registry()
    sha = reg.signatures(reg.resolve("team/qa").digest)[0]["blob"]
    p = reg.blobs.path(sha)
    os.chmod(p, 0o644)
    p.write_bytes(p.read_bytes() + b" ")  # still valid JSON: only the hash gives it away
    r = cli("fsck")
    assert r.exit_code == 6 and f"blob {sha} is corrupt" in r.stdout and "(signature)" in r.stdout
    _fails(cli, "verify-signature", "team/qa", match="signature blob")
    _fails(cli, "pull", "team/qa", tmp_path / "d", "--require-signature", match="signature blob")
    assert not (tmp_path / "d").exists()


def test_passphrase_key_without_its_passphrase(cli, tmp_path, monkeypatch, home):
    monkeypatch.setenv("ADAPTERHUB_KEY_PASSPHRASE", "correct horse")
    assert cli("keys", "generate", "--passphrase").exit_code == 0
    assert b"ENCRYPTED" in (home / "keys" / "default.key").read_bytes()
    d = fake_lora(tmp_path / "a")
    monkeypatch.delenv("ADAPTERHUB_KEY_PASSPHRASE")
    r = cli("push", d, "team/qa", "--sign")
    assert r.exit_code == 8 and "key 'default' is encrypted and no passphrase was given" in r.output
    assert cli("ls", "--quiet").stdout == ""  # failed before storing anything
    monkeypatch.setenv("ADAPTERHUB_KEY_PASSPHRASE", "wrong")
    r = cli("push", d, "team/qa", "--sign")
    assert r.exit_code == 8 and "wrong passphrase for key 'default'" in r.output
    with pytest.raises(TrustError, match="wrong passphrase"):
        keys.load_private(keys.get("default"))
    monkeypatch.setenv("ADAPTERHUB_KEY_PASSPHRASE", "correct horse")
    assert cli("push", d, "team/qa", "--sign").exit_code == 0
    assert cli("verify-signature", "team/qa").exit_code == 0


def test_unsigned_artifact_is_not_verified(cli, tmp_path):
    cli("push", fake_lora(tmp_path / "a"), "qa")
    _fails(cli, "verify-signature", "qa", match="qa:1 is not signed")
    assert not (tmp_path / "x").exists()
    assert policy.ls(Registry()) == []
