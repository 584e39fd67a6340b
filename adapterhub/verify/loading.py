"""Loading the models verification compares, whole: the reference (base +
adapter by PEFT, unmerged), the candidate (through its :mod:`candidates`
loader) and, for quantized candidates, the same-recipe reference (base +
adapter merged by PEFT, quantized by transformers with the candidate's recipe).

Everything here reads files and imports torch, transformers and PEFT inside
the functions, so importing the module is cheap.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError, UsageError
from adapterhub.jsonio import loads

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
FMT_DTYPES = {v: k for k, v in DTYPES.items()}
BNB_FORMATS = ("int8", "nf4", "fp4")

# Wrappers PEFT puts around a module whose full weight it saves.
_SAVED_WRAPPERS = (".base_layer", ".modules_to_save.default", ".original_module")
# Last names of token-embedding and output-head modules (for checkpoints without safetensors headers).
_EMBEDDING_LEAVES = frozenset({"embed_tokens", "lm_head", "word_embeddings", "wte", "embed_in", "embed_out", "shared"})


def _headers(d: Path) -> dict[str, Any]:
    """name -> TensorInfo over every safetensors file of ``d``."""
    from adapterhub.inspect.safetensors import read_header

    out: dict[str, Any] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(read_header(f).tensors)
    return out


def adapter_vocab(adapter_dir: Path, base_dir: Path, base_cfg: Mapping[str, Any]) -> tuple[int, int] | None:
    """(base vocabulary, adapter's) when the adapter saved token embeddings of
    another vocabulary (trained after ``resize_token_embeddings``), else None.

    Read from safetensors headers: full ``embed_tokens`` / ``lm_head``
    weights (``modules_to_save`` or ``save_embedding_layers``), whose width is
    the base's embedding width and whose row count is not its vocabulary.
    """
    rows = int(base_cfg.get("vocab_size") or 0)
    base = {k: v.shape for k, v in _headers(base_dir).items()}
    emb = {k.removesuffix(".weight"): s for k, s in base.items() if len(s) == 2 and s[0] == rows}
    width = next(iter(emb.values()))[1] if emb else int(base_cfg.get("hidden_size") or 0)
    names = set(emb) | {"lm_head"}
    sizes = []
    for key, info in _headers(adapter_dir).items():
        shape = info.shape
        if len(shape) != 2 or shape[1] != width or shape[0] == rows or "lora_" in key:
            continue
        path = key.removeprefix("base_model.model.").removesuffix(".weight")
        for w in _SAVED_WRAPPERS:
            path = path.replace(w, "")
        if path in names or (not emb and path.rsplit(".", 1)[-1] in _EMBEDDING_LEAVES):
            sizes.append(shape[0])
    return (rows, max(sizes)) if sizes else None


def load_reference(base_dir: Path, adapter_dir: Path, causal: bool, device: str, dtype: str | None, vocab: int | None) -> Any:
    """Base + adapter by PEFT, unmerged; the base's embeddings resized to ``vocab`` first when it differs."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(str(base_dir), dtype=dtype or "auto", device_map={"": device})
    if vocab is not None and int(model.get_input_embeddings().weight.shape[0]) != vocab:
        # New tokens: PEFT users resize the base before loading such an adapter.
        # The new rows are overwritten by the adapter's saved embeddings, so
        # they need no careful initialisation (mean_resizing costs a covariance).
        model.resize_token_embeddings(vocab, mean_resizing=False)
    try:
        pm = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidArtifactError(
            f"the adapter does not fit the base model: {first[:300]}",
            hint="pass the --base the adapter was trained on",
        ) from None
    return pm.eval()


def quant_recipe(cand_cfg: Mapping[str, Any], cand_dir: Path, fmt: str, fallback_dtype: str) -> dict[str, Any]:
    """How the candidate was quantized: its ``quantization_config`` plus, for
    4-bit, the block size and source dtype of a module's quant_state."""
    from adapterhub.inspect.safetensors import read_header

    qc = cand_cfg.get("quantization_config") or {}
    dtype = cand_cfg.get("dtype") or cand_cfg.get("torch_dtype")
    recipe: dict[str, Any] = {
        "quant_type": fmt,
        "blocksize": None,
        "double_quant": bool(qc.get("bnb_4bit_use_double_quant")) if fmt != "int8" else False,
        "compute_dtype": qc.get("bnb_4bit_compute_dtype") if fmt != "int8" else None,
        "skip_modules": qc.get("llm_int8_skip_modules"),
        "dtype": dtype if dtype in DTYPES else fallback_dtype,
    }
    if fmt == "int8":
        return recipe
    for f in sorted(cand_dir.glob("*.safetensors")):
        header = read_header(f)
        key = next((k for k in header.tensors if ".weight.quant_state.bitsandbytes__" in k), None)
        if key is not None:
            state = loads(header.read_bytes(key), what=key)
            recipe["blocksize"] = int(state.get("blocksize", 64))
            if state.get("dtype") in DTYPES:
                recipe["dtype"] = state["dtype"]
            break
    return recipe


# A module path: no repetition, alternation or group, so transformers' regular
# expression of it backtracks at most len(name) * len(module) steps.
_MODULE_PATH = re.compile(r"[A-Za-z0-9_.\-]+")


def module_names(model_dir: Path) -> list[str]:
    """The modules holding a ``weight`` in ``model_dir``'s safetensors files, also
    without their first part (``model.``), as a headless ``AutoModel`` names them,
    and ``lm_head`` (not saved when tied to the embeddings)."""
    from adapterhub.inspect.safetensors import read_header

    names: set[str] = {"lm_head"}
    for f in sorted(model_dir.glob("*.safetensors")):
        for key in read_header(f).tensors:
            if key.endswith(".weight"):
                module = key[: -len(".weight")]
                names.add(module)
                names.add(module.partition(".")[2] or module)
    return sorted(n for n in names if n)


def skip_modules(names: Any, modules: Iterable[str]) -> list[str] | None:
    """The checkpoint's ``llm_int8_skip_modules`` as transformers can read them safely.

    transformers runs every entry as a regular expression
    (``quantizers_utils.should_convert_module``), and the entries come from the
    checkpoint. A module path passes as it is. Any other entry is matched here
    in bounded time (``inspect.patterns.boundary_match`` and transformers' suffix
    test) against ``modules``, and replaced by the module names it selects, escaped
    and anchored at the end (``q_proj\\Z``: a bare ``q_proj`` would also skip every
    module ending in it): transformers skips the same modules, and no entry of the
    file is run as a pattern.
    An invalid or too long pattern is an ``InvalidArtifactError``.
    """
    from adapterhub.inspect.patterns import boundary_match

    if names is None:
        return None
    names = [names] if isinstance(names, str) else [str(n) for n in names]
    modules = list(modules)
    safe: list[str] = []
    for name in names:
        if _MODULE_PATH.fullmatch(name):
            picked = [name]
        else:
            # anchored: transformers also skips every module whose name ends with an entry
            picked = [re.escape(m) + r"\Z" for m in modules if m and (m.endswith(name) or boundary_match(name, m))]
        safe.extend(p for p in picked if p not in safe)
    return safe


def cpu_4bit_problem(cand_dir: Path) -> str | None:
    """Why a model with this checkpoint's 4-bit layers cannot run whole on the CPU, or None.

    bitsandbytes' CPU kernels get a layer whose input width is not a multiple
    of the block size (64) wrong (``bnb_quant.dequantize_weight``); on CPUs
    with AVX512-BF16, its forward pass repacks each weight first and ends in a
    raw error for such a layer, or one whose output width is not a multiple of
    32. The first such layer is named.
    """
    from adapterhub.inspect.safetensors import read_header

    for f in sorted(cand_dir.glob("*.safetensors")):
        header = read_header(f)
        for key in sorted(k for k in header.tensors if ".weight.quant_state.bitsandbytes__" in k):
            state = loads(header.read_bytes(key), what=key)
            shape, blocksize = state.get("shape") or [], int(state.get("blocksize") or 64)
            if len(shape) != 2:
                continue
            module, (n_out, n_in) = key.partition(".weight.quant_state.")[0], (int(shape[0]), int(shape[1]))
            if n_in % blocksize:
                return f"{module} takes inputs of width {n_in}, not a multiple of the 4-bit block size {blocksize}"
            if n_out % 32:
                return f"{module} gives outputs of width {n_out}, not a multiple of 32"
    return None


def bnb_config(cand_cfg: Mapping[str, Any], modules: Iterable[str] = ()) -> Any:
    """A ``BitsAndBytesConfig`` with the candidate's settings (block size 64, as
    transformers always quantizes) for a model with ``modules`` (see ``skip_modules``)."""
    from transformers import BitsAndBytesConfig

    qc = cand_cfg["quantization_config"]
    four = not qc.get("load_in_8bit")
    return BitsAndBytesConfig(
        load_in_4bit=four,
        load_in_8bit=not four,
        bnb_4bit_quant_type=qc.get("bnb_4bit_quant_type") or "fp4",
        bnb_4bit_use_double_quant=bool(qc.get("bnb_4bit_use_double_quant")),
        bnb_4bit_compute_dtype=qc.get("bnb_4bit_compute_dtype"),
        bnb_4bit_quant_storage=qc.get("bnb_4bit_quant_storage"),
        llm_int8_skip_modules=skip_modules(qc.get("llm_int8_skip_modules"), modules),
        llm_int8_threshold=float(qc.get("llm_int8_threshold", 6.0)),
        llm_int8_has_fp16_weight=bool(qc.get("llm_int8_has_fp16_weight")),
    )


def save_merged(pm: Any, out: Path) -> Path:
    """Merge the PEFT reference in place (``merge_and_unload``) and save it."""
    merged = pm.merge_and_unload()
    merged.save_pretrained(str(out))
    return out


def load_same_recipe(merged_dir: Path, cand_cfg: Mapping[str, Any], causal: bool, device: str, dtype: str | None) -> Any:
    """The PEFT merge, quantized on load by transformers with the candidate's recipe."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal else AutoModel
    config = bnb_config(cand_cfg, module_names(merged_dir))
    model = cls.from_pretrained(str(merged_dir), quantization_config=config, dtype=dtype or "auto", device_map={"": device})
    return model.eval()


def load_transformers_candidate(cand_dir: Path, causal: bool, device: str, dtype: str | None, quantized: bool) -> Any:
    """A merged (or bitsandbytes-quantized) transformers checkpoint, as a plain model."""
    from transformers import AutoModel, AutoModelForCausalLM

    if quantized:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("the candidate is a bitsandbytes checkpoint, and bitsandbytes is not installed") from None
    cls = AutoModelForCausalLM if causal else AutoModel
    kw: dict[str, Any] = {"device_map": {"": device}}
    if not quantized or dtype:
        kw["dtype"] = dtype or "auto"
    return cls.from_pretrained(str(cand_dir), **kw).eval()


def param_dtype(model: Any) -> str:
    """The floating dtype holding most of ``model``'s parameters ('bfloat16', ...)."""
    counts: dict[Any, int] = {}
    for p in model.parameters():
        if p.dtype.is_floating_point:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return str(max(counts, key=counts.__getitem__)).removeprefix("torch.") if counts else "?"
