"""``search --remote``: what a remote holds, cached in the index for ``--cached``, and
the local search's filters applied to those rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from adapterhub.errors import UsageError
from adapterhub.registry.remotes.credentials import credentials
from adapterhub.registry.remotes.dispatch import Endpoint, resolve
from adapterhub.registry.remotes.store import get, read_cache, write_cache
from adapterhub.registry.remotes.urls import RemoteURL, is_url

if TYPE_CHECKING:
    from adapterhub.registry import Registry


def search_remote(reg: Registry, remote_name: str, *, cached: bool = False, names: Sequence[str] = (),
                  warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """What the remote holds, with metadata; refreshes the local cache unless ``cached``.

    ``remote_name`` is a recorded remote or a URL (``oci://host/ns``, ``hf://org``).
    A URL that is not a recorded remote's is searched without caching. Each
    row's ``url`` is what ``pull`` takes to import it. ``names`` (artifact
    names under the remote) lists those repositories' tags instead of the
    registry's catalog, which GHCR and Docker Hub do not offer; the cache
    then keeps its other rows. ``warnings`` collects the repositories skipped.
    """
    from adapterhub.refs import check_name

    names = [check_name(n) for n in names]
    if is_url(remote_name):
        ep = resolve(reg, url=remote_name)
        if ep.url.reference is not None:
            raise UsageError(f"search takes a remote URL without a tag or revision: {ep.url}")
        if ep.remote is None or ep.remote.url.base != ep.url.base:
            if cached:
                raise UsageError("--cached reads what `search --remote NAME` stored for a recorded remote",
                                 hint="`adapterhub remote add NAME URL`, then `adapterhub search --remote NAME`")
            return [_with_url(ep.url, row) for row in _search(ep, names, warnings)]
        remote_name = ep.remote.name
    r = get(reg, remote_name)
    if not cached:
        rows = _search(Endpoint(r.url, r, credentials(r, r.url)), names, warnings)
        repos = [r.url.repository(n) for n in names] if names and r.url.scheme == "oci" else None
        write_cache(reg, r.name, rows, repositories=repos)
    found = read_cache(reg, r.name)
    if names and r.url.scheme == "oci":
        wanted = {r.url.repository(n) for n in names}
        found = [row for row in found if row["repository"] in wanted]
    return [_with_url(r.url, row) for row in found]


def _search(ep: Endpoint, names: list[str], warnings: list[str] | None) -> list[dict[str, Any]]:
    if ep.url.scheme == "hf":
        from adapterhub.registry.remotes import hf

        rows = list(hf.search(str(ep.url), token=ep.creds.token, endpoint=ep.hub_endpoint))
        return [row for row in rows if not names or row.get("name") in names]
    from adapterhub.registry.remotes import oci

    return oci.search(ep, names or None, warnings)


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
