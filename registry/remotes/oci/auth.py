"""Registry authentication, apart from the transport: what to send, and how to
answer a ``401`` challenge (``Basic``, or a ``Bearer`` token from the realm).

The client asks :meth:`Auth.header` before each request to the registry's
own host, and :meth:`Auth.answer` after a 401. Fetching a token is an HTTP
request, which the client makes for it (``fetch_token``), so this module
never opens a connection itself.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any

from adapterhub.errors import RemoteAuthError

# (realm URL, query parameters, basic credentials or None) -> the token service's JSON answer, or None
TokenFetcher = Callable[[str, dict[str, str], "tuple[str, str] | None"], "dict[str, Any] | None"]


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="https://a/token",service="r",scope="repository:x:pull"`` -> ("bearer", {...})."""
    scheme, _, params_text = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', params_text))


class Auth:
    """Credentials for one registry host, and the tokens obtained with them (one per scope)."""

    def __init__(self, host: str, *, username: str | None = None, password: str | None = None,
                 token: str | None = None) -> None:
        self.host = host
        self.username, self.password, self.token = username, password, token
        self._tokens: dict[str, str] = {}  # scope (or "") -> Authorization header value
        self._current: str | None = f"Bearer {token}" if token else None
        self._basic = False

    @property
    def has_credentials(self) -> bool:
        return bool(self.username or self.token)

    def header(self) -> dict[str, str]:
        """The Authorization header for the next request to the registry (none before a challenge)."""
        return {"Authorization": self._current} if self._current else {}

    def answer(self, challenge: str, fetch_token: TokenFetcher) -> bool:
        """Set up auth for a 401 with ``WWW-Authenticate: challenge``; False when there is nothing more to try."""
        if self.token:
            return False  # a token is sent as it is; a refusal is final
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if not self.username or self._basic:
                return False
            self._basic = True
            raw = f"{self.username}:{self.password or ''}".encode()
            self._current = "Basic " + base64.b64encode(raw).decode()
            return True
        if scheme == "bearer" and params.get("realm"):
            scope = params.get("scope", "")
            if scope in self._tokens:
                if self._current == self._tokens[scope]:
                    return False  # the token for this scope was refused
                self._current = self._tokens[scope]  # back to this scope's token
                return True
            q = {k: v for k, v in (("service", params.get("service")), ("scope", scope)) if v}
            basic = (self.username, self.password or "") if self.username else None
            doc = fetch_token(params["realm"], q, basic)
            tok = (doc or {}).get("token") or (doc or {}).get("access_token")
            if not isinstance(tok, str) or not tok:
                return False
            self._tokens[scope] = self._current = f"Bearer {tok}"
            return True
        return False

    def failure(self) -> RemoteAuthError:
        """The error for a challenge that could not be answered."""
        if self.has_credentials:
            return RemoteAuthError(
                f"authentication to {self.host} failed: the registry refused the "
                + ("username or password" if self.username else "token"),
                hint="check them, then `adapterhub remote add NAME URL --replace --username U --password-stdin`",
            )
        return RemoteAuthError(
            f"{self.host} requires authentication",
            hint="`adapterhub remote add NAME URL --username U --password-stdin`, "
            "ADAPTERHUB_REMOTE_USERNAME/ADAPTERHUB_REMOTE_PASSWORD, or `docker login`",
        )
