"""``search --remote hf://org``: an organisation's models, with the columns the
local search filters on, read from each model card's metadata.
"""

from __future__ import annotations

import os
import re
from typing import Any

from adapterhub.registry.remotes.hf.errors import call, require_online
from adapterhub.registry.remotes.hf.layout import DEFAULT_ENDPOINT, SCHEME
from adapterhub.registry.remotes.hf.urls import name_for, parse_org_url

# PEFT methods as the card tags spell them (``card_metadata`` lowercases Inspection.method).
_METHODS = ("lora", "dora", "ia3", "adalora", "loha", "lokr", "vera", "oft", "boft", "prompt_tuning",
            "prefix_tuning", "p_tuning", "adaption_prompt", "bottleneck")
_QUANTS = ("nf4", "fp4", "int8", "gptq", "awq")


def model_row(m: Any, endpoint: str | None = None) -> dict[str, Any]:
    """One search result from a huggingface_hub ``ModelInfo`` (the card's metadata, no extra request)."""
    tags = [str(t) for t in (m.tags or [])]
    card = m.card_data.to_dict() if getattr(m, "card_data", None) is not None else {}
    card_tags = [str(t) for t in card.get("tags") or []] if isinstance(card.get("tags"), list) else []
    all_tags = list(dict.fromkeys([*card_tags, *tags]))
    rank = next((int(t[5:]) for t in all_tags if re.fullmatch(r"rank-\d{1,6}", t)), None)
    relation = card.get("base_model_relation")
    kind = {"adapter": "adapter", "merged": "merged", "quantized": "quantized"}.get(str(relation)) if relation else None
    if kind is None and "gguf" in all_tags:
        kind = "gguf"
    elif kind is None and (m.library_name == "peft" or "peft" in all_tags):
        kind = "adapter"
    base = card.get("base_model")
    base = base[0] if isinstance(base, list) and base else base
    web = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    modified = getattr(m, "last_modified", None)
    return {
        "repository": m.id,
        "url": f"{SCHEME}{m.id}",
        "revision": getattr(m, "sha", None),
        "name": name_for(m.id),
        "version": None,  # Hub tags (v3, ...) need one more request per repo; `pull` reads adapterhub.json
        "digest": None,
        "tags": all_tags,
        "kind": kind,
        "method": next((t.upper() for t in all_tags if t in _METHODS), None),
        "base_model": base if isinstance(base, str) else None,
        "rank": rank,
        "quant": next((t for t in all_tags if t in _QUANTS), None),
        "size": None,
        "description": None,
        "metadata": {
            "web": f"{web}/{m.id}",
            "library_name": m.library_name or card.get("library_name"),
            "adapterhub": "adapterhub" in all_tags,
            "downloads": getattr(m, "downloads", None),
            "private": getattr(m, "private", None),
            "last_modified": modified.isoformat() if modified else None,
        },
    }


def search(org_url: str, *, token: str | None = None, endpoint: str | None = None) -> list[dict[str, Any]]:
    """Models of an organisation on the Hub (``hf://org``, or ``hf://org/text`` to filter by name).

    Rows carry the columns ``adapterhub search --remote`` filters on (kind,
    method, base model, rank, quant), read from each model card's metadata.
    """
    from huggingface_hub import HfApi

    org, text = parse_org_url(org_url)
    require_online("searching the Hub")
    api = HfApi(endpoint=endpoint, token=token)

    def listing() -> list[dict[str, Any]]:
        return [model_row(m, endpoint) for m in api.list_models(author=org, search=text, cardData=True)]

    return call(listing, f"{SCHEME}{org}", endpoint)
