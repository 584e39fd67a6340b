"""A real OCI registry for the remote tests: Debian's ``docker-registry``.

That package is CNCF Distribution 2.8 (``/usr/bin/docker-registry serve
CONFIG``). It runs on a free loopback port with its own storage directory
and an htpasswd (bcrypt) file, so the tests exercise real authentication,
real chunked uploads and a registry without the OCI 1.1 referrers API.

Without the binary the tests skip, unless ``ADAPTERHUB_REQUIRE_OCI=1`` (CI)
turns the skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BINARY = os.environ.get("ADAPTERHUB_OCI_REGISTRY_BIN", "/usr/bin/docker-registry")
USER = "alice"
PASSWORD = "correct horse battery staple"
OTHER_USER = "bob"
OTHER_PASSWORD = "hunter2-hunter2"


@dataclass
class OciServer:
    host: str  # 127.0.0.1:PORT
    root: Path  # storage directory (blobs under docker/registry/v2/blobs)
    log: Path
    proc: subprocess.Popen

    def url(self, namespace: str = "team") -> str:
        return f"oci://{self.host}/{namespace}"

    def blob_data(self, digest: str) -> Path:
        """Where the registry keeps the bytes of ``sha256:<hex>``."""
        hex_ = digest.removeprefix("sha256:")
        return self.root / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def available() -> str | None:
    """None if a registry can be started, else the reason it cannot."""
    if not (os.path.exists(BINARY) and os.access(BINARY, os.X_OK)):
        return f"{BINARY} is missing (apt-get install docker-registry)"
    try:
        import bcrypt  # noqa: F401
    except ImportError:
        return "the bcrypt package is missing (pip install bcrypt)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def htpasswd(users: dict[str, str]) -> str:
    import bcrypt

    return "".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)).decode()}\n" for u, p in users.items())


def start(workdir: Path, *, users: dict[str, str] | None = None, timeout: float = 30.0,
          token: dict[str, str] | None = None, log_level: str = "warn") -> OciServer:
    """Start a registry under ``workdir`` and wait until it answers ``/v2/``.

    ``token`` switches it from htpasswd to ``auth: token`` with these settings
    (realm, service, issuer, rootcertbundle): it then accepts JWTs signed by
    the key of that certificate bundle. ``log_level="info"`` logs every
    response with the bytes it wrote (``http.response.written``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "storage"
    root.mkdir(exist_ok=True)
    auth = workdir / "htpasswd"
    auth.write_text(htpasswd(users if users is not None else {USER: PASSWORD, OTHER_USER: OTHER_PASSWORD}))
    if token is not None:
        auth_yaml = "auth:\n  token:\n" + "".join(f"    {k}: {v}\n" for k, v in token.items())
    else:
        auth_yaml = f"auth:\n  htpasswd:\n    realm: adapterhub-test\n    path: {auth}\n"
    port = free_port()
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        f"log:\n  level: {log_level}\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: adapterhub-test\n"
        + auth_yaml
    )
    log = workdir / "registry.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen([BINARY, "serve", str(config)], stdout=fh, stderr=subprocess.STDOUT)
    server = OciServer(f"127.0.0.1:{port}", root, log, proc)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://{server.host}/v2/", timeout=1)
            break
        except urllib.error.HTTPError as e:
            if e.code == 401:  # up, and asking for credentials
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"docker-registry did not answer within {timeout:.0f} s: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return server


def start_or_skip(tmp_path_factory, name: str = "oci-registry", **kw):
    """A registry for a pytest fixture: skip without the binary, fail instead under ADAPTERHUB_REQUIRE_OCI=1."""
    import pytest

    reason = available()
    if reason:
        if os.environ.get("ADAPTERHUB_REQUIRE_OCI") == "1":
            pytest.fail(f"ADAPTERHUB_REQUIRE_OCI=1 but no OCI registry can run: {reason}")
        pytest.skip(reason)
    return start(tmp_path_factory.mktemp(name), **kw)


def wipe(server: OciServer) -> None:
    """Forget every repository (the registry keeps running)."""
    shutil.rmtree(server.root / "docker", ignore_errors=True)
