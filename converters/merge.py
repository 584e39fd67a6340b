"""Streaming merge of a PEFT adapter into its base checkpoint.

``merge()`` plans everything from names and shapes first (``merge_plan``:
method, every target module, every shape, tied and resized embeddings), so a
wrong base fails before any output exists. It then reads the base one tensor
at a time (through ``TensorSource``), applies the adapter in float32 on the
chosen device, casts back to the base dtype (or ``dtype``) and streams the
result into safetensors shards. Memory stays bounded by a few copies of the
largest tensor, whatever the model's size.

The output is built in a temp dir beside OUT and renamed into place only
when complete (``staged_dir``): on any error, Ctrl-C included, nothing is
left behind.

>>> from adapterhub.converters.formats.safetensors_io import file_map   # doctest: +SKIP
>>> report = merge(file_map("qa-lora"), file_map("Llama-2-7b-hf"), Path("qa-merged"))  # doctest: +SKIP
>>> report.to_dict()["modules_merged"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from adapterhub.errors import ConflictError
from adapterhub.fsutil import check_output_dir
from adapterhub.progress import ProgressFactory

from adapterhub.converters.formats.safetensors_io import FileMap, FileSpan, TensorSpec
from adapterhub.converters.formats.shards import DEFAULT_SHARD_BYTES, StreamingShardWriter
from adapterhub.converters.merge_plan import (  # noqa: F401 - also importable from here, as before the split
    PreparedMerge,
    _resolve_device,
    _resolve_dtype,
    check_base_config,
    open_adapter,
    prepare_merge,
)
from adapterhub.converters.output import copy_file, staged_dir, write_text

#: Files copied from the base (or, for tokenizer files, from the adapter when it
#: ships its own tokenizer, e.g. after adding tokens).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
SIDE_FILES = ("generation_config.json",)


@dataclass(frozen=True)
class MergeReport:
    method: str
    out: str
    modules_merged: int
    tensors_written: int
    tensors_changed: int
    bytes_written: int
    files: tuple[str, ...]
    device: str
    dtype: str
    qlora_base: str
    qlora: dict[str, Any] | None = None  # quantization settings used with qlora_base="dequantized"
    tensors_requantized: int = 0
    untied: tuple[str, ...] = ()
    vocab_size: int | None = None
    tokenizer_from: str | None = None  # "adapter" or "base"
    quantized: dict[str, Any] | None = None  # merge --quantize: mode, double_quant, compute_dtype, tensors
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0
    #: weight file -> sha256, hashed as written (``hash_outputs``); not part of the report
    file_sha256: Mapping[str, str] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["file_sha256"]
        d["files"] = list(self.files)
        d["untied"] = list(self.untied)
        d["warnings"] = list(self.warnings)
        d["seconds"] = round(self.seconds, 3)
        return d



def _write_pipelined(prep: PreparedMerge, writer: StreamingShardWriter, device: str, bar: Any, specs: Mapping[str, TensorSpec]) -> None:
    """Merge tensor i+1 while a writer thread writes tensor i.

    Writing into the page cache and the merge arithmetic both run without the
    GIL, so on two or more cores they overlap. Two output buffers suffice:
    before tensor i+2 reuses tensor i's buffer, tensor i's write has finished.
    Writes stay in order (one writer thread), and a write error surfaces at
    the next tensor.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    import torch

    # Leave a core to the writer thread: on two cores, two torch threads plus
    # the writer took twice the CPU time for a slower merge (0.94B model,
    # median of 5 alternating runs: 7.15 s with two torch threads, 6.02 s with one).
    threads = torch.get_num_threads()
    if device == "cpu" and threads > 1:
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    pending: list[Future[None]] = []
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterhub-write") as pool:
            try:
                for name, tensor in prep.iter_tensors(device, bar, spans=True, out_buffers=2):
                    if isinstance(tensor, FileSpan):
                        pending.append(pool.submit(writer.copy_span, name, specs[name], tensor))
                    else:
                        pending.append(pool.submit(writer.write, name, tensor))
                    del tensor
                    while len(pending) > 1:  # the buffer the next tensor will use is free again
                        pending.pop(0).result()
                while pending:
                    pending.pop(0).result()
            finally:
                for f in pending:
                    f.cancel()
                for f in pending:
                    if not f.cancelled():
                        f.exception()  # wait: the writer must be idle before it is aborted
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- output


