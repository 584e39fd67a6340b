"""Tell what an artifact is from its JSON files and tensor headers alone.

:func:`inspect_path` recognises

- PEFT adapters (``adapter_config.json`` + ``adapter_model.safetensors``, or a
  legacy pickled ``adapter_model.bin`` that is listed but never unpickled here),
  every ``peft_type``, and named adapters in subfolders;
- bottleneck (and LoRA, prefix, prompt) adapters of the ``adapters`` library
  (``adapter_config.json`` with a nested ``config`` + ``adapter.safetensors`` or
  ``pytorch_adapter.bin``);
- Hugging Face checkpoints (``config.json`` + ``model.safetensors`` or shards
  with ``model.safetensors.index.json``), merged models (model card
  ``base_model_relation: merged``), bitsandbytes NF4/FP4/int8 checkpoints, and
  GPTQ/AWQ and other quantized checkpoints from ``quantization_config`` only;
- GGUF files (models and LoRA adapters), alone, in a directory, or split into
  ``<stem>-0000i-of-0000n.gguf`` parts;
- a loose directory of ``*.safetensors`` without any config, reported as
  ``kind="checkpoint"``, ``format="safetensors"`` with a warning, so that plain
  tensor dumps can still be stored and found.

Nothing here reads tensor data, with one exception: the few hundred bytes of
JSON that bitsandbytes stores *as* a uint8 tensor (``quant_state``), which carry
the original shape and block size. torch, transformers and peft are never
imported, so inspecting a 7B checkpoint takes milliseconds. GGUF headers are
parsed directly rather than with ``gguf.GGUFReader``, which needs tens of
seconds for a real tokenizer vocabulary.

Bad input raises ``NotFoundError`` (missing path), ``UnsafePathError`` (a
symlink or index entry escaping the directory) or ``InvalidArtifactError``
whose one-line message starts with the offending file.

Choices worth knowing:

- ``rank`` is the largest rank found in the tensors (the config's ``r`` and
  ``rank_pattern`` when there are no readable tensors); a disagreement between
  the two is a warning. For AdaLoRA the tensors hold ``init_r``; the ranks left
  after pruning are in ``details["effective_ranks"]``. LoKr stores small
  Kronecker factors whole, so only decomposed factors yield a tensor rank.
  OFT/BOFT, prompt-style methods and bottleneck adapters have no rank.
  ``details["module_ranks"]`` has the rank of every module.
- ``params`` counts tensor elements. For quantized checkpoints it counts
  logical weights (the original shape of packed 4-bit weights) and leaves out
  the quantization statistics (absmax, quant_map, SCB, ...).
- ``quant`` stays ``None`` for adapters: an adapter holds no quantized weights.
  When an older PEFT model card says the adapter was trained on a
  bitsandbytes-quantized base (QLoRA), ``details["trained_on_quant"]`` says
  ``nf4``/``fp4``/``int8``. PEFT 0.21 no longer writes that block.
- ``fingerprint`` is the base fingerprint for checkpoints (architecture,
  sizes, ``[out, in]`` of every 2-D weight and a digest of all that, which is
  the same for an fp32, bf16 or bitsandbytes copy of one model) and, for
  adapters, the expectation an adapter has of its base (module shapes, with
  ``None`` where the adapter cannot tell a dimension, e.g. IA3 vectors).
  Compare the two with :func:`fingerprint_matches`.

>>> info = inspect_path("out/my-lora")          # doctest: +SKIP
>>> info.method, info.rank, info.alpha          # doctest: +SKIP
('LORA', 8, 16.0)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub.inspect.safetensors import SafetensorsHeader, TensorInfo, read_header
from adapterhub.artifact import Inspection
from adapterhub.errors import InvalidArtifactError, UnsafePathError
from adapterhub.manifest import check_relpath, list_files

__all__ = ["checkpoint_fingerprint", "fingerprint_matches", "inspect_path"]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# File names of the `adapters` library (src/adapters/utils.py: CONFIG_NAME,
# SAFE_WEIGHTS_NAME, WEIGHTS_NAME, SAFE_HEAD_WEIGHTS_NAME, HEAD_WEIGHTS_NAME).
AH_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
AH_HEAD_CONFIG = "head_config.json"
AH_HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")
HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
MODEL_CARD = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# PEFT saves adapter tensors under the wrapped model's names.
_PEFT_PREFIX = "base_model.model."
# Per-module adapter parameters start with one of these components.
_ADAPTER_PARAM_PREFIXES = (
    "lora_",
    "ia3_",
    "hada_",
    "lokr_",
    "vera_",
    "oft_",
    "boft_",
    "adaption_",
    "ranknum",
)
_QLORA_CARD_PREFIX = "The following `bitsandbytes` quantization config was used during training:"

# bitsandbytes 4-bit: statistics saved beside the packed weight (transformers layout).
_BNB4_AUX = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_BNB4_STATE = re.compile(r"^(?P<w>.+)\.quant_state\.bitsandbytes__(?P<t>nf4|fp4)$")


# --------------------------------------------------------------------------- helpers


@dataclass
class _Tree:
    """The files of an artifact, by relpath."""

    root: Path
    files: dict[str, Path]  # relpath -> path, digest order
    is_file: bool = False

    @property
    def size(self) -> int:
        return sum(os.stat(p).st_size for p in self.files.values())

    def top(self) -> list[str]:
        return [r for r in self.files if "/" not in r]

    def under(self, prefix: str) -> _Tree:
        n = len(prefix) + 1
        return _Tree(self.root / prefix, {r[n:]: p for r, p in self.files.items() if r.startswith(prefix + "/")})


def _load_json(tree: _Tree, rel: str, display: str | None = None) -> dict[str, Any]:
    name = display or rel
    try:
        text = tree.files[rel].read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArtifactError(f"{name}: not UTF-8 text ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArtifactError(f"{name}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise InvalidArtifactError(f"{name}: expected a JSON object, found {type(data).__name__}")
    return data


def _header(tree: _Tree, rel: str, display: str | None = None) -> SafetensorsHeader:
    return read_header(tree.files[rel], display or rel)


def _dtype_names(tensors: Iterable[TensorInfo]) -> list[str]:
    return sorted({t.dtype_name for t in tensors})


def _is_pickle(rel: str) -> bool:
    return rel.endswith(PICKLE_SUFFIXES)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _compact(d: Mapping[str, Any]) -> dict[str, Any]:
    """Drop keys whose value carries no information (None, empty containers)."""
    return {k: v for k, v in d.items() if v is not None and v != {} and v != [] and v != ""}


def _sorted_if_list(v: Any) -> Any:
    if isinstance(v, (list, tuple, set)):
        return sorted(v, key=str)
    return v


# --------------------------------------------------------------------------- model cards


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
                if re.match(r"^[A-Za-z0-9_.\-]+\s*:(\s|$)", item):
                    out.pop(key)  # a list of mappings (model-index): not indexed
                    key = None
                else:
                    out[key].append(_yaml_scalar(item))
            continue
        if line[0] in " \t":
            if key is not None and out.get(key) == []:
                out.pop(key)  # a nested mapping, not a list
                key = None
            continue
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*:\s*(.*)$", line)
        if not m:
            key = None
            continue
        key, value = m.group(1), m.group(2).strip()
        if value == "":
            out[key] = []
        elif value.startswith("[") and value.endswith("]"):
            out[key] = [_yaml_scalar(v.strip()) for v in value[1:-1].split(",") if v.strip()]
        else:
            out[key] = _yaml_scalar(value)
    return {k: v for k, v in out.items() if v != []}


def _yaml_scalar(v: str) -> Any:
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
                m = re.match(r"^-\s*([A-Za-z0-9_]+)\s*:\s*(.*)$", s)
                if not m:
                    break
                out[m.group(1)] = m.group(2).strip()
            return out
    return None


def _quant_from_qlora_block(block: Mapping[str, str]) -> str | None:
    def true(k: str) -> bool:
        return block.get(k, "").strip().lower() == "true"

    if true("load_in_4bit") or true("_load_in_4bit"):
        # BitsAndBytesConfig's default 4-bit type was, and is, fp4.
        return block.get("bnb_4bit_quant_type", "fp4").strip().strip("'\"").lower() or "fp4"
    if true("load_in_8bit") or true("_load_in_8bit"):
        return "int8"
    return None


@dataclass
class _Card:
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


def _read_card(tree: _Tree, rel: str = MODEL_CARD) -> _Card:
    p = tree.files.get(rel)
    if p is None:
        return _Card()
    text = p.read_text(encoding="utf-8", errors="replace")
    return _Card(parse_front_matter(text), parse_qlora_block(text))


def _card_details(card: _Card) -> dict[str, Any]:
    keep = (
        "base_model",
        "base_model_relation",
        "library_name",
        "license",
        "pipeline_tag",
        "tags",
        "datasets",
        "language",
    )
    return _compact({k: card.meta.get(k) for k in keep})


# --------------------------------------------------------------------------- fingerprints


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def checkpoint_fingerprint(config: Mapping[str, Any], modules: Mapping[str, list[int]]) -> dict[str, Any]:
    """Base fingerprint: architecture, sizes and the ``[out, in]`` of every 2-D weight."""
    tc = config.get("text_config")
    text: Mapping[str, Any] = tc if isinstance(tc, dict) else {}

    def pick(*keys: str) -> Any:
        for src in (config, text):
            for k in keys:
                if src.get(k) is not None:
                    return src[k]
        return None

    archs = config.get("architectures") or []
    fp: dict[str, Any] = {
        "architecture": (archs[0] if archs else None) or config.get("model_type"),
        "model_type": config.get("model_type"),
        "hidden_size": pick("hidden_size", "n_embd", "d_model", "dim"),
        "num_hidden_layers": pick("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
        "vocab_size": pick("vocab_size"),
        "modules": {k: list(v) for k, v in sorted(modules.items())},
    }
    fp["digest"] = _digest(fp)
    return fp


def _suffix_index(names: Iterable[str]) -> dict[str, list[str]]:
    idx: dict[str, list[str]] = {}
    for n in names:
        parts = n.split(".")
        for i in range(1, len(parts)):
            idx.setdefault(".".join(parts[i:]), []).append(n)
    return idx


def _locate(name: str, modules: Mapping[str, Any], idx: Mapping[str, list[str]]) -> str | None:
    """Find ``name`` among ``modules`` allowing a different leading prefix on either side."""
    if name in modules:
        return name
    hits = idx.get(name, [])
    if len(hits) == 1:  # the checkpoint has an extra prefix (bert., model., ...)
        return hits[0]
    parts = name.split(".")
    for i in range(1, len(parts) - 1):  # the adapter has an extra prefix
        tail = ".".join(parts[i:])
        if tail in modules:
            return tail
        hits = idx.get(tail, [])
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            return None
    return None


def fingerprint_matches(expectation: Mapping[str, Any] | None, fingerprint: Mapping[str, Any] | None) -> list[str]:
    """Why an adapter (``expectation``) does not fit a base (``fingerprint``); [] if it does.

    Module names may differ by a leading prefix (``model.``, ``bert.``, ...) on
    either side. ``None`` in an expected shape means "not known from the adapter".
    """
    if not expectation or not fingerprint:
        return []
    problems: list[str] = []
    for key in ("hidden_size", "num_hidden_layers"):
        want, have = expectation.get(key), fingerprint.get(key)
        if want is not None and have is not None and want != have:
            problems.append(f"{key}: adapter expects {want}, base has {have}")
    modules: Mapping[str, list[int]] = fingerprint.get("modules") or {}
    idx = _suffix_index(modules)
    for name, shape in sorted((expectation.get("modules") or {}).items()):
        found = _locate(name, modules, idx)
        if found is None:
            problems.append(f"missing module {name}: the base has no such 2-D weight")
            continue
        have_shape = list(modules[found])
        want_shape = list(shape)
        if len(want_shape) != len(have_shape) or any(
            w is not None and w != h for w, h in zip(want_shape, have_shape, strict=True)
        ):
            shown = "[" + ", ".join("?" if w is None else str(w) for w in want_shape) + "]"
            problems.append(f"shape mismatch for {name}: adapter expects {shown}, base has {have_shape}")
    return problems


# --------------------------------------------------------------------------- PEFT adapters


def _split_peft_key(key: str, extra_prefixes: tuple[str, ...]) -> tuple[str, str] | None:
    """``(module, param)`` for a per-module adapter tensor, else None."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if i and part.startswith(_ADAPTER_PARAM_PREFIXES + extra_prefixes):
            module = ".".join(parts[:i])
            if module == "base_model":
                return None  # shared across modules, e.g. VeRA's base_model.vera_A
            return module.removeprefix(_PEFT_PREFIX), ".".join(parts[i:])
    return None


