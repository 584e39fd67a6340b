"""Conversions with inputs from anywhere and outputs into a directory or the registry.

This is the API behind ``adapterhub merge``, ``quantize`` and ``dequantize``:
it resolves inputs (a path, a registry ref, or a Hub id in the local HF cache),
runs the streaming converter from ``converters``, and, with ``push``, stores the
output with its lineage (the digests of the inputs and the recipe). The steps
every service shares are in ``adapterhub.convert._service``; the keyword
arguments for where the output goes are ``_service.DeliveryArgs``.

>>> from adapterhub.convert import merge                      # doctest: +SKIP
>>> res = merge("team/qa-lora:3", push="team/qa-merged")
>>> res.pushed.ref, res.report.to_dict()["modules_merged"]
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from adapterhub.convert._service import ConversionResult, Delivery, card_name, check_output, run
from adapterhub.errors import UsageError
from adapterhub.sources import resolve_base, resolve_source

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from adapterhub.convert._service import DeliveryArgs


def merge(
    adapter: str,
    base: str | None = None,
    *,
    device: str = "auto",
    dtype: str | None = None,
    qlora_base: str = "original",
    quantize: str | None = None,
    double_quant: bool = False,
    compute_dtype: str = "bfloat16",
    max_shard_bytes: int | None = None,
    **delivery: Unpack[DeliveryArgs],
) -> ConversionResult:
    from adapterhub.converters.merge import merge as merge_files

    d = Delivery.of("merge", delivery)
    if double_quant and not quantize:
        raise UsageError("--double-quant applies to --quantize nf4/fp4 only; without --quantize nothing is quantized")
    a = resolve_source(adapter, d.registry)
    b = resolve_base(a, base, d.registry)
    options: dict[str, Any] = {"device": device, "dtype": dtype, "qlora_base": qlora_base}
    kw: dict[str, Any] = {
        "device": device, "dtype": dtype, "qlora_base": qlora_base, "force": d.force, "progress": d.progress,
        "adapter_name": card_name(a),
    }
    if card_name(b):
        kw["base_name"] = card_name(b)
    if quantize:
        options.update(quantize=quantize, double_quant=double_quant, compute_dtype=compute_dtype)
        kw.update(quantize=quantize, double_quant=double_quant, compute_dtype=compute_dtype)
    if max_shard_bytes:
        kw["max_shard_bytes"] = max_shard_bytes
    return run(
        "merge", {"adapter": (a, "adapter"), "base": (b, "base")},
        lambda target, hashed: merge_files(a.files, b.files, target, hash_outputs=hashed, **kw), d, options,
    )


def quantize(
    model: str,
    *,
    to: str = "nf4",
    double_quant: bool = False,
    compute_dtype: str = "bfloat16",
    device: str = "auto",
    **delivery: Unpack[DeliveryArgs],
) -> ConversionResult:
    from adapterhub.converters.quantize import quantize as quantize_files

    d = Delivery.of("quantize", delivery)
    m = resolve_source(model, d.registry)
    options = {"to": to, "double_quant": double_quant, "compute_dtype": compute_dtype, "device": device}
    return run(
        "quantize", {"source": (m, "source")},
        lambda target, hashed: quantize_files(
            m.files, target, to=to, double_quant=double_quant, compute_dtype=compute_dtype,
            device=device, force=d.force, progress=d.progress, base_model=card_name(m),
            hash_outputs=hashed,
        ),
        d, options,
    )


def dequantize(
    model: str,
    *,
    dtype: str = "bfloat16",
    device: str = "auto",
    **delivery: Unpack[DeliveryArgs],
) -> ConversionResult:
    from adapterhub.converters.quantize import dequantize as dequantize_files

    d = Delivery.of("dequantize", delivery)
    m = resolve_source(model, d.registry)
    options = {"dtype": dtype, "device": device}
    return run(
        "dequantize", {"source": (m, "source")},
        lambda target, hashed: dequantize_files(
            m.files, target, dtype=dtype, device=device, force=d.force, progress=d.progress,
            base_model=card_name(m), hash_outputs=hashed,
        ),
        d, options,
    )


__all__ = ["ConversionResult", "check_output", "dequantize", "merge", "quantize"]
