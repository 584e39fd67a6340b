"""A small *trained* causal LM for tests that need peaked logits.

Random models have nearly flat logits, so top-1 agreement and relative error
say little on them. This module trains a tiny Llama (4 layers, hidden 96,
grouped-query attention, untied output) for a few hundred steps on English
text that every machine has offline: the docstrings of the Python standard
library. Its tokenizer is a real SentencePiece model (BPE with byte fallback,
Llama 2 layout: <unk>=0, <s>=1, </s>=2) trained by the ``sentencepiece``
package on the same text.

The build takes well under a minute on two cores and is cached per machine,
keyed by a hash of the recipe, under ``$ADAPTERHUB_TEST_CACHE`` (default
``~/.cache/adapterhub-tests``). A file lock makes concurrent test workers
(pytest-xdist) build it once.

>>> d = trained_llama_dir()                     # doctest: +SKIP  (cached, read-only)
>>> build_trained_llama(tmp_path / "m")         # doctest: +SKIP  (a private copy)
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import io
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Everything that changes the built model belongs here: the cache key is its hash.
RECIPE: dict[str, Any] = {
    "recipe": 3,
    "vocab_size": 768,
    "hidden_size": 96,
    "intermediate_size": 256,
    "layers": 4,
    "heads": 4,
    "kv_heads": 2,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "seq_len": 64,
    "batch": 16,
    "steps": 300,
    "lr": 3e-3,
    "corpus_chars": 400_000,
    "spm_model_type": "bpe",
}

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def cache_root() -> Path:
    env = os.environ.get("ADAPTERHUB_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "adapterhub-tests"


def sample_texts() -> list[str]:
    """Prompts for tokenization and logit checks: prose, code, numbers, odd spacing, non-ASCII."""
    return [
        "Return a new list containing all items from the iterable in ascending order.",
        "The default value of the timeout argument is None, which means to wait forever.",
        "If the file does not exist, a FileNotFoundError is raised.",
        "def read(self, size=-1):\n    return self._buffer[:size]",
        "  Leading spaces,  double  spaces and a trailing space ",
        "Numbers: 3.14159, 42, 1e-5 and 0x1F.",
        "Unicode: café, naïve, Zürich, 東京, emoji 🙂.",
        "This module provides functions for working with paths.\n\nIt is part of the standard library.",
    ]


def corpus(max_chars: int = RECIPE["corpus_chars"]) -> list[str]:
    """Docstrings (longer than 80 characters) of the standard library's top-level modules, in file order."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    total = 0
    for p in sorted(lib.glob("*.py")):
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    out.append(doc)
                    total += len(doc)
                    if total >= max_chars:
                        return out
    return out


def recipe_key(seed: int = 0) -> str:
    import sentencepiece
    import torch
    import transformers

    stamp = dict(
        RECIPE,
        seed=seed,
        python=sys.version.split()[0],
        torch=torch.__version__,
        transformers=transformers.__version__,
        sentencepiece=sentencepiece.__version__,
    )
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]


