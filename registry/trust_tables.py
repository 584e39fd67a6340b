"""The trust tables: ``trusted_keys`` and ``policy``.

The registry stores them; ``adapterhub.trust.policy`` decides what they mean.
A key row is keyed by its key id (the sha256 hex of its PEM, model-signing's
key hint); a policy row is a (namespace, rule) pair, namespace ``*`` meaning
every namespace.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from adapterhub.registry import records

if TYPE_CHECKING:
    from adapterhub.registry.index import Index

_COLS = "key_id, name, public_key, scopes, not_after, added_at, revoked_at, revoked_reason"


@dataclass(frozen=True)
class KeyRow:
    key_id: str
    name: str | None
    public_key: str  # PEM
    scopes: tuple[str, ...]  # namespaces; empty: every namespace
    not_after: str | None
    added_at: str
    revoked_at: str | None
    revoked_reason: str | None


@dataclass(frozen=True)
class RuleRow:
    namespace: str
    rule: str
    created_at: str


def _key(r: tuple) -> KeyRow:
    return KeyRow(r[0], r[1], r[2], tuple(json.loads(r[3] or "[]")), r[4], r[5], r[6], r[7])


def keys(index: Index) -> list[KeyRow]:
    """Every key listed, trusted or revoked, oldest first."""
    return [_key(r) for r in index.conn.execute(f"select {_COLS} from trusted_keys order by added_at, key_id")]


def key(index: Index, key_id: str) -> KeyRow | None:
    r = index.conn.execute(f"select {_COLS} from trusted_keys where key_id = ?", (key_id,)).fetchone()
    return _key(r) if r else None


def put_key(
    index: Index, key_id: str, public_key: str, *, name: str | None, scopes: Iterable[str], not_after: str | None
) -> None:
    """Trust a key, or update a listed one (its name when given, scopes, expiry), clearing a revocation."""
    from adapterhub.registry.index import now

    with index.write():
        index.conn.execute(
            f"insert into trusted_keys ({_COLS}) values (?, ?, ?, ?, ?, ?, null, null) "
            "on conflict(key_id) do update set name = coalesce(excluded.name, trusted_keys.name), "
            "scopes = excluded.scopes, not_after = excluded.not_after, revoked_at = null, revoked_reason = null",
            (key_id, name, public_key, json.dumps(sorted(scopes)), not_after, now()),
        )
        note_key(index, key_id)


def delete_key(index: Index, key_id: str) -> None:
    with index.write():
        index.conn.execute("delete from trusted_keys where key_id = ?", (key_id,))
        records.note(index, "key", key_id, None)


def revoke_key(index: Index, key_id: str, reason: str | None) -> None:
    from adapterhub.registry.index import now

    with index.write():
        index.conn.execute(
            "update trusted_keys set revoked_at = ?, revoked_reason = ? where key_id = ?", (now(), reason, key_id)
        )
        note_key(index, key_id)


def add_rule(index: Index, namespace: str, rule: str) -> None:
    """Add a policy rule (a no-op when it is listed already)."""
    from adapterhub.registry.index import now

    with index.write():
        index.conn.execute(
            "insert into policy (namespace, rule, created_at) values (?, ?, ?) on conflict(namespace, rule) do nothing",
            (namespace, rule, now()),
        )
        note_rule(index, namespace, rule)


def remove_rule(index: Index, namespace: str, rule: str) -> bool:
    """Remove a policy rule; False when there was none."""
    with index.write():
        cur = index.conn.execute("delete from policy where namespace = ? and rule = ?", (namespace, rule))
        if cur.rowcount > 0:
            records.note(index, "rule", f"{namespace} {rule}", None)
        return cur.rowcount > 0


def rules(index: Index) -> list[RuleRow]:
    return [
        RuleRow(*r)
        for r in index.conn.execute("select namespace, rule, created_at from policy order by namespace, rule")
    ]


def note_key(index: Index, key_id: str) -> None:
    """Write the key's current row as a record blob (registry/records.py)."""
    k = key(index, key_id)
    if k is not None:
        records.note(index, "key", key_id, asdict(k))


def note_rule(index: Index, namespace: str, rule: str) -> None:
    row = index.conn.execute(
        "select created_at from policy where namespace = ? and rule = ?", (namespace, rule)
    ).fetchone()
    if row is not None:
        records.note(index, "rule", f"{namespace} {rule}", {"namespace": namespace, "rule": rule, "created_at": row[0]})


def rules_for(index: Index, scopes: Iterable[str]) -> set[str]:
    """The rules listed under any of ``scopes`` (namespaces, ``*``, or names)."""
    scopes = sorted(set(scopes))
    if not scopes:
        return set()
    marks = ", ".join("?" * len(scopes))
    return {r for (r,) in index.conn.execute(f"select rule from policy where namespace in ({marks})", scopes)}
