"""Token auth against a real registry, logins like docker, and waits a registry asks for (issue 15, items 2 and 3).

- Distribution 2.8 with ``auth: token`` (realm, service, issuer, root
  certificate bundle); ``tests/_token_service.py`` issues JWTs signed by a
  throwaway key, and the registry verifies each one;
- Docker's ``credsStore`` and ``credHelpers`` through the real Debian
  ``docker-credential-pass``, with ``pass`` and a throwaway gpg key;
- ``adapterhub remote login`` / ``logout``;
- ``Retry-After`` on 429 and 503, and jittered bounded backoff (a loopback stub).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time

import pytest

from tests._http_stub import Stub
from tests._oci_server import PASSWORD, USER
from tests.conftest import fake_lora


@pytest.fixture(autouse=True)
def remote_env(monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_REMOTE_TIMEOUT", "5")
    monkeypatch.setenv("ADAPTERHUB_REMOTE_RETRIES", "1")
    for k in ("ADAPTERHUB_REMOTE_TOKEN", "ADAPTERHUB_REMOTE_USERNAME", "ADAPTERHUB_REMOTE_PASSWORD",
              "ADAPTERHUB_TOKEN_REALMS", "ADAPTERHUB_REMOTE_DEADLINE", "ADAPTERHUB_REMOTE_MIN_RATE",
              "ADAPTERHUB_REMOTE_MAX_WAIT", "ADAPTERHUB_OCI_CHUNK_MB"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", "/nonexistent-docker-config")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    from tests._token_service import TokenService

    service = TokenService(tmp_path_factory.mktemp("token-service"))
    yield service
    service.stop()


@pytest.fixture(scope="module")
def token_oci(tmp_path_factory, tokens):
    """Distribution with ``auth: token``, trusting the token service's key."""
    from tests import _oci_server

    server = _oci_server.start_or_skip(tmp_path_factory, "oci-token", token=tokens.registry_settings())
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def token_defaults(request):
    """Each test starts from the token service's defaults."""
    if "tokens" in request.fixturenames:
        t = request.getfixturevalue("tokens")
        t.lifetime, t.claimed_lifetime, t.wrong_scope, t.catalog = 300.0, None, False, False
        t.issued.clear()


@pytest.fixture
def ns():
    return "k" + secrets.token_hex(4)