def _pattern_value(patterns: Mapping[str, Any], module: str) -> tuple[bool, Any]:
    # Same matching as peft.utils.other.get_pattern_key: first key whose regex
    # matches the end of the module name at a component boundary.
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return True, value
        except re.error:
            if module == key or module.endswith("." + key):
                return True, value
    return False, None


@dataclass
class _ModuleInfo:
    rank: int | None = None
    out: int | None = None
    inp: int | None = None
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)  # param name -> shape


def _module_table(
    tensors: Mapping[str, TensorInfo], peft_type: str
) -> tuple[dict[str, _ModuleInfo], dict[str, TensorInfo], dict[str, TensorInfo], set[str]]:
    """Group adapter tensors by module: (modules, shared, other, adapter names found in keys)."""
    extra = (peft_type.lower() + "_",) if peft_type else ()
    modules: dict[str, _ModuleInfo] = {}
    shared: dict[str, TensorInfo] = {}
    other: dict[str, TensorInfo] = {}
    names: set[str] = set()
    for key, t in tensors.items():
        split = _split_peft_key(key, extra)
        if split is None:
            if key.startswith("base_model.") and not key.startswith(_PEFT_PREFIX):
                shared[key] = t  # e.g. VeRA's vera_A / vera_B
            else:
                other[key] = t
            continue
        module, param = split
        parts = param.split(".")
        # Keys saved from a raw state_dict keep the adapter name
        # (lora_A.default.weight); PEFT's own save strips it.
        if len(parts) == 3 and parts[2] == "weight":
            names.add(parts[1])
            param = f"{parts[0]}.weight"
        elif len(parts) == 2 and parts[1] not in ("weight", "bias"):
            names.add(parts[1])
            param = parts[0]
        modules.setdefault(module, _ModuleInfo()).params[param] = t.shape
    return modules, shared, other, names


