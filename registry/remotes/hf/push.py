"""Push one registry version to a Hub repo as one commit, tagged ``v<version>``."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import ConflictError, IntegrityError, InvalidArtifactError, InvalidNameError, NotFoundError
from adapterhub.registry.remotes.hf.card import card_body, card_metadata, render_card
from adapterhub.registry.remotes.hf.errors import cache_dir, call, require_online
from adapterhub.registry.remotes.hf.layout import (
    CARD_FILE,
    DEFAULT_ENDPOINT,
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    PROVENANCE_FILE,
    RESERVED,
    SIGNATURE_FILE,
    read_metadata,
)
from adapterhub.registry.remotes.hf.urls import HubRepo, parse_url, version_tag

if TYPE_CHECKING:
    from adapterhub.registry import Registry
    from adapterhub.registry.index import VersionInfo
    from adapterhub.registry.remotes.gate import TrustGate


@dataclass
class UploadPlan:
    """Everything one push sends, built from the registry alone (no network)."""

    repo: HubRepo
    ref: str
    digest: str
    files: list[tuple[str, Path | bytes]]  # path in the repo -> a blob to read in place, or bytes
    card_mode: str  # generated | merged
    tags: list[str]  # Hub tags to create
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.files]

    def operations(self, existing: Sequence[str] = ()) -> list[Any]:
        """``CommitOperationAdd`` for every file, and a delete for each file of
        ``existing`` (the repo at the target revision) that this version lacks."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        keep = set(self.paths)
        ops: list[Any] = [
            CommitOperationAdd(path_in_repo=p, path_or_fileobj=src if isinstance(src, bytes) else str(src))
            for p, src in self.files
        ]
        ops += [
            CommitOperationDelete(path_in_repo=p)
            for p in existing
            if p not in keep and not p.split("/")[0].startswith(".git")
        ]
        return ops

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo": self.repo.repo_id, "revision": self.repo.revision or "main", "ref": self.ref,
            "digest": self.digest, "files": self.paths, "tags": self.tags, "card": self.card_mode,
        }


def _latest_signature(reg: Registry, info: VersionInfo, kind: str, gate: TrustGate | None) -> tuple[dict[str, Any], bytes] | None:
    rows = reg.signatures(info.digest, kind=kind)
    if kind == "model" and gate is not None:
        # A signature by a trusted key when there is one (the gate's choice), else the newest.
        blob = gate.preferred_signature(info)
        rows = [r for r in rows if r["blob"] == blob] or rows
    if not rows:
        return None
    return rows[0], reg.read_signature(rows[0]["blob"])


