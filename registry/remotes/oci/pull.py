"""Pull an artifact from an OCI registry into the local registry.

Nothing is imported unless every blob matched its digest and the trust gate
passed. Blobs are kept in ``remote-staging/blobs`` while they download, so a
broken pull resumes (HTTP Range) when it is run again.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import ConflictError, IntegrityError, NotFoundError, RemoteError, TrustError
from adapterhub.fsutil import storage_error
from adapterhub.registry.remotes.gate import DERIVED_KINDS
from adapterhub.registry.remotes.imports import kept_latest, latest_of, tags_to_apply
from adapterhub.registry.remotes.oci.client import client_for
from adapterhub.registry.remotes.oci.media import check_oci_tag, check_repository
from adapterhub.registry.remotes.oci.plan import Plan, plan as make_plan, want_digest
from adapterhub.registry.remotes.oci.referrers import fetch_signatures
from adapterhub.registry.remotes.oci.staging import staging_lock, staging_root
from adapterhub.registry.remotes.oci.transfer import download

if TYPE_CHECKING:
    from adapterhub.registry import Registry
    from adapterhub.registry.remotes.dispatch import Endpoint
    from adapterhub.registry.remotes.gate import TrustGate
    from adapterhub.registry.remotes.oci.client import Client


def pull(reg: Registry, ep: Endpoint, *, gate: TrustGate, name: str | None = None,
         progress: Any = None) -> dict[str, Any]:
    """Import ``ep`` (an ``oci://host/repo:tag`` URL) into the local registry.

    ``gate`` says what the trust policy requires for the local name and
    checks it: signatures before the import, provenance before any download.
    """
    t0 = time.perf_counter()
    url = ep.url
    repo = url.path
    check_repository(repo)
    reference = url.reference or "latest"
    if not reference.startswith("sha256:"):
        check_oci_tag(reference)
    client = client_for(ep)
    client.ping()
    namespace = ep.remote.url.path if ep.remote is not None and ep.remote.url.scheme == "oci" else None
    plan = make_plan(client, repo, reference, name, namespace)
    digest = plan.config.get("digest") if plan.ours else None
    need_sig, need_prov = gate.requires(plan.name)

    # Conflicts and trust first: nothing is downloaded for a pull that must fail.
    if plan.version is not None and digest is not None:
        _refuse_other_content(reg, plan, digest)
    sigs = fetch_signatures(client, repo, plan.manifest_digest, digest, gate) if digest else []
    if need_sig and not any(s["kind"] == "model" for s in sigs):
        raise TrustError(f"{url} is not signed, and the trust policy requires a signature",
                         hint="ask the publisher to `adapterhub sign` and push again")
    prov = None
    if need_prov and digest is not None and (plan.config.get("lineage") or plan.config.get("kind") in DERIVED_KINDS):
        _check_provenance(gate, plan, digest, sigs, url)
        prov = "verified"

    # One pull at a time per home: two pulls of one blob would share its partial file.
    with staging_lock(staging_root(reg)):
        res = _import(reg, client, plan, url, digest, sigs, gate, need_sig, need_prov and prov is None, progress)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    res["provenance_required"] = need_prov
    if prov:
        res["provenance"] = prov
    return res


def _refuse_other_content(reg: Registry, plan: Plan, digest: str) -> None:
    from adapterhub.refs import Ref

    try:
        here = reg.index.resolve(Ref(plan.name, version=plan.version))
    except NotFoundError:
        return
    if here.digest != digest:
        raise ConflictError(f"{plan.name}:{plan.version} exists here with other content",
                            hint="pull under another name with --name")


def _check_provenance(gate: TrustGate, plan: Plan, digest: str, sigs: list[dict[str, Any]], url: Any) -> None:
    """Refuse, before any download, a derived artifact without a provenance attestation that verifies.

    As for a local pull: an attestation whose subject is ``digest``, whose
    inputs are the lineage the config records, signed by a key trusted for the
    local name; and the chain of every parent already in this registry verifies.
    """
    lineage = [r for r in plan.config.get("lineage") or [] if isinstance(r, dict)]
    reasons = []
    for s in sigs:
        if s["kind"] != "provenance":
            continue
        try:
            gate.check_provenance(s["raw"], digest, plan.name, lineage, trusted=True)
            break
        except (TrustError, IntegrityError) as e:
            reasons.append(str(e))
    else:
        why = "; ".join(dict.fromkeys(reasons)) or "no signed provenance"
        raise TrustError(f"{url} is a derived artifact whose provenance does not verify ({why}), "
                         "and the trust policy requires it",
                         hint="ask the publisher to `adapterhub sign REF --provenance` and push again")
    gate.check_parents(plan.name, lineage, str(url))


def _work_dir(stage: Path, plan: Plan) -> tuple[Path, Path]:
    """A fresh work dir for this pull and the artifact root in it (old ones of killed pulls go first)."""
    for old in stage.glob("pull-*.incomplete"):  # left by a killed pull (no other pull runs now)
        shutil.rmtree(old, ignore_errors=True)
    work = None
    try:
        (stage / "blobs").mkdir(parents=True, exist_ok=True)
        work = stage / f"pull-{secrets.token_hex(6)}.incomplete"
        root = work / plan.name.rsplit("/", 1)[-1]
        root.mkdir(parents=True)
    except OSError as e:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        raise storage_error(e, "the pull's staging area") from e
    return work, root


def _download_all(reg: Registry, client: Client, plan: Plan, blobs: Path, todo: list[tuple[str, int]],
                  sources: dict[str, Path], stats: dict[str, int], progress: Any) -> None:
    bar = progress(f"downloading {plan.name}", sum(s for _, s in todo)) if progress else None
    try:
        for hex_, size in todo:
            sources[hex_] = download(client, plan.repo, hex_, size, blobs, bar, stats)
            stats["downloaded"] += 1
    finally:
        if bar is not None:
            bar.close()


def _link_files(root: Path, plan: Plan, sources: dict[str, Path]) -> dict[str, str]:
    """Lay the artifact out under ``root`` (hard links where it can); returns relpath -> sha256."""
    verified: dict[str, str] = {}
    try:
        for rel, hex_, _ in plan.files:
            dst = root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(sources[hex_], dst)
            except OSError:
                shutil.copyfile(sources[hex_], dst)
            verified[rel] = hex_
    except OSError as e:
        raise storage_error(e, "the pull's staging area") from e
    return verified


def _check_signatures(gate: TrustGate, sigs: list[dict[str, Any]], root: Path, want: str, name: str, url: Any) -> None:
    checks = [gate.check_signature(s["raw"], root, want, name) for s in sigs if s["kind"] == "model"]
    if not any(c.ok for c in checks):
        reasons = "; ".join(dict.fromkeys(c.reason for c in checks)) or "no signature"
        raise TrustError(f"{url}: no valid signature by a trusted key ({reasons})")


def _store(reg: Registry, root: Path, plan: Plan, digest: str | None, verified: dict[str, str], url: Any,
           refuse_derived: bool) -> tuple[Any, list[str]]:
    """``reg.push`` of the staged artifact with the remote's metadata; returns (result, warnings)."""
    from adapterhub.inspect import inspect_path

    target = plan.name + (f":{plan.version}" if plan.version else "")
    tags = [t for t in plan.config.get("tags", []) if t != "latest"] if plan.ours else []
    tags, kept = tags_to_apply(reg, plan.name, tags, want_digest(plan, digest))
    warnings = [*plan.warnings] + [
        f"kept the local tag {plan.name}@{t} (it names {old}); the remote would move it: "
        f"`adapterhub tag {plan.name}:VERSION {t}` moves it by hand" for t, old in kept
    ]
    lineage = plan.config.get("lineage") or [] if plan.ours else []  # checked by the plan
    recipe = next((r["recipe"] for r in lineage if r.get("recipe")), None)
    ins = inspect_path(root)
    if refuse_derived and (lineage or ins.kind in DERIVED_KINDS):
        raise TrustError(f"{url} is a derived artifact ({ins.kind}) without verifiable provenance, "
                         "and the trust policy requires it")
    latest = latest_of(reg, plan.name)
    res = reg.push(root, target, tags=tags, description=plan.config.get("description") if plan.ours else None,
                   derived_from=[(r["parent"], r["relation"]) for r in lineage], recipe=recipe, verified=verified,
                   inspection=ins, move_latest=False)
    if digest is not None and res.digest != digest:
        raise IntegrityError(f"{url}: imported content hashes to {res.digest}, not {digest}")
    if latest is not None and res.created:
        warnings.append(kept_latest(plan.name, latest, res.ref))
    return res, warnings


def _import(reg: Registry, client: Client, plan: Plan, url: Any, digest: str | None, sigs: list[dict[str, Any]],
            gate: TrustGate, need_sig: bool, refuse_derived: bool, progress: Any) -> dict[str, Any]:
    """Download (resuming), verify, check signatures, then import; under the staging lock.

    ``refuse_derived``: provenance is required and was not verified, so an
    artifact that inspection finds to be merged or quantized is refused.
    """
    stage = staging_root(reg)
    blobs = stage / "blobs"
    stats = {"downloaded": 0, "local": 0, "resumed_bytes": 0}
    work, root = _work_dir(stage, plan)
    sources: dict[str, Path] = {}
    todo: list[tuple[str, int]] = []
    for _, hex_, size in plan.files:
        if reg.blobs.has(hex_, size):
            sources[hex_] = reg.blobs.path(hex_)
            stats["local"] += 1
        elif hex_ not in sources and hex_ not in {t[0] for t in todo}:
            todo.append((hex_, size))
    keep = False
    try:
        _download_all(reg, client, plan, blobs, todo, sources, stats, progress)
        verified = _link_files(root, plan, sources)
        if need_sig:
            _check_signatures(gate, sigs, root, want_digest(plan, digest), plan.name, url)
        res, warnings = _store(reg, root, plan, digest, verified, url, refuse_derived)
        for s in sigs:
            reg.add_signature(res.digest, s["raw"], s["key_id"], kind=s["kind"])
    except (RemoteError, KeyboardInterrupt):
        keep = True  # the next run resumes from what was downloaded
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        # Imported (the store holds hard links to them), or refused: drop the staged copies.
        # Kept for a resume: only this pull's downloads. Staged copies of blobs the store
        # already holds go either way: an import interrupted after it stored them leaves
        # them there, and later pulls skip downloading those blobs, so would never drop them.
        resume = {hex_ for hex_, _ in todo} if keep else set()
        for hex_ in {h for _, h, _ in plan.files} - resume:
            (blobs / hex_).unlink(missing_ok=True)
            (blobs / f"{hex_}.partial").unlink(missing_ok=True)
    ref = plan.reference
    return {
        "ref": res.ref,
        "digest": res.digest,
        "created": res.created,
        "source": f"oci://{client.host}/{plan.repo}" + (f"@{ref}" if ref.startswith("sha256:") else f":{ref}"),
        "manifest_digest": plan.manifest_digest,
        "adapterhub_artifact": plan.ours,
        "kind": res.inspection.kind,
        "tags": list(res.tags),
        "file_count": res.file_count,
        "size": res.size,
        "blobs_downloaded": stats["downloaded"],
        "blobs_local": stats["local"],
        "resumed_bytes": stats["resumed_bytes"],
        "signatures": len(sigs),
        "signature_required": need_sig,
        "warnings": warnings,
    }
