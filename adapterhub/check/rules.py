"""Is this adapter compatible with this base? A static check from headers only.

:func:`check` resolves both inputs (a directory, a registry ref or a Hub id in
the local Hugging Face cache), reads their JSON files and safetensors headers,
and runs the rules in :data:`RULES`. It never loads a model and never imports
torch, transformers or peft. The one read of tensor data is the adapter's own
tensors (small next to the base), scanned with numpy for non-finite values and
all-zero LoRA B matrices.

Each rule gives ``pass``, ``warning``, ``error`` or ``skipped`` (does not apply),
with findings of severity ``error``, ``warning`` or ``info``. An error means
the adapter does not fit this base; a warning means it fits but something
deserves a look; info is context (a dtype that is fine, a resized
vocabulary the adapter carries).

The shape rules follow the merge's own plan (``converters.deltas``): the
adapter's tensors become per-module operations, which are bound to the base's
tensor names (with the same prefix matching) and checked one by one, so every
problem is listed rather than the first. Methods the merge does not handle
(prompt tuning, OFT, ``adapters``-library adapters, ...) are checked against the
base fingerprint instead (:func:`adapterhub.inspect.fingerprint_matches`).

>>> report = check("out/qa-lora", base="team/llama-7b")   # doctest: +SKIP
>>> report.status, [r.id for r in report.rules if r.status != "pass"]   # doctest: +SKIP
('warnings', ['dtype'])
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.inspect.safetensors import SafetensorsHeader, TensorInfo, read_header
from adapterhub.artifact import Inspection
from adapterhub.errors import InvalidArtifactError
from adapterhub.sources import Source, resolve_base, resolve_source

if TYPE_CHECKING:
    from adapterhub.registry import Registry

__all__ = ["RULES", "CheckReport", "Finding", "RuleResult", "check"]

SCHEMA = "adapterhub.check/1"

#: Rule ids (stable: CI configurations and JUnit reports refer to them) and what each checks.
RULES: dict[str, str] = {
    "target-modules": "every module the adapter changes exists in the base",
    "shapes": "every adapter tensor fits the base tensor it applies to",
    "base-identity": "the base is the one the adapter records (name, revision, fingerprint)",
    "dtype": "the adapter's dtype goes with the base's",
    "tied-embeddings": "no delta on an embedding or lm_head that the base ties",
    "resized-vocab": "the vocabularies agree, or the adapter carries its resized embeddings",
    "qlora-base": "a QLoRA-trained adapter is checked against a 4-bit base",
    "peft-config": "the installed peft knows every key of adapter_config.json",
    "finite-weights": "no inf or NaN in the adapter's tensors",
    "untrained-lora": "no LoRA B matrix is all zero",
}

ERROR, WARNING, INFO = "error", "warning", "info"
_RANK = {ERROR: 3, WARNING: 2, INFO: 1}

# bitsandbytes statistics stored beside quantized weights: not weights of the model.
_BNB_AUX = re.compile(r"\.(absmax|quant_map|nested_absmax|nested_quant_map|SCB|weight_format|quant_state\..+)$")
_HALF = {"float16", "bfloat16"}
_FLOATS = {"float16", "bfloat16", "float32", "float64"}
_SHA = re.compile(r"^[0-9a-f]{40}$")
# init_lora_weights values that rewrite the base too (as converters.deltas refuses them).
_RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Finding:
    severity: str  # error | warning | info
    message: str
    module: str | None = None  # the module or tensor it is about
    file: str | None = None  # the adapter file it is about (relative path)

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "message": self.message, "module": self.module, "file": self.file}


@dataclass(frozen=True)
class RuleResult:
    id: str
    status: str  # pass | warning | error | skipped
    summary: str
    findings: tuple[Finding, ...] = ()

    @property
    def title(self) -> str:
        return RULES[self.id]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "status": self.status,
            "summary": self.summary,
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass(frozen=True)
class CheckReport:
    adapter: dict[str, Any]  # where it came from and what it is
    base: dict[str, Any]
    rules: tuple[RuleResult, ...]
    peft_version: str | None = None
    notes: tuple[str, ...] = ()  # inspection warnings of either input
    seconds: float = 0.0

    @property
    def errors(self) -> int:
        return sum(r.status == "error" for r in self.rules)

    @property
    def warnings(self) -> int:
        return sum(r.status == "warning" for r in self.rules)

    @property
    def ok(self) -> bool:
        """True when nothing makes the adapter incompatible (warnings allowed)."""
        return self.errors == 0

    @property
    def status(self) -> str:
        return "incompatible" if self.errors else "warnings" if self.warnings else "ok"

    def exit_code(self, strict: bool = False) -> int:
        """0 compatible, 1 incompatible, 9 warnings only when ``strict``."""
        from adapterhub.errors import CHECK_WARNINGS_EXIT

        if self.errors:
            return 1
        return CHECK_WARNINGS_EXIT if strict and self.warnings else 0

    def rule(self, rule_id: str) -> RuleResult:
        for r in self.rules:
            if r.id == rule_id:
                return r
        raise KeyError(rule_id)

    def to_dict(self) -> dict[str, Any]:
        counts = {s: sum(r.status == s for r in self.rules) for s in ("pass", "warning", "error", "skipped")}
        return {
            "schema": SCHEMA,
            "status": self.status,
            "ok": self.ok,
            "counts": counts,
            "adapter": self.adapter,
            "base": self.base,
            "peft_version": self.peft_version,
            "rules": [r.to_dict() for r in self.rules],
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }


def _result(rule_id: str, findings: Iterable[Finding], ok_summary: str) -> RuleResult:
    fs = tuple(findings)
    worst = max((_RANK[f.severity] for f in fs), default=0)
    if worst >= _RANK[WARNING]:
        level = ERROR if worst == _RANK[ERROR] else WARNING
        hits = [f for f in fs if f.severity == level]
        more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
        return RuleResult(rule_id, level, hits[0].message + more, fs)
    return RuleResult(rule_id, "pass", ok_summary, fs)


def _skipped(rule_id: str, why: str) -> RuleResult:
    return RuleResult(rule_id, "skipped", why)


# --------------------------------------------------------------------------- inputs


@dataclass
class _Side:
    src: Source
    info: Inspection
    config: dict[str, Any]


def _inspect_source(src: Source) -> Inspection:
    # Inspection works on a relpath -> file map, so registry blobs are read in place.
    from adapterhub.inspect import _dispatch, _Tree

    root = src.root or Path(src.spec)
    return _dispatch(_Tree(root, dict(src.files), is_file=src.root is not None and src.root.is_file()), root)


def _read_json(src: Source, rel: str) -> dict[str, Any]:
    p = src.files.get(rel)
    if p is None:
        return {}
    try:
        data = json.loads(Path(p).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArtifactError(f"{rel}: malformed JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _load_adapter(spec: str | os.PathLike, registry: Registry | None) -> _Side:
    src = resolve_source(spec, registry)
    info = _inspect_source(src)
    if info.kind != "adapter":
        raise InvalidArtifactError(
            f"{os.fspath(spec)} is a {info.kind}, not an adapter",
            hint="usage: adapterhub check ADAPTER --base BASE",
        )
    if "adapter_config.json" not in src.files:
        names = ", ".join(info.details.get("adapters") or {})
        if names:
            raise InvalidArtifactError(
                f"{os.fspath(spec)} holds named adapters ({names}) and none at its top level",
                hint="check one of them: pass its subfolder",
            )
        raise InvalidArtifactError(f"not supported yet: checking a {info.format} adapter ({os.fspath(spec)})")
    return _Side(src, info, _read_json(src, "adapter_config.json"))


def _load_base(spec: str | os.PathLike | None, adapter: _Side, registry: Registry | None) -> tuple[_Side, bool]:
    defaulted = spec is None
    src = resolve_base(adapter.src, spec, registry)
    info = _inspect_source(src)
    shown = os.fspath(spec) if spec is not None else src.spec
    if info.kind == "adapter":
        raise InvalidArtifactError(f"the base {shown} is an adapter, not a model", hint="pass the base model with --base")
    if info.kind == "gguf":
        raise InvalidArtifactError(
            f"not supported yet: checking against a GGUF base ({shown})",
            hint="check against the safetensors checkpoint the GGUF file was made from",
        )
    return _Side(src, info, _read_json(src, "config.json")), defaulted


def _base_tensors(base: _Side) -> dict[str, TensorInfo] | None:
    """Every tensor of the base checkpoint by name, or None when its weights are pickled."""
    from adapterhub.inspect import _read_checkpoint_weights, _Tree

    src = base.src
    if not any(r.endswith(".safetensors") and "/" not in r for r in src.files):
        return None
    root = src.root or Path(src.spec)
    return _read_checkpoint_weights(_Tree(root, dict(src.files))).tensors


def _logical_shapes(tensors: Mapping[str, TensorInfo], fingerprint: Mapping[str, Any] | None) -> dict[str, tuple[int, ...]]:
    """Base shapes as the model sees them: bitsandbytes weights at their original shape, statistics left out."""
    modules = (fingerprint or {}).get("modules") or {}
    out: dict[str, tuple[int, ...]] = {}
    for k, t in tensors.items():
        if _BNB_AUX.search(k):
            continue
        mod = k[: -len(".weight")] if k.endswith(".weight") else None
        out[k] = tuple(modules[mod]) if mod is not None and mod in modules else t.shape
    return out


# --------------------------------------------------------------------------- the plan (target-modules, shapes, tied, vocab)


@dataclass
class _PlanOutcome:
    """What binding the adapter's operations to the base found."""

    mode: str  # "plan" (merge's own plan), "fingerprint" (methods the merge does not handle), "none"
    why: str = ""  # for "fingerprint"/"none": the reason
    modules: int = 0  # adapted modules considered
    tensors: int = 0  # adapter tensors considered
    missing: list[Finding] = field(default_factory=list)
    shapes: list[Finding] = field(default_factory=list)
    vocab: list[Finding] = field(default_factory=list)
    tied: list[Finding] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)
    resized: dict[str, tuple[int, int]] = field(default_factory=dict)  # base tensor -> (base rows, adapter rows)


