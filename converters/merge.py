"""Streaming merge of a PEFT adapter into its base checkpoint.

``merge()`` plans everything from names and shapes first (method, every
target module, every shape, tied and resized embeddings), so a wrong base
fails before any output exists. It then reads the base one tensor at a time
(memory-mapped through ``TensorSource``), applies the adapter in float32 on
the chosen device, casts back to the base dtype (or ``dtype``) and streams the
result into safetensors shards. Memory stays bounded by a few copies of the
largest tensor, whatever the model's size.

The output is built in a temp dir beside OUT and renamed into place only
when complete (``staged_dir``): on any error, Ctrl-C included, nothing is
left behind.

>>> from converters.safetensors_io import file_map              # doctest: +SKIP
>>> report = merge(file_map("qa-lora"), file_map("Llama-2-7b-hf"), Path("qa-merged"))  # doctest: +SKIP
>>> report.to_dict()["modules_merged"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import ConflictError, InvalidArtifactError, NotFoundError

from adapterhub.converters.formats import peft_math
from adapterhub.converters.formats.safetensors_io import (
    DEFAULT_SHARD_BYTES,
    FileMap,
    FileSpan,
    StreamingShardWriter,
    TensorSource,
    TensorSpec,
    Workspace,
    copy_file,
    staged_dir,
    write_text,
)

if TYPE_CHECKING:
    import torch

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

ProgressFactory = Callable[[str, int], Any]  # (description, total bytes) -> object with update(n) and close()


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


# --------------------------------------------------------------------------- inputs


class _DictSource:
    """An adapter held in memory (legacy ``adapter_model.bin``), with TensorSource's read API."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._t = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._t)

    def spec(self, name: str) -> TensorSpec:
        t = self._t[name]
        return TensorSpec(name, tuple(t.shape), t.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._t[name]


def _read_json(files: FileMap, rel: str, what: str) -> dict[str, Any]:
    if rel not in files:
        raise NotFoundError(f"{what} has no {rel}")
    try:
        data = json.loads(Path(files[rel]).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InvalidArtifactError(f"{what} {rel}: malformed JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise InvalidArtifactError(f"{what} {rel}: not a JSON object")
    return data


def open_adapter(files: FileMap) -> tuple[dict[str, Any], TensorSource | _DictSource]:
    """The adapter's config and tensors (safetensors, or a legacy pickle loaded with weights_only)."""
    config = _read_json(files, "adapter_config.json", "the adapter")
    peft_math.check_mergeable(config)  # prompt tuning etc. fail here, before looking at weights
    if "adapter_model.safetensors" in files:
        return config, TensorSource(files, weights=["adapter_model.safetensors"])
    if "adapter_model.bin" in files:
        import torch

        try:
            sd = torch.load(str(files["adapter_model.bin"]), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors come in many types
            raise InvalidArtifactError(f"adapter_model.bin: unreadable ({e})") from None
        if not isinstance(sd, dict):
            raise InvalidArtifactError("adapter_model.bin does not hold a state dict")
        return config, _DictSource(sd)
    raise NotFoundError("the adapter has no adapter_model.safetensors (or adapter_model.bin)")


def check_base_config(config: Mapping[str, Any]) -> None:
    """Refuse quantized bases: a merge needs the 16-bit weights."""
    qc = config.get("quantization_config")
    if isinstance(qc, Mapping):
        method = str(qc.get("quant_method", "unknown"))
        if method == "bitsandbytes":
            bits = "4-bit" if qc.get("load_in_4bit") else "8-bit" if qc.get("load_in_8bit") else "quantized"
            raise InvalidArtifactError(
                f"the base is a bitsandbytes {bits} checkpoint; merging needs 16-bit weights",
                hint="run `adapterhub dequantize BASE -o BASE-bf16` and merge into that "
                "(use --qlora-base dequantized to merge as a QLoRA adapter saw the weights)",
            )
        raise InvalidArtifactError(
            f"the base is quantized ({method}); merging needs 16-bit weights", hint="merge into the unquantized base model"
        )


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArtifactError("--device cuda: no CUDA device is available", hint="use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidArtifactError(f"unknown device {device!r} (auto, cpu or cuda)")
    return device


_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).removeprefix("torch."))
    if name is None:
        raise InvalidArtifactError(f"unknown dtype {dtype!r} (bfloat16, float16 or float32)")
    return getattr(torch, name)


# --------------------------------------------------------------------------- plan


@dataclass
class PreparedMerge:
    """Everything decided before the first byte is written."""

    adapter_config: dict[str, Any]
    base_config: dict[str, Any]
    plan: peft_math.MergePlan
    adapter: TensorSource | _DictSource
    base: TensorSource
    specs: list[TensorSpec]
    dtype: torch.dtype | None
    qlora_base: str
    quant: peft_math.QuantSpec | None
    requantize: frozenset[str]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    requantize_conv1d: frozenset[str] = frozenset()  # stored (in, out): quantized transposed, as transformers does

    def passthrough(self, index: int) -> bool:
        """True if output tensor ``index`` is the base tensor's bytes, unchanged."""
        tp, spec = self.plan.tensors[index], self.specs[index]
        return not tp.ops and tp.name not in self.requantize and spec.dtype == self.base.spec(tp.source).dtype

    def iter_tensors(
        self,
        device: str,
        progress: Any = None,
        *,
        spans: bool = False,
        exclude: frozenset[str] = frozenset(),
        out_buffers: int = 0,
    ) -> Iterator[tuple[str, torch.Tensor | FileSpan]]:
        """Yield (name, merged tensor on the CPU) in output order, one at a time.

        Every tensor yielded is a view of a reused buffer: write it (or copy
        it) before asking for the next one. With ``spans``, a tensor that
        passes through unchanged (and is not in ``exclude``) is yielded as the
        ``FileSpan`` of its bytes in the base, for a file-to-file copy.

        With ``out_buffers=n`` every tensor is yielded in its own output
        buffer, taken in turn from ``n``: tensor ``i`` stays intact until
        tensor ``i + n`` is computed, so a writer thread can still be writing
        it while the next one is merged.
        """
        from concurrent.futures import Future, ThreadPoolExecutor

        cpu = Workspace("cpu")
        dev = cpu if device == "cpu" else Workspace(device)
        # The tensors read from the base, in order. A reader thread reads the
        # next one (pread drops the GIL) while this one is merged, into the
        # other of two input buffers: tensor k's buffer is read into again
        # only once tensor k+1 has been asked for.
        reads = [
            i for i in range(len(self.specs))
            if not (spans and self.specs[i].name not in exclude and self.passthrough(i))
        ]
        pending: dict[int, Future[torch.Tensor]] = {}
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterhub-read")

        def prefetch(k: int) -> None:
            if k < len(reads):
                source = self.plan.tensors[reads[k]].source
                pending[reads[k]] = reader.submit(self.base.read_into, source, cpu, f"in{k % 2}")

        try:
            prefetch(0)
            k = 0
            for i, (spec, tp) in enumerate(zip(self.specs, self.plan.tensors)):
                if k >= len(reads) or reads[k] != i:
                    yield spec.name, self.base.span(tp.source)
                    if progress is not None:
                        progress.update(spec.nbytes)
                    continue
                t = pending.pop(i).result()
                k += 1
                prefetch(k)
                out = self._merge_one(i, spec, tp, t, device, cpu, dev, out_buffers)
                del t
                yield spec.name, out
                del out
                if progress is not None:
                    progress.update(spec.nbytes)
        finally:
            for f in pending.values():
                f.cancel()
            reader.shutdown(wait=True)  # a read in flight writes into our buffer

    def _merge_one(
        self, i: int, spec: TensorSpec, tp: peft_math.TensorPlan, t: torch.Tensor, device: str,
        cpu: Workspace, dev: Workspace, out_buffers: int,
    ) -> torch.Tensor:
        """Output tensor ``i`` (on the CPU, in a workspace buffer) from its base tensor ``t``."""
        role = f"out{i % out_buffers}" if out_buffers else "out"
        if tp.name in self.requantize:
            if tp.name in self.requantize_conv1d:
                t = peft_math.quantize_roundtrip(t.T, self.quant, device=device).T
            else:
                t = peft_math.quantize_roundtrip(t, self.quant, device=device)
        if tp.ops:
            # One finiteness test, on the output: inf/NaN from any op
            # survives the cast, and so does an overflow of the cast.
            out = dev.tensor(role, spec.shape, spec.dtype)
            finite = peft_math.merge_into(
                out, t, tp.ops, self.adapter.get, device, ws=dev, extra=self.extra,
                shape_of=lambda k: self.adapter.spec(k).shape,
            )
            if not finite:
                # Again, op by op, to name the adapter parameter that broke it.
                peft_math.apply_ops(t, tp.ops, self.adapter.get, device, extra=self.extra)
                raise InvalidArtifactError(
                    f"{tp.ops[-1].module}: the merged {tp.name} overflows {spec.dtype} (non-finite values)",
                    hint="nothing was written; try --dtype float32 or bfloat16",
                )
        elif t.dtype == spec.dtype and not out_buffers:
            out = t
        else:
            out = dev.tensor(role, t.shape, spec.dtype)
            out.copy_(t)
        if out.device.type != "cpu":
            host = cpu.tensor(f"host{role}", out.shape, out.dtype)
            host.copy_(out)
            out = host
        return out


def prepare_merge(
    adapter: FileMap,
    base: FileMap,
    *,
    dtype: Any = None,
    qlora_base: str = "original",
) -> PreparedMerge:
    """Read configs, names and shapes; check everything; return the plan (reads no tensor data of the base)."""
    if qlora_base not in ("original", "dequantized"):
        raise InvalidArtifactError(f"qlora_base must be original or dequantized, not {qlora_base!r}")
    adapter_config, asrc = open_adapter(adapter)
    base_config = _read_json(base, "config.json", "the base")
    check_base_config(base_config)
    bsrc = TensorSource(base)
    if any(k.endswith((".absmax", ".SCB", ".quant_map")) or ".quant_state." in k for k in bsrc.keys()):
        raise InvalidArtifactError(
            "the base holds bitsandbytes-quantized tensors; merging needs 16-bit weights",
            hint="run `adapterhub dequantize BASE -o BASE-bf16` and merge into that",
        )
    out_dtype = _resolve_dtype(dtype)

    ashapes = {k: asrc.spec(k).shape for k in asrc.keys()}
    aplan = peft_math.parse_adapter(adapter_config, ashapes)
    bshapes = {k: bsrc.spec(k).shape for k in bsrc.keys()}
    plan = peft_math.resolve_plan(aplan, bshapes, base_config)
    warnings = list(plan.warnings)

    extra: dict[str, torch.Tensor] = {}
    if plan.method == "VERA":
        if "base_model.vera_A" in ashapes:
            peft_math.check_vera_projections(plan, ashapes)
        else:
            extra = peft_math.vera_projections(plan, int(adapter_config.get("r", 256)), int(adapter_config.get("projection_prng_key", 0)))

    specs = []
    for tp in plan.tensors:
        src_dtype = bsrc.spec(tp.source).dtype
        d = out_dtype if (out_dtype is not None and src_dtype.is_floating_point) else src_dtype
        specs.append(TensorSpec(tp.name, tp.shape, d))

    card = None
    if "README.md" in adapter:
        try:
            card = Path(adapter["README.md"]).read_text(encoding="utf-8", errors="replace")
        except OSError:
            card = None
    detected = peft_math.detect_qlora(adapter_config, card)
    quant: peft_math.QuantSpec | None = None
    requantize: frozenset[str] = frozenset()
    conv1d: frozenset[str] = frozenset()
    if qlora_base == "dequantized":
        if detected is not None:
            quant = detected
        else:
            quant = peft_math.QuantSpec(source="default")
            warnings.append(
                "the adapter does not record how its base was quantized; assumed NF4, block size 64, double quantization"
            )
        from adapterhub.converters.formats.bnb import QuantSettings, Quantizer, is_conv1d

        # The same rule `adapterhub quantize` uses, checked against transformers:
        # the weights transformers would have loaded in 4-bit for training.
        qz = Quantizer(QuantSettings(quant.quant_type, double_quant=quant.double_quant), base_config)
        requantize = frozenset(
            tp.name
            for tp in plan.tensors
            if tp.name == tp.source
            and not any(op.kind == "replace" for op in tp.ops)
            and bsrc.spec(tp.source).dtype.is_floating_point
            and qz.wants(TensorSpec(tp.name, tp.shape, bsrc.spec(tp.source).dtype))
        )
        conv1d = frozenset(n for n in requantize if is_conv1d(n.removesuffix(".weight"), base_config))
    elif detected is not None:
        warnings.append(
            f"the adapter was trained on a {detected.quant_type} 4-bit base ({detected.source}) and was merged into the "
            "original weights; --qlora-base dequantized merges into the weights it saw in training"
        )
    return PreparedMerge(
        adapter_config, base_config, plan, asrc, bsrc, specs, out_dtype, qlora_base, quant, requantize, extra, warnings,
        requantize_conv1d=conv1d,
    )


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


def _yaml_scalar(v: str) -> str:
    return v if re.fullmatch(r"[A-Za-z0-9_./@-]+", v) else json.dumps(v)


def model_card(base_name: str | None, adapter_name: str | None, method: str, report: Mapping[str, Any]) -> str:
    """README.md with Hub metadata for a merged model."""
    lines = ["---"]
    if base_name:
        lines.append(f"base_model: {_yaml_scalar(base_name)}")
    lines += ["base_model_relation: merged", "library_name: transformers", "tags:"]
    quant = report.get("quantized")
    extra_tags = ("bitsandbytes", quant["to"]) if quant else ()
    lines += [f"- {t}" for t in ("merged", "peft", method.lower(), "adapterhub", *extra_tags)]
    lines.append("---")
    from adapterhub import __version__

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
    return "\n".join(lines) + "\n"


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
    qz = None
    if quantize:
        from adapterhub.converters.formats.bnb import QuantSettings

        settings = QuantSettings(quantize, double_quant=double_quant, compute_dtype=compute_dtype)  # checks options
    prep = prepare_merge(adapter, base, dtype=dtype, qlora_base=qlora_base)
    dev = _resolve_device(device)
    out_specs = list(prep.specs)
    if quantize:
        from adapterhub.converters.formats.bnb import Quantizer

        qz = Quantizer(settings, prep.base_config)
        # Double quantization without a pre-pass writes the offset fixed-width
        # (bnb.py explains); a second merge pass would cost more than it buys.
        out_specs = [o for sp in prep.specs for o in (qz.specs(sp) if qz.wants(sp) else [sp])]
    n_quantized = sum(1 for sp in prep.specs if qz is not None and qz.wants(sp))

    adapter_tok = [f for f in TOKENIZER_FILES if f in adapter]
    tok_src, tok_from = (adapter, "adapter") if adapter_tok else (base, "base")
    if base_name is None:
        name = prep.adapter_config.get("base_model_name_or_path")
        base_name = name if isinstance(name, str) and name and not name.startswith(("/", ".", "~")) else None

    total = sum(s.nbytes for s in prep.specs)
    bar = progress("merge", total) if progress is not None else None
    try:
        with staged_dir(out, force=force) as tmp:
            writer = StreamingShardWriter(tmp, out_specs, max_shard_bytes=max_shard_bytes, digests=hash_outputs)
            wanted = {sp.name for sp in prep.specs if qz is not None and qz.wants(sp)}
            specs = {sp.name: sp for sp in prep.specs}
            try:
                if wanted:
                    for name, tensor in prep.iter_tensors(dev, bar, spans=True, exclude=frozenset(wanted)):
                        if isinstance(tensor, FileSpan):
                            writer.copy_span(name, specs[name], tensor)
                        elif name in wanted:
                            assert qz is not None
                            for qname, qt in qz.quantize(name, tensor.to(dev)).items():
                                writer.write(qname, qt)
                        else:
                            writer.write(name, tensor)
                        del tensor
                else:
                    _write_pipelined(prep, writer, dev, bar, specs)
                files = writer.close()
            except BaseException:
                writer.abort()
                raise
            config = merged_config(prep.base_config, prep)
            if qz is not None:
                config["quantization_config"] = qz.settings.quantization_config()
            write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
            files.append("config.json")
            for rel in SIDE_FILES:
                if rel in base:
                    copy_file(Path(base[rel]), tmp / rel)
                    files.append(rel)
            for rel in TOKENIZER_FILES:
                if rel in tok_src:
                    copy_file(Path(tok_src[rel]), tmp / rel)
                    files.append(rel)
            dtype_name = (
                str(prep.dtype).removeprefix("torch.")
                if prep.dtype is not None
                # The weights' dtype: integer buffers (position ids, ...) say nothing about it.
                else ",".join(sorted({str(s.dtype).removeprefix("torch.") for s in prep.specs if s.dtype.is_floating_point}))
                or ",".join(sorted({str(s.dtype).removeprefix("torch.") for s in prep.specs}))
            )
            report = MergeReport(
                method=prep.plan.method,
                out=str(out),
                modules_merged=len(prep.plan.modules),
                tensors_written=len(prep.specs),
                tensors_changed=len(prep.plan.changed) + len(prep.requantize - {t.name for t in prep.plan.changed}),
                bytes_written=writer.bytes_written,
                files=(),
                device=dev,
                dtype=dtype_name,
                qlora_base=qlora_base,
                qlora=prep.quant.to_dict() if prep.quant is not None else None,
                tensors_requantized=len(prep.requantize),
                untied=prep.plan.untied,
                vocab_size=prep.plan.vocab_size,
                tokenizer_from=tok_from if any(f in tok_src for f in TOKENIZER_FILES) else None,
                quantized=(
                    {"to": quantize, "double_quant": double_quant, "compute_dtype": compute_dtype, "tensors": n_quantized}
                    if quantize else None
                ),
                warnings=tuple(prep.warnings),
            )
            write_text(tmp / "README.md", model_card(base_name, adapter_name, prep.plan.method, report.to_dict()))
            files.append("README.md")
    finally:
        if bar is not None:
            bar.close()
    from dataclasses import replace

    return replace(
        report, files=tuple(sorted(files)), seconds=time.perf_counter() - t0, file_sha256=dict(writer.sha256)
    )