def jout(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def pushes(scope: str, repo: str) -> bool:
    """Is ``scope`` ``repository:REPO:pull,push`` (the registry orders the actions as it likes)?"""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    return (kind, name, set(actions.split(","))) == ("repository", repo, {"pull", "push"})


def as_alice(monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_REMOTE_USERNAME", USER)
    monkeypatch.setenv("ADAPTERHUB_REMOTE_PASSWORD", PASSWORD)


def anonymous(monkeypatch):
    monkeypatch.delenv("ADAPTERHUB_REMOTE_USERNAME", raising=False)
    monkeypatch.delenv("ADAPTERHUB_REMOTE_PASSWORD", raising=False)


# -- token auth against the real registry ------------------------------------------------------


def test_push_with_a_push_scope_then_an_anonymous_pull(cli, token_oci, tokens, ns, tmp_path, monkeypatch):
    assert cli("push", fake_lora(tmp_path / "src"), "team/qa").exit_code == 0
    url = f"oci://{token_oci.host}/{ns}/team/qa:1"
    as_alice(monkeypatch)
    res = jout(cli("push", "team/qa:1", url, "--json"))
    assert res["files_uploaded"] == 2
    assert any(user == USER and pushes(scope, f"{ns}/team/qa") for user, scope, _ in tokens.issued), tokens.issued

    anonymous(monkeypatch)
    tokens.issued.clear()
    got = jout(cli("pull", url, "--name", "team/copy", "--json"))
    assert got["ref"] == "team/copy:1"
    assert tokens.issued and all(user == "" for user, _, _ in tokens.issued)
    assert any(acc == [{"type": "repository", "name": f"{ns}/team/qa", "actions": ["pull"]}]
               for _, _, acc in tokens.issued), tokens.issued


def test_an_anonymous_push_is_refused_for_want_of_a_push_scope(cli, token_oci, tokens, ns, tmp_path, monkeypatch):
    assert cli("push", fake_lora(tmp_path / "src"), "qa").exit_code == 0
    anonymous(monkeypatch)
    r = cli("push", "qa:1", f"oci://{token_oci.host}/{ns}/qa:1")
    assert r.exit_code == 9, r.output
    assert (f"repository:{ns}/qa:pull,push" in r.stderr or f"repository:{ns}/qa:push,pull" in r.stderr) \
        and "insufficient_scope" in r.stderr, r.stderr
    assert len(tokens.issued) <= 4  # a refusal is final after one fresh try: no loop


def test_a_token_for_the_wrong_scope_is_a_clear_refusal(cli, token_oci, tokens, ns, tmp_path, monkeypatch):
    assert cli("push", fake_lora(tmp_path / "src"), "qa").exit_code == 0
    as_alice(monkeypatch)
    url = f"oci://{token_oci.host}/{ns}/qa:1"
    assert cli("push", "qa:1", url).exit_code == 0
    tokens.wrong_scope = True  # grants the asked actions on another repository
    tokens.issued.clear()
    r = cli("pull", url, "--name", "other")
    assert r.exit_code == 9, r.output
    assert f"refused access for repository:{ns}/qa:pull" in r.stderr
    assert 1 <= len(tokens.issued) <= 3
    assert jout(cli("ls", "--json"))[0]["name"] == "qa"  # nothing imported


@pytest.mark.parametrize("told", ["the truth", "a longer life"])
def test_a_token_that_expires_during_a_long_push_is_refreshed(cli, token_oci, tokens, ns, tmp_path, monkeypatch, told):
    """The registry accepts each token for 3 s; the push takes longer (a progress callback that waits).

    Told the truth (expires_in 3), the client fetches a new token before it
    sends an expired one; told a longer life, it sends the expired token,
    gets a 401, and fetches a new one then.
    """
    from adapterhub.registry import Registry, remotes

    big = tmp_path / "src"
    fake_lora(big)
    (big / "notes.bin").write_bytes(secrets.token_bytes(16 * 65536))
    assert cli("push", big, "team/long").exit_code == 0
    as_alice(monkeypatch)
    monkeypatch.setenv("ADAPTERHUB_OCI_CHUNK_MB", str(65536 / 2**20))  # 64 KiB PATCH chunks
    tokens.lifetime = 3.0
    tokens.claimed_lifetime = None if told == "the truth" else 3600.0

    class Slow:
        def __init__(self, desc, total):
            pass

        def update(self, n):
            time.sleep(0.5)

        def close(self):
            pass

    with Registry() as reg:
        ep = remotes.resolve(reg, url=f"oci://{token_oci.host}/{ns}/team/long:1")
        t0 = time.monotonic()
        res = remotes.push_remote(reg, "team/long:1", ep, progress=Slow)
        took = time.monotonic() - t0
    assert res["files_uploaded"] == 3
    push_tokens = [s for u, s, _ in tokens.issued if u == USER and pushes(s, f"{ns}/team/long")]
    assert took > 3.0 and len(push_tokens) >= 2, (took, tokens.issued)
    tokens.lifetime = 300.0
    anonymous(monkeypatch)
    got = jout(cli("pull", f"oci://{token_oci.host}/{ns}/team/long:1", "--name", "team/back", "--json"))
    assert got["digest"] == res["digest"]


def test_search_without_a_catalog_lists_the_tags_of_the_names_given(cli, token_oci, tokens, ns, tmp_path, monkeypatch):
    as_alice(monkeypatch)
    for name in ("team/a", "team/b"):
        assert cli("push", fake_lora(tmp_path / name.replace("/", "-")), name).exit_code == 0
    assert cli("remote", "add", "origin", f"oci://{token_oci.host}/{ns}").exit_code == 0
    for name in ("team/a", "team/b"):
        assert cli("push", f"{name}:1", "--remote", "origin").exit_code == 0
    r = cli("search", "--remote", "origin")  # the token service grants no catalog access, as GHCR's
    assert r.exit_code == 2 and "does not list its repositories" in r.stderr and "--name" in r.stderr, r.output
    rows = jout(cli("search", "--remote", "origin", "--name", "team/a", "--json"))
    assert [(row["name"], sorted(row["tags"])) for row in rows] == [("team/a", ["1", "latest"])]
    rows = jout(cli("search", "--remote", "origin", "--name", "team/b", "--name", "team/none", "--json"))
    assert [row["name"] for row in rows] == ["team/b"]
    assert sorted(row["name"] for row in jout(cli("search", "--remote", "origin", "--cached", "--json"))) == ["team/a", "team/b"]
    tokens.catalog = True  # a registry with a catalog: no names needed
    assert sorted(row["name"] for row in jout(cli("search", "--remote", "origin", "--json"))) == ["team/a", "team/b"]


# -- docker credential helpers --------------------------------------------------------------------


@pytest.fixture
def pass_store(tmp_path, monkeypatch):
    """``pass`` with a throwaway gpg key (no passphrase), in temporary GNUPGHOME and store."""
    missing = [b for b in ("gpg", "gpgconf", "pass", "docker-credential-pass") if shutil.which(b) is None]
    if missing:
        if os.environ.get("ADAPTERHUB_REQUIRE_OCI") == "1":
            pytest.fail(f"ADAPTERHUB_REQUIRE_OCI=1 but {missing} are missing (golang-docker-credential-helpers, pass)")
        pytest.skip(f"{missing} missing (apt-get install golang-docker-credential-helpers pass)")
    gnupg = tmp_path / "gnupg"
    gnupg.mkdir(mode=0o700)
    monkeypatch.setenv("GNUPGHOME", str(gnupg))
    monkeypatch.setenv("PASSWORD_STORE_DIR", str(tmp_path / "password-store"))
    env = dict(os.environ)
    subprocess.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "", "--quick-gen-key",
                    "adapterhub test <test@example.invalid>", "default", "default", "never"],
                   check=True, capture_output=True, env=env)
    listing = subprocess.run(["gpg", "--list-keys", "--with-colons"], check=True, capture_output=True, text=True, env=env)
    fpr = next(line.split(":")[9] for line in listing.stdout.splitlines() if line.startswith("fpr"))
    subprocess.run(["pass", "init", fpr], check=True, capture_output=True, env=env)

    def store(server: str, user: str, secret: str) -> None:
        doc = json.dumps({"ServerURL": server, "Username": user, "Secret": secret})
        subprocess.run(["docker-credential-pass", "store"], input=doc, text=True, check=True, capture_output=True,
                       env=dict(os.environ))

    yield store
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], capture_output=True, env=dict(os.environ))


