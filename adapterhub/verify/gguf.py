"""GGUF candidates: run in llama.cpp itself when llama-cpp-python is installed, else in transformers.

``verify OUT.gguf --adapter A --base B`` compares a GGUF model (converted or
merged) with PEFT's base + adapter. The candidate runs in llama.cpp
(``llama-cpp-python``) when it is importable, otherwise through transformers'
GGUF loader (which dequantizes to float32 and runs the PyTorch model). The
report's format names both the GGUF type and the runtime, e.g.
``gguf-q8_0@llama.cpp``, and each pair has its own tolerances
(``GGUF_TOLERANCES``, measured as docs/gguf.md describes).
``ADAPTERHUB_GGUF_RUNTIME=transformers`` picks transformers even when
llama.cpp is there.

llama.cpp is opened with plain CPU buffers (``use_extra_bufts=False``): its
repacked Q8_0 buffers crashed (SIGSEGV) on the first evaluation on this
machine's AMX-capable CPU, for our files and for llama.cpp's own converter's
alike; plain buffers compute the same maths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError, UsageError

if TYPE_CHECKING:
    import numpy as np

    from adapterhub.sources import Source

# Default bounds per GGUF type and runtime, from bench-style measurements on the
# trained fixture (docs/gguf.md, "Measured tolerances"): merges of a plain LoRA
# and of an rsLoRA with rank/alpha patterns against PEFT (worst correct
# figure), and a merge with alpha doubled (a broken candidate: rel >= 0.37,
# kl >= 0.61, top-1 <= 0.62 at every type). rel: max ‖cand − ref‖/‖ref‖; cos:
# min cosine; kl: max mean KL (nats); top1/topk: at clear positions.
_LLAMA_CPP: dict[str, dict[str, float]] = {
    "f32": {"rel": 1e-3, "cos": 0.99999, "kl": 1e-5, "top1": 1.0, "topk": 0.99},  # worst: rel 2.8e-4
    "f16": {"rel": 3e-3, "cos": 0.9999, "kl": 1e-4, "top1": 0.99, "topk": 0.98},  # rel 2.9e-4
    "bf16": {"rel": 0.02, "cos": 0.999, "kl": 1e-3, "top1": 0.98, "topk": 0.95},  # rel 2.1e-3, topk 0.993
    "q8_0": {"rel": 0.05, "cos": 0.97, "kl": 2e-3, "top1": 0.97, "topk": 0.95},  # rel 0.017, cos 0.989, topk 0.985
    "q4_0": {"rel": 0.3, "cos": 0.5, "kl": 0.15, "top1": 0.85, "topk": 0.7},  # rel 0.18, cos 0.65, kl 0.045, topk 0.81
}
GGUF_TOLERANCES: dict[str, dict[str, float]] = {
    f"gguf-{t}@{runtime}": dict(bounds) for t, bounds in _LLAMA_CPP.items() for runtime in ("llama.cpp", "transformers")
}
# Types without their own measurement borrow the nearest coarser one's bounds.
_BORROW = {"q4_1": "q4_0", "q5_0": "q4_0", "q5_1": "q4_0"}

# GGUF architecture -> (transformers model_type, architectures[0]).
_HF = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
}


def runtime() -> str:
    """``llama.cpp`` when llama-cpp-python is importable (and not overridden), else ``transformers``."""
    if os.environ.get("ADAPTERHUB_GGUF_RUNTIME", "").lower() == "transformers":
        return "transformers"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "transformers"
    return "llama.cpp"


def open_llama(path: str | os.PathLike, *, lora: str | os.PathLike | None = None, n_ctx: int = 512,
               vocab_only: bool = False, n_threads: int | None = None) -> Any:
    """A ``llama_cpp.Llama`` for ``path`` (and a GGUF LoRA), logits for every position, plain CPU buffers."""
    import llama_cpp
    import llama_cpp.llama as llama_mod

    default = llama_cpp.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = False  # see the module doc
        return p

    llama_mod.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(
            str(path), lora_path=str(lora) if lora else None, logits_all=not vocab_only, n_ctx=n_ctx,
            vocab_only=vocab_only, verbose=False, n_threads=n_threads or max(1, min(4, os.cpu_count() or 1)),
            n_batch=n_ctx, seed=0,
        )
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise InvalidArtifactError(f"llama.cpp refused {Path(path).name}: {e}") from None
    finally:
        llama_mod.llama_cpp.llama_model_default_params = default


def llama_logits(llm: Any, ids: Sequence[int]) -> np.ndarray:
    """The logits llama.cpp computes at every position of ``ids`` ([len(ids), vocab], float32)."""
    import numpy as np

    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


class LlamaCppModel:
    """A llama.cpp model with the call signature verify uses for transformers models."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def parameters(self) -> Any:
        import torch

        return iter([torch.zeros(1, dtype=torch.float32)])  # llama.cpp computes in float32

    def __call__(self, input_ids: Any, attention_mask: Any = None, output_hidden_states: bool = False, **_: Any) -> Any:
        from types import SimpleNamespace

        import torch

        if output_hidden_states:
            raise UsageError("--layers needs a transformers model; a GGUF candidate in llama.cpp gives logits only")
        rows = []
        for i in range(input_ids.shape[0]):
            n = int(attention_mask[i].sum()) if attention_mask is not None else input_ids.shape[1]
            lg = torch.zeros((input_ids.shape[1], self.llm.n_vocab()), dtype=torch.float32)
            lg[:n] = torch.from_numpy(llama_logits(self.llm, input_ids[i, :n].tolist()))
            rows.append(lg)
        return SimpleNamespace(logits=torch.stack(rows))


