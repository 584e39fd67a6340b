"""Names, versions, tags and refs.

Grammar (DESIGN.md §2):

- name: lowercase ``[a-z0-9][a-z0-9._-]*``, optionally ``namespace/name``
  (at most one ``/``), 128 characters in all at most.
- version: starts with a digit, optionally after a ``v``, then
  ``[A-Za-z0-9._+-]``, up to 64 characters in all: integers (``3``), semver
  (``1.2.0``, ``2.0.0-rc.1+build.5``), calver (``2026.12.07``), ``v1.2``.
  Versions are immutable. A word such as ``prod`` is a tag, not a version,
  so ``push DIR team/x:prod`` is refused with a hint to use ``--tag prod``.
- tag: ``[A-Za-z0-9_][A-Za-z0-9._-]*`` up to 64 characters; mutable pointers.
- ref: ``name``, ``name:version``, ``name@tag`` or ``name@sha256:<64 hex>``.
  A bare ``name`` means ``name@latest``.

Because no component may start with ``.`` or contain ``/`` beyond the one
namespace separator, nothing built from a ref can escape a directory. Every
pattern is matched whole (``re.fullmatch``): a ``$`` would also match before a
final newline, and a name ending in ``\n`` could never be pulled again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterhub.errors import InvalidNameError

MAX_NAME = 128
_COMPONENT = r"[a-z0-9][a-z0-9._-]*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})?")
_VERSION_RE = re.compile(r"v?[0-9][A-Za-z0-9._+-]{0,62}")
# What versions looked like before they had to start with a digit: rows
# written then can still be named (``Registry.resolve``).
LEGACY_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def check_name(name: str) -> str:
    if len(name) > MAX_NAME:
        raise InvalidNameError(f"name is {len(name)} characters long; the limit is {MAX_NAME}")
    if not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"invalid name {name!r}",
            hint="names are lowercase letters, digits, '.', '_' and '-', starting with a letter "
            "or digit, with at most one '/' (team/name)",
        )
    return name


def check_version(version: str) -> str:
    if not _VERSION_RE.fullmatch(version):
        if _TAG_RE.fullmatch(version) and not version[0].isdigit():
            raise InvalidNameError(
                f"invalid version {version!r}: a version starts with a digit (3, 1.2.0, 2026.12.07, v2)",
                hint=f"did you mean `--tag {version}`? (a ref names a tag as NAME@{version})",
            )
        raise InvalidNameError(
            f"invalid version {version!r}",
            hint="versions start with a digit, optionally after a 'v': 3, 1.2.0, 2026.12.07, v2 "
            "(then letters, digits, '.', '_', '+', '-')",
        )
    if version.isdigit() and (version != str(int(version))):
        raise InvalidNameError(f"invalid version {version!r}: no leading zeros")
    return version


def check_tag(tag: str) -> str:
    if not _TAG_RE.fullmatch(tag) or _DIGEST_RE.fullmatch(tag):
        raise InvalidNameError(
            f"invalid tag {tag!r}", hint="tags are letters, digits, '.', '_' and '-', up to 64"
        )
    return tag


def check_digest(digest: str) -> str:
    if not _DIGEST_RE.fullmatch(digest):
        raise InvalidNameError(f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
    return digest


@dataclass(frozen=True)
class Ref:
    name: str
    version: str | None = None
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Ref:
        """Parse ``name[:version|@tag|@sha256:hex]``.

        >>> Ref.parse("team/qa-lora:3")
        Ref(name='team/qa-lora', version='3', tag=None, digest=None)
        >>> Ref.parse("qa-lora").tag
        'latest'
        """
        if "@" in text:
            name, _, rest = text.partition("@")
            check_name(name)
            if rest.startswith("sha256:"):
                return cls(name, digest=check_digest(rest))
            return cls(name, tag=check_tag(rest))
        if ":" in text:
            name, _, version = text.rpartition(":")
            return cls(check_name(name), version=check_version(version))
        return cls(check_name(text), tag="latest")

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.digest is not None:
            return f"{self.name}@{self.digest}"
        return f"{self.name}@{self.tag}"


def parse_target(text: str) -> tuple[str, str | None]:
    """Parse a push target ``name[:version]`` into (name, version or None)."""
    if "@" in text:
        raise InvalidNameError(
            f"push target {text!r} cannot name a tag or digest", hint="use NAME[:VERSION] and --tag TAG"
        )
    if ":" in text:
        name, _, version = text.rpartition(":")
        return check_name(name), check_version(version)
    return check_name(text), None