def _plan(
    adapter: _Side,
    base: _Side,
    header: SafetensorsHeader | None,
    base_shapes: Mapping[str, tuple[int, ...]],
    weights_file: str | None,
) -> _PlanOutcome:
    from adapterhub.converters.formats import peft_math

    shapes = {k: t.shape for k, t in header.tensors.items()} if header is not None else {}
    try:
        peft_math.check_mergeable(adapter.config)
    except InvalidArtifactError as e:  # a method the merge does not handle: not an incompatibility
        return _PlanOutcome("fingerprint", why=str(e))
    try:
        aplan = peft_math.parse_adapter(adapter.config, shapes)
    except InvalidArtifactError as e:
        if str(e).startswith("not supported yet"):
            return _PlanOutcome("fingerprint", why=str(e))
        out = _PlanOutcome("plan", why="the adapter's own tensors do not fit together (see shapes)")
        out.shapes.append(Finding(ERROR, f"the adapter's own tensors do not fit together: {e}", file=weights_file))
        return out

    out = _PlanOutcome("plan", modules=len(aplan.modules), tensors=len(shapes))
    bcfg = base.config
    aliases = peft_math.tied_aliases(base_shapes, bcfg)
    known: dict[str, tuple[int, ...]] = dict(base_shapes)
    for alias, src in aliases.items():
        known[alias] = known[src]
    paths = [op.path for op in aplan.ops]
    # The merge's prefix matching (model., bert., ... on either side), done once for all operations.
    # When every path is a base tensor as it stands, that is the merge's choice too (it wins ties).
    best = peft_math.path_map(paths, known)

    new_shapes: dict[str, tuple[int, ...]] = {}
    touched: dict[str, list[Any]] = {}
    for op in sorted(aplan.ops, key=lambda o: o.kind != "replace"):  # replacements may resize
        key = peft_math.apply_map(op.path, best)
        if key is None or key not in known:
            if op.options.get("optional"):
                continue
            looked = key or op.path
            if op.kind == "lora_bias" and key is not None and key.removesuffix(".bias") + ".weight" in known:
                out.shapes.append(
                    Finding(
                        ERROR,
                        f"{op.module}: the adapter trained a LoRA bias but this layer of the base has no bias",
                        op.module,
                        weights_file,
                    )
                )
            elif op.kind == "replace":
                out.missing.append(
                    Finding(
                        ERROR,
                        f"saved tensor {op.tensors['value']} matches no tensor of the base (looked for {looked})",
                        op.module,
                        weights_file,
                    )
                )
            else:
                out.missing.append(
                    Finding(ERROR, f"{op.module}: not found in the base (looked for {looked})", op.module, weights_file)
                )
            continue
        touched.setdefault(key, []).append(op)
        have = new_shapes.get(key) or new_shapes.get(aliases.get(key, "")) or known[key]
        if op.kind == "replace":
            want = tuple(op.options["shape"])
            if want == have:
                continue
            if len(want) == 2 and len(have) == 2 and want[1] == have[1] and peft_math.is_vocab_tensor(key, bcfg, have):
                new_shapes[key] = want
                out.resized[key] = (have[0], want[0])
            else:
                out.shapes.append(
                    Finding(
                        ERROR,
                        f"{op.module}: the adapter saves {op.param} {list(want)} (modules_to_save or a saved layer), "
                        f"the base has {list(have)}",
                        op.module,
                        weights_file,
                    )
                )
            continue
        try:
            peft_math.bind_op(op, key, have, bcfg, None)
        except InvalidArtifactError as e:
            exp = op.expected
            if (
                op.kind in ("lora_embedding", "dora_embedding")
                and exp is not None
                and len(exp) == 2
                and len(have) == 2
                and exp[1] == have[1]
                and exp[0] != have[0]
            ):
                out.vocab.append(
                    Finding(
                        ERROR,
                        f"{op.module}: the embedding LoRA was trained on a vocabulary of {exp[0]}, the base has "
                        f"{have[0]}, and the adapter carries no resized embedding",
                        op.module,
                        weights_file,
                    )
                )
            elif str(e).startswith("not supported yet"):
                out.shapes.append(Finding(WARNING, f"{op.module}: not checked: {e}", op.module, weights_file))
            else:
                out.shapes.append(Finding(ERROR, str(e), op.module, weights_file))

    # Tied embeddings: a delta (or a module's own saved copy) on either side unties them, as the merge does.
    for alias, src in aliases.items():
        ops = touched.get(alias, []) + touched.get(src, [])
        if any(o.kind != "replace" or o.options.get("own_copy") for o in ops):
            out.untied.append(alias)
            mods = sorted({o.module for o in ops})
            out.tied.append(
                Finding(
                    WARNING,
                    f"the adapter changes {', '.join(mods)}, but the base ties {alias} to {src}: "
                    f"a merge unties them ({alias} written separately, tie_word_embeddings: false)",
                    mods[0],
                    weights_file,
                )
            )

    if not (out.missing or out.shapes or out.vocab) and out.resized:
        # The merge's whole plan catches a resized vocabulary that leaves another vocabulary tensor behind.
        try:
            peft_math.resolve_plan(aplan, base_shapes, bcfg)
        except InvalidArtifactError as e:
            out.vocab.append(Finding(ERROR, str(e), file=weights_file))
    return out


