"""GGUF metadata from the file header (memory-mapped; tensor data is never read)."""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from adapterhub.artifact import Inspection
from adapterhub.errors import InvalidArtifactError
from adapterhub.inspect.fingerprint import digest

# Arrays longer than this (tokenizer vocabularies, merges) are reported by length only.
_MAX_ARRAY = 16
# Bounds on what a header may claim, far above any real file (vocabularies hold ~256k
# tokens, MoE models ~50k tensors): a crafted count is refused instead of walked.
_MAX_KV = 1 << 16
_MAX_TENSORS = 1 << 20
_MAX_ITEMS = 1 << 24  # elements of one array of strings
_MAX_NESTED_ITEMS = 1 << 16  # elements of one array of arrays
_MAX_DEPTH = 8  # arrays of arrays of ...
_MAX_STRING = 1 << 20  # longer strings are reported by length only
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


# GGUF value types (gguf.GGUFValueType) and the struct format of the scalar ones.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8


class _Cursor:
    """Bounds-checked reads from a memory-mapped GGUF header."""

    def __init__(self, buf: mmap.mmap, rel: str, order: str) -> None:
        self.buf, self.rel, self.order, self.pos = buf, rel, order, 0

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise InvalidArtifactError(
                f"{self.rel}: GGUF header runs past the end of the file at byte {self.pos} (truncated file?)"
            )

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        (v,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, limit: int | None = None) -> Any:
        n = self.scalar("Q")
        self._need(n)
        if limit is not None and n > limit:
            self.pos += n
            return {"string_length": n}
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", "replace")

    def key(self) -> str:
        k = self.string(limit=1 << 16)
        if not isinstance(k, str):
            raise InvalidArtifactError(f"{self.rel}: a GGUF metadata key of {k['string_length']} bytes")
        return k

    def count(self, n: int, limit: int, what: str) -> int:
        if n > limit:
            raise InvalidArtifactError(f"{self.rel}: GGUF header claims {n} {what} (limit {limit}); a damaged or crafted file")
        return n

    def skip_strings(self, count: int) -> None:
        buf, pos, order, end = self.buf, self.pos, self.order + "Q", len(self.buf)
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self._need(8)
            (n,) = struct.unpack_from(order, buf, pos)
            pos += 8 + n
        self.pos = pos
        self._need(0)

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string(_MAX_STRING)
        if vtype == _ARRAY:
            if depth >= _MAX_DEPTH:
                raise InvalidArtifactError(f"{self.rel}: GGUF metadata nested deeper than {_MAX_DEPTH} levels of arrays")
            etype, count = self.scalar("I"), self.scalar("Q")
            if count > _MAX_ARRAY:
                if etype == _STRING:
                    self._need(8 * self.count(count, _MAX_ITEMS, "strings in one array"))
                    self.skip_strings(count)
                elif etype in _SCALAR:
                    n = struct.calcsize(_SCALAR[etype]) * count
                    self._need(n)
                    self.pos += n
                elif etype == _ARRAY:  # arrays of arrays: walk them
                    self._need(12 * self.count(count, _MAX_NESTED_ITEMS, "arrays in one array"))
                    for _ in range(count):
                        self.value(etype, depth + 1)
                else:
                    raise InvalidArtifactError(f"{self.rel}: unknown GGUF value type {etype} at byte {self.pos}")
                return {"array_length": count}
            return [self.value(etype, depth + 1) for _ in range(count)]
        raise InvalidArtifactError(f"{self.rel}: unknown GGUF value type {vtype} at byte {self.pos}")


