"""Record blobs: the index, written a second time into the blob store, so that it can be rebuilt.

Every change to the index (a version, a tag, a signature, a verification, a
trusted key, a policy rule) also writes a small JSON *record blob* into a
content-addressed store of its own (``$ADAPTERHUB_HOME/records/sha256/``,
beside the artifacts' ``blobs/``), inside the same write transaction and before it
commits. The ``records`` table names the blob that holds the current state of
each ``(kind, key)``: that keeps it from ``gc``, and a superseded record
becomes ordinary garbage. A removal writes a *tombstone* (``"data": null``),
so that a rebuild does not bring back what was removed.

A record blob starts with ``{"adapterhub.record":1,`` and carries ``kind``,
``key``, ``seq`` (nanoseconds since the epoch: the newest state wins) and
``data``. ``adapterhub fsck --rebuild-index`` (registry/rebuild.py) scans the
store for them when ``index.db`` is lost or damaged.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from adapterhub.registry.index import Index

HEAD = b'{"adapterhub.record":1,'
MAX_RECORD_BYTES = 64 << 20  # an inspection of a huge checkpoint stays far below this


class RecordStore(Protocol):
    def put_bytes(self, data: bytes, sha256: str) -> bool: ...


def encode(kind: str, key: str, data: dict[str, Any] | None) -> bytes:
    payload = {"adapterhub.record": 1, "kind": kind, "key": key, "seq": time.time_ns(), "data": data}
    raw = json.dumps(payload, separators=(",", ":"), default=str).encode()
    assert raw.startswith(HEAD)
    return raw


def note(index: Index, kind: str, key: str, data: dict[str, Any] | None, *, digest: str | None = None) -> None:
    """Inside a write transaction: write the record blob, and point ``(kind, key)`` at it.

    ``data=None`` is a tombstone. ``digest`` ties a signature or verification
    record to its artifact, so that removing the artifact drops it too.
    """
    store = index.record_store
    if store is None:
        return
    raw = encode(kind, key, data)
    sha = hashlib.sha256(raw).hexdigest()
    store.put_bytes(raw, sha)
    index.conn.execute(
        "insert into records (kind, key, blob, digest) values (?, ?, ?, ?) "
        "on conflict(kind, key) do update set blob = excluded.blob, digest = excluded.digest",
        (kind, key, sha, digest),
    )


def note_version(index: Index, name: str, version: str) -> None:
    """Record ``name:version`` as the index holds it now: files, inspection, lineage."""
    if index.record_store is None:
        return
    row = index.conn.execute(
        "select v.digest, v.description, v.created_at, a.inspection from versions v "
        "join artifacts a on a.digest = v.digest where v.name = ? and v.version = ?",
        (name, version),
    ).fetchone()
    digest, description, created_at, inspection = row
    files = index.conn.execute("select path, size, sha256 from files where digest = ?", (digest,)).fetchall()
    lineage = index.conn.execute(
        "select parent, relation, recipe, created_at from lineage where digest = ?", (digest,)
    ).fetchall()
    note(index, "version", f"{name}:{version}", {
        "name": name,
        "version": version,
        "digest": digest,
        "description": description,
        "created_at": created_at,
        "files": [list(f) for f in files],
        "inspection": json.loads(inspection),
        "lineage": [list(x) for x in lineage],
    })


def note_tag(index: Index, name: str, tag: str, version: str | None, ts: str | None = None) -> None:
    data = None if version is None else {"name": name, "tag": tag, "version": version, "updated_at": ts}
    note(index, "tag", f"{name}@{tag}", data)


def referenced(index: Index) -> set[str]:
    return {r[0] for r in index.conn.execute("select distinct blob from records")}


def drop_orphans(index: Index) -> None:
    """Signature and verification records of artifacts no version refers to any more."""
    index.conn.execute("delete from records where digest is not null and digest not in (select digest from versions)")


def missing_versions(index: Index) -> int:
    """Versions with no record blob (written before records existed): a rebuild could not restore them."""
    (n,) = index.conn.execute(
        "select count(*) from versions v where not exists "
        "(select 1 from records r where r.kind = 'version' and r.key = v.name || ':' || v.version)"
    ).fetchone()
    return int(n)


def write_all(index: Index) -> int:
    """Write the records an older registry lacks (``fsck --write-records``); return how many."""
    n = 0
    with index.write():
        have = {(k, key) for k, key in index.conn.execute("select kind, key from records")}
        for name, version in index.conn.execute("select name, version from versions order by id").fetchall():
            if ("version", f"{name}:{version}") not in have:
                note_version(index, name, version)
                n += 1
        for name, tag, version, ts in index.conn.execute("select name, tag, version, updated_at from tags").fetchall():
            if ("tag", f"{name}@{tag}") not in have:
                note_tag(index, name, tag, version, ts)
                n += 1
        for digest, blob, key_id, kind, ts in index.conn.execute(
            "select digest, blob, key_id, kind, created_at from signatures"
        ).fetchall():
            if ("signature", f"{digest}/{blob}") not in have:
                note_signature(index, digest, blob, key_id, kind, ts)
                n += 1
        n += _write_trust(index, have)
    return n


def note_signature(index: Index, digest: str, blob: str, key_id: str | None, kind: str, ts: str) -> None:
    data = {"digest": digest, "blob": blob, "key_id": key_id, "kind": kind, "created_at": ts}
    note(index, "signature", f"{digest}/{blob}", data, digest=digest)


def _write_trust(index: Index, have: set[tuple[str, str]]) -> int:
    from adapterhub.registry import trust_tables

    n = 0
    for k in trust_tables.keys(index):
        if ("key", k.key_id) not in have:
            trust_tables.note_key(index, k.key_id)
            n += 1
    for r in trust_tables.rules(index):
        if ("rule", f"{r.namespace} {r.rule}") not in have:
            trust_tables.note_rule(index, r.namespace, r.rule)
            n += 1
    for digest, report, ts in index.conn.execute("select digest, report, created_at from verifications").fetchall():
        key = f"{digest}/{hashlib.sha256(report.encode()).hexdigest()[:16]}"
        if ("verification", key) not in have:
            note(index, "verification", key, {"digest": digest, "report": json.loads(report), "created_at": ts},
                 digest=digest)
            n += 1
    return n
