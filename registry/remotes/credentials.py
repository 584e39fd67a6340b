"""Registry credentials: where they come from, and the 0600 file that holds the stored ones.

Credentials never enter the index. They are looked up in this order:

1. ``$ADAPTERHUB_HOME/credentials.json`` (mode 0600), written by
   ``adapterhub remote add --username U --password-stdin`` or ``--token-stdin``;
2. the environment: ``ADAPTERHUB_REMOTE_USERNAME`` and
   ``ADAPTERHUB_REMOTE_PASSWORD``, or ``ADAPTERHUB_REMOTE_TOKEN`` (``HF_TOKEN``
   for the Hub);
3. for OCI, what ``docker login`` left in ``$DOCKER_CONFIG/config.json`` (or
   ``~/.docker/config.json``): the host's credential helper
   (``credHelpers[host]``), else the credential store (``credsStore``), both
   asked through the ``docker-credential-<name> get`` protocol (Docker
   Desktop, ``pass``, ``secretservice``, ECR, GCR, ACR helpers), else
   ``auths[host].auth`` (base64 ``user:password``).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub import config
from adapterhub.errors import RemoteAuthError
from adapterhub.fsutil import write_atomic

if TYPE_CHECKING:
    from adapterhub.registry.remotes.store import Remote
    from adapterhub.registry.remotes.urls import RemoteURL

CREDENTIALS_FILE = "credentials.json"


@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password: str | None = None
    token: str | None = None
    source: str = "none"  # file | environment | docker-config | none

    def __bool__(self) -> bool:
        return bool(self.token or self.username)


def _credentials_path() -> Path:
    return config.home() / CREDENTIALS_FILE


def _load_credentials() -> dict[str, Any]:
    p = _credentials_path()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        raise RemoteAuthError(f"cannot read {p}: {e}", hint="fix or delete the file, then `adapterhub remote add` again") from None
    return data.get("remotes", {}) if isinstance(data, dict) else {}


def store_credentials(name: str, creds: dict[str, Any] | None) -> None:
    """Write the credentials file atomically with mode 0600 (temp file, fsync, rename)."""
    current = _load_credentials()
    if creds is None:
        if name not in current:
            return
        current.pop(name)
    else:
        current[name] = {k: v for k, v in creds.items() if v is not None}
    p = _credentials_path()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(p, data=json.dumps({"remotes": current}, indent=2).encode(), mode=0o600)


def _docker_config() -> tuple[Path, dict[str, Any]] | None:
    """Docker's ``config.json`` (``$DOCKER_CONFIG`` or ``~/.docker``), or None when there is none."""
    from adapterhub.errors import InvalidArtifactError
    from adapterhub.jsonio import read_json

    d = os.environ.get("DOCKER_CONFIG")
    path = Path(d) / "config.json" if d else Path.home() / ".docker" / "config.json"
    if not path.is_file():
        return None
    try:
        return path, read_json(path, what=str(path), max_bytes=4 << 20)
    except InvalidArtifactError as e:
        raise RemoteAuthError(f"cannot read Docker's credentials: {e}", hint="fix or remove that file") from None


def _auths_entry(path: Path, doc: dict[str, Any], host: str) -> Credentials | None:
    """``auths[host].auth`` (base64 ``user:password``), under any of the keys ``docker login`` writes."""
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        return None
    for key in (host, f"https://{host}", f"http://{host}", f"https://{host}/v2/", f"http://{host}/v2/"):
        entry = auths.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
            try:
                user, sep, pw = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise RemoteAuthError(f"{path}: auths[{key!r}].auth is not base64 of user:password") from None
            if sep:
                return Credentials(user, pw, source="docker-config")
    return None


HELPER_TIMEOUT_S = 60.0  # a helper may ask the user (a keychain prompt, gpg's pinentry)


