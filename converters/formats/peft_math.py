"""PEFT adapters as per-tensor merge operations, as pure functions: the public face.

PEFT 0.21.2 is the reference for every formula; each function names the
PEFT code it mirrors, and the operations are done in the same order so that a
float32 merge is bit-identical to ``merge_and_unload()``.

Three steps, each a pure function over names, shapes and tensors, each in its
own module:

1. ``parse_adapter(config, shapes)`` (``peft_plan``) reads
   ``adapter_config.json`` and the adapter's tensor names and shapes into an
   ``AdapterPlan``: one ``ModuleOp`` per adapted module plus whole-tensor
   replacements (``modules_to_save``, saved embeddings, trained biases).
2. ``resolve_plan(plan, base_shapes, base_config)`` (``peft_resolve``) binds
   those to the base checkpoint's tensor names, checks every shape and
   returns a ``MergePlan``. Nothing is read but names and shapes, so a wrong
   base fails here, before any output exists.
3. ``apply_ops(tensor, ops, get, device)`` (``peft_deltas``) merges one base
   tensor in float32; ``merge_into`` (``peft_blocked``) does the same into an
   output buffer, block by block of rows on the CPU.

QLoRA settings and dequant(quant(W)) are in ``qlora``.

>>> plan = parse_adapter(cfg, {k: src.spec(k).shape for k in src.keys()})  # doctest: +SKIP
>>> mp = resolve_plan(plan, {k: base.spec(k).shape for k in base.keys()}, base_cfg)  # doctest: +SKIP
>>> for t in mp.tensors:  # doctest: +SKIP
...     merged = apply_ops(base.get(t.source), t.ops, src.get, "cpu")  # doctest: +SKIP
"""

from __future__ import annotations

from adapterhub.converters.formats.peft_blocked import BLOCK_ALIGN, BLOCK_BYTES, merge_into
from adapterhub.converters.formats.peft_deltas import (
    TensorGetter,
    all_finite,
    apply_ops,
    lora_delta,
    vera_projections,
)
from adapterhub.converters.formats.peft_plan import (
    NOT_MERGEABLE,
    PEFT_PREFIX,
    SUPPORTED,
    AdapterPlan,
    MergePlan,
    ModuleOp,
    Shape,
    TensorPlan,
    check_mergeable,
    get_pattern_key,
    parse_adapter,
)
from adapterhub.converters.formats.peft_resolve import (
    CONV1D_MODEL_TYPES,
    INPUT_EMBEDDINGS,
    apply_map,
    bind_op,
    check_vera_projections,
    is_vocab_tensor,
    path_map,
    resolve_plan,
    tied_aliases,
)
from adapterhub.converters.formats.qlora import QuantSpec, detect_qlora, quantize_roundtrip

__all__ = [
    "AdapterPlan",
    "BLOCK_ALIGN",
    "BLOCK_BYTES",
    "CONV1D_MODEL_TYPES",
    "INPUT_EMBEDDINGS",
    "MergePlan",
    "ModuleOp",
    "NOT_MERGEABLE",
    "PEFT_PREFIX",
    "QuantSpec",
    "SUPPORTED",
    "Shape",
    "TensorGetter",
    "TensorPlan",
    "all_finite",
    "apply_map",
    "apply_ops",
    "bind_op",
    "check_mergeable",
    "check_vera_projections",
    "detect_qlora",
    "get_pattern_key",
    "is_vocab_tensor",
    "lora_delta",
    "merge_into",
    "parse_adapter",
    "path_map",
    "quantize_roundtrip",
    "resolve_plan",
    "tied_aliases",
    "vera_projections",
]
