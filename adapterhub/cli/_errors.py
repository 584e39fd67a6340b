"""One place that turns exceptions into a message and an exit code."""

from __future__ import annotations

import errno
import json
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import click

from adapterhub import config
from adapterhub.errors import AdapterhubError, StorageError


def _message(exc: BaseException) -> tuple[str, str | None, int]:
    if isinstance(exc, AdapterhubError):
        return str(exc), exc.hint, exc.exit_code
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return (
            f"this command needs the Python package {exc.name.split('.')[0]!r}, which is not installed",
            "pip install -c constraints.txt 'adapterhub[ml]' (torch==2.13.0 first)",
            1,
        )
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


@contextmanager
def handle_errors() -> Iterator[None]:
    try:
        yield
    except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
        raise
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - this is the one place that maps them
        if config.debug():
            traceback.print_exc()
        msg, hint, code = _message(exc)
        ctx = click.get_current_context(silent=True)
        if ctx is not None and _wants_json(ctx):
            click.echo(json.dumps({"error": msg, "hint": hint, "exit_code": code}))
        click.echo(f"error: {msg}", err=True)
        if hint:
            click.echo(f"hint: {hint}", err=True)
        sys.exit(code)


def _wants_json(ctx: click.Context) -> bool:
    # Set by Output when a command runs with --json (ctx.meta is shared by
    # the group's and the subcommand's contexts).
    return bool(ctx.meta.get("adapterhub.json"))
