"""The files of an artifact as inspection sees them, and helpers every format shares."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub import jsonio
from adapterhub.inspect.safetensors import SafetensorsHeader, TensorInfo, read_header

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# File names of the `adapters` library (src/adapters/utils.py: CONFIG_NAME,
# SAFE_WEIGHTS_NAME, WEIGHTS_NAME, SAFE_HEAD_WEIGHTS_NAME, HEAD_WEIGHTS_NAME).
AH_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
AH_HEAD_CONFIG = "head_config.json"
AH_HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")
HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
MODEL_CARD = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class FileTree:
    """The files of an artifact, by relpath (a directory, or registry blobs read in place)."""

    root: Path
    files: dict[str, Path]  # relpath -> path, digest order
    is_file: bool = False

    @property
    def size(self) -> int:
        return sum(os.stat(p).st_size for p in self.files.values())

    def top(self) -> list[str]:
        return [r for r in self.files if "/" not in r]

    def under(self, prefix: str) -> FileTree:
        n = len(prefix) + 1
        return FileTree(self.root / prefix, {r[n:]: p for r, p in self.files.items() if r.startswith(prefix + "/")})


def load_json(tree: FileTree, rel: str, display: str | None = None) -> dict[str, Any]:
    """A JSON object from ``tree`` (size- and depth-capped); errors name ``display``."""
    return jsonio.read_json(tree.files[rel], what=display or rel)


def header(tree: FileTree, rel: str, display: str | None = None) -> SafetensorsHeader:
    return read_header(tree.files[rel], display or rel)


def dtype_names(tensors: Iterable[TensorInfo]) -> list[str]:
    return sorted({t.dtype_name for t in tensors})


def is_pickle(rel: str) -> bool:
    return rel.endswith(PICKLE_SUFFIXES)


def num(v: Any) -> float | None:
    """A finite number from a config value, else None (bools are not numbers)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:  # an integer too large for a float
        return None
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def int_or_none(v: Any) -> int | None:
    """An int config value (not a bool), else None."""
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def compact(d: Mapping[str, Any]) -> dict[str, Any]:
    """Drop keys whose value carries no information (None, empty containers)."""
    return {k: v for k, v in d.items() if v is not None and v != {} and v != [] and v != ""}


def sorted_if_list(v: Any) -> Any:
    if isinstance(v, (list, tuple, set)):
        return sorted(v, key=str)
    return v
