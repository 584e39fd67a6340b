"""Conversions to GGUF, the format of llama.cpp, Ollama and LM Studio.

- ``model_to_gguf``: a transformers checkpoint (Llama, Mistral, Qwen2, Qwen3,
  Phi-3) -> one GGUF model file with its metadata and tokenizer.
- ``lora_to_gguf``: a PEFT LoRA -> a GGUF LoRA adapter, with PEFT's exact
  per-module scales (rsLoRA, ``rank_pattern``, ``alpha_pattern``); only the
  base's ``config.json`` is read.
- ``merge_to_gguf``: merge an adapter into its base and write GGUF in the
  same pass, with no 16-bit copy on disk.

Each streams one tensor at a time: read (or merge), reorder q/k rows for the
Llama family, encode in the GGML type (``formats.gguf_quant``), write
(``formats.gguf_write``), drop. The output file appears only when complete.
With ``hash_outputs`` its sha256 is computed as it is written
(``GGUFReport.file_sha256``), so that a registry push need not read it again.

>>> from adapterhub.converters.formats.safetensors_io import file_map   # doctest: +SKIP
>>> rep = model_to_gguf(file_map("Llama-2-7b-hf"), Path("llama.q8_0.gguf"), outtype="q8_0")
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapterhub.errors import ConflictError, InvalidArtifactError, NotFoundError
from adapterhub.fsutil import check_output_dir
from adapterhub.progress import ProgressFactory

from adapterhub.converters.formats import gguf_arch as ga
from adapterhub.converters.formats.gguf_write import GGUFFile, OutTensor
from adapterhub.converters.formats.safetensors_io import map_array, map_bytes

FileMap = Mapping[str, Path]


@dataclass(frozen=True)
class GGUFReport:
    kind: str  # "model" or "adapter"
    out: str
    architecture: str
    outtype: str
    tensors_written: int
    bytes_written: int
    tensor_types: dict[str, int]
    source: str  # "checkpoint", "merge" or "adapter"
    tokenizer: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    merge: dict[str, Any] | None = None
    files: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0
    #: file -> sha256, when hashed as written (``hash_outputs``); not part of the report
    file_sha256: Mapping[str, str] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["file_sha256"]
        d["files"] = list(self.files)
        d["warnings"] = list(self.warnings)
        d["seconds"] = round(self.seconds, 3)
        return d


def read_config(files: FileMap, what: str = "the checkpoint") -> dict[str, Any]:
    if "config.json" not in files:
        raise NotFoundError(f"{what} has no config.json", hint="point at a transformers checkpoint directory")
    from adapterhub import jsonio

    cfg = jsonio.read_json(files["config.json"], what="config.json", expect=None)  # size- and depth-capped
    if not isinstance(cfg, dict):
        raise InvalidArtifactError("config.json is not a JSON object")
    return cfg


def _digests(out: Path, sha256: str | None) -> dict[str, str]:
    """``GGUFReport.file_sha256``: the GGUF's name (its path in a pushed directory) -> its sha256, if hashed."""
    return {out.name: sha256} if sha256 is not None else {}


def _check_out(out: Path, inputs: Sequence[Path], force: bool) -> None:
    if out.suffix != ".gguf":
        raise InvalidArtifactError(f"{out}: a GGUF output's name must end in .gguf")
    if out.exists() and not force:
        raise ConflictError(f"{out} already exists", hint="pass --force to replace it")
    check_output_dir(out, inputs)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class _Planned:
    hf: str
    out: OutTensor
    permute_heads: int | None


def _plan_model(layout: ga.Layout, specs: Sequence[tuple[str, tuple[int, ...]]], outtype: str) -> list[_Planned]:
    tmap = layout.name_map()
    planned = []
    for hf, shape in specs:
        name = layout.gguf_name(hf, tmap)
        if name is None:
            continue
        planned.append(_Planned(hf, OutTensor(name, tuple(shape), ga.tensor_type(name, tuple(shape), outtype)), layout.permute_heads(hf)))
    names = {p.out.name for p in planned}
    if "token_embd.weight" not in names:
        raise InvalidArtifactError("the checkpoint has no token embeddings (model.embed_tokens.weight)")
    missing = [f"blk.{i}.attn_norm.weight" for i in range(layout.n_layers) if f"blk.{i}.attn_norm.weight" not in names]
    if missing:
        raise InvalidArtifactError(f"the checkpoint lacks layers its config declares (no {missing[0]})")
    return planned


