"""The ``adapterhub`` command: wiring only.

Each command group lives in its own module and is imported only when it runs
(``LazyGroup``), so ``adapterhub ls`` never imports torch or sqlite-utils.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import NoReturn

import click

from adapterhub import __version__

from adapterhub.cli._common import COMMAND_ALIASES
from adapterhub.cli._errors import handle_errors, stdout_closed

# command name -> "module:function", loaded on first use
COMMANDS = {
    "push": "adapterhub.cli.registry_cmds:registry_push",
    "pull": "adapterhub.cli.registry_cmds:registry_pull",
    "ls": "adapterhub.cli.registry_cmds:registry_ls",
    "show": "adapterhub.cli.registry_cmds:registry_show",
    "search": "adapterhub.cli.registry_cmds:registry_search",
    "tag": "adapterhub.cli.registry_cmds:registry_tag",
    "untag": "adapterhub.cli.registry_cmds:registry_untag",
    "lineage": "adapterhub.cli.registry_cmds:registry_lineage",
    "rm": "adapterhub.cli.maintenance_cmds:registry_rm",
    "gc": "adapterhub.cli.maintenance_cmds:registry_gc",
    "fsck": "adapterhub.cli.maintenance_cmds:registry_fsck",
    "inspect": "adapterhub.cli.inspect_cmds:inspect_cmd",
    "check": "adapterhub.cli.check_cmds:check_cmd",
    "merge": "adapterhub.cli.convert_cmds:convert_merge",
    "quantize": "adapterhub.cli.convert_cmds:convert_quantize",
    "dequantize": "adapterhub.cli.convert_cmds:convert_dequantize",
    "extract": "adapterhub.cli.extract_cmds:extract_cmd",
    "convert": "adapterhub.cli.formats_cmds:formats_convert",
    "keys": "adapterhub.cli.keys_cmds:keys_group",
    "sign": "adapterhub.cli.sign_cmds:sign_cmd",
    "verify": "adapterhub.cli.verify_cmds:verify_cmd",
    "verify-signature": "adapterhub.cli.sign_cmds:verify_signature",
    "trust": "adapterhub.cli.trust_cmds:trust_group",
    "policy": "adapterhub.cli.trust_cmds:policy_group",
    "provenance": "adapterhub.cli.sign_cmds:provenance_cmd",
    "remote": "adapterhub.cli.remote_cmds:remote_group",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name) or COMMANDS.get(COMMAND_ALIASES.get(name, ""))
        if target is None:
            return None
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[no-untyped-def, override]
        with handle_errors():  # `adapterhub --bogus` is a usage error like any other
            return super().make_context(info_name, args, parent=parent, **extra)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Kept so that an error found while parsing a command's arguments,
        # before it runs, still honours --json.
        ctx.meta["adapterhub.args"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        with handle_errors():
            return super().invoke(ctx)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adapterhub")
@click.option("--verbose", "-v", is_flag=True, help="Let third-party warnings and log lines through (as ADAPTERHUB_DEBUG=1 does).")
def cli(verbose: bool) -> None:
    """A package manager and registry for PEFT adapters.

    Push adapter folders into a local registry (a SQLite index plus a
    content-addressed blob store under $ADAPTERHUB_HOME), find them by base
    model, rank, method and quantization, and pull any version back byte for
    byte.

    \b
    Examples:
      adapterhub inspect ./out/qa-lora
      adapterhub push ./out/qa-lora team/qa-lora --tag prod
      adapterhub search --base llama --method lora --min-rank 16
      adapterhub pull team/qa-lora@prod ./qa-lora

    Exit codes: 0 ok, 1 unexpected error, 2 usage, 3 not found, 4 invalid
    input, 5 conflict, 6 integrity failure, 7 storage failure, 8 trust
    failure (bad or missing signature, untrusted key), 9 remote failure
    (unreachable, authentication refused), 10 check --strict found warnings
    (check exits 1 when the adapter is incompatible), 130 interrupted, 141
    stdout closed early (`| head`, quietly). Set ADAPTERHUB_DEBUG=1 to see
    tracebacks. NO_COLOR turns colour off.
    """
    from adapterhub import config
    from adapterhub.cli._output import quiet_libraries

    quiet_libraries(verbose or config.debug())


def main() -> None:
    if sys.platform == "win32":
        # Locking (fcntl), hard links into the blob store and the staging renames are POSIX-only today.
        print("error: adapterhub does not support Windows yet; use Linux, or WSL 2 on Windows", file=sys.stderr)
        sys.exit(1)
    try:
        try:
            cli.main(prog_name="adapterhub")
        finally:
            sys.stdout.flush()  # a closed pipe shows here when output was buffered
    except BrokenPipeError:
        stdout_closed()
    except SystemExit as e:
        if "torch" in sys.modules:
            _exit_now(e.code)
        raise


def _exit_now(code: object) -> NoReturn:
    """Exit without the interpreter's teardown, once a command has loaded torch.

    Unloading torch's modules took 0.55 s after every command that imported
    it (2-core VM: ``import torch`` then a normal exit, against the same with
    ``os._exit``). By the time a command returns, its files are written,
    fsynced and closed, and its transactions committed; atexit handlers still
    run and both streams are flushed, so nothing that a normal exit would have
    done is lost but the freeing of memory the kernel takes back anyway.
    """
    import atexit

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 1
    os._exit(status)
