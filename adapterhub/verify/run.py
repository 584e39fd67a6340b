"""Numerical verification: does a merged or quantized model compute what base + adapter compute?

The reference is the base model with the adapter applied by PEFT, unmerged
(``PeftModel.from_pretrained``). The candidate (a merged or bitsandbytes
quantized checkpoint) is loaded as a plain transformers model. Both run the
same inputs, and ``adapterhub.verify_metrics`` compares their final logits (or,
for encoders such as BERT, their last hidden states and mean-pooled
embeddings) against per-format tolerances (``TOLERANCES``, measured: see the
README's "Verification" section). The verdict is PASS or FAIL.

A quantized candidate (NF4, FP4, int8) is also compared with a second,
**same-recipe** reference: base + adapter merged by PEFT (``merge_and_unload``)
and quantized on load by transformers + bitsandbytes with the candidate's own
``quantization_config``. Our quantizer writes what transformers writes, so a
correct candidate matches it to within a flipped quantization bucket or two,
while a dropped module or a wrong alpha lands far off; the 4-bit rounding noise
that blurs the full-precision comparison cancels out. Both comparisons must
pass (``SAME_RECIPE_TOLERANCES`` bound the second).

An adapter saved with resized token embeddings (new tokens) gets the base's
embeddings resized to its vocabulary before PEFT loads it, as PEFT users do.

>>> from adapterhub.verify import verify                       # doctest: +SKIP
>>> rep = verify("team/qa-merged:1")                           # adapter + base from the lineage
>>> rep.verdict, rep.metrics["rel"]
('PASS', 3.1e-07)

When the candidate is in the registry the report is stored as a verification
record of its digest (``Registry.add_verification``); ``adapterhub show``
prints the last verdict and ``adapterhub search --verified`` filters on it.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError, NotFoundError, UsageError
from adapterhub.sources import Source, resolve_base, resolve_source

if TYPE_CHECKING:
    import torch

    from adapterhub.registry import Registry

FORMATS = ("fp32", "fp16", "bf16", "int8", "nf4", "fp4")  # from finest to coarsest

# Default tolerances per candidate format, picked between the worst figure over
# correct conversions and the best over broken ones (wrong alpha, a dropped
# module, another adapter) measured by bench/verify_tolerances.py on scaled tiny
# Llamas and all-MiniLM-L6-v2; the README's "Verification" section has the
# figures. rel: max ‖cand − ref‖/‖ref‖; cos: min cosine over positions; kl: max
# mean KL(ref ‖ cand) in nats; top1/topk: min agreement at clear positions.
# The 4-bit bounds only catch gross errors (wrong alpha, wrong adapter): their
# own rounding noise is as large as one dropped module's effect. Quantized
# candidates are also held to SAME_RECIPE_TOLERANCES, which catch the rest.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"rel": 1e-3, "cos": 0.9999, "kl": 1e-4, "top1": 1.0, "topk": 0.99},
    "bf16": {"rel": 0.04, "cos": 0.995, "kl": 0.01, "top1": 0.98, "topk": 0.95},
    "fp16": {"rel": 0.01, "cos": 0.999, "kl": 1e-3, "top1": 0.99, "topk": 0.95},
    "int8": {"rel": 0.07, "cos": 0.99, "kl": 0.02, "top1": 0.98, "topk": 0.9},
    "nf4": {"rel": 0.38, "cos": 0.5, "kl": 1.0, "top1": 0.55, "topk": 0.58},
    "fp4": {"rel": 0.52, "cos": 0.45, "kl": 1.5, "top1": 0.5, "topk": 0.5},
}
# Bounds of the same-recipe comparison (candidate vs base + adapter merged by
# PEFT and quantized by transformers with the candidate's recipe), from
# bench/verify_tolerances.py on the same models: every correct candidate
# (fp32 and bf16 merges; nf4 with and without double quant, fp4, int8;
# MiniLM) gave exactly 0, the closest broken one (a dropped module) rel 0.086
# (int8), 0.112 (nf4), 0.142 (fp4) and cos ≥ 0.014 below 1. The bounds leave
# room for buckets that flip where two merges round 1 ulp apart (other
# devices and kernels). top1 alone does not separate a dropped module (0.991).
SAME_RECIPE_TOLERANCES: dict[str, dict[str, float]] = {
    fmt: {"rel": 0.01, "cos": 0.999, "kl": 1e-3, "top1": 0.99, "topk": 0.95} for fmt in ("int8", "nf4", "fp4")
}
DEFAULT_DECODE = 8
SEED_LENGTHS = (3, 8, 17, 32, 61)  # two sequences of each length
DECODE_SEQUENCES = 4
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_FMT_DTYPES = {v: k for k, v in _DTYPES.items()}
_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


@dataclass
class VerifyReport:
    verdict: str  # PASS | FAIL
    format: str
    model_kind: str  # causal-lm | encoder
    candidate: dict[str, Any]
    adapter: dict[str, Any]
    base: dict[str, Any]
    device: str
    dtypes: dict[str, str]
    inputs: dict[str, Any]
    metrics: dict[str, Any]
    tolerance: dict[str, Any]  # the bounds used, and "from": the format whose defaults they are
    failures: list[str]
    pooled: dict[str, Any] | None = None
    decode: dict[str, Any] | None = None
    layers: dict[str, Any] | None = None
    # quantized candidates: the comparison with the same-recipe reference, or {"skipped": why}
    same_recipe: dict[str, Any] | None = None
    reference: dict[str, Any] = field(default_factory=dict)  # how the reference was built
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 0
    sequential: bool = False
    versions: dict[str, str | None] = field(default_factory=dict)
    recorded: bool = False
    created_at: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict == "PASS"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    def summary(self) -> dict[str, Any]:
        """The short form that ``show`` prints and provenance can carry."""
        keys = ("rel", "cos_min", "kl_mean", "top1", "max_abs")
        out = {
            "verdict": self.verdict,
            "format": self.format,
            "device": self.device,
            "metrics": {k: self.metrics.get(k) for k in keys},
            "failures": self.failures,
            "created_at": self.created_at,
        }
        sr = self.same_recipe or {}
        if "metrics" in sr:
            out["same_recipe"] = {"verdict": sr["verdict"], "metrics": {k: sr["metrics"].get(k) for k in keys}}
        return out


# --------------------------------------------------------------------------- inputs and files


def _read_json(path: Path | None) -> dict[str, Any]:
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InvalidArtifactError(f"{path.name}: malformed JSON ({e.msg} at line {e.lineno})") from None


def _as_dir(src: Source, tmp: Path, name: str) -> Path:
    """A directory transformers can load: the source's own, or links to its registry blobs."""
    if src.root is not None and src.root.is_dir():
        return src.root
    d = tmp / name
    for rel, path in src.files.items():
        target = d / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path, target)
    return d