def merged_config(base_config: Mapping[str, Any], prep: PreparedMerge) -> dict[str, Any]:
    """config.json of the merged model: dtype, tying and vocabulary brought in line with the weights."""
    cfg = json.loads(json.dumps(base_config))
    if prep.dtype is not None:
        name = str(prep.dtype).removeprefix("torch.")
        cfg["dtype"] = name
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = name
    if prep.plan.untied:
        cfg["tie_word_embeddings"] = False
        if isinstance(cfg.get("text_config"), dict) and "tie_word_embeddings" in cfg["text_config"]:
            cfg["text_config"]["tie_word_embeddings"] = False
    if prep.plan.vocab_size is not None:
        if "vocab_size" in cfg or not isinstance(cfg.get("text_config"), dict):
            cfg["vocab_size"] = prep.plan.vocab_size
        else:
            cfg["text_config"]["vocab_size"] = prep.plan.vocab_size
    return cfg


def model_card(base_name: str | None, adapter_name: str | None, method: str, report: Mapping[str, Any]) -> str:
    """README.md with Hub metadata for a merged model."""
    from adapterhub import __version__, modelcard

    quant = report.get("quantized")
    extra_tags = ("bitsandbytes", quant["to"]) if quant else ()
    meta = {
        "base_model": base_name or None,
        "base_model_relation": "merged",
        "library_name": "transformers",
        "tags": ["merged", "peft", method.lower(), "adapterhub", *extra_tags],
    }
    lines: list[str] = []

    base_txt = f"`{base_name}`" if base_name else "its base model"
    adapter_txt = f" `{adapter_name}`" if adapter_name else ""
    lines += [
        "",
        "# Merged model",
        "",
        f"{base_txt} with the {method} adapter{adapter_txt} merged into its weights by adapterhub {__version__}.",
        "",
        f"- modules merged: {report['modules_merged']}",
        f"- arithmetic: float32 on {report['device']}, written as {report['dtype']}",
        f"- QLoRA base: {report['qlora_base']}",
    ]
    if quant:
        lines.append(
            f"- quantized while merging: bitsandbytes {quant['to']}"
            f"{' with double quantization' if quant['double_quant'] else ''}, {quant['tensors']} weights"
        )
    for w in report.get("warnings", ()):
        lines.append(f"- note: {w}")
    return modelcard.render(meta, "\n".join(lines) + "\n")



def _quantized_outputs(
    prep: PreparedMerge, quantize: str | None, double_quant: bool, compute_dtype: str, settings: Any
) -> tuple[Any, list[TensorSpec], frozenset[str]]:
    """(the Quantizer or None, the output specs, the names of the merged tensors it quantizes)."""
    if not quantize:
        return None, list(prep.specs), frozenset()
    from adapterhub.converters.formats.bnb import Quantizer

    qz = Quantizer(settings, prep.base_config)
    # Double quantization without a pre-pass writes the offset fixed-width
    # (bnb_layout explains); a second merge pass would cost more than it buys.
    out_specs = [o for sp in prep.specs for o in (qz.specs(sp) if qz.wants(sp) else [sp])]
    return qz, out_specs, frozenset(sp.name for sp in prep.specs if qz.wants(sp))


def _write_tensors(
    prep: PreparedMerge, writer: StreamingShardWriter, dev: str, bar: Any, qz: Any, wanted: frozenset[str]
) -> list[str]:
    """Stream every merged tensor (quantized where ``wanted``) into ``writer``; return the files written."""
    specs = {sp.name: sp for sp in prep.specs}
    try:
        if wanted:
            from adapterhub.converters.formats.bnb_cpu import one_torch_thread

            # The CPU quantizer shares the cores out itself (bnb_cpu._parallel).
            with one_torch_thread(dev):
                for name, tensor in prep.iter_tensors(dev, bar, spans=True, exclude=wanted):
                    if isinstance(tensor, FileSpan):
                        writer.copy_span(name, specs[name], tensor)
                    elif name in wanted:
                        for qname, qt in qz.quantize(name, tensor.to(dev)).items():
                            writer.write(qname, qt)
                    else:
                        writer.write(name, tensor)
                    del tensor
        else:
            _write_pipelined(prep, writer, dev, bar, specs)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _copy_side_files(tmp: Path, base: FileMap, tok_src: FileMap) -> list[str]:
    files = []
    for rel in SIDE_FILES:
        if rel in base:
            copy_file(Path(base[rel]), tmp / rel)
            files.append(rel)
    for rel in TOKENIZER_FILES:
        if rel in tok_src:
            copy_file(Path(tok_src[rel]), tmp / rel)
            files.append(rel)
    return files


