"""Binding an adapter's plan to a base checkpoint's tensors, from names and shapes only.

``resolve_plan(plan, base_shapes, base_config)`` maps each operation onto the
base tensor it changes (a checkpoint may carry a prefix such as ``model.``
that the PEFT path lacks, or the reverse), settles ``fan_in_fan_out`` for
Conv1D layers, follows tied and resized embeddings, checks every shape and
returns a ``MergePlan``: for each output tensor, where it is read from and
which operations apply. Nothing is read but names and shapes, so a wrong
base fails here, before any output exists.

>>> mp = resolve_plan(plan, {k: base.spec(k).shape for k in base.keys()}, base_cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from adapterhub.errors import InvalidArtifactError

from adapterhub.converters.formats.peft_plan import AdapterPlan, MergePlan, ModuleOp, Shape, TensorPlan, _shape_str

# transformers' modules that store their weight [in, out] (Conv1D), by model_type.
# PEFT transposes the delta for these (fan_in_fan_out) whatever the config says:
# lora.layer.dispatch_default flips config.fan_in_fan_out per layer type, so the
# saved flag reflects only the last layer it saw.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "gpt2_ec"})
_NOT_CONV1D = re.compile(r"(^|\.)(lm_head|wte|wpe|score|classifier|qa_outputs)$")

INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared")
_EMBEDDING_NAMES = (*INPUT_EMBEDDINGS, "embeddings")
_HEAD_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_OUTPUT_NAMES = ("lm_head", "embed_out", "output")


def tied_aliases(base_shapes: Mapping[str, Shape], base_config: Mapping[str, Any]) -> dict[str, str]:
    """Names that a tied checkpoint leaves out, mapped to the tensor they share.

    transformers saves a tied ``lm_head.weight`` only once, under the input
    embedding's name. Returns e.g. ``{"lm_head.weight": "model.embed_tokens.weight"}``
    for a causal LM whose config ties them (``tie_word_embeddings``, which
    defaults to true) and whose checkpoint has no ``lm_head.weight``.
    """
    tie = base_config.get("tie_word_embeddings")
    if tie is None:
        text = base_config.get("text_config")
        tie = text.get("tie_word_embeddings") if isinstance(text, Mapping) else None
    if tie is None:
        tie = True  # PretrainedConfig's default
    archs = base_config.get("architectures") or []
    has_head = any(str(a).endswith(_HEAD_ARCHITECTURES) for a in archs)
    if not tie or not has_head or any(k == "lm_head.weight" or k.endswith(".lm_head.weight") for k in base_shapes):
        return {}
    embeds = [k for k in base_shapes if k.endswith(".weight") and k.rsplit(".", 2)[-2] in INPUT_EMBEDDINGS]
    if len(embeds) != 1:
        return {}
    return {"lm_head.weight": embeds[0]}


def _is_conv1d(module: str, weight_shape: Shape, expected: Shape | None, base_config: Mapping[str, Any]) -> bool:
    if len(weight_shape) != 2:
        return False
    if expected is not None and weight_shape != tuple(expected):
        # shapes decide unless the matrix is square
        return weight_shape == tuple(reversed(expected))
    return base_config.get("model_type") in CONV1D_MODEL_TYPES and not _NOT_CONV1D.search(module)


def _candidate_maps(module_paths: Sequence[str], keys: Iterable[str]) -> list[tuple[str, str]]:
    """(strip, add) prefix pairs that map some adapter path onto a base key."""
    keyset = set(keys)
    cands: dict[tuple[str, str], None] = {("", ""): None}
    for path in module_paths[:8]:
        for k in keyset:
            if k.endswith("." + path):
                cands.setdefault(("", k[: -len(path)]), None)
        parts = path.split(".")
        # keep at least the module's own name and the parameter: "q_proj.weight"
        for i in range(1, len(parts) - 1):
            strip = ".".join(parts[:i]) + "."
            rest = ".".join(parts[i:])
            if rest in keyset:
                cands.setdefault((strip, ""), None)
            for k in keyset:
                if k.endswith("." + rest) and k != rest:
                    cands.setdefault((strip, k[: -len(rest)]), None)
    return list(cands)


def apply_map(path: str, m: tuple[str, str]) -> str | None:
    """``path`` with the prefix ``m[0]`` taken off and ``m[1]`` put on (None if it lacks ``m[0]``)."""
    strip, add = m
    if strip:
        if not path.startswith(strip):
            return None
        path = path[len(strip) :]
    return add + path


def path_map(paths: Sequence[str], known: Collection[str]) -> tuple[str, str]:
    """The (strip, add) prefix pair that maps the most adapter ``paths`` onto ``known`` base keys.

    Checkpoints and adapters disagree on prefixes (``model.``, ``bert.``, a
    bare decoder against a causal LM, ...). Mapping nothing wins ties, and is
    the answer when every path is a base key as it stands.
    """
    if all(p in known for p in paths):
        return ("", "")
    cands = _candidate_maps(paths, known)
    return max(cands, key=lambda m: (sum(apply_map(p, m) in known for p in paths), m == ("", "")))


def resolve_plan(
    plan: AdapterPlan,
    base_shapes: Mapping[str, Sequence[int]],
    base_config: Mapping[str, Any] | None = None,
    *,
    conv1d: Callable[[str], bool] | None = None,
) -> MergePlan:
    """Bind the adapter's operations to the base checkpoint's tensors, checking every shape.

    ``base_shapes`` lists the base tensors in checkpoint order. ``conv1d``
    overrides the guess of which modules store ``[in, out]`` weights (by
    default: shapes, then ``CONV1D_MODEL_TYPES`` for square matrices).
    Raises ``InvalidArtifactError`` naming the first module that is missing
    from the base or whose shape does not fit, with both shapes.
    """
    base_config = dict(base_config or {})
    shapes: dict[str, Shape] = {k: tuple(int(d) for d in v) for k, v in base_shapes.items()}
    aliases = tied_aliases(shapes, base_config)
    known = dict(shapes)
    for alias, src in aliases.items():
        known[alias] = shapes[src]

    per_key, new_shapes, vocab = _bind_ops(plan, known, aliases, base_config, conv1d)
    untied, warnings = _settle_ties(per_key, new_shapes, aliases)
    out_names = list(shapes) + untied

    if vocab is not None:
        for key in out_names:
            if is_vocab_tensor(key, base_config, known[key]) and key not in new_shapes:
                if known[key][0] != vocab:
                    raise InvalidArtifactError(
                        f"{key}: the adapter resized the vocabulary to {vocab} but saved no resized {key} "
                        f"(base has {_shape_str(known[key])})"
                    )

    tensors = []
    for name in out_names:
        src = aliases.get(name, name)
        ops = tuple(per_key.get(name, ()))
        tensors.append(TensorPlan(name, src, new_shapes.get(name, known[name]), ops))
    return MergePlan(plan.method, tuple(tensors), tuple(untied), vocab, tuple(warnings))


def _bind_ops(
    plan: AdapterPlan,
    known: Mapping[str, Shape],
    aliases: Mapping[str, str],
    base_config: Mapping[str, Any],
    conv1d: Callable[[str], bool] | None,
) -> tuple[dict[str, list[ModuleOp]], dict[str, Shape], int | None]:
    """Each op bound to its base tensor: (ops per tensor, replacements first; resized shapes; new vocabulary size)."""
    best = path_map([op.path for op in plan.ops], known)

    per_key: dict[str, list[ModuleOp]] = {}
    new_shapes: dict[str, Shape] = {}
    vocab: int | None = None
    for op in sorted(plan.ops, key=lambda o: o.kind != "replace"):  # replacements may resize
        key = apply_map(op.path, best)
        if key is None or key not in known:
            if op.options.get("optional"):
                continue  # e.g. the bias of an IA3 module that has none
            if op.kind == "lora_bias" and key is not None and key.removesuffix(".bias") + ".weight" in known:
                raise InvalidArtifactError(
                    f"{op.module}: the adapter trained a LoRA bias (lora_bias=True) but this layer of the base has no bias, "
                    "so it cannot be merged (PEFT refuses it too)"
                )
            looked = key or op.path
            if op.kind == "replace":
                raise InvalidArtifactError(
                    f"adapter tensor {op.tensors['value']} matches no tensor of the base model (looked for {looked})"
                )
            raise InvalidArtifactError(
                f"{op.module}: target module not found in the base model (looked for {looked}); "
                "is this the base the adapter was trained on?"
            )
        have = new_shapes.get(key) or new_shapes.get(aliases.get(key, "")) or known[key]
        op = bind_op(op, key, have, base_config, conv1d)
        if op.kind == "replace":
            want = tuple(op.options["shape"])
            if want != have:
                # A resized vocabulary (new tokens) changes only the first dimension of embeddings.
                if len(want) == 2 and len(have) == 2 and want[1] == have[1] and is_vocab_tensor(key, base_config, have):
                    new_shapes[key] = want
                    vocab = want[0]
                else:
                    raise InvalidArtifactError(
                        f"{op.module}: adapter has {op.param} {_shape_str(want)}, base has {_shape_str(have)}"
                    )
        per_key.setdefault(key, []).append(op)

    # Replacements first: later deltas apply on top of the replaced weight (PEFT loads
    # saved base_layer weights before merging).
    for key in per_key:
        per_key[key].sort(key=lambda o: o.kind != "replace")
    return per_key, new_shapes, vocab


def _settle_ties(
    per_key: dict[str, list[ModuleOp]], new_shapes: dict[str, Shape], aliases: Mapping[str, str]
) -> tuple[list[str], list[str]]:
    """Decide, per tied pair, whether it stays tied; returns (names written separately, warnings).

    Tied weights share one parameter in PEFT: a saved replacement (e.g. a resized
    embedding saved as lm_head.base_layer.weight) is loaded into both sides. A delta
    acts on one side only, as PEFT's forward does, so it unties them.
    ``per_key`` and ``new_shapes`` are updated in place.
    """
    untied: list[str] = []
    warnings: list[str] = []
    for alias, src in aliases.items():
        a_ops, s_ops = per_key.get(alias, []), per_key.get(src, [])
        a_rep = [o for o in a_ops if o.kind == "replace" and not o.options.get("own_copy")]
        s_rep = [o for o in s_ops if o.kind == "replace" and not o.options.get("own_copy")]
        if a_rep and not s_rep:
            s_ops = per_key[src] = a_rep + s_ops
            if alias in new_shapes:
                new_shapes[src] = new_shapes[alias]
        elif s_rep and not a_rep:
            a_ops = a_rep = s_rep + a_ops
            if src in new_shapes:
                new_shapes[alias] = new_shapes[src]
        if any(o.kind != "replace" or o.options.get("own_copy") for o in a_ops + s_ops):
            per_key[alias] = a_ops
            untied.append(alias)
            warnings.append(f"tied embeddings were untied: {alias} is written separately from {src}")
        else:
            per_key.pop(alias, None)  # still tied: the replacement travels with {src}
            new_shapes.pop(alias, None)
    return untied, warnings


def is_vocab_tensor(key: str, base_config: Mapping[str, Any], shape: Shape) -> bool:
    """Input or output token embeddings, by module name (their first dimension is the vocabulary)."""
    parts = key.split(".")
    return len(shape) == 2 and len(parts) >= 2 and (parts[-2] in INPUT_EMBEDDINGS or parts[-2] in _OUTPUT_NAMES)


def bind_op(op: ModuleOp, key: str, have: Shape, base_config: Mapping[str, Any], conv1d: Callable[[str], bool] | None) -> ModuleOp:
    """Check ``op`` against the base tensor ``key`` of shape ``have``; settle fan_in_fan_out."""
    from dataclasses import replace

    if op.kind == "replace":
        return op
    if op.param == "weight" and len(have) != 2:
        raise InvalidArtifactError(
            f"not supported yet: {op.module} has a {len(have)}-d weight {_shape_str(have)} (only linear and embedding layers are merged)"
        )
    if op.kind in ("lora_embedding", "dora_embedding"):
        if have != op.expected:
            raise InvalidArtifactError(f"{op.module}: adapter expects weight {_shape_str(op.expected)}, base has {_shape_str(have)}")
        return op
    if op.kind in ("lora_bias", "ia3_bias"):
        if have != op.expected:
            raise InvalidArtifactError(f"{op.module}: adapter expects bias {_shape_str(op.expected)}, base has {_shape_str(have)}")
        return op
    expected = op.expected
    if op.kind == "vera":
        out = op.options["out"]
        in_ = have[1] if have[0] == out else have[0]
        expected = (out, in_)
    elif op.kind == "ia3":
        expected = None
    fio = conv1d(op.module) if conv1d is not None else _is_conv1d(op.module, have, expected, base_config)
    if op.kind == "ia3":
        l_shape = op.options["l_shape"]
        # feed-forward: ia3_l is [1, in] (scales inputs); otherwise [out, 1] (scales outputs)
        n = l_shape[1] if op.options["feedforward"] else l_shape[0]
        side = (have[0] if fio else have[1]) if op.options["feedforward"] else (have[1] if fio else have[0])
        if n != side:
            what = "inputs" if op.options["feedforward"] else "outputs"
            raise InvalidArtifactError(
                f"{op.module}: adapter scales {n} {what} (ia3_l {_shape_str(l_shape)}), base weight is {_shape_str(have)}"
            )
        return replace(op, fan_in_fan_out=fio)
    assert expected is not None
    want = tuple(reversed(expected)) if fio else tuple(expected)
    if op.kind in ("loha", "lokr"):
        fio = False  # PEFT's LoHa/LoKr reshape the delta to the base shape; they have no Conv1D support
        if math.prod(expected) != math.prod(have):
            raise InvalidArtifactError(f"{op.module}: adapter expects weight {_shape_str(expected)}, base has {_shape_str(have)}")
        if op.kind == "loha" and tuple(expected) != have:
            raise InvalidArtifactError(f"{op.module}: adapter expects weight {_shape_str(expected)}, base has {_shape_str(have)}")
        return replace(op, fan_in_fan_out=False, expected=have)
    if have != want:
        raise InvalidArtifactError(f"{op.module}: adapter expects weight {_shape_str(want)}, base has {_shape_str(have)}")
    if op.kind == "vera":
        return replace(op, fan_in_fan_out=fio, expected=expected, options={**op.options, "in": expected[1]})
    return replace(op, fan_in_fan_out=fio)


def check_vera_projections(plan: MergePlan, shapes: Mapping[str, Sequence[int]]) -> None:
    """VeRA's shared vera_A/vera_B must be at least as large as every adapted module."""
    for t in plan.tensors:
        for op in t.ops:
            if op.kind == "vera" and "vera_A" in op.tensors:
                a, b = tuple(shapes[op.tensors["vera_A"]]), tuple(shapes[op.tensors["vera_B"]])
                if a[1] < op.options["in"] or b[0] < op.options["out"]:
                    raise InvalidArtifactError(
                        f"{op.module}: VeRA projections vera_A {_shape_str(a)} / vera_B {_shape_str(b)} are smaller than "
                        f"the module ({op.options['out']} x {op.options['in']})"
                    )