def detect_format(config: dict[str, Any], model_dir: Path) -> str:
    """fp32 | bf16 | fp16 | nf4 | fp4 | int8, from config.json (or the weights' dtypes)."""
    qc = config.get("quantization_config")
    if qc:
        if qc.get("quant_method") != "bitsandbytes":
            raise InvalidArtifactError(
                f"the candidate is quantized with {qc.get('quant_method')!r}; verify handles bitsandbytes checkpoints"
            )
        if qc.get("load_in_8bit"):
            return "int8"
        return str(qc.get("bnb_4bit_quant_type") or "fp4").lower()
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    from adapterhub.inspect.safetensors import read_header

    counts: dict[str, int] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        for info in read_header(f).tensors.values():
            counts[info.dtype] = counts.get(info.dtype, 0) + 1
    by = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}
    found = [d for d in sorted(counts, key=counts.__getitem__, reverse=True) if d in by]
    if not found:
        raise InvalidArtifactError("cannot tell the candidate's dtype: config.json names none and it has no float weights")
    return by[found[0]]


def _is_causal(config: dict[str, Any]) -> bool:
    archs = config.get("architectures") or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def check_architecture(base_cfg: dict[str, Any], cand_cfg: dict[str, Any]) -> None:
    """Refuse early when the candidate cannot have been derived from the base."""
    diff = [
        f"{k} {cand_cfg.get(k)!r} vs {base_cfg.get(k)!r}"
        for k in _ARCH_KEYS
        if k in base_cfg and k in cand_cfg and base_cfg[k] != cand_cfg[k]
    ]
    if diff or _is_causal(base_cfg) != _is_causal(cand_cfg):
        raise InvalidArtifactError(
            "the candidate's architecture differs from the base's (" + (", ".join(diff) or "model class") + "): "
            "it was not made from this base",
            hint="pass the --base the candidate was merged into",
        )


