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


def test_closed_stdout_exits_quietly(tmp_path):
    import os

    from .conftest import fake_lora

    src = fake_lora(tmp_path / "a")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write, as after `| head -0`
    try:
        r = subprocess.run(
            [sys.executable, "-m", "adapterhub.cli", "inspect", str(src)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, check=False,
        )
    finally:
        os.close(write_end)
    assert r.stderr == ""
    assert r.returncode == 141  # 128 + SIGPIPE, as `ls | head` reports


def test_usage_errors_with_json_print_json(cli, tmp_path):
    import json

    r = cli("show", "--json")  # missing REF
    assert r.exit_code == 2
    assert json.loads(r.stdout) == {"error": "Missing argument 'REF'.", "hint": None, "exit_code": 2}
    from .conftest import fake_lora

    cli("push", fake_lora(tmp_path / "a"), "qa")
    r = cli("rm", "qa:1", "--json")  # not a terminal, no --yes
    assert r.exit_code == 2 and "--yes" in json.loads(r.stdout)["error"]
    r = cli("search", "--rank", "x", "--json")
    assert r.exit_code == 2 and json.loads(r.stdout)["exit_code"] == 2


def test_usage_errors_end_with_one_error_line(cli):
    r = cli("show")
    assert r.exit_code == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines[0].startswith("Usage: ") and " show [OPTIONS] REF" in lines[0]
    assert lines[-1] == "error: Missing argument 'REF'."
    r = run_cli("--bogus")
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == "error: No such option '--bogus'."
