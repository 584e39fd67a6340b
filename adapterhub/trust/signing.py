"""Signing and verifying artifacts in the OpenSSF model-signing format.

A signature is a Sigstore bundle v0.3 (JSON) holding a DSSE envelope around an
in-toto Statement v1 whose one subject digest is the artifact digest
(DESIGN.md §2) and whose predicate lists every file with its sha256
(``files`` method). It is made and checked by the ``model_signing`` library
with EC keys, offline, so ``model_signing verify key DIR --signature
DIR/model.sig --public_key KEY.pub`` accepts what ``adapterhub pull`` writes.

What we add around the library:

- signing signs exactly the artifact's files: the registry's blobs are laid out
  as a directory (hard links, no copy) and the signature's subject digest must
  equal the artifact digest, or nothing is stored;
- every bundle is parsed strictly first (JSON, base64, required fields), so a
  malformed bundle fails with a message that says which part is wrong;
- the signing key must be trusted (``adapterhub.trust``): known, unrevoked,
  unexpired and in scope for the artifact's namespace.

>>> sign_ref(reg, "team/qa-lora:1")            # doctest: +SKIP
>>> verify_ref(reg, "team/qa-lora:1").ok       # doctest: +SKIP
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import IntegrityError, InvalidArtifactError, TrustError

if TYPE_CHECKING:
    from adapterhub.registry import Registry
    from adapterhub.registry.index import VersionInfo

    from adapterhub.trust.keys import KeyInfo, PassphraseFn
    from adapterhub.manifest import FileEntry

SIGNATURE_FILE = "model.sig"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
MODEL_PREDICATE_TYPE = "https://model_signing/signature/v1.0"


# -- bundles ----------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """A parsed, structurally valid bundle (its signature is not checked yet)."""

    raw: bytes
    key_hint: str
    payload_type: str
    payload: bytes  # the statement JSON, base64-decoded
    sig: bytes
    statement: dict[str, Any]

    @property
    def predicate_type(self) -> str:
        return self.statement["predicateType"]

    @property
    def subject_digest(self) -> str:
        return "sha256:" + self.statement["subject"][0]["digest"]["sha256"]

    @property
    def subject_name(self) -> str:
        return str(self.statement["subject"][0].get("name", ""))


def _b64(text: Any, where: str, what: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise TrustError(f"malformed {what}: {where} is missing or not a string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise TrustError(f"malformed {what}: {where} is not valid base64") from None


def _field(d: Any, path: Sequence[str], what: str) -> Any:
    cur = d
    for i, k in enumerate(path):
        if not isinstance(cur, dict) or k not in cur:
            raise TrustError(f"malformed {what}: missing field {'.'.join(path[: i + 1])}")
        cur = cur[k]
    return cur


def parse_bundle(raw: bytes, what: str = "signature") -> Bundle:
    """Check a bundle's structure; raise ``TrustError`` naming the first problem."""
    from adapterhub import jsonio

    try:  # size- and depth-capped: a bundle may come from a remote (a referrer, a Hub repo's model.sig)
        doc = jsonio.loads(raw, what=f"malformed {what}")
    except InvalidArtifactError as e:
        raise TrustError(str(e)) from None
    if not isinstance(doc, dict):
        raise TrustError(f"malformed {what}: not a JSON object")
    media = _field(doc, ["mediaType"], what)
    if media != BUNDLE_MEDIA_TYPE:
        raise TrustError(f"malformed {what}: mediaType is {media!r}, expected {BUNDLE_MEDIA_TYPE}")
    hint = _field(doc, ["verificationMaterial", "publicKey", "hint"], what)
    if not isinstance(hint, str) or len(hint) != 64:
        raise TrustError(f"malformed {what}: verificationMaterial.publicKey.hint is not a key id")
    env = _field(doc, ["dsseEnvelope"], what)
    payload_type = _field(env, ["payloadType"], what)
    if payload_type != INTOTO_PAYLOAD_TYPE:
        raise TrustError(f"malformed {what}: dsseEnvelope.payloadType is {payload_type!r}, expected {INTOTO_PAYLOAD_TYPE}")
    payload = _b64(_field(env, ["payload"], what), "dsseEnvelope.payload", what)
    sigs = _field(env, ["signatures"], what)
    if not isinstance(sigs, list) or len(sigs) != 1 or not isinstance(sigs[0], dict):
        raise TrustError(f"malformed {what}: dsseEnvelope.signatures must hold exactly one signature")
    sig = _b64(sigs[0].get("sig"), "dsseEnvelope.signatures[0].sig", what)
    try:
        stmt = jsonio.loads(payload, what=f"malformed {what}: the DSSE payload")
    except InvalidArtifactError:
        raise TrustError(f"malformed {what}: the DSSE payload is not JSON (or is nested too deeply)") from None
    if not isinstance(stmt, dict) or stmt.get("_type") != STATEMENT_TYPE:
        raise TrustError(f"malformed {what}: the payload is not an in-toto Statement v1")
    _field(stmt, ["predicateType"], what)
    subjects = _field(stmt, ["subject"], what)
    if not isinstance(subjects, list) or len(subjects) != 1:
        raise TrustError(f"malformed {what}: the statement must have exactly one subject")
    digest = _field(subjects[0], ["digest", "sha256"], what)
    if not isinstance(digest, str) or len(digest) != 64:
        raise TrustError(f"malformed {what}: subject digest is not a sha256")
    _field(stmt, ["predicate"], what)
    return Bundle(raw, hint, payload_type, payload, sig, stmt)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding (what the signature covers)."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def make_bundle(statement: dict[str, Any], private_key: Any) -> bytes:
    """A Sigstore bundle v0.3 around a DSSE-signed in-toto statement, exactly as
    model-signing's key signer builds one (ECDSA over the PAE, key hint =
    sha256 of the public key PEM)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from adapterhub.trust.keys import key_id_of_pem

    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    pub = private_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    sig = private_key.sign(pae(INTOTO_PAYLOAD_TYPE, payload), ec.ECDSA(_hash_for(private_key.curve.key_size, hashes)))
    doc = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key_id_of_pem(pub)}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": INTOTO_PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(sig).decode(), "keyid": ""}],
        },
    }
    return json.dumps(doc, indent=2).encode()


def _hash_for(key_size: int, hashes: Any) -> Any:
    return {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}[key_size]


def dsse_verify(bundle: Bundle, public_pem: bytes, what: str = "signature") -> None:
    """Check the envelope's ECDSA signature with ``public_pem``; raise ``TrustError`` if it fails."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from adapterhub.trust.keys import key_id_of_pem

    if key_id_of_pem(public_pem) != bundle.key_hint:
        raise TrustError(f"{what} was made with key {bundle.key_hint[:16]}…, not with key {key_id_of_pem(public_pem)[:16]}…")
    pub: Any = serialization.load_pem_public_key(public_pem)
    try:
        pub.verify(bundle.sig, pae(bundle.payload_type, bundle.payload), ec.ECDSA(_hash_for(pub.curve.key_size, hashes)))
    except InvalidSignature:
        raise TrustError(
            f"{what}: the DSSE signature does not verify with key {bundle.key_hint[:16]}… "
            "(the statement was altered, or signed by another key)"
        ) from None


