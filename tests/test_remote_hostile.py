"""Hostile remotes: artifacts built by hand on a real registry, or laid into the HF cache.

A remote is untrusted input. Each artifact here is pushed with raw HTTP to the
loopback ``docker-registry`` (or written into a temporary Hugging Face cache)
and pulled: the pull must end in an ``adapterhub.errors`` error (non-zero
exit), or a safe and documented result, write nothing outside the registry
home, and leave no half-imported version behind (``ls`` empty, ``fsck`` clean).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path
from urllib.parse import urljoin

import pytest

from tests._hf_cache import cache_snapshot
from tests._oci_server import PASSWORD, USER
from tests.conftest import fake_lora

CONFIG_TYPE = "application/vnd.adapterhub.artifact.config.v1+json"
FILE_TYPE = "application/vnd.adapterhub.file.v1"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
SIGNATURE_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
TITLE = "org.opencontainers.image.title"


@pytest.fixture(autouse=True)
def short_timeouts(monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_REMOTE_TIMEOUT", "3")
    monkeypatch.setenv("ADAPTERHUB_REMOTE_RETRIES", "1")
    monkeypatch.delenv("ADAPTERHUB_REMOTE_TOKEN", raising=False)
    monkeypatch.setenv("ADAPTERHUB_REMOTE_USERNAME", USER)
    monkeypatch.setenv("ADAPTERHUB_REMOTE_PASSWORD", PASSWORD)
    monkeypatch.setenv("DOCKER_CONFIG", "/nonexistent-docker-config")


@pytest.fixture
def ns():
    return "h" + secrets.token_hex(4)


# -- raw registry writes ---------------------------------------------------------------


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _session():
    import requests

    s = requests.Session()
    s.auth = (USER, PASSWORD)
    return s


def put_blob(oci, repo: str, data: bytes) -> str:
    s = _session()
    r = s.post(f"http://{oci.host}/v2/{repo}/blobs/uploads/", timeout=10)
    assert r.status_code == 202, r.text
    loc = urljoin(f"http://{oci.host}/", r.headers["Location"])
    d = sha(data)
    r = s.put(loc + ("&" if "?" in loc else "?") + f"digest={d}", data=data, timeout=10,
              headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return d


def put_manifest(oci, repo: str, ref: str, manifest: dict | bytes) -> str:
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    r = _session().put(f"http://{oci.host}/v2/{repo}/manifests/{ref}", data=data, timeout=10,
                       headers={"Content-Type": MANIFEST_TYPE})
    assert r.status_code == 201, r.text
    return sha(data)


def lora_files(tmp_path: Path) -> dict[str, bytes]:
    src = fake_lora(tmp_path / ("lora-" + secrets.token_hex(3)))
    return {p.name: p.read_bytes() for p in sorted(src.iterdir())}


def layer(oci, repo: str, title: str | None, data: bytes, **over) -> dict:
    desc = {"mediaType": FILE_TYPE, "digest": put_blob(oci, repo, data), "size": len(data)}
    if title is not None:
        desc["annotations"] = {TITLE: title}
    desc.update(over)
    return desc


def artifact_digest(files: dict[str, bytes]) -> str:
    from adapterhub.manifest import FileEntry, Manifest

    return Manifest.from_entries(FileEntry(p, len(d), hashlib.sha256(d).hexdigest()) for p, d in files.items()).digest


def our_config(content: dict[str, bytes], **over) -> dict:
    doc = {
        "schemaVersion": 1, "name": "team/hostile", "version": "1", "digest": artifact_digest(content),
        "tags": [], "description": None, "kind": "adapter", "inspection": {},
        "files": [{"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for p, d in content.items()],
        "lineage": [],
    }
    doc.update(over)
    return doc


def push_artifact(oci, repo: str, tag: str, layers: list[dict], config: dict | bytes | None = None,
                  config_media: str = CONFIG_TYPE) -> str:
    """A manifest with ``layers`` and our config (or the empty config when ``config`` is None)."""
    if config is None:
        cfg = {"mediaType": EMPTY_TYPE, "digest": put_blob(oci, repo, b"{}"), "size": 2}
    else:
        raw = config if isinstance(config, bytes) else json.dumps(config).encode()
        cfg = {"mediaType": config_media, "digest": put_blob(oci, repo, raw), "size": len(raw)}
    m = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": "application/vnd.adapterhub.adapter.v1",
         "config": cfg, "layers": layers}
    return put_manifest(oci, repo, tag, m)


def files_outside(root: Path, home: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if home not in p.parents and p != home}


def assert_refused(cli, home: Path, url: str, code: int | tuple[int, ...], text: str | None = None) -> str:
    """Pull ``url``: a clean failure with exit ``code``, nothing imported, nothing written outside ``home``."""
    jail = home.parent
    before = files_outside(jail, home)
    r = cli("pull", url)
    codes = code if isinstance(code, tuple) else (code,)
    assert r.exit_code in codes, (r.exit_code, r.output)
    assert "Traceback" not in r.output
    if text is not None:
        assert text in r.stderr, r.stderr
    assert files_outside(jail, home) == before
    assert json.loads(cli("ls", "--json").stdout) == []
    assert cli("fsck").exit_code == 0
    stage = home / "remote-staging"
    left = [p for p in stage.rglob("*") if p.is_file() and p.name != "pull.lock"] if stage.exists() else []
    assert left == []
    return r.stderr


# -- layer titles -----------------------------------------------------------------------


@pytest.mark.parametrize("title", [
    "../escape.txt", "../../escape.txt", "/tmp/escape.txt", "a/../../escape.txt", "a\\..\\escape.txt",
    "nul\x00byte", "", "./x", "a//b", "C:/escape.txt", "a/./b",
])
def test_unsafe_layer_titles_are_refused(cli, oci, ns, tmp_path, home, title):
    repo = f"{ns}/titles"
    files = lora_files(tmp_path)
    layers = [layer(oci, repo, p, d) for p, d in files.items()] + [layer(oci, repo, title, b"evil\n")]
    push_artifact(oci, repo, "1", layers)
    assert_refused(cli, home, f"oci://{oci.host}/{repo}:1", 4)
    assert not (home.parent / "escape.txt").exists() and not Path("/tmp/escape.txt").exists()


def open_gate():
    """The real trust gate over this test's (empty) registry: no rule, no trusted key."""
    from adapterhub.registry import Registry
    from adapterhub.trust.remote_gate import remote_gate

    return remote_gate(Registry())


