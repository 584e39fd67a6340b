"""Remote URLs: ``oci://host[:port]/namespace[/name][:tag|@sha256:...]`` and ``hf://org[/repo][@revision]``.

>>> parse_url("oci://127.0.0.1:5000/team").repository("qa-lora")
'team/qa-lora'
>>> str(parse_url("hf://my-org/qa-lora@v3"))
'hf://my-org/qa-lora@v3'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterhub.errors import InvalidNameError

SCHEMES = ("oci", "hf")
_HOST_RE = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?")
_LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
_HUB_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def is_url(text: str | None) -> bool:
    return bool(text) and any(str(text).startswith(f"{s}://") for s in SCHEMES)


@dataclass(frozen=True)
class RemoteURL:
    """A parsed ``oci://host[:port]/path`` or ``hf://org[/repo]`` URL."""

    scheme: str  # oci | hf
    host: str  # oci: host[:port]; hf: "" (the endpoint says where)
    path: str  # oci: namespace[/name...]; hf: org[/repo]
    reference: str | None = None  # oci: tag or sha256:digest; hf: revision

    def __str__(self) -> str:
        ref = ""
        if self.reference:
            ref = ("@" if self.scheme == "hf" or self.reference.startswith("sha256:") else ":") + self.reference
        return f"{self.scheme}://{self.host + '/' if self.host else ''}{self.path}{ref}"

    @property
    def base(self) -> str:
        """The URL without a tag or revision."""
        return f"{self.scheme}://{self.host + '/' if self.host else ''}{self.path}"

    def repository(self, name: str) -> str:
        """The remote repository for the artifact ``name`` under this URL's path."""
        return f"{self.path}/{name}" if self.path else name

    @property
    def loopback(self) -> bool:
        hostname = self.host[: self.host.index("]") + 1] if self.host.startswith("[") else self.host.split(":", 1)[0]
        return hostname in _LOOPBACK


def _userinfo_end(rest: str) -> int:
    """Where ``user:password@`` ends in the part of a URL after ``scheme://`` (0 when there is none).

    The ``@`` of a digest (``name@sha256:...``) or of a Hub revision is not
    one: credentials are a ``:`` before the ``@``, and not a port followed by
    a path (``host:5000/ns/x@sha256:...``).
    """
    at = rest.find("@")
    if at < 0:
        return 0
    before = rest[:at]
    if "@" not in rest.partition("/")[0] and ":" not in before:
        return 0
    user, colon, secret = before.partition(":")
    if "@" not in rest.partition("/")[0] and colon and (re.fullmatch(r"\d{1,5}(/.*)?", secret) or "/" in user):
        return 0  # host:port/path, then a reference
    return at + 1


def redact(text: str) -> str:
    """``text`` with the password of a ``scheme://user:password@host`` URL masked, for any message.

    >>> redact("oci://alice:s3cret@registry.example.com/team")
    'oci://alice:***@registry.example.com/team'
    """
    scheme, sep, rest = str(text).partition("://")
    if not sep:
        return text
    end = _userinfo_end(rest)
    if not end:
        return text
    user = rest[: end - 1].partition(":")[0]
    return f"{scheme}://{user}:***@{rest[end:]}"


def parse_url(text: str, *, reference: bool = True) -> RemoteURL:
    """Parse a remote URL; ``reference=False`` refuses a tag or revision.

    A URL never carries credentials: ``oci://user:password@host`` is refused,
    and no message repeats the password (:func:`redact`).
    """
    shown = redact(text)
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in SCHEMES:
        raise InvalidNameError(f"not a remote URL: {shown!r}", hint="remote URLs look like oci://HOST[:PORT]/NAMESPACE or hf://ORG")
    if _userinfo_end(rest):
        raise InvalidNameError(
            f"a remote URL may not hold credentials: {shown}",
            hint="`adapterhub remote login NAME --username U --password-stdin` stores them (mode 0600), "
            "or set ADAPTERHUB_REMOTE_USERNAME and ADAPTERHUB_REMOTE_PASSWORD",
        )
    ref = None
    if scheme == "oci":
        host, _, path = rest.partition("/")
        if not _HOST_RE.fullmatch(host):
            raise InvalidNameError(f"invalid registry host {host!r} in {shown!r}")
        if "@" in path:
            path, _, ref = path.partition("@")
        else:
            last = path.rsplit("/", 1)[-1]
            if ":" in last:
                path, _, ref = path.rpartition(":")
        path = path.strip("/")
    else:
        host = ""
        path = rest.strip("/")
        if "@" in path:
            path, _, ref = path.partition("@")
        if not path or len(path.split("/")) > 2 or not all(_HUB_PART_RE.fullmatch(p) for p in path.split("/")):
            raise InvalidNameError(f"invalid Hub URL {shown!r}", hint="hf://ORG for a remote, hf://ORG/REPO[@REVISION] for a repo")
    if ref is not None and not reference:
        raise InvalidNameError(f"a remote URL names no tag or revision: {shown!r}")
    if ref == "":
        raise InvalidNameError(f"empty tag or revision in {shown!r}")
    return RemoteURL(scheme, host, path, ref)
