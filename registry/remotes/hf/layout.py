"""What a Hub repo pushed by adapterhub holds, and reading its ``adapterhub.json``.

The Hugging Face Hub as a remote: ``hf://org/repo[@revision]``.

``push`` uploads one registry version as one commit, ``pull`` imports a Hub
repo (or a snapshot already in the local Hugging Face cache, offline) into the
registry, and ``search`` lists an organisation's models. huggingface_hub does
the transfers and owns the download cache; it is imported inside the functions
so that the CLI starts fast.

What a pushed repo holds (README.md, "Hugging Face Hub"):

- every file of the artifact, byte for byte;
- ``README.md``: a model card with Hub metadata (``base_model``,
  ``base_model_relation``, ``library_name``, tags). When the artifact has its
  own ``README.md``, the Hub gets that card with our metadata merged into its
  front matter, and the original bytes travel in ``adapterhub.json``;
- ``adapterhub.json``: name, version, digest, file list, inspection, lineage,
  registry tags, and how the card was made (``METADATA_FILE``);
- ``model.sig`` / ``provenance.sig``: the artifact's model-signing bundle and
  its signed provenance, when it has them.

A pull drops what the push added and restores the original card, so a round
trip local -> Hub -> local gives the same artifact digest, and the signature
still verifies. Each version becomes a Hub tag (``version_tag``); registry tags
such as ``prod`` are mutable and stay local (they are listed in
``adapterhub.json`` but not restored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapterhub.errors import InvalidArtifactError

SCHEME = "hf://"
DEFAULT_ENDPOINT = "https://huggingface.co"
CARD_FILE = "README.md"
METADATA_FILE = "adapterhub.json"
SIGNATURE_FILE = "model.sig"  # the same name `adapterhub pull` writes and model_signing expects
PROVENANCE_FILE = "provenance.sig"
# Files the push adds beside the artifact's own; an artifact may not hold them.
RESERVED = (METADATA_FILE, SIGNATURE_FILE, PROVENANCE_FILE)
FORMAT = "adapterhub/hf-remote"
FORMAT_VERSION = 1

# adapterhub.json holds names, the file list, the inspection and the original
# card: far less than this, which bounds what a hostile repo makes a pull read.
METADATA_LIMIT = 16 << 20


def read_metadata(path: Path) -> dict[str, Any]:
    """``adapterhub.json`` of a snapshot, within the size cap, refused unless it is ours."""
    from adapterhub.jsonio import loads

    if path.stat().st_size > _limit():
        raise InvalidArtifactError(f"{METADATA_FILE} is larger than {_limit() >> 20} MiB",
                                   hint="this is not a repo adapterhub pushed")
    meta = loads(path.read_bytes(), what=METADATA_FILE, max_bytes=_limit(), max_depth=32)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InvalidArtifactError(f"{METADATA_FILE} is not adapterhub metadata (format is not {FORMAT!r})")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise InvalidArtifactError(
            f"{METADATA_FILE} has format version {meta.get('format_version')!r}; this adapterhub reads up to {FORMAT_VERSION}",
            hint="upgrade adapterhub",
        )
    return meta


def _limit() -> int:
    return METADATA_LIMIT
