"""QLoRA: how an adapter's 4-bit base was quantized, and dequant(quant(W)) as it saw the weights."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

@dataclass(frozen=True)
class QuantSpec:
    """How the base was quantized while the adapter trained (bitsandbytes 4-bit)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    source: str = "default"  # where these settings came from

    def to_dict(self) -> dict[str, Any]:
        return {"quant_type": self.quant_type, "blocksize": self.blocksize, "double_quant": self.double_quant, "source": self.source}


def detect_qlora(config: Mapping[str, Any], card: str | None) -> QuantSpec | None:
    """Find whether an adapter was trained on a 4-bit base, where its files say so.

    PEFT < 0.7 wrote the bitsandbytes config into the adapter's README.md;
    PEFT 0.21 records nothing, so ``None`` means "not known", not "not QLoRA".
    """
    qc = config.get("quantization_config")
    if isinstance(qc, Mapping) and qc.get("load_in_4bit"):
        return QuantSpec(
            str(qc.get("bnb_4bit_quant_type", "nf4")), 64, bool(qc.get("bnb_4bit_use_double_quant", False)), "adapter_config.json"
        )
    if not card:
        return None

    def field_(name: str) -> str | None:
        m = re.search(rf"^\s*-\s*{name}:\s*(\S+)\s*$", card, re.MULTILINE)
        return m.group(1) if m else None

    if (field_("load_in_4bit") or "").lower() != "true":
        return None
    return QuantSpec(
        (field_("bnb_4bit_quant_type") or "nf4").lower(),
        64,
        (field_("bnb_4bit_use_double_quant") or "false").lower() == "true",
        "adapter model card",
    )


def quantize_roundtrip(weight: torch.Tensor, spec: QuantSpec | None = None, device: str | torch.device | None = None) -> torch.Tensor:
    """``dequant(quant(W))`` with bitsandbytes, as transformers quantizes a base for QLoRA.

    Same call as ``bitsandbytes.nn.Params4bit._quantize`` (blocksize 64,
    ``compress_statistics`` = double quantization), in ``weight``'s dtype.
    Dequantized as one flat row and then shaped, as ``bnb_quant.dequantize_weight``
    does: bitsandbytes' CPU kernel, given the 2-D shape, gets rows that are not
    whole blocks wrong.
    """
    import torch
    import bitsandbytes.functional as bnbf

    spec = spec or QuantSpec()
    w = weight.contiguous()
    if device is not None:
        w = w.to(device)
    q, state = bnbf.quantize_4bit(w, blocksize=spec.blocksize, compress_statistics=spec.double_quant, quant_type=spec.quant_type)
    state.shape = torch.Size([w.numel()])  # ``state`` is this call's own
    return bnbf.dequantize_4bit(q, state).reshape(w.shape)
