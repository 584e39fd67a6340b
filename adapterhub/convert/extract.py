"""``adapterhub extract`` and ``convert --to lora``: LoRA from weight deltas, with lineage.

>>> from adapterhub.convert.extract import extract              # doctest: +SKIP
>>> res = extract("team/qa-merged:1", base="llama-base", rank=16, push="team/qa-lora-x")
>>> res.report.max_rel_error

MODEL may be a registry ref (a merged output, say), a directory or a cached
Hub id. With ``push``, the lineage records MODEL as ``extracted_from`` and
BASE as ``base`` (an adapter turned into LoRA: ``converted_from``).
OUT may not overlap an input (``adapterhub.convert.check_output``, run by ``_service.run``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from adapterhub.convert._service import ConversionResult, Delivery, card_name, run
from adapterhub.sources import resolve_base, resolve_source

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from adapterhub.convert._service import DeliveryArgs


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
    **delivery: Unpack[DeliveryArgs],
) -> ConversionResult:
    """A PEFT LoRA that turns BASE into MODEL (a fine-tuned or merged model)."""
    from adapterhub.converters.extract import extract as extract_files

    d = Delivery.of("extract", delivery)
    m = resolve_source(model, d.registry)
    b = resolve_source(base, d.registry)
    tg = tuple(targets) if targets else None
    options = _options(rank=rank, energy=energy, targets=tg, svd=svd, dtype=dtype)
    return run(
        "extract", {"model": (m, "extracted_from"), "base": (b, "base")},
        lambda target, hashed: extract_files(
            m.files, b.files, target, rank=rank, energy=energy, targets=tg, svd=svd, dtype=dtype, force=d.force,
            hash_outputs=hashed, base_name=card_name(b), model_name=card_name(m), progress=d.progress,
        ),
        d, options,
    )


def to_lora(
    adapter: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    rank: int | None = None,
    energy: float | None = None,
    svd: str = "randomized",
    dtype: str | None = None,
    **delivery: Unpack[DeliveryArgs],
) -> ConversionResult:
    """A plain LoRA from a DoRA, IA3, LoHa, LoKr, AdaLoRA or VeRA adapter (or a LoRA, re-ranked)."""
    from adapterhub.converters.to_lora import adapter_to_lora

    d = Delivery.of("to_lora", delivery)
    a = resolve_source(adapter, d.registry)
    b = resolve_base(a, base, d.registry)
    options = _options(rank=rank, energy=energy, svd=svd, dtype=dtype)
    return run(
        "convert-to-lora", {"adapter": (a, "converted_from"), "base": (b, "base")},
        lambda target, hashed: adapter_to_lora(
            a.files, b.files, target, rank=rank, energy=energy, svd=svd, dtype=dtype, force=d.force,
            hash_outputs=hashed, base_name=card_name(b), adapter_name=card_name(a),
        ),
        d, options,
    )