def served(monkeypatch, oci, manifest: dict, blobs: dict[str, bytes] | None = None):
    """A client whose registry answers ``manifest`` (and ``blobs``) whatever it is asked:
    for what Distribution itself refuses to store, and other registries may not."""
    from adapterhub.registry.remotes import oci as oci_mod
    from adapterhub.registry.remotes.oci import media, plan as plan_mod, referrers as referrers_mod

    data = json.dumps(manifest).encode()
    client = oci_mod.Client(oci.host, loopback=True, username=USER, password=PASSWORD)
    asked: list = []

    def get_small_blob(repo, d, limit=0, what="blob"):
        asked.append(d)
        return (blobs or {})[d]

    monkeypatch.setattr(client, "get_manifest", lambda repo, ref, **kw: (data, MANIFEST_TYPE, sha(data)))
    monkeypatch.setattr(client, "get_small_blob", get_small_blob)
    monkeypatch.setattr(client, "get_blob", lambda repo, d, **kw: asked.append(d))
    return client, asked


def good_layers(files: dict[str, bytes]) -> list[dict]:
    return [{"mediaType": FILE_TYPE, "digest": sha(d), "size": len(d), "annotations": {TITLE: p}} for p, d in files.items()]


@pytest.mark.parametrize("bad", [
    {"annotations": {TITLE: 5}}, {"annotations": {TITLE: ["a"]}}, {"annotations": {TITLE: {"x": 1}}},
    {"annotations": ["x"]}, "just a string", {"annotations": {TITLE: "x.bin"}, "size": "4"},
    {"annotations": {TITLE: "x.bin"}, "size": True}, {"annotations": {TITLE: "x.bin"}, "size": -1},
])
def test_malformed_layer_descriptors_are_refused(oci, ns, tmp_path, monkeypatch, bad):
    from adapterhub.errors import InvalidArtifactError
    from adapterhub.registry.remotes import oci as oci_mod
    from adapterhub.registry.remotes.oci import media, plan as plan_mod, referrers as referrers_mod

    files = lora_files(tmp_path)
    layer_ = bad if isinstance(bad, str) else {"mediaType": FILE_TYPE, "digest": sha(b"evil"), "size": 4, **bad}
    m = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": [*good_layers(files), layer_],
         "config": {"mediaType": EMPTY_TYPE, "digest": sha(b"{}"), "size": 2}}
    client, asked = served(monkeypatch, oci, m)
    with pytest.raises(InvalidArtifactError):
        plan_mod.plan(client, f"{ns}/typed", "1", None)
    assert asked == []


@pytest.mark.parametrize("manifest", [[1, 2], {"layers": {"a": 1}}, {"layers": [], "annotations": ["x"]}, {"config": "x"}])
def test_malformed_manifests_are_refused(oci, ns, monkeypatch, manifest):
    from adapterhub.errors import InvalidArtifactError
    from adapterhub.registry.remotes import oci as oci_mod
    from adapterhub.registry.remotes.oci import media, plan as plan_mod, referrers as referrers_mod

    client, _ = served(monkeypatch, oci, manifest)
    with pytest.raises(InvalidArtifactError):
        plan_mod.plan(client, f"{ns}/shape", "1", None)


def test_duplicate_titles_are_refused(cli, oci, ns, tmp_path, home):
    repo = f"{ns}/dups"
    files = lora_files(tmp_path)
    layers = [layer(oci, repo, p, d) for p, d in files.items()]
    layers.append(layer(oci, repo, "adapter_config.json", b'{"other": true}'))
    push_artifact(oci, repo, "1", layers)
    assert_refused(cli, home, f"oci://{oci.host}/{repo}:1", 4, "duplicate path")


@pytest.mark.parametrize("order", ["file-first", "dir-first"])
def test_a_title_that_is_another_titles_directory_is_refused(cli, oci, ns, tmp_path, home, order):
    repo = f"{ns}/dirfile"
    files = lora_files(tmp_path)
    clash = [layer(oci, repo, "extra", b"a file\n"), layer(oci, repo, "extra/b.txt", b"under it\n")]
    if order == "dir-first":
        clash.reverse()
    push_artifact(oci, repo, "1", [layer(oci, repo, p, d) for p, d in files.items()] + clash)
    err = assert_refused(cli, home, f"oci://{oci.host}/{repo}:1", 4)
    assert "extra" in err


