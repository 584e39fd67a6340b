"""What a remote's metadata may say: checks on untrusted input before any of it
reaches the index or names a file.
"""

from __future__ import annotations

import re
from typing import Any

from adapterhub.errors import InvalidArtifactError

# Registry.push records "adapter", "base" and "source"; its callers may name
# others, so a remote's relation need only be a short plain word.
_RELATION_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")

_SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

MAX_PATH_BYTES = 1024  # a file's relative path, in UTF-8

MAX_COMPONENT_BYTES = 255  # one component of it (NAME_MAX on Linux)


def check_lineage(rows: Any, where: str) -> list[dict[str, Any]]:
    """Lineage rows from a remote: a list of ``{parent: sha256:<hex>, relation, recipe?}``, else refused.

    A well-formed parent digest is only a claim (no local artifact need have
    it); ``require-provenance`` is what checks it against a signed attestation.
    """
    if rows is None:
        return []
    if not isinstance(rows, list):
        raise InvalidArtifactError(f"{where}: the lineage is not a list")
    out = []
    for r in rows:
        if not isinstance(r, dict) or not isinstance(r.get("parent"), str) or not _SHA256_DIGEST.fullmatch(r["parent"]):
            raise InvalidArtifactError(f"{where}: a lineage row does not name a parent by sha256 digest: {str(r)[:80]!r}")
        if not isinstance(r.get("relation"), str) or not _RELATION_RE.fullmatch(r["relation"]):
            raise InvalidArtifactError(f"{where}: lineage relation {str(r.get('relation'))[:40]!r} is not a plain word "
                                       "(such as adapter, base or source)")
        recipe = r.get("recipe")
        if recipe is not None and not isinstance(recipe, dict):
            raise InvalidArtifactError(f"{where}: a lineage recipe is not an object")
        out.append({"parent": r["parent"], "relation": r["relation"], "recipe": recipe})
    return out


def check_text(value: Any, what: str, where: str) -> str | None:
    """A description or similar free text: a string or nothing."""
    if value is not None and not isinstance(value, str):
        raise InvalidArtifactError(f"{where}: the {what} is not a string")
    return value


def check_file_path(path: Any, where: str) -> str:
    """A file path a remote gives: a safe relative path of a length every filesystem here takes."""
    from adapterhub.manifest import check_relpath

    if not isinstance(path, str):
        raise InvalidArtifactError(f"{where}: a file name is not a string: {str(path)[:40]!r}")
    check_relpath(path)
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES or any(
        len(p.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES for p in path.split("/")
    ):
        raise InvalidArtifactError(f"{where}: the file name {path[:40]!r}… is too long "
                                   f"(over {MAX_PATH_BYTES} bytes, or a component over {MAX_COMPONENT_BYTES})")
    return path


def check_file_tree(paths: list[str], where: str) -> None:
    """No path may be both a file and the directory of another (``a`` and ``a/b``)."""
    files = set(paths)
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d in files:
                raise InvalidArtifactError(f"{where}: {d!r} is both a file and the directory of {p!r}")


def parse_json(data: bytes | str, what: str, *, max_bytes: int, max_depth: int = 32) -> Any:
    """A remote's JSON document, parsed within a size and a nesting cap (InvalidArtifactError otherwise).

    Manifests, configs, indexes, listings and token answers nest a few levels;
    a document nested deeper than ``max_depth`` is hostile, and is refused
    before Python's recursion limit turns it into a crash.
    """
    from adapterhub.jsonio import loads

    return loads(data, what=what, max_bytes=max_bytes, max_depth=max_depth)
