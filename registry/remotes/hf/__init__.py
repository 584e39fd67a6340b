"""The Hugging Face Hub as a remote: ``hf://org/repo[@revision]``.

``push`` uploads one registry version as one commit, ``pull`` imports a Hub
repo (or a snapshot already in the local Hugging Face cache, offline) into the
registry, and ``search`` lists an organisation's models. huggingface_hub does
the transfers and owns the download cache; it is imported inside the functions
so that the CLI starts fast.

- :mod:`.layout`: what a pushed repo holds (``adapterhub.json``, the card, signatures);
- :mod:`.urls`: ``hf://`` URLs, names and tags;
- :mod:`.card`: the model card;
- :mod:`.errors`: huggingface_hub's exceptions as ours;
- :mod:`.push`, :mod:`.pull`, :mod:`.search`.
"""

from __future__ import annotations

from adapterhub.registry.remotes.hf.card import card_metadata, render_card
from adapterhub.registry.remotes.hf.errors import call, hub_error, offline
from adapterhub.registry.remotes.hf.layout import (
    CARD_FILE,
    DEFAULT_ENDPOINT,
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    PROVENANCE_FILE,
    RESERVED,
    SCHEME,
    SIGNATURE_FILE,
)
from adapterhub.registry.remotes.hf.pull import pull
from adapterhub.registry.remotes.hf.push import UploadPlan, plan_push, push
from adapterhub.registry.remotes.hf.search import model_row, search
from adapterhub.registry.remotes.hf.urls import HubRepo, name_for, parse_org_url, parse_url, version_tag

__all__ = [
    "CARD_FILE", "DEFAULT_ENDPOINT", "FORMAT", "FORMAT_VERSION", "METADATA_FILE", "PROVENANCE_FILE", "RESERVED",
    "SCHEME", "SIGNATURE_FILE", "HubRepo", "UploadPlan", "call", "card_metadata", "hub_error", "model_row", "name_for",
    "offline", "parse_org_url", "parse_url", "plan_push", "pull", "push", "render_card", "search", "version_tag",
]
