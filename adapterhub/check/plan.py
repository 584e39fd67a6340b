"""Binding the adapter to the base the way the merge would (target-modules,
shapes, tied embeddings, resized vocabulary).

The adapter's tensors become per-module operations (``converters.formats.peft_math``),
which are bound to the base's tensor names with the merge's own prefix matching
and checked one by one, so every problem is listed rather than the first.
Methods the merge does not handle (prompt tuning, OFT, ``adapters``-library
adapters, ...) are checked against the base fingerprint instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adapterhub.check.inputs import Side
from adapterhub.check.report import ERROR, WARNING, Finding
from adapterhub.errors import InvalidArtifactError
from adapterhub.inspect.safetensors import SafetensorsHeader


@dataclass
class PlanOutcome:
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


@dataclass
class _Binding:
    """The state one binding pass shares between operations."""

    out: PlanOutcome
    bcfg: Mapping[str, Any]
    known: dict[str, tuple[int, ...]]
    aliases: dict[str, str]
    weights_file: str | None
    new_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    touched: dict[str, list[Any]] = field(default_factory=dict)


def _missing(b: _Binding, op: Any, key: str | None) -> None:
    looked = key or op.path
    wf = b.weights_file
    if op.kind == "lora_bias" and key is not None and key.removesuffix(".bias") + ".weight" in b.known:
        msg = f"{op.module}: the adapter trained a LoRA bias but this layer of the base has no bias"
        b.out.shapes.append(Finding(ERROR, msg, op.module, wf))
    elif op.kind == "replace":
        msg = f"saved tensor {op.tensors['value']} matches no tensor of the base (looked for {looked})"
        b.out.missing.append(Finding(ERROR, msg, op.module, wf))
    else:
        b.out.missing.append(Finding(ERROR, f"{op.module}: not found in the base (looked for {looked})", op.module, wf))


def _replace(b: _Binding, op: Any, key: str, have: tuple[int, ...]) -> None:
    from adapterhub.converters.formats import peft_math

    want = tuple(op.options["shape"])
    if want == have:
        return
    if len(want) == 2 and len(have) == 2 and want[1] == have[1] and peft_math.is_vocab_tensor(key, b.bcfg, have):
        b.new_shapes[key] = want
        b.out.resized[key] = (have[0], want[0])
        return
    b.out.shapes.append(
        Finding(
            ERROR,
            f"{op.module}: the adapter saves {op.param} {list(want)} (modules_to_save or a saved layer), "
            f"the base has {list(have)}",
            op.module,
            b.weights_file,
        )
    )


def _bind(b: _Binding, op: Any, key: str, have: tuple[int, ...]) -> None:
    from adapterhub.converters.formats import peft_math

    try:
        peft_math.bind_op(op, key, have, b.bcfg, None)
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
            msg = (
                f"{op.module}: the embedding LoRA was trained on a vocabulary of {exp[0]}, the base has "
                f"{have[0]}, and the adapter carries no resized embedding"
            )
            b.out.vocab.append(Finding(ERROR, msg, op.module, b.weights_file))
        elif str(e).startswith("not supported yet"):
            b.out.shapes.append(Finding(WARNING, f"{op.module}: not checked: {e}", op.module, b.weights_file))
        else:
            b.out.shapes.append(Finding(ERROR, str(e), op.module, b.weights_file))


def _tied(b: _Binding) -> None:
    """A delta (or a module's own saved copy) on either side unties tied embeddings, as the merge does."""
    for alias, src in b.aliases.items():
        ops = b.touched.get(alias, []) + b.touched.get(src, [])
        if any(o.kind != "replace" or o.options.get("own_copy") for o in ops):
            b.out.untied.append(alias)
            mods = sorted({o.module for o in ops})
            b.out.tied.append(
                Finding(
                    WARNING,
                    f"the adapter changes {', '.join(mods)}, but the base ties {alias} to {src}: "
                    f"a merge unties them ({alias} written separately, tie_word_embeddings: false)",
                    mods[0],
                    b.weights_file,
                )
            )


def plan(
    adapter: Side,
    base: Side,
    header: SafetensorsHeader | None,
    base_shapes: Mapping[str, tuple[int, ...]],
    weights_file: str | None,
) -> PlanOutcome:
    from adapterhub.converters.formats import peft_math

    shapes = {k: t.shape for k, t in header.tensors.items()} if header is not None else {}
    try:
        peft_math.check_mergeable(adapter.config)
    except InvalidArtifactError as e:  # a method the merge does not handle: not an incompatibility
        return PlanOutcome("fingerprint", why=str(e))
    try:
        aplan = peft_math.parse_adapter(adapter.config, shapes)
    except InvalidArtifactError as e:
        if str(e).startswith("not supported yet"):
            return PlanOutcome("fingerprint", why=str(e))
        out = PlanOutcome("plan", why="the adapter's own tensors do not fit together (see shapes)")
        out.shapes.append(Finding(ERROR, f"the adapter's own tensors do not fit together: {e}", file=weights_file))
        return out

    out = PlanOutcome("plan", modules=len(aplan.modules), tensors=len(shapes))
    aliases = peft_math.tied_aliases(base_shapes, base.config)
    known: dict[str, tuple[int, ...]] = dict(base_shapes)
    for alias, src in aliases.items():
        known[alias] = known[src]
    b = _Binding(out, base.config, known, aliases, weights_file)
    # The merge's prefix matching (model., bert., ... on either side), done once for all operations.
    # When every path is a base tensor as it stands, that is the merge's choice too (it wins ties).
    best = peft_math.path_map([op.path for op in aplan.ops], known)
    for op in sorted(aplan.ops, key=lambda o: o.kind != "replace"):  # replacements may resize
        key = peft_math.apply_map(op.path, best)
        if key is None or key not in known:
            if not op.options.get("optional"):
                _missing(b, op, key)
            continue
        b.touched.setdefault(key, []).append(op)
        have = b.new_shapes.get(key) or b.new_shapes.get(aliases.get(key, "")) or known[key]
        if op.kind == "replace":
            _replace(b, op, key, have)
        else:
            _bind(b, op, key, have)
    _tied(b)
    if not (out.missing or out.shapes or out.vocab) and out.resized:
        # The merge's whole plan catches a resized vocabulary that leaves another vocabulary tensor behind.
        try:
            peft_math.resolve_plan(aplan, base_shapes, base.config)
        except InvalidArtifactError as e:
            out.vocab.append(Finding(ERROR, str(e), file=weights_file))
    return out


def plan_from_fingerprint(adapter: Side, base: Side, why: str) -> PlanOutcome:
    from adapterhub.inspect import fingerprint_matches

    out = PlanOutcome("fingerprint", why=why)
    expect = adapter.info.fingerprint or {}
    out.modules = len(expect.get("modules") or {})
    for p in fingerprint_matches(expect, base.info.fingerprint):
        if p.startswith("missing module"):
            out.missing.append(Finding(ERROR, p, p.split()[2].rstrip(":")))
        else:
            out.shapes.append(Finding(ERROR, p))
    return out