Shape = tuple[int, ...]


def _two_d(p: Mapping[str, Shape], name: str) -> Shape | None:
    s = p.get(name)
    return s if s is not None and len(s) == 2 else None


def _shapes_lora(m: _ModuleInfo, config: Mapping[str, Any]) -> None:
    p = m.params
    a = p.get("lora_A.weight") or p.get("lora_A")  # AdaLoRA drops ".weight"
    b = p.get("lora_B.weight") or p.get("lora_B")
    if a is not None:
        m.rank = a[0]  # conv layers: [r, in, kh, kw]
        if b is not None and len(a) == 2 and len(b) == 2:
            m.out, m.inp = b[0], a[1]
    ea, eb = _two_d(p, "lora_embedding_A"), _two_d(p, "lora_embedding_B")
    if ea is not None:
        m.rank = ea[0]
        if eb is not None:
            # An embedding weight is [num_embeddings, dim]; A is r x num, B is dim x r.
            m.out, m.inp = ea[1], eb[0]
    mag = p.get("lora_magnitude_vector") or p.get("lora_magnitude_vector.weight")
    if mag is not None and m.out is None and len(mag) == 1:
        m.out = mag[0]


def _shapes_ia3(m: _ModuleInfo, config: Mapping[str, Any]) -> None:
    s = _two_d(m.params, "ia3_l")
    if s is not None:
        if s[0] == 1:  # a feed-forward module: the vector scales the input
            m.inp = s[1]
        else:
            m.out = s[0]


def _shapes_loha(m: _ModuleInfo, config: Mapping[str, Any]) -> None:
    w1a, w1b = _two_d(m.params, "hada_w1_a"), _two_d(m.params, "hada_w1_b")
    if w1a is not None:
        m.rank, m.out = w1a[1], w1a[0]
    if w1b is not None and "hada_t1" not in m.params:
        m.inp = w1b[1]


def _shapes_lokr(m: _ModuleInfo, config: Mapping[str, Any]) -> None:
    # Each Kronecker factor is stored whole (lokr_w1) or as a low-rank pair
    # (lokr_w1_a @ lokr_w1_b); only the pairs have a rank.
    dims: list[tuple[int, int]] = []
    for n in ("w1", "w2"):
        full = _two_d(m.params, f"lokr_{n}")
        fa, fb = _two_d(m.params, f"lokr_{n}_a"), _two_d(m.params, f"lokr_{n}_b")
        if full is not None:
            dims.append((full[0], full[1]))
        elif fa is not None and fb is not None:
            dims.append((fa[0], fb[1]))
            m.rank = fa[1]
    if len(dims) == 2 and "lokr_t2" not in m.params:
        m.out, m.inp = dims[0][0] * dims[1][0], dims[0][1] * dims[1][1]


def _shapes_vera(m: _ModuleInfo, config: Mapping[str, Any]) -> None:
    d, b = m.params.get("vera_lambda_d"), m.params.get("vera_lambda_b")
    if d is not None and len(d) == 1:
        m.rank = d[0]
    if b is not None and len(b) == 1:
        m.out = b[0]


def _shapes_oft(m: _ModuleInfo, config: Mapping[str, Any]) -> None:
    r = _two_d(m.params, "oft_R.weight")
    bs = config.get("oft_block_size")
    if r is not None and not config.get("block_share"):
        # Cayley-parametrised blocks store b(b-1)/2 values each.
        b = (1 + math.isqrt(1 + 8 * r[1])) // 2
        if b * (b - 1) // 2 == r[1] and (not bs or bs == b):
            m.inp = r[0] * b


def _shapes_boft(m: _ModuleInfo, config: Mapping[str, Any]) -> None:
    r, s = m.params.get("boft_R"), _two_d(m.params, "boft_s")
    if s is not None:
        m.out = s[0]
    if r is not None and len(r) == 4:  # [butterfly factors, blocks, b, b]
        m.inp = r[1] * r[2]


_SHAPE_RULES = {
    "lora_": _shapes_lora,
    "ia3_": _shapes_ia3,
    "hada_": _shapes_loha,
    "lokr_": _shapes_lokr,
    "vera_": _shapes_vera,
    "oft_": _shapes_oft,
    "boft_": _shapes_boft,
}