def helper_get(helper: str, server: str) -> Credentials | None:
    """Ask ``docker-credential-<helper> get`` for ``server`` (Docker's credential-helper protocol).

    The helper reads the server on stdin and answers ``{"ServerURL", "Username",
    "Secret"}``; "not found" (an error, or an empty secret) is None. A
    ``Username`` of ``<token>`` marks an identity token, which is sent as a
    registry bearer token.
    """
    import shutil
    import subprocess

    from adapterhub.errors import InvalidArtifactError
    from adapterhub.jsonio import loads

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", helper):
        raise RemoteAuthError(f"Docker's config names an invalid credential helper {helper!r}")
    exe = shutil.which(f"docker-credential-{helper}")
    if exe is None:
        raise RemoteAuthError(f"Docker's config.json names the credential helper {helper!r}, but "
                              f"docker-credential-{helper} is not on PATH",
                              hint="install it, or remove credsStore/credHelpers from the Docker config")
    try:
        p = subprocess.run([exe, "get"], input=server.encode(), capture_output=True, timeout=HELPER_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RemoteAuthError(f"docker-credential-{helper} did not answer: {e}") from None
    out = p.stdout.decode("utf-8", "replace")
    if p.returncode != 0:
        if "not found" in out.lower() or "not found" in p.stderr.decode("utf-8", "replace").lower():
            return None
        raise RemoteAuthError(f"docker-credential-{helper} get failed (exit {p.returncode}): "
                              f"{(out or p.stderr.decode('utf-8', 'replace')).strip()[:200]}")
    try:
        doc = loads(p.stdout, what=f"docker-credential-{helper}'s answer", max_bytes=1 << 20, max_depth=4)
    except InvalidArtifactError as e:
        raise RemoteAuthError(str(e)) from None
    user, secret = (doc.get("Username"), doc.get("Secret")) if isinstance(doc, dict) else (None, None)
    if not isinstance(secret, str) or not secret:
        return None
    source = f"docker-credential-{helper}"
    if user == "<token>":
        return Credentials(token=secret, source=source)
    return Credentials(user if isinstance(user, str) else "", secret, source=source)


def _docker_config_auth(host: str) -> Credentials | None:
    """Credentials ``docker login`` left for ``host``: ``credHelpers[host]``, then ``credsStore``, then ``auths``."""
    found = _docker_config()
    if found is None:
        return None
    path, doc = found
    helpers = doc.get("credHelpers") if isinstance(doc.get("credHelpers"), dict) else {}
    helper = helpers.get(host) or helpers.get(host.split(":", 1)[0] if not host.startswith("[") else host)
    store = doc.get("credsStore")
    for h in (helper, store):
        if isinstance(h, str) and h:
            got = helper_get(h, host)
            if got is not None:
                return got
            if h == helper:
                return None  # Docker uses the host's own helper only
    return _auths_entry(path, doc, host)


def credentials(remote: Remote | None, url: RemoteURL) -> Credentials:
    """Credentials for ``url`` (through ``remote`` when it is a recorded one)."""
    if remote is not None:
        stored = _load_credentials().get(remote.name)
        if isinstance(stored, dict) and (stored.get("token") or stored.get("username")):
            return Credentials(stored.get("username"), stored.get("password"), stored.get("token"), "file")
    env = os.environ
    if env.get("ADAPTERHUB_REMOTE_TOKEN"):
        return Credentials(token=env["ADAPTERHUB_REMOTE_TOKEN"], source="environment")
    if env.get("ADAPTERHUB_REMOTE_USERNAME"):
        return Credentials(env["ADAPTERHUB_REMOTE_USERNAME"], env.get("ADAPTERHUB_REMOTE_PASSWORD", ""), source="environment")
    if url.scheme == "hf":
        tok = env.get("HF_TOKEN")
        return Credentials(token=tok, source="environment") if tok else Credentials()
    return _docker_config_auth(url.host) or Credentials()


def credential_source(remote: Remote) -> str:
    c = credentials(remote, remote.url)
    return c.source if c else "none"
