"""Model cards (``README.md`` with YAML front matter): the one reader and writer.

Readers:

- :func:`parse_front_matter`: the top-level scalars and lists that adapterhub
  indexes (``base_model``, ``base_model_relation``, ``library_name``, ``tags``,
  ...), read with a small subset of YAML and no dependency, fast enough for
  ``inspect`` on every push;
- :func:`read_metadata`: the whole front matter, nested mappings included, for
  merging our metadata into a card someone else wrote (needs PyYAML, refuses
  aliases, deep nesting and oversized blocks);
- :func:`parse_qlora_block`: the bitsandbytes settings that PEFT < 0.7 wrote into
  an adapter's card (QLoRA training).

Writer: :func:`render`, front matter from a mapping (keys in the given order,
scalars plain where YAML reads them back unchanged, else double-quoted), then
the body.

>>> parse_front_matter("---\\nbase_model: org/m\\ntags:\\n- lora\\n---\\n# card")
{'base_model': 'org/m', 'tags': ['lora']}
>>> print(render({"library_name": "peft", "tags": ["lora", "rank 8"]}, "# card"), end="")
---
library_name: peft
tags:
- lora
- "rank 8"
---
# card
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub.errors import InvalidArtifactError

__all__ = [
    "ModelCard",
    "parse_front_matter",
    "parse_qlora_block",
    "qlora_quant",
    "read_card",
    "read_metadata",
    "render",
    "split_front_matter",
]

CARD_FILE = "README.md"
# A card is text for people; anything this large is not one we index.
MAX_CARD_BYTES = 4 << 20
MAX_FRONT_MATTER_BYTES = 1 << 20
MAX_DEPTH = 32

_QLORA_CARD_PREFIX = "The following `bitsandbytes` quantization config was used during training:"
_KEY = re.compile(r"^([A-Za-z0-9_.\-]+)\s*:\s*(.*)$")
_MAPPING_ITEM = re.compile(r"^[A-Za-z0-9_.\-]+\s*:(\s|$)")
_QLORA_ITEM = re.compile(r"^-\s*([A-Za-z0-9_]+)\s*:\s*(.*)$")
# The delimiters huggingface_hub accepts (repocard.REGEX_YAML_BLOCK): "---" lines, any newline style.
_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(?:\r\n|\n|$))")


# --------------------------------------------------------------------------- reading


def parse_front_matter(text: str) -> dict[str, Any]:
    """Top-level scalars and lists of a model card's YAML front matter.

    A deliberately small subset of YAML (``key: value``, ``key: [a, b]`` and
    ``key:`` followed by ``- item`` lines), which is what model cards use for
    the fields we index; nested mappings such as ``model-index`` are skipped.
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    out: dict[str, Any] = {}
    key: str | None = None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        stripped = line.strip()
        if stripped.startswith("- ") or stripped == "-":
            item = stripped[1:].strip()
            if key is not None and isinstance(out.get(key), list):
                if _MAPPING_ITEM.match(item):
                    out.pop(key)  # a list of mappings (model-index): not indexed
                    key = None
                else:
                    out[key].append(_scalar(item))
            continue
        if line[0] in " \t":
            if key is not None and out.get(key) == []:
                out.pop(key)  # a nested mapping, not a list
                key = None
            continue
        m = _KEY.match(line)
        if not m:
            key = None
            continue
        key, value = m.group(1), m.group(2).strip()
        if value == "":
            out[key] = []
        elif value.startswith("[") and value.endswith("]"):
            out[key] = [_scalar(v.strip()) for v in value[1:-1].split(",") if v.strip()]
        else:
            out[key] = _scalar(value)
    return {k: v for k, v in out.items() if v != []}


def _scalar(v: str) -> Any:
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    v = re.sub(r"\s+#.*$", "", v)
    if v in ("true", "True"):
        return True
    if v in ("false", "False"):
        return False
    if v in ("null", "~"):
        return None
    return v