def _dtype_name(prep: PreparedMerge) -> str:
    if prep.dtype is not None:
        return str(prep.dtype).removeprefix("torch.")
    # The weights' dtype: integer buffers (position ids, ...) say nothing about it.
    return ",".join(sorted({str(s.dtype).removeprefix("torch.") for s in prep.specs if s.dtype.is_floating_point})) or ",".join(
        sorted({str(s.dtype).removeprefix("torch.") for s in prep.specs})
    )


def merge(
    adapter: FileMap,
    base: FileMap,
    out: Path | str,
    *,
    device: str = "auto",
    dtype: Any = None,
    qlora_base: str = "original",
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: ProgressFactory | None = None,
    base_name: str | None = None,
    adapter_name: str | None = None,
    quantize: str | None = None,
    double_quant: bool = False,
    compute_dtype: str = "bfloat16",
    hash_outputs: bool = False,
) -> MergeReport:
    """Merge ``adapter`` into ``base`` and write a transformers checkpoint to ``out``.

    ``adapter`` and ``base`` map POSIX relpaths to files (registry blobs are
    read in place). ``progress(desc, total_bytes)`` returns a bar with
    ``update(n)``/``close()``. ``qlora_base="dequantized"`` merges into
    dequant(quant(W)) for the linear weights, as a QLoRA adapter saw them.
    ``quantize="nf4"|"fp4"|"int8"`` quantizes each merged weight as it is
    produced, writing a bitsandbytes checkpoint with no 16-bit copy on disk.
    ``hash_outputs`` hashes the weight files as they are written
    (``MergeReport.file_sha256``), so that a registry push need not read them again.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not force:
        raise ConflictError(f"{out} already exists", hint="pass --force to replace it")
    check_output_dir(out, [*adapter.values(), *base.values()])  # --force would delete them
    settings = None
    if quantize:
        from adapterhub.converters.formats.bnb import QuantSettings

        settings = QuantSettings(quantize, double_quant=double_quant, compute_dtype=compute_dtype)  # checks options
    prep = prepare_merge(adapter, base, dtype=dtype, qlora_base=qlora_base)
    dev = _resolve_device(device)
    qz, out_specs, wanted = _quantized_outputs(prep, quantize, double_quant, compute_dtype, settings)

    adapter_tok = [f for f in TOKENIZER_FILES if f in adapter]
    tok_src, tok_from = (adapter, "adapter") if adapter_tok else (base, "base")
    if base_name is None:
        name = prep.adapter_config.get("base_model_name_or_path")
        base_name = name if isinstance(name, str) and name and not name.startswith(("/", ".", "~")) else None

    bar = progress("merge", sum(s.nbytes for s in prep.specs)) if progress is not None else None
    try:
        with staged_dir(out, force=force) as tmp:
            writer = StreamingShardWriter(tmp, out_specs, max_shard_bytes=max_shard_bytes, digests=hash_outputs)
            files = _write_tensors(prep, writer, dev, bar, qz, wanted)
            config = merged_config(prep.base_config, prep)
            if qz is not None:
                config["quantization_config"] = qz.settings.quantization_config()
            write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
            files.append("config.json")
            files += _copy_side_files(tmp, base, tok_src)
            report = MergeReport(
                method=prep.plan.method,
                out=str(out),
                modules_merged=len(prep.plan.modules),
                tensors_written=len(prep.specs),
                tensors_changed=len(prep.plan.changed) + len(prep.requantize - {t.name for t in prep.plan.changed}),
                bytes_written=writer.bytes_written,
                files=(),
                device=dev,
                dtype=_dtype_name(prep),
                qlora_base=qlora_base,
                qlora=prep.quant.to_dict() if prep.quant is not None else None,
                tensors_requantized=len(prep.requantize),
                untied=prep.plan.untied,
                vocab_size=prep.plan.vocab_size,
                tokenizer_from=tok_from if any(f in tok_src for f in TOKENIZER_FILES) else None,
                quantized=(
                    {"to": quantize, "double_quant": double_quant, "compute_dtype": compute_dtype, "tensors": len(wanted)}
                    if quantize else None
                ),
                warnings=tuple(prep.warnings),
            )
            write_text(tmp / "README.md", model_card(base_name, adapter_name, prep.plan.method, report.to_dict()))
            files.append("README.md")
    finally:
        if bar is not None:
            bar.close()
    return replace(
        report, files=tuple(sorted(files)), seconds=time.perf_counter() - t0, file_sha256=dict(writer.sha256)
    )
