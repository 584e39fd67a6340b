"""The token sequences both models run: seeded ids, or the user's text prompts
through a tokenizer found beside the models.

>>> seeded_inputs(vocab=256, max_len=64)[:2]                       # doctest: +SKIP
[[...3 ids...], [...3 ids...]]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError, UsageError

if TYPE_CHECKING:
    import torch

SEED_LENGTHS = (3, 8, 17, 32, 61)  # two sequences of each length
DECODE_SEQUENCES = 4


@dataclass(frozen=True)
class InputSet:
    """What both models run: ``seqs`` (ids), padded with ``pad_id``; the first
    ``DECODE_SEQUENCES`` are greedy-decoded for ``decode`` tokens (0: not at all)."""

    seqs: tuple[tuple[int, ...], ...]
    pad_id: int
    decode: int
    info: dict[str, Any] = field(default_factory=dict)  # source, seed or file, sequences

    @property
    def decode_seqs(self) -> list[list[int]]:
        return [list(s) for s in self.seqs[:DECODE_SEQUENCES]]

    def lists(self) -> list[list[int]]:
        return [list(s) for s in self.seqs]

    def describe(self) -> dict[str, Any]:
        """The report's ``inputs`` block."""
        return {
            **self.info,
            "lengths": sorted({len(s) for s in self.seqs}),
            "tokens": sum(len(s) for s in self.seqs),
        }


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


def make_inputs(
    prompts: str | os.PathLike | None, dirs: Sequence[Path], *, vocab: int, max_len: int, decode: int
) -> InputSet:
    """Seeded sequences over ``vocab`` tokens, or the prompts in ``prompts`` (one per line)."""
    if prompts is None:
        seqs = seeded_inputs(vocab, max_len)
        return InputSet(tuple(map(tuple, seqs)), 0, decode, {"source": "seeded", "seed": 0, "sequences": len(seqs)})
    tok = find_tokenizer(dirs)
    if tok is None:
        raise InvalidArtifactError(
            "--prompts holds text, and no tokenizer was found in the candidate, base or adapter",
            hint="add the tokenizer files to one of them, or leave out --prompts to use seeded token sequences",
        )
    seqs = prompt_inputs(prompts, tok, max_len)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    info = {"source": "prompts", "file": str(prompts), "sequences": len(seqs)}
    return InputSet(tuple(map(tuple, seqs)), int(pad_id), decode, info)


def pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the attention mask (padding never reaches a real position)."""
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
