"""Signing keys: EC P-256 key pairs under ``$ADAPTERHUB_HOME/keys/``.

``keys/<name>.key`` is the private key (PKCS#8 PEM, mode 0600, optionally
encrypted with a passphrase) and ``keys/<name>.pub`` the public key
(SubjectPublicKeyInfo PEM). A key's id is the sha256 hex of its public key
PEM: exactly the ``verificationMaterial.publicKey.hint`` that model-signing
writes into a bundle, so a bundle names the key that made it.

The passphrase of an encrypted key comes from the caller, else from
``$ADAPTERHUB_KEY_PASSPHRASE``. The default signing key is ``$ADAPTERHUB_KEY``,
else the key named ``default``, else the only key there is.

>>> k = generate("alice")                     # doctest: +SKIP
>>> k.key_id, k.public_path                   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub import config
from adapterhub.fsutil import write_atomic
from adapterhub.errors import (
    ConflictError,
    InvalidArtifactError,
    InvalidNameError,
    NotFoundError,
    TrustError,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

PASSPHRASE_ENV = "ADAPTERHUB_KEY_PASSPHRASE"
DEFAULT_KEY_ENV = "ADAPTERHUB_KEY"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# model-signing accepts these curves only (Ed25519 and RSA are refused).
SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")

PassphraseFn = Callable[[str], str | None]  # key name -> passphrase (a prompt)


def keys_dir() -> Path:
    return config.home() / "keys"


def check_key_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):  # whole: a trailing newline is refused
        raise InvalidNameError(f"invalid key name {name!r}: use [a-z0-9][a-z0-9._-]*, at most 64 characters")
    return name


def key_id_of_pem(public_pem: bytes) -> str:
    """sha256 hex of the public key PEM: model-signing's bundle key hint."""
    return hashlib.sha256(public_pem).hexdigest()


def load_public_pem(data: bytes, what: str = "public key") -> bytes:
    """Normalise a PEM public key (or certificate-free private key) to SPKI PEM, refusing unsupported keys."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key: Any = serialization.load_pem_public_key(data)
    except ValueError:
        raise InvalidArtifactError(f"{what}: not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in SUPPORTED_CURVES:
        raise InvalidArtifactError(
            f"{what}: only EC keys on P-256, P-384 or P-521 are supported (model-signing refuses others)"
        )
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class KeyInfo:
    name: str
    key_id: str
    private_path: Path | None
    public_path: Path
    encrypted: bool

    @property
    def public_pem(self) -> bytes:
        return self.public_path.read_bytes()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key_id": self.key_id,
            "public_key": str(self.public_path),
            "private_key": str(self.private_path) if self.private_path else None,
            "encrypted": self.encrypted,
        }


def _ensure_dir() -> Path:
    d = keys_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    return d


def _store(name: str, key: EllipticCurvePrivateKey, passphrase: str | None, *, force: bool = False) -> KeyInfo:
    from cryptography.hazmat.primitives import serialization

    d = _ensure_dir()
    priv, pub = d / f"{name}.key", d / f"{name}.pub"
    if (priv.exists() or pub.exists()) and not force:
        raise ConflictError(f"a key named {name!r} already exists", hint="pick another name, or `adapterhub keys rm` it first")
    enc: Any = (
        serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    )
    write_atomic(priv, data=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc), mode=0o600)
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_atomic(pub, data=pub_pem, mode=0o644)
    return KeyInfo(name, key_id_of_pem(pub_pem), priv, pub, bool(passphrase))


def generate(name: str = "default", *, passphrase: str | None = None) -> KeyInfo:
    """Create an EC P-256 key pair; encrypt the private key when ``passphrase`` is given."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return _store(check_key_name(name), ec.generate_private_key(ec.SECP256R1()), passphrase)


