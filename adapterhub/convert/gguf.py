"""``convert --to gguf`` and ``merge --to gguf``: GGUF outputs with lineage.

>>> from adapterhub.convert.gguf import to_gguf                  # doctest: +SKIP
>>> to_gguf("team/qa-merged:1", outtype="q8_0", out="qa.q8_0.gguf").report.to_dict()["tensor_types"]
>>> to_gguf("team/qa-lora:3", base="llama-base", push="team/qa-lora-gguf")   # a GGUF LoRA

SRC is a checkpoint (-> a GGUF model) or a PEFT LoRA adapter (-> a GGUF LoRA
for its base; only the base's config.json is read). ``-o OUT.gguf`` writes
one file (and, with ``modelfile``, an Ollama ``Modelfile`` beside it);
``--push NAME`` stores a directory holding the GGUF (and the Modelfile),
with the lineage: the input as ``converted_from`` (an adapter's base as
``base``), or for a one-pass merge the adapter and the base.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.convert._service import ConversionResult, Delivery, Inputs, card_name, check_output, run
from adapterhub.sources import Source, resolve_base, resolve_source

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from adapterhub.convert._service import DeliveryArgs


def _file_name(push: str | None, src: Source, suffix: str) -> str:
    """The GGUF's name inside a pushed directory: the pushed name's last part, and the type."""
    stem = None
    if push:
        from adapterhub.refs import parse_target

        stem = str(parse_target(push)[0]).rsplit("/", 1)[-1].split(":")[0]
    if not stem:
        stem = (src.root.name if src.root is not None else "model") or "model"
    return f"{stem}.{suffix}.gguf"


def _gguf_run(
    operation: str,
    inputs: Inputs,
    write: Callable[[Path, bool], Any],
    suffix: str,
    d: Delivery,
    options: dict[str, Any],
) -> ConversionResult:
    """``run`` for a one-file output: OUT is a file; a push stores a directory holding it.

    ``write(path, hashed)``: with ``hashed`` (a push from the registry's staging
    directory) the converter hashes the GGUF as it writes it and reports the
    digest under the file's name, so the push adopts the file unread.
    """
    file_name = _file_name(d.push, next(iter(inputs.values()))[0], suffix)
    out_path = d.out
    if out_path is not None and d.push is not None:
        check_output(out_path, [src for src, _ in inputs.values()], registry=d.registry)

    def convert(target: Path, hashed: bool) -> Any:
        if d.push is None:
            return write(target, hashed)  # target is OUT itself
        target.mkdir(parents=True, exist_ok=True)
        report = write(target / file_name, hashed)
        if out_path is not None:  # -o and --push: OUT gets a copy of what is pushed
            _copy_out(target, file_name, out_path, d.force)
        return report

    res = run(operation, inputs, convert, dataclasses.replace(d, out=out_path if d.push is None else None), options)
    if out_path is not None:
        res.out = out_path
    return res


def _copy_out(staged: Path, file_name: str, out: Path, force: bool) -> None:
    from adapterhub.errors import ConflictError
    from adapterhub.fsutil import write_atomic

    if out.exists() and not force:
        raise ConflictError(f"{out} already exists", hint="pass --force to replace it")
    write_atomic(out, staged / file_name, mode=0o644)
    if (staged / "Modelfile").exists():
        text = (staged / "Modelfile").read_text().replace(f"FROM ./{file_name}", f"FROM ./{out.name}")
        write_atomic(out.parent / "Modelfile", data=text.encode(), mode=0o644)


def to_gguf(
    src: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    outtype: str | None = None,
    tokenizer_pre: str | None = None,
    modelfile: bool = False,
    **delivery: Unpack[DeliveryArgs],
) -> ConversionResult:
    """A checkpoint as a GGUF model, or a PEFT LoRA as a GGUF LoRA (for ``base``)."""
    from adapterhub.converters import gguf as conv
    from adapterhub.errors import UsageError

    d = Delivery.of("to_gguf", delivery)
    s = resolve_source(src, d.registry)
    if "adapter_config.json" in s.files:
        if modelfile:
            raise UsageError("--modelfile describes a GGUF model; a GGUF LoRA is added to one with ADAPTER in its Modelfile")
        b = resolve_base(s, base, d.registry)
        t = outtype or "f32"
        return _gguf_run(
            "convert-to-gguf", {"adapter": (s, "converted_from"), "base": (b, "base")},
            lambda path, hashed: conv.lora_to_gguf(
                s.files, b.files, path, outtype=t, force=d.force, name=card_name(s), hash_outputs=hashed,
            ),
            t, d, {"to": "gguf", "outtype": t},
        )
    if base is not None:
        raise UsageError("--base is for converting an adapter; SRC is a checkpoint")
    t = outtype or "f16"
    return _gguf_run(
        "convert-to-gguf", {"source": (s, "converted_from")},
        lambda path, hashed: conv.model_to_gguf(
            s.files, path, outtype=t, force=d.force, progress=d.progress, name=card_name(s),
            tokenizer_pre=tokenizer_pre, modelfile=modelfile, hash_outputs=hashed,
        ),
        t, d, {"to": "gguf", "outtype": t, "modelfile": modelfile},
    )


def merge_to_gguf(
    adapter: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    outtype: str = "q8_0",
    device: str = "auto",
    qlora_base: str = "original",
    tokenizer_pre: str | None = None,
    modelfile: bool = False,
    **delivery: Unpack[DeliveryArgs],
) -> ConversionResult:
    """Merge ``adapter`` into ``base`` and write GGUF in one pass (no 16-bit copy on disk)."""
    from adapterhub.converters.gguf import merge_to_gguf as convert

    d = Delivery.of("merge_to_gguf", delivery)
    a = resolve_source(adapter, d.registry)
    b = resolve_base(a, base, d.registry)
    return _gguf_run(
        "merge-to-gguf", {"adapter": (a, "adapter"), "base": (b, "base")},
        lambda path, hashed: convert(
            a.files, b.files, path, outtype=outtype, device=device, qlora_base=qlora_base, force=d.force,
            progress=d.progress, name=card_name(b), tokenizer_pre=tokenizer_pre, modelfile=modelfile, hash_outputs=hashed,
        ),
        outtype, d, {"to": "gguf", "outtype": outtype, "device": device, "qlora_base": qlora_base},
    )


__all__ = ["merge_to_gguf", "to_gguf"]