def _fill_module_shapes(modules: Mapping[str, _ModuleInfo], config: Mapping[str, Any]) -> None:
    """Per-module rank and base weight ``[out, in]``, where the tensors tell them."""
    for m in modules.values():
        for prefix, rule in _SHAPE_RULES.items():
            if any(k.startswith(prefix) for k in m.params):
                rule(m, config)
                break


def _expected_rank(peft_type: str, config: Mapping[str, Any], module: str) -> int | None:
    if peft_type == "ADALORA":
        base = config.get("init_r")
        return base if isinstance(base, int) else None
    r = config.get("r")
    patterns = config.get("rank_pattern") or {}
    if isinstance(patterns, dict) and patterns:
        hit, val = _pattern_value(patterns, module)
        if hit and isinstance(val, int):
            return val
    return r if isinstance(r, int) and not isinstance(r, bool) else None


def _rank_warnings(
    peft_type: str, config: Mapping[str, Any], module_ranks: Mapping[str, int], weights_name: str
) -> list[str]:
    if peft_type not in ("LORA", "ADALORA", "LOHA", "LOKR", "VERA"):
        return []
    groups: dict[tuple[int, int], list[str]] = {}
    for module, actual in module_ranks.items():
        want = _expected_rank(peft_type, config, module)
        if want is not None and want != actual:
            groups.setdefault((want, actual), []).append(module)
    key = "init_r" if peft_type == "ADALORA" else "r"
    out = []
    for (want, actual), mods in sorted(groups.items()):
        more = f" and {len(mods) - 1} more" if len(mods) > 1 else ""
        out.append(
            f"rank mismatch: adapter_config.json gives {key}={want} (after rank_pattern) for {mods[0]}{more}, "
            f"but {weights_name} holds rank {actual}"
        )
    return out


_PROMPT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")
_PROMPT_KEYS = (
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "encoder_hidden_size",
    "encoder_num_layers",
    "encoder_reparameterization_type",
    "prefix_projection",
    "prompt_tuning_init",
    "tokenizer_name_or_path",
)
# Config fields shown at the top of details (DESIGN.md §3); the whole non-empty
# config is kept under details["peft_config"] too.
_PEFT_KEYS = (
    "r",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
    "bias",
    "init_lora_weights",
    "init_weights",
    "feedforward_modules",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "init_r",
    "target_r",
    "total_step",
    "decompose_both",
    "decompose_factor",
    "use_effective_conv2d",
    "oft_block_size",
    "block_share",
    "coft",
    "boft_block_size",
    "boft_block_num",
    "boft_n_butterfly_factor",
    "projection_prng_key",
    "save_projection",
    "d_initial",
    "adapter_len",
    "adapter_layers",
    "peft_version",
)


def _inspect_peft(tree: _Tree, prefix: str = "") -> Inspection:
    """A PEFT adapter whose files are ``tree`` (paths shown with ``prefix``)."""
    cfg_name = prefix + PEFT_CONFIG
    config = _load_json(tree, PEFT_CONFIG, cfg_name)
    peft_type = str(config.get("peft_type") or "").upper()
    warnings: list[str] = []
    details: dict[str, Any] = {"peft_type": peft_type}
    for k in _PEFT_KEYS:
        v = config.get(k)
        if v is not None and v != {} and v != []:
            details[k] = _sorted_if_list(v)
    if peft_type in _PROMPT_TYPES:
        details.update(_compact({k: config.get(k) for k in _PROMPT_KEYS}))
    details["peft_config"] = _compact(config)

    tensors: dict[str, TensorInfo] = {}
    weights = next((w for w in PEFT_WEIGHTS if w in tree.files), None)
    if weights is None:
        raise InvalidArtifactError(
            f"{cfg_name}: PEFT adapter without weights (no adapter_model.safetensors or adapter_model.bin beside it)"
        )
    details["weights_file"] = prefix + weights
    if weights.endswith(".safetensors"):
        tensors = _header(tree, weights, prefix + weights).tensors
        if "adapter_model.bin" in tree.files:
            warnings.append(
                f"{prefix}adapter_model.bin is stored beside {prefix}adapter_model.safetensors; PEFT loads the safetensors file"
            )
    else:
        details["weights_format"] = "pickle"
        warnings.append(
            f"{prefix}adapter_model.bin is a pickle and was not read: only the config is known (rank, alpha, "
            "targets), not shapes, dtypes or the parameter count; convert it to safetensors"
        )

    modules, shared, other, key_names = _module_table(tensors, peft_type)
    if key_names:
        warnings.append(
            f"{prefix + weights} keeps the adapter name ({', '.join(sorted(key_names))}) in its tensor names; "
            "PEFT's save_pretrained strips it and load_adapter may not find these weights"
        )
    _fill_module_shapes(modules, config)
    module_ranks = {m: info.rank for m, info in sorted(modules.items()) if info.rank is not None}

    method = peft_type or None
    if peft_type == "LORA" and config.get("use_dora"):
        method = "DORA"
    if (
        peft_type == "LORA"
        and tensors
        and any("lora_magnitude_vector" in p for info in modules.values() for p in info.params)
        and not config.get("use_dora")
    ):
        warnings.append(f"{prefix + weights} has DoRA magnitude vectors but {cfg_name} does not set use_dora")

    rank: int | None = None
    if module_ranks:
        rank = max(module_ranks.values())
        details["module_ranks"] = module_ranks
        warnings.extend(_rank_warnings(peft_type, config, module_ranks, prefix + weights))
    elif peft_type == "ADALORA" and isinstance(config.get("init_r"), int):
        rank = config["init_r"]
    elif (
        peft_type not in ("OFT", "BOFT") and isinstance(config.get("r"), int) and not isinstance(config.get("r"), bool)
    ):
        rank = config["r"]
        rp = config.get("rank_pattern")
        if isinstance(rp, dict) and rp and all(isinstance(v, int) for v in rp.values()):
            rank = max([rank, *rp.values()])
    if peft_type == "ADALORA" and isinstance(config.get("rank_pattern"), dict):
        details["effective_ranks"] = {
            k: sum(bool(x) for x in v) for k, v in config["rank_pattern"].items() if isinstance(v, list)
        }
    if peft_type == "VERA" and shared:
        details["shared_tensors"] = {k: list(t.shape) for k, t in sorted(shared.items())}
    if other:
        details["full_weights"] = {k: list(t.shape) for k, t in sorted(other.items())}

    alpha = _num(config.get("lora_alpha")) if peft_type in ("LORA", "ADALORA") else _num(config.get("alpha"))

    expect_modules = {
        m: ([info.inp, info.out] if config.get("fan_in_fan_out") else [info.out, info.inp])
        for m, info in sorted(modules.items())
        if info.out is not None or info.inp is not None
    }
    base_model = config.get("base_model_name_or_path") or None
    fingerprint: dict[str, Any] = {"modules": expect_modules, "base_model": base_model}
    if peft_type in _PROMPT_TYPES:
        if isinstance(config.get("token_dim"), int) and peft_type != "PREFIX_TUNING":
            fingerprint["hidden_size"] = config["token_dim"]
        if isinstance(config.get("num_layers"), int):
            fingerprint["num_hidden_layers"] = config["num_layers"]

    return Inspection(
        kind="adapter",
        format="peft",
        method=method,
        base_model=base_model,
        base_revision=config.get("revision") or None,
        rank=rank,
        alpha=alpha,
        task_type=config.get("task_type") or None,
        dtypes=_dtype_names(tensors.values()),
        # A pickle is never unpickled here: its parameter count is unknown, not 0.
        params=None if details.get("weights_format") == "pickle" else sum(t.numel for t in tensors.values()),
        details=details,
        fingerprint=fingerprint,
        warnings=warnings,
    )


