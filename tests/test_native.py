"""The optional C kernels: built by the developer set-up and CI, and switched off by ADAPTERHUB_NO_NATIVE.

Each kernel's bytes are compared with its reference where it is used
(tests/test_gguf_quant.py, tests/test_bnb_cpu.py); this file checks only that
the libraries are there, so a broken build cannot leave every test on the
torch fallback unnoticed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from adapterhub.converters.formats import native

KERNELS = ("ggml", "bnb")


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler: the kernels are optional")
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_is_built_where_a_compiler_is(name: str) -> None:
    assert native.built(name), f"converters/_c/{name}_kernels.c did not build: run `pip install -e .` again and read its output"


@pytest.mark.parametrize("name", KERNELS)
def test_no_native_switches_a_kernel_off(name: str) -> None:
    code = f"from adapterhub.converters.formats import native; print(native.load({name!r}) is None, native.built({name!r}))"
    env_off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"ADAPTERHUB_NO_NATIVE": "1", "PATH": ""}).stdout.split()
    assert env_off == ["True", str(native.built(name))]


def test_an_unknown_kernel_is_none() -> None:
    assert native.load("nope") is None
