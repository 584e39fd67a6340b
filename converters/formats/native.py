"""The optional C kernels (converters/_c/), loaded with ctypes.

``setup.py`` compiles each kernel into a shared library inside this package
when a C compiler is there; the library has no Python C API, and ctypes
releases the GIL for every call, so several threads run kernels at once.
Without the library (no compiler at install time, or ``ADAPTERHUB_NO_NATIVE=1``
in the environment), ``load`` returns None and the callers take their torch
path, which writes the same bytes.

>>> lib = load("ggml")                                       # doctest: +SKIP
>>> lib is None or lib.ah_abi_version() == ABI_VERSION
True
"""

from __future__ import annotations

import ctypes
import functools
import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

#: What ``ah_abi_version()`` must return: a library built from other sources is not used.
ABI_VERSION = 1

_DIR = Path(__file__).resolve().parent.parent  # the adapterhub.converters package folder


def disabled() -> bool:
    """True when ``ADAPTERHUB_NO_NATIVE`` asks for the torch paths (tests, comparisons)."""
    return os.environ.get("ADAPTERHUB_NO_NATIVE", "") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _find(name: str) -> ctypes.CDLL | None:
    for suffix in EXTENSION_SUFFIXES:
        path = _DIR / f"_{name}_kernels{suffix}"
        if path.is_file():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                return None
            lib.ah_abi_version.restype = ctypes.c_int
            lib.ah_abi_version.argtypes = []
            return lib if lib.ah_abi_version() == ABI_VERSION else None
    return None


def load(name: str) -> ctypes.CDLL | None:
    """The kernel library ``name`` ("ggml" or "bnb"), or None where it is not built or is disabled."""
    if disabled():
        return None
    return _find(name)


def built(name: str) -> bool:
    """Whether the library ``name`` is installed and loads (whatever ``ADAPTERHUB_NO_NATIVE`` says)."""
    return _find(name) is not None