# --------------------------------------------------------------------------- `adapters` library


_AH_KEYS = (
    "reduction_factor",
    "non_linearity",
    "mh_adapter",
    "output_adapter",
    "is_parallel",
    "scaling",
    "use_gating",
    "original_ln_before",
    "original_ln_after",
    "ln_before",
    "ln_after",
    "residual_before_ln",
    "leave_out",
    "phm_layer",
    "phm_dim",
    "inv_adapter",
    "inv_adapter_reduction_factor",
    "cross_adapter",
    "dropout",
    "r",
    "alpha",
    "selfattn_lora",
    "intermediate_lora",
    "output_lora",
    "attn_matrices",
    "composition_mode",
    "prefix_length",
    "bottleneck_size",
    "flat",
    "prompt_length",
    "layers",
)
_AH_BOTTLENECK_NAMES = {
    "pfeiffer",
    "houlsby",
    "parallel",
    "scaled_parallel",
    "pfeiffer+inv",
    "houlsby+inv",
    "seq_bn",
    "double_seq_bn",
    "par_bn",
    "scaled_par_bn",
    "seq_bn_inv",
    "double_seq_bn_inv",
    "compacter++",
    "compacter",
}


def _inspect_adapters_lib(tree: _Tree, prefix: str = "") -> Inspection:
    cfg_name = prefix + PEFT_CONFIG
    full = _load_json(tree, PEFT_CONFIG, cfg_name)
    conf = full.get("config")
    details: dict[str, Any] = _compact(
        {
            "adapter_name": full.get("name"),
            "model_class": full.get("model_class"),
            "model_type": full.get("model_type"),
            "hidden_size": full.get("hidden_size"),
            "library_version": full.get("version"),
        }
    )
    if isinstance(conf, str):
        architecture = "bottleneck" if conf.lower() in _AH_BOTTLENECK_NAMES else conf
        details["config_name"] = conf
        conf = {}
    elif isinstance(conf, dict):
        architecture = conf.get("architecture") or "bottleneck"
    else:
        raise InvalidArtifactError(f"{cfg_name}: the adapters-library config has no 'config' object")
    architecture = str(architecture)
    details["architecture"] = architecture
    details.update(_compact({k: conf.get(k) for k in _AH_KEYS}))
    details["adapter_config"] = _compact(conf)
    warnings: list[str] = []

    tensors: dict[str, TensorInfo] = {}
    weights = next((w for w in AH_WEIGHTS if w in tree.files), None)
    if weights is None:
        raise InvalidArtifactError(
            f"{cfg_name}: adapters-library adapter without weights (no adapter.safetensors or pytorch_adapter.bin)"
        )
    details["weights_file"] = prefix + weights
    if weights.endswith(".safetensors"):
        tensors = dict(_header(tree, weights, prefix + weights).tensors)
    else:
        details["weights_format"] = "pickle"
        warnings.append(
            f"{prefix}{weights} is a pickle and was not read: shapes, dtypes and the parameter count are unknown"
        )
    if AH_HEAD_CONFIG in tree.files:
        head = _load_json(tree, AH_HEAD_CONFIG, prefix + AH_HEAD_CONFIG)
        details["head"] = _compact({k: head.get(k) for k in ("name", "model_class", "model_type")}) | _compact(
            {k: (head.get("config") or {}).get(k) for k in ("head_type", "num_labels", "layers", "activation_function")}
        )
    head_weights = next((w for w in AH_HEAD_WEIGHTS if w in tree.files and w.endswith(".safetensors")), None)
    head_tensors = _header(tree, head_weights, prefix + head_weights).tensors if head_weights else {}

    # Bottleneck: ...adapters.<name>.adapter_down.<i>.weight is [bottleneck, hidden].
    sizes = sorted(
        {
            t.shape[0]
            for k, t in tensors.items()
            if ".adapter_down." in k and k.endswith(".weight") and len(t.shape) == 2
        }
    )
    if sizes:
        details["bottleneck_sizes"] = sizes
    modules: dict[str, list[int | None]] = {}
    ranks: dict[str, int] = {}
    for k, t in tensors.items():
        m = re.match(r"^(?P<mod>.+)\.loras\.[^.]+\.lora_(?P<ab>[AB])$", k)
        if m and len(t.shape) == 2:
            shape = modules.setdefault(m["mod"], [None, None])
            if m["ab"] == "A":
                shape[1] = t.shape[1]
                ranks[m["mod"]] = t.shape[0]
            else:
                shape[0] = t.shape[0]
    method = "BOTTLENECK" if architecture.lower() == "bottleneck" else architecture.upper()
    rank = max(ranks.values()) if ranks else (conf.get("r") if isinstance(conf.get("r"), int) else None)
    if ranks:
        details["module_ranks"] = dict(sorted(ranks.items()))
        want = conf.get("r")
        bad = sorted(m for m, r in ranks.items() if isinstance(want, int) and r != want)
        if bad:
            warnings.append(
                f"rank mismatch: {cfg_name} gives r={want} but {prefix + weights} holds rank {ranks[bad[0]]} for {bad[0]}"
            )
    alpha = _num(conf.get("alpha")) if architecture.lower() == "lora" else None
    fingerprint: dict[str, Any] = {
        "modules": dict(sorted(modules.items())),
        "base_model": full.get("model_name") or None,
    }
    if isinstance(full.get("hidden_size"), int):
        fingerprint["hidden_size"] = full["hidden_size"]
    all_tensors = list(tensors.values()) + list(head_tensors.values())
    return Inspection(
        kind="adapter",
        format="adapters",
        method=method,
        base_model=full.get("model_name") or None,
        rank=rank,
        alpha=alpha,
        dtypes=_dtype_names(all_tensors),
        params=sum(t.numel for t in all_tensors),
        details=details,
        fingerprint=fingerprint,
        warnings=warnings,
    )