def write_model(
    config: Mapping[str, Any],
    tok_files: FileMap,
    specs: Sequence[tuple[str, tuple[int, ...]]],
    tensors: Iterator[tuple[str, Any]],
    out: Path,
    *,
    outtype: str = "f16",
    force: bool = False,
    name: str | None = None,
    tokenizer_pre: str | None = None,
    bar: Any = None,
    hash_outputs: bool = False,
) -> tuple[int, int, dict[str, int], dict[str, Any], str | None]:
    """Write a GGUF model from a stream of (HF name, tensor) in ``specs`` order.

    Each tensor is encoded and written before the next is asked for, so the
    stream may yield views of buffers it reuses.
    Returns (tensors written, bytes written, tensor types, tokenizer report,
    the file's sha256 with ``hash_outputs`` else None).
    """
    from adapterhub.converters.formats.gguf_vocab import write_tokenizer

    layout = ga.Layout.from_config(config)
    ga.qtype_of(outtype)
    planned = _plan_model(layout, specs, outtype)
    extra = ga.rope_freqs_tensor(config, layout)
    by_hf = {p.hf: p for p in planned}
    out_tensors = [p.out for p in planned]
    if extra is not None:
        from gguf import GGMLQuantizationType as T

        out_tensors.append(OutTensor("rope_freqs.weight", tuple(extra.shape), T.F32))
    with GGUFFile(out, layout.arch.gguf, force=force, digest=hash_outputs) as f:
        w = f.writer
        w.add_type("model")
        if name:
            w.add_name(name)
        ga.write_metadata(w, config, layout, outtype)
        vocab = write_tokenizer(w, tok_files, config, tokenizer_pre)
        f.plan(out_tensors)
        _encode_and_write(f, tensors, by_hf, bar)
        if extra is not None:
            f.write("rope_freqs.weight", extra)
    types = dict(sorted(Counter(t.qtype.name.lower() for t in out_tensors).items()))
    return len(out_tensors), f.bytes_written, types, vocab.to_dict(), f.sha256


def _encode_and_write(f: GGUFFile, tensors: Iterator[tuple[str, Any]], by_hf: Mapping[str, _Planned], bar: Any) -> None:
    """Encode each tensor as it comes, a slab at a time straight into the file's staging buffers.

    A tensor is used up before the next is asked for, so the stream may hand
    out views of buffers it reuses. The file's threads encode slabs on every
    core, torch running one thread in each: its own intra-op threads spin at
    each op's end, which on a busy 2-core machine cost ten times the work.
    The q/k row order is a strided view, read by the same pass. The stream
    may be numpy arrays (a checkpoint read without torch, for the C kernel)
    or torch tensors (a merge); torch is left alone when it is not loaded.
    """
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(1)
    try:
        for hf, t in tensors:
            p = by_hf.get(hf)
            if p is None:
                continue
            if getattr(getattr(t, "device", None), "type", "cpu") != "cpu":  # a torch tensor on a GPU
                t = t.cpu()
            src = ga.permuted_view(t, p.permute_heads) if p.permute_heads is not None else t
            f.encode_rows(p.out.name, src)
            if bar is not None:
                bar.update(t.nbytes)
            del t, src
    finally:
        if torch is not None:
            torch.set_num_threads(threads)


#: safetensors dtypes read as numpy arrays for the C kernel (bf16 as its uint16 bits)
_NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def _read_ahead(src: Any, names: Sequence[str], native: bool = False) -> Iterator[tuple[str, Any]]:
    """(name, tensor) in order, mapping tensor i+1 in a thread while tensor i is encoded and written.

    Each tensor is a view of a memory map of its bytes in the checkpoint,
    unmapped once the next is asked for: at most two tensors are mapped.
    With ``native`` (the C kernel encodes), F32, F16 and BF16 tensors come as
    numpy arrays, so torch is never imported; other types as torch tensors.
    """
    from concurrent.futures import ThreadPoolExecutor

    def open_one(name: str) -> tuple[Any, Any]:
        span = src.span(name)
        shape, st = src.header(name)
        if native and st in _NUMPY_DTYPES:
            import numpy as np

            if not span.nbytes:
                return None, np.zeros(shape, dtype=_NUMPY_DTYPES[st])
            with open(span.path, "rb") as f:
                mm, arr = map_array(f.fileno(), span.offset, span.nbytes, span.path.name, "it")
            return mm, arr.view(_NUMPY_DTYPES[st]).reshape(shape)
        import torch

        spec = src.spec(name)
        if not span.nbytes:
            return None, torch.empty(spec.shape, dtype=spec.dtype)
        with open(span.path, "rb") as f:
            mm, raw = map_bytes(f.fileno(), span.offset, span.nbytes, span.path.name, "it")
        return mm, raw.view(spec.dtype).view(spec.shape)

    if not names:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterhub-read") as pool:
        nxt = pool.submit(open_one, names[0])
        for i, n in enumerate(names):
            mm, t = nxt.result()
            if i + 1 < len(names):
                nxt = pool.submit(open_one, names[i + 1])
            yield n, t
            del t, mm  # the tensor held the map; with both gone it is unmapped


