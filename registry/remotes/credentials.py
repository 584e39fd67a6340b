"""Registry credentials: where they come from, and the 0600 file that holds the stored ones.

Credentials never enter the index. They are looked up in this order:

1. ``$ADAPTERHUB_HOME/credentials.json`` (mode 0600), written by
   ``adapterhub remote add --username U --password-stdin`` or ``--token-stdin``;
2. the environment: ``ADAPTERHUB_REMOTE_USERNAME`` and
   ``ADAPTERHUB_REMOTE_PASSWORD``, or ``ADAPTERHUB_REMOTE_TOKEN`` (``HF_TOKEN``
   for the Hub);
3. for OCI, Docker's credential file: ``$DOCKER_CONFIG/config.json`` or
   ``~/.docker/config.json``, ``auths[host].auth`` (base64 ``user:password``).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
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


def _docker_config_auth(host: str) -> Credentials | None:
    d = os.environ.get("DOCKER_CONFIG")
    path = Path(d) / "config.json" if d else Path.home() / ".docker" / "config.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    auths = doc.get("auths") if isinstance(doc, dict) else None
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
