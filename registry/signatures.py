"""The ``signatures`` table: signed statements about an artifact, stored as blobs.

Each row ties an artifact digest to a bundle in the blob store, with the key
id that signed it and its kind: ``model`` (an OpenSSF model-signing bundle
over the files) or ``provenance`` (an adapterhub provenance attestation).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterhub.errors import IntegrityError, NotFoundError
from adapterhub.registry import records

if TYPE_CHECKING:
    from adapterhub.registry.index import Index
    from adapterhub.registry.registry import Registry


@dataclass(frozen=True)
class SignatureRow:
    blob: str  # sha256 hex of the bundle in the blob store
    key_id: str | None
    kind: str  # model | provenance
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        return {"blob": self.blob, "key_id": self.key_id, "kind": self.kind, "created_at": self.created_at}


def store(reg: Registry, digest: str, bundle: bytes, key_id: str, kind: str = "model") -> str:
    """Store ``bundle`` as a blob tied to ``digest``; return the blob's sha256 hex."""
    from adapterhub.registry.index import now

    sha = hashlib.sha256(bundle).hexdigest()
    with reg._lock(exclusive=False):
        reg.blobs.put_bytes(bundle, sha)
        ts = now()
        with reg.index.write():
            if not reg.index.has_artifact(digest):
                raise NotFoundError(f"unknown artifact {digest}")
            reg.index.conn.execute(
                "insert into signatures (digest, blob, key_id, kind, created_at) values (?, ?, ?, ?, ?) "
                "on conflict(digest, blob) do nothing",
                (digest, sha, key_id, kind, ts),
            )
            records.note_signature(reg.index, digest, sha, key_id, kind, ts)
    return sha


def rows(index: Index, digest: str, kind: str | None = None, *, newest_first: bool = True) -> list[SignatureRow]:
    """Signature rows of ``digest`` (of one ``kind``, when given)."""
    sql = "select blob, key_id, kind, created_at from signatures where digest = ?"
    args: list[Any] = [digest]
    if kind is not None:
        sql += " and kind = ?"
        args.append(kind)
    sql += " order by created_at desc, rowid desc" if newest_first else " order by created_at, rowid"
    return [SignatureRow(*r) for r in index.conn.execute(sql, args).fetchall()]


def blobs(index: Index) -> dict[str, list[str]]:
    """Every signature blob, with the digests it is about."""
    out: dict[str, list[str]] = {}
    for blob, digest in index.conn.execute("select blob, digest from signatures"):
        out.setdefault(blob, []).append(digest)
    return out


def read(reg: Registry, blob: str) -> bytes:
    """A signature bundle's bytes, re-hashed: a tampered blob is an IntegrityError."""
    p = reg.blobs.path(blob)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"signature blob {blob[:12]}… is missing from the registry", hint="run `adapterhub fsck`") from None
    if hashlib.sha256(data).hexdigest() != blob:
        raise IntegrityError(
            f"signature blob {blob[:12]}… is corrupt: it does not match its sha256",
            hint="the registry store is damaged; run `adapterhub fsck`",
        )
    return data
