"""Conversions with inputs from anywhere and outputs into a directory or the registry.

This is the API behind ``adapterhub merge``, ``quantize`` and ``dequantize``:
it resolves inputs (a path, a registry ref, or a Hub id in the local HF cache),
runs the streaming converter from ``converters``, and, with ``push``, stores the
output with its lineage (the digests of the inputs and the recipe).

>>> from adapterhub.convert import merge                      # doctest: +SKIP
>>> res = merge("team/qa-lora:3", push="team/qa-merged")
>>> res.pushed.ref, res.report.to_dict()["modules_merged"]
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub import __version__, config
from adapterhub.errors import UsageError
from adapterhub.fsutil import check_output_dir
from adapterhub.manifest import FileEntry, Manifest, hash_file
from adapterhub.sources import Source, resolve_base, resolve_source

if TYPE_CHECKING:
    from adapterhub.registry import PushResult, Registry


@dataclass
class ConversionResult:
    operation: str
    inputs: dict[str, Source]
    out: Path | None  # the directory written (None when only pushed)
    report: Any  # the converter's report (has to_dict())
    pushed: PushResult | None
    recipe: dict[str, Any]
    seconds: float
    signed: dict[str, Any] | None = None  # signature + provenance blobs, or why skipped

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "out": str(self.out) if self.out else None,
            "pushed": self.pushed.to_dict() if self.pushed else None,
            "report": self.report.to_dict() if hasattr(self.report, "to_dict") else self.report,
            "recipe": self.recipe,
            "seconds": round(self.seconds, 3),
            "signed": self.signed,
        }


def _digest_of(src: Source) -> str:
    if src.digest:
        return src.digest
    return Manifest.from_entries(
        FileEntry(rel, os.stat(p).st_size, hash_file(p)) for rel, p in sorted(src.files.items())
    ).digest


def _check_target(push: str | None, out: Path | None, description: str | None = None) -> None:
    """OUT, NAME or both (then OUT is written and pushed); a description needs NAME."""
    if push is None and out is None:
        raise UsageError("say where the output goes: -o OUT, --push NAME[:VERSION], or both")
    if description is not None and push is None:
        raise UsageError("--description describes the pushed artifact: it needs --push NAME[:VERSION]")
    if push is not None:
        from adapterhub.refs import parse_target

        parse_target(push)  # fail on a bad name before any work


def check_output(out: str | os.PathLike, inputs: Iterable[Source], registry: Registry | None = None) -> None:
    """Refuse an OUT that is, contains or lies inside an input (directory or file) or the registry home.

    Conversions that write a directory call this before any work (``_run``
    does it for merge, quantize and dequantize).
    """
    paths: list[str | os.PathLike] = []
    for src in inputs:
        if src.root is not None:
            paths.append(src.root)
        paths.extend(src.files.values())
    home = registry.home if registry is not None else config.home()
    check_output_dir(out, paths, home=home)


def _run(
    operation: str,
    inputs: dict[str, Source],
    relations: dict[str, str],
    convert: Callable[[Path, bool], Any],
    *,
    out: Path | None,
    push: str | None,
    force: bool,
    registry: Registry | None,
    options: dict[str, Any],
    tags: tuple[str, ...] = (),
    description: str | None = None,
    progress: Any = None,
    require_signature: bool = False,
    sign: bool | None = None,
) -> ConversionResult:
    t0 = time.perf_counter()
    _check_target(push, out, description)
    reg = registry
    if out is not None:
        check_output(out, inputs.values(), registry=reg)
    if push is not None and reg is None:
        from adapterhub.registry import Registry

        reg = Registry()
    # Trust policy: unsigned or untrusted inputs fail before any work.
    from adapterhub.trust.gate import check_inputs

    check_inputs(inputs, reg, require_signature)
    signed = None
    # Inputs outside the registry are hashed for the lineage while the
    # conversion runs (hashlib releases the GIL; page-cache reads are cheap).
    digests: dict[str, Future[str]] = {}
    pool = ThreadPoolExecutor(1) if push is not None else None
    tmp_root: Path | None = None
    try:
        if pool is not None:
            for k, src in inputs.items():
                digests[k] = pool.submit(_digest_of, src)
        if out is None:
            assert reg is not None
            tmp_root = reg.staging_dir("convert")  # fsck and gc find it if this process is killed
            target = tmp_root / "out"
        else:
            target = Path(out)
        # (target, hash_outputs): outputs built in our own staging dir are
        # hashed as they are written, so that the push below need not read them.
        report = convert(target, tmp_root is not None)
        recipe = {
            "tool": f"adapterhub {__version__}",
            "operation": operation,
            "options": options,
            "inputs": {k: v.to_dict() for k, v in inputs.items()},
            "python": platform.python_version(),
            "report": report.to_dict() if hasattr(report, "to_dict") else None,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        pushed = None
        if push is not None:
            assert reg is not None
            derived = [(digests[k].result(), relations[k]) for k in inputs]
            recipe["inputs"] = {k: {**v.to_dict(), "digest": digests[k].result()} for k, v in inputs.items()}
            # Weight files written into our own staging dir were hashed as they
            # were written: they enter the store by hard link, unread. (Never
            # for -o OUT: a link would tie the store to files the user may edit.)
            verified = getattr(report, "file_sha256", None) if tmp_root is not None else None
            pushed = reg.push(
                target, push, tags=tags, description=description, derived_from=derived,
                recipe=recipe, progress=progress, verified=verified or None,
            )
            # Sign the output's files and its provenance with the default key.
            from adapterhub.trust.gate import sign_output

            signed = sign_output(reg, pushed.ref, sign)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return ConversionResult(
        operation, inputs, Path(out) if out else None, report, pushed, recipe, time.perf_counter() - t0, signed
    )


def _card_name(src: Source) -> str | None:
    """How a model card should name an input: a Hub id or a registry ref, never a local path."""
    return src.hub_id or src.ref


def merge(
    adapter: str,
    base: str | None = None,
    *,
    out: str | os.PathLike | None = None,
    push: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    qlora_base: str = "original",
    quantize: str | None = None,
    double_quant: bool = False,
    compute_dtype: str = "bfloat16",
    force: bool = False,
    max_shard_bytes: int | None = None,
    tags: tuple[str, ...] = (),
    description: str | None = None,
    registry: Registry | None = None,
    progress: Any = None,
    require_signature: bool = False,
    sign: bool | None = None,
) -> ConversionResult:
    from adapterhub.converters.merge import merge as merge_files

    if double_quant and not quantize:
        raise UsageError("--double-quant applies to --quantize nf4/fp4 only; without --quantize nothing is quantized")
    a = resolve_source(adapter, registry)
    b = resolve_base(a, base, registry)
    options: dict[str, Any] = {"device": device, "dtype": dtype, "qlora_base": qlora_base}
    kw: dict[str, Any] = {
        "device": device, "dtype": dtype, "qlora_base": qlora_base, "force": force, "progress": progress,
        "adapter_name": _card_name(a),
    }
    if _card_name(b):
        kw["base_name"] = _card_name(b)
    if quantize:
        options.update(quantize=quantize, double_quant=double_quant, compute_dtype=compute_dtype)
        kw.update(quantize=quantize, double_quant=double_quant, compute_dtype=compute_dtype)
    if max_shard_bytes:
        kw["max_shard_bytes"] = max_shard_bytes
    return _run(
        "merge", {"adapter": a, "base": b}, {"adapter": "adapter", "base": "base"},
        lambda target, hashed: merge_files(a.files, b.files, target, hash_outputs=hashed, **kw),
        out=Path(out) if out else None, push=push, force=force, registry=registry, options=options,
        tags=tags, description=description, progress=progress, require_signature=require_signature, sign=sign,
    )


def quantize(
    model: str,
    *,
    to: str = "nf4",
    out: str | os.PathLike | None = None,
    push: str | None = None,
    double_quant: bool = False,
    compute_dtype: str = "bfloat16",
    device: str = "auto",
    force: bool = False,
    tags: tuple[str, ...] = (),
    description: str | None = None,
    registry: Registry | None = None,
    progress: Any = None,
    require_signature: bool = False,
    sign: bool | None = None,
) -> ConversionResult:
    from adapterhub.converters.quantize import quantize as quantize_files

    m = resolve_source(model, registry)
    options = {"to": to, "double_quant": double_quant, "compute_dtype": compute_dtype, "device": device}
    return _run(
        "quantize", {"source": m}, {"source": "source"},
        lambda target, hashed: quantize_files(
            m.files, target, to=to, double_quant=double_quant, compute_dtype=compute_dtype,
            device=device, force=force, progress=progress, base_model=_card_name(m),
            hash_outputs=hashed,
        ),
        out=Path(out) if out else None, push=push, force=force, registry=registry, options=options,
        tags=tags, description=description, progress=progress, require_signature=require_signature, sign=sign,
    )


def dequantize(
    model: str,
    *,
    dtype: str = "bfloat16",
    out: str | os.PathLike | None = None,
    push: str | None = None,
    device: str = "auto",
    force: bool = False,
    tags: tuple[str, ...] = (),
    description: str | None = None,
    registry: Registry | None = None,
    progress: Any = None,
    require_signature: bool = False,
    sign: bool | None = None,
) -> ConversionResult:
    from adapterhub.converters.quantize import dequantize as dequantize_files

    m = resolve_source(model, registry)
    options = {"dtype": dtype, "device": device}
    return _run(
        "dequantize", {"source": m}, {"source": "source"},
        lambda target, hashed: dequantize_files(
            m.files, target, dtype=dtype, device=device, force=force, progress=progress, base_model=_card_name(m),
            hash_outputs=hashed,
        ),
        out=Path(out) if out else None, push=push, force=force, registry=registry, options=options,
        tags=tags, description=description, progress=progress, require_signature=require_signature, sign=sign,
    )