def seeded_inputs(vocab: int, max_len: int, seed: int = 0, lengths: Sequence[int] = SEED_LENGTHS) -> list[list[int]]:
    """A fixed set of token sequences: two of each length, ids drawn with a seeded generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        n = max(1, min(n, max_len))
        for _ in range(2):
            out.append(torch.randint(0, vocab, (n,), generator=g).tolist())
    return out


def find_tokenizer(dirs: Sequence[Path | None]) -> Any:
    """The first tokenizer found in ``dirs`` (candidate, base, adapter), or None."""
    from transformers import AutoTokenizer

    for d in dirs:
        if d is None or not any((d / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")):
            continue
        try:
            return AutoTokenizer.from_pretrained(str(d))
        except (OSError, ValueError):
            continue
    return None


def prompt_inputs(path: str | os.PathLike, tokenizer: Any, max_len: int) -> list[list[int]]:
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise UsageError(f"{path}: no prompts (one per line)")
    return [tokenizer(ln, truncation=True, max_length=max_len)["input_ids"] for ln in lines]


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the attention mask (padding never reaches a real position)."""
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


# --------------------------------------------------------------------------- lineage


def _source_for(reg: Registry, digest: str, relation: str, recipe: dict[str, Any] | None) -> Source:
    refs = reg.index.refs_of(digest)
    if refs:
        return resolve_source(refs[0], reg)
    inp = ((recipe or {}).get("inputs") or {}).get(relation) or {}
    if inp.get("path") and Path(inp["path"]).exists():
        return resolve_source(inp["path"], reg)
    if inp.get("hub_id"):
        return resolve_source(f"hf:{inp['hub_id']}" + (f"@{inp['revision']}" if inp.get("revision") else ""), reg)
    raise NotFoundError(
        f"the {relation} {digest[:19]}… named by the lineage is neither in this registry nor at its recorded path",
        hint=f"pass --{relation} explicitly",
    )


def lineage_inputs(reg: Registry, digest: str, *, max_depth: int = 8) -> tuple[Source, Source]:
    """(adapter, base) recorded for ``digest``, walking up through ``source`` links
    (a quantized model made from a merged one)."""
    d = digest
    for _ in range(max_depth):
        parents = {p["relation"]: p for p in reg.index.parents(d)}
        if "adapter" in parents and "base" in parents:
            a, b = parents["adapter"], parents["base"]
            return _source_for(reg, a["digest"], "adapter", a["recipe"]), _source_for(reg, b["digest"], "base", b["recipe"])
        if "source" not in parents:
            break
        d = parents["source"]["digest"]
    raise NotFoundError(
        "the registry records no adapter and base for this candidate",
        hint="pass --adapter ADAPTER --base BASE",
    )


# --------------------------------------------------------------------------- devices and memory


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available", hint="use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r} (auto, cuda or cpu)")
    return device


def _weights_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())


def _free_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is optional: Linux says the same in /proc/meminfo
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return 8 << 30


def plan_device(device: str, sequential: bool, ref_bytes: int, cand_bytes: int, warnings: list[str], requested: str) -> tuple[str, bool]:
    """Fit the models into GPU memory: both at once, one at a time, or fall back to the CPU."""
    if device != "cuda":
        return device, sequential
    free = _free_bytes("cuda")
    budget = 0.85 * free  # leave room for activations and the CUDA context
    gib = 1 << 30
    if not sequential and ref_bytes + cand_bytes > budget and max(ref_bytes, cand_bytes) <= budget:
        warnings.append(
            f"reference and candidate ({(ref_bytes + cand_bytes) / gib:.1f} GiB) do not fit in "
            f"{free / gib:.1f} GiB of free GPU memory together: loading one at a time (--sequential)"
        )
        return device, True
    if max(ref_bytes, cand_bytes) > budget:
        msg = (
            f"the models need {max(ref_bytes, cand_bytes) / gib:.1f} GiB each but the GPU has "
            f"{free / gib:.1f} GiB free"
        )
        if requested == "auto":
            warnings.append(msg + ": running on the CPU instead")
            return "cpu", sequential
        raise UsageError(msg, hint="use --device cpu, or free GPU memory")
    return device, sequential