@pytest.mark.parametrize("title", ["x" * 300, "/".join(["d" * 200] * 25) + "/f"])
def test_very_long_titles_are_refused_as_invalid(cli, oci, ns, tmp_path, home, title):
    repo = f"{ns}/long"
    files = lora_files(tmp_path)
    push_artifact(oci, repo, "1", [layer(oci, repo, p, d) for p, d in files.items()] + [layer(oci, repo, title, b"x")])
    assert_refused(cli, home, f"oci://{oci.host}/{repo}:1", 4, "too long")


# -- config and digests -----------------------------------------------------------------


def test_config_claiming_another_artifact_digest_is_refused(cli, oci, ns, tmp_path, home):
    repo = f"{ns}/claims"
    files = lora_files(tmp_path)
    other = {**files, "adapter_config.json": b'{"r": 64}'}
    push_artifact(oci, repo, "1", [layer(oci, repo, p, d) for p, d in files.items()],
                  our_config(files, digest=artifact_digest(other)))
    assert_refused(cli, home, f"oci://{oci.host}/{repo}:1", 6, "not to the artifact digest")


def test_config_name_and_version_are_the_local_names_after_checks(cli, oci, ns, tmp_path, home):
    """The config's name and version are checked (a malformed one is refused); the local name comes from the
    repository path, never from the config (issue 16, item 9), and the config's version is kept."""
    repo = f"{ns}/names"
    files = lora_files(tmp_path)
    layers = [layer(oci, repo, p, d) for p, d in files.items()]
    for tag, over in (("n1", {"name": "../../etc"}), ("n2", {"version": "../1"}), ("n3", {"name": ["x"]}),
                      ("n4", {"version": 7}), ("n5", {"tags": ["../x"]}), ("n6", {"tags": "prod"})):
        push_artifact(oci, repo, tag, layers, our_config(files, **over))
        assert_refused(cli, home, f"oci://{oci.host}/{repo}:{tag}", 4)
    # A config naming another artifact than the repository does not choose the local name: the path does.
    push_artifact(oci, repo, "ok", layers, our_config(files, name="team/other", version="9"))
    r = cli("pull", f"oci://{oci.host}/{repo}:ok", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["ref"] == "names:9"
    assert any("calls itself team/other" in w for w in got["warnings"])
    assert [v["name"] for v in json.loads(cli("ls", "--json").stdout)] == ["names"]


def test_a_pull_does_not_move_a_local_tag_to_other_content(cli, oci, ns, tmp_path, home):
    """A remote that claims `team/critical` with tag `prod` must not repoint the local `team/critical@prod`."""
    assert cli("push", fake_lora(tmp_path / "mine", seed=11), "team/critical", "--tag", "prod").exit_code == 0
    repo = f"{ns}/tagclaim"
    files = lora_files(tmp_path)
    push_artifact(oci, repo, "1", [layer(oci, repo, p, d) for p, d in files.items()],
                  our_config(files, name="team/critical", version="2", tags=["prod", "candidate"]))
    r = cli("pull", f"oci://{oci.host}/{repo}:1", "--name", "team/critical")  # the user names it
    assert r.exit_code == 0, r.output
    assert "kept the local tag team/critical@prod (it names team/critical:1)" in r.stderr
    show = json.loads(cli("show", "team/critical@prod", "--json").stdout)
    assert show["version"] == "1"  # still the local one
    assert json.loads(cli("show", "team/critical@candidate", "--json").stdout)["version"] == "2"  # new tags apply
    r = cli("pull", f"oci://{oci.host}/{repo}:1", "--name", "team/critical", "--json")  # again: the same warning
    assert any("kept the local tag team/critical@prod" in w for w in json.loads(r.stdout)["warnings"])


@pytest.mark.parametrize("files_over", ["extra", "missing", "other-size", "not-a-list", "not-objects"])
def test_config_file_list_disagreeing_with_the_layers_is_refused(cli, oci, ns, tmp_path, home, files_over):
    repo = f"{ns}/list"
    files = lora_files(tmp_path)
    listed = our_config(files)["files"]
    if files_over == "extra":
        listed = [*listed, {"path": "ghost.bin", "size": 1, "sha256": "0" * 64}]
    elif files_over == "missing":
        listed = listed[:1]
    elif files_over == "other-size":
        listed = [{**listed[0], "size": listed[0]["size"] + 1}, *listed[1:]]
    elif files_over == "not-a-list":
        listed = {"path": "x"}
    else:
        listed = [["adapter_config.json"], 5]
    push_artifact(oci, repo, "1", [layer(oci, repo, p, d) for p, d in files.items()], our_config(files, files=listed))
    assert_refused(cli, home, f"oci://{oci.host}/{repo}:1", (4, 6))


@pytest.mark.parametrize("lineage", [
    [{"parent": "../../../etc/passwd", "relation": "source"}],
    [{"parent": "sha256:" + "ab" * 32, "relation": "../evil"}],
    [{"parent": "sha256:" + "ab" * 32}],
    ["sha256:" + "ab" * 32],
    {"parent": "sha256:" + "ab" * 32, "relation": "source"},
])
def test_malformed_lineage_rows_are_refused(cli, oci, ns, tmp_path, home, lineage):
    repo = f"{ns}/lineage"
    files = lora_files(tmp_path)
    push_artifact(oci, repo, "1", [layer(oci, repo, p, d) for p, d in files.items()], our_config(files, lineage=lineage))
    assert_refused(cli, home, f"oci://{oci.host}/{repo}:1", 4, "lineage")


def test_lineage_naming_an_unknown_well_formed_digest_is_recorded_as_a_claim(cli, oci, ns, tmp_path, home):
    """A well-formed parent digest is only a claim (it needs no local artifact); `--require-provenance` checks it."""
    repo = f"{ns}/claim"
    files = lora_files(tmp_path)
    parent = "sha256:" + "ab" * 32
    push_artifact(oci, repo, "1", [layer(oci, repo, p, d) for p, d in files.items()],
                  our_config(files, lineage=[{"parent": parent, "relation": "source", "recipe": None}]))
    r = cli("pull", f"oci://{oci.host}/{repo}:1", "--require-provenance")
    assert r.exit_code == 8, r.output
    assert json.loads(cli("ls", "--json").stdout) == []
    r = cli("pull", f"oci://{oci.host}/{repo}:1", "--json")
    assert r.exit_code == 0, r.output
    assert cli("fsck").exit_code == 0


def test_config_that_is_not_a_json_object_is_refused(cli, oci, ns, tmp_path, home):
    repo = f"{ns}/cfgshape"
    files = lora_files(tmp_path)
    layers = [layer(oci, repo, p, d) for p, d in files.items()]
    for i, raw in enumerate([b"[1, 2, 3]", b"not json at all", b"\xff\xfe", b'"a string"']):
        push_artifact(oci, repo, f"c{i}", layers, raw)
        assert_refused(cli, home, f"oci://{oci.host}/{repo}:c{i}", 4, "config")


def test_huge_config_is_refused_before_it_is_read_whole(cli, oci, ns, tmp_path, home):
    from adapterhub.registry.remotes import oci as oci_mod
    from adapterhub.registry.remotes.oci import media, plan as plan_mod, referrers as referrers_mod

    repo = f"{ns}/bigcfg"
    files = lora_files(tmp_path)
    cfg = our_config(files, description="x" * (media.CONFIG_LIMIT + 1))
    push_artifact(oci, repo, "1", [layer(oci, repo, p, d) for p, d in files.items()], cfg)
    assert media.CONFIG_LIMIT <= 8 << 20
    assert_refused(cli, home, f"oci://{oci.host}/{repo}:1", 4, "config blob")


def test_huge_manifest_is_not_read_whole(cli, oci, ns, tmp_path, home, monkeypatch):
    from adapterhub.registry.remotes import oci as oci_mod
    from adapterhub.registry.remotes.oci import media, plan as plan_mod, referrers as referrers_mod

    monkeypatch.setattr(media, "MANIFEST_LIMIT", 64 << 10)
    repo = f"{ns}/bigmanifest"
    files = lora_files(tmp_path)
    layers = [layer(oci, repo, p, d) for p, d in files.items()]
    m = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": layers,
         "config": {"mediaType": EMPTY_TYPE, "digest": put_blob(oci, repo, b"{}"), "size": 2},
         "annotations": {"padding": "p" * (128 << 10)}}
    put_manifest(oci, repo, "1", m)
    assert_refused(cli, home, f"oci://{oci.host}/{repo}:1", 4, "larger than")


