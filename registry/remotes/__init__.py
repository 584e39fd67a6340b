"""Remotes: named OCI registries and Hugging Face Hub orgs, and the dispatch to them.

A remote is a name for a URL, kept in the index (table ``remotes``):

- ``oci://host[:port]/namespace``: an OCI registry. Artifact ``team/qa-lora``
  goes to the repository ``namespace/team/qa-lora``, with its version as tag.
- ``hf://org``: a Hugging Face Hub organisation (or user), with an optional
  endpoint for a self-hosted Hub. ``registry.remotes.hf`` does that work.

Credentials never enter the index. They are looked up in this order:

1. ``$ADAPTERHUB_HOME/credentials.json`` (mode 0600), written by
   ``adapterhub remote add --username U --password-stdin`` or ``--token-stdin``;
2. the environment: ``ADAPTERHUB_REMOTE_USERNAME`` and
   ``ADAPTERHUB_REMOTE_PASSWORD``, or ``ADAPTERHUB_REMOTE_TOKEN`` (``HF_TOKEN``
   for the Hub);
3. for OCI, Docker's credential file: ``$DOCKER_CONFIG/config.json`` or
   ``~/.docker/config.json``, ``auths[host].auth`` (base64 ``user:password``).

>>> parse_url("oci://127.0.0.1:5000/team").repository("qa-lora")   # doctest: +SKIP
'team/qa-lora'
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub import config
from adapterhub.errors import (
    ConflictError,
    InvalidArtifactError,
    InvalidNameError,
    NotFoundError,
    RemoteAuthError,
    UsageError,
)

if TYPE_CHECKING:
    from adapterhub.registry import Registry

SCHEMES = ("oci", "hf")
CREDENTIALS_FILE = "credentials.json"
_REMOTE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_HOST_RE = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$")
_LOOPBACK = ("localhost", "127.0.0.1", "[::1]")


def is_url(text: str | None) -> bool:
    return bool(text) and any(str(text).startswith(f"{s}://") for s in SCHEMES)


@dataclass(frozen=True)
class RemoteURL:
    """A parsed ``oci://host[:port]/path`` or ``hf://org[/repo]`` URL."""

    scheme: str  # oci | hf
    host: str  # oci: host[:port]; hf: "" (the endpoint says where)
    path: str  # oci: namespace[/name...]; hf: org[/repo]
    reference: str | None = None  # oci: tag or sha256:digest; hf: revision

    def __str__(self) -> str:
        ref = ""
        if self.reference:
            ref = ("@" if self.scheme == "hf" or self.reference.startswith("sha256:") else ":") + self.reference
        return f"{self.scheme}://{self.host + '/' if self.host else ''}{self.path}{ref}"

    @property
    def base(self) -> str:
        """The URL without a tag or revision."""
        return f"{self.scheme}://{self.host + '/' if self.host else ''}{self.path}"

    def repository(self, name: str) -> str:
        """The remote repository for the artifact ``name`` under this URL's path."""
        return f"{self.path}/{name}" if self.path else name

    @property
    def loopback(self) -> bool:
        hostname = self.host[: self.host.index("]") + 1] if self.host.startswith("[") else self.host.split(":", 1)[0]
        return hostname in _LOOPBACK


