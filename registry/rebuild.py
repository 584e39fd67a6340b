"""Rebuilding a lost or damaged ``index.db`` from the record blobs in the store.

``adapterhub fsck --rebuild-index`` moves the old index aside (a damaged
file is kept as ``index.db.damaged-<time>``), scans the blob store for
record blobs (``$ADAPTERHUB_HOME/records/``, registry/records.py), keeps the newest state of each
``(kind, key)``, and replays them into a fresh index: versions (with their
files, inspection, lineage and original times), tags, signatures,
verifications, trusted keys and policy rules. A version whose file blobs are
missing is not restored, and the report says so.

Also here: the check that refuses to treat an empty or missing index beside a
non-empty blob store as a new registry (``gc`` would then delete every blob).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import IntegrityError
from adapterhub.registry.dbconn import REBUILD_HINT
from adapterhub.registry.records import HEAD, MAX_RECORD_BYTES

if TYPE_CHECKING:
    from adapterhub.registry.blobs import BlobStore
    from adapterhub.registry.index import Index
    from adapterhub.registry.registry import Registry


@dataclass
class RebuildReport:
    kept_aside: str | None = None  # where the old index went
    restored: dict[str, int] = field(default_factory=dict)  # kind -> count
    skipped: list[str] = field(default_factory=list)  # what could not be restored, and why

    def to_dict(self) -> dict[str, Any]:
        return {"kept_aside": self.kept_aside, "restored": self.restored, "skipped": self.skipped}


def index_lost(home: Path, blobs: BlobStore) -> bool:
    """True when ``index.db`` is missing or empty while the blob store holds blobs (or records)."""
    db = home / "index.db"
    for p in (db, db.with_name(db.name + "-wal")):
        try:
            if os.stat(p).st_size > 0:
                return False
        except FileNotFoundError:
            pass
    from adapterhub.registry.blobs import BlobStore

    return next(iter(blobs), None) is not None or next(iter(BlobStore(home / "records")), None) is not None


def lost_error(home: Path) -> IntegrityError:
    db = home / "index.db"
    state = "is empty" if db.exists() else "is missing"
    return IntegrityError(
        f"the registry index {db} {state}, but the blob store beside it holds data: this is not a new registry",
        hint=REBUILD_HINT,
    )


def set_aside(db: Path) -> str | None:
    """Move a damaged index (and its WAL) aside; remove an empty one. Returns where it went."""
    kept = None
    if db.exists() and db.stat().st_size > 0:
        dest = db.with_name(f"{db.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(db, dest)
        kept = str(dest)
    else:
        db.unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        side = db.with_name(db.name + suffix)
        if side.exists():
            if kept is not None and side.stat().st_size > 0:
                os.replace(side, kept + suffix)
            else:
                side.unlink()
    return kept


def scan(blobs: BlobStore) -> dict[tuple[str, str], tuple[int, str, Any]]:
    """The newest record of each (kind, key) in the store: (seq, blob sha256, data)."""
    newest: dict[tuple[str, str], tuple[int, str, Any]] = {}
    for b in blobs:
        if b.size > MAX_RECORD_BYTES or b.size < len(HEAD):
            continue
        with open(b.path, "rb") as fh:
            if fh.read(len(HEAD)) != HEAD:
                continue
            raw = HEAD + fh.read()
        if hashlib.sha256(raw).hexdigest() != b.sha256:
            continue  # a damaged record is fsck's to report, not a rebuild's to trust
        try:
            rec = json.loads(raw)
            kind, key, seq = rec["kind"], rec["key"], int(rec["seq"])
        except (ValueError, KeyError, TypeError):
            continue
        if (kind, key) not in newest or newest[(kind, key)][0] < seq:
            newest[(kind, key)] = (seq, b.sha256, rec.get("data"))
    return newest


def rebuild(reg: Registry) -> RebuildReport:
    """Replay the record blobs into a fresh index (the caller holds the exclusive lock)."""
    from adapterhub.registry.index import Index

    report = RebuildReport()
    reg.index.close()
    report.kept_aside = set_aside(reg.home / "index.db")
    index = Index(reg.home / "index.db")
    reg.index = index
    found = scan(reg.records)
    live = {k: v for k, v in found.items() if v[2] is not None}
    order = sorted(live.items(), key=lambda kv: kv[1][0])
    restored_versions = _restore_versions(index, reg.blobs, [kv for kv in order if kv[0][0] == "version"], report)
    with index.write():
        for (kind, key), (_seq, sha, data) in order:
            if kind == "version":
                if key not in restored_versions:
                    continue
            elif not _restore_one(index, kind, data, restored_versions, report):
                continue
            index.conn.execute(
                "insert into records (kind, key, blob, digest) values (?, ?, ?, ?)",
                (kind, key, sha, data.get("digest") if kind in ("signature", "verification") else None),
            )
            report.restored[kind] = report.restored.get(kind, 0) + 1
        # Tombstones stay referenced, so that the next rebuild does not bring back what was removed.
        for (kind, key), (_seq, sha, data) in found.items():
            if data is None:
                index.conn.execute("insert into records (kind, key, blob) values (?, ?, ?)", (kind, key, sha))
    index.record_store = reg.records
    return report


def _restore_versions(index: Index, blobs: BlobStore, items: list, report: RebuildReport) -> set[str]:
    from adapterhub.artifact import Inspection
    from adapterhub.manifest import FileEntry, Manifest

    done: set[str] = set()
    for (_kind, key), (_seq, _sha, d) in items:
        missing = [p for p, size, sha in d["files"] if not blobs.has(sha, size)]
        if missing:
            report.skipped.append(f"{key}: blobs of {', '.join(missing[:3])} are missing")
            continue
        manifest = Manifest.from_entries(FileEntry(p, size, sha) for p, size, sha in d["files"])
        if manifest.digest != d["digest"]:
            report.skipped.append(f"{key}: its files do not add up to its digest")
            continue
        index.add_version(
            d["name"], d["version"], manifest, Inspection.from_dict(d["inspection"]),
            description=d.get("description"), created_at=d.get("created_at"),
        )
        with index.write():
            for parent, relation, recipe, ts in d.get("lineage") or []:
                index.conn.execute(
                    "insert or replace into lineage (digest, parent, relation, recipe, created_at) values (?, ?, ?, ?, ?)",
                    (d["digest"], parent, relation, recipe, ts),
                )
        done.add(key)
    return done


def _restore_one(index: Index, kind: str, d: dict[str, Any], versions: set[str], report: RebuildReport) -> bool:
    """Insert one tag, signature, verification, key or rule row; False when it has nothing to attach to."""
    c = index.conn
    if kind == "tag":
        if f"{d['name']}:{d['version']}" not in versions:
            return False
        c.execute(
            "insert or replace into tags (name, tag, version, updated_at) values (?, ?, ?, ?)",
            (d["name"], d["tag"], d["version"], d.get("updated_at") or ""),
        )
    elif kind in ("signature", "verification"):
        if not index.has_artifact(d["digest"]):
            return False
        if kind == "signature":
            c.execute(
                "insert or ignore into signatures (digest, blob, key_id, kind, created_at) values (?, ?, ?, ?, ?)",
                (d["digest"], d["blob"], d.get("key_id"), d.get("kind") or "model", d.get("created_at") or ""),
            )
        else:
            rep = d["report"]
            c.execute(
                "insert into verifications (digest, verdict, format, device, report, created_at) values (?, ?, ?, ?, ?, ?)",
                (d["digest"], rep.get("verdict"), rep.get("format"), rep.get("device"),
                 json.dumps(rep, sort_keys=True, default=str), d.get("created_at") or ""),
            )
    elif kind == "key":
        c.execute(
            "insert or replace into trusted_keys (key_id, name, public_key, scopes, not_after, added_at, revoked_at,"
            " revoked_reason) values (?, ?, ?, ?, ?, ?, ?, ?)",
            (d["key_id"], d.get("name"), d["public_key"], json.dumps(sorted(d.get("scopes") or [])),
             d.get("not_after"), d.get("added_at") or "", d.get("revoked_at"), d.get("revoked_reason")),
        )
    elif kind == "rule":
        c.execute(
            "insert or ignore into policy (namespace, rule, created_at) values (?, ?, ?)",
            (d["namespace"], d["rule"], d.get("created_at") or ""),
        )
    else:
        report.skipped.append(f"unknown record kind {kind!r}")
        return False
    return True