def test_layer_size_disagreeing_with_the_bytes_is_refused(cli, oci, ns, tmp_path, home):
    repo = f"{ns}/sizes"
    files = lora_files(tmp_path)
    for i, delta in enumerate((-1, +1, +10_000)):
        layers = [layer(oci, repo, p, d) for p, d in files.items()]
        big = max(layers, key=lambda x: x["size"])
        big["size"] += delta
        push_artifact(oci, repo, f"z{i}", layers)
        assert_refused(cli, home, f"oci://{oci.host}/{repo}:z{i}", 6, "does not match its digest")


@pytest.mark.parametrize("digest", [
    "sha512:" + "ab" * 64, "md5:" + "ab" * 16, "sha256:../../x", "sha256:" + "AB" * 32, "sha256:" + "ab" * 31,
    "sha256:" + "ab" * 32 + "/../x", 5, None,
])
def test_layer_digests_in_other_algorithms_or_malformed_are_refused(oci, ns, tmp_path, monkeypatch, digest):
    """The registry refuses such manifests itself; the planner, fed one, refuses it before any fetch."""
    from adapterhub.errors import InvalidArtifactError
    from adapterhub.registry.remotes import oci as oci_mod
    from adapterhub.registry.remotes.oci import media, plan as plan_mod, referrers as referrers_mod

    files = lora_files(tmp_path)
    bad = {"mediaType": FILE_TYPE, "digest": digest, "size": 4, "annotations": {TITLE: "extra.bin"}}
    m = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": [*good_layers(files), bad],
         "config": {"mediaType": EMPTY_TYPE, "digest": sha(b"{}"), "size": 2}}
    client, asked = served(monkeypatch, oci, m)
    with pytest.raises(InvalidArtifactError, match="sha256 digest"):
        plan_mod.plan(client, f"{ns}/digests", "1", None)
    assert asked == []


