"""``search --remote`` on an OCI registry: catalog, tags, manifests (and our configs)."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from adapterhub.errors import AdapterhubError, IntegrityError, InvalidArtifactError, InvalidNameError
from adapterhub.registry.remotes.oci.client import client_for
from adapterhub.registry.remotes.oci.media import CONFIG_TYPE, OCI_TAG_RE, A, check_repository
from adapterhub.registry.remotes.oci.plan import read_config

if TYPE_CHECKING:
    from adapterhub.registry.remotes.dispatch import Endpoint
    from adapterhub.registry.remotes.oci.client import Client


def search(ep: Endpoint) -> list[dict[str, Any]]:
    """Every artifact under the remote's namespace: catalog, tags, manifests (and our configs)."""
    client = client_for(ep)
    client.ping()
    prefix = ep.url.path + "/" if ep.url.path else ""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for repo in client.catalog():
        # Names from the registry are cached and printed: only valid OCI names and tags are listed.
        if not isinstance(repo, str) or (prefix and not repo.startswith(prefix)) or not _valid_repository(repo):
            continue
        for tag in client.tags(repo):
            if not isinstance(tag, str) or not OCI_TAG_RE.match(tag) or re.fullmatch(r"sha256-[0-9a-f]{64}", tag):
                continue  # not a tag, or the referrers fallback index
            try:
                got = client.get_manifest(repo, tag, allow_missing=True)
            except (InvalidArtifactError, IntegrityError):
                continue  # not a manifest we can read: nothing to list
            if got is None:
                continue
            data, media, mdigest = got
            key = (repo, mdigest)
            if key in rows:
                rows[key]["tags"].append(tag)
                continue
            try:
                m = json.loads(data)
            except ValueError:
                continue
            if not isinstance(m, dict):
                continue
            row = _search_row(client, repo, prefix, m, media, mdigest, tag)
            if row is not None:
                rows[key] = row
    return sorted(rows.values(), key=lambda r: (r["repository"], r.get("version") or "", r["manifest_digest"]))


def _valid_repository(repo: str) -> bool:
    try:
        check_repository(repo)
    except InvalidNameError:
        return False
    return True


def _search_row(client: Client, repo: str, prefix: str, m: dict[str, Any], media: str, mdigest: str,
                tag: str) -> dict[str, Any] | None:
    """One search result from a manifest; fields of the wrong type are left out (None)."""

    def text(v: Any) -> str | None:
        return v if isinstance(v, str) else None

    ann = m.get("annotations")
    ann = {k: v for k, v in ann.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(ann, dict) else {}
    layers = m.get("layers") if isinstance(m.get("layers"), list) else []
    row: dict[str, Any] = {"repository": repo, "manifest_digest": mdigest, "tags": [tag], "media_type": media}
    row["artifact_type"] = text(m.get("artifactType"))
    row["metadata"] = {"annotations": ann}
    row["name"] = ann.get(A + "name") or repo[len(prefix):]
    row["version"] = ann.get(A + "version")
    row["digest"] = ann.get(A + "digest")
    row["kind"] = ann.get(A + "kind")
    row["method"] = ann.get(A + "method")
    row["base_model"] = ann.get(A + "base-model")
    rank = ann.get(A + "rank", "")
    row["rank"] = int(rank) if rank.isascii() and rank.isdigit() and len(rank) <= 9 else None
    row["quant"] = ann.get(A + "quantization")
    row["description"] = ann.get("org.opencontainers.image.description")
    row["size"] = sum(ly["size"] for ly in layers if isinstance(ly, dict) and type(ly.get("size")) is int and ly["size"] >= 0)
    cfg = m.get("config") if isinstance(m.get("config"), dict) else {}
    if cfg.get("mediaType") == CONFIG_TYPE:
        try:
            doc = read_config(client, repo, cfg, f"{client.host}/{repo}:{tag}")
            ins = doc.get("inspection") if isinstance(doc.get("inspection"), dict) else {}
            details = ins.get("details") if isinstance(ins.get("details"), dict) else {}
            row["metadata"]["tags"] = doc.get("tags")
            row["metadata"]["target_modules"] = details.get("target_modules")
            row["metadata"]["lineage"] = doc.get("lineage")
            row["description"] = text(doc.get("description")) or row["description"]
        except AdapterhubError:
            row["metadata"]["config_error"] = "the config blob could not be read"
    return row
