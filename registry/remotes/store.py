"""The remotes' two tables, and the only SQL about remotes: ``remotes`` (name -> URL)
and ``remote_artifacts`` (what ``search --remote`` last saw on each, for ``--cached``).

A remote is a name for a URL:

- ``oci://host[:port]/namespace``: an OCI registry. Artifact ``team/qa-lora``
  goes to the repository ``namespace/team/qa-lora``, with its version as tag.
- ``hf://org``: a Hugging Face Hub organisation (or user), with an optional
  endpoint for a self-hosted Hub.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterhub.errors import ConflictError, InvalidNameError, NotFoundError, UsageError
from adapterhub.registry.remotes.credentials import credential_source, store_credentials
from adapterhub.registry.remotes.urls import RemoteURL, parse_url

if TYPE_CHECKING:
    from adapterhub.registry import Registry

_REMOTE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


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
    if not _REMOTE_NAME_RE.fullmatch(name):
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
        store_credentials(name, {"username": username, "password": password} if username is not None else {"token": token})
    elif replace:
        store_credentials(name, None)
    return get(reg, name)


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
    store_credentials(name, None)
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


# -- the search cache ---------------------------------------------------------------

CACHE_COLUMNS = ("repository", "manifest_digest", "tags", "artifact_type", "name", "version", "digest", "kind",
                 "method", "base_model", "rank", "quant", "size", "description", "metadata")


def write_cache(reg: Registry, remote: str, rows: list[dict[str, Any]], *,
                repositories: list[str] | None = None) -> None:
    """Replace what is cached for ``remote`` (for ``repositories`` only, when given) with ``rows``, atomically."""
    from adapterhub.registry.index import now

    ts = now()
    with reg.index.write():
        if repositories is None:
            reg.index.conn.execute("delete from remote_artifacts where remote = ?", (remote,))
        for repo in repositories or ():
            reg.index.conn.execute("delete from remote_artifacts where remote = ? and repository = ?", (remote, repo))
        for row in rows:
            vals = []
            for c in CACHE_COLUMNS:
                v = row.get(c)
                if c == "manifest_digest" and v is None:
                    v = row.get("revision") or ""
                vals.append(json.dumps(v, sort_keys=True) if c in ("tags", "metadata") else v)
            reg.index.conn.execute(
                f"insert or replace into remote_artifacts (remote, {', '.join(CACHE_COLUMNS)}, fetched_at) "
                f"values (?, {', '.join('?' for _ in CACHE_COLUMNS)}, ?)",
                (remote, *vals, ts),
            )


def read_cache(reg: Registry, remote: str) -> list[dict[str, Any]]:
    """The rows :func:`write_cache` stored for ``remote``, with ``remote`` and ``fetched_at``."""
    rows = reg.index.conn.execute(
        f"select {', '.join(CACHE_COLUMNS)}, fetched_at from remote_artifacts where remote = ? "
        "order by repository, version",
        (remote,),
    ).fetchall()
    out = []
    for r in rows:
        d = dict(zip((*CACHE_COLUMNS, "fetched_at"), r))
        d["tags"] = json.loads(d["tags"]) if d["tags"] else []
        d["metadata"] = json.loads(d["metadata"]) if d["metadata"] else {}
        d["remote"] = remote
        out.append(d)
    return out


# -- logins ---------------------------------------------------------------------------


def login(reg: Registry, name: str, *, username: str | None = None, password: str | None = None,
          token: str | None = None) -> Remote:
    """Store credentials for the recorded remote ``name`` (in the 0600 credentials file, never the index)."""
    remote = get(reg, name)
    if (username is None) == (token is None):
        raise UsageError("give --username with --password-stdin, or --token-stdin")
    if remote.kind == "hf" and username is not None:
        raise UsageError("the Hub takes a token: use --token-stdin")
    store_credentials(name, {"username": username, "password": password} if username is not None else {"token": token})
    return remote


def logout(reg: Registry, name: str) -> Remote:
    """Forget the stored credentials of ``name`` (the environment and Docker's are not touched)."""
    remote = get(reg, name)
    store_credentials(name, None)
    return remote
