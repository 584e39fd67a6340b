"""Signed provenance: which adapter and base a merged or quantized artifact came from.

When a conversion ends in the registry and the user has a signing key,
adapterhub signs an in-toto Statement v1 about the output:

- ``subject``: the output's name and artifact digest;
- ``predicateType``: ``https://adapterhub.dev/provenance/v1``;
- ``predicate``: ``operation``, ``inputs`` (each parent's digest and relation:
  ``adapter``, ``base`` or ``source``), the ``recipe`` recorded in the lineage
  (tool version, options, converter report) and ``verification`` (the metrics
  and verdict of a numerical verification; ``null`` until that exists).

The statement is wrapped in a DSSE envelope inside a Sigstore bundle v0.3,
exactly as model-signing wraps its own statements (same key hint, same PAE),
and stored as a ``provenance`` signature of the output digest.

``verify_chain`` walks the lineage up from an artifact and checks every
link. A derived link needs a stored attestation whose subject is the link's
digest, made by a trusted key, whose inputs equal the recorded lineage. A
source link (an adapter or base) is checked by its model signature. Each link
is ``verified``, ``unverifiable`` (not in this registry, or an unsigned source:
nothing vouches for it) or ``failed`` (no attestation, or one or every
signature fails: revoked, expired, untrusted, tampered). The chain's verdict
is ``failed`` if any link failed, else ``incomplete`` if any link is
unverifiable, else ``verified``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapterhub.errors import IntegrityError, TrustError, UsageError
from adapterhub.trust.signing import (
    MODEL_PREDICATE_TYPE,
    STATEMENT_TYPE,
    SignResult,
    dsse_verify,
    make_bundle,
    parse_bundle,
)

if TYPE_CHECKING:
    from adapterhub.registry import Registry

    from adapterhub.trust.keys import KeyInfo, PassphraseFn

PREDICATE_TYPE = "https://adapterhub.dev/provenance/v1"
DERIVED_KINDS = ("merged", "quantized")


def _inputs(reg: Registry, digest: str) -> list[dict[str, Any]]:
    return sorted(
        ({"relation": p["relation"], "digest": p["digest"]} for p in reg.index.parents(digest)),
        key=lambda d: (d["relation"], d["digest"]),
    )


def statement(reg: Registry, ref: str, verification: dict[str, Any] | None = None) -> dict[str, Any]:
    """The provenance statement for ``ref``, built from its recorded lineage."""
    info = reg.resolve(ref)
    parents = reg.index.parents(info.digest)
    if not parents:
        raise UsageError(f"{info.name}:{info.version} has no recorded lineage: there is no provenance to sign")
    recipe = parents[0]["recipe"] or {}
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": f"{info.name}:{info.version}", "digest": {"sha256": info.digest.removeprefix("sha256:")}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "operation": recipe.get("operation"),
            "inputs": [{**i, "refs": reg.index.refs_of(i["digest"])} for i in _inputs(reg, info.digest)],
            "recipe": recipe,
            # The newest `adapterhub verify` record when signed after verifying.
            "verification": verification,
        },
    }


def latest_verification(reg: Registry, digest: str) -> dict[str, Any] | None:
    """The newest ``adapterhub verify`` record of ``digest``: verdict, format, device,
    main metrics, bounds and failures (signing after verifying puts them in the statement)."""
    return reg.latest_verification(digest)


def sign(
    reg: Registry, ref: str, key: KeyInfo, *, passphrase: str | None = None, prompt: PassphraseFn | None = None
) -> SignResult:
    from adapterhub.trust.keys import load_private

    info = reg.resolve(ref)
    stmt = statement(reg, ref, latest_verification(reg, info.digest))
    raw = make_bundle(stmt, load_private(key, passphrase, prompt))
    b = parse_bundle(raw, "provenance attestation")
    blob = reg.add_signature(info.digest, raw, b.key_hint, kind="provenance")
    return SignResult(f"{info.name}:{info.version}", info.digest, b.key_hint, key.name, blob)


@dataclass
class Link:
    digest: str
    refs: list[str]
    relation: str | None
    kind: str | None
    derived: bool
    status: str  # "verified", "unverifiable" or "failed"
    provenance: str  # "verified" / what is wrong / "source: nothing to attest"
    signature: str  # model signature status
    key_id: str | None = None
    key_name: str | None = None
    depth: int = 0

    @property
    def ok(self) -> bool:
        """Nothing failed (an unverifiable link is ok here, but not verified)."""
        return self.status != "failed"

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


@dataclass
class ChainReport:
    ref: str
    digest: str
    links: list[Link] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No link failed. The chain may still be incomplete: see ``verdict``."""
        return all(link.ok for link in self.links)

    @property
    def verdict(self) -> str:
        """``verified``, ``incomplete`` (some link cannot be verified) or ``failed``."""
        statuses = {link.status for link in self.links}
        return "failed" if "failed" in statuses else "incomplete" if "unverifiable" in statuses else "verified"

    def _why(self, link: Link) -> str:
        why = link.provenance if link.derived or link.kind is None else f"signature: {link.signature}"
        return f"{(link.refs or [link.digest[:19]])[0]}: {why}"

    def problem(self) -> str:
        if not self.ok:
            bad = [self._why(link) for link in self.links if link.status == "failed"]
            return f"the provenance of {self.ref} does not verify: " + "; ".join(bad)
        gaps = [self._why(link) for link in self.links if link.status == "unverifiable"]
        return f"the provenance of {self.ref} is incomplete, these links cannot be verified: " + "; ".join(gaps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref, "digest": self.digest, "ok": self.ok, "verdict": self.verdict,
            "links": [link.to_dict() for link in self.links],
        }


