"""Import a Hub repo (or a snapshot already in the local Hugging Face cache,
offline) into the registry.

A pull drops what the push added and restores the original card, so a round
trip local -> Hub -> local gives the same artifact digest, and the signature
still verifies.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import ConflictError, IntegrityError, InvalidArtifactError, InvalidNameError, TrustError
from adapterhub.registry.remotes.gate import DERIVED_KINDS
from adapterhub.registry.remotes.hf.errors import cache_dir, call, hub_error, is_network_error, offline
from adapterhub.registry.remotes.hf.layout import (
    CARD_FILE,
    METADATA_FILE,
    PROVENANCE_FILE,
    RESERVED,
    SIGNATURE_FILE,
    read_metadata,
)
from adapterhub.registry.remotes.hf.urls import HubRepo, name_for, parse_url
from adapterhub.registry.remotes.imports import kept_latest, latest_of
from adapterhub.registry.remotes.validate import check_lineage, check_text

if TYPE_CHECKING:
    from adapterhub.registry import Registry
    from adapterhub.registry.remotes.gate import TrustGate


def _decode(entry: Any) -> bytes:
    """The original card bytes from ``adapterhub.json``, checked against their sha256."""
    try:
        data = entry["data"]
        raw = base64.b64decode(data, validate=True) if entry["encoding"] == "base64" else data.encode("utf-8")
        ok = hashlib.sha256(raw).hexdigest() == entry["sha256"]
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise InvalidArtifactError(f"{METADATA_FILE}: the stored original {CARD_FILE} is malformed or does not match its sha256")
    return raw


def _snapshot(repo: HubRepo, token: str | None, endpoint: str | None) -> tuple[Path, bool]:
    """The repo's files in the HF cache, downloading what is missing: (snapshot dir, offline)."""
    from huggingface_hub import HfApi, snapshot_download

    offline_ = offline()
    if not offline_:
        try:
            # Asked here, not only inside snapshot_download, to know whether the
            # Hub answered (snapshot_download falls back to the cache silently)
            # and to report 401/403/404 instead of a stale cached copy.
            HfApi(endpoint=endpoint, token=token).repo_info(repo.repo_id, revision=repo.revision)
        except Exception as e:  # a network error falls back to the cache; others are mapped
            if not is_network_error(e):
                mapped = hub_error(e, repo.url, endpoint)
                if mapped is None:
                    raise
                raise mapped from e
            offline_ = True
    # The branch or tag name, not the commit just resolved: snapshot_download
    # then records refs/<revision> in the cache, which a later offline pull needs.
    path = call(
        snapshot_download, repo.url, endpoint, repo.repo_id, revision=repo.revision, cache_dir=cache_dir(),
        local_files_only=offline_, token=token, endpoint=endpoint,
    )
    return Path(path), offline_


def _stage(snap: Path, staging: Path, meta: dict[str, Any] | None, progress: Any, label: str) -> dict[str, str]:
    """Copy the artifact's files out of a snapshot, hashing them on the way:
    what the push added is left out and the original card put back.

    Returns relpath -> sha256. The copies are private to the import, so the
    registry can take them by hard link without sharing an inode with the
    HF cache.
    """
    from adapterhub.manifest import IGNORED_NAMES, check_relpath
    from adapterhub.fsutil import copy_durably

    picked: list[tuple[str, Path]] = []
    cache_root = snap.resolve().parents[2]  # <cache>/models--org--repo/snapshots/<commit>
    card = (meta or {}).get("card") or {}
    if not isinstance(card, dict):
        raise InvalidArtifactError(f"{METADATA_FILE}: the card entry is not an object")
    # card["file"] is never used as a path: the original is restored as CARD_FILE.
    staging.mkdir(parents=True)
    for dirpath, dirnames, filenames in os.walk(snap):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_NAMES)
        rel_dir = Path(dirpath).relative_to(snap).as_posix()
        for fname in sorted(filenames):
            rel = fname if rel_dir == "." else f"{rel_dir}/{fname}"
            if fname in IGNORED_NAMES or fname.endswith(".incomplete") or (meta is not None and rel in RESERVED):
                continue
            if rel == CARD_FILE and meta is not None and card.get("mode") in ("generated", "merged"):
                continue  # the card the push wrote; the original (if any) is restored below
            real = Path(dirpath, fname).resolve()
            if cache_root not in real.parents:
                raise InvalidArtifactError(f"{rel} in the cached snapshot points outside the Hugging Face cache ({real})")
            picked.append((check_relpath(rel), real))
    digests: dict[str, str] = {}
    bar = progress(f"importing {label}", sum(os.stat(r).st_size for _, r in picked))
    try:
        for rel, real in picked:
            dst = staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            digests[rel] = copy_durably(real, dst, bar.update)
    finally:
        bar.close()
    if meta is not None and card.get("mode") == "merged":
        if card.get("original") is None:
            raise InvalidArtifactError(f"{METADATA_FILE}: the card was merged, but the original is missing")
        raw = _decode(card["original"])
        (staging / CARD_FILE).write_bytes(raw)
        digests[CARD_FILE] = hashlib.sha256(raw).hexdigest()
    return digests


