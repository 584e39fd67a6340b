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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.convert._service import ConversionResult, Delivery, Inputs, card_name, run
from adapterhub.sources import Source, resolve_source

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from adapterhub.convert._service import DeliveryArgs


def _run(
    operation: str,
    adapter: str | os.PathLike,
    base: str | os.PathLike | None,
    convert: Callable[[Source, Source | None, Path, bool], Any],
    d: Delivery,
    to: str,
) -> ConversionResult:
    """Resolve ADAPTER (and BASE when given) and ``run`` the conversion, the input as ``converted_from``."""
    a = resolve_source(adapter, d.registry)
    inputs: Inputs = {"adapter": (a, "converted_from")}
    b = None
    if base is not None:
        b = resolve_source(base, d.registry)
        inputs["base"] = (b, "base")
    return run(operation, inputs, lambda target, hashed: convert(a, b, target, hashed), d, {"to": to})


def to_mlx(
    adapter: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    **delivery: Unpack[DeliveryArgs],
) -> ConversionResult:
    """A PEFT LoRA/DoRA adapter as an mlx-lm adapter directory."""
    from adapterhub.converters.mlx import to_mlx as convert

    d = Delivery.of("to_mlx", delivery)
    return _run(
        "convert-to-mlx", adapter, base,
        lambda a, b, target, hashed: convert(
            a.files, target, base=b.files if b else None, force=d.force, hash_outputs=hashed,
        ),
        d, "mlx",
    )


def to_peft(
    adapter: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    **delivery: Unpack[DeliveryArgs],
) -> ConversionResult:
    """An mlx-lm LoRA/DoRA adapter as a PEFT adapter directory."""
    from adapterhub.converters.mlx import from_mlx

    d = Delivery.of("to_peft", delivery)
    return _run(
        "convert-to-peft", adapter, base,
        lambda a, b, target, hashed: from_mlx(
            a.files, target, base=b.files if b else None, base_name=card_name(b), force=d.force, hash_outputs=hashed,
        ),
        d, "peft",
    )