def _scope_names(reg: Registry, digest: str, name: str | None) -> list[str]:
    """The names a trust decision about ``digest`` is made for.

    The name being acted on when there is one (the ref pulled or verified:
    a key trusted for another name holding the same content does not vouch
    for this one). For an input further up a chain, which is not acted on
    by name, every name that holds it in this registry."""
    if name is not None:
        return [name]
    return sorted({r.split(":")[0] for r in reg.index.refs_of(digest)})


def _trusted_pem(reg: Registry, key_id: str, names: list[str]) -> tuple[bytes, str | None]:
    from adapterhub.trust import policy

    tk = policy.lookup(reg, key_id)
    if tk is None:
        raise TrustError(f"signed by key {key_id[:16]}…, which is not trusted")
    problems = [tk.problem(policy.namespace_of(n)) for n in names] or [tk.problem(None)]
    if all(problems):
        raise TrustError(problems[0])
    return tk.public_key.encode(), tk.name


def check_attestation(reg: Registry, digest: str, raw: bytes, name: str | None = None) -> tuple[str, str | None]:
    """Verify one provenance bundle for ``digest`` as ``name`` (see ``_scope_names``);
    returns (key id, key name) or raises TrustError."""
    b = parse_bundle(raw, "provenance attestation")
    if b.predicate_type != PREDICATE_TYPE:
        raise TrustError(f"not a provenance attestation (predicate type {b.predicate_type})")
    if b.subject_digest != digest:
        raise TrustError(f"the attestation is for another artifact ({b.subject_digest[:19]}…)")
    pem, key_name = _trusted_pem(reg, b.key_hint, _scope_names(reg, digest, name))
    dsse_verify(b, pem, "provenance attestation")
    pred = b.statement["predicate"]
    claimed = sorted(
        ({"relation": i.get("relation"), "digest": i.get("digest")} for i in pred.get("inputs") or [] if isinstance(i, dict)),
        key=lambda d: (str(d["relation"]), str(d["digest"])),
    )
    if claimed != _inputs(reg, digest):
        raise TrustError("the attested inputs differ from the lineage recorded in the registry")
    return b.key_hint, key_name


