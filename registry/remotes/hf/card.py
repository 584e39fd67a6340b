"""The model card a Hub push writes: front matter the Hub reads (base model,
relation, library, tags) and a short body, merged into the artifact's own card
when it has one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from adapterhub.registry.remotes.hf.layout import METADATA_FILE, SCHEME, SIGNATURE_FILE

if TYPE_CHECKING:
    from adapterhub.registry.index import VersionInfo

_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_RELATIONS = {"adapter": "adapter", "merged": "merged", "quantized": "quantized", "gguf": "quantized"}
_BNB = ("nf4", "fp4", "int8")
# PEFT task types -> the transformers class a usage snippet loads the base with.
_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def card_metadata(inspection: Mapping[str, Any]) -> dict[str, Any]:
    """Hub front matter for an artifact: base model, relation, library and tags."""
    kind = inspection.get("kind")
    meta: dict[str, Any] = {}
    base = inspection.get("base_model")
    # The Hub links base_model to a repo; a local path there would be a dead link.
    if isinstance(base, str) and _HUB_ID_RE.fullmatch(base) and kind in _RELATIONS:
        meta["base_model"] = base
        meta["base_model_relation"] = _RELATIONS[kind]
    if kind == "adapter" and inspection.get("format") == "peft":
        meta["library_name"] = "peft"
    elif kind in ("merged", "quantized", "checkpoint") and inspection.get("format") == "transformers":
        meta["library_name"] = "transformers"
    tags = ["adapterhub"]
    method = inspection.get("method")
    if method:
        tags.append(str(method).lower())
    if kind == "adapter":
        tags.append("peft")
    elif kind in ("merged", "quantized", "gguf"):
        tags.append(kind)
    if inspection.get("rank") is not None:
        tags.append(f"rank-{inspection['rank']}")
    quant = inspection.get("quant")
    if quant:
        tags.append(str(quant).lower())
        if str(quant).lower() in _BNB:
            tags.append("bitsandbytes")
    if kind == "gguf":
        tags.append("gguf")
    meta["tags"] = list(dict.fromkeys(tags))
    return meta


def card_body(info: VersionInfo, inspection: Mapping[str, Any], repo_id: str, signed: bool) -> str:
    from adapterhub import __version__

    kind = inspection.get("kind") or "artifact"
    method = inspection.get("method")
    base = inspection.get("base_model")
    what = f"{method} {kind}" if method and kind == "adapter" else kind
    lines = [f"# {info.name}:{info.version}", ""]
    if info.description:
        lines += [info.description, ""]
    lines.append(
        f"A {what}" + (f" for `{base}`" if base else "") + f", pushed from an adapterhub {__version__} registry."
    )
    lines += ["", "| | |", "|---|---|", f"| kind | {kind} |"]
    rows = [
        ("method", method),
        ("rank", inspection.get("rank")),
        ("alpha", inspection.get("alpha")),
        ("target modules", ", ".join((inspection.get("details") or {}).get("target_modules") or []) or None),
        ("quantization", inspection.get("quant")),
        ("task", inspection.get("task_type")),
        ("digest", f"`{info.digest}`"),
        ("signature", f"`{SIGNATURE_FILE}` (OpenSSF model-signing)" if signed else None),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows if v not in (None, "")]
    lines += ["", "## Use it", "", "```bash", f"adapterhub pull {SCHEME}{repo_id}", "```"]
    if kind == "adapter" and inspection.get("format") == "peft" and base:
        auto = _AUTO_CLASSES.get(str(inspection.get("task_type")), "AutoModel")
        lines += [
            "",
            "```python",
            "from peft import PeftModel",
            f"from transformers import {auto}",
            "",
            f'model = PeftModel.from_pretrained({auto}.from_pretrained("{base}"), "{repo_id}")',
            "```",
        ]
    lines += ["", f"`{METADATA_FILE}` holds the registry's metadata and lineage for this version."]
    return "\n".join(lines) + "\n"


def render_card(meta: Mapping[str, Any], body: str, original: bytes | None = None) -> tuple[str, str]:
    """The Hub card and how it was made: ``("generated", text)`` or ``("merged", text)``.

    With an ``original`` card, its front matter wins key by key (tags are
    joined), its text is kept, and ours fills only what it lacks.
    """
    from adapterhub import modelcard
    from adapterhub.errors import InvalidArtifactError

    if original is None:
        return "generated", modelcard.render(meta, f"\n{body}")
    theirs: dict[str, Any] = {}
    text = original.decode("utf-8", errors="replace")
    if text.startswith("---"):
        try:
            data, rest = modelcard.read_metadata(text)
        except InvalidArtifactError:  # hostile front matter (aliases, deep nesting): the card stays text after ours
            data = None
        if data is not None:
            theirs, text = data, rest
    merged = {**meta, **{str(k): v for k, v in theirs.items() if v is not None}}
    their_tags = theirs.get("tags") or []
    if not isinstance(their_tags, list):
        their_tags = [their_tags]
    merged["tags"] = list(dict.fromkeys([*(str(t) for t in their_tags), *meta.get("tags", [])]))
    return "merged", modelcard.render(merged, text if text.strip() else body)
