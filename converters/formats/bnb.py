"""bitsandbytes quantize and dequantize of safetensors checkpoints, one tensor at a time.

The output is the checkpoint that transformers + bitsandbytes write when you
``save_pretrained`` a model loaded with ``BitsAndBytesConfig(...)``: the same
tensor names, dtypes, shapes and values, and the same ``quantization_config``
in ``config.json``. ``tests/test_quantize.py`` checks this tensor by tensor
against transformers 5.23 + bitsandbytes 0.50.2.

Layout per quantized module ``M`` (a Linear layer; ``W`` has shape (out, in)):

4-bit (nf4 / fp4), blocksize 64, ``n = out * in``, ``b = ceil(n / 64)``:

=====================================================  =======  ==========================
``M.weight``                                           uint8    (ceil(n / 2), 1), 2 codes a byte
``M.weight.absmax``                                    float32  (b,); uint8 with double quant
``M.weight.quant_map``                                 float32  (16,), the NF4 / FP4 code
``M.weight.nested_absmax`` (double quant)              float32  (ceil(b / 256),)
``M.weight.nested_quant_map`` (double quant)           float32  (256,), bnb's dynamic map
``M.weight.quant_state.bitsandbytes__nf4`` (or fp4)    uint8    UTF-8 of ``json.dumps`` of
                                                                quant_type, blocksize, dtype
                                                                (of W), shape [out, in], and
                                                                nested_blocksize (256),
                                                                nested_dtype, nested_offset
=====================================================  =======  ==========================

A partial last block is allowed (bitsandbytes handles ``n % 64 != 0``).
``nested_offset`` is the mean of the float32 absmax, written as Python's
``repr`` of that float, so the JSON's length depends on the data. Output specs
must be known before the first byte is written, so :func:`quantize` runs a
cheap pre-pass for double quantization (:func:`nested_offset`) and then writes
the exact bytes transformers writes. A caller that cannot afford the pre-pass
(``merge --quantize nf4 --double-quant``) passes ``nested_offset=None`` to
both :func:`quantized_specs` and :func:`quantize_weight` and gets the number in
a fixed-width form (``%.17e``, 23 characters): it parses to the same float,
so bitsandbytes loads the same state, but the bytes differ from transformers'.

8-bit (LLM.int8, the weights row-wise absmax-quantized from float16):
``M.weight`` int8 (out, in), ``M.SCB`` float32 (out,) and ``M.weight_format``
uint8 scalar 0 ("row").

Which tensors are quantized (transformers replaces every ``nn.Linear`` and
GPT-2 ``Conv1D`` except the modules in ``llm_int8_skip_modules``, or, when that
is None, the output embedding, the last module and tied weights; see
``get_keys_to_not_convert``). Here we only read the checkpoint, so the rule
is on names and the config (:func:`should_quantize`):

- a ``*.weight`` tensor, 2-D, float16/bfloat16/float32 (norms and biases are
  1-D, convolutions 3-D or 4-D);
- not an embedding: its module's last name starts with ``embed`` or ends with
  ``embedding(s)``, or is ``wte``, ``wpe``, ``shared``, ``emb`` or
  ``relative_attention_bias`` (this also covers GPT-NeoX's ``embed_out`` head);
- not an output head, unless ``skip_modules`` is given (transformers then skips
  only those): a top-level module (``lm_head``, ``score``, ``classifier``,
  ``qa_outputs``: every ``*For*`` class keeps its head at the top) or any
  module named ``lm_head``;
- not in ``skip_modules`` nor the class's ``_keep_in_fp32_modules``, matched
  as transformers' ``should_convert_module`` matches them;
- not a subclass of ``nn.Linear``, which transformers leaves alone: Falcon's
  ``FalconLinear`` (so a Falcon model has nothing to quantize and is refused)
  and Llama 4's router;
- GPT-2-style ``Conv1D`` weights (``c_attn``, ``c_proj``, ``c_fc``, ``q_attn``
  of gpt2, openai-gpt, imagegpt, decision_transformer, clvp) are stored
  (in, out): they are transposed before quantizing, as transformers does, and
  transposed back by :func:`dequantize`.

Architectures whose checkpoint transformers rewrites on load (fused MoE
experts such as Mixtral's, see ``transformers.conversion_mapping``) are
refused: their module names are not the checkpoint's names.

>>> from converters.safetensors_io import file_map               # doctest: +SKIP
>>> report = quantize(file_map("llama"), Path("llama-nf4"), to="nf4")
>>> dequantize(file_map("llama-nf4"), Path("llama-bf16"), dtype="bfloat16")

For ``merge --quantize nf4`` (quantize each merged tensor on the fly, no
16-bit copy on disk), :class:`Quantizer` bound to the base's config gives, per
output tensor, whether it is quantized (``wants``), the specs that replace it
(``specs``) and the tensors themselves (``quantize``); its settings give the
``quantization_config`` for ``config.json``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import ConflictError, InvalidArtifactError, UsageError

from adapterhub.converters.formats.safetensors_io import (
    DEFAULT_SHARD_BYTES,
    INDEX_NAME,
    FileMap,
    StreamingShardWriter,
    TensorSource,
    TensorSpec,
    Workspace,
    copy_file,
    staged_dir,
    write_text,
)

if TYPE_CHECKING:
    import torch

MODES: tuple[str, ...] = ("nf4", "fp4", "int8")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
DEFAULT_BLOCKSIZE = 64  # transformers' Params4bit default
NESTED_BLOCKSIZE = 256  # fixed in bitsandbytes' quantize_4bit(compress_statistics=True)
QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__"
FLOAT_DTYPES = ("float16", "bfloat16", "float32")

# Names of modules that are embeddings, not Linear layers (see the module doc).
_EMBEDDING_LEAVES = frozenset({"wte", "wpe", "shared", "emb", "relative_attention_bias"})
# transformers' models built on GPT-2's Conv1D (grep "= Conv1D(" in transformers/models).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
_CONV1D_LEAVES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
# Layers that subclass nn.Linear, which transformers leaves unquantized (it
# replaces ``type(module) is nn.Linear`` only): leaf names per model type, "*" for all.
_LINEAR_SUBCLASSES: dict[str, frozenset[str] | str] = {
    "falcon": "*",  # FalconLinear: transformers 5.23 quantizes no layer of Falcon
    "llama4": frozenset({"router"}),
    "llama4_text": frozenset({"router"}),
}
# Weight formats other than safetensors that must not travel into a converted output.
_OTHER_WEIGHT_SUFFIXES = (
    ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data", ".ot", ".pb",
    ".tflite", ".npz", ".safetensors",
)

ProgressFactory = Callable[[str, int], Any]


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class QuantSettings:
    """What to quantize to. ``skip_modules`` is ``llm_int8_skip_modules``."""

    mode: str = "nf4"
    double_quant: bool = False
    compute_dtype: str = "bfloat16"
    blocksize: int = DEFAULT_BLOCKSIZE
    skip_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown quantization {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.mode == "int8" and self.double_quant:
            raise UsageError("double quantization applies to 4-bit (nf4/fp4) only, not int8")
        if self.compute_dtype not in FLOAT_DTYPES:
            raise UsageError(
                f"unknown compute dtype {self.compute_dtype!r}: choose one of {', '.join(FLOAT_DTYPES)}"
            )
        if self.blocksize not in BLOCKSIZES:
            raise UsageError(f"block size {self.blocksize} is not one bitsandbytes supports {BLOCKSIZES}")
        if self.blocksize != DEFAULT_BLOCKSIZE:
            # transformers builds Params4bit with its default block size and
            # has no option for another one, so it could not load the output.
            raise UsageError(f"only block size {DEFAULT_BLOCKSIZE} loads in transformers")

    @property
    def four_bit(self) -> bool:
        return self.mode != "int8"

    def quantization_config(self) -> dict[str, Any]:
        return quantization_config_for(
            self.mode, double_quant=self.double_quant, compute_dtype=self.compute_dtype, skip_modules=self.skip_modules
        )


def quantization_config_for(
    mode: str,
    *,
    double_quant: bool = False,
    compute_dtype: str = "bfloat16",
    skip_modules: Sequence[str] | None = None,
) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``, as ``BitsAndBytesConfig.to_dict()`` writes it.

    For int8 the 4-bit fields keep transformers' defaults (fp4, float32).
    """
    four = mode in ("nf4", "fp4")
    return {
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": compute_dtype if four else "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": mode if four else "fp4",
        "bnb_4bit_use_double_quant": bool(double_quant) if four else False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": list(skip_modules) if skip_modules is not None else None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "quant_method": "bitsandbytes",
    }


