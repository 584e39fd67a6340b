"""Push a registry artifact to an OCI registry: blobs (HEAD before each), config,
the manifest under each tag, then its signatures as referrers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import ConflictError, IntegrityError, InvalidArtifactError, InvalidNameError
from adapterhub.registry.remotes.oci.client import client_for
from adapterhub.registry.remotes.oci.media import (
    ARTIFACT_TYPES,
    CONFIG_TYPE,
    FILE_TYPE,
    MANIFEST_TYPE,
    SHA256_RE,
    TITLE,
    A,
    check_oci_tag,
    check_repository,
    sha256_digest,
)
from adapterhub.registry.remotes.oci.referrers import push_signatures
from adapterhub.registry.remotes.validate import parse_json

if TYPE_CHECKING:
    from adapterhub.registry import Registry
    from adapterhub.registry.remotes.dispatch import Endpoint
    from adapterhub.registry.remotes.oci.client import Client


def build_config(reg: Registry, ref: str) -> tuple[dict[str, Any], list[tuple[Any, Path]]]:
    """Our config document for ``ref`` (deterministic, so a re-push uploads nothing) and its files."""
    show = reg.show(ref)
    v = show.version
    files = reg.files(ref)
    lineage = [{"parent": r["parent"], "relation": r["relation"], "recipe": r["recipe"]} for r in show.lineage]
    doc = {
        "schemaVersion": 1,
        "name": v.name,
        "version": v.version,
        "digest": v.digest,
        "tags": [t for t in v.tags],
        "description": v.description,
        "created_at": v.created_at,
        "kind": v.kind,
        "inspection": show.inspection,
        "files": [e.to_dict() for e, _ in files],
        "lineage": lineage,
    }
    return doc, files


def _annotations(doc: dict[str, Any]) -> dict[str, str]:
    ins = doc.get("inspection") or {}
    ann = {
        "org.opencontainers.image.title": doc["name"],
        "org.opencontainers.image.version": doc["version"],
        "org.opencontainers.image.created": doc["created_at"],
        A + "name": doc["name"],
        A + "version": doc["version"],
        A + "digest": doc["digest"],
        A + "kind": doc["kind"],
        A + "base-model": ins.get("base_model"),
        A + "base-revision": ins.get("base_revision"),
        A + "method": ins.get("method"),
        A + "rank": None if ins.get("rank") is None else str(ins["rank"]),
        A + "quantization": ins.get("quant"),
        A + "size": str(sum(f["size"] for f in doc["files"])),
    }
    if doc.get("description"):
        ann["org.opencontainers.image.description"] = doc["description"]
    return {k: v for k, v in ann.items() if v is not None}


def _target(info: Any, ep: Endpoint) -> tuple[str, str]:
    """(repository, main tag) of a push: ``push REF --remote NAME``, or a full ``oci://host/ns/name:tag``."""
    url = ep.url
    if ep.remote is not None and url.path == ep.remote.url.path:
        repo, reference = url.repository(info.name), None
    else:
        repo, reference = url.path, url.reference
    check_repository(repo)
    main_tag = check_oci_tag(reference or info.version, "version")
    if main_tag.startswith("sha256:"):
        raise InvalidNameError("push to a tag, not to a digest")
    return repo, main_tag


def _manifest(info: Any, doc: dict[str, Any], files: list[tuple[Any, Path]]) -> tuple[dict[str, Any], bytes]:
    """Our manifest and config bytes for an artifact (deterministic: a re-push uploads nothing)."""
    config_bytes = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    config_desc = {"mediaType": CONFIG_TYPE, "digest": sha256_digest(config_bytes), "size": len(config_bytes)}
    layers = [{"mediaType": FILE_TYPE, "digest": "sha256:" + e.sha256, "size": e.size, "annotations": {TITLE: e.path}}
              for e, _ in files]
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPES.get(info.kind, ARTIFACT_TYPES["checkpoint"]),
        "config": config_desc,
        "layers": layers,
        "annotations": _annotations(doc),
    }
    return manifest, config_bytes


def _keep_existing(client: Client, repo: str, tag: str, digest: str, mdigest: str) -> tuple[bytes, str] | None:
    """The manifest already under ``tag`` when it holds these files; ConflictError when it holds others.

    Versions are immutable on the remote too. Same files with other metadata
    (pushed from another registry, where the version has another creation
    time or tags): the remote keeps the first manifest, so every client's
    signatures refer to one subject.
    """
    existing = client.get_manifest(repo, tag, allow_missing=True)
    if existing is None or existing[2] == mdigest:
        return None
    try:
        doc = parse_json(existing[0], f"{client.host}/{repo}:{tag}", max_bytes=len(existing[0]))
    except InvalidArtifactError:
        doc = None
    ann = doc.get("annotations") if isinstance(doc, dict) else None
    other = ann.get(A + "digest") if isinstance(ann, dict) else None
    if other == digest and not isinstance(doc.get("config"), dict):  # type: ignore[union-attr]
        other = None
    if other != digest:
        raise ConflictError(f"{client.host}/{repo}:{tag} already holds other content",
                            hint="versions are immutable: push another version, or to another tag")
    return existing[0], existing[2]


