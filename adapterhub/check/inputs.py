"""The two inputs of a check: the adapter and the base, resolved and inspected.

Either may be a directory, a registry ref or a Hub id in the local Hugging Face
cache (:mod:`adapterhub.sources`); registry blobs are read in place.
"""

from __future__ import annotations

import dataclasses
import os
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub import jsonio
from adapterhub.artifact import Inspection
from adapterhub.errors import InvalidArtifactError
from adapterhub.inspect import FileTree, inspect_files, read_checkpoint_weights
from adapterhub.inspect.safetensors import TensorInfo
from adapterhub.sources import Source, resolve_base, resolve_source

if TYPE_CHECKING:
    from adapterhub.registry import Registry

# bitsandbytes statistics stored beside quantized weights: not weights of the model.
BNB_AUX = re.compile(r"\.(absmax|quant_map|nested_absmax|nested_quant_map|SCB|weight_format|quant_state\..+)$")


@dataclass
class Side:
    src: Source
    info: Inspection
    config: dict[str, Any]


def _inspect_source(src: Source) -> Inspection:
    # Inspection works on a relpath -> file map, so registry blobs are read in place.
    root = src.root or Path(src.spec)
    return inspect_files(src.files, root, is_file=src.root is not None and src.root.is_file())


def read_json(src: Source, rel: str, max_bytes: int = jsonio.MAX_BYTES) -> dict[str, Any]:
    """A JSON object of ``src`` (size- and depth-capped), {} when absent or not an object."""
    p = src.files.get(rel)
    if p is None:
        return {}
    data = jsonio.read_json(p, what=rel, max_bytes=max_bytes, expect=None)
    return data if isinstance(data, dict) else {}


def load_adapter(spec: str | os.PathLike, registry: Registry | None) -> Side:
    src = resolve_source(spec, registry)
    info = _inspect_source(src)
    if info.kind != "adapter":
        raise InvalidArtifactError(
            f"{os.fspath(spec)} is a {info.kind}, not an adapter",
            hint="usage: adapterhub check ADAPTER --base BASE",
        )
    if "adapter_config.json" not in src.files:
        names = ", ".join(info.details.get("adapters") or {})
        if names:
            raise InvalidArtifactError(
                f"{os.fspath(spec)} holds named adapters ({names}) and none at its top level",
                hint="check one of them: pass its subfolder",
            )
        raise InvalidArtifactError(f"not supported yet: checking a {info.format} adapter ({os.fspath(spec)})")
    return Side(src, info, read_json(src, "adapter_config.json"))


def _existing_registry() -> Registry | None:
    """The default registry if one exists (never created by a check)."""
    from adapterhub.errors import NotFoundError
    from adapterhub.registry import Registry

    try:
        return Registry(create=False)
    except NotFoundError:
        return None


def load_base(spec: str | os.PathLike | None, adapter: Side, registry: Registry | None) -> tuple[Side, bool]:
    defaulted = spec is None
    remote = None
    if isinstance(spec, str) and spec.startswith(("oci://", "hf://")):
        # A base that stays on the remote: its config and safetensors headers only (HTTP Range).
        from adapterhub.registry.remotes.base import fetch_base

        # Credentials stored by `remote login` live in the registry: use it when there is one.
        remote = fetch_base(spec, registry if registry is not None else _existing_registry())
    src = resolve_base(adapter.src, remote.path if remote is not None else spec, registry)
    if remote is not None:  # named as the remote names it, for the identity rule and the report
        src = dataclasses.replace(src, spec=str(spec), origin="remote", **remote.identity())
    info = _inspect_source(src)
    shown = os.fspath(spec) if spec is not None else src.spec
    if info.kind == "adapter":
        raise InvalidArtifactError(f"the base {shown} is an adapter, not a model", hint="pass the base model with --base")
    if info.kind == "gguf":
        raise InvalidArtifactError(
            f"not supported yet: checking against a GGUF base ({shown})",
            hint="check against the safetensors checkpoint the GGUF file was made from",
        )
    side = Side(src, info, read_json(src, "config.json"))
    if remote is not None:
        weakref.finalize(side, remote.close)  # the laid-out headers live as long as the check's view of the base
    return side, defaulted


def base_tensors(base: Side) -> dict[str, TensorInfo] | None:
    """Every tensor of the base checkpoint by name, or None when its weights are pickled."""
    src = base.src
    if not any(r.endswith(".safetensors") and "/" not in r for r in src.files):
        return None
    root = src.root or Path(src.spec)
    return read_checkpoint_weights(FileTree(root, dict(src.files))).tensors


def logical_shapes(tensors: Mapping[str, TensorInfo], fingerprint: Mapping[str, Any] | None) -> dict[str, tuple[int, ...]]:
    """Base shapes as the model sees them: bitsandbytes weights at their original shape, statistics left out."""
    modules = (fingerprint or {}).get("modules") or {}
    out: dict[str, tuple[int, ...]] = {}
    for k, t in tensors.items():
        if BNB_AUX.search(k):
            continue
        mod = k[: -len(".weight")] if k.endswith(".weight") else None
        out[k] = tuple(modules[mod]) if mod is not None and mod in modules else t.shape
    return out
