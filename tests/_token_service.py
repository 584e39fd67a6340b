"""A token service for Distribution's ``auth: token``, written for the tests.

It issues JWTs (ES256) signed by a throwaway P-256 key, whose self-signed
certificate is the registry's ``rootcertbundle``, so the registry verifies
every token for real. Who gets what:

- anonymous: ``pull`` on any repository;
- ``alice``/``PASSWORD``: ``pull`` and ``push`` (and the catalog when
  ``catalog`` is set); a wrong password is refused with 401;
- ``wrong_scope``: tokens grant the asked actions on another repository;
- ``lifetime``: how long the registry accepts a token (Distribution allows
  60 s of clock skew past ``exp``, so ``exp`` is set 60 s earlier);
  ``claimed_lifetime``: the ``expires_in`` told to the client (a service may
  say more than the token holds).

Every issued token is recorded in ``issued`` as (user, scope, access).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests._http_stub import Stub
from tests._oci_server import PASSWORD, USER

SERVICE = "adapterhub-test"
LEEWAY = 60  # Distribution accepts a token this long past its exp (measured: 55 s past is taken, 65 s is not)
ISSUER = "adapterhub-test-issuer"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(public_key) -> str:
    """Distribution's key id: base32 of the first 240 bits of sha256(DER public key), in groups of four."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    s = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(s[i:i + 4] for i in range(0, len(s), 4))


class TokenService:
    def __init__(self, workdir: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "adapterhub test token signer")])
        now = datetime.now(timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
                .not_valid_after(now + timedelta(days=30)).sign(self.key, hashes.SHA256()))
        workdir.mkdir(parents=True, exist_ok=True)
        self.bundle = workdir / "token-signer.pem"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.kid = libtrust_key_id(self.key.public_key())
        self.lifetime = 300.0
        self.claimed_lifetime: float | None = None
        self.wrong_scope = False
        self.catalog = False
        self.issued: list[tuple[str, str, list]] = []
        self.stub = Stub(self._handle)

    @property
    def realm(self) -> str:
        return f"{self.stub.url}/token"

    def registry_settings(self) -> dict[str, str]:
        return {"realm": self.realm, "service": SERVICE, "issuer": ISSUER, "rootcertbundle": str(self.bundle)}

    def stop(self) -> None:
        self.stub.stop()

    def _user(self, req) -> str | None:
        """"" for anonymous, the user name, or None for refused credentials."""
        auth = req.headers.get("authorization", "")
        if not auth:
            return ""
        if not auth.startswith("Basic "):
            return None
        user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
        return user if (user, pw) == (USER, PASSWORD) else None

    def _access(self, user: str, scope: str) -> list[dict]:
        out = []
        for one in scope.split():
            kind, _, rest = one.partition(":")
            name, _, actions = rest.rpartition(":")
            asked = set(actions.split(","))
            if kind == "registry" and name == "catalog":
                granted = asked if (user and self.catalog) else set()
            elif kind == "repository":
                granted = asked & ({"pull", "push"} if user else {"pull"})
                if self.wrong_scope:
                    name = name + "-other"
            else:
                granted = set()
            if granted:
                out.append({"type": kind, "name": name, "actions": sorted(granted)})
        return out

    def _handle(self, req) -> None:
        user = self._user(req)
        if user is None:
            req.send(401, {"Content-Type": "application/json"}, b'{"details": "bad credentials"}')
            return
        q = parse_qs(urlsplit(req.path).query)
        scope = " ".join(q.get("scope", []))
        access = self._access(user, scope)
        now = int(time.time())
        # Accepted for at least ``lifetime`` seconds (exp is a whole second, rounded up).
        claims = {"iss": ISSUER, "sub": user, "aud": q.get("service", [""])[0],
                  "exp": math.ceil(time.time() + self.lifetime) - LEEWAY,
                  "nbf": now - 5, "iat": now, "jti": secrets.token_hex(8), "access": access}
        token = self.sign(claims)
        self.issued.append((user, scope, access))
        life = self.claimed_lifetime if self.claimed_lifetime is not None else self.lifetime
        body = json.dumps({"token": token, "access_token": token, "expires_in": int(life),
                           "issued_at": datetime.now(timezone.utc).isoformat()}).encode()
        req.send(200, {"Content-Type": "application/json"}, body)

    def sign(self, claims: dict) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        header = {"typ": "JWT", "alg": "ES256", "kid": self.kid}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
