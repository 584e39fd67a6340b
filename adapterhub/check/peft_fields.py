"""The config keys the installed PEFT knows, read from its source without importing it.

Importing peft imports torch (several seconds), and ``adapterhub check`` must
stay fast, so the fields of PEFT's config dataclasses are read with ``ast``
from the installed package's files: the config class of a ``peft_type`` is the
one whose ``__post_init__`` sets ``self.peft_type = PeftType.<TYPE>``, and its
fields are the annotated class attributes of it and its base classes (followed
through ``from ... import`` lines). Parsing the two or three files involved
takes about 10 ms; the answer is cached for the life of the process.

PEFT loads a config with keys it does not know by dropping them with a
warning ("... saved using a higher version of the library"), which is what
this module lets ``check`` predict.

>>> fields = known_config_fields("LORA")          # doctest: +SKIP
>>> "lora_alpha" in fields.fields, fields.version  # doctest: +SKIP
(True, '0.21.2')
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PeftFields", "known_config_fields", "peft_version"]


@dataclass(frozen=True)
class PeftFields:
    version: str  # the installed peft's version
    peft_type: str
    known_type: bool  # False: the installed peft has no such peft_type
    config_class: str | None
    fields: frozenset[str]


def _peft_root() -> Path | None:
    # find_spec on a top-level name locates the package without running its __init__.
    try:
        spec = importlib.util.find_spec("peft")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def peft_version() -> str | None:
    """The installed peft's version, or None when peft is not installed."""
    root = _peft_root()
    if root is None:
        return None
    # peft/__init__.py assigns __version__ literally; reading it costs far less
    # than importing importlib.metadata (~30 ms).
    try:
        m = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", (root / "__init__.py").read_text(encoding="utf-8"), re.MULTILINE)
    except OSError:
        m = None
    if m:
        return m.group(1)
    import importlib.metadata

    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=64)
def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _module_file(root: Path, current: Path, node: ast.ImportFrom) -> Path | None:
    """The file a ``from X import Y`` inside the peft package refers to."""
    if node.level:
        base = current.parent
        for _ in range(node.level - 1):
            base = base.parent
        parts = (node.module or "").split(".") if node.module else []
    elif node.module and node.module.split(".")[0] == "peft":
        base = root
        parts = node.module.split(".")[1:]
    else:
        return None
    target = base.joinpath(*parts) if parts else base
    for cand in (target.with_suffix(".py"), target / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _class_fields(cls: ast.ClassDef) -> set[str]:
    out: set[str] = set()
    for stmt in cls.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        ann = ast.unparse(stmt.annotation)
        if "ClassVar" in ann or "InitVar" in ann:
            continue
        value = stmt.value
        if (
            isinstance(value, ast.Call)
            and ast.unparse(value.func).endswith("field")
            and any(
                kw.arg == "init" and isinstance(kw.value, ast.Constant) and kw.value.value is False
                for kw in value.keywords
            )
        ):
            continue  # not a constructor argument, so not accepted from a config file
        out.add(stmt.target.id)
    return out


def _find_class(root: Path, path: Path, name: str, depth: int = 0) -> tuple[ast.ClassDef, Path] | None:
    tree = _parse(path)
    if tree is None or depth > 4:
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node, path
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            real = next(a.name for a in node.names if (a.asname or a.name) == name)
            target = _module_file(root, path, node)
            if target is not None:
                return _find_class(root, target, real, depth + 1)
    return None


def _fields_with_bases(root: Path, cls: ast.ClassDef, path: Path, seen: set[str]) -> set[str]:
    fields = _class_fields(cls)
    for base in cls.bases:
        name = ast.unparse(base).split(".")[-1]
        if name in seen:
            continue
        seen.add(name)
        found = _find_class(root, path, name)
        if found is not None:
            fields |= _fields_with_bases(root, found[0], found[1], seen)
    return fields


def _sets_peft_type(cls: ast.ClassDef, peft_type: str) -> bool:
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and node.attr == peft_type and ast.unparse(node.value).endswith("PeftType"):
            return True
    return False


def _known_types(root: Path) -> set[str]:
    tree = _parse(root / "utils" / "peft_types.py")
    out: set[str] = set()
    if tree is None:
        return out
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "PeftType":
            for stmt in node.body:
                if isinstance(stmt, ast.Assign):
                    out.update(t.id for t in stmt.targets if isinstance(t, ast.Name))
    return out


@functools.lru_cache(maxsize=32)
def known_config_fields(peft_type: str) -> PeftFields | None:
    """The constructor fields of the installed peft's config class for ``peft_type``.

    Returns None when peft is not installed. ``known_type`` is False when the
    installed peft has no such method (then ``fields`` holds only the fields
    every PEFT config shares).
    """
    root = _peft_root()
    version = peft_version()
    if root is None or version is None:
        return None
    peft_type = peft_type.upper()
    types = _known_types(root)
    candidates = [root / "tuners" / peft_type.lower() / "config.py"]
    candidates += sorted(p for p in (root / "tuners").glob("*/config.py") if p not in candidates)
    for path in candidates:
        tree = _parse(path) if path.is_file() else None
        if tree is None:
            continue
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and _sets_peft_type(node, peft_type):
                fields = _fields_with_bases(root, node, path, {node.name})
                return PeftFields(version, peft_type, True, node.name, frozenset(fields))
    # Unknown method (or one whose config sets no peft_type): the common fields only.
    common: set[str] = set()
    found = _find_class(root, root / "config.py", "PeftConfig")
    if found is not None:
        common = _fields_with_bases(root, found[0], found[1], {"PeftConfig"})
    return PeftFields(version, peft_type, peft_type in types, None, frozenset(common))
