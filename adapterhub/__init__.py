"""adapterhub: a package manager and registry for PEFT adapters.

>>> from adapterhub import Registry, inspect_path     # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from adapterhub.registry import Registry

    from adapterhub.inspect import inspect_path

__all__ = ["Registry", "inspect_path", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import adapterhub` (and the CLI's start-up) stays cheap.
    if name == "Registry":
        from adapterhub.registry import Registry

        return Registry
    if name == "inspect_path":
        from adapterhub.inspect import inspect_path

        return inspect_path
    raise AttributeError(name)