def batch_size_for(device: str, seq_len: int, width: int, hidden: int, n_hidden: int, n: int) -> int:
    """Sequences per batch from free memory: logits/hidden kept in fp32, with headroom for activations."""
    per_seq = seq_len * (width * 4 * 4 + hidden * 4 * (n_hidden + 1) * 2 + hidden * 64)
    return max(1, min(n, 64, int(0.3 * _free_bytes(device) // max(per_seq, 1))))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------- models


# Wrappers PEFT puts around a module whose full weight it saves.
_SAVED_WRAPPERS = (".base_layer", ".modules_to_save.default", ".original_module")


def saved_vocab(adapter_dir: Path, model: Any) -> int | None:
    """The vocabulary of the token embeddings the adapter saved, when it differs
    from ``model``'s (an adapter trained after ``resize_token_embeddings``).

    Read from the safetensors headers: full ``embed_tokens`` / ``lm_head``
    weights (``modules_to_save`` or ``save_embedding_layers``), whose width is
    the model's and whose row count is not.
    """
    from adapterhub.inspect.safetensors import read_header

    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    if emb_in is None or getattr(emb_in, "weight", None) is None:
        return None
    rows, width = emb_in.weight.shape
    names = {n for n, mod in model.named_modules() if mod is emb_in or (emb_out is not None and mod is emb_out)}
    sizes = []
    for f in sorted(adapter_dir.glob("*.safetensors")):
        for key, info in read_header(f).tensors.items():
            if len(info.shape) != 2 or info.shape[1] != width or info.shape[0] == rows or "lora_" in key:
                continue
            path = key.removeprefix("base_model.model.").removesuffix(".weight")
            for w in _SAVED_WRAPPERS:
                path = path.replace(w, "")
            if path in names:
                sizes.append(info.shape[0])
    return max(sizes) if sizes else None


def _load_reference(
    base_dir: Path, adapter_dir: Path, causal: bool, device: str, dtype: str | None
) -> tuple[Any, tuple[int, int] | None]:
    """Base + adapter by PEFT, unmerged; and (old, new) vocabulary when the base was resized."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(str(base_dir), dtype=dtype or "auto", device_map={"": device})
    resized = None
    vocab = saved_vocab(adapter_dir, model)
    if vocab is not None:
        # New tokens: PEFT users resize the base before loading such an adapter.
        # The new rows are overwritten by the adapter's saved embeddings, so
        # they need no careful initialisation (mean_resizing costs a covariance).
        resized = (int(model.get_input_embeddings().weight.shape[0]), vocab)
        model.resize_token_embeddings(vocab, mean_resizing=False)
    try:
        pm = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidArtifactError(
            f"the adapter does not fit the base model: {first[:300]}",
            hint="pass the --base the adapter was trained on",
        ) from None
    return pm.eval(), resized


def quant_recipe(cand_cfg: dict[str, Any], cand_dir: Path, fmt: str, fallback_dtype: str) -> dict[str, Any]:
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
        "dtype": dtype if dtype in _DTYPES else fallback_dtype,
    }
    if fmt == "int8":
        return recipe
    for f in sorted(cand_dir.glob("*.safetensors")):
        header = read_header(f)
        key = next((k for k in header.tensors if ".weight.quant_state.bitsandbytes__" in k), None)
        if key is not None:
            state = json.loads(header.read_bytes(key).decode("utf-8"))
            recipe["blocksize"] = int(state.get("blocksize", 64))
            if state.get("dtype") in _DTYPES:
                recipe["dtype"] = state["dtype"]
            break
    return recipe


def bnb_config(cand_cfg: dict[str, Any]) -> Any:
    """A ``BitsAndBytesConfig`` with the candidate's settings (block size 64, as
    transformers always quantizes)."""
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
        llm_int8_skip_modules=qc.get("llm_int8_skip_modules"),
        llm_int8_threshold=float(qc.get("llm_int8_threshold", 6.0)),
        llm_int8_has_fp16_weight=bool(qc.get("llm_int8_has_fp16_weight")),
    )


def _save_merged(pm: Any, out: Path) -> Path:
    """Merge the PEFT reference in place (``merge_and_unload``) and save it."""
    merged = pm.merge_and_unload()
    merged.save_pretrained(str(out))
    return out


def _load_same_recipe(merged_dir: Path, cand_cfg: dict[str, Any], causal: bool, device: str, dtype: str | None) -> Any:
    """The PEFT merge, quantized on load by transformers with the candidate's recipe."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(
        str(merged_dir), quantization_config=bnb_config(cand_cfg), dtype=dtype or "auto", device_map={"": device}
    )
    return model.eval()


def _load_candidate(cand_dir: Path, causal: bool, device: str, dtype: str | None, quantized: bool) -> Any:
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


def _param_dtype(model: Any) -> str:

    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.dtype.is_floating_point:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return str(max(counts, key=counts.__getitem__)).removeprefix("torch.") if counts else "?"


def _free(*models: Any) -> None:
    import torch

    del models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class _Run:
    out: torch.Tensor  # [N, T, D] fp32 on CPU
    hidden: list[torch.Tensor] | None
    decoded: list[list[int]] | None
    load_s: float = 0.0
    run_s: float = 0.0


def _forward_all(
    model: Any, seqs: list[list[int]], pad_id: int, device: str, causal: bool, layers: bool, batch: int, tick: Callable[[], None]
) -> tuple[torch.Tensor, list[torch.Tensor] | None, int]:
    """Outputs of every sequence, batched and padded, kept on the CPU in fp32.
    Halves the batch on CUDA out-of-memory. Returns (output, hidden states, batch used)."""
    import torch

    t_max = max(len(s) for s in seqs)
    outs: list[torch.Tensor] = []
    hiddens: list[list[torch.Tensor]] = []
    i = 0
    while i < len(seqs):
        chunk = seqs[i : i + batch]
        ids, mask = _pad(chunk, pad_id)
        try:
            with torch.inference_mode():
                o = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=layers)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise UsageError(
                    "ran out of GPU memory running one sequence", hint="use --sequential, or --device cpu"
                ) from None
            batch = max(1, batch // 2)
            torch.cuda.empty_cache()
            continue
        main = o.logits if causal else o.last_hidden_state
        width = t_max - main.shape[1]
        outs.append(torch.nn.functional.pad(main.float().cpu(), (0, 0, 0, width)))
        if layers:
            hiddens.append([torch.nn.functional.pad(h.float().cpu(), (0, 0, 0, width)) for h in o.hidden_states])
        i += len(chunk)
        tick()
    hidden = [torch.cat(per_layer) for per_layer in zip(*hiddens)] if layers else None
    return torch.cat(outs), hidden, batch


def greedy_decode(model: Any, seqs: list[list[int]], n: int, device: str) -> list[list[int]]:
    """``n`` greedy tokens after each sequence (one sequence at a time, no padding)."""
    import torch

    out = []
    with torch.inference_mode():
        for s in seqs:
            ids = torch.tensor([s], dtype=torch.long, device=device)
            new: list[int] = []
            for _ in range(n):
                logits = model(input_ids=ids).logits[0, -1]
                if not torch.isfinite(logits).all():
                    break
                t = int(logits.argmax())
                new.append(t)
                ids = torch.cat([ids, torch.tensor([[t]], device=device)], dim=1)
            out.append(new)
    return out


# --------------------------------------------------------------------------- the check


def _registry_if_any(registry: Registry | None) -> Registry | None:
    if registry is not None:
        return registry
    from adapterhub import config

    if not (config.home() / "index.db").exists():
        return None
    from adapterhub.registry import Registry

    return Registry()


def _registry_digest(reg: Registry | None, src: Source) -> str | None:
    """The candidate's digest when the registry holds it (a ref, or a directory with the same content)."""
    if reg is None:
        return None
    digest = src.digest
    if digest is None:
        # A file of a size no stored file has cannot be in the registry: then
        # there is nothing to look up, and no reason to hash the whole model.
        sizes = {os.stat(p).st_size for p in src.files.values()}
        if reg.index.file_sizes(sizes) != sizes:
            return None
        from adapterhub.convert import _digest_of

        digest = _digest_of(src)
    return digest if reg.index.has_artifact(digest) else None


def verify(
    candidate: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    *,
    registry: Registry | None = None,
    device: str = "auto",
    prompts: str | os.PathLike | None = None,
    tolerance: Sequence[str] | dict[str, float] | None = None,
    layers: bool = False,
    sequential: bool = False,
    decode: int = DEFAULT_DECODE,
    dtype: str | None = None,
    record: bool = True,
    progress: Callable[[str, int], Any] | None = None,
    same_recipe: bool = True,
) -> VerifyReport:
    """Compare CANDIDATE with base + adapter (PEFT, unmerged) and judge it. See the module doc.

    ``same_recipe=False`` skips the second reference of quantized candidates.
    ``tolerance`` keys prefixed ``same.`` (``same.rel``) bound that comparison.
    """
    from adapterhub.verify import metrics as vm

    t0 = time.perf_counter()
    warnings: list[str] = []
    try:
        tol_over = vm.parse_tolerance(tolerance)
    except ValueError as e:
        raise UsageError(str(e)) from None
    with ExitStack() as stack:
        reg = _registry_if_any(registry)
        if reg is not None and registry is None:
            stack.callback(reg.close)
        return _verify(
            stack, reg, candidate, adapter, base, device=device, prompts=prompts, tol_over=tol_over, layers=layers,
            sequential=sequential, decode=decode, dtype=dtype, record=record, progress=progress, t0=t0, warnings=warnings,
            same_recipe=same_recipe,
        )


def _verify(
    outer: ExitStack,
    reg: Registry | None,
    candidate: str | os.PathLike,
    adapter: str | os.PathLike | None,
    base: str | os.PathLike | None,
    *,
    device: str,
    prompts: str | os.PathLike | None,
    tol_over: dict[str, float],
    layers: bool,
    sequential: bool,
    decode: int,
    dtype: str | None,
    record: bool,
    progress: Callable[[str, int], Any] | None,
    t0: float,
    warnings: list[str],
    same_recipe: bool,
) -> VerifyReport:
    import torch

    from adapterhub.verify import metrics as vm
    from adapterhub.verify.metrics import SAME_RECIPE_PREFIX

    cand = resolve_source(candidate, reg)
    if reg is None and cand.origin == "registry":
        reg = _registry_if_any(None)
        if reg is not None:
            outer.callback(reg.close)
    digest = _registry_digest(reg, cand) if (cand.origin == "registry" or cand.root is not None) else None
    if "adapter_config.json" in cand.files and "config.json" not in cand.files:
        raise UsageError(f"{cand.spec} is an adapter: verify takes the merged or quantized model as CANDIDATE")
    if "config.json" not in cand.files:
        raise InvalidArtifactError(f"{cand.spec} has no config.json: it is not a transformers model directory")

    if adapter is None:
        if base is not None:
            raise UsageError("--base needs --adapter (or neither, to read both from the registry lineage)")
        if digest is None or reg is None:
            raise UsageError(
                f"{cand.spec} is not in the registry, so its adapter and base are unknown",
                hint="pass --adapter ADAPTER --base BASE",
            )
        a_src, b_src = lineage_inputs(reg, digest)
    else:
        a_src = resolve_source(adapter, reg)
        b_src = resolve_base(a_src, base, reg)
    if "adapter_config.json" not in a_src.files:
        raise InvalidArtifactError(f"{a_src.spec} has no adapter_config.json: --adapter takes a PEFT adapter")
    if "config.json" not in b_src.files:
        raise InvalidArtifactError(f"{b_src.spec} has no config.json: --base takes a transformers model directory")

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="adapterhub-verify-")))
        cand_dir, a_dir, b_dir = _as_dir(cand, tmp, "candidate"), _as_dir(a_src, tmp, "adapter"), _as_dir(b_src, tmp, "base")
        cand_cfg, base_cfg = _read_json(cand_dir / "config.json"), _read_json(b_dir / "config.json")
        fmt = detect_format(cand_cfg, cand_dir)
        check_architecture(base_cfg, cand_cfg)
        causal = _is_causal(base_cfg)
        # An fp32 merge of a bf16 base is compared with a bf16 reference: the
        # coarser of the two sets the bounds.
        base_fmt = detect_format(base_cfg, b_dir) if dtype is None else _DTYPES[dtype]
        tol_key = max(fmt, base_fmt, key=FORMATS.index)
        sr_over = {k.removeprefix(SAME_RECIPE_PREFIX): v for k, v in tol_over.items() if k.startswith(SAME_RECIPE_PREFIX)}
        tol = {**TOLERANCES[tol_key], **{k: v for k, v in tol_over.items() if not k.startswith(SAME_RECIPE_PREFIX)}}
        margin = tol.pop("margin", vm.DEFAULT_MARGIN)
        k = int(tol.pop("k", vm.DEFAULT_K))
        quantized = fmt in ("nf4", "fp4", "int8")
        recipe: dict[str, Any] | None = None
        sr_skip: str | None = None
        if quantized:
            recipe = quant_recipe(cand_cfg, cand_dir, fmt, _FMT_DTYPES.get(detect_format(base_cfg, b_dir), "float32"))
            if not same_recipe:
                sr_skip = "--no-same-recipe"
            elif recipe["blocksize"] not in (None, 64):
                sr_skip = f"block size {recipe['blocksize']}: transformers quantizes with 64 only, so it cannot rebuild this recipe"
                warnings.append(f"same-recipe reference skipped: {sr_skip}")
        want_sr = quantized and sr_skip is None

        requested = device
        dev = pick_device(device)
        ref_bytes, cand_bytes = _weights_bytes(b_dir) + _weights_bytes(a_dir), _weights_bytes(cand_dir)
        dev, sequential = plan_device(dev, sequential, ref_bytes, cand_bytes, warnings, requested)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()

        max_len = int(base_cfg.get("max_position_embeddings") or 512)
        vocab = int(base_cfg.get("vocab_size") or 2)
        pad_id = 0
        if prompts is not None:
            tok = find_tokenizer([cand_dir, b_dir, a_dir])
            if tok is None:
                raise InvalidArtifactError(
                    "--prompts holds text, and no tokenizer was found in the candidate, base or adapter",
                    hint="add the tokenizer files to one of them, or leave out --prompts to use seeded token sequences",
                )
            seqs = prompt_inputs(prompts, tok, max_len)
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            inputs = {"source": "prompts", "file": str(prompts), "sequences": len(seqs)}
        else:
            seqs = seeded_inputs(vocab, max_len)
            inputs = {"source": "seeded", "seed": 0, "sequences": len(seqs)}
        n_decode = max(0, int(decode)) if causal else 0
        dec_seqs = seqs[:DECODE_SEQUENCES]

        total_ticks = 2 * (len(seqs) + (len(dec_seqs) if n_decode else 0)) + (len(seqs) if want_sr else 0)
        bar = (progress or (lambda desc, total: _NullBar()))("verifying", total_ticks)
        tick = lambda: bar.update(1)
        hidden_size = int(base_cfg.get("hidden_size") or 1)
        n_layers = int(base_cfg.get("num_hidden_layers") or 1)
        batch = 0
        runs: dict[str, _Run] = {}
        dtypes: dict[str, str] = {}
        reference: dict[str, Any] = {"method": "PEFT, unmerged", "resized_vocab": None}
        sr_times: dict[str, float] = {}

        def load(which: str) -> Any:
            nonlocal vocab
            t = time.perf_counter()
            if which == "reference":
                m, resized = _load_reference(b_dir, a_dir, causal, dev, dtype)
                if resized is not None:
                    reference["resized_vocab"] = list(resized)
                    vocab = resized[1]
                    cand_vocab = cand_cfg.get("vocab_size")
                    if cand_vocab is not None and int(cand_vocab) != vocab:
                        raise InvalidArtifactError(
                            f"the adapter resized the vocabulary to {vocab}, the candidate has {cand_vocab} tokens: "
                            "it was not merged from this adapter"
                        )
                    if inputs["source"] == "seeded":  # draw the new tokens too
                        seqs[:] = seeded_inputs(vocab, max_len)
                        dec_seqs[:] = seqs[:DECODE_SEQUENCES]
            else:
                m = _load_candidate(cand_dir, causal, dev, dtype, quantized)
            dtypes[which] = _param_dtype(m)
            return m, time.perf_counter() - t

        def run(which: str, model: Any, load_s: float, full: bool = True) -> None:
            nonlocal batch
            if not batch:
                width = vocab if causal else hidden_size
                batch = batch_size_for(dev, max(len(s) for s in seqs), width, hidden_size, n_layers if layers else 0, len(seqs))
            t = time.perf_counter()
            out, hidden, batch = _forward_all(model, seqs, pad_id, dev, causal, layers and full, batch, tick)
            decoded = None
            if n_decode and full:
                decoded = greedy_decode(model, dec_seqs, n_decode, dev)
                for _ in dec_seqs:
                    tick()
            runs[which] = _Run(out, hidden, decoded, load_s, time.perf_counter() - t)

        def merged_dir(ref_model: Any | None) -> Path | None:
            """Save the PEFT merge in the recipe's dtype: the loaded reference when
            its dtype is that one (``ref_model``), else None (build it later)."""
            assert recipe is not None
            if ref_model is None or dtypes["reference"] != recipe["dtype"]:
                return None
            t = time.perf_counter()
            out = _save_merged(ref_model, tmp / "same-recipe-merged")
            sr_times["merge_save_s"] = time.perf_counter() - t
            return out

        def run_same_recipe(merged: Path | None) -> None:
            """Build (when needed), quantize, run and free the same-recipe reference."""
            assert recipe is not None
            if merged is None:  # the reference ran in another dtype: merge again in the recipe's
                t = time.perf_counter()
                pm, _ = _load_reference(b_dir, a_dir, causal, dev, recipe["dtype"])
                merged = _save_merged(pm, tmp / "same-recipe-merged")
                pm = None
                _free()
                sr_times["merge_save_s"] = time.perf_counter() - t
            t = time.perf_counter()
            m = _load_same_recipe(merged, cand_cfg, causal, dev, dtype)
            dtypes["same_recipe"] = _param_dtype(m)
            run("same_recipe", m, time.perf_counter() - t, full=False)
            m = None
            _free()
            shutil.rmtree(merged, ignore_errors=True)  # the merged copy can be as big as the base

        # One model in memory at a time with --sequential; otherwise the
        # reference and the candidate together, then the same-recipe one alone.
        try:
            if sequential:
                m, s = load("reference")
                run("reference", m, s)
                merged = merged_dir(m) if want_sr else None
                m = None
                _free()
                if want_sr:
                    run_same_recipe(merged)
                m, s = load("candidate")
                run("candidate", m, s)
                m = None
                _free()
            else:
                ref_m, rs = load("reference")
                cand_m, cs = load("candidate")
                run("reference", ref_m, rs)
                run("candidate", cand_m, cs)
                cand_m = None
                merged = merged_dir(ref_m) if want_sr else None
                ref_m = None
                _free()
                if want_sr:
                    run_same_recipe(merged)
        except torch.cuda.OutOfMemoryError:
            raise UsageError(
                "ran out of GPU memory loading or running the models", hint="use --sequential, or --device cpu"
            ) from None
        finally:
            bar.close()
        inputs["lengths"] = sorted({len(s) for s in seqs})
        inputs["tokens"] = sum(len(s) for s in seqs)

    ref, cnd = runs["reference"], runs["candidate"]
    _, mask = _pad(seqs, pad_id)
    mask = mask.bool()
    if ref.out.shape != cnd.out.shape:
        raise InvalidArtifactError(
            f"the outputs differ in shape (reference {tuple(ref.out.shape)}, candidate {tuple(cnd.out.shape)}): "
            "the candidate was not made from this base and adapter"
        )
    metrics = vm.compare(ref.out, cnd.out, mask, logits=causal, margin=margin, k=k)
    metrics["margin"], metrics["k"] = margin, k
    fails = vm.failures(metrics, tol)
    if causal and metrics.get("clear_positions") == 0:
        warnings.append(f"no position has a clear top-1 (margin ≥ {margin:g} nats): top-1/top-k were not checked")
    pooled = None
    if not causal:
        pr, pc = vm.mean_pool(ref.out, mask), vm.mean_pool(cnd.out, mask)
        pm = torch.ones(pr.shape[0], 1, dtype=torch.bool)
        pooled = vm.compare(pr.unsqueeze(1), pc.unsqueeze(1), pm, logits=False)
    decode_info = None
    if n_decode and ref.decoded is not None and cnd.decoded is not None:
        divs = [vm.first_divergence(a, b) for a, b in zip(ref.decoded, cnd.decoded)]
        decode_info = {
            "tokens": n_decode,
            "sequences": len(divs),
            "first_divergence": [d for d in divs],
            "all_equal": all(d is None for d in divs),
        }
    layer_info = None
    if layers and ref.hidden is not None and cnd.hidden is not None:
        layer_info = vm.layer_drift(ref.hidden, cnd.hidden, mask, rel_tol=tol.get("rel"))
    sr_info: dict[str, Any] | None = None
    if quantized:
        sr_info = {"recipe": recipe}
        if "same_recipe" in runs:
            sr = runs["same_recipe"]
            sr_tol = {**SAME_RECIPE_TOLERANCES[fmt], **sr_over}
            sr_metrics = vm.compare(sr.out, cnd.out, mask, logits=causal, margin=margin, k=k)
            sr_fails = vm.failures(sr_metrics, sr_tol)
            fails = fails + [f"same-recipe: {f}" for f in sr_fails]
            sr_info.update(
                reference=(
                    f"base + adapter merged by PEFT (merge_and_unload) in {recipe['dtype']}, "
                    f"quantized to {fmt} by transformers + bitsandbytes with the candidate's quantization_config"
                ),
                verdict="FAIL" if sr_fails else "PASS",
                metrics=sr_metrics,
                tolerance=sr_tol,
                failures=sr_fails,
                timings={
                    "merge_save_s": round(sr_times.get("merge_save_s", 0.0), 3),
                    "load_s": round(sr.load_s, 3),
                    "run_s": round(sr.run_s, 3),
                },
            )
        else:
            sr_info["skipped"] = sr_skip
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    memory: dict[str, Any] = {"peak_rss_mb": round(_peak_rss_mb(), 1)}
    if dev == "cuda":
        memory["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / (1 << 20), 1)
        memory["gpu"] = torch.cuda.get_device_name(0)
    report = VerifyReport(
        verdict="FAIL" if fails else "PASS",
        format=fmt,
        model_kind="causal-lm" if causal else "encoder",
        candidate={**cand.to_dict(), "digest": digest},
        adapter=a_src.to_dict(),
        base=b_src.to_dict(),
        device=dev,
        dtypes=dtypes,
        inputs=inputs,
        metrics=metrics,
        tolerance={**tol, "from": tol_key},
        failures=fails,
        pooled=pooled,
        decode=decode_info,
        layers=layer_info,
        same_recipe=sr_info,
        reference=reference,
        warnings=warnings,
        timings={
            "load_reference_s": round(ref.load_s, 3),
            "run_reference_s": round(ref.run_s, 3),
            "load_candidate_s": round(cnd.load_s, 3),
            "run_candidate_s": round(cnd.run_s, 3),
            "total_s": round(time.perf_counter() - t0, 3),
        },
        memory=memory,
        batch_size=batch,
        sequential=sequential,
        versions={p: version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")},
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    if record and digest is not None and reg is not None:
        report.recorded = True
        reg.add_verification(digest, report.to_dict())
    return report


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