# -- checks -------------------------------------------------------------------------


@dataclass(frozen=True)
class SignatureCheck:
    ok: bool
    reason: str  # "verified", or what is wrong
    key_id: str | None = None
    key_name: str | None = None
    blob: str | None = None
    subject: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "reason": self.reason, "key_id": self.key_id, "key_name": self.key_name,
            "blob": self.blob, "subject": self.subject,
        }


@dataclass
class VerifyReport:
    target: str
    digest: str | None
    checks: list[SignatureCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return any(c.ok for c in self.checks)

    @property
    def verified(self) -> SignatureCheck | None:
        return next((c for c in self.checks if c.ok), None)

    def problem(self) -> str:
        if not self.checks:
            return f"{self.target} is not signed"
        reasons = "; ".join(dict.fromkeys(c.reason for c in self.checks))
        return f"{self.target}: no valid signature by a trusted key ({reasons})"

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "digest": self.digest, "ok": self.ok, "signatures": [c.to_dict() for c in self.checks]}


def _run_model_signing_verify(root: Path, sig_path: Path, public_pem: bytes) -> str | None:
    """model_signing's own verification of ``root`` against ``sig_path``; None if it passes."""
    from cryptography.exceptions import InvalidSignature
    from model_signing import hashing, verifying

    with tempfile.TemporaryDirectory(prefix="adapterhub-pub-") as td:
        pub = Path(td) / "key.pub"
        pub.write_bytes(public_pem)
        cfg = verifying.Config().use_elliptic_key_verifier(public_key=pub)
        # Fixed, not guessed from the bundle: files method, sha256, no symlinks.
        cfg.set_hashing_config(
            hashing.Config().set_ignored_paths(paths=[sig_path.name], ignore_git_paths=True)
            .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
        )
        try:
            with contextlib.redirect_stdout(None):  # the library prints format warnings
                cfg.verify(root, sig_path)
        except InvalidSignature:
            return "the DSSE signature does not verify (the signature was altered, or made by another key)"
        except ValueError as e:
            msg = str(e)
            if msg.startswith("Signature mismatch"):
                import ast

                try:
                    diffs = ast.literal_eval(msg.removeprefix("Signature mismatch: "))
                except (ValueError, SyntaxError):
                    diffs = [msg]
                return "the files do not match the signature: " + "; ".join(map(str, diffs))
            if "Key mismatch" in msg:
                return "the signature was made with another key"
            return f"model-signing refused the signature: {msg}"
        except (KeyError, TypeError) as e:
            return f"malformed signature: {type(e).__name__}: {e}"
    return None