def _read(path: Path, rel: str) -> tuple[dict[str, Any], list[tuple[str, str, list[int], int]]]:
    """(metadata, [(name, ggml type, shape as [out, in, ...], n_elements)]) of one file.

    A direct header parser: ``gguf.GGUFReader`` builds a numpy view per array
    element, which took 27 s for a header with a 152k-token vocabulary here.
    Tensor data is never touched; its extent is checked against the file size.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = os.stat(path).st_size
    if size < 24:
        raise InvalidArtifactError(f"{rel}: not a GGUF file ({size} bytes)")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise InvalidArtifactError(f"{rel}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
        (version,) = struct.unpack_from("<I", buf, 4)
        order = "<"
        if version & 0xFFFF == 0:  # written big-endian
            order = ">"
            (version,) = struct.unpack_from(">I", buf, 4)
        if version not in (2, 3):
            raise InvalidArtifactError(f"{rel}: unsupported GGUF version {version}")
        cur = _Cursor(buf, rel, order)
        cur.pos = 8
        n_tensors = cur.count(cur.scalar("Q"), _MAX_TENSORS, "tensors")
        n_kv = cur.count(cur.scalar("Q"), _MAX_KV, "metadata entries")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.key()
            meta[key] = cur.value(cur.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.key()
            n_dims = cur.scalar("I")
            if n_dims > _MAX_DIMS:
                raise InvalidArtifactError(f"{rel}: tensor {name!r} claims {n_dims} dimensions")
            dims = [cur.scalar("Q") for _ in range(n_dims)]
            infos.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
        header_end = cur.pos
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align > 1 << 30:
        raise InvalidArtifactError(f"{rel}: bad general.alignment {align!r}")
    data_start = header_end + (-header_end % align)
    tensors = []
    for name, dims, raw_type, offset in infos:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise InvalidArtifactError(f"{rel}: tensor {name!r} has unknown GGML type {raw_type}") from None
        if qtype not in GGML_QUANT_SIZES:
            raise InvalidArtifactError(f"{rel}: tensor {name!r} has GGML type {qtype.name}, which has no known size")
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = math.prod(dims)
        end = data_start + offset + n // block * type_size
        if end > size:
            raise InvalidArtifactError(
                f"{rel}: tensor {name!r} ends at byte {end} but the file has {size} bytes (truncated file?)"
            )
        # GGUF lists dimensions innermost first; PyTorch order is the reverse.
        tensors.append((name, qtype.name, list(reversed(dims)), n))
    return meta, tensors


def _file_type_name(value: int) -> str | None:
    """``general.file_type`` as llama.cpp names it, e.g. 7 -> "q8_0", 15 -> "q4_k_m"."""
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(value).name
    except ValueError:
        return None
    if name == "GUESSED":
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def _check_split(parts: list[str]) -> None:
    groups: dict[tuple[str, int], set[int]] = {}
    for r in parts:
        m = _SPLIT.match(r.rsplit("/", 1)[-1])
        assert m is not None
        groups.setdefault((m["stem"], int(m["n"])), set()).add(int(m["i"]))
    if len(groups) > 1:
        raise InvalidArtifactError(
            f"several split GGUF models in one directory: {', '.join(sorted(s for s, _ in groups))}"
        )
    (((stem, n), have),) = groups.items()
    missing = [f"{stem}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1) if i not in have]
    if missing:
        raise InvalidArtifactError(f"split GGUF {stem} has {len(have)} of {n} parts: {', '.join(missing)} missing")


Tensor = tuple[str, str, list[int], int]  # name, GGML type, shape [out, in, ...], elements


def _parts(files: dict[str, Path], rels: list[str], warnings: list[str]) -> list[str]:
    """The files to read: every part of a split GGUF, else the one file (the largest of several)."""
    split = [r for r in rels if _SPLIT.match(r.rsplit("/", 1)[-1])]
    if len(rels) <= 1:
        return list(rels)
    if split and len(split) == len(rels):
        parts = sorted(rels)
        _check_split(parts)
        return parts
    # e.g. a model beside its multimodal projector: describe the largest.
    main = max(rels, key=lambda r: (os.stat(files[r]).st_size, r))
    others = sorted(r for r in rels if r != main)
    warnings.append(f"several GGUF files; describing {main}, also present: {', '.join(others)}")
    return [main]


def _details(meta: dict[str, Any], tensors: list[Tensor], parts: list[str]) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    arch_s = arch if isinstance(arch, str) else ""

    def a(key: str) -> Any:
        return meta.get(f"{arch_s}.{key}")

    vocab = meta.get("tokenizer.ggml.tokens")
    vocab_size = (
        vocab.get("array_length") if isinstance(vocab, dict) else (len(vocab) if isinstance(vocab, list) else None)
    )
    details: dict[str, Any] = {
        "architecture": arch,
        "name": meta.get("general.name"),
        "tensors": len(tensors),
        "tensor_types": dict(sorted(Counter(tt.lower() for _, tt, _, _ in tensors).items())),
        "context_length": a("context_length"),
        "embedding_length": a("embedding_length"),
        "block_count": a("block_count"),
        "feed_forward_length": a("feed_forward_length"),
        "head_count": a("attention.head_count"),
        "head_count_kv": a("attention.head_count_kv"),
        "file_type": meta.get("general.file_type"),
        "quantization_version": meta.get("general.quantization_version"),
        "size_label": meta.get("general.size_label"),
        "vocab_size": vocab_size or a("vocab_size"),
    }
    if len(parts) > 1:
        details["split_files"] = parts
    details = {k: v for k, v in details.items() if v is not None}
    details["gguf_metadata"] = dict(sorted(meta.items()))
    return details


def _adapter(meta: dict[str, Any], tensors: list[Tensor], common: dict[str, Any]) -> Inspection:
    """A GGUF LoRA: ``<base tensor>.lora_a`` is ``[r, in]`` and ``.lora_b`` ``[out, r]``."""
    atype = str(meta.get("adapter.type") or "lora")
    alpha = meta.get("adapter.lora.alpha")
    ranks: dict[str, int] = {}
    modules: dict[str, list[int | None]] = {}
    for name, _, shape, _ in tensors:
        lm = re.match(r"^(?P<mod>.+?)(\.weight)?\.lora_(?P<ab>[ab])$", name)
        if not lm or len(shape) != 2:
            continue
        cur = modules.setdefault(lm["mod"], [None, None])
        if lm["ab"] == "a":  # [r, in]
            ranks[lm["mod"]] = shape[0]
            cur[1] = shape[1]
        else:  # [out, r]
            cur[0] = shape[0]
    if ranks:
        common["details"]["module_ranks"] = dict(sorted(ranks.items()))
    return Inspection(
        kind="adapter",
        format="gguf",
        method=atype.upper(),
        rank=max(ranks.values()) if ranks else None,
        alpha=float(alpha) if isinstance(alpha, (int, float)) and math.isfinite(alpha) else None,
        quant=None,
        fingerprint={"modules": dict(sorted(modules.items())), "base_model": common["base_model"]},
        **common,
    )


def _model(meta: dict[str, Any], tensors: list[Tensor], common: dict[str, Any]) -> Inspection:
    details = common["details"]
    types = Counter(tt for _, tt, shape, _ in tensors if len(shape) >= 2)
    ft = meta.get("general.file_type")
    quant = _file_type_name(ft) if isinstance(ft, int) else None
    if quant is None and types:
        quant = types.most_common(1)[0][0].lower()
    fp_modules = {
        name[: -len(".weight")]: shape for name, _, shape, _ in tensors if name.endswith(".weight") and len(shape) == 2
    }
    fingerprint: dict[str, Any] = {
        "architecture": details.get("architecture"),
        "model_type": details.get("architecture"),
        "hidden_size": details.get("embedding_length"),
        "num_hidden_layers": details.get("block_count"),
        "vocab_size": details.get("vocab_size"),
        "modules": dict(sorted(fp_modules.items())),
    }
    fingerprint["digest"] = digest(fingerprint)
    return Inspection(kind="gguf", format="gguf", quant=quant, fingerprint=fingerprint, **common)


def inspect_gguf(files: dict[str, Path], rels: list[str]) -> Inspection:
    """Inspect one GGUF file, or the parts of a split GGUF (``x-00001-of-00003.gguf``)."""
    warnings: list[str] = []
    parts = _parts(files, rels, warnings)
    meta: dict[str, Any] = {}
    tensors: list[Tensor] = []
    for i, rel in enumerate(parts):
        m, t = _read(files[rel], rel)
        if i == 0:
            meta = m
        tensors.extend(t)
    base_model = meta.get("general.base_model.0.repo_url") or meta.get("general.base_model.0.name")
    common: dict[str, Any] = {
        "base_model": base_model if isinstance(base_model, str) else None,
        "dtypes": sorted({tt.lower() for _, tt, _, _ in tensors}),
        "params": sum(n for *_, n in tensors),
        "details": _details(meta, tensors, parts),
        "warnings": warnings,
    }
    if meta.get("general.type") == "adapter" or "adapter.type" in meta:
        return _adapter(meta, tensors, common)
    return _model(meta, tensors, common)


def read_gguf_header(path: str | os.PathLike) -> tuple[dict[str, Any], list[Tensor]]:
    """(metadata, [(name, GGML type, shape [out, in, ...], elements)]) of one GGUF file, from its header only."""
    p = Path(path)
    return _read(p, p.name)


def file_type_name(value: int) -> str | None:
    """``general.file_type`` as llama.cpp names it (7 -> "q8_0"), or None."""
    return _file_type_name(value)
