"""The kinds of candidate verify reads, and how each is loaded.

A :class:`CandidateLoader` recognises a candidate by its files, gives its
transformers config and its format (the key of its tolerances), loads it
whole, and, for ``--streamed``, gives its weights by transformers' tensor
names, dequantized as they are read. :func:`candidate_loaders` lists them, most
specific first: **a new kind of candidate (GGUF, an extracted adapter) adds one
line there**, in its own module under ``adapterhub/verify/``.

>>> loader = pick_loader(source)                                   # doctest: +SKIP
>>> loader.format(loader.config(cand_dir), cand_dir)
'nf4'
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from adapterhub.errors import InvalidArtifactError, UsageError
from adapterhub.jsonio import read_json
from adapterhub.verify.loading import BNB_FORMATS, DTYPES, load_transformers_candidate

if TYPE_CHECKING:
    from adapterhub.sources import Source
    from adapterhub.verify.weights import WeightSource


class CandidateLoader(Protocol):
    """One kind of candidate (see the module doc).

    Optional attributes: ``tolerances`` (format -> default bounds) for formats
    that ``plan.TOLERANCES`` does not list, and ``streamable = True`` for a
    kind whose :meth:`weights` can be read layer by layer: only such kinds are
    streamed when the models do not fit (``--streamed`` asks any kind).
    """

    name: str

    def claims(self, source: Source) -> bool:
        """Whether this loader reads ``source`` (from its file names only)."""

    def config(self, cand_dir: Path) -> dict[str, Any]:
        """The candidate's transformers config (``config.json``'s content)."""

    def format(self, config: Mapping[str, Any], cand_dir: Path) -> str:
        """The key of the candidate's tolerances: fp32, bf16, fp16, int8, nf4, fp4, ..."""

    def load(self, cand_dir: Path, *, causal: bool, device: str, dtype: str | None, fmt: str) -> Any:
        """The whole model, in eval mode, on ``device``."""

    def weights(self, cand_dir: Path, config: Mapping[str, Any], fmt: str) -> WeightSource:
        """Its tensors by transformers' names, dequantized when read (``--streamed``)."""


def read_config(path: Path) -> dict[str, Any]:
    """A JSON config file, or {} when there is none."""
    return read_json(path) if path.exists() else {}


def detect_format(config: Mapping[str, Any], model_dir: Path) -> str:
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
    if dtype in DTYPES:
        return DTYPES[dtype]
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


class TransformersCandidate:
    """A merged or bitsandbytes-quantized checkpoint in transformers' layout."""

    name = "transformers"
    streamable = True

    def claims(self, source: Source) -> bool:
        return "config.json" in source.files

    def config(self, cand_dir: Path) -> dict[str, Any]:
        return read_config(cand_dir / "config.json")

    def format(self, config: Mapping[str, Any], cand_dir: Path) -> str:
        return detect_format(config, cand_dir)

    def load(self, cand_dir: Path, *, causal: bool, device: str, dtype: str | None, fmt: str) -> Any:
        return load_transformers_candidate(cand_dir, causal, device, dtype, fmt in BNB_FORMATS)

    def weights(self, cand_dir: Path, config: Mapping[str, Any], fmt: str) -> WeightSource:
        from adapterhub.verify.weights import BnbWeights, SafetensorsWeights

        st = SafetensorsWeights(cand_dir)
        return BnbWeights(st) if fmt in BNB_FORMATS else st


def candidate_loaders() -> list[CandidateLoader]:
    """Every kind of candidate, most specific first. New kinds are added here."""
    from adapterhub.verify.gguf import GGUFCandidate

    from adapterhub.verify.adapter_candidate import AdapterCandidate

    return [GGUFCandidate(), AdapterCandidate(), TransformersCandidate()]


def pick_loader(source: Source) -> CandidateLoader:
    """The first loader that claims ``source``; a clear error when none does."""
    for loader in candidate_loaders():
        if loader.claims(source):
            return loader
    if "adapter_config.json" in source.files:
        raise UsageError(f"{source.spec} is an adapter: verify takes the merged or quantized model as CANDIDATE")
    raise InvalidArtifactError(f"{source.spec} has no config.json: it is not a transformers model directory")