def check_bundle(
    raw: bytes,
    root: Path,
    *,
    reg: Registry | None,
    expected_digest: str | None,
    namespace: str | None,
    public_pem: bytes | None = None,
    blob: str | None = None,
) -> SignatureCheck:
    """Check one model-signing bundle against the files under ``root``.

    With ``public_pem`` the signature must be by that key (trust is the
    caller's); otherwise the key must be trusted in ``reg`` for ``namespace``.
    """
    from adapterhub.trust import policy
    from adapterhub.trust.keys import key_id_of_pem

    try:
        b = parse_bundle(raw)
    except TrustError as e:
        return SignatureCheck(False, str(e), blob=blob)
    kid, subject = b.key_hint, b.subject_digest
    if b.predicate_type != MODEL_PREDICATE_TYPE:
        return SignatureCheck(False, f"not a model signature (predicate type {b.predicate_type})", kid, blob=blob, subject=subject)
    if expected_digest is not None and subject != expected_digest:
        return SignatureCheck(
            False, f"the signature is for another artifact ({subject[:19]}…, not {expected_digest[:19]}…)", kid, blob=blob, subject=subject
        )
    name = None
    if public_pem is not None:
        if key_id_of_pem(public_pem) != kid:
            return SignatureCheck(False, f"signed by key {kid[:16]}…, not by the given key {key_id_of_pem(public_pem)[:16]}…", kid, blob=blob, subject=subject)
        pem = public_pem
    else:
        tk = policy.lookup(reg, kid) if reg is not None else None
        if tk is None:
            return SignatureCheck(False, f"signed by key {kid[:16]}…, which is not trusted", kid, blob=blob, subject=subject)
        name = tk.name
        problem = tk.problem(namespace)
        if problem:
            return SignatureCheck(False, problem, kid, name, blob, subject)
        pem = tk.public_key.encode()
    with tempfile.TemporaryDirectory(prefix="adapterhub-sig-") as td:
        sig_path = Path(td) / SIGNATURE_FILE
        sig_path.write_bytes(raw)
        err = _run_model_signing_verify(root, sig_path, pem)
    if err:
        return SignatureCheck(False, err, kid, name, blob, subject)
    return SignatureCheck(True, "verified", kid, name, blob, subject)


# -- laying out registry artifacts ----------------------------------------------------


@contextlib.contextmanager
def artifact_view(reg: Registry, entries: Sequence[FileEntry], label: str, sources: dict[str, Path] | None = None) -> Iterator[Path]:
    """A temp directory holding exactly the artifact's files, as hard links to
    the registry's blobs (or to ``sources``), copied where links fail."""
    tmp = reg.staging_dir("view")  # fsck and gc find it if this process is killed
    root = tmp / (label.replace("/", "_").replace(":", "_") or "artifact")
    try:
        from adapterhub.manifest import check_relpath

        for e in entries:
            src = sources[e.path] if sources is not None else reg.blobs.path(e.sha256)
            dst = root / check_relpath(e.path)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not src.exists():
                raise IntegrityError(f"the blob for {e.path} is missing from the registry", hint="run `adapterhub fsck`")
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        root.mkdir(parents=True, exist_ok=True)
        yield root
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- signing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SignResult:
    ref: str
    digest: str
    key_id: str
    key_name: str
    blob: str

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "digest": self.digest, "key_id": self.key_id, "key_name": self.key_name, "blob": self.blob}


def resolve_key(name: str | None) -> KeyInfo:
    from adapterhub.trust import keys

    if name:
        return keys.get(name)
    k = keys.default_key()
    if k is None:
        from adapterhub.errors import NotFoundError

        raise NotFoundError("no signing key", hint="`adapterhub keys generate` makes one; --key NAME picks one")
    return k


def sign_dir(root: Path, key: KeyInfo, *, passphrase: str | None = None, prompt: PassphraseFn | None = None) -> bytes:
    """A model-signing bundle over the files under ``root``, made by the model_signing library."""
    from model_signing import hashing, signing

    from adapterhub.trust.keys import unlocked_passphrase

    if key.private_path is None:
        raise TrustError(f"key {key.name!r} has only a public key here; it cannot sign")
    password = unlocked_passphrase(key, passphrase, prompt)  # fails with a clear message first
    with tempfile.TemporaryDirectory(prefix="adapterhub-sign-") as td:
        sig = Path(td) / SIGNATURE_FILE
        cfg = signing.Config().use_elliptic_key_signer(private_key=key.private_path, password=password)  # type: ignore[arg-type]
        cfg.set_hashing_config(
            hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=True)
            .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
        )
        cfg.sign(root, sig)
        return sig.read_bytes()