def _is_adapters_lib(config: Mapping[str, Any], tree: _Tree) -> bool:
    if "peft_type" in config:
        return False
    return "config" in config and (
        any(w in tree.files for w in AH_WEIGHTS)
        or "model_name" in config
        or str(config.get("version", "")).startswith("adapters.")
    )


def _inspect_adapter_dir(tree: _Tree, prefix: str = "") -> Inspection:
    config = _load_json(tree, PEFT_CONFIG, prefix + PEFT_CONFIG)
    if "peft_type" in config:
        return _inspect_peft(tree, prefix)
    if _is_adapters_lib(config, tree):
        return _inspect_adapters_lib(tree, prefix)
    raise InvalidArtifactError(
        f"{prefix}{PEFT_CONFIG}: neither a PEFT adapter config (no peft_type) nor an adapters-library config (no config)"
    )


def _summary(info: Inspection) -> dict[str, Any]:
    return _compact(
        {
            "format": info.format,
            "method": info.method,
            "base_model": info.base_model,
            "rank": info.rank,
            "alpha": info.alpha,
            "task_type": info.task_type,
            "params": info.params,
            "target_modules": info.details.get("target_modules"),
            "weights_file": info.details.get("weights_file"),
        }
    )


def _with_named_adapters(tree: _Tree, primary: Inspection | None, names: list[str]) -> Inspection:
    """Merge the root adapter (if any) with the adapters saved in subfolders."""
    subs = {n: _inspect_adapter_dir(tree.under(n), n + "/") for n in names}
    if primary is None and len(subs) == 1:
        ((name, primary),) = subs.items()
        primary.details["adapter_name"] = name
        primary.details["adapters"] = {name: _summary(primary)}
        return primary
    if primary is None:
        infos = list(subs.values())

        def common(attr: str) -> Any:
            vals = {json.dumps(getattr(i, attr), sort_keys=True) for i in infos}
            return getattr(infos[0], attr) if len(vals) == 1 else None

        modules: dict[str, Any] = {}
        for i in infos:
            modules.update((i.fingerprint or {}).get("modules") or {})
        primary = Inspection(
            kind="adapter",
            format=common("format") or infos[0].format,
            method=common("method"),
            base_model=common("base_model"),
            base_revision=common("base_revision"),
            rank=max((i.rank for i in infos if i.rank is not None), default=None),
            alpha=common("alpha"),
            task_type=common("task_type"),
            dtypes=sorted({d for i in infos for d in i.dtypes}),
            params=sum(i.params for i in infos),
            fingerprint={"modules": dict(sorted(modules.items())), "base_model": common("base_model")},
            details={},
            warnings=[w for i in infos for w in i.warnings],
        )
    else:
        primary.params += sum(i.params for i in subs.values())
        primary.dtypes = sorted(set(primary.dtypes).union(*(i.dtypes for i in subs.values())))
        primary.warnings += [w for i in subs.values() for w in i.warnings]
    primary.details["adapters"] = {n: _summary(i) for n, i in subs.items()}
    return primary


# --------------------------------------------------------------------------- checkpoints


@dataclass
class _Weights:
    headers: list[SafetensorsHeader]
    tensors: dict[str, TensorInfo]
    where: dict[str, SafetensorsHeader]  # tensor -> header it lives in
    details: dict[str, Any]
    warnings: list[str]


