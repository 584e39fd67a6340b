"""Render the CLI reference (docs/cli.md) from the commands' own --help.

    python -m adapterhub.cli.reference           # print it
    python -m adapterhub.cli.reference --write   # update docs/cli.md in place

tests/test_cli.py fails when docs/cli.md is out of step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"


def render() -> str:
    from adapterhub.cli import COMMANDS, cli

    parts = []
    # Contexts built as click builds them (help_option_names included), so the
    # output does not depend on which commands ran before in this process.
    with click.Context(cli, info_name="adapterhub", terminal_width=88, **cli.context_settings) as ctx:
        parts.append("```\n$ adapterhub --help\n" + cli.get_help(ctx).rstrip() + "\n```")
        for name in sorted(COMMANDS):
            cmd = cli.get_command(ctx, name)
            assert cmd is not None
            parts += _help(cmd, name, ctx, "##")
    return "\n\n".join(parts)


def _help(cmd: click.Command, path: str, parent: click.Context, level: str) -> list[str]:
    """The help of ``cmd`` and, for a group, of each of its subcommands."""
    with click.Context(cmd, info_name=path.rsplit(" ", 1)[-1], parent=parent) as ctx:
        parts = [f"{level} `adapterhub {path}`\n\n```\n" + cmd.get_help(ctx).rstrip() + "\n```"]
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                assert sub is not None
                parts += _help(sub, f"{path} {name}", ctx, level + "#")
    return parts


def write(page: Path) -> None:
    text = page.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    page.write_text(f"{head}{START}\n{render()}\n{END}{tail}")


DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"

if __name__ == "__main__":
    if "--write" in sys.argv:
        write(DOC)
    else:
        print(render())