@pytest.mark.parametrize("where", ["credsStore", "credHelpers"])
def test_credentials_from_a_docker_credential_helper(cli, oci, pass_store, ns, tmp_path, monkeypatch, where):
    """docker login with the pass helper leaves nothing in auths: the helper protocol is the only way in."""
    pass_store(oci.host, USER, PASSWORD)
    docker = tmp_path / "docker"
    docker.mkdir()
    config = {"auths": {oci.host: {}}, "credsStore": "pass"} if where == "credsStore" else \
        {"auths": {}, "credHelpers": {oci.host: "pass"}}
    (docker / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    assert cli("push", fake_lora(tmp_path / "src"), "team/qa").exit_code == 0
    assert cli("remote", "add", "origin", oci.url(ns)).exit_code == 0
    assert jout(cli("remote", "ls", "--json"))[0]["credentials"] == "docker-credential-pass"
    assert jout(cli("push", "team/qa:1", "--remote", "origin", "--json"))["files_uploaded"] == 2
    # A host the helper knows nothing of: no credentials, so the registry's refusal.
    pass_store("127.0.0.1:1", USER, "other")
    (docker / "config.json").write_text(json.dumps({"credHelpers": {"elsewhere.example": "pass"}}))
    r = cli("push", "team/qa:1", "--remote", "origin")
    assert r.exit_code == 9 and "requires authentication" in r.stderr, r.output


def test_a_missing_credential_helper_is_a_clear_error(cli, oci, ns, tmp_path, monkeypatch):
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps({"credsStore": "no-such-helper-xyz"}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    r = cli("pull", f"oci://{oci.host}/{ns}/x:1")
    assert r.exit_code == 9 and "docker-credential-no-such-helper-xyz is not on PATH" in r.stderr, r.output


# -- adapterhub remote login ----------------------------------------------------------------------


def test_remote_login_and_logout(cli, oci, ns, tmp_path, home):
    assert cli("push", fake_lora(tmp_path / "src"), "qa").exit_code == 0
    assert cli("remote", "add", "origin", oci.url(ns)).exit_code == 0
    r = cli("push", "qa:1", "--remote", "origin")
    assert r.exit_code == 9 and "requires authentication" in r.stderr
    r = cli("remote", "login", "origin", "-u", USER, "--password-stdin", input="wrong\n")
    assert r.exit_code == 9 and "refused" in r.stderr
    assert jout(cli("remote", "ls", "--json"))[0]["credentials"] == "none"  # a refused one is not stored
    r = cli("remote", "login", "origin", "-u", USER, "--password-stdin", "--json", input=PASSWORD + "\n")
    got = jout(r)
    assert got["credentials"] == "file" and got["credentials_check"] == "ok" and PASSWORD not in r.output
    assert (home / "credentials.json").stat().st_mode & 0o777 == 0o600
    assert cli("push", "qa:1", "--remote", "origin").exit_code == 0
    assert jout(cli("remote", "logout", "origin", "--json"))["credentials"] == "none"
    assert cli("push", "qa:1", "--remote", "origin").exit_code == 9
    assert cli("remote", "login", "nope", "-u", USER, "--password-stdin", input="x\n").exit_code == 3
    assert cli("remote", "login", "origin", "-u", USER).exit_code == 2  # never a password as an argument


# -- Retry-After and backoff ----------------------------------------------------------------------


def _busy_registry(answers: list[tuple[int, dict[str, str]]]) -> tuple[Stub, list[float]]:
    """A registry whose manifest requests get ``answers`` in turn (then 404), with arrival times."""
    times: list[float] = []

    def handle(req):
        if req.path == "/v2/":
            req.send(200, {"Content-Type": "application/json"}, b"{}")
            return
        times.append(time.monotonic())
        status, headers = answers.pop(0) if answers else (404, {})
        body = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}' if status == 404 else b"busy"
        req.send(status, {"Content-Type": "application/json", **headers}, body)

    return Stub(handle), times


def test_retry_after_is_honoured(cli, home, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_REMOTE_RETRIES", "2")
    registry, times = _busy_registry([(429, {"Retry-After": "2"}), (503, {"Retry-After": "1"})])
    try:
        r = cli("pull", f"oci://{registry.host}/ns/x:1")
    finally:
        registry.stop()
    assert r.exit_code == 3, r.output  # got through to the answer: not found
    assert len(times) == 3
    assert times[1] - times[0] >= 2.0 and times[2] - times[1] >= 1.0  # no sooner than asked


def test_a_retry_after_past_the_longest_wait_is_reported_not_waited_for(cli, home, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_REMOTE_MAX_WAIT", "30")
    registry, times = _busy_registry([(429, {"Retry-After": "3600"})])
    try:
        r = cli("pull", f"oci://{registry.host}/ns/x:1")
    finally:
        registry.stop()
    assert r.exit_code == 9 and "retry after 3600 s" in r.stderr, r.output
    assert len(times) == 1


def test_5xx_without_retry_after_gets_bounded_retries(cli, home, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_REMOTE_RETRIES", "3")
    registry, times = _busy_registry([(503, {})] * 10)
    try:
        r = cli("pull", f"oci://{registry.host}/ns/x:1")
    finally:
        registry.stop()
    assert r.exit_code == 9 and "after 4 attempts" in r.stderr, r.output
    assert len(times) == 4


def test_backoff_is_jittered_and_bounded():
    from adapterhub.registry.remotes.oci.http import backoff, retry_after

    waits = [backoff(5) for _ in range(200)]
    assert all(0 <= w <= 4.0 for w in waits) and len(set(waits)) > 100  # 0.25 * 2^4 = 4 s cap for try 5
    assert all(backoff(50) <= 8.0 for _ in range(50))
    assert retry_after("7") == 7.0 and retry_after("soon") is None and retry_after(None) is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
