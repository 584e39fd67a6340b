"""Small pieces every command module shares: the registry, a passphrase
prompt, and the click classes that make the CLI speak one dialect.

One dialect means:

- listing is ``ls`` everywhere (``keys ls``, ``trust ls``, ``remote ls``),
  with ``list`` accepted as a hidden alias (:class:`Group`);
- an old spelling of an option keeps working but is left out of ``--help``
  (:class:`AliasedOption`), so each idea has one name on screen.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

# Accepted command spellings that are not shown: alias -> command.
COMMAND_ALIASES = {"list": "ls"}


class Group(click.Group):
    """A click group that resolves :data:`COMMAND_ALIASES` (``keys list`` runs ``keys ls``)."""

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is None and name in COMMAND_ALIASES:
            cmd = super().get_command(ctx, COMMAND_ALIASES[name])
        return cmd


class AliasedOption(click.Option):
    """An option whose extra spellings (``hidden_aliases``) parse but stay out of --help."""

    def __init__(self, *args: Any, hidden_aliases: tuple[str, ...] = (), **kw: Any) -> None:
        decls = list(args[0]) + list(hidden_aliases)
        super().__init__(decls, *args[1:], **kw)
        self.hidden_aliases = tuple(hidden_aliases)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown = [o for o in self.opts if o not in self.hidden_aliases]
        saved, self.opts = self.opts, shown
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = saved


def namespace_option(help: str, multiple: bool = False, dest: str = "namespace", hidden_aliases: tuple[str, ...] = ()) -> Any:
    """``--namespace``: the one word for "names under this namespace" on every command."""
    return click.option(
        "--namespace", dest, cls=AliasedOption, hidden_aliases=hidden_aliases, multiple=multiple, metavar="NAMESPACE", help=help,
    )


def registry() -> Any:
    from adapterhub.registry import Registry

    return Registry()


def prompt_passphrase(name: str) -> str | None:
    """Ask on a terminal; None where there is none (the caller then fails with a hint)."""
    if not sys.stdin.isatty():
        return None
    return click.prompt(f"passphrase for key {name!r}", hide_input=True, err=True)


def short_id(key_id: str | None) -> str:
    return (key_id or "-")[:16]


def known_as(asked: str, tk) -> str:
    """How a trusted key is known now: its trusted name, and the name it was asked by when that differs."""
    name = tk.name or short_id(tk.key_id)
    ident = asked.removeprefix("sha256:")
    if asked != tk.name and not tk.key_id.startswith(ident):
        return f"{name} (asked for as {asked!r}) {tk.key_id}"
    return f"{name} {tk.key_id}"


def inspect_spec(spec: str, with_hash: bool = False) -> tuple[dict[str, Any], str]:
    """Inspect ``spec`` from headers only; return (the inspection as a dict, a label to print).

    ``spec`` is a path, as ``inspect`` has always taken, or a registry ref
    (``team/qa-lora:3``, ``team/qa-lora@prod``), as check, merge and verify
    take; a ref's blobs are read in place. ``with_hash`` adds the artifact
    digest and every file's sha256, hashed now (a ref's blobs are re-hashed,
    as fsck does).
    """
    from adapterhub.errors import InvalidNameError, NotFoundError
    from adapterhub.inspect import inspect_files, inspect_path
    from adapterhub.manifest import FileEntry, Manifest, hash_file_sized
    from adapterhub.refs import Ref

    path = Path(spec).expanduser()
    try:
        ref = None if path.exists() else Ref.parse(spec)
    except InvalidNameError:
        ref = None
    if ref is None:
        ins = inspect_path(path).to_dict()
        if with_hash:
            m = Manifest.from_dir(path)
            ins["digest"], ins["file_hashes"] = m.digest, [f.to_dict() for f in m.files]
        return ins, spec
    with registry() as reg:
        try:
            info = reg.resolve(ref)
        except NotFoundError:
            raise NotFoundError(f"{spec}: no such path or registry ref", hint="`adapterhub ls` lists the registry") from None
        label = f"{info.name}:{info.version}"
        files = {e.path: blob for e, blob in reg.files(ref)}
    result = inspect_files(files, Path(label))
    result.files = list(files)
    result.size = sum(os.stat(p).st_size for p in files.values())
    ins = result.to_dict()
    if with_hash:
        m = Manifest.from_entries(FileEntry(rel, *reversed(hash_file_sized(p))) for rel, p in files.items())
        ins["digest"], ins["file_hashes"] = m.digest, [f.to_dict() for f in m.files]
    return ins, label
