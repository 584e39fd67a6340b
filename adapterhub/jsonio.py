"""The one JSON reader for untrusted input: adapter and model configs, GGUF
metadata strings, remote manifests, configs and signature referrers.

``json.loads`` alone turns a deeply nested document into a ``RecursionError``
and reads a document of any size. Here every read has a size cap and a depth
cap, and every failure is an :class:`~adapterhub.errors.InvalidArtifactError`
naming what was being read:

>>> loads('{"r": 8}', what="adapter_config.json")
{'r': 8}
>>> loads("[" * 100 + "]" * 100, what="x")  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
InvalidArtifactError: x: JSON nested deeper than 64 levels
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from adapterhub.errors import InvalidArtifactError

MAX_DEPTH = 64
MAX_BYTES = 16 << 20  # configs, tokenizer configs and manifests are far smaller


def depth_of(value: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a parsed JSON value, counted without recursion; stops past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def loads(data: bytes | str, *, what: str, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``data`` as JSON within the caps, or raise InvalidArtifactError(``what``: reason)."""
    if len(data) > max_bytes:
        raise InvalidArtifactError(f"{what}: {len(data)} bytes of JSON, more than the {max_bytes}-byte limit")
    try:
        value = json.loads(data)
    except RecursionError:
        raise InvalidArtifactError(f"{what}: JSON nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as e:
        raise InvalidArtifactError(
            f"{what}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg}): not valid JSON"
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArtifactError(f"{what}: not valid JSON ({e})") from None
    if depth_of(value, max_depth) > max_depth:
        raise InvalidArtifactError(f"{what}: JSON nested deeper than {max_depth} levels")
    return value


def read_json(
    path: str | os.PathLike[str],
    *,
    what: str | None = None,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    expect: type | None = dict,
) -> Any:
    """Read and parse a JSON file within the caps; ``expect`` checks the top-level type."""
    p = Path(path)
    what = what or p.name
    try:
        with p.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise InvalidArtifactError(f"{what}: cannot read ({e.strerror or e})") from None
    value = loads(data, what=what, max_bytes=max_bytes, max_depth=max_depth)
    if expect is not None and not isinstance(value, expect):
        raise InvalidArtifactError(f"{what}: expected a JSON {_kind(expect)}, found {_kind(type(value))}")
    return value


def _kind(t: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        t, "null" if t is type(None) else t.__name__
    )