def _plan_from_fingerprint(adapter: _Side, base: _Side, why: str) -> _PlanOutcome:
    from adapterhub.inspect import fingerprint_matches

    out = _PlanOutcome("fingerprint", why=why)
    expect = adapter.info.fingerprint or {}
    out.modules = len(expect.get("modules") or {})
    for p in fingerprint_matches(expect, base.info.fingerprint):
        if p.startswith("missing module"):
            out.missing.append(Finding(ERROR, p, p.split()[2].rstrip(":")))
        else:
            out.shapes.append(Finding(ERROR, p))
    return out


# --------------------------------------------------------------------------- rules


def _rule_targets(plan: _PlanOutcome) -> RuleResult:
    if plan.mode == "none":
        return RuleResult("target-modules", "warning", f"not checked: {plan.why}")
    what = "adapted modules" if plan.mode == "plan" else "expected base modules (fingerprint)"
    if plan.mode == "plan" and plan.why:
        return _skipped("target-modules", f"not checked: {plan.why}")
    if plan.modules == 0 and not plan.missing:
        return _skipped("target-modules", "the adapter changes no base module")
    summary = f"all {plan.modules} {what} found in the base"
    return _result("target-modules", plan.missing, summary)


def _rule_shapes(plan: _PlanOutcome, method: str | None) -> RuleResult:
    if plan.mode == "none":
        return RuleResult("shapes", "warning", f"not checked: {plan.why}")
    if plan.mode == "plan":
        summary = f"{plan.tensors} adapter tensors fit the base"
    else:
        summary = f"{plan.modules} module shapes match the base fingerprint (no merge plan for {method})"
        if plan.modules == 0 and not plan.shapes:
            return _skipped("shapes", f"the adapter records no base shapes (no merge plan for {method})")
    return _result("shapes", plan.shapes, summary)


