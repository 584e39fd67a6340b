"""Quantize a safetensors checkpoint to bitsandbytes, and dequantize one back, one tensor at a time.

The output is the checkpoint that transformers + bitsandbytes write when you
``save_pretrained`` a model loaded with ``BitsAndBytesConfig(...)``: the same
tensor names, dtypes, shapes and values, and the same ``quantization_config``
in ``config.json``. ``tests/test_quantize.py`` checks this tensor by tensor
against transformers 5.23 + bitsandbytes 0.50.2. The layout and the rule of
which tensors are quantized are in ``formats.bnb_layout``; the per-weight
quantizers in ``formats.bnb_quant``.

>>> from adapterhub.converters.formats.safetensors_io import file_map   # doctest: +SKIP
>>> report = quantize(file_map("llama"), Path("llama-nf4"), to="nf4")
>>> dequantize(file_map("llama-nf4"), Path("llama-bf16"), dtype="bfloat16")
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError
from adapterhub.fsutil import check_output_dir
from adapterhub.progress import ProgressFactory

from adapterhub.converters.formats.bnb_layout import (
    CONV1D_MODEL_TYPES,
    DEFAULT_BLOCKSIZE,
    FLOAT_DTYPES,
    QUANT_STATE_KEY,
    QuantSettings,
    _quant_state,
    _torch_dtype,
    dequantized_shape,
    is_conv1d,
    module_kind,
)
from adapterhub.converters.formats.bnb_cpu import one_torch_thread
from adapterhub.converters.formats.bnb_quant import Quantizer, dequantize_weight
from adapterhub.converters.formats.safetensors_io import INDEX_NAME, FileMap, TensorSource, TensorSpec, Workspace
from adapterhub.converters.formats.shards import DEFAULT_SHARD_BYTES, StreamingShardWriter
from adapterhub.converters.output import copy_file, staged_dir, write_text
from adapterhub.converters import quantize_cpu

if TYPE_CHECKING:
    import torch

# Weight formats other than safetensors that must not travel into a converted output.
_OTHER_WEIGHT_SUFFIXES = (
    ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data", ".ot", ".pb",
    ".tflite", ".npz", ".safetensors",
)


# --------------------------------------------------------------------------- reports


@dataclass
class QuantizeReport:
    to: str  # nf4 | fp4 | int8
    double_quant: bool
    compute_dtype: str
    blocksize: int
    device: str
    modules_quantized: list[str] = field(default_factory=list)
    kept_16bit: list[str] = field(default_factory=list)  # 2-D float weights left as they were
    tensors_written: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    files: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # other weight formats not carried over
    seconds: float = 0.0
    #: weight file -> sha256, hashed as written (``hash_outputs``); not part of the report
    file_sha256: dict[str, str] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["modules_quantized"], d["file_sha256"]
        return {"tensors_quantized": len(self.modules_quantized), **d}


@dataclass
class DequantizeReport:
    source: str  # nf4 | fp4 | int8 (the modes found)
    dtype: str
    device: str
    modules_dequantized: list[str] = field(default_factory=list)
    tensors_written: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    files: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: weight file -> sha256, hashed as written (``hash_outputs``); not part of the report
    file_sha256: dict[str, str] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["file_sha256"]
        d["modules_dequantized"] = len(self.modules_dequantized)
        return d


# --------------------------------------------------------------------------- file-level helpers


def _resolve_device(device: str) -> str:
    if device == "cpu" or (device == "auto" and quantize_cpu.no_gpu()):
        return "cpu"  # known without importing torch (1-2 s)
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArtifactError("--device cuda was asked for but CUDA is not available")
    return device


def _read_config(files: FileMap) -> dict[str, Any]:
    if "config.json" not in files:
        raise InvalidArtifactError("no config.json: a model checkpoint with its config is needed")
    from adapterhub import jsonio

    cfg = jsonio.read_json(files["config.json"], what="config.json", expect=None)  # size- and depth-capped
    if not isinstance(cfg, dict):
        raise InvalidArtifactError("config.json is not a JSON object")
    return cfg


def _source(files: FileMap) -> TensorSource:
    if "adapter_config.json" in files or "adapter_model.safetensors" in files:
        raise InvalidArtifactError(
            "this is an adapter, not a model", hint="merge it into its base first (adapterhub merge), then quantize"
        )
    if INDEX_NAME in files:
        return TensorSource(files)
    top = sorted(r for r in files if r.endswith(".safetensors") and "/" not in r)
    if not top:
        raise InvalidArtifactError("no safetensors weights found (pytorch .bin checkpoints are not read)")
    return TensorSource(files, weights=top)


def _side_files(files: FileMap, source: TensorSource) -> tuple[list[str], list[str]]:
    """(files to copy, weight files left behind)."""
    shards = {source.shard_of(k) for k in source.keys()}
    copy, dropped = [], []
    for rel in sorted(files):
        if rel in shards or rel == INDEX_NAME or rel in ("config.json", "README.md"):
            continue
        if rel.lower().endswith(_OTHER_WEIGHT_SUFFIXES) or rel.endswith(".safetensors.index.json"):
            dropped.append(rel)
        else:
            copy.append(rel)
    return copy, dropped


def _dump_config(cfg: Mapping[str, Any]) -> str:
    # PretrainedConfig.to_json_string: indent 2, sorted keys, trailing newline.
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def _card(relation_note: str, meta: Mapping[str, Any], base_model: str | None) -> str:
    from adapterhub import modelcard

    return modelcard.render({"base_model": base_model or None, **meta}, f"\n{relation_note}\n", quote=("base_model",))


def _bar(progress: ProgressFactory | None, desc: str, total: int) -> Any:
    if progress is None:
        return None
    return progress(desc, total)


@dataclass
class _Written:
    files: list[str]
    copied: list[str]
    dropped: list[str]
    bytes_written: int
    sha256: dict[str, str]


def _write_checkpoint(
    tmp: Path,
    specs: Sequence[TensorSpec],
    model: FileMap,
    src: TensorSource,
    body: Callable[[StreamingShardWriter, Callable[[int], None]], None],
    *,
    max_shard_bytes: int,
    progress: ProgressFactory | None,
    desc: str,
    total: int,
    hash_outputs: bool = False,
) -> _Written:
    """Stream the tensors ``body`` writes into shards in ``tmp``, then copy the side files.

    ``body(writer, advance)`` writes every planned tensor in order and calls
    ``advance(nbytes)`` for the progress bar. On any error the writer is
    aborted; the caller's ``staged_dir`` removes ``tmp``.
    """
    writer = StreamingShardWriter(
        tmp, specs, max_shard_bytes=max_shard_bytes, metadata=src.metadata or None, digests=hash_outputs
    )
    bar = _bar(progress, desc, total)
    try:
        body(writer, bar.update if bar is not None else (lambda n: None))
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    copy, dropped = _side_files(model, src)
    for rel in copy:
        copy_file(Path(model[rel]), tmp / rel)
    return _Written(files, copy, dropped, writer.bytes_written, dict(writer.sha256))


# --------------------------------------------------------------------------- quantize


def _refuse_quantized_config(cfg: Mapping[str, Any]) -> None:
    if cfg.get("quantization_config"):
        qc = cfg["quantization_config"]
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        raise InvalidArtifactError(
            f"this model is already quantized ({method}); quantize needs a 16/32-bit checkpoint",
            hint="dequantize it first (adapterhub dequantize), or use the original model",
        )


def _refuse_quantized_tensors(keys: Sequence[str]) -> None:
    for k in keys:
        if k.endswith((".SCB", ".weight_format", ".weight.absmax")) or f".{QUANT_STATE_KEY}" in k:
            raise InvalidArtifactError(
                f"this model is already quantized (tensor {k}); quantize needs a 16/32-bit checkpoint",
                hint="dequantize it first (adapterhub dequantize)",
            )


def _double_quant_offsets(
    src: TensorSource, qz: Quantizer, wanted: set[str], dev: str, progress: ProgressFactory | None
) -> dict[str, float]:
    """The double-quant offset of every quantized weight: a pre-pass before any byte is written.

    The quant state's JSON holds the offset, so its length depends on the
    data and must be known before the shard headers are written.
    """
    offsets: dict[str, float] = {}
    bar = _bar(progress, "scanning for double quantization", sum(src.spec(k).nbytes for k in wanted))
    ws = Workspace("cpu")
    with one_torch_thread(dev):
        for k in src.keys():
            if k in wanted:
                offsets[k] = qz.offset(k, src.read_into(k, ws).to(dev))
                if bar is not None:
                    bar.update(src.spec(k).nbytes)
    if bar is not None:
        bar.close()
    return offsets


def _quantize_tensors(
    src: TensorSource,
    qz: Quantizer,
    wanted: set[str],
    offsets: Mapping[str, float],
    dev: str,
    writer: StreamingShardWriter,
    advance: Callable[[int], None],
    specs: Mapping[str, TensorSpec],
    done: list[str],
) -> None:
    """Quantize the ``wanted`` tensors of ``src`` in order into ``writer``; copy the others file to file.

    A reader thread reads the next weight (``pread`` drops the GIL) into the
    other of two buffers while this one is quantized. On the CPU, torch's own
    thread pool is held to one thread for the whole run: the quantizer shares
    the cores out by chunk itself, and the small operations between its
    chunks (checks, the writer's copies) then never wake a pool that spins
    while other processes hold the cores (on a loaded 2-core VM, 9 s of
    ``isfinite`` on absmax vectors alone).
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    import torch

    keys = src.keys()
    reads = [k for k in keys if k in wanted]
    ws = Workspace("cpu")
    pending: dict[str, Future[torch.Tensor]] = {}
    with one_torch_thread(dev):
        with ThreadPoolExecutor(1, thread_name_prefix="adapterhub-read") as reader:

            def prefetch(r: int) -> None:
                if r < len(reads):
                    pending[reads[r]] = reader.submit(src.read_into, reads[r], ws, f"in{r % 2}")

            try:
                prefetch(0)
                r = 0
                for k in keys:
                    if k in wanted:
                        t = pending.pop(k).result()
                        r += 1
                        prefetch(r)  # into the other buffer: tensor r - 1's is free again
                        for name, v in qz.quantize(k, t.to(dev), offsets.get(k)).items():
                            writer.write(name, v)
                        done.append(k.removesuffix(".weight"))
                        del t
                    else:
                        writer.copy_span(k, specs[k], src.span(k))  # unchanged: file to file
                    advance(src.spec(k).nbytes)
            finally:
                for f in pending.values():
                    f.cancel()


def _quantized_card(report: QuantizeReport, base_model: str | None) -> str:
    to = report.to
    label = {"nf4": "4-bit NF4", "fp4": "4-bit FP4", "int8": "8-bit LLM.int8"}[to]
    note = (
        f"bitsandbytes {label} quantization"
        + (" with double quantization" if report.double_quant else "")
        + f" (block size {DEFAULT_BLOCKSIZE}, compute dtype {report.compute_dtype}) written by adapterhub. "
        f"{len(report.modules_quantized)} Linear layers are quantized; "
        + (", ".join(sorted(set(report.kept_16bit))[:8]) or "no other 2-D weights")
        + " stay in their original precision. Load it with "
        "`AutoModelForCausalLM.from_pretrained(path)` with bitsandbytes installed."
    )
    tags = ["bitsandbytes", "4-bit" if to != "int8" else "8-bit", to]
    return _card(note, {"base_model_relation": "quantized", "library_name": "transformers", "tags": tags}, base_model)


def quantize(
    model: FileMap,
    out: str | Path,
    *,
    to: str = "nf4",
    double_quant: bool = False,
    compute_dtype: str = "bfloat16",
    skip_modules: Sequence[str] | None = None,
    force: bool = False,
    device: str = "auto",
    progress: ProgressFactory | None = None,
    base_model: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    hash_outputs: bool = False,
) -> QuantizeReport:
    """Quantize a 16/32-bit safetensors checkpoint into a bitsandbytes checkpoint at ``out``.

    Reads one tensor at a time (memory-mapped), quantizes it on ``device``
    (auto: CUDA when present) and streams it into the output shards, which are
    built beside ``out`` and renamed into place only when complete.
    """
    t0 = time.perf_counter()
    skip = tuple(skip_modules) if skip_modules is not None else None
    qs = QuantSettings(to, double_quant, compute_dtype, DEFAULT_BLOCKSIZE, skip)
    out = Path(out)
    cfg = _read_config(model)
    _refuse_quantized_config(cfg)
    qz = Quantizer(qs, cfg)
    src = _source(model)
    keys = src.keys()
    _refuse_quantized_tensors(keys)
    check_output_dir(out, model.values())  # --force would delete it
    dev = _resolve_device(device)
    report = QuantizeReport(to, double_quant, compute_dtype, DEFAULT_BLOCKSIZE, dev)

    # Plan every output spec up front (the writer needs them before the first byte).
    native = quantize_cpu.usable(qs, cfg, dev)  # the C kernel, without torch
    spec_of: Callable[[str], Any] = (lambda k: quantize_cpu.source_spec(src, k)) if native else src.spec
    wanted = {k for k in keys if qz.wants(spec_of(k))}
    if not wanted:
        raise InvalidArtifactError(
            f"no Linear weights that transformers would quantize were found (model_type {cfg.get('model_type')})"
        )
    report.kept_16bit = [
        k.removesuffix(".weight") for k in keys
        if k not in wanted and k.endswith(".weight") and len(spec_of(k).shape) == 2
    ]
    report.bytes_in = sum(spec_of(k).nbytes for k in keys)

    prepass = quantize_cpu.double_quant_prepass(src, qs, wanted, progress) if native and qs.double_quant else None
    offsets = prepass.offsets if prepass else {}
    if qs.double_quant and not native:
        offsets = _double_quant_offsets(src, qz, wanted, dev, progress)

    specs: list[Any] = []
    for k in keys:
        if k not in wanted:
            specs.append(spec_of(k))
        else:
            off = offsets.get(k)
            specs += quantize_cpu.output_specs(qs, spec_of(k), off) if native else qz.specs(src.spec(k), off)
    by_name = {sp.name: sp for sp in specs}

    def body(writer: StreamingShardWriter, advance: Callable[[int], None]) -> None:
        if native:
            quantize_cpu.quantize_tensors(src, qs, wanted, writer, advance, by_name, report.modules_quantized, prepass)
        else:
            _quantize_tensors(src, qz, wanted, offsets, dev, writer, advance, by_name, report.modules_quantized)

    with staged_dir(out, force=force) as tmp:
        done = _write_checkpoint(
            tmp, specs, model, src, body, max_shard_bytes=max_shard_bytes, progress=progress,
            desc=f"quantizing to {to}", total=report.bytes_in, hash_outputs=hash_outputs,
        )
        report.files, report.copied, report.dropped = done.files, done.copied, done.dropped
        report.file_sha256 = done.sha256
        new_cfg = dict(cfg)
        new_cfg["quantization_config"] = qs.quantization_config()
        write_text(tmp / "config.json", _dump_config(new_cfg))
        write_text(tmp / "README.md", _quantized_card(report, base_model))
        report.files += ["config.json", "README.md"]
        report.bytes_out = done.bytes_written
        report.tensors_written = len(specs)
    report.seconds = round(time.perf_counter() - t0, 3)
    return report



# --------------------------------------------------------------------------- dequantize


def _group_quantized(keys: Sequence[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Quantized modules -> their tensor names, and tensor name -> its module."""
    modules: dict[str, list[str]] = {}
    for k in keys:
        if f".{QUANT_STATE_KEY}" in k:
            modules.setdefault(k.split(f".{QUANT_STATE_KEY}")[0], [])
        elif k.endswith(".SCB"):
            modules.setdefault(k[: -len(".SCB")], [])
    owner: dict[str, str] = {}
    for k in keys:
        for suffix in (".weight", ".SCB", ".weight_format"):
            if k.endswith(suffix) and k[: -len(suffix)] in modules:
                owner[k] = k[: -len(suffix)]
                break
        else:
            if ".weight." in k:
                m = k.split(".weight.")[0]
                if m in modules:
                    owner[k] = m
    for k, m in owner.items():
        modules[m].append(k)
    return modules, owner


def _refuse_unquantized_config(cfg: Mapping[str, Any]) -> None:
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        raise InvalidArtifactError(
            "this model is not quantized (config.json has no quantization_config)",
            hint="dequantize reads bitsandbytes checkpoints; this one is already 16/32-bit",
        )
    if qc.get("quant_method") != "bitsandbytes":
        raise InvalidArtifactError(
            f"only bitsandbytes checkpoints can be dequantized; this one is {qc.get('quant_method')}"
        )


def _plan_dequantize(
    src: TensorSource,
    modules: Mapping[str, list[str]],
    owner: Mapping[str, str],
    cfg: Mapping[str, Any],
    target: torch.dtype | None,
) -> tuple[list[TensorSpec], list[tuple[str, str | None]], set[str]]:
    """The output plan, from the headers and the small quant-state tensors only.

    Returns (output specs, (output name, module it comes from or None) per
    output tensor, the quantization modes found).
    """
    conv_model = cfg.get("model_type") in CONV1D_MODEL_TYPES
    specs: list[TensorSpec] = []
    plan: list[tuple[str, str | None]] = []
    modes: set[str] = set()
    for k in src.keys():
        m = owner.get(k)
        if m is None:
            s = src.spec(k)
            floating = s.dtype.is_floating_point
            specs.append(TensorSpec(k, s.shape, target if (target is not None and floating) else s.dtype))
            plan.append((k, None))
            continue
        if k != f"{m}.weight":
            continue
        names = {n[len(m) + 1 :]: n for n in modules[m]}
        small = {rel: (src.get(n) if rel.startswith(QUANT_STATE_KEY) else src.spec(n)) for rel, n in names.items()}
        kind = module_kind(small)
        if kind == "4bit":
            _, qstate = _quant_state(small)  # type: ignore[arg-type]
            modes.add(str(qstate.get("quant_type")))
            own = _torch_dtype(str(qstate.get("dtype", "bfloat16")))
        else:
            modes.add("int8")
            own = _torch_dtype(str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"))
        shape = dequantized_shape(small)
        if conv_model and is_conv1d(m, cfg):
            shape = shape[::-1]
        specs.append(TensorSpec(k, tuple(shape), target or own))
        plan.append((k, m))
    return specs, plan, modes


def dequantize(
    model: FileMap,
    out: str | Path,
    *,
    dtype: str = "bfloat16",
    force: bool = False,
    device: str = "auto",
    progress: ProgressFactory | None = None,
    base_model: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    hash_outputs: bool = False,
) -> DequantizeReport:
    """Turn a bitsandbytes 4-bit or 8-bit checkpoint back into ``dtype`` weights at ``out``.

    ``dtype`` is bfloat16, float16 or float32 (every floating tensor is cast to
    it, and ``config.json`` says so), or ``auto``: each module back to the dtype
    its quant state records, other tensors as they are.
    """
    t0 = time.perf_counter()
    if dtype not in (*FLOAT_DTYPES, "auto"):
        raise InvalidArtifactError(f"unknown dtype {dtype!r}: choose bfloat16, float16, float32 or auto")
    out = Path(out)
    cfg = _read_config(model)
    _refuse_unquantized_config(cfg)
    src = _source(model)
    keys = src.keys()
    modules, owner = _group_quantized(keys)
    if not modules:
        raise InvalidArtifactError("config.json says bitsandbytes but no quantized tensors were found")
    check_output_dir(out, model.values())  # --force would delete it
    dev = _resolve_device(device)
    target = None if dtype == "auto" else _torch_dtype(dtype)
    conv_model = cfg.get("model_type") in CONV1D_MODEL_TYPES

    specs, plan, modes = _plan_dequantize(src, modules, owner, cfg, target)
    missing = [m for m in modules if f"{m}.weight" not in keys]
    if missing:
        raise InvalidArtifactError(f"{missing[0]}.weight is missing (its quantization state is there)")

    report = DequantizeReport("+".join(sorted(modes)), dtype, dev)
    report.bytes_in = sum(src.spec(k).nbytes for k in keys)
    by_name = {sp.name: sp for sp in specs}

    def body(writer: StreamingShardWriter, advance: Callable[[int], None]) -> None:
        for (k, m), spec in zip(plan, specs):
            if m is None:
                if src.spec(k).dtype == spec.dtype:
                    writer.copy_span(k, by_name[k], src.span(k))  # unchanged: file to file
                else:
                    writer.write(k, src.get(k).to(spec.dtype))
                advance(src.spec(k).nbytes)
                continue
            rel = {n[len(m) + 1 :]: src.get(n) for n in modules[m]}
            W = dequantize_weight(rel, device=dev, module=m)
            if conv_model and is_conv1d(m, cfg):
                W = W.T.contiguous()
            writer.write(k, W.to(spec.dtype))
            report.modules_dequantized.append(m)
            advance(sum(v.numel() * v.element_size() for v in rel.values()))
            del W, rel

    with staged_dir(out, force=force) as tmp:
        done = _write_checkpoint(
            tmp, specs, model, src, body, max_shard_bytes=max_shard_bytes, progress=progress,
            desc="dequantizing", total=report.bytes_in, hash_outputs=hash_outputs,
        )
        report.files, report.copied, report.dropped = done.files, done.copied, done.dropped
        report.file_sha256 = done.sha256
        new_cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
        if target is not None:
            new_cfg["dtype"] = dtype
            if "torch_dtype" in new_cfg:
                new_cfg["torch_dtype"] = dtype
        write_text(tmp / "config.json", _dump_config(new_cfg))
        note = (
            f"Dequantized by adapterhub from a bitsandbytes {report.source} checkpoint to {dtype}. "
            "The weights are dequant(quant(W)): the quantization error is still in them."
        )
        write_text(
            tmp / "README.md",
            _card(note, {"library_name": "transformers", "tags": ["dequantized", report.source]}, base_model),
        )
        report.files += ["config.json", "README.md"]
        report.bytes_out = done.bytes_written
        report.tensors_written = len(specs)
    report.seconds = round(time.perf_counter() - t0, 3)
    return report
