"""OCI remotes against a real registry (CNCF Distribution 2.8 on loopback, htpasswd auth).

Every test uses its own namespace on one session-wide registry, and its own
ADAPTERHUB_HOME (a second, empty home plays the colleague who pulls).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests._oci_server import OTHER_PASSWORD, OTHER_USER, PASSWORD, USER
from tests.conftest import fake_lora, make_files, run_cli


@pytest.fixture(autouse=True)
def short_timeouts(monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_REMOTE_TIMEOUT", "3")
    monkeypatch.setenv("ADAPTERHUB_REMOTE_RETRIES", "1")
    for k in ("ADAPTERHUB_REMOTE_USERNAME", "ADAPTERHUB_REMOTE_PASSWORD", "ADAPTERHUB_REMOTE_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", "/nonexistent-docker-config")


@pytest.fixture
def ns():
    return "t" + secrets.token_hex(4)


@pytest.fixture
def other_home(tmp_path_factory):
    return tmp_path_factory.mktemp("home2") / "adapterhub"


def add_remote(cli, oci, ns, name="origin", user=USER, password=PASSWORD):
    r = cli("remote", "add", name, oci.url(ns), "--username", user, "--password-stdin", input=password + "\n")
    assert r.exit_code == 0, r.output
    return name


def as_home(monkeypatch, home: Path) -> None:
    monkeypatch.setenv("ADAPTERHUB_HOME", str(home))


def publish_then_switch_home(cli, oci, ns, ref: str, monkeypatch, other_home: Path) -> None:
    """Push ``ref`` to the remote ``origin``, then become a colleague (``other_home``) who has added it too."""
    add_remote(cli, oci, ns)
    assert cli("push", ref, "--remote", "origin").exit_code == 0
    as_home(monkeypatch, other_home)
    add_remote(cli, oci, ns)


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def jout(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def registry_get(oci, path: str, **headers):
    import requests

    return requests.get(f"http://{oci.host}{path}", auth=(USER, PASSWORD), headers=headers, timeout=10)


def staged_leftovers(home: Path) -> list[Path]:
    stage = home / "remote-staging"
    return [p for p in stage.rglob("*") if p.is_file() and p.name != "pull.lock"] if stage.exists() else []


# -- round trip --------------------------------------------------------------------------


def test_push_pull_round_trip_with_signature_and_lineage(cli, oci, ns, tmp_path, home, other_home, monkeypatch):
    from adapterhub.registry import Registry

    src = fake_lora(tmp_path / "src", r=16)
    make_files(src, {"extra/notes.txt": b"trained on tickets\n"})
    base = fake_lora(tmp_path / "base", r=4, seed=3)
    with Registry() as reg:
        parent = reg.push(base, "team/base-ish").digest
        reg.push(src, "team/qa-lora:1.2.0", tags=["prod"], description="QA on support tickets",
                 derived_from=[(parent, "source")], recipe={"operation": "test", "tool": "pytest"})
    assert cli("keys", "generate").exit_code == 0
    assert cli("sign", "team/qa-lora:1.2.0").exit_code == 0
    pub = tmp_path / "default.pub"
    pub.write_text(cli("keys", "export", "default").stdout)
    add_remote(cli, oci, ns)

    res = jout(cli("push", "team/qa-lora:1.2.0", "--remote", "origin", "--json"))
    assert res["repository"] == f"{ns}/team/qa-lora"
    assert set(res["tags"]) == {"1.2.0", "latest", "prod"}
    assert res["blobs_uploaded"] == 4 + 2  # 3 files + config, signature bundle + empty config
    assert (res["files_uploaded"], res["files_present"], res["config_uploaded"]) == (3, 0, True)
    assert res["artifact_digest"] == res["digest"] != res["manifest_digest"]
    assert res["signatures_pushed"] == 1 and res["referrers"] == "tag"  # Distribution 2.8: fallback tag
    assert res["artifact_type"] == "application/vnd.adapterhub.adapter.v1"

    # What generic tools see: artifactType, annotations, titles, our config media type.
    m = registry_get(oci, f"/v2/{ns}/team/qa-lora/manifests/1.2.0", Accept="application/vnd.oci.image.manifest.v1+json").json()
    assert m["config"]["mediaType"] == "application/vnd.adapterhub.artifact.config.v1+json"
    assert m["annotations"]["dev.adapterhub.base-model"] == "meta-llama/Llama-2-7b-hf"
    assert m["annotations"]["dev.adapterhub.rank"] == "16" and m["annotations"]["dev.adapterhub.method"] == "LORA"
    titles = {layer["annotations"]["org.opencontainers.image.title"] for layer in m["layers"]}
    assert titles == {"adapter_config.json", "adapter_model.safetensors", "extra/notes.txt"}

    # A colleague with an empty home pulls it.
    as_home(monkeypatch, other_home)
    add_remote(cli, oci, ns)
    assert cli("trust", "add", pub, "--name", "alice").exit_code == 0
    got = jout(cli("pull", "team/qa-lora:1.2.0", "--remote", "origin", "--json"))
    assert got["ref"] == "team/qa-lora:1.2.0" and got["signatures"] == 1 and got["blobs_downloaded"] == 3
    show = jout(cli("show", "team/qa-lora:1.2.0", "--json"))
    assert show["description"] == "QA on support tickets"
    assert set(show["tags"]) == {"latest", "prod"}
    assert [(row["parent"], row["relation"], row["recipe"]) for row in show["lineage"]] == [
        (parent, "source", {"operation": "test", "tool": "pytest"})
    ]
    assert len(show["signatures"]) == 1
    assert cli("verify-signature", "team/qa-lora:1.2.0").exit_code == 0
    out = tmp_path / "out"
    assert cli("pull", "team/qa-lora@prod", out, "--no-signature-file").exit_code == 0
    assert file_hashes(out) == file_hashes(src)
    assert cli("fsck").exit_code == 0
    assert staged_leftovers(other_home) == []

    # Pulling again: nothing downloaded, nothing changed.
    again = jout(cli("pull", "team/qa-lora:1.2.0", "--remote", "origin", "--json"))
    assert again["created"] is False and again["blobs_downloaded"] == 0


def test_repush_uploads_zero_blobs_and_full_url_targets(cli, oci, ns, tmp_path, monkeypatch, other_home):
    src = fake_lora(tmp_path / "src")
    assert cli("push", src, "qa").exit_code == 0
    monkeypatch.setenv("ADAPTERHUB_REMOTE_USERNAME", USER)
    monkeypatch.setenv("ADAPTERHUB_REMOTE_PASSWORD", PASSWORD)
    url = f"oci://{oci.host}/{ns}/adapters/qa:v1"
    first = jout(cli("push", "qa:1", url, "--json"))
    assert first["blobs_uploaded"] == 3 and first["tags"][0] == "v1"
    second = jout(cli("push", "qa:1", url, "--json"))
    assert second["blobs_uploaded"] == 0 and second["bytes_uploaded"] == 0 and second["blobs_skipped"] == 3
    assert second["manifest_digest"] == first["manifest_digest"]

    as_home(monkeypatch, other_home)
    got = jout(cli("pull", url, "--json"))
    assert got["ref"] == "qa:1"  # the config names it, whatever the remote path


def test_chunked_upload_of_a_large_file(cli, oci, ns, tmp_path, monkeypatch, other_home):
    monkeypatch.setenv("ADAPTERHUB_OCI_CHUNK_MB", "1")  # 3.5 MB in PATCH chunks of 1 MB
    src = fake_lora(tmp_path / "src")
    make_files(src, {"big.bin": secrets.token_bytes(3_500_000)})
    assert cli("push", src, "big").exit_code == 0
    add_remote(cli, oci, ns)
    assert jout(cli("push", "big:1", "--remote", "origin", "--json"))["blobs_uploaded"] == 4
    as_home(monkeypatch, other_home)
    add_remote(cli, oci, ns)
    assert cli("pull", "big:1", tmp_path / "out", "--remote", "origin").exit_code == 0
    assert file_hashes(tmp_path / "out") == file_hashes(src)


# -- credentials and auth -----------------------------------------------------------------


def test_credentials_file_is_0600_and_not_in_the_index(cli, oci, ns, home):
    add_remote(cli, oci, ns)
    cred = home / "credentials.json"
    assert (cred.stat().st_mode & 0o777) == 0o600
    assert PASSWORD in cred.read_text()
    for p in home.glob("index.db*"):
        assert PASSWORD.encode() not in p.read_bytes()
    rows = jout(cli("remote", "ls", "--json"))
    assert rows == [{**rows[0], "name": "origin", "url": oci.url(ns), "credentials": "file"}]
    assert PASSWORD not in json.dumps(rows)
    assert cli("remote", "rm", "origin").exit_code == 0
    assert "origin" not in cred.read_text()


def test_docker_config_credentials(cli, oci, ns, tmp_path, monkeypatch):
    d = tmp_path / "docker"
    d.mkdir()
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (d / "config.json").write_text(json.dumps({"auths": {oci.host: {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    assert cli("push", fake_lora(tmp_path / "src"), "qa").exit_code == 0
    assert cli("remote", "add", "origin", oci.url(ns)).exit_code == 0
    assert jout(cli("remote", "ls", "--json"))[0]["credentials"] == "docker-config"
    assert cli("push", "qa:1", "--remote", "origin").exit_code == 0


def test_no_credentials_and_wrong_password(cli, oci, ns, tmp_path):
    assert cli("push", fake_lora(tmp_path / "src"), "qa").exit_code == 0
    assert cli("remote", "add", "anon", oci.url(ns)).exit_code == 0
    r = cli("push", "qa:1", "--remote", "anon")
    assert r.exit_code == 9
    assert "requires authentication" in r.stderr and "hint:" in r.stderr
    r = cli("remote", "add", "bad", oci.url(ns), "--username", USER, "--password-stdin", input="not the password\n")
    assert r.exit_code == 9 and "refused the username or password" in r.stderr, r.output
    assert [x["name"] for x in jout(cli("remote", "ls", "--json"))] == ["anon"]  # refused: not added
    r = cli("remote", "add", "bad", oci.url(ns), "--username", USER, "--password-stdin", "--no-check", "--json",
            input="not the password\n")
    assert jout(r)["credentials_check"] == "skipped"
    r = cli("push", "qa:1", "--remote", "bad", "--json")
    assert r.exit_code == 9
    assert json.loads(r.stdout)["error"].startswith(f"authentication to {oci.host} failed")
    assert "Traceback" not in r.output
    # The other user's own password works (htpasswd holds two users).
    r = cli("remote", "add", "bob", oci.url(ns), "--username", OTHER_USER, "--password-stdin", "--json",
            input=OTHER_PASSWORD + "\n")
    assert jout(r)["credentials_check"] == "ok"
    assert cli("push", "qa:1", "--remote", "bob").exit_code == 0


def test_unreachable_remote_fails_after_a_bounded_retry(cli, tmp_path):
    from tests._oci_server import free_port

    assert cli("push", fake_lora(tmp_path / "src"), "qa").exit_code == 0
    # A remote that is down when it is added may be up later: added, with a warning.
    r = cli("remote", "add", "gone", f"oci://127.0.0.1:{free_port()}/ns", "-u", USER, "--password-stdin",
            input=PASSWORD + "\n")
    assert r.exit_code == 0 and "credentials were not checked" in r.stderr and "cannot reach" in r.stderr, r.output
    r = cli("push", "qa:1", "--remote", "gone")
    assert r.exit_code == 9
    assert "cannot reach the registry" in r.stderr and "2 attempts" in r.stderr
    r = cli("pull", "qa:1", "--remote", "gone")
    assert r.exit_code == 9


# -- bad input -----------------------------------------------------------------------------


def test_names_and_versions_invalid_on_the_remote(cli, oci, ns, tmp_path):
    src = fake_lora(tmp_path / "src")
    add_remote(cli, oci, ns)
    assert cli("push", src, "qa:1.0.0+build.5").exit_code == 0
    r = cli("push", "qa:1.0.0+build.5", "--remote", "origin")
    assert r.exit_code == 4 and "cannot be an OCI tag" in r.stderr
    assert cli("push", src, "qa..lora").exit_code == 0
    r = cli("push", "qa..lora:1", "--remote", "origin")
    assert r.exit_code == 4 and "not a valid OCI repository name" in r.stderr
    r = cli("pull", f"oci://{oci.host}/{ns}/Upper/Case:1")
    assert r.exit_code == 4


@pytest.mark.parametrize("what", ["layer", "config", "manifest"])
def test_corrupted_blob_on_the_registry_is_caught(cli, oci, ns, tmp_path, monkeypatch, other_home, what):
    # The registry stores blobs once for all repositories: corrupt only content of this test's own.
    src = make_files(tmp_path / "src", {"own.bin": secrets.token_bytes(64 * 1024)})
    fake_lora(src)
    assert cli("push", src, "qa").exit_code == 0
    add_remote(cli, oci, ns)
    res = jout(cli("push", "qa:1", "--remote", "origin", "--json"))
    m = registry_get(oci, f"/v2/{ns}/qa/manifests/1", Accept="application/vnd.oci.image.manifest.v1+json").json()
    if what == "manifest":  # still valid JSON, one annotation changed
        data = oci.blob_data(res["manifest_digest"])
        data.write_bytes(data.read_bytes().replace(b'"LORA"', b'"LoRA"'))
    else:
        desc = m["config"] if what == "config" else max(m["layers"], key=lambda d: d["size"])
        data = oci.blob_data(desc["digest"])
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF  # same size, one byte flipped
        data.write_bytes(bytes(raw))
    as_home(monkeypatch, other_home)
    add_remote(cli, oci, ns)
    r = cli("pull", "qa:1", "--remote", "origin")
    assert r.exit_code == 6, r.output
    assert "does not match its digest" in r.stderr
    assert jout(cli("ls", "--json")) == []
    assert staged_leftovers(other_home) == []
    assert res["manifest_digest"]


def test_foreign_artifacts_pushed_by_oras(cli, oci, ns, tmp_path, monkeypatch):
    """A PEFT dir pushed with the oras client imports as an adapter; a random file is refused."""
    import oras.client

    client = oras.client.OrasClient(hostname=oci.host, insecure=True, auth_backend="basic")
    client.auth.set_basic_auth(USER, PASSWORD)  # not login(): that writes ~/.docker/config.json
    src = fake_lora(tmp_path / "src")
    monkeypatch.chdir(src)
    client.push(target=f"{oci.host}/{ns}/foreign-lora:v1", files=["adapter_config.json", "adapter_model.safetensors"])
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model\n")
    monkeypatch.chdir(junk)
    client.push(target=f"{oci.host}/{ns}/junk:1", files=["notes.txt"])

    monkeypatch.setenv("ADAPTERHUB_REMOTE_USERNAME", USER)
    monkeypatch.setenv("ADAPTERHUB_REMOTE_PASSWORD", PASSWORD)
    got = jout(cli("pull", f"oci://{oci.host}/{ns}/foreign-lora:v1", "--json"))
    assert got["adapterhub_artifact"] is False and got["kind"] == "adapter" and got["ref"] == "foreign-lora:v1"
    r = cli("pull", f"oci://{oci.host}/{ns}/junk:1")
    assert r.exit_code == 4, r.output
    assert [v["name"] for v in jout(cli("ls", "--json"))] == ["foreign-lora"]
    assert staged_leftovers(Path(os.environ["ADAPTERHUB_HOME"])) == []


def test_trust_policy_applies_to_remote_pulls(cli, oci, ns, tmp_path, monkeypatch, other_home):
    assert cli("push", fake_lora(tmp_path / "src"), "team/qa").exit_code == 0
    publish_then_switch_home(cli, oci, ns, "team/qa:1", monkeypatch, other_home)
    r = cli("pull", "team/qa:1", "--remote", "origin", "--require-signature")
    assert r.exit_code == 8 and "not signed" in r.stderr
    assert cli("policy", "set", "require-signature").exit_code == 0
    assert cli("pull", "team/qa:1", "--remote", "origin").exit_code == 8
    assert jout(cli("ls", "--json")) == []


def test_signed_by_an_untrusted_key_is_refused_under_policy(cli, oci, ns, tmp_path, monkeypatch, other_home):
    assert cli("push", fake_lora(tmp_path / "src"), "team/qa").exit_code == 0
    assert cli("keys", "generate").exit_code == 0
    assert cli("sign", "team/qa:1").exit_code == 0
    publish_then_switch_home(cli, oci, ns, "team/qa:1", monkeypatch, other_home)
    r = cli("pull", "team/qa:1", "--remote", "origin", "--require-signature")
    assert r.exit_code == 8 and "not trusted" in r.stderr
    assert jout(cli("ls", "--json")) == [] and staged_leftovers(other_home) == []


def test_referrers_fallback_tag_lists_the_signature(cli, oci, ns, tmp_path):
    assert cli("push", fake_lora(tmp_path / "src"), "qa").exit_code == 0
    assert cli("keys", "generate").exit_code == 0
    assert cli("sign", "qa:1").exit_code == 0
    add_remote(cli, oci, ns)
    res = jout(cli("push", "qa:1", "--remote", "origin", "--json"))
    tag = res["manifest_digest"].replace(":", "-")
    assert tag in registry_get(oci, f"/v2/{ns}/qa/tags/list").json()["tags"]
    index = registry_get(oci, f"/v2/{ns}/qa/manifests/{tag}", Accept="application/vnd.oci.image.index.v1+json").json()
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    [desc] = index["manifests"]
    assert desc["artifactType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    sm = registry_get(oci, f"/v2/{ns}/qa/manifests/{desc['digest']}", Accept="application/vnd.oci.image.manifest.v1+json").json()
    assert sm["subject"]["digest"] == res["manifest_digest"]
    # A second signature joins the same index; nothing is duplicated on a re-push.
    assert cli("keys", "generate", "bob").exit_code == 0
    assert cli("sign", "qa:1", "--key", "bob").exit_code == 0
    again = jout(cli("push", "qa:1", "--remote", "origin", "--json"))
    assert again["signatures_pushed"] == 1 and again["signatures_present"] == 1
    index = registry_get(oci, f"/v2/{ns}/qa/manifests/{tag}", Accept="application/vnd.oci.image.index.v1+json").json()
    assert len(index["manifests"]) == 2
    # An image index is not an artifact: refused with the reason.
    r = cli("pull", f"oci://{oci.host}/{ns}/qa:{tag}", "--name", "idx")
    assert r.exit_code == 4 and "image index" in r.stderr


def test_version_on_the_remote_is_immutable(cli, oci, ns, tmp_path, monkeypatch, other_home):
    assert cli("push", fake_lora(tmp_path / "a"), "qa").exit_code == 0
    publish_then_switch_home(cli, oci, ns, "qa:1", monkeypatch, other_home)
    assert cli("push", fake_lora(tmp_path / "b", seed=9), "qa").exit_code == 0
    r = cli("push", "qa:1", "--remote", "origin")
    assert r.exit_code == 5 and "already holds other content" in r.stderr


# -- resume, interruption, full disk, concurrency --------------------------------------------


def _big_artifact(cli, tmp_path, mb: float, name="big"):
    src = fake_lora(tmp_path / "src")
    make_files(src, {"weights.bin": secrets.token_bytes(int(mb * 2**20))})
    assert cli("push", src, name).exit_code == 0
    return src, hashlib.sha256((src / "weights.bin").read_bytes()).hexdigest()


def test_pull_resumes_a_partial_download_with_range(cli, oci, ns, tmp_path, monkeypatch, other_home):
    src, hex_ = _big_artifact(cli, tmp_path, 4)
    publish_then_switch_home(cli, oci, ns, "big:1", monkeypatch, other_home)
    assert cli("ls").exit_code == 0  # creates the home
    staging = other_home / "remote-staging" / "blobs"
    staging.mkdir(parents=True)
    half = (src / "weights.bin").read_bytes()[: 2**21]
    (staging / f"{hex_}.partial").write_bytes(half)
    got = jout(cli("pull", "big:1", "--remote", "origin", "--json"))
    assert got["resumed_bytes"] == len(half)
    assert cli("pull", "big:1", tmp_path / "out", "--no-signature-file").exit_code == 0
    assert file_hashes(tmp_path / "out") == file_hashes(src)
    assert staged_leftovers(other_home) == []


def test_a_bad_partial_download_is_discarded_and_fetched_again(cli, oci, ns, tmp_path, monkeypatch, other_home):
    _, hex_ = _big_artifact(cli, tmp_path, 2)
    publish_then_switch_home(cli, oci, ns, "big:1", monkeypatch, other_home)
    staging = other_home / "remote-staging" / "blobs"
    staging.mkdir(parents=True)
    (staging / f"{hex_}.partial").write_bytes(b"\0" * 1000)  # not the blob's first bytes
    assert cli("pull", "big:1", "--remote", "origin").exit_code == 0
    assert cli("fsck").exit_code == 0


def test_pull_killed_mid_download_resumes(cli, oci, ns, tmp_path, monkeypatch, other_home):
    from tests._crash import signal_when

    src, hex_ = _big_artifact(cli, tmp_path, 48)
    publish_then_switch_home(cli, oci, ns, "big:1", monkeypatch, other_home)
    assert cli("ls").exit_code == 0
    partial = other_home / "remote-staging" / "blobs" / f"{hex_}.partial"
    env = {**os.environ, "ADAPTERHUB_HOME": str(other_home)}
    proc = subprocess.Popen([sys.executable, "-m", "adapterhub.cli", "pull", "big:1", "--remote", "origin"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def started() -> bool:
        try:
            return partial.stat().st_size > 0
        except FileNotFoundError:
            return False

    sent, _, _ = signal_when(proc, started, sig=signal.SIGKILL)
    assert jout(cli("ls", "--json")) == [] if sent else True
    left = sum(p.stat().st_size for p in partial.parent.iterdir())  # partial and completed blobs
    got = jout(cli("pull", "big:1", "--remote", "origin", "--json"))
    if sent:
        assert left > 0
        assert got["resumed_bytes"] == left  # what the killed pull had written is not fetched again
    assert cli("pull", "big:1", tmp_path / "out", "--no-signature-file").exit_code == 0
    assert file_hashes(tmp_path / "out") == file_hashes(src)
    assert staged_leftovers(other_home) == []


def test_full_disk_during_pull_imports_nothing(cli, oci, ns, tmp_path):
    from tests._crash import MountRefused, resize_tmpfs, tmpfs

    _big_artifact(cli, tmp_path, 5.5)
    add_remote(cli, oci, ns)
    assert cli("push", "big:1", "--remote", "origin").exit_code == 0
    try:
        ctx = tmpfs(tmp_path / "disk", "4m")
        disk = ctx.__enter__()
    except MountRefused as e:
        pytest.skip(f"needs root to mount a 4 MB tmpfs: {e}")
    try:
        h = disk / "adapterhub"
        env = {"ADAPTERHUB_HOME": str(h), "ADAPTERHUB_REMOTE_USERNAME": USER, "ADAPTERHUB_REMOTE_PASSWORD": PASSWORD}
        url = f"oci://{oci.host}/{ns}/big:1"
        r = run_cli("pull", url, env=env)
        assert r.returncode == 7, r.stderr
        assert "no space left" in r.stderr and "Traceback" not in r.stderr
        assert json.loads(run_cli("ls", "--json", env=env).stdout) == []
        assert staged_leftovers(h) == []
        resize_tmpfs(disk, "64m")
        r = run_cli("pull", url, "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["ref"] == "big:1"
        assert run_cli("fsck", env=env).returncode == 0
    finally:
        ctx.__exit__(None, None, None)


def test_two_clients_push_at_once(cli, oci, ns, tmp_path, home, monkeypatch, other_home):
    """Two processes push two versions of one name (and share blobs) into one repository at once."""
    shared = secrets.token_bytes(3 * 2**20)
    a = make_files(tmp_path / "a", {"shared.bin": shared})
    fake_lora(a, seed=1)
    b = make_files(tmp_path / "b", {"shared.bin": shared})
    fake_lora(b, seed=2)
    assert cli("push", a, "team/qa").exit_code == 0 and cli("push", b, "team/qa").exit_code == 0
    assert cli("keys", "generate").exit_code == 0
    assert cli("sign", "team/qa:1").exit_code == 0 and cli("sign", "team/qa:2").exit_code == 0
    add_remote(cli, oci, ns)
    env = {**os.environ, "ADAPTERHUB_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-m", "adapterhub.cli", "push", f"team/qa:{v}", "--remote", "origin", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for v in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    tags = set(registry_get(oci, f"/v2/{ns}/team/qa/tags/list").json()["tags"])
    assert {"1", "2"} <= tags
    as_home(monkeypatch, other_home)
    add_remote(cli, oci, ns)
    for v, src in ((1, a), (2, b)):
        got = jout(cli("pull", f"team/qa:{v}", "--remote", "origin", "--json"))
        assert got["signatures"] == 1
        assert cli("pull", f"team/qa:{v}", tmp_path / f"out{v}", "--no-signature-file").exit_code == 0
        assert file_hashes(tmp_path / f"out{v}") == file_hashes(src)

    # Both clients now add a signature of their own to version 1 and push at once:
    # both land in the referrers index (each push re-reads it and merges).
    assert cli("keys", "generate", "carol").exit_code == 0 and cli("sign", "team/qa:1", "--key", "carol").exit_code == 0
    as_home(monkeypatch, home)
    assert cli("keys", "generate", "bob").exit_code == 0 and cli("sign", "team/qa:1", "--key", "bob").exit_code == 0
    procs = [subprocess.Popen([sys.executable, "-m", "adapterhub.cli", "push", "team/qa:1", "--remote", "origin"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "ADAPTERHUB_HOME": str(h)})
             for h in (home, other_home)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    mdigest = jout(cli("push", "team/qa:1", "--remote", "origin", "--json"))["manifest_digest"]
    index = registry_get(oci, f"/v2/{ns}/team/qa/manifests/{mdigest.replace(':', '-')}",
                         Accept="application/vnd.oci.image.index.v1+json").json()
    assert len(index["manifests"]) == 3  # the first key's, bob's and carol's


# -- search --------------------------------------------------------------------------------


def test_search_remote_lists_metadata_and_caches_it(cli, oci, ns, tmp_path):
    assert cli("push", fake_lora(tmp_path / "a", r=8), "team/small", "-d", "support tickets").exit_code == 0
    assert cli("push", fake_lora(tmp_path / "b", r=32, base="mistralai/Mistral-7B-v0.1", seed=4), "team/wide").exit_code == 0
    add_remote(cli, oci, ns)
    for ref in ("team/small:1", "team/wide:1"):
        assert cli("push", ref, "--remote", "origin").exit_code == 0
    rows = jout(cli("search", "--remote", "origin", "--json"))
    assert sorted(r["repository"] for r in rows) == [f"{ns}/team/small", f"{ns}/team/wide"]
    small = next(r for r in rows if r["name"] == "team/small")
    assert small["rank"] == 8 and small["method"] == "LORA" and small["kind"] == "adapter"
    assert small["description"] == "support tickets" and set(small["tags"]) == {"1", "latest"}
    assert [r["name"] for r in jout(cli("search", "--remote", "origin", "--min-rank", "16", "--json"))] == ["team/wide"]
    assert [r["name"] for r in jout(cli("search", "tickets", "--remote", "origin", "--cached", "--json"))] == ["team/small"]
    assert [r["name"] for r in jout(cli("search", "--remote", "origin", "--base", "mistral", "--cached", "--json"))] == ["team/wide"]
    human = cli("search", "--remote", "origin")
    assert human.exit_code == 0 and "team/small" in human.stdout


def test_search_of_an_empty_cache_says_how_to_fetch(cli, oci, ns):
    add_remote(cli, oci, ns)
    for args in ((), ("-q",), ("--json",)):
        r = cli("search", "--remote", "origin", "--cached", *args)
        assert r.exit_code == 0 and r.stdout in ("", "[]\n")
        assert "no cached results for origin: run `adapterhub search --remote origin` (without --cached) to fetch" in r.stderr


def _pushed_and_added_elsewhere(cli, oci, ns, tmp_path, monkeypatch, other_home):
    assert cli("push", fake_lora(tmp_path / "a"), "team/qa-lora").exit_code == 0
    publish_then_switch_home(cli, oci, ns, "team/qa-lora:1", monkeypatch, other_home)


def test_search_quiet_output_round_trips_into_pull(cli, oci, ns, tmp_path, monkeypatch, other_home):
    _pushed_and_added_elsewhere(cli, oci, ns, tmp_path, monkeypatch, other_home)
    r = cli("search", "--remote", "origin", "-q")
    assert r.exit_code == 0, r.output
    [line] = r.stdout.splitlines()
    assert line == f"oci://{oci.host}/{ns}/team/qa-lora:1"  # the version's tag, of the repository under the namespace
    # What -q prints is what `pull` takes, with --remote or without.
    assert jout(cli("pull", line, "--remote", "origin", "--json"))["ref"] == "team/qa-lora:1"
    assert cli("rm", "team/qa-lora", "--all", "--yes").exit_code == 0
    assert jout(cli("pull", line, "--json"))["ref"] == "team/qa-lora:1"
    assert cli("search", "--remote", "origin", "--cached", "-q").stdout == line + "\n"
    r = cli("pull", f"oci://{oci.host}/elsewhere/qa:1", "--remote", "origin")
    assert r.exit_code == 2 and "not under remote origin" in r.stderr


def test_search_takes_a_url_as_remote(cli, oci, ns, tmp_path, monkeypatch, other_home):
    _pushed_and_added_elsewhere(cli, oci, ns, tmp_path, monkeypatch, other_home)
    line = f"oci://{oci.host}/{ns}/team/qa-lora:1"
    # The recorded remote's own URL is that remote (cached as it is); any other URL is searched, not cached.
    assert [x["url"] for x in jout(cli("search", "--remote", oci.url(ns), "--json"))] == [line]
    assert [x["name"] for x in jout(cli("search", "--remote", oci.url(ns), "--cached", "--json"))] == ["team/qa-lora"]
    monkeypatch.setenv("ADAPTERHUB_REMOTE_USERNAME", USER)
    monkeypatch.setenv("ADAPTERHUB_REMOTE_PASSWORD", PASSWORD)
    assert cli("remote", "rm", "origin").exit_code == 0
    rows = jout(cli("search", "--remote", oci.url(ns), "--json"))
    assert [(x["name"], x["url"]) for x in rows] == [("team/qa-lora", line)]
    r = cli("search", "--remote", oci.url(ns), "--cached")
    assert r.exit_code == 2 and "recorded remote" in r.stderr


def test_name_with_version_for_oci_imports(cli, oci, ns, tmp_path, monkeypatch, other_home):
    assert cli("push", fake_lora(tmp_path / "a"), "team/qa-lora").exit_code == 0
    publish_then_switch_home(cli, oci, ns, "team/qa-lora:1", monkeypatch, other_home)
    got = jout(cli("pull", "team/qa-lora:1", "--remote", "origin", "--name", "x/z:7", "--json"))
    assert got["ref"] == "x/z:7"
    assert jout(cli("pull", "team/qa-lora:1", "--remote", "origin", "--name", "x/other", "--json"))["ref"] == "x/other:1"
    r = cli("pull", "team/qa-lora:1", "--remote", "origin", "--name", "x/z:no space")
    assert r.exit_code == 4


def test_push_reports_files_apart_from_metadata_blobs(cli, oci, ns, tmp_path):
    src = fake_lora(tmp_path / "src")
    make_files(src, {"notes.txt": b"three files\n"})
    assert cli("push", src, "qa").exit_code == 0
    assert cli("keys", "generate").exit_code == 0 and cli("sign", "qa:1").exit_code == 0
    add_remote(cli, oci, ns)
    r = cli("push", "qa:1", "--remote", "origin")
    assert r.exit_code == 0, r.output
    digest = jout(cli("show", "qa:1", "--json"))["digest"]
    first, second = r.stdout.splitlines()
    assert first.startswith(f"pushed qa:1 to oci://{oci.host}/{ns}/qa:1: 3 files uploaded (")
    assert first.endswith("0 already there; config uploaded; 1 signature pushed, 0 already there")
    assert second.startswith("manifest sha256:") and f"artifact {digest[:19]}…" in second
    again = cli("push", "qa:1", "--remote", "origin").stdout.splitlines()[0]
    assert again.endswith(": 0 files uploaded (0 B), 3 already there; config already there; "
                          "0 signatures pushed, 1 already there")


def test_no_staged_copy_is_left_of_a_blob_the_store_holds(cli, oci, ns, tmp_path, monkeypatch, other_home):
    """An import interrupted after it stored the blobs leaves hard links in staging; the next pull drops them."""
    from adapterhub.registry import Registry
    from adapterhub.registry import remotes

    assert cli("push", fake_lora(tmp_path / "a"), "qa").exit_code == 0
    publish_then_switch_home(cli, oci, ns, "qa:1", monkeypatch, other_home)
    real_push = Registry.push

    def push_then_interrupt(self, *a, **kw):
        real_push(self, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(Registry, "push", push_then_interrupt)
    with Registry() as reg, pytest.raises(KeyboardInterrupt):
        from adapterhub.trust.remote_gate import remote_gate

        remotes.pull_remote(reg, remotes.resolve(reg, remote="origin", ref="qa:1"), gate=remote_gate(reg))
    monkeypatch.setattr(Registry, "push", real_push)
    assert staged_leftovers(other_home)  # hard links to the stored blobs, kept for a resume
    got = jout(cli("pull", "qa:1", "--remote", "origin", "--json"))
    assert got["blobs_downloaded"] == 0 and got["blobs_local"] == 2
    assert staged_leftovers(other_home) == []
    assert jout(cli("gc", "--dry-run", "--staging-age", "0", "--json"))["staging"] == []


def test_remote_url_parsing():
    from adapterhub.errors import InvalidNameError
    from adapterhub.registry.remotes import parse_url

    u = parse_url("oci://127.0.0.1:5000/ns/team/qa:3")
    assert (u.host, u.path, u.reference, u.loopback) == ("127.0.0.1:5000", "ns/team/qa", "3", True)
    u = parse_url("oci://registry.example.com/ns/qa@sha256:" + "a" * 64)
    assert u.reference == "sha256:" + "a" * 64 and not u.loopback
    assert parse_url("hf://org/repo@main").path == "org/repo"
    for bad in ("http://x/y", "oci://bad host/x", "hf://", "hf://a/b/c"):
        with pytest.raises(InvalidNameError):
            parse_url(bad)


def test_hf_remotes_are_recorded_and_dispatched(cli, tmp_path, home):
    """The hf:// side goes to registry.remotes.hf; offline (as the tests run) it says so, exit 9."""
    pytest.importorskip("adapterhub.registry.remotes.hf")
    assert cli("push", fake_lora(tmp_path / "src"), "team/qa").exit_code == 0
    r = cli("remote", "add", "hub", "hf://my-org", "--endpoint", "http://127.0.0.1:9/hub", "--token-stdin", input="hf_secret\n")
    assert r.exit_code == 0, r.output
    assert jout(cli("remote", "ls", "--json"))[0] | {"created_at": None} == {
        "name": "hub", "url": "hf://my-org", "kind": "hf", "endpoint": "http://127.0.0.1:9/hub", "insecure": False,
        "created_at": None, "credentials": "file"}
    assert "hf_secret" not in json.dumps(jout(cli("remote", "ls", "--json")))
    assert cli("remote", "add", "x", "oci://h/ns", "--endpoint", "http://e").exit_code == 2
    for args in (("push", "team/qa:1", "--remote", "hub"), ("push", "team/qa:1", "hf://my-org/qa"),
                 ("search", "--remote", "hub")):
        r = cli(*args)
        assert r.exit_code == 9 and "HF_HUB_OFFLINE" in r.stderr, (args, r.output)
    # `pull NAME:VERSION --remote hub` asks for the repo's version tag (an offline miss: not found).
    r = cli("pull", "team/qa:1", "--remote", "hub")
    assert r.exit_code in (3, 9) and "hf://my-org/qa@v1" in r.stderr, r.output


