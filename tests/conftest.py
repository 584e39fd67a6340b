"""Every test gets its own registry home; helpers for running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent


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


def make_files(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def fake_lora(
    root: Path,
    r: int = 8,
    alpha: int = 16,
    base: str = "meta-llama/Llama-2-7b-hf",
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Path:
    """A small, valid PEFT LoRA adapter dir built without torch (fast)."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in range(layers):
        for t in targets:
            pre = f"base_model.model.model.layers.{i}.self_attn.{t}"
            tensors[f"{pre}.lora_A.weight"] = rng.standard_normal((r, hidden)).astype(np.float32)
            tensors[f"{pre}.lora_B.weight"] = rng.standard_normal((hidden, r)).astype(np.float32)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "base_model_name_or_path": base,
        "revision": None,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (root / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return root


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline (HF_HUB_CACHE, HF_HUB_OFFLINE=1)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="session")
def oci(tmp_path_factory: pytest.TempPathFactory):
    """A real OCI registry (Distribution 2.8) on loopback, shared by the remote tests; each uses its own namespace."""
    from tests import _oci_server

    server = _oci_server.start_or_skip(tmp_path_factory)
    yield server
    server.stop()