@pytest.mark.parametrize("digest", ["sha256:../../x", "sha512:" + "ab" * 64, 5, None])
def test_config_digest_is_validated_before_it_is_fetched(oci, ns, tmp_path, monkeypatch, digest):
    from adapterhub.errors import InvalidArtifactError
    from adapterhub.registry.remotes import oci as oci_mod
    from adapterhub.registry.remotes.oci import media, plan as plan_mod, referrers as referrers_mod

    files = lora_files(tmp_path)
    m = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": good_layers(files),
         "config": {"mediaType": CONFIG_TYPE, "digest": digest, "size": 2}}
    client, asked = served(monkeypatch, oci, m)
    with pytest.raises(InvalidArtifactError, match="config"):
        plan_mod.plan(client, f"{ns}/cfgdigest", "1", None)
    assert asked == []


def test_config_size_claim_over_the_cap_is_refused_before_the_fetch(oci, ns, tmp_path, monkeypatch):
    from adapterhub.errors import InvalidArtifactError
    from adapterhub.registry.remotes import oci as oci_mod
    from adapterhub.registry.remotes.oci import media, plan as plan_mod, referrers as referrers_mod

    files = lora_files(tmp_path)
    m = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": good_layers(files),
         "config": {"mediaType": CONFIG_TYPE, "digest": sha(b"{}"), "size": 1 << 40}}
    client, asked = served(monkeypatch, oci, m)
    with pytest.raises(InvalidArtifactError, match="limit"):
        plan_mod.plan(client, f"{ns}/cfgsize", "1", None)
    assert asked == []


# -- referrers --------------------------------------------------------------------------


