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
_HOST_RE = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$")
_LOOPBACK = ("localhost", "127.0.0.1", "[::1]")


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


def parse_url(text: str, *, reference: bool = True) -> RemoteURL:
    """Parse a remote URL; ``reference=False`` refuses a tag or revision."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in SCHEMES:
        raise InvalidNameError(f"not a remote URL: {text!r}", hint="remote URLs look like oci://HOST[:PORT]/NAMESPACE or hf://ORG")
    ref = None
    if scheme == "oci":
        host, _, path = rest.partition("/")
        if not _HOST_RE.match(host):
            raise InvalidNameError(f"invalid registry host {host!r} in {text!r}")
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
        if not path or len(path.split("/")) > 2 or any(not p for p in path.split("/")):
            raise InvalidNameError(f"invalid Hub URL {text!r}", hint="hf://ORG for a remote, hf://ORG/REPO[@REVISION] for a repo")
    if ref is not None and not reference:
        raise InvalidNameError(f"a remote URL names no tag or revision: {text!r}")
    if ref == "":
        raise InvalidNameError(f"empty tag or revision in {text!r}")
    return RemoteURL(scheme, host, path, ref)