def parse_qlora_block(text: str) -> dict[str, str] | None:
    """The bitsandbytes config that older PEFT versions wrote into adapter model cards."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == _QLORA_CARD_PREFIX:
            out: dict[str, str] = {}
            for item in lines[i + 1 :]:
                s = item.strip()
                if not s:
                    if out:
                        break
                    continue
                m = _QLORA_ITEM.match(s)
                if not m:
                    break
                out[m.group(1)] = m.group(2).strip()
            return out
    return None


def qlora_quant(block: Mapping[str, str], default_4bit: str = "fp4") -> str | None:
    """``nf4``/``fp4``/``int8`` from a QLoRA block, or None when it quantized nothing.

    BitsAndBytesConfig's default 4-bit type was, and is, fp4.
    """

    def true(k: str) -> bool:
        return block.get(k, "").strip().lower() == "true"

    if true("load_in_4bit") or true("_load_in_4bit"):
        return block.get("bnb_4bit_quant_type", default_4bit).strip().strip("'\"").lower() or default_4bit
    if true("load_in_8bit") or true("_load_in_8bit"):
        return "int8"
    return None


@dataclass
class ModelCard:
    """What adapterhub reads from a card: indexed front matter and the QLoRA block."""

    meta: dict[str, Any] = field(default_factory=dict)
    qlora: dict[str, str] | None = None

    @property
    def relation(self) -> str | None:
        r = self.meta.get("base_model_relation")
        return r.lower() if isinstance(r, str) else None

    @property
    def base_models(self) -> list[str]:
        b = self.meta.get("base_model")
        items = b if isinstance(b, list) else [b]
        return [x for x in items if isinstance(x, str) and x]

    @classmethod
    def from_text(cls, text: str) -> ModelCard:
        return cls(parse_front_matter(text), parse_qlora_block(text))


def read_text(path: str | Path, limit: int = MAX_CARD_BYTES) -> str:
    """A card's text (at most ``limit`` bytes are read; bad UTF-8 is replaced)."""
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def read_card(path: str | Path | None) -> ModelCard:
    """The card at ``path`` (an empty card for None)."""
    if path is None:
        return ModelCard()
    return ModelCard.from_text(read_text(path))


def split_front_matter(text: str) -> tuple[str | None, str]:
    """(YAML text of the front matter or None, the rest of the card)."""
    m = _BLOCK.search(text)
    if m is None:
        return None, text
    return m.group(2), text[m.end() :]


def read_metadata(text: str) -> tuple[dict[str, Any] | None, str]:
    """The whole front matter as a mapping, and the text after it.

    ``(None, text)`` when the card has no front matter or its front matter is
    not a YAML mapping. Raises ``InvalidArtifactError`` for front matter that
    is too large, too deep or uses YAML aliases (which can expand to any size).
    """
    raw, body = split_front_matter(text)
    if raw is None:
        return None, text
    if len(raw) > MAX_FRONT_MATTER_BYTES:
        raise InvalidArtifactError(f"{CARD_FILE}: front matter of {len(raw)} bytes, more than {MAX_FRONT_MATTER_BYTES}")
    import yaml

    try:
        depth = 0
        for ev in yaml.parse(raw, Loader=yaml.SafeLoader):
            if isinstance(ev, yaml.AliasEvent):
                raise InvalidArtifactError(f"{CARD_FILE}: front matter uses YAML aliases, which cards do not need")
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise InvalidArtifactError(f"{CARD_FILE}: front matter nested deeper than {MAX_DEPTH} levels")
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        data = yaml.safe_load(raw)
    except yaml.YAMLError:
        return None, body
    return (data if isinstance(data, dict) else None), body


# --------------------------------------------------------------------------- writing

# Plain scalars that YAML reads back as the same string (no number, bool or null look-alikes).
_PLAIN = re.compile(r"[A-Za-z0-9_./@-]+")
_NOT_PLAIN = re.compile(
    r"(?i:true|false|yes|no|on|off|y|n|null|~)|[-+]?(\d[\d_]*)?(\.\d*)?([eE][-+]?\d+)?|0[xXoObB][0-9a-fA-F_]+|[-.].*"
)


def _render_scalar(v: Any, quote: bool = False) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return json.dumps(v)
    s = str(v)
    if not quote and _PLAIN.fullmatch(s) and not _NOT_PLAIN.fullmatch(s):
        return s
    return json.dumps(s, ensure_ascii=False)


def _render_value(key: str, v: Any, quote: bool) -> list[str]:
    if isinstance(v, (list, tuple)) and all(not isinstance(x, (dict, list, tuple)) for x in v):
        return [f"{key}:"] + [f"- {_render_scalar(x, quote)}" for x in v] if v else [f"{key}: []"]
    if isinstance(v, (dict, list, tuple)):
        import yaml  # nested values (a model-index kept from someone's card)

        dumped = yaml.safe_dump({key: v}, sort_keys=False, allow_unicode=True, default_flow_style=False)
        return dumped.rstrip("\n").splitlines()
    return [f"{key}: {_render_scalar(v, quote)}"]


def render(meta: Mapping[str, Any], body: str, *, quote: Collection[str] = ()) -> str:
    """A card: ``meta`` as YAML front matter (None values left out), then ``body``.

    Keys named in ``quote`` always get double-quoted string values.
    """
    lines = ["---"]
    for k, v in meta.items():
        if v is not None:
            lines += _render_value(str(k), v, k in quote)
    lines.append("---")
    return "\n".join(lines) + "\n" + body