def _from_metadata(meta: dict[str, Any] | None, digest: str, version: str | None) -> dict[str, Any]:
    """What the import takes from ``adapterhub.json`` (only when the files match its digest), checked first."""
    matches = meta is not None and meta.get("digest") == digest
    out: dict[str, Any] = {"matches": matches, "warnings": [], "lineage": [], "description": None}
    if meta is not None and not matches:
        out["warnings"].append(
            f"the files on the Hub hash to {digest[:19]}…, not to the digest {str(meta.get('digest'))[:19]}… "
            f"recorded in {METADATA_FILE}: they were changed after the push, so its lineage is not imported"
        )
    version = version or (meta.get("version") if matches and meta else None)
    if version is not None and not isinstance(version, str):
        raise InvalidNameError(f"{METADATA_FILE}: the version is not a string")
    out["version"] = version
    if matches and meta:
        out["lineage"] = check_lineage(meta.get("lineage"), METADATA_FILE)
        out["description"] = check_text(meta.get("description"), "description", METADATA_FILE)
    return out


def _trust(gate: TrustGate, snap: Path, staging: Path, digest: str, name: str, found: dict[str, Any], kind: str | None,
           label: str, with_meta: bool) -> dict[str, Any]:
    """Check the repo's signature and provenance through ``gate``; what may be stored, and the outcome."""
    sig_raw = (snap / SIGNATURE_FILE).read_bytes() if (snap / SIGNATURE_FILE).is_file() else None
    prov_raw = (snap / PROVENANCE_FILE).read_bytes() if with_meta and (snap / PROVENANCE_FILE).is_file() else None
    need_sig, need_prov = gate.requires(name)
    outcome: dict[str, Any] = {"signature_required": need_sig, "provenance_required": need_prov}
    out: dict[str, Any] = {"outcome": outcome, "sig": None, "prov": None, "warnings": []}
    if sig_raw is not None:
        try:
            b = gate.read_bundle(sig_raw)
            if b.subject_digest == digest:
                out["sig"] = (sig_raw, b.key_id)
            else:
                out["warnings"].append(f"{SIGNATURE_FILE} is for another artifact ({b.subject_digest[:19]}…); it is not stored")
        except TrustError as e:
            out["warnings"].append(f"{SIGNATURE_FILE} is not stored: {e}")
    if need_sig:
        if sig_raw is None:
            raise TrustError(f"{label} is not signed (no {SIGNATURE_FILE}), and the trust policy requires a signature")
        check = gate.check_signature(sig_raw, staging, digest, name)
        if not check.ok:
            raise TrustError(f"{label}: no valid signature by a trusted key ({check.reason})")
        outcome["signature"] = {"verified": True, "key_id": check.key_id, "key_name": check.key_name}
    if prov_raw is not None and found["matches"]:
        # Stored when it is about these files and this lineage; its key is
        # checked now only if the policy asks, and otherwise when it is used.
        try:
            key = gate.check_provenance(prov_raw, digest, name, found["lineage"], trusted=need_prov)
            out["prov"] = (prov_raw, key)
            if need_prov:
                outcome["provenance"] = "verified"
        except TrustError as e:
            if need_prov:
                raise TrustError(f"{label}: {PROVENANCE_FILE}: {e}") from None
            out["warnings"].append(f"{PROVENANCE_FILE} is not stored: {e}")
    elif need_prov and (found["lineage"] or kind in DERIVED_KINDS):
        raise TrustError(f"{label} is a derived artifact without verifiable provenance, and the trust policy requires it")
    return out


