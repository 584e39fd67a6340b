"""Remote reliability and security (issue 16, items 9, 10, 11, 13 and 15).

- 9: a remote artifact cannot choose its local name, and no import moves an
  existing name's tags;
- 10: names, tags, digests and relations from remotes are matched whole (a
  trailing newline is refused);
- 11: no password from a URL in any output; credentials go to the registry's
  own host only, and to a token service over HTTPS (or one allowed by name);
- 13: an overall deadline per request and a minimum rate for bodies, against
  loopback servers that send one byte a second (bounded: they stop by themselves);
- 15: remote JSON is parsed with size and depth caps; a hostile referrer is
  skipped and the legitimate pull works; one hostile repository does not fail
  ``search --remote``.

The real registry is Distribution 2.8 (``tests/_oci_server.py``); what it
cannot play (a registry that drips, a realm elsewhere) is ``tests/_http_stub.py``.
"""

from __future__ import annotations

import json
import secrets

import pytest

from tests._http_stub import Stub
from tests._oci_server import PASSWORD, USER
from tests.conftest import fake_lora
from tests.test_remote_hostile import (
    MANIFEST_TYPE,
    SIGNATURE_TYPE,
    layer,
    lora_files,
    our_config,
    push_artifact,
    put_blob,
    put_manifest,
    sha,
)

INDEX_TYPE = "application/vnd.oci.image.index.v1+json"


