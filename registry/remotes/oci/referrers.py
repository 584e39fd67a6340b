"""Signatures as OCI 1.1 referrers: pushed with an artifact, fetched for a pull.

A registry with the referrers API indexes them itself; one without it
(Distribution 2.8) gets the fallback, an image index under the tag
``sha256-<hex>`` of the subject manifest.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import TYPE_CHECKING, Any

from adapterhub.errors import IntegrityError, InvalidArtifactError, NotFoundError, RemoteError, TrustError
from adapterhub.registry.remotes.oci import media
from adapterhub.registry.remotes.oci.client import SMALL_BODY
from adapterhub.registry.remotes.oci.media import (
    EMPTY_JSON,
    EMPTY_TYPE,
    INDEX_TYPE,
    MANIFEST_TYPE,
    SHA256_RE,
    SIGNATURE_TYPE,
    A,
    fallback_tag,
    sha256_digest,
)
from adapterhub.registry.remotes.validate import parse_json

if TYPE_CHECKING:
    from adapterhub.registry import Registry
    from adapterhub.registry.remotes.gate import TrustGate
    from adapterhub.registry.remotes.oci.client import Client


def push_signatures(reg: Registry, client: Client, repo: str, digest: str, mdigest: str, msize: int) -> dict[str, Any]:
    out = {"pushed": 0, "present": 0, "blobs_uploaded": 0, "blobs_skipped": 0, "mode": None}
    rows = reg.signatures(digest)
    if not rows:
        return out
    subject = {"mediaType": MANIFEST_TYPE, "digest": mdigest, "size": msize}
    known = {d.get("digest") for d in referrers(client, repo, mdigest)[0] if isinstance(d.get("digest"), str)}
    empty = {"mediaType": EMPTY_TYPE, "digest": sha256_digest(EMPTY_JSON), "size": len(EMPTY_JSON), "data": "e30="}
    new_descs = []
    for row in sorted(rows, key=lambda r: (r["created_at"], r["blob"])):
        raw = reg.read_signature(row["blob"])
        layer = {"mediaType": SIGNATURE_TYPE, "digest": "sha256:" + row["blob"], "size": len(raw)}
        # Nothing local (such as when this registry stored the row) goes in:
        # the same bundle must give the same manifest from every client.
        ann = {A + "signature.kind": row["kind"], A + "signature.key-id": row["key_id"]}
        sm = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": SIGNATURE_TYPE, "config": empty,
              "layers": [layer], "subject": subject, "annotations": ann}
        sbytes = json.dumps(sm, separators=(",", ":")).encode()
        sdigest = sha256_digest(sbytes)
        if sdigest in known:
            out["present"] += 1
            continue
        for d, data in ((empty["digest"], EMPTY_JSON), (layer["digest"], raw)):
            if client.has_blob(repo, d):
                out["blobs_skipped"] += 1
            else:
                client.upload_bytes(repo, data, d)
                out["blobs_uploaded"] += 1
        r = client.put_manifest(repo, sdigest, sbytes, MANIFEST_TYPE)
        if r.headers.get("OCI-Subject") == mdigest:
            out["mode"] = "api"  # the registry indexes referrers itself
        else:
            new_descs.append({"mediaType": MANIFEST_TYPE, "digest": sdigest, "size": len(sbytes),
                              "artifactType": SIGNATURE_TYPE, "annotations": ann})
        out["pushed"] += 1
    if new_descs:
        _update_fallback_index(client, repo, mdigest, new_descs)
        out["mode"] = "tag"
    elif out["mode"] is None:
        out["mode"] = "present"
    return out


def _manifests_of(data: bytes | None, what: str) -> list[Any]:
    """The ``manifests`` list of an index document; [] for anything else (a hostile index lists nothing)."""
    if data is None:
        return []
    try:
        doc = parse_json(data, what, max_bytes=media.MANIFEST_LIMIT)
    except InvalidArtifactError:
        return []
    items = doc.get("manifests") if isinstance(doc, dict) else None
    return list(items) if isinstance(items, list) else []


#: How long a pusher waits after writing the fallback index before it checks that its entries are still
#: there: at least SETTLE_MIN_S, three times its own read-to-write time, at most SETTLE_MAX_S.
SETTLE_MIN_S = 0.25
SETTLE_MAX_S = 5.0


def _update_fallback_index(client: Client, repo: str, mdigest: str, descs: list[dict[str, Any]]) -> None:
    """Add ``descs`` to the ``sha256-<hex>`` index; re-read and merge again if a concurrent pusher raced us.

    The registry has no conditional write, so two pushers can each read the
    index, add their own entries and write it back: the later write drops
    the earlier one's entries. A pusher that read the index before our write
    lands its own write about one read-to-write time later, so the check
    that our entries survived waits that long (three times our own, at least
    SETTLE_MIN_S) instead of reading straight back, when the other write may
    not have landed yet. The one whose entries are gone merges again.
    Entries of a malformed index are dropped: they could not be read by anyone.
    """
    tag = fallback_tag(mdigest)
    what = f"{client.host}/{repo}:{tag}"
    for _ in range(8):
        t0 = time.monotonic()
        cur = _get_index(client, repo, tag)
        manifests = [m for m in _manifests_of(cur, what) if isinstance(m, dict)]
        have = {m.get("digest") for m in manifests}
        index = {"schemaVersion": 2, "mediaType": INDEX_TYPE,
                 "manifests": manifests + [d for d in descs if d["digest"] not in have]}
        client.put_manifest(repo, tag, json.dumps(index, separators=(",", ":")).encode(), INDEX_TYPE)
        time.sleep(min(SETTLE_MAX_S, max(SETTLE_MIN_S, 3 * (time.monotonic() - t0))))
        now_have = {m.get("digest") for m in _manifests_of(_get_index(client, repo, tag), what) if isinstance(m, dict)}
        if all(d["digest"] in now_have for d in descs):
            return
        time.sleep(secrets.randbelow(100) / 1000)  # apart from the other pusher's retry
    raise RemoteError(f"{client.host}/{repo}: could not record the signatures in the referrers index {tag} (concurrent updates)")


def _get_index(client: Client, repo: str, tag: str) -> bytes | None:
    """The fallback index's bytes; None when it is missing or unreadable (too big, damaged, not JSON)."""
    try:
        got = client.get_manifest(repo, tag, allow_missing=True)
    except (InvalidArtifactError, IntegrityError):
        return None
    return got[0] if got is not None else None