def _store(registry: Registry, staging: Path, target: str, found: dict[str, Any], trust: dict[str, Any],
           digests: dict[str, str], ins: Any, digest: str, repo: HubRepo, progress: Any) -> Any:
    """``registry.push`` of the staged files, then their signatures; nothing is left half-imported."""
    derived = [(p["parent"], p["relation"]) for p in found["lineage"]]
    recipe = next((p["recipe"] for p in found["lineage"] if p.get("recipe")), None)
    latest = latest_of(registry, target.partition(":")[0])
    try:
        res = registry.push(staging, target, description=found["description"], derived_from=derived, recipe=recipe,
                            progress=progress, verified=digests, inspection=ins, move_latest=False)
    except ConflictError as e:
        raise ConflictError(str(e), hint="pass --name NAME:VERSION to import it under another version") from None
    try:
        if res.digest != digest:  # the staged files changed under us
            raise IntegrityError(f"{repo.url}: the files changed while they were imported")
        if trust["sig"] is not None:
            registry.add_signature(res.digest, trust["sig"][0], trust["sig"][1], kind="model")
            trust["outcome"]["signature_stored"] = True
        if trust["prov"] is not None:
            registry.add_signature(res.digest, trust["prov"][0], trust["prov"][1], kind="provenance")
        if latest is not None and res.created:
            found["warnings"].append(kept_latest(res.name, latest, res.ref))
    except BaseException:
        if res.created:  # nothing half-imported
            registry.execute_rm(registry.plan_rm(res.ref))
        raise
    return res


def pull(
    registry: Registry,
    source: str,
    *,
    gate: TrustGate,
    name: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Import ``hf://org/repo[@revision]`` into the registry.

    The repo comes through huggingface_hub's cache: with ``HF_HUB_OFFLINE=1``,
    or when the endpoint cannot be reached, a snapshot already cached is
    imported with no network. ``name`` is ``NAME[:VERSION]``; by default the
    name comes from the repo id and the version from ``adapterhub.json``.
    ``gate`` checks signatures and provenance before anything is stored: a
    refused pull leaves nothing in the registry.
    """
    from adapterhub.fsutil import remove_stale_staging, staging_path
    from adapterhub.inspect import inspect_path
    from adapterhub.manifest import FileEntry, Manifest
    from adapterhub.progress import no_progress
    from adapterhub.refs import parse_target

    repo = parse_url(source)
    target_name, target_version = parse_target(name) if name else (name_for(repo.repo_id), None)
    snap, was_offline = _snapshot(repo, token, endpoint)
    meta = read_metadata(snap / METADATA_FILE) if (snap / METADATA_FILE).is_file() else None
    # Staged in the registry home (same filesystem: the blobs take the copies
    # by hard link); a killed import leaves a dir the next one removes.
    remove_stale_staging(registry.home / "hf-import")
    tmp = staging_path(registry.home / "hf-import")
    tmp.mkdir()
    try:
        staging = tmp / target_name.split("/")[-1]
        digests = _stage(snap, staging, meta, progress or no_progress, repo.repo_id)
        manifest = Manifest.from_entries(
            FileEntry(rel, os.stat(staging / rel).st_size, sha) for rel, sha in digests.items()
        )
        digest = manifest.digest
        ins = inspect_path(staging)  # refuses what is not an artifact before any trust check
        found = _from_metadata(meta, digest, target_version)
        label = f"{repo.url} ({digest[:19]}…)"
        trust = _trust(gate, snap, staging, digest, target_name, found, ins.kind, label, meta is not None)
        target = f"{target_name}:{found['version']}" if found["version"] else target_name
        res = _store(registry, staging, target, found, trust, digests, ins, digest, repo, progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        **res.to_dict(),
        "source": repo.url,
        "repo": repo.repo_id,
        "revision": repo.revision or "main",
        "commit": snap.name,
        "offline": was_offline,
        "files": [f.to_dict() for f in manifest.files],
        "digest_matches_metadata": found["matches"] if meta is not None else None,
        "origin": {"name": meta.get("name"), "version": meta.get("version")} if meta else None,
        "lineage_imported": len(found["lineage"]),
        "trust": trust["outcome"],
        "warnings": [*res.to_dict()["warnings"], *found["warnings"], *trust["warnings"]],
    }