def parse_url(text: str, *, reference: bool = True) -> RemoteURL:
    """Parse a remote URL; ``reference=False`` refuses a tag or revision."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in SCHEMES:
        raise InvalidNameError(f"not a remote URL: {text!r}", hint="remote URLs look like oci://HOST[:PORT]/NAMESPACE or hf://ORG")
    ref = None
    if scheme == "oci":
        host, _, path = rest.partition("/")
        if not _HOST_RE.match(host):
            raise InvalidNameError(f"invalid registry host {host!r} in {text!r}")
        if "@" in path:
            path, _, ref = path.partition("@")
        else:
            last = path.rsplit("/", 1)[-1]
            if ":" in last:
                path, _, ref = path.rpartition(":")
        path = path.strip("/")
    else:
        host = ""
        path = rest.strip("/")
        if "@" in path:
            path, _, ref = path.partition("@")
        if not path or len(path.split("/")) > 2 or any(not p for p in path.split("/")):
            raise InvalidNameError(f"invalid Hub URL {text!r}", hint="hf://ORG for a remote, hf://ORG/REPO[@REVISION] for a repo")
    if ref is not None and not reference:
        raise InvalidNameError(f"a remote URL names no tag or revision: {text!r}")
    if ref == "":
        raise InvalidNameError(f"empty tag or revision in {text!r}")
    return RemoteURL(scheme, host, path, ref)


# -- the remote store ------------------------------------------------------------------


@dataclass(frozen=True)
class Remote:
    name: str
    url: RemoteURL
    endpoint: str | None = None  # hf: a self-hosted Hub
    insecure: bool = False  # oci: plain HTTP to a host other than loopback
    created_at: str = ""

    @property
    def kind(self) -> str:
        return self.url.scheme

    def to_dict(self, with_credentials: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name, "url": str(self.url), "kind": self.kind, "endpoint": self.endpoint,
            "insecure": self.insecure, "created_at": self.created_at,
        }
        if with_credentials:
            d["credentials"] = credential_source(self)
        return d


def check_remote_name(name: str) -> str:
    if not _REMOTE_NAME_RE.match(name):
        raise InvalidNameError(f"invalid remote name {name!r}", hint="lowercase letters, digits, '.', '_' and '-', up to 64")
    return name


def add(
    reg: Registry, name: str, url: str, *, endpoint: str | None = None, insecure: bool = False,
    username: str | None = None, password: str | None = None, token: str | None = None, replace: bool = False,
) -> Remote:
    """Record a remote (and its credentials, in the 0600 credentials file)."""
    from adapterhub.registry.index import now

    check_remote_name(name)
    u = parse_url(url, reference=False)
    if u.scheme == "oci" and not u.path:
        raise InvalidNameError(f"{url}: name a namespace", hint="oci://HOST[:PORT]/NAMESPACE, e.g. oci://registry.example.com/team")
    if endpoint is not None and u.scheme != "hf":
        raise UsageError("--endpoint is for hf:// remotes (a self-hosted Hub)")
    if (username is None) != (password is None):
        raise UsageError("give both --username and a password (--password-stdin)")
    if token is not None and username is not None:
        raise UsageError("give either --username with --password-stdin, or --token-stdin")
    if u.scheme == "hf" and username is not None:
        raise UsageError("the Hub takes a token: use --token-stdin")
    with reg.index.write():
        exists = reg.index.conn.execute("select 1 from remotes where name = ?", (name,)).fetchone()
        if exists and not replace:
            raise ConflictError(f"remote {name!r} exists", hint="`adapterhub remote rm NAME` first, or pass --replace")
        reg.index.conn.execute(
            "insert or replace into remotes (name, url, kind, endpoint, insecure, created_at) values (?, ?, ?, ?, ?, ?)",
            (name, u.base, u.scheme, endpoint, int(insecure), now()),
        )
    if username is not None or token is not None:
        _store_credentials(name, {"username": username, "password": password} if username is not None else {"token": token})
    elif replace:
        _store_credentials(name, None)
    return get(reg, name)


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
        if hf._offline():
            return "HF_HUB_OFFLINE is set"
        from huggingface_hub import HfApi

        try:
            hf._call(HfApi(endpoint=endpoint).whoami, u.base, endpoint, token=token)
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


def _row(r: Any) -> Remote:
    return Remote(r[0], parse_url(r[1], reference=False), r[2], bool(r[3]), r[4])


def ls(reg: Registry) -> list[Remote]:
    rows = reg.index.conn.execute("select name, url, endpoint, insecure, created_at from remotes order by name").fetchall()
    return [_row(r) for r in rows]


def get(reg: Registry, name: str) -> Remote:
    r = reg.index.conn.execute("select name, url, endpoint, insecure, created_at from remotes where name = ?", (name,)).fetchone()
    if r is None:
        raise NotFoundError(f"unknown remote {name!r}", hint="`adapterhub remote ls` lists them; `adapterhub remote add NAME URL` adds one")
    return _row(r)


def rm(reg: Registry, name: str) -> Remote:
    remote = get(reg, name)
    with reg.index.write():
        reg.index.conn.execute("delete from remotes where name = ?", (name,))
        reg.index.conn.execute("delete from remote_artifacts where remote = ?", (name,))
    _store_credentials(name, None)
    return remote


def for_url(reg: Registry, url: RemoteURL) -> Remote | None:
    """The recorded remote whose URL covers ``url`` (longest path first), for its credentials."""
    best = None
    for r in ls(reg):
        if r.url.scheme != url.scheme or r.url.host != url.host:
            continue
        covers = url.path == r.url.path or url.path.startswith(r.url.path + "/") or not r.url.path
        if covers and (best is None or len(r.url.path) > len(best.url.path)):
            best = r
    return best


# -- credentials -----------------------------------------------------------------------


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


def _store_credentials(name: str, creds: dict[str, Any] | None) -> None:
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
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(6)}.incomplete")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"remotes": current}, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


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


# -- dispatch --------------------------------------------------------------------------


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
) -> dict[str, Any]:
    """Push the registry artifact ``ref`` to ``ep`` (an OCI repository or a Hub repo)."""
    if ep.url.scheme == "hf":
        from adapterhub.registry.remotes import hf

        info = reg.resolve(ref)
        url = ep.url
        if ep.remote is not None and url.path == ep.remote.url.path:
            url = RemoteURL("hf", "", f"{url.path}/{info.name.rsplit('/', 1)[-1]}", url.reference)
        return dict(hf.push(reg, ref, str(url), token=ep.creds.token, endpoint=ep.hub_endpoint, progress=progress))
    from adapterhub.registry.remotes import oci

    return oci.push(reg, ref, ep, tags=tags, progress=progress)


def pull_remote(
    reg: Registry, ep: Endpoint, *, name: str | None = None, require_signature: bool = False,
    require_provenance: bool = False, progress: Any = None,
) -> dict[str, Any]:
    """Import the artifact at ``ep`` into the local registry; returns at least ``ref`` and ``digest``.

    The trust policy applies as on a local pull, and ``require_signature`` /
    ``require_provenance`` add its rules: a refused artifact imports nothing.
    """
    if ep.url.scheme == "hf":
        from adapterhub.registry.remotes import hf

        return dict(hf.pull(reg, str(ep.url), name=name, token=ep.creds.token, endpoint=ep.hub_endpoint, progress=progress,
                            require_signature=require_signature, require_provenance=require_provenance))
    from adapterhub.registry.remotes import oci

    return oci.pull(reg, ep, name=name, require_signature=require_signature, require_provenance=require_provenance,
                    progress=progress)


def search_remote(reg: Registry, remote_name: str, *, cached: bool = False) -> list[dict[str, Any]]:
    """What the remote holds, with metadata; refreshes the local cache unless ``cached``.

    ``remote_name`` is a recorded remote or a URL (``oci://host/ns``, ``hf://org``).
    A URL that is not a recorded remote's is searched without caching. Each
    row's ``url`` is what ``pull`` takes to import it.
    """
    if is_url(remote_name):
        ep = resolve(reg, url=remote_name)
        if ep.url.reference is not None:
            raise UsageError(f"search takes a remote URL without a tag or revision: {remote_name}")
        if ep.remote is None or ep.remote.url.base != ep.url.base:
            if cached:
                raise UsageError("--cached reads what `search --remote NAME` stored for a recorded remote",
                                 hint="`adapterhub remote add NAME URL`, then `adapterhub search --remote NAME`")
            return [_with_url(ep.url, row) for row in _search(ep)]
        remote_name = ep.remote.name
    r = get(reg, remote_name)
    if not cached:
        _cache(reg, r.name, _search(Endpoint(r.url, r, credentials(r, r.url))))
    return [_with_url(r.url, row) for row in _cached(reg, r.name)]


def _search(ep: Endpoint) -> list[dict[str, Any]]:
    if ep.url.scheme == "hf":
        from adapterhub.registry.remotes import hf

        return list(hf.search(str(ep.url), token=ep.creds.token, endpoint=ep.hub_endpoint))
    from adapterhub.registry.remotes import oci

    return oci.search(ep)


def _with_url(base: RemoteURL, row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with ``url``: the full URL that ``pull`` imports it from (its version's tag if listed)."""
    if base.scheme == "hf":
        url = f"hf://{row['repository']}"
    else:
        tags = row.get("tags") or []
        tag = row.get("version") if row.get("version") in tags else (tags[0] if tags else None)
        ref = f":{tag}" if tag else f"@{row['manifest_digest']}"
        url = f"oci://{base.host}/{row['repository']}{ref}"
    return {**row, "url": url}


_CACHE_COLS = ("repository", "manifest_digest", "tags", "artifact_type", "name", "version", "digest", "kind", "method",
               "base_model", "rank", "quant", "size", "description", "metadata")


def _cache(reg: Registry, remote: str, rows: list[dict[str, Any]]) -> None:
    from adapterhub.registry.index import now

    ts = now()
    with reg.index.write():
        reg.index.conn.execute("delete from remote_artifacts where remote = ?", (remote,))
        for row in rows:
            vals = []
            for c in _CACHE_COLS:
                v = row.get(c)
                if c == "manifest_digest" and v is None:
                    v = row.get("revision") or ""
                vals.append(json.dumps(v, sort_keys=True) if c in ("tags", "metadata") else v)
            reg.index.conn.execute(
                f"insert or replace into remote_artifacts (remote, {', '.join(_CACHE_COLS)}, fetched_at) "
                f"values (?, {', '.join('?' for _ in _CACHE_COLS)}, ?)",
                (remote, *vals, ts),
            )


def _cached(reg: Registry, remote: str) -> list[dict[str, Any]]:
    rows = reg.index.conn.execute(
        f"select {', '.join(_CACHE_COLS)}, fetched_at from remote_artifacts where remote = ? order by repository, version",
        (remote,),
    ).fetchall()
    out = []
    for r in rows:
        d = dict(zip((*_CACHE_COLS, "fetched_at"), r))
        d["tags"] = json.loads(d["tags"]) if d["tags"] else []
        d["metadata"] = json.loads(d["metadata"]) if d["metadata"] else {}
        d["remote"] = remote
        out.append(d)
    return out


def filter_rows(
    rows: list[dict[str, Any]], text: str | None = None, *, base: str | None = None, method: str | None = None,
    rank: int | None = None, min_rank: int | None = None, max_rank: int | None = None, quant: str | None = None,
    kind: str | None = None, limit: int | None = None,
) -> list[dict[str, Any]]:
    """The local search's filters, applied to cached remote rows."""
    out = []
    words = [w.lower() for w in (text or "").split()]
    for r in rows:
        hay = " ".join(str(r.get(k) or "") for k in ("repository", "name", "description", "base_model", "method", "kind", "quant")).lower()
        hay += " " + json.dumps(r.get("metadata") or {}).lower()
        if any(w not in hay for w in words):
            continue
        if base and base.lower() not in (r.get("base_model") or "").lower():
            continue
        if method and (r.get("method") or "").lower() != method.lower():
            continue
        if quant and (r.get("quant") or "").lower() != quant.lower():
            continue
        if kind and r.get("kind") != kind:
            continue
        rk = r.get("rank")
        if rank is not None and rk != rank:
            continue
        if min_rank is not None and (rk is None or rk < min_rank):
            continue
        if max_rank is not None and (rk is None or rk > max_rank):
            continue
        out.append(r)
    return out[:limit] if limit else out


# -- what a remote's metadata may say --------------------------------------------------

# A remote is untrusted input: these check what its metadata claims before any
# of it reaches the index or names a file.

# Registry.push records "adapter", "base" and "source"; its callers may name
# others, so a remote's relation need only be a short plain word.
_RELATION_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_SHA256_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
MAX_PATH_BYTES = 1024  # a file's relative path, in UTF-8
MAX_COMPONENT_BYTES = 255  # one component of it (NAME_MAX on Linux)


def check_lineage(rows: Any, where: str) -> list[dict[str, Any]]:
    """Lineage rows from a remote: a list of ``{parent: sha256:<hex>, relation, recipe?}``, else refused.

    A well-formed parent digest is only a claim (no local artifact need have
    it); ``require-provenance`` is what checks it against a signed attestation.
    """
    if rows is None:
        return []
    if not isinstance(rows, list):
        raise InvalidArtifactError(f"{where}: the lineage is not a list")
    out = []
    for r in rows:
        if not isinstance(r, dict) or not isinstance(r.get("parent"), str) or not _SHA256_DIGEST.match(r["parent"]):
            raise InvalidArtifactError(f"{where}: a lineage row does not name a parent by sha256 digest: {str(r)[:80]!r}")
        if not isinstance(r.get("relation"), str) or not _RELATION_RE.match(r["relation"]):
            raise InvalidArtifactError(f"{where}: lineage relation {str(r.get('relation'))[:40]!r} is not a plain word "
                                       "(such as adapter, base or source)")
        recipe = r.get("recipe")
        if recipe is not None and not isinstance(recipe, dict):
            raise InvalidArtifactError(f"{where}: a lineage recipe is not an object")
        out.append({"parent": r["parent"], "relation": r["relation"], "recipe": recipe})
    return out


def check_text(value: Any, what: str, where: str) -> str | None:
    """A description or similar free text: a string or nothing."""
    if value is not None and not isinstance(value, str):
        raise InvalidArtifactError(f"{where}: the {what} is not a string")
    return value


def check_file_path(path: Any, where: str) -> str:
    """A file path a remote gives: a safe relative path of a length every filesystem here takes."""
    from adapterhub.manifest import check_relpath

    if not isinstance(path, str):
        raise InvalidArtifactError(f"{where}: a file name is not a string: {str(path)[:40]!r}")
    check_relpath(path)
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES or any(
        len(p.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES for p in path.split("/")
    ):
        raise InvalidArtifactError(f"{where}: the file name {path[:40]!r}… is too long "
                                   f"(over {MAX_PATH_BYTES} bytes, or a component over {MAX_COMPONENT_BYTES})")
    return path


def check_file_tree(paths: list[str], where: str) -> None:
    """No path may be both a file and the directory of another (``a`` and ``a/b``)."""
    files = set(paths)
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d in files:
                raise InvalidArtifactError(f"{where}: {d!r} is both a file and the directory of {p!r}")