def sign_ref(
    reg: Registry, ref: str, key: KeyInfo | None = None, *, passphrase: str | None = None, prompt: PassphraseFn | None = None
) -> SignResult:
    """Sign exactly the files of ``ref`` and store the bundle beside the artifact."""
    key = key or resolve_key(None)
    info = reg.resolve(ref)
    label = f"{info.name}:{info.version}"
    with artifact_view(reg, reg.index.files(info.digest), info.name.split("/")[-1]) as root:
        raw = sign_dir(root, key, passphrase=passphrase, prompt=prompt)
    b = parse_bundle(raw)
    if b.subject_digest != info.digest:
        raise IntegrityError(
            f"{label}: the stored files hash to {b.subject_digest[:19]}…, not to the artifact digest {info.digest[:19]}…; nothing was signed",
            hint="the registry store is damaged; run `adapterhub fsck`",
        )
    blob = reg.add_signature(info.digest, raw, b.key_hint, kind="model")
    return SignResult(label, info.digest, b.key_hint, key.name, blob)


def push_signed(
    reg: Registry, path: str | os.PathLike[str], target: str, *, key_name: str | None = None,
    prompt: PassphraseFn | None = None, **push_options: Any,
) -> tuple[Any, SignResult]:
    """Push ``path`` as ``target`` and sign exactly the files stored: ``push --sign``.

    The key is found and opened first (its passphrase from the environment or
    ``prompt``), so a missing key or a wrong passphrase stores nothing.
    ``push_options`` go to :meth:`Registry.push` (tags, description, progress).
    Returns the push result and the signature.

    >>> res, sig = push_signed(reg, "out/qa-lora", "team/qa-lora", tags=["prod"])   # doctest: +SKIP
    """
    from adapterhub.trust.keys import unlocked_passphrase

    key = resolve_key(key_name)
    passphrase = unlocked_passphrase(key, prompt=prompt)
    res = reg.push(path, target, **push_options)
    return res, sign_ref(reg, res.ref, key, passphrase=passphrase.decode() if passphrase else None)


# -- verifying ---------------------------------------------------------------------------


def _check_rows(reg: Registry, info: VersionInfo, root: Path, public_pem: bytes | None) -> list[SignatureCheck]:
    from adapterhub.trust.policy import namespace_of

    checks = []
    for row in reg.signatures(info.digest, kind="model"):
        try:
            raw = reg.read_signature(row["blob"])
        except IntegrityError as e:
            checks.append(SignatureCheck(False, str(e), row["key_id"], blob=row["blob"]))
            continue
        checks.append(
            check_bundle(raw, root, reg=reg, expected_digest=info.digest, namespace=namespace_of(info.name),
                         public_pem=public_pem, blob=row["blob"])
        )
    return checks


def verify_ref(reg: Registry, ref: str, *, public_pem: bytes | None = None) -> VerifyReport:
    """Re-hash the stored files of ``ref`` (model_signing reads the blobs) and check every signature."""
    info = reg.resolve(ref)
    label = f"{info.name}:{info.version}"
    report = VerifyReport(label, info.digest)
    if not reg.signatures(info.digest, kind="model"):
        return report
    with artifact_view(reg, reg.index.files(info.digest), info.name.split("/")[-1]) as root:
        report.checks = _check_rows(reg, info, root, public_pem)
    return report


def verify_dir(
    path: Path, *, reg: Registry | None, signature: Path | None = None, public_pem: bytes | None = None,
    namespace: str | None = None,
) -> VerifyReport:
    """Check ``path/model.sig`` (or ``signature``) against the files of ``path``."""
    from adapterhub.manifest import Manifest

    sig = signature or path / SIGNATURE_FILE
    if not path.is_dir():
        raise InvalidArtifactError(f"{path} is not a directory")
    report = VerifyReport(str(path), None)
    if not sig.exists():
        return report
    if signature is not None and signature.parent.resolve() == path.resolve() and signature.name != SIGNATURE_FILE:
        raise InvalidArtifactError(f"put the signature outside {path}, or name it {SIGNATURE_FILE}: it would count as a file of the artifact")
    report.digest = Manifest.from_dir(path).digest
    report.checks = [check_bundle(sig.read_bytes(), path, reg=reg, expected_digest=None, namespace=namespace, public_pem=public_pem)]
    return report
