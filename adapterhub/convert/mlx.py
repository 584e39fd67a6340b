"""``convert --to mlx`` and ``convert MLX_ADAPTER --to peft``, with lineage.

>>> from adapterhub.convert.mlx import to_mlx                   # doctest: +SKIP
>>> to_mlx("team/qa-lora:3", base="llama-base", out="qa-mlx").report.to_dict()["scale"]

With ``base``, the adapter is checked against the base checkpoint (module
names and shapes) before anything is written; it is also what decides
whether an embedding LoRA can go to mlx-lm (not on tied embeddings). With
``push``, the lineage records the input as ``converted_from``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.convert import ConversionResult, _card_name, _run
from adapterhub.sources import Source, resolve_source

if TYPE_CHECKING:
    from adapterhub.registry import Registry


def _inputs(src: Source, base: Source | None) -> tuple[dict[str, Source], dict[str, str]]:
    inputs, relations = {"adapter": src}, {"adapter": "converted_from"}
    if base is not None:
        inputs["base"], relations["base"] = base, "base"
    return inputs, relations


def to_mlx(
    adapter: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    push: str | None = None,
    force: bool = False,
    tags: tuple[str, ...] = (),
    description: str | None = None,
    registry: Registry | None = None,
    progress: Any = None,
    require_signature: bool = False,
    sign: bool | None = None,
) -> ConversionResult:
    """A PEFT LoRA/DoRA adapter as an mlx-lm adapter directory."""
    from adapterhub.converters.mlx import to_mlx as convert

    a = resolve_source(adapter, registry)
    b = resolve_source(base, registry) if base is not None else None
    inputs, relations = _inputs(a, b)
    return _run(
        "convert-to-mlx", inputs, relations,
        lambda target, hashed: convert(a.files, target, base=b.files if b else None, force=force, hash_outputs=hashed),
        out=Path(out) if out else None, push=push, force=force, registry=registry, options={"to": "mlx"}, tags=tags,
        description=description, progress=progress, require_signature=require_signature, sign=sign,
    )


def to_peft(
    adapter: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    push: str | None = None,
    force: bool = False,
    tags: tuple[str, ...] = (),
    description: str | None = None,
    registry: Registry | None = None,
    progress: Any = None,
    require_signature: bool = False,
    sign: bool | None = None,
) -> ConversionResult:
    """An mlx-lm LoRA/DoRA adapter as a PEFT adapter directory."""
    from adapterhub.converters.mlx import from_mlx

    a = resolve_source(adapter, registry)
    b = resolve_source(base, registry) if base is not None else None
    inputs, relations = _inputs(a, b)
    return _run(
        "convert-to-peft", inputs, relations,
        lambda target, hashed: from_mlx(
            a.files, target, base=b.files if b else None, base_name=_card_name(b) if b else None, force=force,
            hash_outputs=hashed,
        ),
        out=Path(out) if out else None, push=push, force=force, registry=registry, options={"to": "peft"}, tags=tags,
        description=description, progress=progress, require_signature=require_signature, sign=sign,
    )
