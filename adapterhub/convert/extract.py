"""``adapterhub extract`` and ``convert --to lora``: LoRA from weight deltas, with lineage.

>>> from adapterhub.convert.extract import extract              # doctest: +SKIP
>>> res = extract("team/qa-merged:1", base="llama-base", rank=16, push="team/qa-lora-x")
>>> res.report.max_rel_error

MODEL may be a registry ref (a merged output, say), a directory or a cached
Hub id. With ``push``, the lineage records MODEL as ``extracted_from`` and
BASE as ``base`` (an adapter turned into LoRA: ``converted_from``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.convert import ConversionResult, _card_name, _run
from adapterhub.errors import UsageError
from adapterhub.sources import Source, resolve_base, resolve_source

if TYPE_CHECKING:
    from adapterhub.registry import Registry


def guard_out(out: str | os.PathLike | None, sources: Sequence[Source]) -> None:
    """OUT may not be an input, lie inside one, or hold one (``--force`` would replace it)."""
    if out is None:
        return
    o = Path(out).resolve()
    for src in sources:
        roots = [src.root] if src.root is not None else []
        roots += [Path(p) for p in src.files.values()]
        for r in roots:
            r = Path(r).resolve()
            if r == o or o in r.parents or r in o.parents:
                raise UsageError(f"OUT {out} overlaps the input {src.spec}: write the output somewhere else")


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
    guard_out(out, [m, b])
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
    from adapterhub.converters.extract import adapter_to_lora

    a = resolve_source(adapter, registry)
    b = resolve_base(a, base, registry)
    guard_out(out, [a, b])
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
