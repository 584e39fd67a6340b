"""403 from an OCI registry, through a real nginx in front of the real registry.

Distribution's htpasswd auth has no per-user permissions, so it never answers
403. Teams that need read-only mirrors or private namespaces put a reverse
proxy in front of it; this does the same with Debian's nginx: writes under
``/v2/readonly/`` and everything under ``/v2/private/`` are forbidden, the rest
is passed through. ``.ci/run`` installs nginx; without it these tests skip
(unless ``ADAPTERHUB_REQUIRE_OCI=1``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests import _oci_server
from tests._oci_server import PASSWORD, USER
from tests.conftest import fake_lora

NGINX = os.environ.get("ADAPTERHUB_NGINX_BIN") or shutil.which("nginx") or "/usr/sbin/nginx"

CONFIG = """
{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    client_max_body_size 0;
    proxy_request_buffering off;
    proxy_buffering off;
    server {{
        listen 127.0.0.1:{port};
        location /v2/private/ {{ return 403; }}
        location /v2/readonly/ {{
            limit_except GET HEAD {{ deny all; }}
            proxy_pass http://{upstream};
            proxy_set_header Host $http_host;
        }}
        location / {{
            proxy_pass http://{upstream};
            proxy_set_header Host $http_host;
        }}
    }}
    # A hostile registry: a catalog far larger than any real answer.
    server {{
        listen 127.0.0.1:{port2};
        location = /v2/_catalog {{ default_type application/json; alias {prefix}/huge-catalog.json; }}
        location /v2/ {{ default_type application/json; return 200 '{{}}'; }}
    }}
}}
"""


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    reasons = [r for r in (_oci_server.available(), None if os.access(NGINX, os.X_OK) else f"{NGINX} is missing (apt-get install nginx-light)") if r]
    if reasons:
        if os.environ.get("ADAPTERHUB_REQUIRE_OCI") == "1":
            pytest.fail(f"ADAPTERHUB_REQUIRE_OCI=1 but {reasons[0]}")
        pytest.skip(reasons[0])
    registry = _oci_server.start(tmp_path_factory.mktemp("oci-upstream"))
    prefix = tmp_path_factory.mktemp("nginx")
    (prefix / "tmp").mkdir()
    port, port2 = _oci_server.free_port(), _oci_server.free_port()
    (prefix / "huge-catalog.json").write_text('{"repositories": [' + ",".join(['"ns/x"'] * 1_500_000) + "]}")
    conf = prefix / "nginx.conf"
    # As root, nginx's workers would drop to nobody, who cannot enter pytest's 0700 temp dirs.
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(CONFIG.format(user=user, prefix=prefix, port=port, port2=port2, upstream=registry.host))
    proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    host = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            registry.stop()
            raise RuntimeError(f"nginx exited {proc.returncode}: {(prefix / 'error.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://{host}/v2/", timeout=1)
            break
        except urllib.error.HTTPError as e:
            if e.code == 401:  # the registry, through nginx, asking for credentials
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            registry.stop()
            raise RuntimeError("nginx did not answer within 20 s")
        time.sleep(0.05)
    yield host, registry, f"127.0.0.1:{port2}"
    proc.terminate()
    proc.wait(timeout=10)
    registry.stop()


@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_REMOTE_USERNAME", USER)
    monkeypatch.setenv("ADAPTERHUB_REMOTE_PASSWORD", PASSWORD)
    monkeypatch.setenv("ADAPTERHUB_REMOTE_TIMEOUT", "5")
    monkeypatch.setenv("ADAPTERHUB_REMOTE_RETRIES", "1")
    monkeypatch.setenv("DOCKER_CONFIG", "/nonexistent-docker-config")


def test_the_proxy_passes_other_namespaces_through(cli, proxy, tmp_path):
    host, _, _ = proxy
    assert cli("push", fake_lora(tmp_path / "src"), "qa").exit_code == 0
    r = cli("push", "qa:1", f"oci://{host}/open/qa:1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["blobs_uploaded"] == 3


def test_push_refused_with_403_is_a_clear_remote_error(cli, proxy, tmp_path):
    host, _, _ = proxy
    assert cli("push", fake_lora(tmp_path / "src"), "qa").exit_code == 0
    r = cli("push", "qa:1", f"oci://{host}/readonly/qa:1")
    assert r.exit_code == 9, r.output
    assert f"{host}/readonly/qa: access denied" in r.stderr and "hint:" in r.stderr, r.stderr
    assert "Traceback" not in r.output
    r = cli("push", "qa:1", f"oci://{host}/readonly/qa:1", "--json")
    assert r.exit_code == 9 and json.loads(r.stdout)["error"]


def test_pull_refused_with_403_imports_nothing(cli, proxy, tmp_path, home):
    host, registry, _ = proxy
    assert cli("push", fake_lora(tmp_path / "src"), "qa").exit_code == 0
    # Stored on the registry itself, but forbidden through the proxy.
    assert cli("push", "qa:1", f"oci://{registry.host}/private/qa:1").exit_code == 0
    assert cli("rm", "qa", "--all", "--yes").exit_code == 0
    assert cli("gc", "--yes").exit_code == 0
    r = cli("pull", f"oci://{host}/private/qa:1")
    assert r.exit_code == 9, r.output
    assert "access denied" in r.stderr
    assert "Traceback" not in r.output
    assert json.loads(cli("ls", "--json").stdout) == []
    staging = home / "remote-staging"
    assert not staging.exists() or not any(p.is_file() for p in staging.rglob("*"))


def test_an_oversized_listing_is_refused_not_read_whole(cli, proxy):
    _, _, hostile = proxy
    r = cli("search", "--remote", f"oci://{hostile}/ns")
    assert r.exit_code == 9, r.output
    assert "the repositories listing is larger than 8 MiB" in r.stderr
