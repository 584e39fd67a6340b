"""The artifact model: what inspection finds out about a directory or file.

``Inspection`` is produced by :func:`adapterhub.inspect.inspect_path` from JSON
files and safetensors/GGUF headers only (never from tensor data), and stored by
the registry. The typed fields are the ones the index filters on; everything
else from DESIGN.md §3 lives in ``details``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("adapter", "merged", "quantized", "gguf", "checkpoint")


@dataclass
class Inspection:
    kind: str  # one of KINDS
    format: str  # peft | adapters | transformers | safetensors (loose files, no config) | gguf
    method: str | None = None  # PEFT peft_type (LORA, IA3, ...), DORA for use_dora, BOTTLENECK, ...
    base_model: str | None = None  # base_model_name_or_path (adapters), base_model (model card)
    base_revision: str | None = None
    rank: int | None = None  # r; the largest r when rank_pattern varies it
    alpha: float | None = None
    quant: str | None = None  # nf4 | fp4 | int8 | gptq | awq | a GGUF type such as q4_k_m
    task_type: str | None = None
    dtypes: list[str] = field(default_factory=list)  # tensor dtypes, sorted
    params: int = 0  # number of tensor elements (trainable parameters for adapters)
    size: int = 0  # bytes over all files
    files: list[str] = field(default_factory=list)  # POSIX relpaths, digest order
    details: dict[str, Any] = field(default_factory=dict)  # every other DESIGN.md §3 field
    fingerprint: dict[str, Any] | None = None  # base fingerprint, or an adapter's expectation of it
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Inspection:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