def referrers(client: Client, repo: str, mdigest: str) -> tuple[list[dict[str, Any]], str]:
    """Referrer descriptors of ``mdigest``: from the referrers API, else from the fallback tag.

    Only descriptors that are objects are listed; a malformed or hostile
    index lists nothing (the artifact itself still pulls).
    """
    r = client.request("GET", f"/v2/{repo}/referrers/{mdigest}", repo=repo, allow=(404, 400, 405),
                       headers={"Accept": INDEX_TYPE}, stream=True)
    what = f"{client.host}/{repo}: the referrers of {mdigest[:19]}…"
    if r.status_code == 200 and r.headers.get("Content-Type", "").startswith(INDEX_TYPE):
        try:
            body = client.read_body(r, media.MANIFEST_LIMIT, what)
        except RemoteError:
            body = None
        return [d for d in _manifests_of(body, what) if isinstance(d, dict)], "api"
    client.read_body(r, SMALL_BODY, what)
    body = _get_index(client, repo, fallback_tag(mdigest))
    return [d for d in _manifests_of(body, what) if isinstance(d, dict)], "tag"


def _signature_manifest(client: Client, repo: str, desc: Any, mdigest: str) -> dict[str, Any] | None:
    """The referrer manifest ``desc`` names, if it is a signature of ``mdigest`` that can be read; else None."""
    if not isinstance(desc, dict) or desc.get("artifactType") != SIGNATURE_TYPE:
        return None
    if not isinstance(desc.get("digest"), str) or not SHA256_RE.fullmatch(desc["digest"]):
        return None
    try:
        got = client.get_manifest(repo, desc["digest"], allow_missing=True)
    except (InvalidArtifactError, IntegrityError):
        return None
    if got is None:
        return None
    sm = parse_json(got[0], f"{client.host}/{repo}@{desc['digest']}", max_bytes=media.MANIFEST_LIMIT)
    if not isinstance(sm, dict) or not isinstance(sm.get("subject"), dict) or sm["subject"].get("digest") != mdigest:
        return None
    return sm


def fetch_signatures(client: Client, repo: str, mdigest: str, digest: str, gate: TrustGate) -> list[dict[str, Any]]:
    """Signature bundles attached to ``mdigest`` (each manifest and blob checked against its digest).

    Referrers are not the artifact: one that is malformed, hostile, too big,
    missing or not a bundle is skipped (a policy that needs a signature then
    refuses the pull, for want of a good one).
    """
    out = []
    for d in referrers(client, repo, mdigest)[0]:
        sm = _signature_manifest(client, repo, d, mdigest)
        if sm is None:
            continue
        ann = sm.get("annotations") if isinstance(sm.get("annotations"), dict) else {}
        layers = sm.get("layers") if isinstance(sm.get("layers"), list) else []
        for layer in layers:
            if not isinstance(layer, dict) or layer.get("mediaType") != SIGNATURE_TYPE:
                continue
            ld, size = layer.get("digest"), layer.get("size")
            if not isinstance(ld, str) or not SHA256_RE.fullmatch(ld) or (isinstance(size, int) and size > media.SIGNATURE_LIMIT):
                continue
            try:
                raw = client.get_small_blob(repo, ld, limit=media.SIGNATURE_LIMIT, what="signature")
            except (InvalidArtifactError, IntegrityError, NotFoundError):
                continue
            kind = ann.get(A + "signature.kind", "model")
            try:
                b = gate.read_bundle(raw)
            except (TrustError, InvalidArtifactError):
                continue
            if b.subject_digest != digest and kind == "model":
                continue
            out.append({"raw": raw, "key_id": b.key_id, "kind": kind if kind in ("model", "provenance") else "model"})
    return out
