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

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.convert import ConversionResult, _card_name, _run, check_output
from adapterhub.sources import Source, resolve_base, resolve_source

if TYPE_CHECKING:
    from adapterhub.registry import Registry


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
    inputs: dict[str, Source],
    relations: dict[str, str],
    write: Callable[[Path], Any],
    file_name: str,
    *,
    out: str | os.PathLike | None,
    push: str | None,
    force: bool,
    registry: Registry | None,
    options: dict[str, Any],
    **kw: Any,
) -> ConversionResult:
    """``_run`` for a one-file output: OUT is a file; a push stores a directory holding it."""
    out_path = Path(out) if out is not None else None
    if out_path is not None and push is not None:
        check_output(out_path, inputs.values(), registry=registry)

    def convert(target: Path, hashed: bool) -> Any:
        if push is None:
            return write(target)  # target is OUT itself
        target.mkdir(parents=True, exist_ok=True)
        report = write(target / file_name)
        if out_path is not None:  # -o and --push: OUT gets a copy of what is pushed
            _copy_out(target, file_name, out_path, force)
        return report

    res = _run(
        operation, inputs, relations, convert, out=out_path if push is None else None, push=push, force=force,
        registry=registry, options=options, **kw,
    )
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
    out: str | os.PathLike | None = None,
    push: str | None = None,
    force: bool = False,
    tokenizer_pre: str | None = None,
    modelfile: bool = False,
    tags: tuple[str, ...] = (),
    description: str | None = None,
    registry: Registry | None = None,
    progress: Any = None,
    require_signature: bool = False,
    sign: bool | None = None,
) -> ConversionResult:
    """A checkpoint as a GGUF model, or a PEFT LoRA as a GGUF LoRA (for ``base``)."""
    from adapterhub.converters import gguf as conv
    from adapterhub.errors import UsageError

    s = resolve_source(src, registry)
    kw = dict(tags=tags, description=description, progress=progress, require_signature=require_signature, sign=sign)
    if "adapter_config.json" in s.files:
        if modelfile:
            raise UsageError("--modelfile describes a GGUF model; a GGUF LoRA is added to one with ADAPTER in its Modelfile")
        b = resolve_base(s, base, registry)
        t = outtype or "f32"
        return _gguf_run(
            "convert-to-gguf", {"adapter": s, "base": b}, {"adapter": "converted_from", "base": "base"},
            lambda path: conv.lora_to_gguf(s.files, b.files, path, outtype=t, force=force, name=_card_name(s)),
            _file_name(push, s, t), out=out, push=push, force=force, registry=registry,
            options={"to": "gguf", "outtype": t}, **kw,
        )
    if base is not None:
        raise UsageError("--base is for converting an adapter; SRC is a checkpoint")
    t = outtype or "f16"
    return _gguf_run(
        "convert-to-gguf", {"source": s}, {"source": "converted_from"},
        lambda path: conv.model_to_gguf(
            s.files, path, outtype=t, force=force, progress=progress, name=_card_name(s), tokenizer_pre=tokenizer_pre,
            modelfile=modelfile,
        ),
        _file_name(push, s, t), out=out, push=push, force=force, registry=registry,
        options={"to": "gguf", "outtype": t, "modelfile": modelfile}, **kw,
    )


def merge_to_gguf(
    adapter: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    outtype: str = "q8_0",
    out: str | os.PathLike | None = None,
    push: str | None = None,
    device: str = "auto",
    qlora_base: str = "original",
    force: bool = False,
    tokenizer_pre: str | None = None,
    modelfile: bool = False,
    tags: tuple[str, ...] = (),
    description: str | None = None,
    registry: Registry | None = None,
    progress: Any = None,
    require_signature: bool = False,
    sign: bool | None = None,
) -> ConversionResult:
    """Merge ``adapter`` into ``base`` and write GGUF in one pass (no 16-bit copy on disk)."""
    from adapterhub.converters.gguf import merge_to_gguf as convert

    a = resolve_source(adapter, registry)
    b = resolve_base(a, base, registry)
    return _gguf_run(
        "merge-to-gguf", {"adapter": a, "base": b}, {"adapter": "adapter", "base": "base"},
        lambda path: convert(
            a.files, b.files, path, outtype=outtype, device=device, qlora_base=qlora_base, force=force,
            progress=progress, name=_card_name(b), tokenizer_pre=tokenizer_pre, modelfile=modelfile,
        ),
        _file_name(push, a, outtype), out=out, push=push, force=force, registry=registry,
        options={"to": "gguf", "outtype": outtype, "device": device, "qlora_base": qlora_base},
        tags=tags, description=description, progress=progress, require_signature=require_signature, sign=sign,
    )


__all__ = ["merge_to_gguf", "to_gguf"]
