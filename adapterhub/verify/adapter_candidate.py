"""Adapters as verify's CANDIDATE: an extracted or converted LoRA applied to its base.

``verify EXTRACTED --adapter REFERENCE --base BASE`` runs BASE + EXTRACTED
(PEFT, unmerged) against the reference, which is either

- a PEFT adapter (the original that ``convert --to lora`` turned into a plain
  LoRA): BASE + REFERENCE by PEFT, as for every other candidate; or
- a transformers model (the fine-tuned or merged MODEL that ``extract`` read):
  that model, loaded as it is.

A candidate in the registry needs no ``--adapter``/``--base``: its lineage
names the reference (``extracted_from`` or ``converted_from``) and the base.
The candidate's tolerances are those of the base's dtype (an adapter runs in
its base's dtype), so a truncated extraction FAILs at the defaults unless
``--tolerance rel=...`` states the error it is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import UsageError

if TYPE_CHECKING:
    from adapterhub.sources import Source
    from adapterhub.verify.weights import WeightSource

#: Lineage relations that name an adapter candidate's reference, in order of preference.
REFERENCE_RELATIONS = ("adapter", "converted_from", "extracted_from")


def is_adapter(source: Source) -> bool:
    return "adapter_config.json" in source.files and "config.json" not in source.files


def model_reference_ok(candidate: Source, reference: Source) -> bool:
    """A transformers model may stand as the reference when the candidate is an adapter."""
    return is_adapter(candidate) and "config.json" in reference.files and "adapter_config.json" not in reference.files


def reference_is_model(reference_dir: Path) -> bool:
    return (reference_dir / "config.json").exists() and not (reference_dir / "adapter_config.json").exists()


def load_model_reference(reference_dir: Path, causal: bool, device: str, dtype: str | None) -> Any:
    """The fine-tuned or merged model an adapter was extracted from, as a plain transformers model."""
    from adapterhub.verify.loading import load_transformers_candidate

    return load_transformers_candidate(reference_dir, causal, device, dtype, False)


class AdapterCandidate:
    """A PEFT adapter, run by PEFT on the base it is verified against (``bind``)."""

    name = "adapter"

    def __init__(self) -> None:
        self.base_dir: Path | None = None

    def claims(self, source: Source) -> bool:
        return is_adapter(source)

    def bind(self, base_dir: Path) -> None:
        """The base the candidate adapter is applied to (verify's --base, or the lineage's)."""
        self.base_dir = base_dir

    def _base(self) -> Path:
        if self.base_dir is None:
            raise UsageError("an adapter candidate needs its base: pass --base BASE")
        return self.base_dir

    def config(self, cand_dir: Path) -> dict[str, Any]:
        from adapterhub.verify.candidates import read_config

        return read_config(self._base() / "config.json")

    def format(self, config: Mapping[str, Any], cand_dir: Path) -> str:
        from adapterhub.verify.candidates import detect_format

        return detect_format(config, self._base())

    def load(self, cand_dir: Path, *, causal: bool, device: str, dtype: str | None, fmt: str) -> Any:
        from adapterhub.verify.loading import load_reference

        return load_reference(self._base(), cand_dir, causal, device, dtype, None)

    def weights(self, cand_dir: Path, config: Mapping[str, Any], fmt: str) -> WeightSource:
        raise UsageError("--streamed compares checkpoints tensor by tensor; an adapter candidate is verified whole")
