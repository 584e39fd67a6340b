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


# -- issue 16, item 5: nothing is left out silently ---------------------------------------


def _model_signing_subject(tmp_path, d):
    """The subject digest `model_signing sign key` writes for ``d`` (signature kept outside it)."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    kp = tmp_path / "key.pem"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    sig = tmp_path / "out.sig"
    r = subprocess.run(
        [sys.executable, "-m", "model_signing", "sign", "key", str(d), "--private_key", str(kp), "--signature", str(sig),
         "--ignore-paths", str(d / "model.sig")],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    stmt = json.loads(base64.b64decode(json.loads(sig.read_text())["dsseEnvelope"]["payload"]))
    return "sha256:" + stmt["subject"][0]["digest"]["sha256"], sorted(x["name"] for x in stmt["predicate"]["resources"])


def test_only_top_level_git_paths_and_signature_are_left_out(tmp_path):
    d = make_files(
        tmp_path / "a",
        {
            "w.bin": b"w", "model.sig": b"{}", ".gitignore": b"*", ".git/HEAD": b"ref",
            "sub/model.sig": b"nested signature", "sub/.gitignore": b"x", "sub/.git/config": b"c",
            "sub/.github/ci.yml": b"y", ".gitattributes": b"a",
        },
    )
    assert [r for r, _ in list_files(d)] == ["sub/.git/config", "sub/.github/ci.yml", "sub/.gitignore", "sub/model.sig", "w.bin"]


@pytest.mark.parametrize("rel", ["adapter_model.safetensors.incomplete", "sub/dir/part.bin.incomplete", ".x.incomplete"])
def test_an_unfinished_file_is_refused_with_the_reason(tmp_path, rel):
    from adapterhub.errors import InvalidArtifactError

    d = make_files(tmp_path / "a", {"w.bin": b"w", rel: b"half"})
    with pytest.raises(InvalidArtifactError, match="unfinished file") as e:
        list_files(d)
    assert rel in str(e.value)


def test_push_refuses_an_unfinished_file_and_stores_nested_signatures(cli, tmp_path, home):
    from .conftest import fake_lora

    src = fake_lora(tmp_path / "a")
    (src / "extra").mkdir()
    (src / "extra" / "weights.bin.incomplete").write_bytes(b"half")
    r = cli("push", src, "qa")
    assert r.exit_code == 4 and "extra/weights.bin.incomplete" in r.stderr and "unfinished" in r.stderr
    assert not (home / "blobs" / "sha256").exists() or not any((home / "blobs" / "sha256").rglob("*"))
    (src / "extra" / "weights.bin.incomplete").unlink()
    (src / "extra" / "model.sig").write_bytes(b"a nested signature is content")
    r = cli("push", src, "qa", "--json")
    assert r.exit_code == 0
    files = [f["path"] for f in json.loads(cli("show", "qa", "--json").stdout)["files"]]
    assert "extra/model.sig" in files


def test_digest_matches_model_signing_with_nested_git_and_signature(tmp_path):
    pytest.importorskip("model_signing")
    d = make_files(
        tmp_path / "model",
        {
            "adapter_config.json": b"{}", "adapter_model.safetensors": os.urandom(3000), "model.sig": b"{}",
            ".gitignore": b"*", "sub/model.sig": b"nested", "sub/.gitignore": b"x", "sub/.git/HEAD": b"h",
        },
    )
    subject, names = _model_signing_subject(tmp_path, d)
    m = Manifest.from_dir(d)
    assert [f.path for f in m] == names
    assert m.digest == subject


# -- mutation testing (docs/reliability.md): what the digest's helpers must not get wrong ----------


def test_entries_with_a_bad_hash_or_a_duplicate_path_are_refused_by_name():
    from adapterhub.errors import InvalidArtifactError
    from adapterhub.manifest import FileEntry

    good = "ab" * 32
    with pytest.raises(InvalidArtifactError, match=r"bad sha256 for 'a': 'AB"):
        Manifest.from_entries([FileEntry("a", 1, good.upper())])
    with pytest.raises(InvalidArtifactError, match=r"duplicate path 'x/y'"):
        Manifest.from_entries([FileEntry("x/y", 1, good), FileEntry("z", 1, good), FileEntry("x/y", 2, good)])


@pytest.mark.parametrize("tail", ["\n", "0", " ", "\nff"])
def test_a_hash_with_anything_after_its_64_digits_is_refused(tail):
    """The whole string must be the 64 hex digits: `$` alone lets a trailing newline through."""
    from adapterhub.errors import InvalidArtifactError
    from adapterhub.manifest import FileEntry

    with pytest.raises(InvalidArtifactError, match="bad sha256 for 'a'"):
        Manifest.from_entries([FileEntry("a", 1, "ab" * 32 + tail)])


def test_hash_of_a_file_longer_than_one_read_counts_every_byte(tmp_path):
    """Files above one read (8 MiB) are hashed and sized whole, and progress sees every byte."""
    from adapterhub.manifest import CHUNK, hash_file, hash_file_sized

    data = os.urandom(CHUNK + 12345)
    p = tmp_path / "big.bin"
    p.write_bytes(data)
    seen: list[int] = []
    assert hash_file_sized(p, seen.append) == (hashlib.sha256(data).hexdigest(), len(data))
    assert sum(seen) == len(data) and len(seen) == 2
    seen.clear()
    assert hash_file(p, seen.append) == hashlib.sha256(data).hexdigest()
    assert sum(seen) == len(data)
