"""bitsandbytes quantizers, one Linear weight at a time: 4-bit (NF4/FP4, optionally
double-quantized) and 8-bit (LLM.int8 row-wise), and their inverse.

``quantize_weight`` returns the tensors transformers saves for one module, in
the order ``bnb_layout.quantized_specs`` announces; ``Quantizer`` binds the
settings to a model's ``config.json`` for a streaming writer;
``dequantize_weight`` reads one module back.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError

from adapterhub.converters.formats.bnb_layout import (
    DEFAULT_BLOCKSIZE,
    FLOAT_DTYPES,
    NESTED_BLOCKSIZE,
    QUANT_STATE_KEY,
    QuantSettings,
    _dtype_name,
    _fixed_offset,
    _quant_state,
    transformers_hints,
    is_conv1d,
    module_kind,
    quant_state_json,
    quantized_specs,
    should_quantize,
)
from adapterhub.converters.formats.safetensors_io import TensorSpec

if TYPE_CHECKING:
    import torch

def _check_finite(module: str, W: torch.Tensor) -> None:
    import torch

    if not bool(torch.isfinite(W).all()):
        raise InvalidArtifactError(f"{module}.weight has non-finite values (NaN or inf); refusing to quantize it")


def nested_offset(W: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE) -> float:
    """The double-quant offset bitsandbytes will store for ``W``: mean of the blockwise absmax.

    Equal to ``quantize_4bit(W, compress_statistics=True)[1].offset`` computed on
    the same device (the absmax is bitsandbytes' to the bit, partial last block
    included; the mean is torch's, over the same values).
    """
    if W.device.type == "cpu":
        from adapterhub.converters.formats.bnb_cpu import block_absmax

        return float(block_absmax(W, blocksize).mean().item())
    import torch

    flat = W.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().amax(dim=1).float()
    if full < n:  # bitsandbytes stores a partial last block's absmax clamped to 1e-38
        absmax = torch.cat([absmax, flat[full:].abs().amax().float().clamp(min=1e-38).reshape(1)])
    return float(absmax.mean().item())


def _quantize_4bit(W: torch.Tensor, blocksize: int, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' ``quantize_4bit(W)`` as (packed, absmax, code).

    On the CPU, ``bnb_cpu`` (the C kernel where it is built, else vectorized
    torch code: the same bytes in a fraction of the time); elsewhere
    bitsandbytes itself.
    """
    if W.device.type == "cpu":
        from adapterhub.converters.formats.bnb_cpu import quantize_4bit

        return quantize_4bit(W, blocksize, mode)
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(W, blocksize=blocksize, compress_statistics=False, quant_type=mode)
    return packed, state.absmax, state.code


def _int8(module: str, W: torch.Tensor) -> dict[str, torch.Tensor]:
    """Int8Params._quantize: row-wise absmax of the float16 weight."""
    import torch

    if W.device.type == "cpu":
        from adapterhub.converters.formats.bnb_cpu import int8_rowwise

        CB, SCB = int8_rowwise(W)
        overflow = not bool(torch.isfinite(SCB).all())  # a row's max is inf (or NaN) where it is not finite in float16
        if overflow:
            _check_finite(module, W)  # NaN or inf in W itself, or else a float16 overflow
    else:
        import bitsandbytes.functional as F

        W16 = W.to(torch.float16)
        overflow = not bool(torch.isfinite(W16).all())
        if not overflow:
            CB, SCB, _ = F.int8_vectorwise_quant(W16)
    if overflow:
        raise InvalidArtifactError(f"{module}.weight overflows float16, which int8 quantization goes through")
    return {
        f"{module}.weight": CB,
        f"{module}.SCB": SCB,
        f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8, device=W.device),  # "row"
    }


def _double_quant(
    out: dict[str, torch.Tensor], module: str, absmax: torch.Tensor, nested_offset: float | None
) -> str | None:
    """bitsandbytes' quantize_4bit(compress_statistics=True) of ``absmax`` into ``out``.

    The offset is taken from the plan, so that the JSON matches the planned
    length; with none planned it is computed here and returned as the
    fixed-width number to write (see the module doc of ``bnb_layout``).
    """
    import torch

    if nested_offset is None:
        offset = absmax.mean()
        number: str | None = _fixed_offset(float(offset.item()))
    else:
        offset = torch.tensor(nested_offset, dtype=torch.float32, device=absmax.device)
        number = None
    if absmax.device.type == "cpu":  # the same bytes without importing bitsandbytes (seconds of start-up)
        from adapterhub.converters.formats.bnb_cpu import dynamic_code, quantize_blockwise_8bit

        qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
        code = dynamic_code().clone()
    else:
        import bitsandbytes.functional as F

        qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        nested_absmax, code = state2.absmax, state2.code.clone()
    out[f"{module}.weight.absmax"] = qabsmax
    out[f"{module}.weight.nested_absmax"] = nested_absmax
    out[f"{module}.weight.nested_quant_map"] = code
    return number


