"""Every command has help with an example and speaks the one dialect; the CLI
reference in docs/cli.md is current; start-up stays light."""

import re
import subprocess
import sys

import pytest

from adapterhub.cli import COMMANDS

from .conftest import REPO, run_cli


def _walk():
    """(path, command) for every command and subcommand, groups included."""
    import click

    from adapterhub.cli import cli as group

    ctx = click.Context(group, info_name="adapterhub")

    def walk(cmd, path):
        yield path, cmd
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                yield from walk(cmd.get_command(ctx, name), (*path, name))

    return list(walk(group, ()))[1:]


ALL_COMMANDS = [" ".join(p) for p, _ in _walk()]


@pytest.mark.parametrize("name", ALL_COMMANDS)
def test_every_command_has_help_with_example(cli, name):
    r = cli(*name.split(), "--help")
    assert r.exit_code == 0
    assert "Example" in r.stdout, f"{name} --help has no example"
    assert f"adapterhub {name}" in r.stdout


def test_every_command_is_walked():
    assert {"keys ls", "trust ls", "remote ls", "policy set", "verify"} <= set(ALL_COMMANDS)
    assert set(COMMANDS) <= set(ALL_COMMANDS)


def test_one_meaning_per_short_option():
    """`-t` is --tag wherever it appears, never --tolerance somewhere else."""
    import click

    meaning: dict[str, set[str]] = {}
    for path, cmd in _walk():
        for p in cmd.params:
            if isinstance(p, click.Option):
                longs = sorted(o for o in p.opts if o.startswith("--"))
                for short in (o for o in p.opts + p.secondary_opts if not o.startswith("--")):
                    meaning.setdefault(short, set()).add(longs[0] if longs else p.name)
    clashes = {s: m for s, m in meaning.items() if len(m) > 1}
    assert not clashes, f"short options with several meanings: {clashes}"
    assert meaning["-t"] == {"--tag"}


def test_one_word_for_a_namespace_scope():
    import click

    for path, cmd in _walk():
        for p in cmd.params:
            if isinstance(p, click.Option):
                shown = p.get_help_record(click.Context(cmd)) or ("",)
                assert "--scope" not in shown[0] and "--prefix" not in shown[0], " ".join(path)


def test_ls_everywhere_and_list_is_an_alias(cli):
    for group in ("keys", "trust", "remote"):
        r = cli(group, "--help")
        assert "  ls " in r.stdout and "  list " not in r.stdout, group
        a, b = cli(group, "ls", "--json"), cli(group, "list", "--json")
        assert a.exit_code == b.exit_code == 0 and a.stdout == b.stdout == "[]\n", group
    a, b = cli("ls", "--json"), cli("list", "--json")
    assert a.exit_code == b.exit_code == 0 and a.stdout == b.stdout
    assert "  list " not in cli("--help").stdout


def test_old_spelling_of_an_option_still_parses(cli, tmp_path):
    """`trust add --scope` (now --namespace) keeps working for existing scripts."""
    import json

    cli("keys", "generate", "alice", "--no-trust")
    pub = tmp_path / "alice.pub"
    pub.write_text(json.loads(cli("keys", "export", "alice", "--json").stdout)["public_key_pem"])
    r = cli("trust", "add", pub, "--name", "alice", "--scope", "team", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["scopes"] == ["team"]
    r = cli("trust", "add", pub, "--name", "alice", "--namespace", "team", "--namespace", "ml", "--replace", "--json")
    assert r.exit_code == 0 and set(json.loads(r.stdout)["scopes"]) == {"ml", "team"}


def test_command_modules_are_named_one_way():
    """Each command lives in adapterhub/cli/<topic>_cmds.py."""
    modules = {target.partition(":")[0] for target in COMMANDS.values()}
    wrong = {m for m in modules if not m.rsplit(".", 1)[1].endswith("_cmds")}
    assert not wrong, wrong


def test_inspect_takes_a_registry_ref(cli, tmp_path):
    import json

    from .conftest import fake_lora

    src = fake_lora(tmp_path / "a")
    cli("push", src, "team/qa", "--tag", "prod")
    by_path = json.loads(cli("inspect", src, "--hash", "--json").stdout)
    r = cli("inspect", "team/qa@prod", "--hash", "--json")
    assert r.exit_code == 0
    by_ref = json.loads(r.stdout)
    assert by_ref["digest"] == by_path["digest"] and by_ref["rank"] == by_path["rank"] == 8
    assert cli("inspect", "team/qa:1").stdout.splitlines()[0] == "team/qa:1"
    r = cli("inspect", "team/nope")
    assert r.exit_code == 3 and "no such path or registry ref" in r.stderr
    assert list((tmp_path / "a").iterdir())  # the source is untouched


def test_cli_reference_is_current():
    from adapterhub.cli.reference import render

    page = (REPO / "docs" / "cli.md").read_text()
    start, end = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"
    assert start in page and end in page
    current = page.split(start)[1].split(end)[0].strip()
    assert current == render().strip(), "docs/cli.md is stale: run `python -m adapterhub.cli.reference --write`"


def test_cli_reference_covers_subcommands():
    from adapterhub.cli.reference import render

    text = render()
    for name in ALL_COMMANDS:
        assert f"`adapterhub {name}`" in text, name


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


@pytest.mark.parametrize("command", ["push", "inspect"])
def test_push_and_inspect_do_not_import_numpy_or_heavier(tmp_path, command):
    """push and inspect read safetensors headers themselves: no numpy (safetensors' binding imports it), no torch."""
    from .conftest import fake_lora

    src = fake_lora(tmp_path / "a")
    assert run_cli("ls").returncode == 0  # the index exists first (migrations may import more)
    argv = ["adapterhub", "push", str(src), "a:1"] if command == "push" else ["adapterhub", "inspect", str(src)]
    code = (
        f"import sys, runpy; sys.argv = {argv!r};\n"
        "try:\n    runpy.run_module('adapterhub.cli', run_name='__main__')\n"
        "except SystemExit as e: print('EXIT', e.code)\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "EXIT 0" in out.stdout and "HEAVY []" in out.stdout, out.stdout + out.stderr


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
    r = run_cli("--bogus-flag")  # (--bogus alone gets "Did you mean --verbose?")
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == "error: No such option '--bogus-flag'."