def _read_checkpoint_weights(tree: _Tree, rels: list[str] | None = None) -> _Weights:
    details: dict[str, Any] = {}
    warnings: list[str] = []
    headers: list[SafetensorsHeader] = []
    if rels is None and HF_INDEX in tree.files:
        index = _load_json(tree, HF_INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InvalidArtifactError(f"{HF_INDEX}: no weight_map")
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            if not isinstance(shard, str):
                raise InvalidArtifactError(f"{HF_INDEX}: weight_map entry for {key!r} is not a file name")
            try:
                check_relpath(shard)
            except UnsafePathError as e:
                raise UnsafePathError(f"{HF_INDEX}: weight_map entry for {key!r}: {e}") from None
            shards.setdefault(shard, []).append(key)
        for shard in shards:
            if shard not in tree.files:
                raise InvalidArtifactError(
                    f"{HF_INDEX}: shard {shard} is missing (it holds {len(shards[shard])} tensors)"
                )
        headers = [_header(tree, s) for s in sorted(shards)]
        for h in headers:
            missing = [k for k in shards[h.name] if k not in h.tensors]
            if missing:
                raise InvalidArtifactError(
                    f"{HF_INDEX}: tensor {missing[0]!r} is indexed in {h.name} but that shard does not hold it"
                    + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
                )
            extra = [k for k in h.tensors if weight_map.get(k) != h.name]
            if extra:
                warnings.append(f"{h.name} holds {len(extra)} tensors that {HF_INDEX} does not list (e.g. {extra[0]})")
        stray = sorted(r for r in tree.files if r.endswith(".safetensors") and r not in shards and "/" not in r)
        if stray:
            warnings.append(f"safetensors files not named in {HF_INDEX}: {', '.join(stray)}")
        details["shards"] = len(headers)
        meta = index.get("metadata") or {}
        for k in ("total_size", "total_parameters"):
            if meta.get(k) is not None:
                details[f"index_{k}"] = meta[k]
    else:
        if rels is None:
            rels = sorted(r for r in tree.files if r.endswith(".safetensors") and "/" not in r)
        headers = [_header(tree, r) for r in rels]
        if len(headers) > 1:
            details["shards"] = len(headers)
    tensors: dict[str, TensorInfo] = {}
    where: dict[str, SafetensorsHeader] = {}
    for h in headers:
        for k, t in h.tensors.items():
            if k in tensors:
                warnings.append(f"tensor {k!r} appears in both {where[k].name} and {h.name}")
            tensors[k] = t
            where[k] = h
    return _Weights(headers, tensors, where, details, warnings)


def _bnb_layout(w: _Weights) -> tuple[dict[str, Any], dict[str, list[int]], set[str]]:
    """What the tensors say about bitsandbytes quantization.

    Returns (facts, original shape by weight key, keys that are quantization
    statistics rather than weights).
    """
    facts: dict[str, Any] = {}
    shapes: dict[str, list[int]] = {}
    aux: set[str] = set()
    types: Counter[str] = Counter()
    blocksizes: set[int] = set()
    nested = False
    per_file: dict[str, list[str]] = {}
    for k in w.tensors:
        m = _BNB4_STATE.match(k)
        if m:
            per_file.setdefault(w.where[k].name, []).append(k)
    for h in w.headers:
        keys = per_file.get(h.name)
        if not keys:
            continue
        with open(h.path, "rb") as f:
            for k in keys:
                info = h.tensors[k]
                f.seek(info.start)
                raw = f.read(info.end - info.start)
                m = _BNB4_STATE.match(k)
                assert m is not None
                aux.add(k)
                try:
                    state = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise InvalidArtifactError(f"{h.name}: {k} does not hold bitsandbytes quant_state JSON") from None
                types[str(state.get("quant_type", m["t"]))] += 1
                if isinstance(state.get("blocksize"), int):
                    blocksizes.add(state["blocksize"])
                if "nested_blocksize" in state:
                    nested = True
                if isinstance(state.get("shape"), list):
                    shapes[m["w"]] = [int(x) for x in state["shape"]]
                for a in _BNB4_AUX:
                    if f"{m['w']}.{a}" in w.tensors:
                        aux.add(f"{m['w']}.{a}")
    int8 = 0
    for k in w.tensors:
        if k.endswith(".SCB"):
            aux.add(k)
            mod = k[: -len(".SCB")]
            if f"{mod}.weight" in w.tensors and w.tensors[f"{mod}.weight"].dtype == "I8":
                int8 += 1
        elif k.endswith(".weight_format"):
            aux.add(k)
    if types:
        facts["quant_type"] = types.most_common(1)[0][0]
        if len(types) > 1:
            facts["quant_types"] = dict(types)
        facts["bits"] = 4
        facts["quantized_modules"] = sum(types.values())
        if blocksizes:
            facts["block_size"] = max(blocksizes) if len(blocksizes) > 1 else next(iter(blocksizes))
            if len(blocksizes) > 1:
                facts["block_sizes"] = sorted(blocksizes)
        facts["double_quant"] = nested
    elif int8:
        facts["quant_type"] = "int8"
        facts["bits"] = 8
        facts["quantized_modules"] = int8
    return facts, shapes, aux


def _quant_from_config(qc: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    method = str(qc.get("quant_method") or "").lower()
    if hasattr(qc.get("quant_method"), "value"):
        method = str(qc["quant_method"].value).lower()
    d: dict[str, Any] = {"method": method or None}
    if method == "bitsandbytes" or (not method and ("load_in_4bit" in qc or "load_in_8bit" in qc)):
        d["method"] = "bitsandbytes"
        if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            q = str(qc.get("bnb_4bit_quant_type") or "fp4").lower()
            d.update(
                _compact(
                    {
                        "bits": 4,
                        "double_quant": bool(qc.get("bnb_4bit_use_double_quant")),
                        "compute_dtype": qc.get("bnb_4bit_compute_dtype"),
                        "quant_storage": qc.get("bnb_4bit_quant_storage"),
                    }
                )
            )
        elif qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
            q = "int8"
            d.update(
                _compact(
                    {
                        "bits": 8,
                        "threshold": qc.get("llm_int8_threshold"),
                        "has_fp16_weight": qc.get("llm_int8_has_fp16_weight"),
                    }
                )
            )
        else:
            q = None
        skipped = qc.get("llm_int8_skip_modules")
        if skipped:
            d["skipped_modules"] = list(skipped)
        return q, d
    if method in ("gptq", "awq"):
        d.update(
            _compact(
                {
                    "bits": qc.get("bits", qc.get("w_bit")),
                    "group_size": qc.get("group_size", qc.get("q_group_size")),
                    "desc_act": qc.get("desc_act"),
                    "sym": qc.get("sym"),
                    "zero_point": qc.get("zero_point"),
                    "version": qc.get("version"),
                    "backend": qc.get("backend"),
                    "checkpoint_format": qc.get("checkpoint_format"),
                    "skipped_modules": qc.get("modules_to_not_convert"),
                }
            )
        )
        return method, d
    if method:
        d.update(
            _compact(
                {
                    "bits": qc.get("bits"),
                    "group_size": qc.get("group_size"),
                    "skipped_modules": qc.get("modules_to_not_convert"),
                }
            )
        )
        return method, d
    return None, d


_CONFIG_HIGHLIGHTS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "torch_dtype",
    "dtype",
    "tie_word_embeddings",
    "rope_theta",
    "n_embd",
    "n_layer",
    "n_head",
    "d_model",
    "num_layers",
    "transformers_version",
)


def _inspect_checkpoint(tree: _Tree, card: _Card) -> Inspection:
    config = _load_json(tree, HF_CONFIG) if HF_CONFIG in tree.files else None
    warnings: list[str] = []
    details: dict[str, Any] = {}
    pickles = sorted(r for r in tree.files if "/" not in r and _is_pickle(r))
    has_st = HF_INDEX in tree.files or any(r.endswith(".safetensors") and "/" not in r for r in tree.files)
    if has_st:
        w = _read_checkpoint_weights(tree)
    else:
        w = _Weights([], {}, {}, {}, [])
        if pickles:
            details["weights_format"] = "pickle"
            warnings.append(
                f"weights are pickled ({', '.join(pickles)}) and were not read: shapes, dtypes and the parameter count are unknown"
            )
        else:
            warnings.append("config.json without any weights file")
    details.update(w.details)
    warnings.extend(w.warnings)

    facts, bnb_shapes, aux = _bnb_layout(w)
    quant: str | None = None
    qdetails: dict[str, Any] = {}
    qc = (config or {}).get("quantization_config")
    if isinstance(qc, dict):
        quant, qdetails = _quant_from_config(qc)
    if facts:
        layout_q = facts["quant_type"]
        if quant is not None and qdetails.get("method") == "bitsandbytes" and quant != layout_q:
            warnings.append(
                f"config.json quantization_config says {quant} but the tensors are {layout_q}-quantized; reporting {layout_q}"
            )
        elif quant is None:
            warnings.append(
                f"tensors are bitsandbytes {layout_q}-quantized but config.json has no bitsandbytes quantization_config"
            )
        if (
            qdetails.get("method") == "bitsandbytes"
            and "double_quant" in qdetails
            and "double_quant" in facts
            and qdetails["double_quant"] != facts["double_quant"]
        ):
            warnings.append(
                f"config.json says bnb_4bit_use_double_quant={qdetails['double_quant']} but the tensors "
                f"{'have' if facts['double_quant'] else 'lack'} nested absmax statistics"
            )
        quant = layout_q
        qdetails["method"] = "bitsandbytes"
        qdetails.update({k: v for k, v in facts.items() if k != "quant_type"})
        if "double_quant" in facts:
            qdetails["double_quant"] = facts["double_quant"]
    elif quant is not None and qdetails.get("method") == "bitsandbytes" and w.tensors:
        warnings.append(f"config.json says bitsandbytes {quant} but no tensor is stored quantized")
    if quant is not None:
        qdetails["type"] = quant
        details["quantization"] = _compact(qdetails)

    modules: dict[str, list[int]] = {}
    params = 0
    for k, t in w.tensors.items():
        if k in aux:
            continue
        shape = bnb_shapes[k] if k in bnb_shapes else list(t.shape)
        params += math.prod(shape)
        if k.endswith(".weight") and len(shape) == 2:
            modules[k[: -len(".weight")]] = shape
    if facts.get("bits") == 4:
        skipped = sorted(m for m in modules if m + ".weight" not in bnb_shapes)
        if skipped:
            qdetails_out = details.setdefault("quantization", {})
            qdetails_out["unquantized_modules"] = skipped

    fmt = "transformers"
    if config is None:
        fmt = "safetensors"
        warnings.append("no config.json: a bare safetensors checkpoint; architecture and sizes are unknown")
    cfg = config or {}
    fingerprint = checkpoint_fingerprint(cfg, modules) if (w.tensors or config) else None
    if config is not None:
        details["architecture"] = fingerprint["architecture"] if fingerprint else None
        details["config"] = _compact({k: cfg.get(k) for k in _CONFIG_HIGHLIGHTS})
    details["tensors"] = len(w.tensors)
    card_d = _card_details(card)
    if card_d:
        details["card"] = card_d

    kind = "checkpoint"
    if quant is not None:
        kind = "quantized"
    elif card.relation == "merged":
        kind = "merged"
    elif card.relation == "quantized":
        kind = "quantized"
        warnings.append("the model card says base_model_relation: quantized but no quantization was found")
    elif card.relation == "adapter":
        warnings.append("the model card says base_model_relation: adapter but this directory is a full checkpoint")
    base_models = card.base_models
    if len(base_models) > 1:
        details["base_models"] = base_models
    dtype_src = [t for k, t in w.tensors.items() if k not in aux]
    return Inspection(
        kind=kind,
        format=fmt,
        base_model=base_models[0] if base_models else None,
        quant=quant,
        dtypes=_dtype_names(dtype_src),
        params=params,
        details=details,
        fingerprint=fingerprint,
        warnings=warnings,
    )


# --------------------------------------------------------------------------- GGUF


def _inspect_gguf_files(tree: _Tree, rels: list[str]) -> Inspection:
    from adapterhub.inspect.gguf import inspect_gguf

    return inspect_gguf(tree.files, rels)


# --------------------------------------------------------------------------- entry point


def _not_an_artifact(root: Path) -> InvalidArtifactError:
    return InvalidArtifactError(
        f"{root} is not an artifact: no adapter_config.json, config.json, *.safetensors or *.gguf",
        hint="point at an adapter directory, a checkpoint directory or a .gguf file",
    )


def inspect_path(path: str | os.PathLike) -> Inspection:
    """Inspect an adapter, checkpoint or GGUF file/directory without loading tensors.

    Raises ``NotFoundError`` for a missing path, ``UnsafePathError`` for
    symlinks or index entries that escape the directory, and
    ``InvalidArtifactError`` (naming the file) for anything unreadable.
    """
    root = Path(path)
    listed = list_files(root)
    tree = _Tree(root, dict(listed), is_file=root.is_file())
    info = _dispatch(tree, root)
    info.files = list(tree.files)
    info.size = tree.size
    return info


def _dispatch(tree: _Tree, root: Path) -> Inspection:
    if tree.is_file:
        (rel,) = tree.files
        if rel.endswith(".gguf"):
            return _inspect_gguf_files(tree, [rel])
        if rel.endswith(".safetensors"):
            return _inspect_checkpoint(tree, _Card())
        raise InvalidArtifactError(
            f"{root} is not an artifact: a single file must be .gguf or .safetensors",
            hint="point at the directory that holds it",
        )
    top = tree.top()
    sub_adapters = sorted({r.split("/")[0] for r in tree.files if r.count("/") == 1 and r.endswith("/" + PEFT_CONFIG)})
    card = _read_card(tree)
    if PEFT_CONFIG in top:
        info = _inspect_adapter_dir(tree)
        if sub_adapters:
            info = _with_named_adapters(tree, info, sub_adapters)
    elif sub_adapters and HF_CONFIG not in top:
        info = _with_named_adapters(tree, None, sub_adapters)
    elif HF_CONFIG in top or HF_INDEX in top or any(r.endswith(".safetensors") for r in top):
        return _inspect_checkpoint(tree, card)
    else:
        ggufs = [r for r in top if r.endswith(".gguf")]
        if ggufs:
            return _inspect_gguf_files(tree, ggufs)
        raise _not_an_artifact(root)
    # Adapters: model-card facts that the configs do not carry.
    if card.meta:
        info.details["card"] = _card_details(card)
        if info.base_model is None and card.base_models:
            info.base_model = card.base_models[0]
            if info.fingerprint is not None:
                info.fingerprint["base_model"] = info.base_model
    if card.qlora is not None:
        info.details["trained_on_quant_config"] = card.qlora
        q = _quant_from_qlora_block(card.qlora)
        if q:
            info.details["trained_on_quant"] = q
    return info
