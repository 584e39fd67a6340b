"""The trust gate a remote import is given by its caller.

Remotes move bytes and check what a registry or the Hub claims; they do not
decide what is trusted. Signatures, keys, policy and provenance live in
``adapterhub.trust``, a floor above the registry, so an import receives those
decisions as an object, the way ``Registry.pull(on_staged=...)`` receives a
callback. ``adapterhub.trust.gate.remote_gate(reg, ...)`` builds the one the
CLI uses; a test or another tool may pass its own.

Every method that refuses raises :class:`~adapterhub.errors.TrustError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from adapterhub.registry.index import VersionInfo

# Kinds of artifact made from others (adapterhub.trust.provenance.DERIVED_KINDS).
DERIVED_KINDS = ("merged", "quantized")


@dataclass(frozen=True)
class Bundle:
    """What an import needs to know of a signature bundle before it checks it."""

    subject_digest: str
    key_id: str
    predicate_type: str | None = None


@dataclass(frozen=True)
class SignatureCheck:
    """The outcome of checking one signature bundle against staged files."""

    ok: bool
    reason: str = ""
    key_id: str | None = None
    key_name: str | None = None


class TrustGate(Protocol):
    """The decisions a remote import asks for, all about the *local* name it imports under."""

    def requires(self, name: str) -> tuple[bool, bool]:
        """(signature required, provenance required) for importing under ``name``."""
        ...

    def read_bundle(self, raw: bytes, what: str = "signature") -> Bundle:
        """Parse a signature bundle (no key check); TrustError when it is not one."""
        ...

    def check_signature(self, raw: bytes, root: Path, digest: str, name: str) -> SignatureCheck:
        """Does ``raw`` sign the files under ``root`` (artifact ``digest``) with a key trusted for ``name``?"""
        ...

    def check_provenance(self, raw: bytes, digest: str, name: str, lineage: list[dict[str, Any]], *,
                         trusted: bool) -> str:
        """Check a provenance bundle for ``digest`` whose inputs must be ``lineage``; returns its key id.

        Always its structure, subject and inputs; with ``trusted``, also a
        signature by a key trusted for ``name``.
        """
        ...

    def check_parents(self, name: str, lineage: list[dict[str, Any]], where: str) -> None:
        """The provenance chain of every parent already in this registry verifies (for ``name``)."""
        ...

    def preferred_signature(self, info: VersionInfo) -> str | None:
        """Of a local version's signatures, the blob to publish (one by a trusted key first)."""
        ...
