"""Trusted keys, revocation and policy, stored in the registry index.

A trusted key is a public key (by key id, the sha256 of its PEM) with an
optional name, optional scopes (namespaces it may sign for; none means all),
an optional ``not_after`` (signatures fail from then on) and, once revoked,
``revoked_at``. A revoked key stays listed so that checks can say *revoked*
rather than *unknown*; ``trust rm`` forgets a key altogether. Either way its
signatures fail from then on.

Policy rules, per namespace (``*`` for every namespace):

- ``require-signature``: pull and conversions refuse an artifact without a
  model-signing signature by a trusted, unrevoked, unexpired key in scope.
- ``require-provenance``: pull and conversions refuse a merged or quantized
  artifact in whose provenance chain a link fails (see ``adapterhub.provenance``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterhub.errors import (
    ConflictError,
    InvalidArtifactError,
    NotFoundError,
    UsageError,
)
from adapterhub.registry import trust_tables

if TYPE_CHECKING:
    from adapterhub.registry import Registry
    from adapterhub.registry.trust_tables import KeyRow

RULES = ("require-signature", "require-provenance")
ALL = "*"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def namespace_of(name: str) -> str:
    """``team/qa-lora`` -> ``team``; a name without a namespace -> ``""``."""
    return name.split("/", 1)[0] if "/" in name else ""


def parse_time(text: str) -> str:
    """``2026-01-31`` or ``2026-01-31T12:00:00Z`` -> canonical UTC ISO 8601."""
    from datetime import datetime, timezone

    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"bad date {text!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_expiry(text: str) -> str:
    """``parse_time`` for a key's expiry, which must lie in the future: a past
    one would make the key fail at once, which is what ``keys revoke`` is for."""
    when = parse_time(text)
    if when <= now():
        raise UsageError(
            f"--expires {text} is not in the future",
            hint="to stop trusting a key now, use `adapterhub keys revoke KEY` or `adapterhub trust rm KEY`",
        )
    return when


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    name: str | None
    public_key: str  # PEM
    scopes: tuple[str, ...]
    not_after: str | None
    added_at: str
    revoked_at: str | None
    revoked_reason: str | None

    def problem(self, namespace: str | None, at: str | None = None) -> str | None:
        """Why this key may not vouch for an artifact in ``namespace`` now; None if it may."""
        label = f"key {self.name or self.key_id[:16]} ({self.key_id[:16]}…)"
        if self.revoked_at:
            why = f": {self.revoked_reason}" if self.revoked_reason else ""
            return f"{label} was revoked on {self.revoked_at}{why}"
        if self.not_after and (at or now()) >= self.not_after:
            return f"{label} expired on {self.not_after}"
        if self.scopes and namespace not in self.scopes:
            where = f"namespace {namespace!r}" if namespace else "artifacts outside a namespace"
            return f"{label} is trusted only for {', '.join(self.scopes)}, not for {where}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "name": self.name,
            "scopes": list(self.scopes),
            "not_after": self.not_after,
            "added_at": self.added_at,
            "revoked_at": self.revoked_at,
            "revoked_reason": self.revoked_reason,
        }


def _row(r: KeyRow) -> TrustedKey:
    return TrustedKey(r.key_id, r.name, r.public_key, r.scopes, r.not_after, r.added_at, r.revoked_at, r.revoked_reason)


def add(
    reg: Registry,
    public_pem: bytes,
    *,
    name: str | None = None,
    scopes: tuple[str, ...] = (),
    not_after: str | None = None,
    replace: bool = False,
) -> TrustedKey:
    """Trust a public key. A key already listed (trusted or revoked) is changed
    only with ``replace=True``, which sets its name (when given), scopes and
    expiry and clears a revocation; re-adding it unchanged is a no-op."""
    from adapterhub.trust.keys import key_id_of_pem, load_public_pem
    from adapterhub.refs import check_name

    pem = load_public_pem(public_pem)
    for s in scopes:
        if "/" in s:
            raise InvalidArtifactError(f"scope {s!r} is not a namespace (the part of a name before '/')")
        check_name(s)
    kid = key_id_of_pem(pem)
    old = lookup(reg, kid)
    if old is not None and not replace:
        changes = _changes(old, name, tuple(sorted(scopes)), not_after)
        if not changes:
            return old
        label = f"key {old.name or kid[:16]} ({kid[:16]}…)"
        state = f"was revoked on {old.revoked_at}" if old.revoked_at else "is already trusted"
        raise ConflictError(
            f"{label} {state}; adding it again would change {', '.join(changes)}",
            hint="pass --replace to update it (`adapterhub trust ls` shows it now)",
        )
    trust_tables.put_key(reg.index, kid, pem.decode(), name=name, scopes=scopes, not_after=not_after)
    return get(reg, kid)


def _changes(old: TrustedKey, name: str | None, scopes: tuple[str, ...], not_after: str | None) -> list[str]:
    """What ``add`` would change on an existing key, in words."""
    out = []
    if name is not None and name != old.name:
        out.append(f"its name from {old.name!r} to {name!r}")
    if scopes != tuple(sorted(old.scopes)):
        out.append(f"its scope from {','.join(old.scopes) or 'all'} to {','.join(scopes) or 'all'}")
    if not_after != old.not_after:
        out.append(f"its expiry from {old.not_after or 'never'} to {not_after or 'never'}")
    if old.revoked_at:
        out.append("its revocation (it would be trusted again)")
    return out


def ls(reg: Registry) -> list[TrustedKey]:
    return [_row(r) for r in trust_tables.keys(reg.index)]


def lookup(reg: Registry, key_id: str) -> TrustedKey | None:
    r = trust_tables.key(reg.index, key_id)
    return _row(r) if r else None


def get(reg: Registry, name_or_id: str) -> TrustedKey:
    """By key id, unique key-id prefix (8+ hex), trusted-key name, or local key name."""
    ident = name_or_id.removeprefix("sha256:")
    keys = ls(reg)
    hits = [k for k in keys if k.key_id == ident or k.name == name_or_id]
    if not hits and len(ident) >= 8:
        hits = [k for k in keys if k.key_id.startswith(ident)]
    if not hits:
        from adapterhub.trust import keys as keystore

        try:
            local = keystore.get(name_or_id)
        except NotFoundError:
            local = None
        if local is not None:
            hits = [k for k in keys if k.key_id == local.key_id]
    if len(hits) > 1:
        raise ConflictError(f"{name_or_id!r} names {len(hits)} trusted keys; use the key id")
    if not hits:
        raise NotFoundError(f"no trusted key {name_or_id!r}", hint="`adapterhub trust ls` lists trusted keys")
    return hits[0]


def remove(reg: Registry, name_or_id: str) -> TrustedKey:
    k = get(reg, name_or_id)
    trust_tables.delete_key(reg.index, k.key_id)
    return k


def revoke(reg: Registry, name_or_id: str, reason: str | None = None, *, public_pem: bytes | None = None) -> TrustedKey:
    """Mark a key revoked; its signatures fail from now on. An untrusted key is
    recorded as revoked too (given ``public_pem``), so that trusting it later
    is a deliberate act."""
    try:
        k = get(reg, name_or_id)
    except NotFoundError:
        if public_pem is None:
            raise
        k = add(reg, public_pem, name=name_or_id)
    trust_tables.revoke_key(reg.index, k.key_id, reason)
    return get(reg, k.key_id)


# -- policy ---------------------------------------------------------------------


def _check_rule(rule: str) -> str:
    if rule not in RULES:
        raise UsageError(f"unknown policy rule {rule!r}: use one of {', '.join(RULES)}")
    return rule


def check_namespace(namespace: str | None) -> str:
    """A policy scope: ``*`` (or None) for every namespace, else one namespace,
    the part of a name before '/'. Anything else is refused when the rule is
    set, so that no listed rule goes unenforced."""
    ns = ALL if namespace is None else namespace
    if ns == ALL:
        return ns
    from adapterhub.errors import InvalidNameError
    from adapterhub.refs import check_name

    if "/" in ns:
        raise UsageError(
            f"{ns!r} is a full name: a policy rule applies to a namespace (the part before '/')",
            hint=f"--namespace {ns.split('/')[0]}" if ns.split("/")[0] else None,
        )
    try:
        check_name(ns)
    except InvalidNameError as e:
        raise UsageError(f"{ns!r} is not a namespace: {e}") from None
    return ns


def set_rule(reg: Registry, rule: str, namespace: str | None = None) -> dict[str, str]:
    ns = check_namespace(namespace)
    trust_tables.add_rule(reg.index, ns, _check_rule(rule))
    return {"namespace": ns, "rule": rule}


def unset_rule(reg: Registry, rule: str, namespace: str | None = None) -> dict[str, str]:
    ns = ALL if namespace is None else namespace
    if not trust_tables.remove_rule(reg.index, ns, _check_rule(rule)):
        raise NotFoundError(f"no policy rule {rule} for {'every namespace' if ns == ALL else ns}")
    return {"namespace": ns, "rule": rule}


def rules(reg: Registry) -> list[dict[str, str]]:
    return [
        {"namespace": r.namespace, "rule": r.rule, "created_at": r.created_at}
        for r in trust_tables.rules(reg.index)
    ]


def required(reg: Registry, name: str) -> set[str]:
    """The rules that apply to the artifact name ``name``: every-namespace rules,
    its namespace's, and (for rows written before scopes were checked when set)
    any rule listed under the full name itself, so that every listed rule holds."""
    ns = namespace_of(name)
    return trust_tables.rules_for(reg.index, (ALL, ns or ALL, name))
