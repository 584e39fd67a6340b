"""The trust gate for remote imports: policy, signatures and provenance, decided
here and handed to ``adapterhub.registry.remotes`` (which never imports trust code).

>>> from adapterhub.trust.remote_gate import remote_gate        # doctest: +SKIP
>>> remotes.pull_remote(reg, ep, gate=remote_gate(reg, require_signature=True))
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import TrustError
from adapterhub.registry.remotes.gate import Bundle, SignatureCheck

if TYPE_CHECKING:
    from adapterhub.registry import Registry
    from adapterhub.registry.index import VersionInfo


class RemoteGate:
    """:class:`adapterhub.registry.remotes.gate.TrustGate` over this registry's keys and policy.

    ``require_signature`` / ``require_provenance`` add those rules to the
    ones the policy sets for the local name (``--require-signature``).
    """

    def __init__(self, reg: Registry, *, require_signature: bool = False, require_provenance: bool = False) -> None:
        self.reg = reg
        self.require_signature = require_signature
        self.require_provenance = require_provenance

    def requires(self, name: str) -> tuple[bool, bool]:
        from adapterhub.trust import policy

        rules = policy.required(self.reg, name)
        return (self.require_signature or "require-signature" in rules,
                self.require_provenance or "require-provenance" in rules)

    def read_bundle(self, raw: bytes, what: str = "signature") -> Bundle:
        from adapterhub.trust.signing import parse_bundle

        b = parse_bundle(raw, what)
        return Bundle(b.subject_digest, b.key_hint, b.predicate_type)

    def check_signature(self, raw: bytes, root: Path, digest: str, name: str) -> SignatureCheck:
        from adapterhub.trust import policy
        from adapterhub.trust.signing import check_bundle

        c = check_bundle(raw, root, reg=self.reg, expected_digest=digest, namespace=policy.namespace_of(name))
        return SignatureCheck(c.ok, c.reason, c.key_id, c.key_name)

    def check_provenance(self, raw: bytes, digest: str, name: str, lineage: list[dict[str, Any]], *,
                         trusted: bool) -> str:
        from adapterhub.trust import policy
        from adapterhub.trust.provenance import PREDICATE_TYPE
        from adapterhub.trust.signing import dsse_verify, parse_bundle

        b = parse_bundle(raw, "provenance attestation")
        if b.predicate_type != PREDICATE_TYPE:
            raise TrustError(f"not a provenance attestation (predicate type {b.predicate_type})")
        if b.subject_digest != digest:
            raise TrustError(f"the attestation is for another artifact ({b.subject_digest[:19]}…)")
        inputs = b.statement["predicate"].get("inputs") or []
        claimed = sorted((str(i.get("relation")), str(i.get("digest"))) for i in inputs if isinstance(i, dict))
        recorded = sorted((str(r.get("relation")), str(r.get("parent"))) for r in lineage)
        if claimed != recorded:
            raise TrustError("the attested inputs differ from the lineage the artifact records")
        if trusted:
            tk = policy.lookup(self.reg, b.key_hint)
            if tk is None:
                raise TrustError(f"signed by key {b.key_hint[:16]}…, which is not trusted")
            problem = tk.problem(policy.namespace_of(name))
            if problem:
                raise TrustError(problem)
            dsse_verify(b, tk.public_key.encode(), "provenance attestation")
        return b.key_hint

    def check_parents(self, name: str, lineage: list[dict[str, Any]], where: str) -> None:
        from adapterhub.trust.provenance import verify_chain

        for r in lineage:
            refs = self.reg.index.refs_of(str(r.get("parent")))
            if refs:
                chain = verify_chain(self.reg, refs[0])
                if not chain.ok:
                    raise TrustError(f"{where}: {chain.problem()}", hint="`adapterhub provenance REF` shows the chain")

    def preferred_signature(self, info: VersionInfo) -> str | None:
        from adapterhub.trust.gate import _preferred_signature

        return _preferred_signature(self.reg, info)


def remote_gate(reg: Registry, *, require_signature: bool = False, require_provenance: bool = False) -> RemoteGate:
    """The gate a remote push, pull or search is given (see :class:`RemoteGate`)."""
    return RemoteGate(reg, require_signature=require_signature, require_provenance=require_provenance)