def quantize_weight(
    module: str,
    W: torch.Tensor,
    mode: str,
    *,
    double_quant: bool = False,
    blocksize: int = DEFAULT_BLOCKSIZE,
    nested_offset: float | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize a Linear weight ``W`` (out, in) into the tensors transformers saves for ``module``.

    Tensors come back on ``W``'s device, named and ordered as :func:`quantized_specs`
    says. The compute dtype does not appear in them (it lives in ``config.json``);
    the quant state records ``W``'s own dtype, so cast ``W`` first to change it.
    With double quantization, ``nested_offset`` is the value the specs were
    planned with (see the module doc); ``None`` means "computed here, written
    fixed-width".
    """
    import torch

    if W.dim() != 2:
        raise InvalidArtifactError(f"{module}.weight is {W.dim()}-D; only 2-D Linear weights are quantized")
    if _dtype_name(W.dtype) not in FLOAT_DTYPES:
        raise InvalidArtifactError(f"{module}.weight is {_dtype_name(W.dtype)}; only float16/bfloat16/float32 quantize")
    cpu = W.device.type == "cpu"
    if not cpu:
        _check_finite(module, W)  # on the CPU, the absmax below tells (inf or NaN in a block makes it non-finite)
    W = W.contiguous()
    if mode == "int8":
        return _int8(module, W)
    if mode not in ("nf4", "fp4"):
        raise InvalidArtifactError(f"unknown quantization {mode!r}")
    packed, absmax, code = _quantize_4bit(W, blocksize, mode)
    if cpu and not bool(torch.isfinite(absmax).all()):
        _check_finite(module, W)
    out: dict[str, torch.Tensor] = {
        f"{module}.weight": packed,
        f"{module}.weight.absmax": absmax,
        f"{module}.weight.quant_map": code,
    }
    if not double_quant:
        qs = quant_state_json(mode, W.shape, W.dtype, blocksize=blocksize)
    else:
        number = _double_quant(out, module, absmax, nested_offset)
        qs = quant_state_json(
            mode, W.shape, W.dtype, blocksize=blocksize, double_quant=True, nested_offset=nested_offset
        )
        if number is not None:
            qs = qs[: -24] + number.encode() + b"}"
    out[f"{module}.{QUANT_STATE_KEY}{mode}"] = torch.frombuffer(bytearray(qs), dtype=torch.uint8).to(W.device)
    return out


class Quantizer:
    """Settings bound to one model's ``config.json``: the per-tensor API of a quantizing writer.

    :func:`quantize` uses it, and so can ``merge --quantize``::

        qz = Quantizer(QuantSettings("nf4"), base_config)      # refuses unsupported architectures
        specs = [o for s in merged_specs for o in (qz.specs(s) if qz.wants(s) else [s])]
        ...                                                    # StreamingShardWriter(tmp, specs)
        for s in merged_specs:
            t = merged_tensor(s.name)
            for name, v in (qz.quantize(s.name, t) if qz.wants(s) else {s.name: t}).items():
                writer.write(name, v)
        config["quantization_config"] = qz.settings.quantization_config()

    With double quantization and no ``offsets`` pre-pass, the quant-state JSON
    is written fixed-width (see the module doc); pass ``offsets[name] =
    qz.offset(name, tensor)`` from a first pass to get transformers' exact bytes.
    """

    def __init__(self, settings: QuantSettings, config: Mapping[str, Any]) -> None:
        keep, refuse = transformers_hints(config)
        if refuse:
            raise InvalidArtifactError(refuse)
        self.settings = settings
        self.config = dict(config)
        self.keep_in_fp32 = keep

    def wants(self, spec: TensorSpec) -> bool:
        return should_quantize(
            spec, self.config, skip_modules=self.settings.skip_modules, keep_in_fp32=self.keep_in_fp32
        )

    def _module(self, name: str) -> tuple[str, bool]:
        module = name.removesuffix(".weight")
        return module, is_conv1d(module, self.config)

    def specs(self, spec: TensorSpec, nested_offset: float | None = None) -> list[TensorSpec]:
        """The output specs replacing a wanted checkpoint tensor ``spec``."""
        module, conv = self._module(spec.name)
        s = self.settings
        return quantized_specs(
            module, spec.shape[::-1] if conv else spec.shape, spec.dtype, s.mode,
            double_quant=s.double_quant, blocksize=s.blocksize, nested_offset=nested_offset,
        )

    def _linear(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        module, conv = self._module(name)
        return module, (tensor.T.contiguous() if conv else tensor)  # Conv1D stores (in, out)

    def offset(self, name: str, tensor: torch.Tensor) -> float:
        """The double-quant offset of a checkpoint tensor (for the pre-pass)."""
        module, W = self._linear(name, tensor)
        value = nested_offset(W, self.settings.blocksize)
        # quantize() leaves the check to quantize_weight, which comes after this pre-pass. The mean of the
        # block absmax is finite when W is (barring a sum past float32's range, which the full check clears);
        # isfinite over all of W took 3.7 s of a 7 s --double-quant run of a 0.94B model.
        if not math.isfinite(value):
            _check_finite(module, W)
        return value

    def quantize(self, name: str, tensor: torch.Tensor, nested_offset: float | None = None) -> dict[str, torch.Tensor]:
        """Quantize a wanted checkpoint tensor on its device into the tensors :meth:`specs` announced."""
        module, W = self._linear(name, tensor)
        s = self.settings
        return quantize_weight(
            module, W, s.mode, double_quant=s.double_quant, blocksize=s.blocksize, nested_offset=nested_offset
        )



def dequantize_weight(
    tensors: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    module: str = "module",
) -> torch.Tensor:
    """Dequantize one module from its checkpoint tensors, named relative to it.

    4-bit: ``weight``, ``weight.absmax``, ``weight.quant_map``, optionally
    ``weight.nested_absmax``/``weight.nested_quant_map``, and
    ``weight.quant_state.bitsandbytes__nf4`` (or fp4); int8: ``weight``,
    ``SCB`` and optionally ``weight_format``. Returns the (out, in) weight in
    ``dtype`` (default: the quant state's dtype for 4-bit, float32 for int8,
    which is what bitsandbytes itself returns).
    """
    import torch
    import bitsandbytes.functional as F
    from bitsandbytes.functional import QuantState

    kind = module_kind(tensors)
    if kind is None:
        raise InvalidArtifactError(f"{module} is not bitsandbytes-quantized (no quant_state or SCB)")
    if "weight" not in tensors:
        raise InvalidArtifactError(f"{module}.weight is missing")
    if kind == "int8":
        CB, SCB = tensors["weight"], tensors["SCB"]
        fmt = tensors.get("weight_format")
        if fmt is not None and int(fmt.reshape(-1)[0]) != 0:
            raise InvalidArtifactError(
                f"{module}: weight_format {int(fmt.reshape(-1)[0])} is a GPU tile layout of old bitsandbytes; "
                "only the row layout (0) can be read"
            )
        if CB.dtype != torch.int8 or CB.dim() != 2 or tuple(SCB.shape) != (CB.shape[0],):
            raise InvalidArtifactError(
                f"{module}: int8 weight {_dtype_name(CB.dtype)} {list(CB.shape)} does not fit SCB {list(SCB.shape)}"
            )
        W = F.int8_vectorwise_dequant(CB.to(device), SCB.to(device=device, dtype=torch.float32))
        return W if dtype is None else W.to(dtype)
    key, qs = _quant_state(tensors)
    try:
        shape = [int(x) for x in qs["shape"]]
        blocksize = int(qs["blocksize"])
        n = math.prod(shape)
        blocks = -(-n // blocksize)
        nested = "weight.nested_absmax" in tensors
        nbytes = tensors["weight"].numel() * tensors["weight"].element_size()
        if nbytes != (n + 1) // 2:
            raise InvalidArtifactError(f"{module}.weight holds {nbytes} bytes, shape {shape} packs into {(n + 1) // 2}")
        if tensors["weight.absmax"].numel() != blocks:
            raise InvalidArtifactError(
                f"{module}.weight.absmax has {tensors['weight.absmax'].numel()} blocks, shape {shape} needs {blocks}"
            )
        if nested != ("nested_offset" in qs):
            raise InvalidArtifactError(f"{module}: nested (double-quant) tensors and {key} disagree")
    except KeyError as e:
        raise InvalidArtifactError(f"{module}: {e.args[0]} is missing from the 4-bit state") from None
    stats = {k: v.to(device) for k, v in tensors.items() if k != "weight" and k.startswith("weight.")}
    try:
        state = QuantState.from_dict(stats, device=torch.device(device))
    except (AssertionError, KeyError, ValueError, AttributeError) as e:
        raise InvalidArtifactError(f"{module}: unreadable 4-bit state ({e})") from None
    # A packed weight stored in another quant_storage dtype holds the same bytes.
    packed = tensors["weight"].to(device).contiguous().view(torch.uint8).reshape(-1, 1)
    # Dequantized as one flat row, then shaped: the blocks run across rows, and
    # bitsandbytes' CPU kernel, given the 2-D shape, reads each row as if it
    # began a block (a 96x96 NF4 weight came back with relative error 0.27, not 0.09).
    state.shape = torch.Size([n])  # ``state`` is this call's own (from_dict above)
    W = F.dequantize_4bit(packed, state).reshape(shape)
    return W if dtype is None else W.to(dtype)