def _norm_name(name: str) -> str:
    return name.strip().rstrip("/").lower()


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.isabs(name)


def _base_names(base: _Side) -> list[str]:
    names = []
    if base.src.hub_id:
        names.append(base.src.hub_id)
    if base.src.ref:
        names.append(base.src.ref.split(":")[0])
    if base.src.root is not None:
        names.append(str(base.src.root))
    np_ = base.config.get("_name_or_path")
    if isinstance(np_, str) and np_:
        names.append(np_)
    return names


def _same_model(recorded: str, base: _Side) -> bool:
    rec = _norm_name(recorded)
    rec_tail = rec.rsplit("/", 1)[-1]
    if _looks_local(recorded) and base.src.root is not None:
        try:
            if Path(recorded).expanduser().resolve() == base.src.root.resolve():
                return True
        except OSError:
            pass
    for n in _base_names(base):
        n = _norm_name(n)
        if n == rec or n.rsplit("/", 1)[-1] == rec_tail:
            return True
    return False


def _rule_identity(adapter: _Side, base: _Side, defaulted: bool, plan: _PlanOutcome) -> RuleResult:
    findings: list[Finding] = []
    recorded = adapter.info.base_model
    rev = adapter.info.base_revision
    base_desc = base.src.describe()
    fp = base.info.fingerprint or {}
    name_ok = True
    if not recorded:
        findings.append(Finding(INFO, "the adapter records no base model name", file="adapter_config.json"))
    elif defaulted:
        findings.append(Finding(INFO, f"the base is the one the adapter names: {recorded}"))
    elif _same_model(recorded, base):
        findings.append(Finding(INFO, f"the adapter names {recorded}, which matches {base_desc}"))
    elif _looks_local(recorded):
        findings.append(
            Finding(
                INFO,
                f"the adapter records a local path as its base ({recorded}); the name cannot be compared with {base_desc}",
                file="adapter_config.json",
            )
        )
    else:
        name_ok = False
        findings.append(
            Finding(
                WARNING,
                f"the adapter was trained on {recorded}, but the base is {base_desc}",
                file="adapter_config.json",
            )
        )
    if rev:
        have = base.src.revision
        if have and (rev == have or (defaulted and not _SHA.match(rev))):
            findings.append(Finding(INFO, f"revision {rev} matches"))
        elif have and _SHA.match(rev) and _SHA.match(have):
            findings.append(
                Finding(WARNING, f"the adapter records base revision {rev}, the base is revision {have}", file="adapter_config.json")
            )
        else:
            findings.append(
                Finding(INFO, f"the adapter records base revision {rev}; the base's revision is not known here")
            )
    init = adapter.config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        findings.append(
            Finding(
                ERROR,
                f"the adapter was initialised with {init!r}, which also rewrites the base weights: it applies to that "
                "residual base, not to the original one (save it with path_initial_model_for_weight_conversion "
                "to get a plain LoRA)",
                file="adapter_config.json",
            )
        )
    problems = len(plan.missing) + sum(f.severity == ERROR for f in plan.shapes + plan.vocab)
    digest = str(fp.get("digest") or "")[:19]
    arch = fp.get("architecture") or "unknown architecture"
    if problems:
        findings.append(
            Finding(
                ERROR,
                f"the base ({arch}, fingerprint {digest or 'none'}) does not fit what the adapter expects: "
                f"{problems} problem{'s' if problems != 1 else ''} (see target-modules, shapes, resized-vocab)"
                + ("" if name_ok or not recorded else f"; the adapter was trained on {recorded}"),
            )
        )
    elif plan.mode == "none":
        findings.append(Finding(WARNING, f"the base's fingerprint was not compared: {plan.why}"))
    summary = f"fingerprint {digest or '(none)'} ({arch}) fits the adapter"
    if recorded and name_ok:
        summary = f"{recorded}; " + summary
    return _result("base-identity", findings, summary)


