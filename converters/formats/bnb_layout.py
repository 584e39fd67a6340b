"""The bitsandbytes checkpoint layout: settings, which tensors are quantized, per-tensor specs and state.

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

The quantizers themselves are in ``bnb_quant``; the conversions of whole
checkpoints (``quantize``, ``dequantize``) in ``adapterhub.converters.quantize``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError, UsageError

from adapterhub.converters.formats.safetensors_io import TensorSpec

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
    """transformers' ``should_convert_module``, negated: does a pattern name ``module``?

    The patterns come from a checkpoint's ``llm_int8_skip_modules`` (untrusted)
    and the module names from its tensors, so the regex test runs on the
    bounded matcher (a key such as ``(a+)+b`` would hang ``re``). A key that is
    not a regular expression is tested as a suffix only.
    """
    from adapterhub.inspect.patterns import PatternTimeout, boundary_match

    for key in patterns:
        key = str(key)
        if module.endswith(key):
            return True
        try:
            if boundary_match(key, module, "llm_int8_skip_modules"):
                return True
        except PatternTimeout:
            raise
        except InvalidArtifactError:
            pass  # not a regular expression (transformers would raise re.error)
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


def transformers_hints(config: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """:func:`_transformers_hints`, remembered per transformers version, model type and architectures.

    Reading those class attributes imports transformers and the model's code:
    about 3 s of CPU, more than the rest of quantizing a 1B model now takes.
    The answer depends only on the installed transformers, so it is kept in
    ``$XDG_CACHE_HOME/adapterhub/bnb-hints.json`` (``~/.cache`` by default);
    a cache that cannot be read or written is skipped.
    """
    try:
        from importlib.metadata import PackageNotFoundError, version

        tf_version = version("transformers")
    except PackageNotFoundError:
        return [], None
    archs = config.get("architectures") or []
    key = json.dumps([tf_version, str(config.get("model_type")), [str(a) for a in archs]])
    path = _cache_dir() / "bnb-hints.json"
    try:
        cached = json.loads(path.read_text())
        hit = cached.get(key) if isinstance(cached, dict) else None
        if isinstance(hit, list) and len(hit) == 2 and isinstance(hit[0], list):
            return [str(m) for m in hit[0]], (str(hit[1]) if hit[1] is not None else None)
    except (OSError, ValueError):
        cached = {}
    keep, refuse = _transformers_hints(config)
    try:
        from adapterhub.fsutil import write_atomic

        data = cached if isinstance(cached, dict) and len(cached) < 1000 else {}
        data[key] = [keep, refuse]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data=json.dumps(data, sort_keys=True).encode())
    except Exception:  # noqa: BLE001 - a cache only
        pass
    return keep, refuse


def _cache_dir() -> Path:
    import os

    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "adapterhub"


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


def quantized_layout(
    module: str,
    shape: Sequence[int],
    dtype: torch.dtype | str,
    mode: str,
    *,
    double_quant: bool = False,
    blocksize: int = DEFAULT_BLOCKSIZE,
    nested_offset: float | None = None,
) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype name) of each tensor :func:`quantized_specs` announces, in order, without torch."""
    out, inp = (int(x) for x in shape)
    n = out * inp
    if mode == "int8":
        return [(f"{module}.weight", (out, inp), "int8"), (f"{module}.SCB", (out,), "float32"),
                (f"{module}.weight_format", (), "uint8")]
    blocks = -(-n // blocksize)
    qs = quant_state_json(
        mode, (out, inp), dtype, blocksize=blocksize, double_quant=double_quant, nested_offset=nested_offset
    )
    layout = [
        (f"{module}.weight", ((n + 1) // 2, 1), "uint8"),
        (f"{module}.weight.absmax", (blocks,), "uint8" if double_quant else "float32"),
        (f"{module}.weight.quant_map", (16,), "float32"),
    ]
    if double_quant:
        layout += [
            (f"{module}.weight.nested_absmax", (-(-blocks // NESTED_BLOCKSIZE),), "float32"),
            (f"{module}.weight.nested_quant_map", (256,), "float32"),
        ]
    layout.append((f"{module}.{QUANT_STATE_KEY}{mode}", (len(qs),), "uint8"))
    return layout


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
    layout = quantized_layout(
        module, shape, dtype, mode, double_quant=double_quant, blocksize=blocksize, nested_offset=nested_offset
    )
    return [TensorSpec(name, dims, _torch_dtype(dt)) for name, dims, dt in layout]



# --------------------------------------------------------------------------- dequantize, per module


def _quant_state(tensors: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    keys = [k for k in tensors if k.startswith(QUANT_STATE_KEY)]
    if len(keys) != 1:
        raise InvalidArtifactError(f"expected one {QUANT_STATE_KEY}* tensor, found {len(keys)}")
    raw = tensors[keys[0]]
    from adapterhub import jsonio

    try:  # size- and depth-capped: the checkpoint is untrusted
        qs = jsonio.loads(bytes(raw.detach().to("cpu").reshape(-1).tolist()), what=keys[0], max_depth=8)
    except (InvalidArtifactError, TypeError, ValueError):
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
