"""The one output sink: control characters from untrusted artifacts are escaped
in human output, colour follows NO_COLOR, third-party chatter stays off the
terminal unless -v, and Windows stops at start-up with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import run_cli
from .factories import fake_lora, patch_json

ESC_NAME = "notes\x1b]0;pwned\x07\x1b[2J.txt"  # sets the terminal title and clears the screen, raw


def hostile_adapter(tmp_path):
    d = fake_lora(tmp_path / "a")
    (d / ESC_NAME).write_text("hello")
    patch_json(d / "adapter_config.json", base_model_name_or_path="org/base\x1b[31m\nforged: line")
    return d


def test_escape_sequences_in_file_names_and_metadata_are_escaped(cli, tmp_path):
    d = hostile_adapter(tmp_path)
    for args in (("inspect", d), ("push", d, "team/esc", "-d", "about\x1b[5m"), ("show", "team/esc", "--files"),
                 ("ls",), ("search", "about")):
        r = cli(*args)
        assert r.exit_code == 0, (args, r.stderr)
        text = r.stdout + r.stderr
        assert "\x1b" not in text and "\x07" not in text, args
    shown = cli("show", "team/esc", "--files").stdout
    assert "notes\\x1b]0;pwned\\x07\\x1b[2J.txt" in shown  # visible, as it is
    assert "description: about\\x1b[5m" in shown
    listing = cli("ls").stdout
    assert "org/base\\x1b[31m\\nforged: line" in listing  # a table cell stays one line
    assert not any(line.startswith("forged") for line in listing.splitlines())


def test_json_keeps_the_real_names(cli, tmp_path):
    d = hostile_adapter(tmp_path)
    cli("push", d, "team/esc")
    data = json.loads(cli("show", "team/esc", "--files", "--json").stdout)
    assert ESC_NAME in [f["path"] for f in data["files"]]
    assert data["inspection"]["base_model"] == "org/base\x1b[31m\nforged: line"


def test_error_messages_are_escaped(cli, tmp_path):
    d = tmp_path / "x\x1b[2Jy"
    r = cli("inspect", d)
    assert r.exit_code == 3
    assert "\x1b" not in r.stderr and "x\\x1b[2Jy" in r.stderr


def test_escape_keeps_ordinary_text():
    from adapterhub.cli._output import escape

    assert escape("team/qa-lora:1  3 files\nnext line\ttab") == "team/qa-lora:1  3 files\nnext line\ttab"
    assert escape("a\nb", one_line=True) == "a\\nb"
    assert escape("ünïcödé ✓") == "ünïcödé ✓"
    assert escape("\u202eevil") == "\\u202eevil"  # right-to-left override
    assert escape("\x9b31m") == "\\x9b31m"  # C1 control sequence introducer


def _tty():
    master, slave = os.openpty()
    return os.fdopen(master, "w"), os.fdopen(slave, "w")


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch):
    from adapterhub.cli._output import use_color

    master, tty = _tty()
    try:
        monkeypatch.delenv("NO_COLOR", raising=False)
        monkeypatch.setenv("TERM", "xterm")
        assert use_color(tty) is True
        monkeypatch.setenv("NO_COLOR", "1")
        assert use_color(tty) is False
        monkeypatch.delenv("NO_COLOR")
        monkeypatch.setenv("TERM", "dumb")
        assert use_color(tty) is False
    finally:
        tty.close()
        master.close()
    assert use_color(sys.stdout) is sys.stdout.isatty()


def test_error_prefix_on_a_terminal_is_coloured_unless_no_color(tmp_path):
    """A real pty as stderr: `error:` is red there, and plain with NO_COLOR."""
    import pty

    def stderr_on_tty(env_extra):
        env = {**os.environ, "TERM": "xterm", **env_extra}
        env.pop("NO_COLOR", None) if "NO_COLOR" not in env_extra else None
        master, slave = pty.openpty()
        p = subprocess.Popen([sys.executable, "-m", "adapterhub.cli", "show", "nope/nope"], stderr=slave,
                             stdout=subprocess.DEVNULL, env=env)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        p.wait()
        os.close(master)
        return p.returncode, b"".join(chunks).decode()

    code, text = stderr_on_tty({})
    assert code == 3 and "\x1b[" in text and "error:" in text
    code, text = stderr_on_tty({"NO_COLOR": "1"})
    assert code == 3 and "\x1b" not in text and text.startswith("error: ")


QUIET_PROBE = """
import logging, sys, warnings
from adapterhub.cli._output import quiet_libraries
quiet_libraries(verbose=sys.argv[1] == "1")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("KERNEL-HUB MESSAGE")
warnings.warn_explicit("PEFT USERWARNING", UserWarning, "peft/tuners/x.py", 1, module="peft.tuners.x")
warnings.warn_explicit("TRANSFORMERS FUTUREWARNING", FutureWarning, "transformers/x.py", 1, module="transformers.x")
import peft  # the real library: on this machine it loads bitsandbytes, whose CPU backend may log a warning
"""


def test_third_party_warnings_stay_off_the_terminal_unless_verbose():
    quiet = subprocess.run([sys.executable, "-c", QUIET_PROBE, "0"], capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    loud = subprocess.run([sys.executable, "-c", QUIET_PROBE, "1"], capture_output=True, text=True)
    assert loud.returncode == 0
    for text in ("KERNEL-HUB MESSAGE", "PEFT USERWARNING", "TRANSFORMERS FUTUREWARNING"):
        assert text in loud.stderr


def test_the_cli_quiets_libraries_and_v_lets_them_through(tmp_path):
    """Through the real entry point: the group callback applies it before the command runs."""
    code = (
        "import sys, warnings, runpy\n"
        "import adapterhub.cli.registry_cmds as m\n"
        "orig = m.registry_ls.callback\n"
        "def noisy(*a, **k):\n"
        "    warnings.warn_explicit('LIB FUTUREWARNING', FutureWarning, 'transformers/x.py', 1, module='transformers.x')\n"
        "    return orig(*a, **k)\n"
        "m.registry_ls.callback = noisy\n"
        "sys.argv = ['adapterhub', *sys.argv[1:]]\n"
        "runpy.run_module('adapterhub.cli', run_name='__main__')\n"
    )
    quiet = subprocess.run([sys.executable, "-c", code, "ls", "--json"], capture_output=True, text=True)
    assert quiet.returncode == 0 and "LIB FUTUREWARNING" not in quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code, "-v", "ls", "--json"], capture_output=True, text=True)
    assert loud.returncode == 0 and "LIB FUTUREWARNING" in loud.stderr
    debug = subprocess.run([sys.executable, "-c", code, "ls", "--json"], capture_output=True, text=True,
                           env={**os.environ, "ADAPTERHUB_DEBUG": "1"})
    assert "LIB FUTUREWARNING" in debug.stderr


def test_windows_stops_at_start_up_with_a_clear_message():
    # click and adapterhub import on Windows; main() is where it stops (simulated: the platform is set after import)
    code = "import sys; from adapterhub.cli import main; sys.platform = 'win32'; main()"
    r = subprocess.run([sys.executable, "-c", code, "ls"], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip() == "error: adapterhub does not support Windows yet; use Linux, or WSL 2 on Windows"
    assert r.stdout == ""


def test_progress_bars_only_on_a_terminal(monkeypatch):
    from adapterhub.cli._output import PROGRESS_MIN_BYTES, Output

    monkeypatch.delenv("ADAPTERHUB_PROGRESS", raising=False)
    big = PROGRESS_MIN_BYTES * 2
    assert type(Output().progress("x", big)).__name__ == "_Null"  # stderr is a pipe under pytest
    assert Output().steps("batch") is None
    monkeypatch.setenv("ADAPTERHUB_PROGRESS", "1")
    bar = Output().progress("x", big)
    assert type(bar).__name__ == "tqdm"
    bar.close()
    assert Output().steps("batch") is not None
    assert type(Output(json_=True).progress("x", big)).__name__ == "_Null"  # never with --json
    assert Output(quiet=True).steps("batch") is None
    assert type(Output().progress("x", 10)).__name__ == "_Null"  # small transfers: no bar


def test_push_in_a_pipe_prints_no_bar(tmp_path):
    src = fake_lora(tmp_path / "a")
    r = run_cli("push", src, "qa", env={"ADAPTERHUB_PROGRESS": ""})
    assert r.returncode == 0 and "\r" not in r.stderr and "it/s" not in r.stderr