def _dtype_name(config: Mapping[str, Any]) -> str | None:
    for src in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}):
        for k in ("torch_dtype", "dtype"):
            v = src.get(k)
            if isinstance(v, str) and v:
                return v.removeprefix("torch.")
    return None


def _main_dtype(tensors: Iterable[TensorInfo]) -> str | None:
    by: dict[str, int] = {}
    for t in tensors:
        n = t.dtype_name
        if n in _FLOATS:
            by[n] = by.get(n, 0) + t.numel
    return max(by, key=lambda k: by[k]) if by else None


def _rule_dtype(adapter_dtypes: list[str], base_dtype: str | None, base_quant: str | None, weights_file: str | None) -> RuleResult:
    floats = sorted(d for d in adapter_dtypes if d in _FLOATS)
    if not floats:
        return _skipped("dtype", "the adapter has no floating-point tensors to compare")
    if base_dtype is None:
        return _skipped("dtype", "the base's dtype is not known (no readable weights or config dtype)")
    findings: list[Finding] = []
    for a in floats:
        if a == base_dtype:
            continue
        if {a, base_dtype} == _HALF:
            findings.append(
                Finding(
                    WARNING,
                    f"the adapter is {a} but the base is {base_dtype}: the two half-precision formats differ "
                    "(float16 overflows above 65504, bfloat16 keeps 8 mantissa bits), so the adapter probably "
                    f"trained on a {a} base and its values round differently here",
                    file=weights_file,
                )
            )
        elif a == "float32" or base_dtype == "float32" or a == "float64":
            findings.append(
                Finding(INFO, f"{a} adapter on a {base_dtype} base is fine: merges compute in float32 and cast to the base's dtype")
            )
        else:
            findings.append(Finding(INFO, f"{a} adapter on a {base_dtype} base"))
    shown = base_dtype + (f" (quantized {base_quant})" if base_quant else "")
    return _result("dtype", findings, f"adapter {', '.join(floats)}, base {shown}")


def _tokenizer_size(src: Source) -> tuple[int, str] | None:
    """(highest token id + 1, file) of the tokenizer the adapter ships, if any."""
    best: tuple[int, str] | None = None

    def note(n: int, rel: str) -> None:
        nonlocal best
        if best is None or n > best[0]:
            best = (n, rel)

    if "tokenizer.json" in src.files:
        tok = _read_json(src, "tokenizer.json")
        ids = [a.get("id") for a in tok.get("added_tokens") or [] if isinstance(a, dict)]
        vocab = (tok.get("model") or {}).get("vocab") if isinstance(tok.get("model"), dict) else None
        if isinstance(vocab, dict):
            ids += list(vocab.values())
        elif isinstance(vocab, list):
            ids.append(len(vocab) - 1)
        ints = [i for i in ids if isinstance(i, int)]
        if ints:
            note(max(ints) + 1, "tokenizer.json")
    if "added_tokens.json" in src.files:
        ints = [i for i in _read_json(src, "added_tokens.json").values() if isinstance(i, int)]
        if ints:
            note(max(ints) + 1, "added_tokens.json")
    return best


