"""Is this adapter compatible with this base? A static check from headers only.

:func:`check` resolves both inputs (a directory, a registry ref or a Hub id in
the local Hugging Face cache), reads their JSON files and safetensors headers,
and runs the rules in :data:`RULES`. It never loads a model and never imports
torch, transformers or peft. The one read of tensor data is the adapter's own
tensors (:mod:`adapterhub.check.scan`).

>>> report = check("out/qa-lora", base="team/llama-7b")   # doctest: +SKIP
>>> report.status, [r.id for r in report.rules if r.status != "pass"]   # doctest: +SKIP
('warnings', ['dtype'])
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub import modelcard
from adapterhub.check.inputs import base_tensors as read_base_tensors
from adapterhub.check.inputs import BNB_AUX, Side, load_adapter, load_base, logical_shapes, read_json
from adapterhub.check.plan import PlanOutcome, plan_from_fingerprint
from adapterhub.check.plan import plan as make_plan
from adapterhub.check.report import ERROR, INFO, RULES, WARNING, CheckReport, Finding, RuleResult, result, skipped
from adapterhub.check.scan import Scan, zero_candidates
from adapterhub.check.targets import TargetFacts, run_targets
from adapterhub.check.scan import scan as run_scan
from adapterhub.inspect.peft_config import config_problems
from adapterhub.inspect.safetensors import SafetensorsHeader, TensorInfo, read_header
from adapterhub.sources import Source

if TYPE_CHECKING:
    from adapterhub.registry import Registry

__all__ = ["RULES", "CheckReport", "Finding", "RuleResult", "check"]

_HALF = {"float16", "bfloat16"}
_FLOATS = {"float16", "bfloat16", "float32", "float64"}
_SHA = re.compile(r"[0-9a-f]{40}")  # used with fullmatch: ^...$ lets a trailing newline through
# init_lora_weights values that rewrite the base too (as converters.deltas refuses them).
_RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# tokenizer.json of a 256k-token vocabulary is tens of MB; the cap only stops absurd files.
_TOKENIZER_BYTES = 256 << 20


# --------------------------------------------------------------------------- rules


def _rule_targets(plan: PlanOutcome) -> RuleResult:
    if plan.mode == "none":
        return RuleResult("target-modules", "warning", f"not checked: {plan.why}")
    what = "adapted modules" if plan.mode == "plan" else "expected base modules (fingerprint)"
    if plan.mode == "plan" and plan.why:
        return skipped("target-modules", f"not checked: {plan.why}")
    if plan.modules == 0 and not plan.missing:
        return skipped("target-modules", "the adapter changes no base module")
    summary = f"all {plan.modules} {what} found in the base"
    return result("target-modules", plan.missing, summary)


def _rule_shapes(plan: PlanOutcome, method: str | None) -> RuleResult:
    if plan.mode == "none":
        return RuleResult("shapes", "warning", f"not checked: {plan.why}")
    if plan.mode == "plan":
        summary = f"{plan.tensors} adapter tensors fit the base"
    else:
        summary = f"{plan.modules} module shapes match the base fingerprint (no merge plan for {method})"
        if plan.modules == 0 and not plan.shapes:
            return skipped("shapes", f"the adapter records no base shapes (no merge plan for {method})")
    return result("shapes", plan.shapes, summary)


def _norm_name(name: str) -> str:
    return name.strip().rstrip("/").lower()


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.isabs(name)


def _base_names(base: Side) -> list[str]:
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


def _same_model(recorded: str, base: Side) -> bool:
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


def _rule_identity(adapter: Side, base: Side, defaulted: bool, plan: PlanOutcome) -> RuleResult:
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
        if have and (rev == have or (defaulted and not _SHA.fullmatch(rev))):
            findings.append(Finding(INFO, f"revision {rev} matches"))
        elif have and _SHA.fullmatch(rev) and _SHA.fullmatch(have):
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
    return result("base-identity", findings, summary)


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
        return skipped("dtype", "the adapter has no floating-point tensors to compare")
    if base_dtype is None:
        return skipped("dtype", "the base's dtype is not known (no readable weights or config dtype)")
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
    return result("dtype", findings, f"adapter {', '.join(floats)}, base {shown}")


def _tokenizer_size(src: Source) -> tuple[int, str] | None:
    """(highest token id + 1, file) of the tokenizer the adapter ships, if any."""
    best: tuple[int, str] | None = None

    def note(n: int, rel: str) -> None:
        nonlocal best
        if best is None or n > best[0]:
            best = (n, rel)

    if "tokenizer.json" in src.files:
        tok = read_json(src, "tokenizer.json", max_bytes=_TOKENIZER_BYTES)
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
        ints = [i for i in read_json(src, "added_tokens.json").values() if isinstance(i, int)]
        if ints:
            note(max(ints) + 1, "added_tokens.json")
    return best


def _embedding_rows(base_shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]) -> tuple[str, int] | None:
    from adapterhub.converters.formats import peft_math

    for k, s in base_shapes.items():
        if peft_math.is_vocab_tensor(k, config, s) and k.rsplit(".", 2)[-2] in peft_math.INPUT_EMBEDDINGS:
            return k, s[0]
    return None


def _rule_vocab(adapter: Side, base: Side, plan: PlanOutcome, base_shapes: Mapping[str, tuple[int, ...]]) -> RuleResult:
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
        return skipped("resized-vocab", "neither side has a token embedding or tokenizer to compare")
    summary = f"vocabulary {rows if rows is not None else vocab}" + (f", adapter tokenizer {tok[0]} tokens" if tok else "")
    return result("resized-vocab", findings, summary)


def _rule_tied(plan: PlanOutcome) -> RuleResult:
    if plan.mode != "plan":
        return skipped("tied-embeddings", "no merge plan for this method" if plan.mode == "fingerprint" else plan.why)
    return result("tied-embeddings", plan.tied, "no adapter delta on tied embeddings")


def _rule_qlora(adapter: Side, base: Side) -> RuleResult:
    from adapterhub.converters.formats import peft_math

    card = None
    if "README.md" in adapter.src.files:
        try:
            card = modelcard.read_text(adapter.src.files["README.md"])
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
    return result("qlora-base", findings, summary)


def _rule_peft_config(adapter: Side) -> tuple[RuleResult, str | None]:
    from adapterhub.check.peft_fields import known_config_fields, peft_version

    if adapter.info.format != "peft":
        return skipped("peft-config", f"not a PEFT adapter ({adapter.info.format})"), peft_version()
    invalid = [
        Finding(ERROR, f"{p}: PEFT and adapterhub cannot compute with this adapter", file="adapter_config.json")
        for p in config_problems(adapter.config)
    ]
    if invalid:
        return result("peft-config", invalid, ""), peft_version()
    peft_type = str(adapter.config.get("peft_type") or "")
    known = known_config_fields(peft_type)
    if known is None:
        return skipped("peft-config", "peft is not installed, so there is nothing to compare the config with"), None
    saved_by = adapter.config.get("peft_version")
    by = f" (saved by peft {saved_by})" if saved_by else ""
    if not known.known_type:
        f = Finding(
            WARNING,
            f"the installed peft {known.version} does not know peft_type {peft_type}{by}: it cannot load this adapter",
            file="adapter_config.json",
        )
        return result("peft-config", [f], ""), known.version
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
    return result("peft-config", findings, summary), known.version


def _rule_finite(scan: Scan | None, why: str, weights_file: str | None) -> RuleResult:
    if scan is None:
        return RuleResult("finite-weights", "warning", f"not checked: {why}") if why else skipped("finite-weights", "no tensors")
    findings = [
        Finding(ERROR, f"{k}: {n} non-finite value{'s' if n > 1 else ''} (inf or NaN)", k, weights_file)
        for k, n in scan.nonfinite.items()
    ]
    return result("finite-weights", findings, f"{scan.tensors} tensors ({scan.bytes / 1e6:.1f} MB) are finite")


def _rule_untrained(scan: Scan | None, cands: Mapping[str, str], method: str | None, weights_file: str | None) -> RuleResult:
    if method not in ("LORA", "DORA", "ADALORA"):
        return skipped("untrained-lora", f"applies to LoRA adapters, not {method or 'this adapter'}")
    if scan is None or not cands:
        return skipped("untrained-lora", "no LoRA B tensors were read")
    zero = sorted(cands[k] for k in scan.zero)
    if not zero:
        return result("untrained-lora", [], f"all {len(cands)} LoRA B matrices are non-zero")
    if len(zero) == len(cands):
        msg = (
            f"every LoRA B matrix ({len(cands)}) is all zero: the adapter is untrained (PEFT's initial state) "
            "and changes nothing"
        )
    else:
        shown = ", ".join(zero[:5]) + (f" and {len(zero) - 5} more" if len(zero) > 5 else "")
        msg = f"{len(zero)} of {len(cands)} LoRA B matrices are all zero, so these modules change nothing: {shown}"
    return result("untrained-lora", [Finding(WARNING, msg, zero[0], weights_file)], "")


# --------------------------------------------------------------------------- entry point


def _target_facts(
    a: Side, b: Side, plan: PlanOutcome, base_shapes: Mapping[str, tuple[int, ...]], vocab: RuleResult, weights_file: str | None
) -> TargetFacts:
    """What the engine rules look at, from what the check has read."""
    fp_modules = (a.info.fingerprint or {}).get("modules") or {}
    modules = set(fp_modules) | set(a.info.details.get("module_ranks") or {})
    saved = set(a.info.details.get("full_weights") or {})
    mts = a.config.get("modules_to_save") if a.info.format == "peft" else None
    if isinstance(mts, str):
        mts = [mts]
    saved |= {str(m) for m in mts or [] if isinstance(m, str)}
    extra = None
    if plan.resized:
        extra = f"the adapter resizes the vocabulary ({', '.join(f'{k}: {o} -> {n} rows' for k, (o, n) in plan.resized.items())})"
    elif "new_embeddings.safetensors" in a.src.files:
        extra = "the adapter carries new_embeddings.safetensors (extra vocabulary)"
    elif vocab.status == ERROR:
        extra = vocab.summary
    return TargetFacts(
        format=a.info.format,
        method=a.info.method,
        config=a.config,
        rank=a.info.rank,
        modules=tuple(sorted(modules)),
        saved=tuple(sorted(saved)),
        extra_vocab=extra,
        base_config=b.config,
        base_shapes=base_shapes,
        details=a.info.details,
        weights_file=weights_file,
    )


def _describe(side: Side, extra: Mapping[str, Any]) -> dict[str, Any]:
    d = side.src.to_dict()
    d.update({k: v for k, v in extra.items() if v is not None})
    return d


def check(
    adapter: str | os.PathLike,
    base: str | os.PathLike | None = None,
    registry: Registry | None = None,
    targets: Iterable[str] = (),
) -> CheckReport:
    """Check ``adapter`` against ``base`` (default: the base its config names) without loading either.

    ``targets`` (``vllm``, ``llama.cpp``, ``ollama``, ``mlx``, ``tgi``) add the
    rules of those serving engines (:mod:`adapterhub.check.targets`).

    Raises ``NotFoundError`` or ``InvalidArtifactError`` when an input cannot
    be resolved or read; every compatibility problem is a rule result instead.
    """
    targets = tuple(dict.fromkeys(targets))
    if str(adapter).endswith(".gguf"):  # a GGUF LoRA against a GGUF model, as llama.cpp checks it
        from adapterhub.check.gguf import check_gguf

        return check_gguf(adapter, base)
    t0 = time.perf_counter()
    a = load_adapter(adapter, registry)
    b, defaulted = load_base(base, a, registry)

    weights_file = a.info.details.get("weights_file")
    header: SafetensorsHeader | None = None
    if isinstance(weights_file, str) and weights_file.endswith(".safetensors") and weights_file in a.src.files:
        header = read_header(a.src.files[weights_file], weights_file)

    base_tensors = read_base_tensors(b)
    if base_tensors is None:
        plan = PlanOutcome("none", why="the base's weights are not safetensors, so their shapes are unknown")
        base_shapes: dict[str, tuple[int, ...]] = {}
    else:
        base_shapes = logical_shapes(base_tensors, b.info.fingerprint)
        if header is None and a.info.format == "peft":
            plan = PlanOutcome("none", why=f"the adapter's weights ({weights_file}) are a pickle; convert them to safetensors")
        elif a.info.format == "peft" and config_problems(a.config):
            plan = PlanOutcome("none", why="adapter_config.json holds values that cannot be computed with (see peft-config)")
        else:
            plan = make_plan(a, b, header, base_shapes, weights_file)
            if plan.mode == "fingerprint":
                plan = plan_from_fingerprint(a, b, plan.why)

    method = a.info.method
    cands = zero_candidates(header, method)
    scan = run_scan(header, set(cands)) if header is not None else None
    scan_why = "" if header is not None else f"the adapter's weights ({weights_file}) are not safetensors"

    base_dtype = _main_dtype(t for k, t in (base_tensors or {}).items() if not BNB_AUX.search(k)) or _dtype_name(b.config)
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
    if targets:
        rules += run_targets(targets, _target_facts(a, b, plan, base_shapes, rules[5], weights_file))
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
        targets=targets,
    )