def import_key(name: str, pem: bytes, *, passphrase: str | None = None, new_passphrase: str | None = None) -> KeyInfo:
    """Import a PEM private key (re-encrypted with ``new_passphrase``) or a public key only."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    check_key_name(name)
    if b"PRIVATE KEY" in pem:
        key = _load_private(pem, name, passphrase)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in SUPPORTED_CURVES:
            raise InvalidArtifactError("only EC keys on P-256, P-384 or P-521 are supported (model-signing refuses others)")
        return _store(name, key, new_passphrase)
    pub_pem = load_public_pem(pem)
    d = _ensure_dir()
    pub = d / f"{name}.pub"
    if pub.exists():
        raise ConflictError(f"a key named {name!r} already exists")
    write_atomic(pub, data=pub_pem, mode=0o644)
    del serialization
    return KeyInfo(name, key_id_of_pem(pub_pem), None, pub, False)


def _is_encrypted(pem: bytes) -> bool:
    return b"ENCRYPTED" in pem.split(b"\n", 1)[0]


def list_keys() -> list[KeyInfo]:
    d = keys_dir()
    if not d.is_dir():
        return []
    out = []
    for pub in sorted(d.glob("*.pub")):
        name = pub.stem
        priv = d / f"{name}.key"
        has_priv = priv.exists()
        out.append(
            KeyInfo(name, key_id_of_pem(pub.read_bytes()), priv if has_priv else None, pub,
                    _is_encrypted(priv.read_bytes()) if has_priv else False)
        )
    return out


def get(name_or_id: str) -> KeyInfo:
    """A key by name, key id or unique key-id prefix (8+ hex characters)."""
    keys = list_keys()
    for k in keys:
        if k.name == name_or_id:
            return k
    ident = name_or_id.removeprefix("sha256:")
    hits = [k for k in keys if len(ident) >= 8 and k.key_id.startswith(ident)]
    if len(hits) == 1:
        return hits[0]
    raise NotFoundError(f"no key named {name_or_id!r}", hint="`adapterhub keys list` shows your keys; `adapterhub keys generate` makes one")


def default_key() -> KeyInfo | None:
    """``$ADAPTERHUB_KEY``, else the key named ``default``, else the only private key; None if none."""
    env = os.environ.get(DEFAULT_KEY_ENV)
    if env:
        return get(env)
    keys = [k for k in list_keys() if k.private_path is not None]
    for k in keys:
        if k.name == "default":
            return k
    return keys[0] if len(keys) == 1 else None


def remove(name: str) -> KeyInfo:
    k = get(name)
    for p in (k.private_path, k.public_path):
        if p is not None:
            p.unlink(missing_ok=True)
    return k


def _load_private(pem: bytes, name: str, passphrase: str | None) -> Any:
    from cryptography.hazmat.primitives import serialization

    encrypted = _is_encrypted(pem)
    if encrypted and not passphrase:
        raise TrustError(
            f"key {name!r} is encrypted and no passphrase was given",
            hint=f"set {PASSPHRASE_ENV}, or run on a terminal to be asked for it",
        )
    try:
        return serialization.load_pem_private_key(pem, passphrase.encode() if (encrypted and passphrase) else None)
    except (ValueError, TypeError) as e:
        if encrypted:
            raise TrustError(f"wrong passphrase for key {name!r}") from None
        raise InvalidArtifactError(f"key {name!r}: not a readable PEM private key ({e})") from None


def load_private(key: KeyInfo, passphrase: str | None = None, prompt: PassphraseFn | None = None) -> Any:
    """The private key object; the passphrase comes from the argument, the environment, then ``prompt``."""
    if key.private_path is None:
        raise NotFoundError(f"key {key.name!r} has only a public key here; it cannot sign")
    pem = key.private_path.read_bytes()
    if _is_encrypted(pem) and not passphrase:
        passphrase = os.environ.get(PASSPHRASE_ENV) or (prompt(key.name) if prompt else None)
    return _load_private(pem, key.name, passphrase)


def unlocked_passphrase(key: KeyInfo, passphrase: str | None = None, prompt: PassphraseFn | None = None) -> bytes | None:
    """Check the key opens and return the passphrase bytes model-signing needs (None if unencrypted)."""
    if key.private_path is None:
        raise NotFoundError(f"key {key.name!r} has only a public key here; it cannot sign")
    pem = key.private_path.read_bytes()
    if not _is_encrypted(pem):
        load_private(key)
        return None
    passphrase = passphrase or os.environ.get(PASSPHRASE_ENV) or (prompt(key.name) if prompt else None)
    _load_private(pem, key.name, passphrase)
    assert passphrase is not None
    return passphrase.encode()
