"""Render the README's CLI reference from the commands' own --help.

    python -m adapterhub.cli.reference           # print it
    python -m adapterhub.cli.reference --write   # update README.md in place

tests/test_cli.py fails when README.md is out of step.
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
            with click.Context(cmd, info_name=name, parent=ctx) as sub:
                parts.append(f"#### `adapterhub {name}`\n\n```\n" + cmd.get_help(sub).rstrip() + "\n```")
    return "\n\n".join(parts)


def write(readme: Path) -> None:
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render()}\n{END}{tail}")


if __name__ == "__main__":
    if "--write" in sys.argv:
        write(Path(__file__).resolve().parents[2] / "README.md")
    else:
        print(render())
