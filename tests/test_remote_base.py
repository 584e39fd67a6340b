"""``check --base oci://...``: the base stays on the registry (issue 15, item 4).

Against the real Distribution registry, logging at level ``info`` so that
each response's ``http.response.written`` counts the bytes the registry
sent: the check reads ``config.json`` and the safetensors headers by HTTP
Range requests, never a weight blob.

``--base hf://org/model`` goes through huggingface_hub's
``get_safetensors_metadata``, which needs the real Hub: that path is not
tested here. Only the part that does not talk to the Hub (the header written
from huggingface_hub's own metadata objects) is.
"""

from __future__ import annotations

import json
import re
import secrets
import struct

import pytest

from tests._oci_server import PASSWORD, USER
from tests.factories import fake_lora, numpy_llama_base


@pytest.fixture(scope="module")
def logged_oci(tmp_path_factory):
    from tests import _oci_server

    server = _oci_server.start_or_skip(tmp_path_factory, "oci-logged", log_level="info")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def remote_env(monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_REMOTE_USERNAME", USER)
    monkeypatch.setenv("ADAPTERHUB_REMOTE_PASSWORD", PASSWORD)
    monkeypatch.setenv("DOCKER_CONFIG", "/nonexistent-docker-config")
    monkeypatch.delenv("ADAPTERHUB_REMOTE_TOKEN", raising=False)


def blob_bytes_sent(server, since: int) -> list[tuple[str, int]]:
    """(uri, bytes written) of every blob GET the registry answered after log offset ``since``."""
    out = []
    for line in server.log.read_text()[since:].splitlines():
        uri = re.search(r"http\.request\.uri=(\S+)", line)
        written = re.search(r"http\.response\.written=(\d+)", line)
        method = re.search(r"http\.request\.method=(\S+)", line)
        if uri and written and method and method.group(1) == "GET" and "/blobs/" in uri.group(1):
            out.append((uri.group(1), int(written.group(1))))
    return out


def publish_base(cli, server, ns, tmp_path) -> tuple[str, int]:
    """A 2 MiB Llama-shaped base pushed to the registry; returns its URL and its weight file's size."""
    base = numpy_llama_base(tmp_path / "base", hidden=256, layers=2)
    assert cli("push", base, "team/base").exit_code == 0
    url = f"oci://{server.host}/{ns}/team/base:1"
    assert cli("push", "team/base:1", url).exit_code == 0
    return url, (base / "model.safetensors").stat().st_size


def test_the_base_is_read_by_its_headers_only(cli, logged_oci, tmp_path, home):
    from adapterhub.registry.remotes.base import fetch_base

    ns = "b" + secrets.token_hex(4)
    url, weights = publish_base(cli, logged_oci, ns, tmp_path)
    local = tmp_path / "base"
    mark = len(logged_oci.log.read_text())
    remote = fetch_base(url)
    try:
        (n,) = struct.unpack("<Q", (local / "model.safetensors").read_bytes()[:8])
        config = (local / "config.json").stat().st_size
        assert 8 + n + config < remote.bytes_transferred < 8 + n + config + 4096  # and our config blob
        assert remote.headers_only == ["model.safetensors"] and sorted(remote.files) == ["config.json", "model.safetensors"]
        laid = remote.path / "model.safetensors"
        assert laid.stat().st_size == weights and laid.read_bytes()[: 8 + n] == (local / "model.safetensors").read_bytes()[: 8 + n]
        assert (remote.path / "config.json").read_bytes() == (local / "config.json").read_bytes()
    finally:
        remote.close()
    assert not remote.path.exists()
    # What the registry itself says it sent: our config blob, config.json, then two ranges of the weights.
    sent = blob_bytes_sent(logged_oci, mark)
    assert sum(b for _, b in sent) == remote.bytes_transferred, sent
    weights_digest = "sha256:" + __import__("hashlib").sha256((local / "model.safetensors").read_bytes()).hexdigest()
    assert sorted(b for uri, b in sent if weights_digest in uri) == [8, n]
    assert weights > 100 * remote.bytes_transferred


def test_check_against_a_base_on_the_registry(cli, logged_oci, tmp_path, home):
    ns = "b" + secrets.token_hex(4)
    url, _ = publish_base(cli, logged_oci, ns, tmp_path)
    fits = fake_lora(tmp_path / "fits", hidden=256, layers=2, base="team/base")  # the name the base goes by
    local = json.loads(cli("check", fits, "--base", tmp_path / "base", "--json").stdout)
    mark = len(logged_oci.log.read_text())
    r = cli("check", fits, "--base", url, "--json")
    assert r.exit_code == 0, r.output
    remote = json.loads(r.stdout)
    assert remote["status"] == local["status"] == "ok", (remote, local)
    assert remote["base"]["origin"] == "remote" and remote["base"]["spec"] == url
    assert {x["id"]: x["status"] for x in remote["rules"]} == {x["id"]: x["status"] for x in local["rules"]}
    assert sum(b for _, b in blob_bytes_sent(logged_oci, mark)) < 4096
    # An adapter for another width fails on the shapes, as against a local copy.
    wrong = fake_lora(tmp_path / "wrong", hidden=32, layers=2, base="team/base")
    r = cli("check", wrong, "--base", url, "--json")
    assert r.exit_code != 0 and json.loads(r.stdout)["status"] != "ok", r.output
    assert cli("check", fits, "--base", f"oci://{logged_oci.host}/{ns}/team/none:1").exit_code == 3


def test_check_uses_credentials_stored_by_remote_login(cli, logged_oci, tmp_path, home, monkeypatch):
    ns = "b" + secrets.token_hex(4)
    url, _ = publish_base(cli, logged_oci, ns, tmp_path)
    assert cli("remote", "add", "origin", f"oci://{logged_oci.host}/{ns}", "--no-check").exit_code == 0
    monkeypatch.delenv("ADAPTERHUB_REMOTE_USERNAME")
    monkeypatch.delenv("ADAPTERHUB_REMOTE_PASSWORD")
    fits = fake_lora(tmp_path / "fits", hidden=256, layers=2, base="team/base")
    assert cli("check", fits, "--base", url).exit_code == 9  # no credentials anywhere yet
    r = cli("remote", "login", "origin", "-u", USER, "--password-stdin", input=PASSWORD + "\n")
    assert r.exit_code == 0, r.output
    r = cli("check", fits, "--base", url, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "ok", r.output


def test_a_hostile_header_length_is_refused_before_it_is_fetched(cli, logged_oci, tmp_path, home):
    from adapterhub.errors import InvalidArtifactError
    from adapterhub.registry.remotes.base import fetch_base

    ns = "b" + secrets.token_hex(4)
    d = tmp_path / "huge"
    d.mkdir()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    (d / "config.json").write_text('{"model_type": "llama"}')
    from tests.test_remote_hostile import layer, push_artifact

    class S:
        host = logged_oci.host

    repo = f"{ns}/huge"
    push_artifact(S, repo, "1", [layer(S, repo, p.name, p.read_bytes()) for p in sorted(d.iterdir())])
    mark = len(logged_oci.log.read_text())
    with pytest.raises(InvalidArtifactError, match="safetensors header"):
        fetch_base(f"oci://{logged_oci.host}/{repo}:1")
    assert sum(b for _, b in blob_bytes_sent(logged_oci, mark) if "sha256:" in _) <= 8 + 64


def test_hub_headers_are_written_from_huggingface_hubs_metadata(tmp_path):
    """Not the Hub (it cannot be reached here): the header written from get_safetensors_metadata's objects."""
    from huggingface_hub.utils._safetensors import SafetensorsFileMetadata, TensorInfo

    from adapterhub.inspect.safetensors import read_header
    from adapterhub.registry.remotes.base import safetensors_header

    base = numpy_llama_base(tmp_path / "base", hidden=32, layers=1)
    raw = (base / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    doc = json.loads(raw[8: 8 + n])
    meta = SafetensorsFileMetadata(
        metadata=doc.pop("__metadata__", {}),
        tensors={k: TensorInfo(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"]))
                 for k, v in doc.items()},
    )
    header = safetensors_header(meta)
    out = tmp_path / "laid.safetensors"
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(len(raw) - n + len(header))
    mine, theirs = read_header(out), read_header(base / "model.safetensors")
    assert {k: (t.dtype, t.shape) for k, t in mine.tensors.items()} == {k: (t.dtype, t.shape) for k, t in theirs.tensors.items()}
