"""The tokenizer of a checkpoint as GGUF metadata (``tokenizer.ggml.*``).

llama.cpp refuses a model GGUF without its tokenizer. Two kinds are written:

- SentencePiece (``tokenizer.model``; Llama 2, Mistral, Phi-3 style):
  ``tokenizer.ggml.model = "llama"``, every piece with its score and type.
  The model file is a protobuf; the few fields needed are read here, so
  the ``sentencepiece`` package is not needed to convert.
- Byte-level BPE (``tokenizer.json``; Llama 3, Qwen style):
  ``tokenizer.ggml.model = "gpt2"``, tokens, merges, and the pre-tokenizer
  family (``tokenizer.ggml.pre``), which llama.cpp needs to split text the
  way the Hugging Face tokenizer does. The family is recognised from the
  pre-tokenizer's split pattern in ``tokenizer.json``; an unknown pattern is
  refused unless the caller names the family.

Special token ids, the add-BOS/EOS flags and the chat template come from
``gguf.SpecialVocab``, which reads ``tokenizer_config.json``,
``tokenizer.json``, ``config.json`` and ``chat_template.jinja``.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError

if TYPE_CHECKING:
    from gguf import GGUFWriter

FileMap = Mapping[str, Path]

#: Files ``gguf.SpecialVocab`` and the vocab readers look at.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "config.json",
    "merges.txt",
)

# Split patterns of byte-level BPE pre-tokenizers -> llama.cpp's family name.
# Each family's pattern as it appears in the models' tokenizer.json.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS: dict[str, str] = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}

# gguf.TokenType values (and SentencePiece's piece types, which are the same numbers).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class VocabReport:
    kind: str  # "spm" or "bpe"
    pre: str
    tokens: int
    chat_template: bool

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "pre": self.pre, "tokens": self.tokens, "chat_template": self.chat_template}


def _load_json(files: FileMap, rel: str) -> Any:
    from adapterhub import jsonio

    # Size- and depth-capped; a large vocabulary's tokenizer.json runs to tens of MB.
    return jsonio.read_json(files[rel], what=f"{rel}: tokenizer file", max_bytes=512 << 20, expect=None)


# --------------------------------------------------------------------------- SentencePiece protobuf


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise InvalidArtifactError("tokenizer.model: truncated or malformed protobuf")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; length-delimited values as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise InvalidArtifactError(f"tokenizer.model: unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise InvalidArtifactError("tokenizer.model: truncated protobuf")
        yield field, wire, value


@dataclass(frozen=True)
class SentencePieceModel:
    pieces: list[tuple[str, float, int]]  # (piece, score, type)
    add_dummy_prefix: bool

    @classmethod
    def parse(cls, data: bytes) -> SentencePieceModel:
        pieces: list[tuple[str, float, int]] = []
        add_dummy_prefix = True
        for field, wire, value in _fields(data):
            if field == 1 and wire == 2:  # ModelProto.pieces
                piece, score, ptype = "", 0.0, NORMAL
                for f, w, v in _fields(value):
                    if f == 1 and w == 2:
                        piece = v.decode("utf-8", "replace")
                    elif f == 2 and w == 5:
                        (score,) = struct.unpack("<f", v)
                    elif f == 3 and w == 0:
                        ptype = v
                pieces.append((piece, score, ptype))
            elif field == 3 and wire == 2:  # ModelProto.normalizer_spec
                for f, w, v in _fields(value):
                    if f == 3 and w == 0:
                        add_dummy_prefix = bool(v)
        if not pieces:
            raise InvalidArtifactError("tokenizer.model holds no pieces: not a SentencePiece model")
        return cls(pieces, add_dummy_prefix)


# --------------------------------------------------------------------------- writers


@contextmanager
def _as_dir(files: FileMap) -> Iterator[Path]:
    """The tokenizer files under their own names in a temp dir (registry blobs have hashed names)."""
    with tempfile.TemporaryDirectory(prefix="adapterhub-tok-") as d:
        for rel in TOKENIZER_FILES:
            if rel in files:
                os.symlink(os.path.abspath(files[rel]), Path(d) / rel)
        yield Path(d)


def _special_vocab(files: FileMap, n_vocab: int, merges: bool) -> Any:
    import gguf

    with _as_dir(files) as d:
        try:
            return gguf.SpecialVocab(d, load_merges=merges, n_vocab=n_vocab)
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise InvalidArtifactError(f"tokenizer files: {e}") from None


def _added_tokens(files: FileMap) -> list[dict[str, Any]]:
    if "tokenizer.json" not in files:
        return []
    tok = _load_json(files, "tokenizer.json")
    added = tok.get("added_tokens") if isinstance(tok, dict) else None
    return [a for a in added or [] if isinstance(a, dict) and isinstance(a.get("id"), int) and isinstance(a.get("content"), str)]


def _looks_special(text: str) -> bool:
    return text.startswith("<|") and text.endswith("|>")


def write_spm(w: GGUFWriter, files: FileMap, vocab_size: int) -> VocabReport:
    try:
        with open(files["tokenizer.model"], "rb") as fh:
            spm = SentencePieceModel.parse(fh.read())
    except OSError as e:
        raise InvalidArtifactError(f"tokenizer.model: unreadable ({e.strerror or e})") from None
    n = max(vocab_size, len(spm.pieces))
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-1000.0] * n
    types = [UNUSED] * n
    for i, (piece, score, ptype) in enumerate(spm.pieces):
        tokens[i], scores[i], types[i] = piece, score, ptype
    for a in _added_tokens(files):
        i = a["id"]
        if 0 <= i < n and (i >= len(spm.pieces) or tokens[i] != a["content"]):
            special = bool(a.get("special")) or _looks_special(a["content"])
            tokens[i] = a["content"] if special else a["content"].replace("\u2581", " ")
            scores[i], types[i] = -1000.0, CONTROL if special else USER_DEFINED
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(spm.add_dummy_prefix)
    sv = _special_vocab(files, n, merges=False)
    sv.add_to_gguf(w, quiet=True)
    return VocabReport("spm", "default", n, sv.chat_template is not None)


def pre_tokenizer_family(tok: Mapping[str, Any]) -> str | None:
    """llama.cpp's name for this tokenizer.json's pre-tokenizer, or None when it is not one we know."""
    pre = tok.get("pre_tokenizer")
    if not isinstance(pre, Mapping):
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list):
        return None
    splits = [s for s in steps if isinstance(s, Mapping) and s.get("type") == "Split"]
    levels = [s for s in steps if isinstance(s, Mapping) and s.get("type") == "ByteLevel"]
    if len(steps) == 1 and levels and levels[0].get("use_regex", True):
        return "gpt-2"
    if len(splits) == 1 and len(levels) == 1 and len(steps) == 2 and not levels[0].get("use_regex", True):
        pattern = splits[0].get("pattern")
        regex = pattern.get("Regex") if isinstance(pattern, Mapping) else None
        return PRE_TOKENIZERS.get(regex) if isinstance(regex, str) else None
    return None


def write_bpe(w: GGUFWriter, files: FileMap, vocab_size: int, pre: str | None = None) -> VocabReport:
    tok = _load_json(files, "tokenizer.json")
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise InvalidArtifactError(
            "tokenizer.json is not a BPE tokenizer; GGUF export reads SentencePiece (tokenizer.model) "
            "and byte-level BPE (tokenizer.json) tokenizers"
        )
    family = pre or pre_tokenizer_family(tok)
    if family is None:
        raise InvalidArtifactError(
            "tokenizer.json: unknown BPE pre-tokenizer; llama.cpp must be told which family splits text this way",
            hint=f"pass --tokenizer-pre NAME (e.g. {', '.join(sorted({*PRE_TOKENIZERS.values(), 'gpt-2'}))}) "
            "if you know the model's family",
        )
    vocab: dict[str, int] = model["vocab"]
    added = {a["id"]: a for a in _added_tokens(files)}
    n = max([vocab_size, *(i + 1 for i in vocab.values()), *(i + 1 for i in added)])
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for text, i in vocab.items():
        tokens[i], types[i] = text, NORMAL
    for i, a in added.items():
        special = bool(a.get("special")) or _looks_special(a["content"])
        tokens[i], types[i] = a["content"], CONTROL if special else USER_DEFINED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(family)
    w.add_token_list(tokens)
    w.add_token_types(types)
    sv = _special_vocab(files, n, merges=True)
    if not sv.merges:
        raise InvalidArtifactError("tokenizer.json: a BPE tokenizer without merges")
    sv.add_to_gguf(w, quiet=True)
    return VocabReport("bpe", family, n, sv.chat_template is not None)


def write_tokenizer(w: GGUFWriter, files: FileMap, config: Mapping[str, Any], pre: str | None = None) -> VocabReport:
    """Add the tokenizer of ``files`` to ``w``; an InvalidArtifactError when there is none we can write."""
    vocab_size = config.get("vocab_size")
    n = vocab_size if isinstance(vocab_size, int) and vocab_size > 0 else 0
    if "tokenizer.model" in files:
        return write_spm(w, files, n)
    if "tokenizer.json" in files:
        return write_bpe(w, files, n, pre)
    raise InvalidArtifactError(
        "no tokenizer: a GGUF model must carry its tokenizer, and neither tokenizer.model nor tokenizer.json is here",
        hint="convert a directory that holds the model's tokenizer files (or copy them in from its base)",
    )


def chat_template(files: FileMap) -> str | None:
    """The chat template, as transformers saves it (chat_template.jinja or tokenizer_config.json)."""
    if "chat_template.jinja" in files:
        try:
            return Path(files["chat_template.jinja"]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
    if "tokenizer_config.json" in files:
        cfg = _load_json(files, "tokenizer_config.json")
        t = cfg.get("chat_template") if isinstance(cfg, dict) else None
        return t if isinstance(t, str) else None
    return None