def plan_push(reg: Registry, ref: str, target: str | HubRepo, gate: TrustGate | None = None) -> UploadPlan:
    """What ``push(reg, ref, target)`` uploads: files, card, metadata and tags."""
    from adapterhub import __version__

    repo = parse_url(target) if isinstance(target, str) else target
    info = reg.resolve(ref)
    files = reg.files(ref)
    paths = {e.path for e, _ in files}
    clash = sorted(paths & set(RESERVED))
    if clash:
        raise ConflictError(
            f"{info.name}:{info.version} has a file named {clash[0]}, which the Hub remote uses for itself",
            hint=f"rename it in the artifact; {', '.join(RESERVED)} are reserved on hf:// remotes",
        )
    inspection = reg.index.inspection(info.digest)
    sig = _latest_signature(reg, info, "model", gate)
    prov = _latest_signature(reg, info, "provenance", None)
    original = None
    if CARD_FILE in paths:
        blob = next(p for e, p in files if e.path == CARD_FILE)
        original = blob.read_bytes()
        if hashlib.sha256(original).hexdigest() != next(e.sha256 for e, _ in files if e.path == CARD_FILE):
            raise IntegrityError(f"{info.name}:{info.version}: the stored {CARD_FILE} is corrupt", hint="run `adapterhub fsck`")
    mode, card = render_card(card_metadata(inspection), card_body(info, inspection, repo.repo_id, sig is not None), original)
    lineage = reg.index.parents(info.digest)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool": f"adapterhub {__version__}",
        "name": info.name,
        "version": info.version,
        "digest": info.digest,
        "description": info.description,
        "created_at": info.created_at,
        "registry_tags": [t for t in info.tags if t != "latest"],
        "files": [e.to_dict() for e, _ in files],
        "inspection": inspection,
        "lineage": [{"parent": p["digest"], "relation": p["relation"], "recipe": p["recipe"]} for p in lineage],
        "card": {"file": CARD_FILE, "mode": mode, "original": _encode(original) if original is not None else None},
        "signature": _sig_meta(SIGNATURE_FILE, sig),
        "provenance": _sig_meta(PROVENANCE_FILE, prov),
    }
    out: list[tuple[str, Path | bytes]] = [(e.path, p) for e, p in files if e.path != CARD_FILE]
    out.append((CARD_FILE, card.encode("utf-8")))
    out.append((METADATA_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8")))
    if sig is not None:
        out.append((SIGNATURE_FILE, sig[1]))
    if prov is not None:
        out.append((PROVENANCE_FILE, prov[1]))
    out.sort(key=lambda f: f[0])
    return UploadPlan(repo, f"{info.name}:{info.version}", info.digest, out, mode, [version_tag(info.version)], meta)


def _encode(data: bytes) -> dict[str, Any]:
    entry: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    try:
        entry.update(encoding="utf-8", data=data.decode("utf-8"))
    except UnicodeDecodeError:
        entry.update(encoding="base64", data=base64.b64encode(data).decode("ascii"))
    return entry


def _sig_meta(file: str, sig: tuple[dict[str, Any], bytes] | None) -> dict[str, Any] | None:
    if sig is None:
        return None
    return {"file": file, "key_id": sig[0]["key_id"], "sha256": sig[0]["blob"]}


def push(
    registry: Registry,
    ref: str,
    target: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    progress: Any = None,
    gate: TrustGate | None = None,
) -> dict[str, Any]:
    """Upload ``ref`` to ``hf://org/repo[@revision]`` as one commit, then tag it ``v<version>``.

    Pushing a version whose tag already holds the same digest is a no-op;
    a tag holding other content is a ``ConflictError`` (Hub tags, like
    versions, are not moved). Upload progress is huggingface_hub's own.
    """
    from huggingface_hub import HfApi

    repo = parse_url(target)
    if repo.revision and re.fullmatch(r"[0-9a-f]{40}", repo.revision):
        raise InvalidNameError(f"{target}: a push goes to a branch, not to a commit", hint="hf://org/repo or hf://org/repo@BRANCH")
    plan = plan_push(registry, ref, repo, gate)  # checks the artifact before any network call
    require_online("pushing to the Hub")
    api = HfApi(endpoint=endpoint, token=token)
    where = repo.url
    url = call(api.create_repo, where, endpoint, repo.repo_id, repo_type="model", exist_ok=True)
    refs = call(api.list_repo_refs, where, endpoint, repo.repo_id)
    branch = repo.revision or "main"
    if branch in {t.name for t in refs.tags}:
        raise ConflictError(f"{where}: {branch} is a tag on the Hub; a push goes to a branch")
    tag = plan.tags[0]
    existing_tag = next((t for t in refs.tags if t.name == tag), None)
    result = {**plan.to_dict(), "url": str(url).rstrip("/") if url else f"{endpoint or DEFAULT_ENDPOINT}/{repo.repo_id}"}
    if existing_tag is not None:
        there = _remote_metadata(api, repo.repo_id, tag, where, endpoint)
        if there.get("digest") != plan.digest:
            seen = f" ({str(there['digest'])[:19]}…)" if there.get("digest") else ""
            raise ConflictError(
                f"{where} already has tag {tag} with other content{seen}",
                hint="Hub tags follow registry versions and are not moved; push another version",
            )
        return {**result, "commit": existing_tag.target_commit, "created": False}
    if branch != "main" and branch not in {b.name for b in refs.branches}:
        call(api.create_branch, where, endpoint, repo.repo_id, branch=branch, exist_ok=True)
    current = call(api.list_repo_files, where, endpoint, repo.repo_id, revision=branch)
    info = call(
        api.create_commit, where, endpoint, repo.repo_id, plan.operations(current),
        commit_message=f"adapterhub push {plan.ref}",
        commit_description=f"Artifact digest {plan.digest}; see {METADATA_FILE}.",
        revision=branch,
    )
    commit = info.oid
    call(api.create_tag, where, endpoint, repo.repo_id, tag=tag, revision=commit,
          tag_message=f"{plan.ref} {plan.digest}")
    return {**result, "commit": commit, "created": True}


def _remote_metadata(api: Any, repo_id: str, revision: str, where: str, endpoint: str | None) -> dict[str, Any]:
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = call(api.hf_hub_download, where, endpoint, repo_id, METADATA_FILE, revision=revision, cache_dir=cache_dir())
    except (NotFoundError, EntryNotFoundError):
        return {}
    try:
        return read_metadata(Path(path))
    except InvalidArtifactError:  # a tag someone made by other means
        return {}