def _upload_files(client: Client, repo: str, label: str, files: list[tuple[Any, Path]], progress: Any) -> tuple[int, int, int]:
    """Upload the files the remote lacks (HEAD first); returns (uploaded, present, bytes uploaded)."""
    seen: set[str] = set()
    todo = []
    present = 0
    for e, path in files:
        d = "sha256:" + e.sha256
        if d in seen:
            continue
        seen.add(d)
        if client.has_blob(repo, d):
            present += 1
        else:
            todo.append((e, path, d))
    uploaded = nbytes = 0
    bar = progress(f"uploading {label}", sum(e.size for e, _, _ in todo)) if progress else None
    try:
        for e, path, d in todo:
            if not path.exists():
                raise IntegrityError(f"the blob for {e.path} is missing from the registry", hint="run `adapterhub fsck`")
            client.upload_file(repo, path, d, e.size, bar)
            uploaded += 1
            nbytes += e.size
    finally:
        if bar is not None:
            bar.close()
    return uploaded, present, nbytes


def _upload_config(client: Client, repo: str, where: str, desc: dict[str, Any], config_bytes: bytes) -> bool:
    """Upload the config blob unless the remote has it; True when it was uploaded."""
    if not isinstance(desc.get("digest"), str) or not SHA256_RE.fullmatch(desc["digest"]):
        raise IntegrityError(f"{where}: the remote's manifest names no valid config blob")
    if client.has_blob(repo, desc["digest"]):
        return False
    if desc["digest"] != sha256_digest(config_bytes):
        raise IntegrityError(f"{where}: the remote's manifest refers to a config blob it does not have")
    client.upload_bytes(repo, config_bytes, desc["digest"])
    return True


def push(reg: Registry, ref: str, ep: Endpoint, *, tags: tuple[str, ...] = (), progress: Any = None) -> dict[str, Any]:
    """Upload ``ref`` as an OCI artifact (blobs first, HEAD before each, then manifest, tags, signatures)."""
    t0 = time.perf_counter()
    info = reg.resolve(ref)
    repo, main_tag = _target(info, ep)
    extra = [check_oci_tag(t) for t in (*info.tags, *tags)]
    doc, files = build_config(reg, f"{info.name}:{info.version}")
    manifest, config_bytes = _manifest(info, doc, files)
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    mdigest = sha256_digest(manifest_bytes)
    client = client_for(ep)
    client.ping()
    kept = _keep_existing(client, repo, main_tag, info.digest, mdigest)
    if kept is not None:
        manifest_bytes, mdigest = kept
        manifest = parse_json(manifest_bytes, f"{ep.url.host}/{repo}:{main_tag}", max_bytes=len(manifest_bytes))
    files_uploaded, files_present, file_bytes = _upload_files(client, repo, f"{info.name}:{info.version}", files,
                                                              progress)
    config_uploaded = _upload_config(client, repo, f"{ep.url.host}/{repo}:{main_tag}", manifest["config"], config_bytes)
    pushed_tags = []
    for tag in dict.fromkeys([main_tag, *extra]):
        client.put_manifest(repo, tag, manifest_bytes, MANIFEST_TYPE)
        pushed_tags.append(tag)
    sig = push_signatures(reg, client, repo, info.digest, mdigest, len(manifest_bytes))
    return {
        "ref": f"{info.name}:{info.version}",
        "digest": info.digest,
        "target": f"oci://{ep.url.host}/{repo}:{main_tag}",
        "repository": repo,
        "tags": pushed_tags,
        "manifest_digest": mdigest,
        "artifact_type": manifest.get("artifactType"),
        # Every blob (files, config, signature bundles and their empty config), as before.
        "blobs_uploaded": files_uploaded + int(config_uploaded) + sig["blobs_uploaded"],
        "blobs_skipped": files_present + int(not config_uploaded) + sig["blobs_skipped"],
        "bytes_uploaded": file_bytes + (len(config_bytes) if config_uploaded else 0),
        # The artifact's files on their own (distinct contents), then the metadata blobs.
        "files_uploaded": files_uploaded,
        "files_present": files_present,
        "file_bytes_uploaded": file_bytes,
        "config_uploaded": config_uploaded,
        "artifact_digest": info.digest,
        "signatures_pushed": sig["pushed"],
        "signatures_present": sig["present"],
        "referrers": sig["mode"],
        "seconds": round(time.perf_counter() - t0, 3),
    }