def model_to_gguf(
    files: FileMap,
    out: str | os.PathLike,
    *,
    outtype: str = "f16",
    force: bool = False,
    progress: ProgressFactory | None = None,
    name: str | None = None,
    tokenizer_pre: str | None = None,
    modelfile: bool = False,
    hash_outputs: bool = False,
) -> GGUFReport:
    """Convert a transformers checkpoint (a FileMap) into one GGUF model file at ``out``.

    Where the C kernel is built, torch is not imported: the tensors are read
    as numpy memory maps and encoded by the kernel.
    """
    from adapterhub.converters.formats.gguf_quant import kernel
    from adapterhub.converters.formats.safetensors_io import TensorSource

    t0 = time.perf_counter()
    out = Path(out)
    _check_out(out, list(files.values()), force)
    config = read_config(files)
    layout = ga.Layout.from_config(config)  # refuses unsupported architectures before any reading
    if modelfile:
        _check_modelfile(out, force)
    src = TensorSource(files)
    # Read in file order: one sequential pass over each shard.
    names = sorted(src.keys(), key=lambda k: (src.shard_of(k), src.span(k).offset))
    specs = [(n, src.header(n)[0]) for n in names]
    bar = progress("gguf", sum(src.span(n).nbytes for n in names)) if progress is not None else None
    try:
        n, nbytes, types, tok, sha = write_model(
            config, files, specs, _read_ahead(src, names, kernel() is not None), out, outtype=outtype, force=force, name=name,
            tokenizer_pre=tokenizer_pre, bar=bar, hash_outputs=hash_outputs,
        )
    finally:
        if bar is not None:
            bar.close()
    written = [out.name]
    if modelfile:
        written.append(write_modelfile(out, files, force=force))
    return GGUFReport(
        "model", str(out), layout.arch.gguf, outtype, n, nbytes, types, "checkpoint", tokenizer=tok,
        files=tuple(written), seconds=time.perf_counter() - t0, file_sha256=_digests(out, sha),
    )


# --------------------------------------------------------------------------- LoRA


def lora_to_gguf(
    adapter: FileMap,
    base: FileMap,
    out: str | os.PathLike,
    *,
    outtype: str = "f32",
    force: bool = False,
    name: str | None = None,
    hash_outputs: bool = False,
) -> GGUFReport:
    """Convert a PEFT LoRA into a GGUF LoRA for ``base`` (only the base's config.json is read)."""
    import torch

    from adapterhub.converters.formats.gguf_lora import lora_pair, plan_lora, refuse_unconvertible
    from adapterhub.converters.formats.gguf_quant import encode
    from adapterhub.converters.merge_plan import open_adapter

    t0 = time.perf_counter()
    out = Path(out)
    _check_out(out, [*adapter.values(), *base.values()], force)
    ga.qtype_of(outtype)
    base_config = read_config(base, "the base")
    layout = ga.Layout.from_config(base_config)
    if "adapter_config.json" not in adapter:
        raise NotFoundError("the adapter has no adapter_config.json")
    refuse_unconvertible(read_config({"config.json": adapter["adapter_config.json"]}, "the adapter"), ())
    config, src = open_adapter(adapter)
    shapes = {k: tuple(src.spec(k).shape) for k in src.keys()}
    alpha, entries = plan_lora(config, shapes, layout, base_config, _unchanged(src, base))
    out_tensors = []
    for e in entries:
        a_shape, b_shape = shapes[e.a_key], shapes[e.b_key]
        if e.embedding:
            a_shape = (a_shape[1], a_shape[0])
        out_tensors.append(OutTensor(e.gguf + ".lora_a", a_shape, ga.tensor_type(e.gguf + ".lora_a", a_shape, outtype)))
        out_tensors.append(OutTensor(e.gguf + ".lora_b", b_shape, ga.tensor_type(e.gguf + ".lora_b", b_shape, outtype)))
    with GGUFFile(out, layout.arch.gguf, force=force, digest=hash_outputs) as f:
        w = f.writer
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", alpha)
        if name:
            w.add_name(name)
        f.plan(out_tensors)
        it = iter(out_tensors)
        for e in entries:
            a = src.get(e.a_key).to(torch.float32)
            b = src.get(e.b_key).to(torch.float32)
            a, b = lora_pair(e, a, b)
            ta, tb = next(it), next(it)
            f.write(ta.name, encode(a, ta.qtype))
            f.write(tb.name, encode(b, tb.qtype))
    types = dict(sorted(Counter(t.qtype.name.lower() for t in out_tensors).items()))
    folded = sum(1 for e in entries if e.factor != 1.0)
    lora = {
        "alpha": alpha,
        "modules": len(entries),
        "ranks": sorted({e.rank for e in entries}),
        "use_rslora": bool(config.get("use_rslora")),
        "scales_folded_into_b": folded,
        "module_scales": {e.gguf: e.to_dict() for e in entries},
    }
    return GGUFReport(
        "adapter", str(out), layout.arch.gguf, outtype, len(out_tensors), f.bytes_written, types, "adapter",
        lora=lora, files=(out.name,), seconds=time.perf_counter() - t0, file_sha256=_digests(out, f.sha256),
    )


