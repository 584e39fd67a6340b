"""Where a push, pull or search goes: ``--remote NAME`` or a URL, resolved to an
:class:`Endpoint`, and the dispatch to the OCI or Hub side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterhub.errors import RemoteAuthError, UsageError
from adapterhub.registry.remotes.credentials import Credentials, credentials
from adapterhub.registry.remotes.store import Remote, for_url, get
from adapterhub.registry.remotes.urls import RemoteURL, is_url, parse_url

if TYPE_CHECKING:
    from adapterhub.registry import Registry
    from adapterhub.registry.remotes.gate import TrustGate


@dataclass(frozen=True)
class Endpoint:
    """Where a push, pull or search goes: the URL, its remote (if recorded) and credentials."""

    url: RemoteURL
    remote: Remote | None
    creds: Credentials

    @property
    def insecure(self) -> bool:
        return bool(self.remote and self.remote.insecure)

    @property
    def hub_endpoint(self) -> str | None:
        return self.remote.endpoint if self.remote else None


def resolve(reg: Registry, *, url: str | None = None, remote: str | None = None, ref: str | None = None) -> Endpoint:
    """Turn ``--remote NAME`` (+ a ref) or a full URL into an :class:`Endpoint`."""
    if url is not None and remote is not None:
        raise UsageError("give a full URL or --remote NAME, not both")
    if remote is not None:
        r = get(reg, remote)
        u = r.url
        if ref is not None and is_url(ref):
            # A full URL (what `search --remote NAME -q` prints) under this remote.
            u = parse_url(ref)
            if (u.scheme, u.host) != (r.url.scheme, r.url.host) or not (u.path + "/").startswith(r.url.path + "/"):
                raise UsageError(f"{ref} is not under remote {r.name} ({r.url})", hint="drop --remote to pull it by URL")
        elif ref is not None:
            u = _ref_url(r, ref)
        return Endpoint(u, r, credentials(r, u))
    if url is None:
        raise UsageError("name a remote: --remote NAME, or a full oci:// or hf:// URL")
    u = parse_url(url)
    r = for_url(reg, u)
    return Endpoint(u, r, credentials(r, u))


def _ref_url(remote: Remote, ref: str) -> RemoteURL:
    """``team/qa-lora:3`` under remote ``oci://h/ns`` is ``oci://h/ns/team/qa-lora:3``."""
    from adapterhub.refs import Ref

    r = Ref.parse(ref)
    u = remote.url
    if u.scheme == "hf":
        from adapterhub.registry.remotes.hf import version_tag  # type: ignore[attr-defined]

        # Hub repos are ORG/REPO: the artifact's last name component is the repo,
        # and a version is the Hub tag the push made (3 -> v3).
        if r.digest:
            raise UsageError("Hub remotes are pulled by version or tag, not by digest")
        reference = version_tag(r.version) if r.version else (None if r.tag == "latest" else r.tag)
        return RemoteURL("hf", "", f"{u.path}/{r.name.rsplit('/', 1)[-1]}", reference)
    reference = r.version or r.digest or r.tag
    return RemoteURL("oci", u.host, u.repository(r.name), reference)


def push_remote(
    reg: Registry, ref: str, ep: Endpoint, *, tags: tuple[str, ...] = (), progress: Any = None,
    gate: TrustGate | None = None,
) -> dict[str, Any]:
    """Push the registry artifact ``ref`` to ``ep`` (an OCI repository or a Hub repo).

    ``gate`` picks which signature a Hub push publishes (one by a trusted key
    first); without one, the newest.
    """
    if ep.url.scheme == "hf":
        from adapterhub.registry.remotes import hf

        info = reg.resolve(ref)
        url = ep.url
        if ep.remote is not None and url.path == ep.remote.url.path:
            url = RemoteURL("hf", "", f"{url.path}/{info.name.rsplit('/', 1)[-1]}", url.reference)
        return dict(hf.push(reg, ref, str(url), token=ep.creds.token, endpoint=ep.hub_endpoint, progress=progress,
                            gate=gate))
    from adapterhub.registry.remotes import oci

    return oci.push(reg, ref, ep, tags=tags, progress=progress)


def pull_remote(
    reg: Registry, ep: Endpoint, *, gate: TrustGate, name: str | None = None, progress: Any = None,
) -> dict[str, Any]:
    """Import the artifact at ``ep`` into the local registry; returns at least ``ref`` and ``digest``.

    ``gate`` (``adapterhub.trust.gate.remote_gate(reg, ...)``) says what the
    trust policy requires and checks it: a refused artifact imports nothing.
    """
    if ep.url.scheme == "hf":
        from adapterhub.registry.remotes import hf

        return dict(hf.pull(reg, str(ep.url), gate=gate, name=name, token=ep.creds.token, endpoint=ep.hub_endpoint,
                            progress=progress))
    from adapterhub.registry.remotes import oci

    return oci.pull(reg, ep, gate=gate, name=name, progress=progress)


def check_credentials(
    url: str, *, endpoint: str | None = None, insecure: bool = False, username: str | None = None,
    password: str | None = None, token: str | None = None,
) -> str | None:
    """Try credentials on the remote before they are stored; None when it accepted them.

    A refusal (401, or 403 for the whole registry) raises :class:`RemoteAuthError`.
    A remote that cannot be asked now (down, unreachable, ``HF_HUB_OFFLINE``) is
    not an error, since it may be set up before it is up: the returned note says
    why nothing was checked.
    """
    from adapterhub.errors import AdapterhubError, RemoteError

    u = parse_url(url, reference=False)
    if u.scheme == "hf":
        from adapterhub.registry.remotes import hf

        if not token:
            return "the Hub takes a token (--token-stdin)"
        if hf.offline():
            return "HF_HUB_OFFLINE is set"
        from huggingface_hub import HfApi

        try:
            hf.call(HfApi(endpoint=endpoint).whoami, u.base, endpoint, token=token)
        except RemoteAuthError:
            raise
        except RemoteError as e:
            return str(e)
        return None
    from adapterhub.registry.remotes.oci import Client

    client = Client(u.host, insecure=insecure, loopback=u.loopback, username=username, password=password, token=token)
    client.retries = 0  # one try: a remote that is down now is only a warning
    try:
        client.ping()  # GET /v2/, answering the auth challenge with these credentials
    except RemoteAuthError:
        raise
    except AdapterhubError as e:
        return str(e)
    return None