def _gguf_file(cand_dir: Path) -> Path:
    files = sorted(cand_dir.glob("*.gguf"))
    if len(files) != 1:
        raise InvalidArtifactError(f"{cand_dir}: expected one .gguf file, found {len(files)}")
    return files[0]


def _header(cand_dir: Path) -> tuple[dict[str, Any], list[Any]]:
    from adapterhub.inspect.gguf import read_gguf_header

    return read_gguf_header(_gguf_file(cand_dir))


class GGUFCandidate:
    """A GGUF model file (converted, or merged with ``merge --to gguf``)."""

    name = "gguf"
    tolerances = GGUF_TOLERANCES  # default bounds of its formats (verify.plan.make_bounds)

    def claims(self, source: Source) -> bool:
        return "config.json" not in source.files and any(r.endswith(".gguf") for r in source.files)

    def config(self, cand_dir: Path) -> dict[str, Any]:
        meta, _ = _header(cand_dir)
        if meta.get("general.type") == "adapter":
            raise UsageError(
                "the candidate is a GGUF LoRA; verify runs GGUF models",
                hint="merge it into its base (`adapterhub merge A --base B --to gguf -o M.gguf`) and verify that",
            )
        arch = meta.get("general.architecture")
        if arch not in _HF:
            raise InvalidArtifactError(f"GGUF architecture {arch!r}: verify runs {', '.join(_HF)}")
        model_type, hf_arch = _HF[arch]

        def a(key: str) -> Any:
            return meta.get(f"{arch}.{key}")

        tokens = meta.get("tokenizer.ggml.tokens")
        cfg = {
            "architectures": [hf_arch],
            "model_type": model_type,
            "hidden_size": a("embedding_length"),
            "num_hidden_layers": a("block_count"),
            "num_attention_heads": a("attention.head_count"),
            "intermediate_size": a("feed_forward_length"),
            "max_position_embeddings": a("context_length"),
            "vocab_size": tokens.get("array_length") if isinstance(tokens, dict) else a("vocab_size"),
        }
        return {k: v for k, v in cfg.items() if v is not None}

    def format(self, config: Mapping[str, Any], cand_dir: Path) -> str:
        from adapterhub.inspect.gguf import file_type_name

        meta, _ = _header(cand_dir)
        ft = meta.get("general.file_type")
        t = file_type_name(ft) if isinstance(ft, int) else None
        if t is None:
            raise InvalidArtifactError("the GGUF has no general.file_type: cannot pick tolerances for it")
        return f"gguf-{_BORROW.get(t, t)}@{runtime()}"

    def load(self, cand_dir: Path, *, causal: bool, device: str, dtype: str | None, fmt: str) -> Any:
        path = _gguf_file(cand_dir)
        if fmt.endswith("@llama.cpp"):
            ctx = int(self.config(cand_dir).get("max_position_embeddings") or 512)
            return LlamaCppModel(open_llama(path, n_ctx=min(ctx, 4096)))
        import torch
        from transformers import AutoModelForCausalLM

        try:
            m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except (ValueError, RuntimeError) as e:
            raise InvalidArtifactError(f"transformers cannot load {path.name}: {e}") from None
        return m.to(device).eval()

    def weights(self, cand_dir: Path, config: Mapping[str, Any], fmt: str) -> Any:
        raise UsageError("--streamed is not available for GGUF candidates; they are run whole")