def _embedding_rows(base_shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]) -> tuple[str, int] | None:
    from adapterhub.converters.formats import peft_math

    for k, s in base_shapes.items():
        if peft_math.is_vocab_tensor(k, config, s) and k.rsplit(".", 2)[-2] in peft_math.INPUT_EMBEDDINGS:
            return k, s[0]
    return None


def _rule_vocab(adapter: _Side, base: _Side, plan: _PlanOutcome, base_shapes: Mapping[str, tuple[int, ...]]) -> RuleResult:
    findings = list(plan.vocab)
    for key, (old, new) in plan.resized.items():
        findings.append(
            Finding(
                INFO,
                f"the adapter carries a resized {key} ({old} -> {new} rows): a merge writes vocab_size {new}; "
                "load it with the adapter's tokenizer",
                key,
            )
        )
    emb = _embedding_rows(base_shapes, base.config)
    rows = None
    if emb is not None:
        rows = plan.resized.get(emb[0], (0, emb[1]))[1]
    tok = _tokenizer_size(adapter.src)
    if tok is not None and rows is not None and tok[0] > rows:
        findings.append(
            Finding(
                ERROR,
                f"the adapter's {tok[1]} has token ids up to {tok[0] - 1}, but the base's embeddings have {rows} rows "
                "and the adapter carries no resized embedding (save it with save_embedding_layers=True)",
                file=tok[1],
            )
        )
    vocab = base.config.get("vocab_size")
    if emb is None and tok is None and not findings:
        return _skipped("resized-vocab", "neither side has a token embedding or tokenizer to compare")
    summary = f"vocabulary {rows if rows is not None else vocab}" + (f", adapter tokenizer {tok[0]} tokens" if tok else "")
    return _result("resized-vocab", findings, summary)


def _rule_tied(plan: _PlanOutcome) -> RuleResult:
    if plan.mode != "plan":
        return _skipped("tied-embeddings", "no merge plan for this method" if plan.mode == "fingerprint" else plan.why)
    return _result("tied-embeddings", plan.tied, "no adapter delta on tied embeddings")


def _rule_qlora(adapter: _Side, base: _Side) -> RuleResult:
    from adapterhub.converters.formats import peft_math

    card = None
    if "README.md" in adapter.src.files:
        try:
            card = Path(adapter.src.files["README.md"]).read_text(encoding="utf-8", errors="replace")
        except OSError:
            card = None
    spec = peft_math.detect_qlora(adapter.config, card)
    trained = spec.quant_type if spec is not None else adapter.info.details.get("trained_on_quant")
    where = spec.source if spec is not None else "adapter model card"
    bq = base.info.quant
    findings: list[Finding] = []
    if trained and not bq:
        findings.append(
            Finding(
                WARNING,
                f"the adapter was trained on a bitsandbytes {trained} base ({where}) and this base is 16-bit: "
                "its outputs differ slightly from training; `adapterhub merge --qlora-base dequantized` merges "
                "into the weights it saw",
                file="README.md" if where == "adapter model card" else "adapter_config.json",
            )
        )
    elif trained and bq and bq != trained:
        findings.append(Finding(WARNING, f"the adapter was trained on a {trained} base ({where}), this base is {bq}"))
    elif trained:
        findings.append(Finding(INFO, f"trained on {trained} ({where}), and the base is {bq}"))
    elif bq:
        findings.append(
            Finding(
                INFO,
                f"the base is quantized ({bq}); PEFT loads adapters on it, but `adapterhub merge` needs the 16-bit base",
            )
        )
    summary = "no record of QLoRA training (PEFT 0.7 and later record none)" if not trained else f"trained on {trained}"
    return _result("qlora-base", findings, summary)


def _rule_peft_config(adapter: _Side) -> tuple[RuleResult, str | None]:
    from adapterhub.check.peft_fields import known_config_fields, peft_version

    if adapter.info.format != "peft":
        return _skipped("peft-config", f"not a PEFT adapter ({adapter.info.format})"), peft_version()
    peft_type = str(adapter.config.get("peft_type") or "")
    known = known_config_fields(peft_type)
    if known is None:
        return _skipped("peft-config", "peft is not installed, so there is nothing to compare the config with"), None
    saved_by = adapter.config.get("peft_version")
    by = f" (saved by peft {saved_by})" if saved_by else ""
    if not known.known_type:
        f = Finding(
            WARNING,
            f"the installed peft {known.version} does not know peft_type {peft_type}{by}: it cannot load this adapter",
            file="adapter_config.json",
        )
        return _result("peft-config", [f], ""), known.version
    unknown = sorted(k for k in adapter.config if k not in known.fields)
    findings = []
    if unknown:
        findings.append(
            Finding(
                WARNING,
                f"the installed peft {known.version} ignores {len(unknown)} unknown {known.config_class} "
                f"key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}{by}; upgrade peft to honour them",
                file="adapter_config.json",
            )
        )
    summary = f"peft {known.version} knows all {len(adapter.config)} keys ({known.config_class})"
    return _result("peft-config", findings, summary), known.version


