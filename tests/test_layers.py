"""The architecture, enforced: layering, no import cycles, and module and
function sizes (see docs/architecture.md and the README's code map).

Imports are read with ``ast`` (nothing is imported). Floors, lowest first:

0 core        adapterhub/{errors,config,refs,manifest,artifact,fsutil,...}.py
1 inspect     adapterhub/inspect/          headers only
2 registry    registry/   [adapterhub.registry]
  converters  converters/ [adapterhub.converters]   (never the registry)
3 trust       adapterhub/trust/
4 services    adapterhub/convert.py, sources.py, check/
5 verify      adapterhub/verify/
6 cli         adapterhub/cli/                     (nothing imports it)
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder on disk -> import name
TREES = {"adapterhub": "adapterhub", "registry": "adapterhub.registry", "converters": "adapterhub.converters"}
# The core: modules directly in adapterhub/ that import nothing above them.
# Any other module directly in adapterhub/ is a service (floor 4).
CORE = {
    "adapterhub.errors",
    "adapterhub.config",
    "adapterhub.refs",
    "adapterhub.manifest",
    "adapterhub.artifact",
    "adapterhub.fsutil",
    "adapterhub.jsonio",
    "adapterhub.modelcard",
    "adapterhub.progress",
    "adapterhub.platform",
    "adapterhub.textutil",
}
# what each layer may import (besides itself)
ALLOWED = {
    "core": {"core"},
    "inspect": {"core"},
    "registry": {"core", "inspect"},
    "converters": {"core", "inspect"},
    "trust": {"core", "inspect", "registry", "converters"},
    "services": {"core", "inspect", "registry", "converters", "trust"},
    "verify": {"core", "inspect", "registry", "converters", "trust", "services"},
    "cli": {"core", "inspect", "registry", "converters", "trust", "services", "verify"},
}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


def modules() -> dict[str, Path]:
    out = {}
    for folder, name in TREES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = path
    return out


def layer(mod: str) -> str:
    if mod == "adapterhub":
        return "root"
    for prefix, lay in (
        ("adapterhub.registry", "registry"),
        ("adapterhub.converters", "converters"),
        ("adapterhub.inspect", "inspect"),
        ("adapterhub.trust", "trust"),
        ("adapterhub.check", "services"),
        ("adapterhub.convert", "services"),
        ("adapterhub.verify", "verify"),
        ("adapterhub.cli", "cli"),
    ):
        if mod == prefix or mod.startswith(prefix + "."):
            return lay
    if mod == "adapterhub.__main__":
        return "cli"
    return "core" if mod in CORE else "services"


def imports(mod: str, path: Path, *, module_level_only: bool) -> Iterator[tuple[str, int]]:
    """(imported module, line) for each import of an adapterhub module."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]

    def walk(node: ast.AST, top: bool) -> Iterator[tuple[str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import) and (top or not module_level_only):
                for a in child.names:
                    yield a.name, child.lineno
            elif isinstance(child, ast.ImportFrom) and (top or not module_level_only):
                base = child.module or ""
                if child.level:
                    parts = pkg.split(".")
                    parts = parts[: len(parts) - (child.level - 1)]
                    base = ".".join(parts + ([child.module] if child.module else []))
                for a in child.names:
                    yield (f"{base}.{a.name}" if f"{base}.{a.name}" in ALL else base), child.lineno
            yield from walk(child, top and not nested)

    for name, line in walk(tree, True):
        if name.split(".")[0] in ("adapterhub", "registry", "converters"):
            yield name, line


ALL = modules()


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def resolve(name: str) -> str:
    """The module an import names (a name imported from a package is the package)."""
    while name not in ALL and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def test_no_top_level_registry_or_converters_imports():
    bad = [
        f"{ALL[m].relative_to(ROOT)}:{line}: import {name}"
        for m in ALL
        for name, line in imports(m, ALL[m], module_level_only=False)
        if name.split(".")[0] in ("registry", "converters")
    ]
    assert not bad, "import adapterhub.registry / adapterhub.converters instead:\n" + "\n".join(bad)


def layering_violations() -> list[str]:
    bad = []
    for m, path in ALL.items():
        lay = layer(m)
        if lay == "root":
            continue
        for name, line in imports(m, path, module_level_only=False):
            target = layer(resolve(name))
            if target in (lay, "root"):
                continue
            if target not in ALLOWED[lay]:
                bad.append(f"{rel(path)}:{line}: {lay} imports {name} ({target})")
    return bad


def test_layers_import_only_downwards():
    bad = layering_violations()
    assert not bad, "imports across the layers:\n" + "\n".join(bad)


def test_the_checker_catches_a_forbidden_import(monkeypatch, tmp_path):
    """Proof that the rule can fail: a converters module that imports the registry."""
    fake = tmp_path / "bad.py"
    fake.write_text("from adapterhub.registry import Registry\n")
    monkeypatch.setitem(ALL, "adapterhub.converters.bad", fake)
    assert any("converters imports adapterhub.registry" in v for v in layering_violations())


def module_cycles() -> list[list[str]]:
    graph = {m: sorted({resolve(n) for n, _ in imports(m, p, module_level_only=True)} - {m}) for m, p in ALL.items()}
    # A submodule import runs its package's __init__ too.
    for m in list(graph):
        graph[m] = [t for t in graph[m] if t in graph and not m.startswith(t + ".")]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan, recursive: the graph is small
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles_at_module_level():
    assert module_cycles() == []


@pytest.mark.parametrize("folder", sorted(TREES))
def test_module_sizes(folder):
    big = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in sorted(q for ext in ("py", "c", "h") for q in (ROOT / folder).rglob(f"*.{ext}"))
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not big, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(big)


@pytest.mark.parametrize("folder", sorted(TREES))
def test_function_sizes(folder):
    big = []
    for p in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    big.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not big, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(big)


def test_c_function_sizes():
    """The C kernels follow the same limit: a function is from a line opening a body at column 0 to its closing brace."""
    big = []
    for p in sorted((ROOT / "converters" / "_c").glob("*.[ch]")):
        lines = p.read_text().splitlines()
        start = None
        for i, line in enumerate(lines):
            if start is None and line[:1].isalpha() and "(" in line and "=" not in line and not line.endswith((";", "}")):
                start = i
            elif start is not None and line == "}":
                if i - start + 1 > MAX_FUNCTION_LINES:
                    big.append(f"{p.relative_to(ROOT)}:{start + 1}: {i - start + 1} lines")
                start = None
    assert not big, f"C functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(big)


def test_sql_lives_in_the_registry():
    sql = re.compile(r"\.execute(many|script)?\(|\bconn\.|\.conn\b")
    bad = [
        f"{ALL[m].relative_to(ROOT)}:{i}"
        for m in ALL
        if layer(m) != "registry"
        for i, line in enumerate(ALL[m].read_text().splitlines(), 1)
        if sql.search(line)
    ]
    assert not bad, "SQL outside registry/:\n" + "\n".join(bad)


def test_every_package_is_installed():
    """pyproject lists packages by hand (package-dir mapping): none may be missing."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {m for m, p in ALL.items() if p.name == "__init__.py"}
    assert on_disk == listed


def test_a_users_own_registry_and_converters_modules_do_not_shadow_ours(tmp_path):
    """From a notebook folder holding its own registry.py and converters.py,
    `from adapterhub import Registry` still works, and nothing named
    `registry` or `converters` is installed at the top level."""
    import subprocess
    import sys

    (tmp_path / "registry.py").write_text("raise ImportError('the user registry.py was imported')\n")
    (tmp_path / "converters.py").write_text("raise ImportError('the user converters.py was imported')\n")
    code = (
        "from adapterhub import Registry\n"
        "import adapterhub.converters, adapterhub.registry\n"
        "assert Registry.__module__ == 'adapterhub.registry.registry', Registry.__module__\n"
        "import os, sys, importlib.util\n"
        "os.remove('registry.py'); os.remove('converters.py')\n"
        "sys.path_importer_cache.clear()\n"
        "print(importlib.util.find_spec('registry'), importlib.util.find_spec('converters'))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None None"
