"""The bitsandbytes format, public face: checkpoint layout (``bnb_layout``) and quantizers (``bnb_quant``).

What transformers + bitsandbytes save per quantized Linear module, which
checkpoint tensors they quantize, and the per-weight quantize and dequantize
that produce and read those tensors. Whole-checkpoint conversions are
``adapterhub.converters.quantize``.

>>> qz = Quantizer(QuantSettings("nf4"), base_config)        # doctest: +SKIP
>>> specs = qz.specs(spec) if qz.wants(spec) else [spec]
>>> tensors = qz.quantize(spec.name, weight)
"""

from __future__ import annotations

from adapterhub.converters.formats.bnb_layout import (
    BLOCKSIZES,
    CONV1D_MODEL_TYPES,
    DEFAULT_BLOCKSIZE,
    FLOAT_DTYPES,
    MODES,
    NESTED_BLOCKSIZE,
    QUANT_STATE_KEY,
    QuantSettings,
    dequantized_shape,
    is_conv1d,
    is_embedding,
    is_head,
    module_kind,
    quant_state_json,
    quantization_config_for,
    quantized_specs,
    should_quantize,
)
from adapterhub.converters.formats.bnb_quant import Quantizer, dequantize_weight, nested_offset, quantize_weight

__all__ = [
    "BLOCKSIZES",
    "CONV1D_MODEL_TYPES",
    "DEFAULT_BLOCKSIZE",
    "FLOAT_DTYPES",
    "MODES",
    "NESTED_BLOCKSIZE",
    "QUANT_STATE_KEY",
    "QuantSettings",
    "Quantizer",
    "dequantize_weight",
    "dequantized_shape",
    "is_conv1d",
    "is_embedding",
    "is_head",
    "module_kind",
    "nested_offset",
    "quant_state_json",
    "quantization_config_for",
    "quantize_weight",
    "quantized_specs",
    "should_quantize",
]