# --------------------------------------------------------------------------- the one scan of tensor data

# safetensors dtype -> (numpy dtype to view the bytes as, mask of the exponent bits or None for a float view)
_VIEWS: dict[str, tuple[str, int | None]] = {
    "F64": ("<f8", None),
    "F32": ("<f4", None),
    "F16": ("<f2", None),
    "BF16": ("<u2", 0x7F80),  # numpy has no bfloat16: all-ones exponent bits mean inf or NaN
    "F8_E5M2": ("u1", 0x7C),
    "F8_E4M3": ("u1", 0x7F),  # e4m3fn has no inf; S.1111.111 is NaN
    "F8_E8M0": ("u1", 0xFF),
}
_CHUNK = 1 << 22  # elements per bit-twiddling step (bounded temporaries)
_READ_BYTES = 16 << 20  # the read buffer: tensors larger than this are scanned in pieces


def _nonfinite(arr: Any, mask: int | None) -> int:
    import numpy as np

    if mask is None:
        # Fast path: a finite sum proves every element finite; only a non-finite sum needs the exact count.
        acc = np.float32 if arr.dtype == np.float16 else arr.dtype
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(arr.sum(dtype=acc)):
                return 0
        return int(arr.size - np.count_nonzero(np.isfinite(arr)))
    n = 0
    for i in range(0, arr.size, _CHUNK):
        part = arr[i : i + _CHUNK]
        n += int(np.count_nonzero((part & mask) == mask))
    return n


def _is_zero(arr: Any, mask: int | None) -> bool:
    if mask is None:
        return not bool(arr.any())
    sign_off = 0x7FFF if arr.dtype.itemsize == 2 else 0x7F
    return not any(bool((arr[i : i + _CHUNK] & sign_off).any()) for i in range(0, arr.size, _CHUNK))


@dataclass
class _Scan:
    nonfinite: dict[str, int] = field(default_factory=dict)  # tensor -> count
    zero: set[str] = field(default_factory=set)  # of the tensors asked about
    tensors: int = 0
    bytes: int = 0


def _scan(header: SafetensorsHeader, zero_candidates: set[str]) -> _Scan:
    """Read every float tensor of the adapter once, in file order, through one reused buffer.

    A buffer rather than a memory map keeps the resident set at one chunk
    (a 150 MB adapter would otherwise stay mapped in full) at the same speed.
    """
    import numpy as np

    out = _Scan()
    todo = sorted(
        ((k, t) for k, t in header.tensors.items() if t.dtype in _VIEWS and t.numel), key=lambda kt: kt[1].start
    )
    if not todo:
        return out
    buf = bytearray(min(_READ_BYTES, max(t.end - t.start for _, t in todo)))
    with open(header.path, "rb", buffering=0) as f:
        for key, t in todo:
            dtype, mask = np.dtype(_VIEWS[t.dtype][0]), _VIEWS[t.dtype][1]
            step = len(buf) - len(buf) % dtype.itemsize
            bad, zero = 0, key in zero_candidates
            f.seek(t.start)
            pos = t.start
            while pos < t.end:
                n = min(step, t.end - pos)
                view = memoryview(buf)[:n]
                got = 0
                while got < n:
                    r = f.readinto(view[got:])
                    if not r:
                        raise InvalidArtifactError(f"{header.name}: unexpected end of file in tensor {key!r}")
                    got += r
                arr = np.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize)
                bad += _nonfinite(arr, mask)
                if zero and not _is_zero(arr, mask):
                    zero = False
                del arr, view
                pos += n
            out.tensors += 1
            out.bytes += t.end - t.start
            if bad:
                out.nonfinite[key] = bad
            if zero:
                out.zero.add(key)
    return out


_ZERO_INIT = re.compile(r"^(.+)\.(?:lora_B|lora_embedding_A)(?:\.[^.]+){0,2}$")


def _zero_candidates(header: SafetensorsHeader | None, method: str | None) -> dict[str, str]:
    """LoRA-family tensors that PEFT initialises to zero (B, or A for embeddings): key -> module."""
    if header is None or method not in ("LORA", "DORA", "ADALORA"):
        return {}
    out = {}
    for k in header.tensors:
        # lora_B.weight (LoRA), lora_B (AdaLoRA), lora_embedding_A; raw state dicts keep the adapter name.
        m = _ZERO_INIT.match(k)
        if m and not k.endswith(".bias"):
            out[k] = m.group(1).removeprefix("base_model.model.")
    return out


def _rule_finite(scan: _Scan | None, why: str, weights_file: str | None) -> RuleResult:
    if scan is None:
        return RuleResult("finite-weights", "warning", f"not checked: {why}") if why else _skipped("finite-weights", "no tensors")
    findings = [
        Finding(ERROR, f"{k}: {n} non-finite value{'s' if n > 1 else ''} (inf or NaN)", k, weights_file)
        for k, n in scan.nonfinite.items()
    ]
    return _result("finite-weights", findings, f"{scan.tensors} tensors ({scan.bytes / 1e6:.1f} MB) are finite")


