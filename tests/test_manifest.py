"""The artifact digest must equal model-signing's subject digest."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from adapterhub.errors import UnsafePathError
from adapterhub.manifest import (
    Manifest,
    check_relpath,
    list_files,
    sort_key,
)

from .conftest import make_files


def test_digest_definition(tmp_path):
    d = make_files(tmp_path / "a", {"b.txt": b"bee", "a/x.bin": b"\x00" * 10, "a-b/y": b"why"})
    m = Manifest.from_dir(d)
    # model-signing orders PurePosixPath-wise: component by component.
    assert [f.path for f in m] == ["a/x.bin", "a-b/y", "b.txt"]
    raw = b"".join(hashlib.sha256(c).digest() for c in (b"\x00" * 10, b"why", b"bee"))
    assert m.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert m.size == 16


def test_digest_matches_model_signing(tmp_path):
    pytest.importorskip("model_signing")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = make_files(
        tmp_path / "model",
        {"adapter_config.json": b"{}", "adapter_model.safetensors": os.urandom(5000), "sub/dir/z": b"z", "sub-x": b"1"},
    )
    key = ec.generate_private_key(ec.SECP256R1())
    kp = tmp_path / "key.pem"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    sig = tmp_path / "model.sig"
    r = subprocess.run(
        [sys.executable, "-m", "model_signing", "sign", "key", str(d), "--private_key", str(kp), "--signature", str(sig)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    bundle = json.loads(sig.read_text())
    import base64

    stmt = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert "sha256:" + stmt["subject"][0]["digest"]["sha256"] == Manifest.from_dir(d).digest


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "a//b", "./a", "C:/x", "a\\b", ""])
def test_check_relpath(bad):
    with pytest.raises(UnsafePathError):
        check_relpath(bad)


def test_symlink_outside_is_refused(tmp_path):
    outside = tmp_path / "secret"
    outside.write_bytes(b"s")
    d = make_files(tmp_path / "a", {"config.json": b"{}"})
    (d / "link").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="outside"):
        list_files(d)


def test_symlink_inside_is_followed(tmp_path):
    d = make_files(tmp_path / "a", {"real.bin": b"data"})
    (d / "alias.bin").symlink_to("real.bin")
    assert [r for r, _ in list_files(d)] == ["alias.bin", "real.bin"]


def test_hf_cache_snapshot_symlinks_are_allowed(tmp_path):
    repo = tmp_path / "models--org--name"
    blob = make_files(repo / "blobs", {"abc123": b"{}"}) / "abc123"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "config.json").symlink_to(os.path.relpath(blob, snap))
    assert [r for r, _ in list_files(snap)] == ["config.json"]


def test_hf_cache_shared_blob_store_is_allowed(tmp_path):
    # huggingface_hub keeps Xet files once per cache, in <cache>/blobs/<2 hex>/<hash>,
    # and links the repo's blobs/<etag> to them.
    shared = make_files(tmp_path / "blobs" / "ab", {"ab" + "0" * 62: b"{}"}) / ("ab" + "0" * 62)
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "etag1").symlink_to(os.path.relpath(shared, repo / "blobs"))
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "config.json").symlink_to(os.path.relpath(repo / "blobs" / "etag1", snap))
    assert [r for r, _ in list_files(snap)] == ["config.json"]
    # Anything else beside the cache is still outside.
    (tmp_path / "elsewhere").write_bytes(b"x")
    (snap / "x.bin").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePathError, match="outside"):
        list_files(snap)


def test_git_paths_and_signature_are_not_content(tmp_path):
    d = make_files(tmp_path / "a", {"w.bin": b"w", ".git/HEAD": b"ref", ".gitattributes": b"*", "model.sig": b"{}"})
    assert [r for r, _ in list_files(d)] == ["w.bin"]


def test_sort_key_is_component_wise():
    assert sorted(["a-b/y", "a/x"], key=sort_key) == ["a/x", "a-b/y"]
