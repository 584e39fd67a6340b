"""Any mergeable adapter to a plain LoRA (``convert --to lora``).

``adapter_to_lora(adapter, base, out)`` computes each adapted module's weight
delta on ``base`` exactly as ``converters.merge`` would merge it (DoRA, IA3,
LoHa, LoKr, AdaLoRA, VeRA, or a LoRA to re-rank), then factors it like
``converters.extract`` does: a plain LoRA for engines that serve nothing
else (vLLM, llama.cpp), with each module's rank, kept energy and error in the
report. Saved weights (``modules_to_save``) travel as they are.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adapterhub.errors import InvalidArtifactError

from adapterhub.converters.extract import (
    Delta,
    ExtractReport,
    _check_settings,
    _factor,
    _Out,
    _resolve_dtype,
    _write,
    lora_config,
)
from adapterhub.converters.formats import peft_math
from adapterhub.converters.formats.safetensors_io import FileMap

def _method_name(config: Mapping[str, Any], method: str) -> str:
    return "DORA" if method == "LORA" and config.get("use_dora") else method


def adapter_to_lora(
    adapter: FileMap,
    base: FileMap,
    out: Path | str,
    *,
    rank: int | None = None,
    energy: float | None = None,
    svd: str = "randomized",
    dtype: Any = None,
    force: bool = False,
    hash_outputs: bool = False,
    base_name: str | None = None,
    adapter_name: str | None = None,
) -> ExtractReport:
    """A plain LoRA from any mergeable adapter: the SVD of each module's weight delta on ``base``."""
    import torch

    from adapterhub.converters.merge_plan import prepare_merge

    t0 = time.perf_counter()
    _check_settings(rank, energy, svd)
    prep = prepare_merge(adapter, base)
    method = _method_name(prep.adapter_config, prep.plan.method)
    if prep.plan.untied or prep.plan.vocab_size is not None:
        raise InvalidArtifactError(
            "not supported yet: turning into LoRA an adapter that resizes or unties the embeddings"
        )
    out_dtype = _resolve_dtype(dtype)
    res = _Out()
    fio_any = False
    for tp in prep.plan.tensors:
        reps = [op for op in tp.ops if op.kind == "replace"]
        ops = [op for op in tp.ops if op.kind != "replace"]
        if reps and ops:
            raise InvalidArtifactError(f"not supported yet: {tp.name} is both saved whole and adapted")
        for op in reps:  # modules_to_save and other saved weights travel as they are
            res.tensors[op.tensors["value"]] = prep.adapter.get(op.tensors["value"])
        if not ops:
            continue
        bias = [op for op in ops if op.kind in ("lora_bias", "ia3_bias")]
        if bias:
            raise InvalidArtifactError(
                f"not supported yet: {bias[0].module} changes its bias ({bias[0].kind}); a plain LoRA changes weights only"
            )
        w = prep.base.get(tp.source)
        delta = peft_math.apply_ops(w, ops, prep.adapter.get, "cpu", extra=prep.extra)
        delta.sub_(w.to(torch.float32))
        op = ops[0]
        kind = "embedding" if op.kind in ("lora_embedding", "dora_embedding") else "linear"
        if op.fan_in_fan_out:  # stored (in, out) (Conv1D): LoRA factors the (out, in) delta
            delta, fio_any = delta.T.contiguous(), True
        first = next(iter(op.tensors.values()))
        dt = out_dtype or (prep.adapter.spec(first).dtype if first in prep.adapter.keys() else torch.float32)
        _factor(Delta(op.module, kind, delta, dt), rank, energy, svd, res)
        del delta, w
    mts = prep.adapter_config.get("modules_to_save") or []
    res.modules_to_save = [mts] if isinstance(mts, str) else list(mts)
    if not res.results:
        raise InvalidArtifactError("the adapter changes no weight: nothing to turn into LoRA")
    config = lora_config(
        res.ranks, res.modules_to_save, [t.source for t in prep.plan.tensors], base_name=base_name,
        task_type=prep.adapter_config.get("task_type"), fan_in_fan_out=fio_any,
    )
    return _write(
        out, res, config,
        lambda files, nbytes: ExtractReport(
            "adapter", method, str(out), svd, rank, energy, tuple(res.results), tuple(res.modules_to_save),
            0, (), nbytes, files, tuple(res.warnings), time.perf_counter() - t0,
        ),
        force=force, hash_outputs=hash_outputs, base_name=base_name, source_name=adapter_name,
    )
