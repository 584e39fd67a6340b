"""``adapterhub extract`` and ``convert --to lora``: LoRA from weight deltas, with lineage.

>>> from adapterhub.convert.extract import extract              # doctest: +SKIP
>>> res = extract("team/qa-merged:1", base="llama-base", rank=16, push="team/qa-lora-x")
>>> res.report.max_rel_error

MODEL may be a registry ref (a merged output, say), a directory or a cached
Hub id. With ``push``, the lineage records MODEL as ``extracted_from`` and
BASE as ``base`` (an adapter turned into LoRA: ``converted_from``).
OUT may not overlap an input (``adapterhub.convert.check_output``, run by ``_run``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.convert import ConversionResult, _card_name, _run
from adapterhub.sources import resolve_base, resolve_source

if TYPE_CHECKING:
    from adapterhub.registry import Registry


def _options(**kw: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items() if v is not None}


def extract(
    model: str | os.PathLike,
    *,
    base: str | os.PathLike,
    rank: int | None = None,
    energy: float | None = None,
    targets: Sequence[str] | None = None,
    svd: str = "randomized",
    dtype: str | None = None,
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
    """A PEFT LoRA that turns BASE into MODEL (a fine-tuned or merged model)."""
    from adapterhub.converters.extract import extract as extract_files

    m = resolve_source(model, registry)
    b = resolve_source(base, registry)
    tg = tuple(targets) if targets else None
    options = _options(rank=rank, energy=energy, targets=tg, svd=svd, dtype=dtype)
    return _run(
        "extract", {"model": m, "base": b}, {"model": "extracted_from", "base": "base"},
        lambda target, hashed: extract_files(
            m.files, b.files, target, rank=rank, energy=energy, targets=tg, svd=svd, dtype=dtype, force=force,
            hash_outputs=hashed, base_name=_card_name(b), model_name=_card_name(m), progress=progress,
        ),
        out=Path(out) if out else None, push=push, force=force, registry=registry, options=options, tags=tags,
        description=description, progress=progress, require_signature=require_signature, sign=sign,
    )


def to_lora(
    adapter: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    rank: int | None = None,
    energy: float | None = None,
    svd: str = "randomized",
    dtype: str | None = None,
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
    """A plain LoRA from a DoRA, IA3, LoHa, LoKr, AdaLoRA or VeRA adapter (or a LoRA, re-ranked)."""
    from adapterhub.converters.to_lora import adapter_to_lora

    a = resolve_source(adapter, registry)
    b = resolve_base(a, base, registry)
    options = _options(rank=rank, energy=energy, svd=svd, dtype=dtype)
    return _run(
        "convert-to-lora", {"adapter": a, "base": b}, {"adapter": "converted_from", "base": "base"},
        lambda target, hashed: adapter_to_lora(
            a.files, b.files, target, rank=rank, energy=energy, svd=svd, dtype=dtype, force=force,
            hash_outputs=hashed, base_name=_card_name(b), adapter_name=_card_name(a),
        ),
        out=Path(out) if out else None, push=push, force=force, registry=registry, options=options, tags=tags,
        description=description, progress=progress, require_signature=require_signature, sign=sign,
    )
