"""Every command has help with an example; the README's CLI reference is current;
start-up stays light."""

import re
import subprocess
import sys

import pytest

from adapterhub.cli import COMMANDS

from .conftest import REPO, run_cli


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_with_example(cli, name):
    r = cli(name, "--help")
    assert r.exit_code == 0
    assert "Example" in r.stdout, f"{name} --help has no example"
    assert f"adapterhub {name}" in r.stdout


def test_readme_cli_reference_is_current():
    from adapterhub.cli.reference import render

    readme = (REPO / "README.md").read_text()
    start, end = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"
    assert start in readme and end in readme
    current = readme.split(start)[1].split(end)[0].strip()
    assert current == render().strip(), "README CLI reference is stale: run `python -m adapterhub.cli.reference --write`"


def test_ls_does_not_import_heavy_modules(tmp_path):
    assert run_cli("ls").returncode == 0  # first open creates the index (migrations may import more)
    code = (
        "import sys, runpy; sys.argv = ['adapterhub', 'ls', '--json'];\n"
        "try:\n    runpy.run_module('adapterhub.cli', run_name='__main__')\n"
        "except SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'sqlite_utils', 'numpy', 'safetensors') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_version_and_unknown_command():
    r = run_cli("--version")
    assert r.returncode == 0 and re.search(r"\d+\.\d+\.\d+", r.stdout)
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "No such command" in r.stderr