def trained_llama_dir(seed: int = 0) -> Path:
    """The cached build (read-only files): built once per machine and recipe, under a file lock."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"trained-llama-{recipe_key(seed)}"
    if (final / "config.json").exists():
        return final
    with open(root / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (final / "config.json").exists():
                return final
            tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.", suffix=".incomplete", dir=root))
            try:
                _build(tmp, seed)
                for f in tmp.iterdir():
                    f.chmod(0o444)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def build_trained_llama(out_dir: Path, *, seed: int = 0) -> Path:
    """Write the trained Llama as a Hugging Face directory at ``out_dir`` (a writable copy of the cache)."""
    src = trained_llama_dir(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        shutil.copyfile(f, out / f.name)
    return out


# --------------------------------------------------------------------------- the build


def _train_spm(texts: list[str], seed: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts),
        model_writer=model,
        vocab_size=RECIPE["vocab_size"],
        model_type=RECIPE["spm_model_type"],
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    return model.getvalue()


def _lines(texts: list[str]) -> Iterator[str]:
    for t in texts:
        for line in t.splitlines():
            if line.strip():
                yield line


def _save_tokenizer(out: Path, spm_bytes: bytes) -> Any:
    from transformers import LlamaTokenizer

    (out / "tokenizer.model").write_bytes(spm_bytes)
    with tempfile.TemporaryDirectory() as staging:
        Path(staging, "tokenizer.model").write_bytes(spm_bytes)
        Path(staging, "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True})
        )
        tok = LlamaTokenizer.from_pretrained(staging)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return tok


def _batches(ids: list[int], seed: int) -> Iterator[Any]:
    import torch

    data = torch.tensor(ids, dtype=torch.long)
    n = RECIPE["seq_len"] + 1
    g = torch.Generator().manual_seed(seed)
    for _ in range(RECIPE["steps"]):
        starts = torch.randint(0, len(data) - n, (RECIPE["batch"],), generator=g)
        yield torch.stack([data[s : s + n] for s in starts.tolist()])


def _init(cfg: Any, seed: int) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _train(model: Any, ids: list[int], seed: int) -> float:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=RECIPE["lr"], total_steps=RECIPE["steps"], pct_start=0.1)
    model.train()
    loss = float("nan")
    for batch in _batches(ids, seed):
        out = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()
        sched.step()
        loss = float(out.detach())
    return loss


def _build(out: Path, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig

    texts = corpus()
    tok = _save_tokenizer(out, _train_spm(texts, seed))
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t, add_special_tokens=False)["input_ids"])
        ids.append(tok.eos_token_id)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=RECIPE["hidden_size"],
        intermediate_size=RECIPE["intermediate_size"],
        num_hidden_layers=RECIPE["layers"],
        num_attention_heads=RECIPE["heads"],
        num_key_value_heads=RECIPE["kv_heads"],
        max_position_embeddings=RECIPE["max_position_embeddings"],
        rope_theta=RECIPE["rope_theta"],
        rms_norm_eps=RECIPE["rms_norm_eps"],
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    # One thread: tiny matmuls gain nothing from two, and on a loaded two-core
    # machine OpenMP's spinning made each step ten times slower.
    model = _init(cfg, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loss = _train(model, ids, seed)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)
    (out / "train_loss.txt").write_text(f"{loss:.4f}\n")


if __name__ == "__main__":  # python -m tests.trained_lm: build (or find) the cached model and print its path
    print(trained_llama_dir())


# --------------------------------------------------------------------------- other fixtures (untrained, built in seconds)

#: Split patterns of byte-level BPE pre-tokenizers, by llama.cpp family name.
BPE_PATTERNS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
BPE_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_bpe_tokenizer(out_dir: Path, *, family: str = "llama-bpe", vocab_size: int = 1000) -> Any:
    """A byte-level BPE tokenizer (Llama 3 / Qwen style) trained on the corpus; saved with transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(BPE_PATTERNS[family]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=BPE_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_lines(corpus(100_000)), trainer=trainer)
    bos = BPE_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=BPE_SPECIALS[1])
    fast.chat_template = CHATML_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def build_small_model(out_dir: Path, arch: str = "llama", *, tokenizer: str = "spm", seed: int = 0, **sizes: Any) -> Path:
    """An untrained small model of ``arch`` (llama, mistral, qwen2, qwen3, phi3) with a real tokenizer.

    ``tokenizer`` is ``spm`` (the trained fixture's SentencePiece model) or a
    BPE family (``llama-bpe``, ``qwen2``). Weights are random (seeded) and
    saved in float32 unless ``dtype`` is given.
    """
    import torch
    import transformers as tf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "spm":
        src = trained_llama_dir()
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (src / name).exists():
                shutil.copyfile(src / name, out / name)
        vocab, bos, eos = RECIPE["vocab_size"], 1, 2
    else:
        tok = build_bpe_tokenizer(out, family=tokenizer)
        vocab, bos, eos = len(tok), tok.bos_token_id, tok.eos_token_id
    hidden = sizes.get("hidden_size", 64)
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=sizes.get("intermediate_size", 128),
        num_hidden_layers=sizes.get("layers", 2), num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=sizes.get("tie", False), bos_token_id=bos, eos_token_id=eos,
    )
    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": hidden // 4}),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"pad_token_id": None, "original_max_position_embeddings": 256}),
    }
    cfg_cls, model_cls, extra = classes[arch]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**common, **extra))
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that a wrong mapping shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(sizes.get("dtype", torch.float32)).save_pretrained(out, safe_serialization=True)
    return out