def _unchanged(adapter_src: Any, base: FileMap) -> Any:
    """``unchanged(adapter key, base name)``: does a weight the adapter saved equal the base's? None without base weights."""
    import torch

    from adapterhub.converters.formats.safetensors_io import TensorSource

    try:
        bsrc = TensorSource(base)
    except (InvalidArtifactError, NotFoundError):
        return lambda key, name: None

    def same(key: str, name: str) -> bool | None:
        if name not in bsrc:
            return None
        return torch.equal(adapter_src.get(key), bsrc.get(name))

    return same


# --------------------------------------------------------------------------- merge


def merge_to_gguf(
    adapter: FileMap,
    base: FileMap,
    out: str | os.PathLike,
    *,
    outtype: str = "q8_0",
    device: str = "auto",
    qlora_base: str = "original",
    force: bool = False,
    progress: ProgressFactory | None = None,
    name: str | None = None,
    tokenizer_pre: str | None = None,
    modelfile: bool = False,
    hash_outputs: bool = False,
) -> GGUFReport:
    """Merge ``adapter`` into ``base`` and write the result as one GGUF file, in one pass."""
    from adapterhub.converters.merge import TOKENIZER_FILES, merged_config
    from adapterhub.converters.merge_plan import _resolve_device, prepare_merge

    t0 = time.perf_counter()
    out = Path(out)
    _check_out(out, [*adapter.values(), *base.values()], force)
    ga.qtype_of(outtype)
    prep = prepare_merge(adapter, base, qlora_base=qlora_base)
    config = merged_config(prep.base_config, prep)
    layout = ga.Layout.from_config(config)
    if modelfile:
        _check_modelfile(out, force)
    dev = _resolve_device(device)
    tok_files: FileMap = adapter if any(f in adapter for f in TOKENIZER_FILES if f != "config.json") else base
    tok_files = {**{k: v for k, v in base.items() if k == "config.json"}, **tok_files}
    specs = [(s.name, tuple(s.shape)) for s in prep.specs]
    bar = progress("merge+gguf", sum(s.nbytes for s in prep.specs)) if progress is not None else None
    try:
        n, nbytes, types, tok, sha = write_model(
            config, tok_files, specs, prep.iter_tensors(dev), out, outtype=outtype, force=force, name=name,
            tokenizer_pre=tokenizer_pre, bar=bar, hash_outputs=hash_outputs,
        )
    finally:
        if bar is not None:
            bar.close()
    written = [out.name]
    if modelfile:
        written.append(write_modelfile(out, tok_files, force=force))
    merge = {"method": prep.plan.method, "modules_merged": len(prep.plan.modules), "device": dev, "qlora_base": qlora_base}
    return GGUFReport(
        "model", str(out), layout.arch.gguf, outtype, n, nbytes, types, "merge", tokenizer=tok, merge=merge,
        files=tuple(written), warnings=tuple(prep.warnings), seconds=time.perf_counter() - t0,
        file_sha256=_digests(out, sha),
    )


# --------------------------------------------------------------------------- Ollama


def _check_modelfile(out: Path, force: bool) -> None:
    mf = out.parent / "Modelfile"
    if mf.exists() and not force:
        raise ConflictError(f"{mf} already exists", hint="pass --force to replace it")


def write_modelfile(out: Path, tok_files: FileMap, *, force: bool = False) -> str:
    """Write an Ollama ``Modelfile`` beside ``out``; return its name."""
    from adapterhub.converters.formats.gguf_ollama import modelfile_text
    from adapterhub.converters.formats.gguf_vocab import chat_template
    from adapterhub.converters.output import write_text

    _check_modelfile(out, force)
    write_text(out.parent / "Modelfile", modelfile_text(out.name, chat_template(tok_files)))
    return "Modelfile"