def _rule_untrained(scan: _Scan | None, cands: Mapping[str, str], method: str | None, weights_file: str | None) -> RuleResult:
    if method not in ("LORA", "DORA", "ADALORA"):
        return _skipped("untrained-lora", f"applies to LoRA adapters, not {method or 'this adapter'}")
    if scan is None or not cands:
        return _skipped("untrained-lora", "no LoRA B tensors were read")
    zero = sorted(cands[k] for k in scan.zero)
    if not zero:
        return _result("untrained-lora", [], f"all {len(cands)} LoRA B matrices are non-zero")
    if len(zero) == len(cands):
        msg = (
            f"every LoRA B matrix ({len(cands)}) is all zero: the adapter is untrained (PEFT's initial state) "
            "and changes nothing"
        )
    else:
        shown = ", ".join(zero[:5]) + (f" and {len(zero) - 5} more" if len(zero) > 5 else "")
        msg = f"{len(zero)} of {len(cands)} LoRA B matrices are all zero, so these modules change nothing: {shown}"
    return _result("untrained-lora", [Finding(WARNING, msg, zero[0], weights_file)], "")


# --------------------------------------------------------------------------- entry point


def _describe(side: _Side, extra: Mapping[str, Any]) -> dict[str, Any]:
    d = side.src.to_dict()
    d.update({k: v for k, v in extra.items() if v is not None})
    return d


def check(
    adapter: str | os.PathLike,
    base: str | os.PathLike | None = None,
    registry: Registry | None = None,
) -> CheckReport:
    """Check ``adapter`` against ``base`` (default: the base its config names) without loading either.

    Raises ``NotFoundError`` or ``InvalidArtifactError`` when an input cannot
    be resolved or read; every compatibility problem is a rule result instead.
    """
    t0 = time.perf_counter()
    a = _load_adapter(adapter, registry)
    b, defaulted = _load_base(base, a, registry)

    weights_file = a.info.details.get("weights_file")
    header: SafetensorsHeader | None = None
    if isinstance(weights_file, str) and weights_file.endswith(".safetensors") and weights_file in a.src.files:
        header = read_header(a.src.files[weights_file], weights_file)

    base_tensors = _base_tensors(b)
    if base_tensors is None:
        plan = _PlanOutcome("none", why="the base's weights are not safetensors, so their shapes are unknown")
        base_shapes: dict[str, tuple[int, ...]] = {}
    else:
        base_shapes = _logical_shapes(base_tensors, b.info.fingerprint)
        if header is None and a.info.format == "peft":
            plan = _PlanOutcome("none", why=f"the adapter's weights ({weights_file}) are a pickle; convert them to safetensors")
        else:
            plan = _plan(a, b, header, base_shapes, weights_file)
            if plan.mode == "fingerprint":
                plan = _plan_from_fingerprint(a, b, plan.why)

    method = a.info.method
    cands = _zero_candidates(header, method)
    scan = _scan(header, set(cands)) if header is not None else None
    scan_why = "" if header is not None else f"the adapter's weights ({weights_file}) are not safetensors"

    base_dtype = _main_dtype(t for k, t in (base_tensors or {}).items() if not _BNB_AUX.search(k)) or _dtype_name(b.config)
    peft_rule, peft_ver = _rule_peft_config(a)
    rules = (
        _rule_targets(plan),
        _rule_shapes(plan, method),
        _rule_identity(a, b, defaulted, plan),
        _rule_dtype(a.info.dtypes, base_dtype, b.info.quant, weights_file),
        _rule_tied(plan),
        _rule_vocab(a, b, plan, base_shapes),
        _rule_qlora(a, b),
        peft_rule,
        _rule_finite(scan, scan_why, weights_file),
        _rule_untrained(scan, cands, method, weights_file),
    )
    fp = b.info.fingerprint or {}
    return CheckReport(
        adapter=_describe(
            a,
            {
                "method": method,
                "rank": a.info.rank,
                "base_model": a.info.base_model,
                "base_revision": a.info.base_revision,
                "dtypes": a.info.dtypes,
                "weights_file": weights_file,
                "modules": plan.modules,
            },
        ),
        base=_describe(
            b,
            {
                "kind": b.info.kind,
                "architecture": fp.get("architecture"),
                "fingerprint": fp.get("digest"),
                "dtype": base_dtype,
                "quant": b.info.quant,
                "vocab_size": b.config.get("vocab_size"),
                "tensors": len(base_tensors) if base_tensors is not None else None,
                "defaulted": defaulted,
            },
        ),
        rules=rules,
        peft_version=peft_ver,
        notes=tuple([f"adapter: {w}" for w in a.info.warnings] + [f"base: {w}" for w in b.info.warnings]),
        seconds=time.perf_counter() - t0,
    )