def _with_referrer(oci, repo: str, tmp_path: Path, blob: bytes) -> None:
    from adapterhub.registry.remotes.oci import INDEX_TYPE

    files = lora_files(tmp_path)
    mdigest = push_artifact(oci, repo, "1", [layer(oci, repo, p, d) for p, d in files.items()], our_config(files))
    mbytes_len = len(_session().get(f"http://{oci.host}/v2/{repo}/manifests/1", headers={"Accept": MANIFEST_TYPE}).content)
    sm = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": SIGNATURE_TYPE,
          "config": {"mediaType": EMPTY_TYPE, "digest": put_blob(oci, repo, b"{}"), "size": 2},
          "layers": [{"mediaType": SIGNATURE_TYPE, "digest": put_blob(oci, repo, blob), "size": len(blob)}],
          "subject": {"mediaType": MANIFEST_TYPE, "digest": mdigest, "size": mbytes_len},
          "annotations": {"dev.adapterhub.signature.kind": "model"}}
    sbytes = json.dumps(sm).encode()
    sdigest = put_manifest(oci, repo, sha(sbytes), sbytes)
    index = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": [
        {"mediaType": MANIFEST_TYPE, "digest": sdigest, "size": len(sbytes), "artifactType": SIGNATURE_TYPE},
    ]}
    r = _session().put(f"http://{oci.host}/v2/{repo}/manifests/{mdigest.replace(':', '-')}", data=json.dumps(index),
                       headers={"Content-Type": INDEX_TYPE}, timeout=10)
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("blob", ["huge", "not-json"])
def test_hostile_signature_referrers_are_skipped(cli, oci, ns, tmp_path, home, blob, monkeypatch):
    """A referrer is not the artifact: one that is not a signature bundle is skipped, and the pull
    imports the artifact unsigned; a policy that requires a signature refuses it."""
    from adapterhub.registry.remotes import oci as oci_mod
    from adapterhub.registry.remotes.oci import media, plan as plan_mod, referrers as referrers_mod

    if blob == "huge":
        monkeypatch.setattr(media, "SIGNATURE_LIMIT", 1 << 16)
    data = b"{" + b'"x": "' + b"y" * (1 << 17) + b'"}' if blob == "huge" else b"\x00\x01 not json"
    repo = f"{ns}/refs"
    _with_referrer(oci, repo, tmp_path, data)
    r = cli("pull", f"oci://{oci.host}/{repo}:1", "--require-signature")
    assert r.exit_code == 8, r.output
    assert json.loads(cli("ls", "--json").stdout) == []
    r = cli("pull", f"oci://{oci.host}/{repo}:1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["signatures"] == 0
    assert cli("fsck").exit_code == 0


def test_malformed_referrer_descriptors_are_skipped_unfetched(oci, ns, monkeypatch):
    """What the referrers API of another registry might answer: nothing in it is fetched or trusted."""
    from adapterhub.registry.remotes import oci as oci_mod
    from adapterhub.registry.remotes.oci import media, plan as plan_mod, referrers as referrers_mod

    subject = "sha256:" + "cd" * 32
    descs = ["not a descriptor", 5, {"artifactType": SIGNATURE_TYPE}, {"artifactType": SIGNATURE_TYPE, "digest": 7},
             {"artifactType": SIGNATURE_TYPE, "digest": "sha256:../../x"},
             {"artifactType": SIGNATURE_TYPE, "digest": "sha512:" + "ab" * 64}]
    monkeypatch.setattr(referrers_mod, "referrers", lambda client, repo, mdigest: (descs, "api"))
    client = oci_mod.Client(oci.host, loopback=True, username=USER, password=PASSWORD)
    asked = []
    monkeypatch.setattr(client, "get_manifest", lambda repo, ref, **kw: asked.append(ref))
    monkeypatch.setattr(client, "get_blob", lambda repo, d, **kw: asked.append(d))
    assert referrers_mod.fetch_signatures(client, f"{ns}/refs", subject, "sha256:" + "ef" * 32, open_gate()) == []
    assert asked == []


def test_referrer_manifest_with_malformed_layers_is_skipped(oci, ns, monkeypatch):
    from adapterhub.registry.remotes import oci as oci_mod
    from adapterhub.registry.remotes.oci import media, plan as plan_mod, referrers as referrers_mod

    subject = "sha256:" + "cd" * 32
    sm = {"schemaVersion": 2, "subject": {"digest": subject}, "annotations": ["x"],
          "layers": ["x", {"mediaType": SIGNATURE_TYPE, "digest": "sha256:../../x", "size": 3},
                     {"mediaType": SIGNATURE_TYPE, "digest": "sha256:" + "ab" * 32, "size": 1 << 40}]}
    data = json.dumps(sm).encode()
    monkeypatch.setattr(referrers_mod, "referrers", lambda client, repo, mdigest: (
        [{"artifactType": SIGNATURE_TYPE, "digest": sha(data)}], "api"))
    client = oci_mod.Client(oci.host, loopback=True, username=USER, password=PASSWORD)
    asked = []
    monkeypatch.setattr(client, "get_manifest", lambda repo, ref, **kw: (data, MANIFEST_TYPE, sha(data)))
    monkeypatch.setattr(client, "get_blob", lambda repo, d, **kw: asked.append(d))
    assert referrers_mod.fetch_signatures(client, f"{ns}/refs", subject, "sha256:" + "ef" * 32, open_gate()) == []
    assert asked == []


def test_listing_pages_stay_on_the_registry(oci, ns, monkeypatch):
    """A Link header to another host would carry the credentials there: refused."""
    import requests

    from adapterhub.errors import RemoteError
    from adapterhub.registry.remotes import oci as oci_mod
    from adapterhub.registry.remotes.oci import media, plan as plan_mod, referrers as referrers_mod

    client = oci_mod.Client(oci.host, loopback=True, username=USER, password=PASSWORD)
    real = requests.Session.request
    sent = []

    def request(self, method, url, **kw):
        sent.append(url)
        r = real(self, method, url, **kw)
        if "_catalog" in url and r.status_code == 200:
            r.headers["Link"] = '<http://attacker.invalid/v2/_catalog?last=x>; rel="next"'
        return r

    monkeypatch.setattr(requests.Session, "request", request)
    with pytest.raises(RemoteError, match="another host"):
        client.catalog()
    assert not any("attacker" in u for u in sent)


# -- search -----------------------------------------------------------------------------


def test_search_skips_hostile_repositories_and_tags(cli, oci, ns, tmp_path, home, monkeypatch):
    from adapterhub.registry.remotes import oci as oci_mod
    from adapterhub.registry.remotes.oci import media, plan as plan_mod, referrers as referrers_mod

    repo = f"{ns}/fine"
    files = lora_files(tmp_path)
    layers = [layer(oci, repo, p, d) for p, d in files.items()]
    push_artifact(oci, repo, "1", layers, our_config(files))
    # Odd manifests beside it: a config that is not an object, annotations of the wrong kind.
    odd = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
           "config": {"mediaType": CONFIG_TYPE, "digest": put_blob(oci, f"{ns}/odd", b"[]"), "size": 2},
           "layers": [layer(oci, f"{ns}/odd", "a.bin", b"a")],
           "annotations": {"dev.adapterhub.rank": "\u0661\u0662", "dev.adapterhub.name": "x"}}
    put_manifest(oci, f"{ns}/odd", "1", odd)
    put_manifest(oci, f"{ns}/odd", "2", {**odd, "annotations": {}})
    real_get = oci_mod.Client.get_manifest

    def get_manifest(self, repo, ref, **kw):
        if repo == f"{ns}/odd" and ref == "2":  # what Distribution would not store: layers that are not descriptors
            data = json.dumps({"schemaVersion": 2, "layers": ["x", {"size": "many"}], "annotations": ["a"],
                               "config": "x"}).encode()
            return data, MANIFEST_TYPE, sha(data)
        return real_get(self, repo, ref, **kw)

    monkeypatch.setattr(oci_mod.Client, "get_manifest", get_manifest)
    r = cli("remote", "add", "origin", f"oci://{oci.host}/{ns}")
    assert r.exit_code == 0, r.output
    real_catalog, real_tags = oci_mod.Client.catalog, oci_mod.Client.tags
    # What a hostile registry may answer: names with path characters, control characters and odd tags.
    monkeypatch.setattr(oci_mod.Client, "catalog", lambda self: [*real_catalog(self), f"{ns}/../../etc", f"{ns}/x\x1b[2J",
                                                                  f"{ns}/a/./b", 5])
    monkeypatch.setattr(oci_mod.Client, "tags", lambda self, repo: [*real_tags(self, repo), "../../x", "a/b", "\x1b[31m", None])
    r = cli("search", "--remote", "origin", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert {row["repository"] for row in rows} <= {repo, f"{ns}/odd"}
    assert repo in {row["repository"] for row in rows}
    for row in rows:
        assert all(media.OCI_TAG_RE.match(t) for t in row["tags"])
    cached = json.loads(cli("search", "--remote", "origin", "--cached", "--json").stdout)
    assert [c["repository"] for c in cached] == [row["repository"] for row in rows]


# -- Hugging Face Hub -------------------------------------------------------------------

HF_REPO = "tiny-org/hostile"


def hf_meta(content: dict[str, bytes], **over) -> bytes:
    meta = {
        "format": "adapterhub/hf-remote", "format_version": 1, "name": "team/hostile", "version": "1",
        "digest": artifact_digest(content), "description": None, "registry_tags": [],
        "files": [{"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for p, d in content.items()],
        "inspection": {}, "lineage": [], "card": {"file": "README.md", "mode": "generated", "original": None},
        "signature": None, "provenance": None,
    }
    meta.update(over)
    return json.dumps(meta).encode()


def hf_refused(cli, home: Path, code: int | tuple[int, ...], text: str | None = None, *args: str) -> str:
    jail = home.parent
    before = files_outside(jail, home)
    r = cli("pull", f"hf://{HF_REPO}", *args)
    codes = code if isinstance(code, tuple) else (code,)
    assert r.exit_code in codes, (r.exit_code, r.output)
    if text is not None:
        assert text in r.stderr, r.stderr
    assert files_outside(jail, home) == before
    assert json.loads(cli("ls", "--json").stdout) == []
    assert cli("fsck").exit_code == 0
    assert hf_work_dirs(home) == []
    return r.stderr


def hf_work_dirs(home: Path) -> list[str]:
    """What a Hub import stages in: ``.hf-import.<pid>-<hex>.incomplete`` directly in the home
    (the registry's filesystem, so the blobs take its files by hard link); no ``hf-import/`` folder."""
    return sorted(p.name for p in home.iterdir() if p.name.startswith(".hf-import") or p.name.endswith(".incomplete"))


def test_hf_work_dir_check_looks_where_the_import_stages(cli, hf_cache, tmp_path, home, monkeypatch):
    """The leftover check of ``hf_refused`` must be able to fail: while an import runs, its work dir is
    what ``hf_work_dirs`` lists; once it is refused, nothing is."""
    import adapterhub.inspect
    from adapterhub.errors import InvalidArtifactError

    files = lora_files(tmp_path)
    cache_snapshot(hf_cache, HF_REPO, {**files, "adapterhub.json": hf_meta(files)})
    seen: list[list[str]] = []

    def look_then_refuse(path, *a, **kw):  # runs on the staged copy, inside the work dir
        seen.append(hf_work_dirs(home))
        raise InvalidArtifactError("refused while staged")

    monkeypatch.setattr(adapterhub.inspect, "inspect_path", look_then_refuse)
    hf_refused(cli, home, 4, "refused while staged")
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].startswith(".hf-import."), seen


@pytest.mark.parametrize("name", ["../../escape", "/abs/escape", "a\\b", "x" * 300])
def test_hf_metadata_with_unsafe_names_is_refused_or_ignored(cli, hf_cache, tmp_path, home, name):
    """``adapterhub.json`` names the artifact; a name that is not a valid local name never reaches the disk."""
    files = lora_files(tmp_path)
    cache_snapshot(hf_cache, HF_REPO, {**files, "adapterhub.json": hf_meta(files, name=name, version=name)})
    # The local name comes from the repo id unless --name is given; the metadata's version must be a version.
    hf_refused(cli, home, 4)


@pytest.mark.parametrize("path", ["../../escape.txt", "/abs/escape.txt", "a/../../escape.txt"])
def test_hf_metadata_file_list_with_traversal_changes_nothing_on_disk(cli, hf_cache, tmp_path, home, path):
    """The snapshot's files are what is imported; ``files`` in ``adapterhub.json`` is never used to build a path.
    A list that disagrees with the snapshot makes the digest disagree: imported without lineage, with a warning."""
    files = lora_files(tmp_path)
    meta = hf_meta(files, files=[{"path": path, "size": 1, "sha256": "0" * 64}], digest="sha256:" + "0" * 64)
    cache_snapshot(hf_cache, HF_REPO, {**files, "adapterhub.json": meta})
    before = files_outside(home.parent, home)
    r = cli("pull", f"hf://{HF_REPO}", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert {f["path"] for f in out["files"]} == set(files)
    assert any("lineage is not imported" in w for w in out["warnings"])
    assert files_outside(home.parent, home) == before
    assert cli("fsck").exit_code == 0


@pytest.mark.parametrize("card", [
    {"file": "../../escape.md", "mode": "merged", "original": {"encoding": "utf-8", "data": "x", "sha256": "0" * 64}},
    {"file": "/abs/escape.md", "mode": "merged", "original": None},
    {"file": "README.md", "mode": "merged", "original": {"encoding": "base64", "data": "!!", "sha256": "0"}},
    {"file": "README.md", "mode": "merged", "original": "a string"},
    "not a map",
])
def test_hf_hostile_original_card_is_refused(cli, hf_cache, tmp_path, home, card):
    files = lora_files(tmp_path)
    cache_snapshot(hf_cache, HF_REPO, {**files, "README.md": b"---\ntags: [x]\n---\n# card\n",
                                       "adapterhub.json": hf_meta(files, card=card)})
    hf_refused(cli, home, 4)


def test_hf_original_card_only_ever_lands_as_the_card_file(cli, hf_cache, tmp_path, home):
    """The restored card is written to README.md whatever ``card.file`` says."""
    files = lora_files(tmp_path)
    card_bytes = b"# the original card\n"
    with_card = {**files, "README.md": card_bytes}
    original = {"encoding": "utf-8", "data": card_bytes.decode(), "sha256": hashlib.sha256(card_bytes).hexdigest(),
                "size": len(card_bytes)}
    meta = hf_meta(with_card, card={"file": "../../escape.md", "mode": "merged", "original": original})
    cache_snapshot(hf_cache, HF_REPO, {**files, "README.md": b"---\ntags: [x]\n---\n# generated\n", "adapterhub.json": meta})
    before = files_outside(home.parent, home)
    r = cli("pull", f"hf://{HF_REPO}", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["digest_matches_metadata"] is True
    assert files_outside(home.parent, home) == before


def test_hf_files_outside_the_artifacts_list_make_the_digest_disagree(cli, hf_cache, tmp_path, home):
    """Files in the snapshot that ``adapterhub.json`` does not list are imported (the snapshot is the artifact),
    and the digest then disagrees with the metadata: no lineage, no version, a warning."""
    files = lora_files(tmp_path)
    meta = hf_meta(files, lineage=[{"parent": "sha256:" + "ab" * 32, "relation": "source"}])
    cache_snapshot(hf_cache, HF_REPO, {**files, "smuggled/extra.py": b"import os\n", "adapterhub.json": meta})
    r = cli("pull", f"hf://{HF_REPO}", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["digest_matches_metadata"] is False and out["lineage_imported"] == 0
    assert "smuggled/extra.py" in {f["path"] for f in out["files"]}
    assert out["origin"] == {"name": "team/hostile", "version": "1"}
    assert cli("fsck").exit_code == 0


@pytest.mark.parametrize("lineage", [
    [{"parent": "../../etc/passwd", "relation": "source"}],
    [{"parent": "sha256:" + "ab" * 32, "relation": "../evil"}],
    "not a list",
])
def test_hf_malformed_lineage_is_refused(cli, hf_cache, tmp_path, home, lineage):
    files = lora_files(tmp_path)
    cache_snapshot(hf_cache, HF_REPO, {**files, "adapterhub.json": hf_meta(files, lineage=lineage)})
    hf_refused(cli, home, 4, "lineage")


@pytest.mark.parametrize("sig", ["garbage", "other-artifact"])
def test_hf_signature_that_does_not_match(cli, hf_cache, tmp_path, home, sig):
    from adapterhub.trust import keys
    from adapterhub.trust import signing
    from adapterhub.trust import policy
    from adapterhub.registry import Registry

    files = lora_files(tmp_path)
    if sig == "garbage":
        raw = b"\x00 not a bundle"
    else:
        k = keys.generate("default")
        other = fake_lora(tmp_path / "other", r=32)
        with Registry() as reg:
            policy.add(reg, k.public_pem, name="default")
            res = reg.push(other, "team/other")
            signing.sign_ref(reg, res.ref, k)
            raw = reg.read_signature(reg.signatures(res.digest)[0]["blob"])
            reg.execute_rm(reg.plan_rm(res.ref))
    cache_snapshot(hf_cache, HF_REPO, {**files, "model.sig": raw, "adapterhub.json": hf_meta(files)})
    hf_refused(cli, home, 8, None, "--require-signature")
    r = cli("pull", f"hf://{HF_REPO}", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert "signature_stored" not in out["trust"]
    assert any("model.sig" in w for w in out["warnings"])
    with Registry() as reg:
        assert reg.signatures(out["digest"]) == []


def test_hf_huge_metadata_is_refused_unread(cli, hf_cache, tmp_path, home, monkeypatch):
    from adapterhub.registry.remotes import hf
    from adapterhub.registry.remotes.hf import layout as hf_layout

    monkeypatch.setattr(hf_layout, "METADATA_LIMIT", 64 << 10)
    files = lora_files(tmp_path)
    cache_snapshot(hf_cache, HF_REPO, {**files, "adapterhub.json": hf_meta(files, description="d" * (128 << 10))})
    hf_refused(cli, home, 4, "larger than")


@pytest.mark.parametrize("over", [{"version": 7}, {"version": ["1"]}, {"description": {"a": 1}}, {"description": 5}])
def test_hf_metadata_fields_of_the_wrong_type_are_refused(cli, hf_cache, tmp_path, home, over):
    files = lora_files(tmp_path)
    cache_snapshot(hf_cache, HF_REPO, {**files, "adapterhub.json": hf_meta(files, **over)})
    hf_refused(cli, home, 4)


def test_hf_well_formed_lineage_with_any_relation_word_is_kept(cli, hf_cache, tmp_path, home):
    files = lora_files(tmp_path)
    parent = "sha256:" + "ab" * 32
    meta = hf_meta(files, lineage=[{"parent": parent, "relation": "teacher", "recipe": {"operation": "distil"}}])
    cache_snapshot(hf_cache, HF_REPO, {**files, "adapterhub.json": meta})
    r = cli("pull", f"hf://{HF_REPO}", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["lineage_imported"] == 1
    assert cli("fsck").exit_code == 0
