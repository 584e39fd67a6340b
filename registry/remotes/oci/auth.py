"""Registry authentication, apart from the transport: what to send, and how to
answer a ``401`` challenge (``Basic``, or a ``Bearer`` token from the realm).

The client asks :meth:`Auth.header` before each request to the registry's
own host, and :meth:`Auth.answer` after a 401. Fetching a token is an HTTP
request, which the client makes for it (``fetch_token``), so this module
never opens a connection itself.

Where credentials may go (the registry decides the realm, so a hostile or
misconfigured one could ask for them anywhere): to the registry's own host,
or to a token service over HTTPS. A realm on another host over plain HTTP is
refused unless ``ADAPTERHUB_TOKEN_REALMS`` lists it (``host:port``, comma
separated), for a test set-up or a trusted network.

Tokens are kept per scope with their lifetime (``expires_in``, 60 s when the
service does not say): an expired one is fetched again before it is sent,
and a token the registry refuses is fetched again once, since it may have
expired on the registry's clock during a long push.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from adapterhub.errors import RemoteAuthError

# (realm URL, query parameters, basic credentials or None) -> the token service's JSON answer, or None
TokenFetcher = Callable[[str, dict[str, str], "tuple[str, str] | None"], "dict[str, Any] | None"]

DEFAULT_TOKEN_LIFETIME = 60.0  # the distribution token spec's default for expires_in
EARLY = 5.0  # fetch a new token this long before the old one expires (a fifth of its life, if shorter)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="https://a/token",service="r",scope="repository:x:pull"`` -> ("bearer", {...})."""
    scheme, _, params_text = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', params_text))


def _hostport(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower()


def realm_allowed(realm: str, base: str) -> bool:
    """May credentials be sent to the token service at ``realm`` for the registry at ``base``?"""
    scheme, host = _hostport(realm)
    if scheme == "https":
        return True
    if scheme != "http":
        return False
    if host and host == _hostport(base)[1]:
        return True  # the registry's own host, which gets these credentials anyway
    allowed = {h.strip().lower() for h in os.environ.get("ADAPTERHUB_TOKEN_REALMS", "").split(",") if h.strip()}
    return urlsplit(realm).netloc.lower() in allowed


@dataclass
class _Token:
    header: str
    expires_at: float
    realm: str
    params: dict[str, str]

    def expired(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.expires_at


class Auth:
    """Credentials for one registry host, and the tokens obtained with them (one per scope)."""

    def __init__(self, host: str, base: str, *, username: str | None = None, password: str | None = None,
                 token: str | None = None) -> None:
        self.host, self.base = host, base
        self.username, self.password, self.token = username, password, token
        self._tokens: dict[str, _Token] = {}  # scope (or "") -> token
        self._current: str | None = f"Bearer {token}" if token else None
        self._current_scope: str | None = None
        self._basic = False
        self.tokens_fetched = 0
        self.last_error: str | None = None  # the registry's reason in the last challenge (insufficient_scope, ...)
        self.last_scope: str | None = None

    @property
    def has_credentials(self) -> bool:
        return bool(self.username or self.token)

    def header(self, fetch_token: TokenFetcher) -> dict[str, str]:
        """The Authorization header for the next request to the registry (none before a challenge)."""
        tok = self._tokens.get(self._current_scope) if self._current_scope is not None else None
        if tok is not None and tok.header == self._current and tok.expired():
            self._fetch(self._current_scope or "", tok.realm, tok.params, fetch_token)
        return {"Authorization": self._current} if self._current else {}

    def _fetch(self, scope: str, realm: str, params: dict[str, str], fetch_token: TokenFetcher) -> bool:
        if not realm_allowed(realm, self.base):
            raise RemoteAuthError(
                f"{self.host} sends clients to the token service {realm}, on another host over plain HTTP: "
                "no credentials or token requests go there",
                hint="the registry should name an HTTPS realm; ADAPTERHUB_TOKEN_REALMS=HOST:PORT allows this one",
            )
        basic = (self.username, self.password or "") if self.username else None
        doc = fetch_token(realm, params, basic) or {}
        self.tokens_fetched += 1
        tok = doc.get("token") or doc.get("access_token")
        if not isinstance(tok, str) or not tok or len(tok) > 64 << 10:
            return False
        life = doc.get("expires_in")
        life = float(life) if isinstance(life, (int, float)) and not isinstance(life, bool) and 0 < life < 10**7 else DEFAULT_TOKEN_LIFETIME
        self._tokens[scope] = _Token(f"Bearer {tok}", time.monotonic() + life - min(EARLY, life / 5), realm, params)
        self._current, self._current_scope = self._tokens[scope].header, scope
        return True

    def answer(self, challenge: str, fetch_token: TokenFetcher, fresh: set[str] | None = None) -> bool:
        """Set up auth for a 401 with ``WWW-Authenticate: challenge``; False when there is nothing more to try.

        ``fresh`` holds the scopes a token was fetched for during this request:
        a token the registry refuses is fetched again once per request (it may
        have expired on the registry's clock), and a fresh one refused is final.
        """
        fresh = set() if fresh is None else fresh
        if self.token:
            return False  # a token is sent as it is; a refusal is final
        scheme, params = parse_challenge(challenge)
        self.last_error, self.last_scope = params.get("error"), params.get("scope")
        if scheme == "basic":
            if not self.username or self._basic:
                return False
            self._basic = True
            raw = f"{self.username}:{self.password or ''}".encode()
            self._current, self._current_scope = "Basic " + base64.b64encode(raw).decode(), None
            return True
        if scheme == "bearer" and params.get("realm"):
            scope = params.get("scope", "")
            if scope in fresh:
                return False  # a token fetched for this very request was refused
            cached = self._tokens.get(scope)
            if cached is not None and cached.header != self._current and not cached.expired():
                self._current, self._current_scope = cached.header, scope  # back to this scope's token
                return True
            q = {k: v for k, v in (("service", params.get("service")), ("scope", scope)) if v}
            fresh.add(scope)
            return self._fetch(scope, params["realm"], q, fetch_token)
        return False

    def failure(self) -> RemoteAuthError:
        """The error for a challenge that could not be answered."""
        if self.last_error == "insufficient_scope" or (self._tokens and self.last_scope):
            return RemoteAuthError(
                f"{self.host} refused access for {self.last_scope or 'this request'}"
                + (f" ({self.last_error})" if self.last_error else "")
                + ": the token service gave a token without it",
                hint="these credentials may not do this; check the user's rights on the registry",
            )
        if self.has_credentials:
            return RemoteAuthError(
                f"authentication to {self.host} failed: the registry refused the "
                + ("username or password" if self.username else "token"),
                hint="check them, then `adapterhub remote login NAME --username U --password-stdin`",
            )
        return RemoteAuthError(
            f"{self.host} requires authentication",
            hint="`adapterhub remote login NAME --username U --password-stdin`, "
            "ADAPTERHUB_REMOTE_USERNAME/ADAPTERHUB_REMOTE_PASSWORD, or `docker login`",
        )
