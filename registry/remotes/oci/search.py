"""``search --remote`` on an OCI registry: repositories, tags, manifests (and our configs).

Repositories come from ``/v2/_catalog``, or, on registries that do not offer
it (GHCR, Docker Hub), from the names the user gives: their tags are listed.
A registry is untrusted input: a repository whose listing, manifests or
config are malformed or hostile is skipped with a warning, and the others
are listed.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from adapterhub.errors import (
    AdapterhubError,
    IntegrityError,
    InvalidArtifactError,
    InvalidNameError,
    NotFoundError,
    RemoteAuthError,
    RemoteError,
    UsageError,
)
from adapterhub.registry.remotes.oci import media
from adapterhub.registry.remotes.oci.client import client_for
from adapterhub.registry.remotes.oci.media import CONFIG_TYPE, OCI_TAG_RE, SHA256_RE, A, check_repository
from adapterhub.registry.remotes.oci.plan import read_config
from adapterhub.registry.remotes.validate import parse_json

if TYPE_CHECKING:
    from adapterhub.registry.remotes.dispatch import Endpoint
    from adapterhub.registry.remotes.oci.client import Client

_FALLBACK_TAG = re.compile(r"sha256-[0-9a-f]{64}")


def _repositories(client: Client, prefix: str, names: list[str] | None) -> list[str]:
    """The repositories to list: those of ``names`` under the remote, else the catalog's under ``prefix``."""
    if names:
        return [check_repository(prefix + n) for n in names]
    try:
        found = client.catalog()
    except (NotFoundError, RemoteAuthError) as e:
        raise UsageError(
            f"{client.host} does not list its repositories ({e})",
            hint="name the artifacts to look for: `adapterhub search --remote R --name team/qa-lora` "
            "(registries such as GHCR and Docker Hub have no catalog)",
        ) from None
    # Names from the registry are cached and printed: only valid OCI names are listed.
    return [r for r in found if isinstance(r, str) and (not prefix or r.startswith(prefix)) and _valid_repository(r)]


def search(ep: Endpoint, names: list[str] | None = None, warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """Every artifact under the remote's namespace (or of ``names`` under it), one row per manifest.

    ``warnings`` collects why a repository was skipped.
    """
    client = client_for(ep)
    client.ping()
    prefix = ep.url.path + "/" if ep.url.path else ""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    failures: list[AdapterhubError] = []
    repos = _repositories(client, prefix, names)
    for repo in repos:
        try:
            _search_repository(client, repo, prefix, rows)
        except (InvalidArtifactError, IntegrityError, InvalidNameError, NotFoundError, RemoteError) as e:
            if names and isinstance(e, NotFoundError):
                pass  # a name given that the registry does not hold: nothing to list
            failures.append(e)
            if warnings is not None:
                warnings.append(f"skipped {client.host}/{repo}: {e}")
    if repos and failures and len(failures) == len(repos) and not rows:
        transport = [e for e in failures if type(e) is RemoteError]
        if transport:
            raise transport[0]
    return sorted(rows.values(), key=lambda r: (r["repository"], r.get("version") or "", r["manifest_digest"]))


def _search_repository(client: Client, repo: str, prefix: str, rows: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Add the rows of one repository (its tags' manifests) to ``rows``."""
    for tag in client.tags(repo):
        if not isinstance(tag, str) or not OCI_TAG_RE.fullmatch(tag) or _FALLBACK_TAG.fullmatch(tag):
            continue  # not a tag, or the referrers fallback index
        try:
            got = client.get_manifest(repo, tag, allow_missing=True)
        except (InvalidArtifactError, IntegrityError):
            continue  # not a manifest we can read: nothing to list
        if got is None:
            continue
        data, media_type, mdigest = got
        key = (repo, mdigest)
        if key in rows:
            rows[key]["tags"].append(tag)
            continue
        m = parse_json(data, f"{client.host}/{repo}:{tag}", max_bytes=media.MANIFEST_LIMIT)
        if isinstance(m, dict):
            rows[key] = _search_row(client, repo, prefix, m, media_type, mdigest, tag)


def _valid_repository(repo: str) -> bool:
    try:
        check_repository(repo)
    except InvalidNameError:
        return False
    return True


def _valid(check: Any, value: Any) -> str | None:
    """``value`` if it is a string the ``adapterhub.refs`` check takes whole, else None."""
    if not isinstance(value, str):
        return None
    try:
        return check(value)
    except InvalidNameError:
        return None


def _search_row(client: Client, repo: str, prefix: str, m: dict[str, Any], media_type: str, mdigest: str,
                tag: str) -> dict[str, Any]:
    """One search result from a manifest; fields of the wrong type are left out (None).

    ``name`` is what a pull names it here: the repository path under the
    remote (the artifact's own claim, if other, is in ``metadata``).
    """
    from adapterhub.refs import check_name, check_version

    def text(v: Any) -> str | None:
        return v if isinstance(v, str) else None

    ann = m.get("annotations")
    ann = {k: v for k, v in ann.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(ann, dict) else {}
    layers = m.get("layers") if isinstance(m.get("layers"), list) else []
    row: dict[str, Any] = {"repository": repo, "manifest_digest": mdigest, "tags": [tag], "media_type": media_type}
    row["artifact_type"] = text(m.get("artifactType"))
    row["metadata"] = {"annotations": ann}
    claimed = _valid(check_name, ann.get(A + "name"))
    row["name"] = _valid(check_name, repo[len(prefix):]) or claimed
    if claimed and claimed != row["name"]:
        row["metadata"]["claimed_name"] = claimed
    row["version"] = _valid(check_version, ann.get(A + "version"))
    digest = ann.get(A + "digest")
    row["digest"] = digest if digest and SHA256_RE.fullmatch(digest) else None
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
        except (InvalidArtifactError, IntegrityError, NotFoundError, RemoteError):
            row["metadata"]["config_error"] = "the config blob could not be read"
    return row
