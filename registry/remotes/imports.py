"""What an import from a remote may do to the local registry's names.

The local name is the user's (a repository path or ``--name``), never the
remote's metadata; and no import moves a tag of a name that is already here:
``latest`` stays where it is, a remote's ``prod`` does not repoint the local
``prod`` (issue 16, item 9). New tags on a name are applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapterhub.errors import NotFoundError

if TYPE_CHECKING:
    from adapterhub.registry import Registry


def latest_of(reg: Registry, name: str) -> str | None:
    """The version ``name@latest`` names here, or None."""
    from adapterhub.refs import Ref

    try:
        return reg.index.resolve(Ref(name, tag="latest")).version
    except NotFoundError:
        return None


def kept_latest(name: str, version: str, ref: str) -> str:
    return (f"kept the local tag {name}@latest (it names {name}:{version}): an import moves no tag of a name "
            f"that is already here; use {ref} by its version")


def tags_to_apply(reg: Registry, name: str, tags: list[str], digest: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The remote's tags that may be applied here, and those kept as they are.

    A tag the local registry already has for ``name`` on other content is not
    moved by a pull: what a remote claims must not repoint ``name@prod`` on this
    machine without the user saying so.
    """
    from adapterhub.refs import Ref

    apply, kept = [], []
    for t in tags:
        try:
            info = reg.index.resolve(Ref.parse(f"{name}@{t}"))
        except NotFoundError:
            apply.append(t)
            continue
        if info.digest == digest:
            apply.append(t)
        else:
            kept.append((t, f"{info.name}:{info.version}"))
    return apply, kept
