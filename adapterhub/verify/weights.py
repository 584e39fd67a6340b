"""Weights read one tensor at a time for ``verify --streamed``.

:class:`SafetensorsWeights` maps each safetensors file once (``mmap``) and
hands out tensors that *are* the file's pages: nothing is copied, and a 16-bit
checkpoint is never converted. After a module has run, :meth:`release` tells
the kernel the process no longer needs those pages (``MADV_DONTNEED``): they
stay in the page cache for the next reader, but leave this process's resident
set, so its peak RSS is about one module, not the checkpoint.

:class:`BnbWeights` wraps a bitsandbytes checkpoint and returns each quantized
module's weight dequantized (by bitsandbytes itself), under its plain name.

Both give tensors by transformers' names (``model.layers.0.mlp.up_proj.weight``).

>>> w = SafetensorsWeights(Path("merged"))                     # doctest: +SKIP
>>> w.shape("model.layers.0.mlp.up_proj.weight")
(5632, 2048)
>>> t = w.get("model.layers.0.mlp.up_proj.weight"); ...; w.release("model.layers.0.mlp.up_proj.weight")
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from adapterhub.errors import InvalidArtifactError

if TYPE_CHECKING:
    import torch

_PAGE = mmap.PAGESIZE
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
# Models saved from the bare decoder (``LlamaModel``) lack the ``model.`` prefix of the causal-LM class.
_BARE_PREFIXES = ("layers.", "embed_tokens.", "norm.")


class WeightSource(Protocol):
    """Tensors by transformers' names, read on demand."""

    def keys(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def release(self, name: str) -> None: ...

    def close(self) -> None: ...


def canonical(name: str) -> str:
    """A tensor name in the causal-LM layout (``layers.0.…`` -> ``model.layers.0.…``)."""
    return "model." + name if name.startswith(_BARE_PREFIXES) else name


class SafetensorsWeights:
    """Every ``*.safetensors`` file of a directory, memory-mapped (see the module doc)."""

    def __init__(self, root: Path) -> None:
        from adapterhub.inspect.safetensors import read_header

        self.root = root
        self._where: dict[str, tuple[int, Any]] = {}  # name -> (file index, TensorInfo)
        self._paths: list[Path] = sorted(root.glob("*.safetensors"))
        if not self._paths:
            raise InvalidArtifactError(f"{root}: no safetensors weights (--streamed reads safetensors checkpoints)")
        for i, p in enumerate(self._paths):
            for name, info in read_header(p).tensors.items():
                self._where[canonical(name)] = (i, info)
        self._maps: dict[int, mmap.mmap] = {}

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)[1].shape)

    def dtype(self, name: str) -> str:
        return _ST_DTYPES.get(self._info(name)[1].dtype, "?")

    def _info(self, name: str) -> tuple[int, Any]:
        try:
            return self._where[name]
        except KeyError:
            raise InvalidArtifactError(f"{self.root.name}: no tensor {name}") from None

    def _map(self, i: int) -> mmap.mmap:
        m = self._maps.get(i)
        if m is None:
            with open(self._paths[i], "rb") as f:
                # Private and writable so torch can wrap it without a copy; nothing is ever written.
                m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self._maps[i] = m
        return m

    def get(self, name: str) -> torch.Tensor:
        """The tensor, backed by the file's pages (no copy)."""
        import torch

        i, info = self._info(name)
        dtype = getattr(torch, _ST_DTYPES.get(info.dtype, ""), None)
        if dtype is None:
            raise InvalidArtifactError(f"{name}: dtype {info.dtype} cannot be read")
        n = info.numel
        if n == 0:
            return torch.empty(info.shape, dtype=dtype)
        t = torch.frombuffer(self._map(i), dtype=dtype, count=n, offset=info.start)
        return t.view(info.shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (they stay in the page cache)."""
        i, info = self._info(name)
        m = self._maps.get(i)
        if m is None or not hasattr(m, "madvise"):
            return
        start = info.start // _PAGE * _PAGE
        length = info.end - start
        if length > 0:
            m.madvise(mmap.MADV_DONTNEED, start, min(length, len(m) - start))

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a tensor still views it: the map goes with the last one
                pass
        self._maps.clear()


class BnbWeights:
    """A bitsandbytes checkpoint (transformers' layout) with every quantized
    module's weight dequantized on :meth:`get`, under ``<module>.weight``."""

    def __init__(self, raw: SafetensorsWeights) -> None:
        from adapterhub.converters.formats.bnb import dequantized_shape, module_kind

        self.raw = raw
        parts: dict[str, dict[str, Any]] = {}
        for name in raw.keys():
            for suffix in (".weight", ".SCB", ".weight_format"):
                if name.endswith(suffix) or f"{suffix}." in name:
                    module = name[: name.index(suffix)] if f"{suffix}." in name else name.removesuffix(suffix)
                    parts.setdefault(module, {})[name[len(module) + 1 :]] = raw._info(name)[1]
        self.quantized: dict[str, list[str]] = {}  # module -> its raw tensor names
        self._shapes: dict[str, tuple[int, ...]] = {}
        for module, specs in parts.items():
            if module_kind(specs) is None:
                continue
            self.quantized[module] = [f"{module}.{rel}" for rel in specs]
            self._shapes[module] = dequantized_shape({k: _HeaderTensor(raw, f"{module}.{k}", v) for k, v in specs.items()})
        hidden = {n for names in self.quantized.values() for n in names}
        self._plain = [n for n in raw.keys() if n not in hidden]

    def keys(self) -> Iterable[str]:
        return [*self._plain, *(f"{m}.weight" for m in self.quantized)]

    def __contains__(self, name: object) -> bool:
        return name in self._plain or (isinstance(name, str) and name.removesuffix(".weight") in self.quantized)

    def is_quantized(self, name: str) -> bool:
        return name.endswith(".weight") and name.removesuffix(".weight") in self.quantized

    def shape(self, name: str) -> tuple[int, ...]:
        if self.is_quantized(name):
            return self._shapes[name.removesuffix(".weight")]
        return self.raw.shape(name)

    def get(self, name: str) -> torch.Tensor:
        if not self.is_quantized(name):
            return self.raw.get(name)
        from adapterhub.converters.formats.bnb import dequantize_weight

        module = name.removesuffix(".weight")
        tensors = {n[len(module) + 1 :]: self.raw.get(n) for n in self.quantized[module]}
        out = dequantize_weight(tensors, module=module)
        for n in self.quantized[module]:
            self.raw.release(n)
        return out

    def release(self, name: str) -> None:
        if not self.is_quantized(name):
            self.raw.release(name)

    def close(self) -> None:
        self.raw.close()


class _HeaderTensor:
    """Enough of a tensor (shape, numel, element size, and the bytes of small
    ones) for bitsandbytes' layout checks, read from the header."""

    def __init__(self, raw: SafetensorsWeights, name: str, info: Any) -> None:
        self._raw, self._name, self.shape = raw, name, tuple(info.shape)
        self._size = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1}.get(info.dtype, 1)

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def element_size(self) -> int:
        return self._size

    def detach(self) -> torch.Tensor:
        return self._raw.get(self._name).detach()


def weight_bytes(root: Path) -> int:
    return sum(os.path.getsize(p) for p in root.glob("*.safetensors"))