@pytest.fixture(autouse=True)
def remote_env(monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_REMOTE_TIMEOUT", "3")
    monkeypatch.setenv("ADAPTERHUB_REMOTE_RETRIES", "1")
    for k in ("ADAPTERHUB_REMOTE_TOKEN", "ADAPTERHUB_TOKEN_REALMS", "ADAPTERHUB_REMOTE_DEADLINE",
              "ADAPTERHUB_REMOTE_MIN_RATE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("ADAPTERHUB_REMOTE_USERNAME", USER)
    monkeypatch.setenv("ADAPTERHUB_REMOTE_PASSWORD", PASSWORD)
    monkeypatch.setenv("DOCKER_CONFIG", "/nonexistent-docker-config")


@pytest.fixture
def ns():
    return "r" + secrets.token_hex(4)


def jout(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def with_deep(doc: dict, depth: int = 5000) -> bytes:
    """``doc`` as JSON with a member ``x`` nested ``depth`` levels: Distribution's Go parser stores it,
    Python's recursive one would crash on it."""
    text = json.dumps(doc)
    return (text[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}").encode()


# -- item 9: the local name is the user's ---------------------------------------------


def test_a_remote_artifact_cannot_claim_a_local_name(cli, oci, ns, tmp_path, home):
    """``oci://host/ns/bob/cool:2`` whose config says ``team/prod`` lands as the path says, never as team/prod."""
    assert cli("push", fake_lora(tmp_path / "mine", seed=1), "team/prod", "--tag", "prod").exit_code == 0
    repo = f"{ns}/bob/cool"
    files = lora_files(tmp_path)
    push_artifact(oci, repo, "2", [layer(oci, repo, p, d) for p, d in files.items()],
                  our_config(files, name="team/prod", version="2", tags=["prod"]))
    got = jout(cli("pull", f"oci://{oci.host}/{repo}:2", "--json"))
    assert got["ref"] == "cool:2"
    assert any("calls itself team/prod" in w for w in got["warnings"])
    assert jout(cli("show", "team/prod", "--json"))["version"] == "1"  # latest did not move
    assert jout(cli("show", "team/prod@prod", "--json"))["version"] == "1"
    assert sorted(v["name"] for v in jout(cli("ls", "--json"))) == ["cool", "team/prod"]
    # Under a recorded remote, the path below its namespace is the name.
    assert cli("remote", "add", "origin", f"oci://{oci.host}/{ns}").exit_code == 0
    assert jout(cli("pull", "bob/cool:2", "--remote", "origin", "--json"))["ref"] == "bob/cool:2"


def test_an_import_moves_no_tag_of_an_existing_name(cli, oci, ns, tmp_path, home):
    """Even into a name the user gives: the new version is imported, ``latest`` and ``prod`` stay."""
    assert cli("push", fake_lora(tmp_path / "mine", seed=1), "team/prod", "--tag", "prod").exit_code == 0
    repo = f"{ns}/bob/cool"
    files = lora_files(tmp_path)
    push_artifact(oci, repo, "2", [layer(oci, repo, p, d) for p, d in files.items()],
                  our_config(files, name="team/prod", version="2", tags=["prod", "candidate"]))
    got = jout(cli("pull", f"oci://{oci.host}/{repo}:2", "--name", "team/prod", "--json"))
    assert got["ref"] == "team/prod:2"
    assert any("latest" in w for w in got["warnings"])
    assert jout(cli("show", "team/prod", "--json"))["version"] == "1"
    assert jout(cli("show", "team/prod@prod", "--json"))["version"] == "1"
    assert jout(cli("show", "team/prod@candidate", "--json"))["version"] == "2"  # a new tag may be added
    # A name new here gets `latest` as any push does.
    jout(cli("pull", f"oci://{oci.host}/{repo}:2", "--name", "team/fresh", "--json"))
    assert jout(cli("show", "team/fresh", "--json"))["version"] == "2"


# -- item 10: full matches ----------------------------------------------------------------


def test_names_from_remotes_are_matched_whole(cli, oci, ns, tmp_path, home, monkeypatch):
    from adapterhub.errors import InvalidArtifactError, InvalidNameError
    from adapterhub.registry.remotes import oci as oci_mod
    from adapterhub.registry.remotes import parse_url
    from adapterhub.registry.remotes.validate import check_lineage

    assert cli("remote", "add", "origin\n", f"oci://{oci.host}/{ns}").exit_code != 0
    assert jout(cli("remote", "ls", "--json")) == []
    with pytest.raises(InvalidNameError):
        parse_url(f"oci://{oci.host}\n/{ns}")
    with pytest.raises(InvalidNameError):
        parse_url("hf://org\n")
    for row in ({"parent": "sha256:" + "a" * 64 + "\n", "relation": "source"},
                {"parent": "sha256:" + "a" * 64, "relation": "source\n"}):
        with pytest.raises(InvalidArtifactError):
            check_lineage([row], "config")
    repo = f"{ns}/lines"
    files = lora_files(tmp_path)
    layers = [layer(oci, repo, p, d) for p, d in files.items()]
    for tag, over in (("a", {"name": "team/x\n"}), ("b", {"tags": ["prod\n"]}), ("c", {"version": "2\n"}),
                      ("d", {"lineage": [{"parent": "sha256:" + "b" * 64 + "\n", "relation": "source"}]})):
        push_artifact(oci, repo, tag, layers, our_config(files, **over))
        r = cli("pull", f"oci://{oci.host}/{repo}:{tag}")
        assert r.exit_code == 4, (tag, r.output)
    assert jout(cli("ls", "--json")) == []
    # Tags a registry lists are matched whole too: "1\n" is not a tag, so it is not listed.
    real_tags = oci_mod.Client.tags
    monkeypatch.setattr(oci_mod.Client, "tags", lambda self, r: [*real_tags(self, r), "a\n"])
    rows = jout(cli("search", "--remote", f"oci://{oci.host}/{ns}", "--json"))
    assert rows and all(not t.endswith("\n") for row in rows for t in row["tags"])


# -- item 11: secrets -----------------------------------------------------------------------


@pytest.mark.parametrize("password", ["s3cret-pw", "pa/ss-s3cret", "12345"])
def test_no_password_from_a_url_in_any_output(cli, tmp_path, home, password):
    assert cli("push", fake_lora(tmp_path / "src"), "team/qa").exit_code == 0
    url = f"oci://alice:{password}@127.0.0.1:9/ns"
    for args in (("remote", "add", "x", url), ("pull", f"{url}/team/qa:1"), ("push", "team/qa:1", f"{url}/qa:1"),
                 ("search", "--remote", url)):
        for extra in ((), ("--json",)):
            r = cli(*args, *extra)
            assert r.exit_code != 0, (args, r.output)
            assert password not in r.output, (args, extra, r.output)
            assert "credentials" in r.output or "invalid" in r.output
    assert jout(cli("remote", "ls", "--json")) == []


def _bearer_registry(realm: str) -> Stub:
    """A registry that sends every client to ``realm`` for a token, and accepts any Bearer token."""

    def handle(req):
        if req.headers.get("authorization", "").startswith("Bearer "):
            req.send(404, {"Content-Type": "application/json"}, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
        else:
            req.send(401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="stub",scope="repository:ns/x:pull"'})

    return Stub(handle)


def _token_service() -> Stub:
    return Stub(lambda req: req.send(200, {"Content-Type": "application/json"}, b'{"token": "t0k"}'), host="127.0.0.2")


def test_a_token_realm_on_another_host_over_http_gets_no_credentials(cli, home, monkeypatch):
    tokens = _token_service()
    registry = _bearer_registry(f"{tokens.url}/token")
    try:
        r = cli("pull", f"oci://{registry.host}/ns/x:1")
        assert r.exit_code == 9, r.output
        assert "another host over plain HTTP" in r.stderr and PASSWORD not in r.output
        assert tokens.requests == []  # nothing was sent there
        # Allowed by name, the realm gets the request (with the credentials).
        monkeypatch.setenv("ADAPTERHUB_TOKEN_REALMS", tokens.host)
        r = cli("pull", f"oci://{registry.host}/ns/x:1")
        assert r.exit_code == 3, r.output  # then: not found
        assert tokens.requests and tokens.requests[0][2].get("authorization", "").startswith("Basic ")
    finally:
        registry.stop()
        tokens.stop()


def test_credentials_go_to_the_registrys_own_host_only(cli, tmp_path, home):
    """An upload Location on another host gets the bytes, never the Authorization header."""
    elsewhere = Stub(lambda req: req.send(500), host="127.0.0.2")

    def handle(req):
        if not req.headers.get("authorization"):
            req.send(401, {"WWW-Authenticate": 'Basic realm="stub"'})
        elif req.method == "HEAD":
            req.send(404)
        elif req.method == "GET":
            req.send(404 if "/manifests/" in req.path else 200, {"Content-Type": "application/json"}, b"{}")
        elif req.method == "POST":
            req.send(202, {"Location": f"{elsewhere.url}/upload/1"})
        else:
            req.send(500)

    registry = Stub(handle)
    try:
        assert cli("push", fake_lora(tmp_path / "src"), "qa").exit_code == 0
        r = cli("push", "qa:1", f"oci://{registry.host}/ns/qa:1")
        assert r.exit_code != 0
        assert any(h.get("authorization") for _, _, h in registry.requests)  # the registry got them
        assert elsewhere.requests, "the upload went to the Location"
        assert not any(h.get("authorization") for _, _, h in elsewhere.requests)
    finally:
        registry.stop()
        elsewhere.stop()


# -- item 13: deadlines ---------------------------------------------------------------------


def _dripping_registry(blob: bytes, *, drip_headers: bool = False) -> tuple[Stub, list[int]]:
    """A registry holding one foreign artifact whose blob (or whose every answer) comes a byte a second."""
    sent: list[int] = []
    empty = b"{}"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(empty), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": sha(blob), "size": len(blob),
                    "annotations": {"org.opencontainers.image.title": "adapter_model.safetensors"}}],
    }).encode()

    def handle(req):
        if drip_headers:
            req.write(b"HTTP/1.1 200 OK\r\n")
            sent.append(req.drip(b"X-Slow: " + b"z" * 200 + b"\r\n"))
        elif req.path == "/v2/":
            req.send(200, {"Content-Type": "application/json"}, b"{}")
        elif "/manifests/" in req.path:
            req.send(200, {"Content-Type": MANIFEST_TYPE, "Docker-Content-Digest": sha(manifest)}, manifest)
        elif req.path.endswith(sha(empty)):
            req.send(200, {"Content-Type": "application/octet-stream"}, empty)
        elif "/blobs/" in req.path:
            req.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(blob)}\r\n\r\n".encode())
            sent.append(req.drip(blob))
        else:
            req.send(404)

    return Stub(handle), sent


def _sent(sent: list[int]) -> int:
    """What the dripping handler sent before the client hung up (it notices at its next byte)."""
    import time

    for _ in range(100):
        if sent:
            return sent[0]
        time.sleep(0.1)
    raise AssertionError("the client never hung up on the dripping server")


def test_a_blob_sent_a_byte_a_second_is_cut_off_at_the_minimum_rate(cli, home, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_REMOTE_TIMEOUT", "3")  # each byte comes well within the read timeout
    monkeypatch.setenv("ADAPTERHUB_REMOTE_MIN_RATE", "100")
    monkeypatch.setenv("ADAPTERHUB_REMOTE_RETRIES", "0")
    registry, sent = _dripping_registry(secrets.token_bytes(300))
    try:
        r = cli("pull", f"oci://{registry.host}/ns/slow:1")
        assert r.exit_code == 9, r.output
        assert "slower than 100 bytes/s" in r.stderr and "Traceback" not in r.output
    finally:
        registry.stop()
    # Cut off after about timeout + 300/100 s: a few bytes of the 300 (the server gives up at 60).
    assert _sent(sent) < 30
    assert jout(cli("ls", "--json")) == []


def test_an_answer_whose_headers_come_a_byte_a_second_hits_the_deadline(cli, home, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_REMOTE_TIMEOUT", "3")
    monkeypatch.setenv("ADAPTERHUB_REMOTE_DEADLINE", "2")
    monkeypatch.setenv("ADAPTERHUB_REMOTE_RETRIES", "0")
    registry, sent = _dripping_registry(b"x", drip_headers=True)
    try:
        r = cli("pull", f"oci://{registry.host}/ns/slow:1", "--json")
        assert r.exit_code == 9, r.output
        assert "within the deadline" in r.output
    finally:
        registry.stop()
    assert _sent(sent) < 30


@pytest.mark.parametrize("var, value", [("ADAPTERHUB_REMOTE_TIMEOUT", "-1"), ("ADAPTERHUB_REMOTE_DEADLINE", "nan"),
                                         ("ADAPTERHUB_REMOTE_MIN_RATE", "fast"), ("ADAPTERHUB_REMOTE_RETRIES", "1e9")])
def test_out_of_range_remote_settings_are_refused(cli, home, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    r = cli("pull", "oci://127.0.0.1:9/ns/x:1")
    assert r.exit_code == 2 and var in r.stderr, r.output


# -- item 15: hostile JSON ------------------------------------------------------------------


def _publish_signed(cli, oci, ns, tmp_path, monkeypatch, other_home) -> tuple[str, str]:
    """team/qa:1 signed and pushed to ``origin``; then a colleague (``other_home``) who trusts the key."""
    assert cli("push", fake_lora(tmp_path / "src"), "team/qa").exit_code == 0
    assert cli("keys", "generate").exit_code == 0
    assert cli("sign", "team/qa:1").exit_code == 0
    pub = tmp_path / "default.pub"
    pub.write_text(cli("keys", "export", "default").stdout)
    assert cli("remote", "add", "origin", f"oci://{oci.host}/{ns}").exit_code == 0
    res = jout(cli("push", "team/qa:1", "--remote", "origin", "--json"))
    monkeypatch.setenv("ADAPTERHUB_HOME", str(other_home))
    assert cli("remote", "add", "origin", f"oci://{oci.host}/{ns}").exit_code == 0
    assert cli("trust", "add", pub, "--name", "alice").exit_code == 0
    return f"{ns}/team/qa", res["manifest_digest"]


@pytest.fixture
def other_home(tmp_path_factory):
    return tmp_path_factory.mktemp("home2") / "adapterhub"


def _signature_manifest(oci, repo: str, subject: str, bundle: bytes) -> dict:
    """A signature referrer of ``subject`` whose one layer is ``bundle`` (stored as a blob)."""
    return {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": SIGNATURE_TYPE,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": put_blob(oci, repo, b"{}"), "size": 2},
            "layers": [{"mediaType": SIGNATURE_TYPE, "digest": put_blob(oci, repo, bundle), "size": len(bundle)}],
            "subject": {"mediaType": MANIFEST_TYPE, "digest": subject, "size": 1}}


def _list_first_referrer(oci, repo: str, index_tag: str, tag: str, manifest: bytes) -> None:
    """Store ``manifest`` under ``tag`` and list it first in the referrers fallback index ``index_tag``."""
    import requests

    digest = put_manifest(oci, repo, tag, manifest)
    url = f"http://{oci.host}/v2/{repo}/manifests/{index_tag}"
    index = requests.get(url, auth=(USER, PASSWORD), timeout=10, headers={"Accept": INDEX_TYPE}).json()
    index["manifests"].insert(0, {"mediaType": MANIFEST_TYPE, "digest": digest, "size": len(manifest),
                                  "artifactType": SIGNATURE_TYPE})
    r = requests.put(url, data=json.dumps(index), auth=(USER, PASSWORD), headers={"Content-Type": INDEX_TYPE},
                     timeout=10)
    assert r.status_code == 201, r.text


def test_a_hostile_referrer_is_skipped_and_the_signed_pull_works(cli, oci, ns, tmp_path, monkeypatch, other_home):
    repo, mdigest = _publish_signed(cli, oci, ns, tmp_path, monkeypatch, other_home)
    tag = mdigest.replace(":", "-")
    # A referrer whose manifest nests 5000 levels deep, listed in the fallback index beside the real one.
    hostile = _signature_manifest(oci, repo, mdigest, b'{"not": "a bundle"}')
    _list_first_referrer(oci, repo, tag, "hostile", with_deep(hostile))
    got = jout(cli("pull", "team/qa:1", "--remote", "origin", "--require-signature", "--json"))
    assert got["ref"] == "team/qa:1" and got["signatures"] == 1


def test_a_hostile_referrers_index_does_not_fail_the_pull(cli, oci, ns, tmp_path, monkeypatch, other_home):
    repo, mdigest = _publish_signed(cli, oci, ns, tmp_path, monkeypatch, other_home)
    index = with_deep({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": [], "annotations": {"a": "b"}})
    import requests

    r = requests.put(f"http://{oci.host}/v2/{repo}/manifests/{mdigest.replace(':', '-')}", data=index,
                     auth=(USER, PASSWORD), headers={"Content-Type": INDEX_TYPE}, timeout=10)
    assert r.status_code == 201, r.text
    got = jout(cli("pull", "team/qa:1", "--remote", "origin", "--json"))
    assert got["ref"] == "team/qa:1" and got["signatures"] == 0
    r = cli("pull", "team/qa:1", "--remote", "origin", "--require-signature", "--name", "team/qa2")
    assert r.exit_code == 8 and "not signed" in r.stderr


def test_one_hostile_repository_does_not_fail_search(cli, oci, ns, tmp_path, home):
    files = lora_files(tmp_path)
    push_artifact(oci, f"{ns}/fine", "1", [layer(oci, f"{ns}/fine", p, d) for p, d in files.items()], our_config(files))
    deep = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": put_blob(oci, f"{ns}/deep", b"{}"), "size": 2},
            "layers": [layer(oci, f"{ns}/deep", "a.bin", b"a")]}
    put_manifest(oci, f"{ns}/deep", "1", with_deep(deep))
    r = cli("search", "--remote", f"oci://{oci.host}/{ns}", "--json")
    assert r.exit_code == 0, r.output
    assert [row["repository"] for row in json.loads(r.stdout)] == [f"{ns}/fine"]
    assert "Traceback" not in r.output


def test_a_deeply_nested_config_is_refused_cleanly(cli, oci, ns, tmp_path, home):
    repo = f"{ns}/deepcfg"
    files = lora_files(tmp_path)
    push_artifact(oci, repo, "1", [layer(oci, repo, p, d) for p, d in files.items()],
                  with_deep(our_config(files)))
    r = cli("pull", f"oci://{oci.host}/{repo}:1")
    assert r.exit_code == 4 and "nested deeper" in r.stderr, r.output
    assert jout(cli("ls", "--json")) == []


def test_a_deeply_nested_hub_metadata_file_is_refused_cleanly(cli, hf_cache, tmp_path, home):
    from tests._hf_cache import cache_snapshot
    from tests.test_remote_hostile import HF_REPO, hf_meta, hf_refused

    files = lora_files(tmp_path)
    meta = json.loads(hf_meta(files))
    cache_snapshot(hf_cache, HF_REPO, {**files, "adapterhub.json": with_deep(meta)})
    assert "nested deeper" in hf_refused(cli, home, 4)


def test_a_deeply_nested_signature_bundle_is_skipped_and_the_signed_pull_works(cli, oci, ns, tmp_path, monkeypatch,
                                                                                  other_home):
    """The referrer's manifest is well formed, its bundle blob is JSON nested 200000 deep (within the 1 MiB cap)."""
    repo, mdigest = _publish_signed(cli, oci, ns, tmp_path, monkeypatch, other_home)
    tag = mdigest.replace(":", "-")
    deep = b"[" * 200_000 + b"]" * 200_000
    hostile = _signature_manifest(oci, repo, mdigest, deep)
    _list_first_referrer(oci, repo, tag, "deep-bundle", json.dumps(hostile).encode())
    got = jout(cli("pull", "team/qa:1", "--remote", "origin", "--require-signature", "--json"))
    assert got["ref"] == "team/qa:1" and got["signatures"] == 1


# -- concurrent writers of the referrers fallback index ------------------------------------


def test_a_signature_dropped_by_a_racing_index_write_is_merged_back(cli, oci, ns, tmp_path, monkeypatch, home,
                                                                     other_home):
    """Another pusher read the fallback index before our write and writes its copy just after it, which
    drops our new entry: the check after the settle window sees that and merges again."""
    import threading
    import time

    import requests

    repo, mdigest = _publish_signed(cli, oci, ns, tmp_path, monkeypatch, other_home)
    url = f"http://{oci.host}/v2/{repo}/manifests/{mdigest.replace(':', '-')}"

    def index() -> dict:
        return requests.get(url, auth=(USER, PASSWORD), timeout=10, headers={"Accept": INDEX_TYPE}).json()

    stale = index()
    assert len(stale["manifests"]) == 1  # the first key's signature
    carol = put_manifest(oci, repo, "carol", _signature_manifest(oci, repo, mdigest, b'{"carol": 1}'))
    stale["manifests"].append({"mediaType": MANIFEST_TYPE, "digest": carol, "size": 1, "artifactType": SIGNATURE_TYPE})
    raced = threading.Event()

    def racer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # our push's write lands: the other pusher's stale copy follows it
            if len(index()["manifests"]) == 2:
                r = requests.put(url, data=json.dumps(stale), auth=(USER, PASSWORD),
                                 headers={"Content-Type": INDEX_TYPE}, timeout=10)
                assert r.status_code == 201, r.text
                raced.set()
                return
            time.sleep(0.002)

    monkeypatch.setenv("ADAPTERHUB_HOME", str(home))  # back to the publisher, who signs with a second key
    assert cli("keys", "generate", "bob").exit_code == 0 and cli("sign", "team/qa:1", "--key", "bob").exit_code == 0
    t = threading.Thread(target=racer)
    t.start()
    assert cli("push", "team/qa:1", "--remote", "origin").exit_code == 0
    t.join()
    assert raced.is_set()
    digests = [m["digest"] for m in index()["manifests"]]
    assert len(digests) == 3 and carol in digests, digests  # the first key's, carol's and bob's