def verify_link(reg: Registry, digest: str, name: str | None = None) -> tuple[bool, str, str | None, str | None]:
    rows = reg.signatures(digest, kind="provenance")
    if not rows:
        return False, "no signed provenance", None, None
    reasons = []
    for row in rows:
        try:
            kid, key_name = check_attestation(reg, digest, reg.read_signature(row["blob"]), name)
            return True, "verified", kid, key_name
        except (TrustError, IntegrityError) as e:
            reasons.append(str(e))
    return False, "; ".join(dict.fromkeys(reasons)), rows[0]["key_id"], None


def signature_status(reg: Registry, digest: str, name: str | None = None) -> str:
    """The model signature against the index (DSSE + trust + file list); the
    bytes themselves are re-hashed by pull, fsck and verify-signature."""
    return signature_check(reg, digest, name)[1]


def signature_check(reg: Registry, digest: str, name: str | None = None) -> tuple[str, str]:
    """(``verified`` | ``unverifiable`` | ``failed``, description) of the model signatures.

    Unsigned is unverifiable; signatures of which none verifies (a revoked,
    expired, untrusted or out-of-scope key, a bad envelope) are a failure."""
    rows = reg.signatures(digest, kind="model")
    if not rows:
        return "unverifiable", "unsigned"
    files = {f.path: f.sha256 for f in reg.index.files(digest)}
    reasons = []
    for row in rows:
        try:
            b = parse_bundle(reg.read_signature(row["blob"]))
            if b.predicate_type != MODEL_PREDICATE_TYPE or b.subject_digest != digest:
                raise TrustError("the signature is for another artifact")
            pem, key_name = _trusted_pem(reg, b.key_hint, _scope_names(reg, digest, name))
            dsse_verify(b, pem)
            res = {r.get("name"): r.get("digest") for r in b.statement["predicate"].get("resources", [])}
            if res != files:
                raise TrustError("the signed file list differs from the registry's")
            return "verified", f"verified ({key_name or b.key_hint[:16]})"
        except (TrustError, IntegrityError) as e:
            reasons.append(str(e))
    return "failed", "; ".join(dict.fromkeys(reasons))


def is_derived(reg: Registry, digest: str) -> bool:
    kind = reg.index.kind_of(digest)
    return bool(reg.index.parents(digest)) or kind in DERIVED_KINDS


def verify_chain(reg: Registry, ref: str, *, max_depth: int = 16) -> ChainReport:
    info = reg.resolve(ref)
    report = ChainReport(f"{info.name}:{info.version}", info.digest)
    seen: set[str] = set()

    def visit(digest: str, relation: str | None, depth: int) -> None:
        # The artifact acted on is judged as the name it was asked for; its inputs by their own names.
        name = info.name if depth == 0 else None
        refs = reg.index.refs_of(digest)
        kind = reg.index.kind_of(digest)
        if kind is None:
            # Only a claim of the child's attestation: nothing here can check it.
            report.links.append(Link(digest, [], relation, None, False, "unverifiable", "not in this registry", "-", depth=depth))
            return
        derived = is_derived(reg, digest)
        sig_status, sig = signature_check(reg, digest, name)
        if derived:
            ok, why, kid, key_name = verify_link(reg, digest, name)
            status = "verified" if ok else "failed"
        else:
            # A source has nothing to attest: its own signature is what vouches for it.
            why, kid, key_name, status = "source: nothing to attest", None, None, sig_status
        report.links.append(Link(digest, refs, relation, kind, derived, status, why, sig, kid, key_name, depth))
        if digest in seen or depth >= max_depth:
            return
        seen.add(digest)
        for p in reg.index.parents(digest):
            visit(p["digest"], p["relation"], depth + 1)

    visit(info.digest, None, 0)
    return report