def test_two_pulls_of_one_artifact_into_one_home_at_once(cli, oci, ns, tmp_path, monkeypatch, other_home):
    src, _ = _big_artifact(cli, tmp_path, 8)
    publish_then_switch_home(cli, oci, ns, "big:1", monkeypatch, other_home)
    env = {**os.environ, "ADAPTERHUB_HOME": str(other_home)}
    procs = [subprocess.Popen([sys.executable, "-m", "adapterhub.cli", "pull", "big:1", "--remote", "origin", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert sorted(json.loads(o[0])["created"] for o in outs) == [False, True]
    assert cli("fsck").exit_code == 0 and staged_leftovers(other_home) == []
    assert cli("pull", "big:1", tmp_path / "out", "--no-signature-file").exit_code == 0
    assert file_hashes(tmp_path / "out") == file_hashes(src)


def test_require_provenance_applies_to_remote_imports(cli, oci, ns, tmp_path, monkeypatch, other_home):
    from adapterhub.trust import keys
    from adapterhub.trust import provenance
    from adapterhub.registry import Registry

    assert cli("keys", "generate").exit_code == 0
    pub = tmp_path / "default.pub"
    pub.write_text(cli("keys", "export", "default").stdout)
    with Registry() as reg:
        parent = reg.push(fake_lora(tmp_path / "a"), "team/a")
        for name, seed, attest in (("merged", 3, True), ("bare", 4, False)):
            d = reg.push(fake_lora(tmp_path / name, seed=seed), f"team/{name}",
                         derived_from=[(parent.digest, "adapter")], recipe={"operation": "merge"})
            if attest:
                provenance.sign(reg, d.ref, keys.get("default"))
    add_remote(cli, oci, ns)
    for ref in ("team/a:1", "team/merged:1", "team/bare:1"):
        assert cli("push", ref, "--remote", "origin").exit_code == 0

    as_home(monkeypatch, other_home)
    add_remote(cli, oci, ns)
    # Signed by a key this registry does not trust: refused before any download.
    r = cli("pull", "team/merged:1", "--remote", "origin", "--require-provenance")
    assert r.exit_code == 8 and "not trusted" in r.stderr, r.output
    assert jout(cli("ls", "--json")) == [] and staged_leftovers(other_home) == []
    # Without the flag or a rule, it imports (the attestation is stored, checked when used).
    got = jout(cli("pull", "team/merged:1", "--remote", "origin", "--json"))
    assert got["provenance_required"] is False and "provenance" not in got
    assert cli("rm", "team/merged", "--all", "--yes").exit_code == 0

    assert cli("trust", "add", pub, "--name", "alice").exit_code == 0
    assert cli("policy", "set", "require-provenance", "--namespace", "team").exit_code == 0
    got = jout(cli("pull", "team/merged:1", "--remote", "origin", "--json"))
    assert got["provenance_required"] is True and got["provenance"] == "verified"
    # Its own attestation verifies; its parent is not in this registry, so the chain is incomplete.
    r = cli("provenance", "team/merged:1")
    assert r.exit_code == 8 and "incomplete" in r.output, r.output
    assert cli("provenance", "team/merged:1", "--allow-incomplete").exit_code == 0
    # A derived artifact with no attestation is refused by the rule; a source artifact has nothing to attest.
    r = cli("pull", "team/bare:1", "--remote", "origin")
    assert r.exit_code == 8 and "no signed provenance" in r.stderr, r.output
    assert [v["name"] for v in jout(cli("ls", "--json"))] == ["team/merged"]
    got = jout(cli("pull", "team/a:1", "--remote", "origin", "--json"))
    assert got["provenance_required"] is True and "provenance" not in got
    assert staged_leftovers(other_home) == []


def test_gc_removes_stale_downloads_of_broken_pulls(cli, oci, ns, tmp_path, monkeypatch, other_home):
    from adapterhub.registry import Registry
    from adapterhub.registry.remotes.oci import staging

    _, hex_ = _big_artifact(cli, tmp_path, 2)
    publish_then_switch_home(cli, oci, ns, "big:1", monkeypatch, other_home)
    stage = other_home / "remote-staging"
    (stage / "blobs").mkdir(parents=True)
    old = stage / "blobs" / f"{'ab' * 32}.partial"
    old.write_bytes(b"x" * 1000)
    day_ago = os.stat(old).st_mtime - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    fresh = stage / "blobs" / f"{hex_}.partial"  # a broken pull of an hour ago: kept for resume
    fresh.write_bytes(b"\0" * 1000)
    work = stage / "pull-0123456789ab.incomplete"  # a killed pull's work dir
    make_files(work, {"big/weights.bin": b"y" * 10})

    fsck = jout(cli("fsck", "--json"))
    assert fsck["ok"] is True and sorted(fsck["staging"]) == sorted([str(old), str(work)])
    # While a pull holds the staging lock, gc lists and deletes nothing there.
    with Registry() as reg, staging.staging_lock(staging.staging_root(reg)):
        plan = jout(cli("gc", "--yes", "--json"))
        assert plan["staging"] == [] and plan["staging_busy"] is True
    assert old.exists() and work.exists()
    plan = jout(cli("gc", "--dry-run", "--json"))
    assert {s["path"] for s in plan["staging"]} == {str(old), str(work)} and plan["freed_bytes"] == 1010
    assert old.exists()
    r = cli("gc", "--yes")
    assert r.exit_code == 0 and "delete stale download" in r.stdout
    assert not old.exists() and not work.exists() and fresh.exists()
    # The kept download is still resumed (a bad one is discarded and fetched again) ...
    assert cli("pull", "big:1", "--remote", "origin").exit_code == 0
    assert staged_leftovers(other_home) == []
    # ... and --staging-age 0 takes every kept download.
    (stage / "blobs" / f"{hex_}.partial").write_bytes(b"z")
    assert jout(cli("gc", "--yes", "--staging-age", "0", "--json"))["staging"] != []
    assert staged_leftovers(other_home) == [] and (stage / "pull.lock").exists()
    assert cli("fsck").exit_code == 0


def test_blob_writer_uses_o_direct_while_aligned_and_falls_back(tmp_path):
    import mmap

    from adapterhub.registry.remotes.oci.transfer import DIRECT_ALIGN, BlobWriter

    data = secrets.token_bytes(3 * DIRECT_ALIGN + 100)
    buf = mmap.mmap(-1, len(data))  # page-aligned, as the download's buffers are
    buf[:] = data
    view = memoryview(buf)
    path = tmp_path / "blob.partial"
    w = BlobWriter(path, False, 0, True)
    try:
        w.write(view[: 2 * DIRECT_ALIGN])
        w.write(view[2 * DIRECT_ALIGN : 3 * DIRECT_ALIGN + 50])  # a short last chunk: ordinary writes from here
        assert w.direct is False
    finally:
        os.close(w.fd)
    resumed = BlobWriter(path, True, 3 * DIRECT_ALIGN + 50, True)  # an unaligned resume never tries O_DIRECT
    try:
        assert resumed.direct is False
        resumed.write(view[3 * DIRECT_ALIGN + 50 :])
    finally:
        os.close(resumed.fd)
    view.release()
    assert path.read_bytes() == data