# --------------------------------------------------------------------------- which tensors


def _matches(module: str, patterns: Iterable[str]) -> bool:
    """transformers' ``should_convert_module``, negated: does a pattern name ``module``?"""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for key in patterns:
        try:
            if re.match(rf"(?:{key}){boundary}", module):
                return True
        except re.error:
            pass
        if module.endswith(key):
            return True
    return False


def is_embedding(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return (
        leaf in _EMBEDDING_LEAVES
        or leaf.startswith("embed")
        or leaf.endswith("embedding")
        or leaf.endswith("embeddings")
    )


def is_head(module: str) -> bool:
    return "." not in module or module.rsplit(".", 1)[-1] == "lm_head"


def is_conv1d(module: str, config: Mapping[str, Any] | None) -> bool:
    """Is ``module`` a GPT-2-style Conv1D, whose weight is stored (in, out)?"""
    model_type = (config or {}).get("model_type")
    return model_type in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in _CONV1D_LEAVES


def should_quantize(
    spec: TensorSpec,
    config: Mapping[str, Any] | None = None,
    *,
    skip_modules: Sequence[str] | None = None,
    keep_in_fp32: Sequence[str] = (),
) -> bool:
    """Would transformers quantize this checkpoint tensor? (The rule is in the module doc.)"""
    if not spec.name.endswith(".weight") or len(spec.shape) != 2:
        return False
    if str(spec.dtype).removeprefix("torch.") not in FLOAT_DTYPES:
        return False
    module = spec.name[: -len(".weight")]
    if is_embedding(module):
        return False
    sub = _LINEAR_SUBCLASSES.get(str((config or {}).get("model_type")))
    if sub == "*" or (sub and module.rsplit(".", 1)[-1] in sub):
        return False
    if skip_modules is None:
        if is_head(module):
            return False
    elif _matches(module, skip_modules):
        return False
    return not _matches(module, keep_in_fp32)


def _transformers_hints(config: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """(the model class's ``_keep_in_fp32_modules``, a reason to refuse or None).

    Reads class attributes only; no model is built. Without transformers
    installed there is nothing to read, and the name rule stands alone.
    """
    try:
        import transformers
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return [], None
    model_type = config.get("model_type")
    refuse = None
    if model_type:
        try:
            if get_checkpoint_conversion_mapping(model_type):
                refuse = (
                    f"transformers rewrites {model_type} checkpoints on load (for example fused MoE experts), "
                    "so their tensor names are not its module names; quantizing them is not supported"
                )
        except Exception:  # noqa: BLE001 - a hint only
            pass
    keep: list[str] = []
    for arch in config.get("architectures") or []:
        cls = getattr(transformers, str(arch), None) if isinstance(arch, str) and arch.isidentifier() else None
        keep += list(getattr(cls, "_keep_in_fp32_modules", None) or [])
    return keep, refuse


# --------------------------------------------------------------------------- per-tensor layout


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


def quant_state_json(
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype | str,
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = False,
    nested_offset: float | None = None,
) -> bytes:
    """The bytes of ``M.weight.quant_state.bitsandbytes__<quant_type>``.

    Byte-identical to bitsandbytes' ``pack_dict_to_tensor(QuantState.as_dict())``.
    With double quantization and ``nested_offset=None`` (offset not known yet)
    the number is a 23-character placeholder: :func:`quantize_weight` writes
    the real offset there in the same width (see the module doc).
    """
    d: dict[str, Any] = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "dtype": dtype if isinstance(dtype, str) else _dtype_name(dtype),
        "shape": list(shape),
    }
    if not double_quant:
        return json.dumps(d).encode()
    d["nested_blocksize"] = NESTED_BLOCKSIZE
    d["nested_dtype"] = "float32"
    if nested_offset is not None:
        d["nested_offset"] = nested_offset
        return json.dumps(d).encode()
    return (json.dumps(d)[:-1] + ', "nested_offset": ' + "0" * 23 + "}").encode()


def _fixed_offset(value: float) -> str:
    # The mean of absmax values is >= 0 and finite, and a float32's decimal
    # exponent has two digits, so this is always 23 characters; 18 significant
    # digits round-trip any double.
    s = format(value, ".17e")
    if len(s) != 23:
        raise InvalidArtifactError(f"double-quant offset {value!r} cannot be written fixed-width")
    return s


def quantized_specs(
    module: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    mode: str,
    *,
    double_quant: bool = False,
    blocksize: int = DEFAULT_BLOCKSIZE,
    nested_offset: float | None = None,
) -> list[TensorSpec]:
    """The specs :func:`quantize_weight` will return for ``module``'s (out, in) weight, in its order.

    Computed from shape and dtype alone (and the double-quant offset, see the module doc).
    """
    import torch

    out, inp = (int(x) for x in shape)
    n = out * inp
    if mode == "int8":
        return [
            TensorSpec(f"{module}.weight", (out, inp), torch.int8),
            TensorSpec(f"{module}.SCB", (out,), torch.float32),
            TensorSpec(f"{module}.weight_format", (), torch.uint8),
        ]
    blocks = -(-n // blocksize)
    qs = quant_state_json(
        mode, (out, inp), dtype, blocksize=blocksize, double_quant=double_quant, nested_offset=nested_offset
    )
    specs = [
        TensorSpec(f"{module}.weight", ((n + 1) // 2, 1), torch.uint8),
        TensorSpec(f"{module}.weight.absmax", (blocks,), torch.uint8 if double_quant else torch.float32),
        TensorSpec(f"{module}.weight.quant_map", (16,), torch.float32),
    ]
    if double_quant:
        specs += [
            TensorSpec(f"{module}.weight.nested_absmax", (-(-blocks // NESTED_BLOCKSIZE),), torch.float32),
            TensorSpec(f"{module}.weight.nested_quant_map", (256,), torch.float32),
        ]
    specs.append(TensorSpec(f"{module}.{QUANT_STATE_KEY}{mode}", (len(qs),), torch.uint8))
    return specs


def _check_finite(module: str, W: torch.Tensor) -> None:
    import torch

    if not bool(torch.isfinite(W).all()):
        raise InvalidArtifactError(f"{module}.weight has non-finite values (NaN or inf); refusing to quantize it")


def nested_offset(W: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE) -> float:
    """The double-quant offset bitsandbytes will store for ``W``: mean of the blockwise absmax.

    Equal to ``quantize_4bit(W, compress_statistics=True)[1].offset`` computed on
    the same device (absmax is exact; the mean is torch's, over the same values).
    """
    import torch

    flat = W.reshape(-1)
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])  # |0| never raises a block's max
    absmax = flat.reshape(-1, blocksize).abs().amax(dim=1).float()
    return float(absmax.mean().item())


#: Elements per call of bitsandbytes' quantize_4bit on the CPU (see _quantize_4bit).
CPU_CHUNK = 1 << 20


def _quantize_4bit(W: torch.Tensor, blocksize: int, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' ``quantize_4bit(W)`` as (packed, absmax, code); on the CPU, a chunk of blocks at a time.

    The CPU kernel is a chain of whole-tensor torch ops (a float32 copy, the
    scaled values, bucket indices, the packing), each a pass through memory.
    Every quantization block and every packed pair lies inside one chunk,
    so the result has the same bytes as one call on the whole weight; on the
    2-core VM, chunks of 2^20 elements took 0.36 s per 2048x5632 bf16 weight
    where one call took 0.8 s.
    """
    import torch
    import bitsandbytes.functional as F

    n = W.numel()
    step = CPU_CHUNK - CPU_CHUNK % (2 * blocksize)
    if W.device.type != "cpu" or n <= step or step <= 0:
        packed, state = F.quantize_4bit(W, blocksize=blocksize, compress_statistics=False, quant_type=mode)
        return packed, state.absmax, state.code
    flat = W.reshape(-1)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    code = None
    for i in range(0, n, step):
        p, state = F.quantize_4bit(flat[i : i + step], blocksize=blocksize, compress_statistics=False, quant_type=mode)
        packed[i // 2 : i // 2 + p.shape[0]] = p.view(-1, 1)
        absmax[i // blocksize : i // blocksize + state.absmax.numel()] = state.absmax
        code = state.code if code is None else code
    assert code is not None
    return packed, absmax, code


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
    import bitsandbytes.functional as F

    if W.dim() != 2:
        raise InvalidArtifactError(f"{module}.weight is {W.dim()}-D; only 2-D Linear weights are quantized")
    if _dtype_name(W.dtype) not in FLOAT_DTYPES:
        raise InvalidArtifactError(f"{module}.weight is {_dtype_name(W.dtype)}; only float16/bfloat16/float32 quantize")
    _check_finite(module, W)
    W = W.contiguous()
    if mode == "int8":
        # Int8Params._quantize: row-wise absmax of the float16 weight.
        W16 = W.to(torch.float16)
        if not bool(torch.isfinite(W16).all()):
            raise InvalidArtifactError(f"{module}.weight overflows float16, which int8 quantization goes through")
        CB, SCB, _ = F.int8_vectorwise_quant(W16)
        return {
            f"{module}.weight": CB,
            f"{module}.SCB": SCB,
            f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8, device=W.device),  # "row"
        }
    if mode not in ("nf4", "fp4"):
        raise InvalidArtifactError(f"unknown quantization {mode!r}")
    packed, absmax, code = _quantize_4bit(W, blocksize, mode)
    out: dict[str, torch.Tensor] = {
        f"{module}.weight": packed,
        f"{module}.weight.absmax": absmax,
        f"{module}.weight.quant_map": code,
    }
    if not double_quant:
        qs = quant_state_json(mode, W.shape, W.dtype, blocksize=blocksize)
    else:
        # bitsandbytes' quantize_4bit(compress_statistics=True), with the offset
        # taken from the plan so that the JSON matches the planned length.
        if nested_offset is None:
            offset = absmax.mean()
            number = _fixed_offset(float(offset.item()))
        else:
            offset = torch.tensor(nested_offset, dtype=torch.float32, device=W.device)
            number = None
        qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        out[f"{module}.weight.absmax"] = qabsmax
        out[f"{module}.weight.nested_absmax"] = state2.absmax
        out[f"{module}.weight.nested_quant_map"] = state2.code.clone()
        if number is None:
            qs = quant_state_json(
                mode, W.shape, W.dtype, blocksize=blocksize, double_quant=True, nested_offset=nested_offset
            )
        else:
            qs = quant_state_json(mode, W.shape, W.dtype, blocksize=blocksize, double_quant=True)
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
        keep, refuse = _transformers_hints(config)
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
        _check_finite(module, W)  # quantize() leaves this to quantize_weight, which checks every weight
        return nested_offset(W, self.settings.blocksize)

    def quantize(self, name: str, tensor: torch.Tensor, nested_offset: float | None = None) -> dict[str, torch.Tensor]:
        """Quantize a wanted checkpoint tensor on its device into the tensors :meth:`specs` announced."""
        module, W = self._linear(name, tensor)
        s = self.settings
        return quantize_weight(
            module, W, s.mode, double_quant=s.double_quant, blocksize=s.blocksize, nested_offset=nested_offset
        )


# --------------------------------------------------------------------------- dequantize, per module


def _quant_state(tensors: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    keys = [k for k in tensors if k.startswith(QUANT_STATE_KEY)]
    if len(keys) != 1:
        raise InvalidArtifactError(f"expected one {QUANT_STATE_KEY}* tensor, found {len(keys)}")
    raw = tensors[keys[0]]
    try:
        qs = json.loads(bytes(raw.detach().to("cpu").reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError):
        raise InvalidArtifactError(f"{keys[0]} is not the JSON bitsandbytes writes") from None
    if not isinstance(qs, dict):
        raise InvalidArtifactError(f"{keys[0]} is not a JSON object")
    return keys[0], qs


def module_kind(tensors: Mapping[str, Any]) -> str | None:
    """'4bit', 'int8' or None, from a module's tensor names (relative: ``weight``, ``SCB``, …)."""
    if any(k.startswith(QUANT_STATE_KEY) for k in tensors):
        return "4bit"
    if "SCB" in tensors:
        return "int8"
    return None


def dequantized_shape(tensors: Mapping[str, Any]) -> tuple[int, ...]:
    """The (out, in) shape a module dequantizes to, from specs or tensors (no dequantizing)."""
    kind = module_kind(tensors)
    if kind == "int8":
        return tuple(tensors["weight"].shape)
    if kind == "4bit":
        _, qs = _quant_state(tensors)  # type: ignore[arg-type]
        return tuple(int(x) for x in qs["shape"])
    raise InvalidArtifactError("not a bitsandbytes-quantized module")


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
    W = F.dequantize_4bit(packed, state)
    return W if dtype is None else W.to(dtype)


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
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArtifactError("--device cuda was asked for but CUDA is not available")
    return device


def _read_config(files: FileMap) -> dict[str, Any]:
    if "config.json" not in files:
        raise InvalidArtifactError("no config.json: a model checkpoint with its config is needed")
    try:
        cfg = json.loads(Path(files["config.json"]).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArtifactError(f"config.json: malformed JSON ({e})") from None
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


def _check_out_not_input(files: FileMap, out: Path) -> None:
    o = out.resolve()
    for p in files.values():
        rp = Path(p).resolve()
        if rp == o or o in rp.parents:
            raise ConflictError(f"{out} holds the input; write the output somewhere else")


def _dump_config(cfg: Mapping[str, Any]) -> str:
    # PretrainedConfig.to_json_string: indent 2, sorted keys, trailing newline.
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def _card(relation_note: str, meta: Mapping[str, Any], base_model: str | None) -> str:
    lines = ["---"]
    if base_model:
        lines.append(f"base_model: {json.dumps(base_model)}")
    for k, v in meta.items():
        if isinstance(v, list):
            lines.append(f"{k}:")
            lines += [f"- {json.dumps(x) if not str(x).isidentifier() else x}" for x in v]
        else:
            lines.append(f"{k}: {v}")
    lines += ["---", "", relation_note, ""]
    return "\n".join(lines)


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
    if cfg.get("quantization_config"):
        qc = cfg["quantization_config"]
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        raise InvalidArtifactError(
            f"this model is already quantized ({method}); quantize needs a 16/32-bit checkpoint",
            hint="dequantize it first (adapterhub dequantize), or use the original model",
        )
    qz = Quantizer(qs, cfg)
    src = _source(model)
    keys = src.keys()
    for k in keys:
        if k.endswith((".SCB", ".weight_format", ".weight.absmax")) or f".{QUANT_STATE_KEY}" in k:
            raise InvalidArtifactError(
                f"this model is already quantized (tensor {k}); quantize needs a 16/32-bit checkpoint",
                hint="dequantize it first (adapterhub dequantize)",
            )
    _check_out_not_input(model, out)
    dev = _resolve_device(device)
    report = QuantizeReport(to, double_quant, compute_dtype, DEFAULT_BLOCKSIZE, dev)

    # Plan every output spec up front (the writer needs them before the first byte).
    wanted = {k for k in keys if qz.wants(src.spec(k))}
    if not wanted:
        raise InvalidArtifactError(
            f"no Linear weights that transformers would quantize were found (model_type {cfg.get('model_type')})"
        )
    report.kept_16bit = [
        k.removesuffix(".weight") for k in keys
        if k not in wanted and k.endswith(".weight") and len(src.spec(k).shape) == 2
    ]
    report.bytes_in = sum(src.spec(k).nbytes for k in keys)

    offsets: dict[str, float] = {}
    if qs.double_quant:
        # The quant state's JSON holds the offset, so its length depends on the
        # data and must be known before the shard headers are written.
        bar = _bar(progress, "scanning for double quantization", sum(src.spec(k).nbytes for k in wanted))
        for k in keys:
            if k in wanted:
                offsets[k] = qz.offset(k, src.get(k).to(dev))
                if bar is not None:
                    bar.update(src.spec(k).nbytes)
        if bar is not None:
            bar.close()

    specs: list[TensorSpec] = []
    for k in keys:
        specs += qz.specs(src.spec(k), offsets.get(k)) if k in wanted else [src.spec(k)]

    by_name = {sp.name: sp for sp in specs}

    def body(writer: StreamingShardWriter, advance: Callable[[int], None]) -> None:
        ws = Workspace("cpu")  # one input buffer, reused: no memory map per tensor
        for k in keys:
            if k in wanted:
                t = src.read_into(k, ws)
                for name, v in qz.quantize(k, t.to(dev), offsets.get(k)).items():
                    writer.write(name, v)
                report.modules_quantized.append(k.removesuffix(".weight"))
                del t
            else:
                writer.copy_span(k, by_name[k], src.span(k))  # unchanged: file to file
            advance(src.spec(k).nbytes)

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
        label = {"nf4": "4-bit NF4", "fp4": "4-bit FP4", "int8": "8-bit LLM.int8"}[to]
        note = (
            f"bitsandbytes {label} quantization"
            + (" with double quantization" if double_quant else "")
            + f" (block size {DEFAULT_BLOCKSIZE}, compute dtype {compute_dtype}) written by adapterhub. "
            f"{len(report.modules_quantized)} Linear layers are quantized; "
            + (", ".join(sorted(set(report.kept_16bit))[:8]) or "no other 2-D weights")
            + " stay in their original precision. Load it with "
            "`AutoModelForCausalLM.from_pretrained(path)` with bitsandbytes installed."
        )
        tags = ["bitsandbytes", "4-bit" if to != "int8" else "8-bit", to]
        write_text(
            tmp / "README.md",
            _card(note, {"base_model_relation": "quantized", "library_name": "transformers", "tags": tags}, base_model),
        )
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
    src = _source(model)
    keys = src.keys()
    modules, owner = _group_quantized(keys)
    if not modules:
        raise InvalidArtifactError("config.json says bitsandbytes but no quantized tensors were found")
    _check_out_not_input(model, out)
    dev = _resolve_device(device)
    target = None if dtype == "auto" else _torch_dtype(dtype)
    conv_model = cfg.get("model_type") in CONV1D_MODEL_TYPES

    # Plan the output from the headers and the small quant-state tensors only.
    specs: list[TensorSpec] = []
    plan: list[tuple[str, str | None]] = []  # (output name, module it comes from or None)
    modes: set[str] = set()
    for k in keys:
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
