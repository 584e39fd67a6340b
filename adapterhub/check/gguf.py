"""``check ADAPTER.gguf --base MODEL.gguf``: what llama.cpp's LoRA loader checks, from the two headers.

llama.cpp (``llama_adapter_lora_init``) refuses a GGUF LoRA whose
architecture differs from the model's, whose tensors are not all
``<name>.lora_a`` / ``<name>.lora_b`` (norm vectors aside), whose pairs are
incomplete, that names a tensor the model lacks, or whose shapes do not fit:
``lora_a`` is [r, in] and ``lora_b`` [out, r] for a model tensor [out, in]
(for ``token_embd`` the two are swapped). The same checks run here, as
rules of the usual report: base-identity (architecture, ``general.type``),
target-modules (names and pairs) and shapes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from adapterhub.check.report import ERROR, CheckReport, Finding, result, skipped
from adapterhub.errors import InvalidArtifactError, NotFoundError, UsageError

_NOT_GGUF = "not a rule of GGUF LoRAs"


def _header(path: Path, what: str) -> tuple[dict[str, Any], dict[str, list[int]]]:
    from adapterhub.inspect.gguf import read_gguf_header

    if not path.is_file():
        raise NotFoundError(f"{what} {path}: no such file")
    meta, tensors = read_gguf_header(path)
    return meta, {name: shape for name, _, shape, _ in tensors}


def _pairs(adapter: dict[str, list[int]]) -> tuple[dict[str, dict[str, list[int]]], list[Finding]]:
    pairs: dict[str, dict[str, list[int]]] = {}
    bad: list[Finding] = []
    for name, shape in adapter.items():
        for suffix in (".lora_a", ".lora_b"):
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[suffix[-1]] = shape
                break
        else:
            if not name.endswith("_norm.weight"):  # llama.cpp skips norm vectors
                bad.append(Finding(ERROR, f"{name}: not a .lora_a/.lora_b tensor (llama.cpp refuses the file)", module=name))
    for base, ab in pairs.items():
        for k in ("a", "b"):
            if k not in ab:
                bad.append(Finding(ERROR, f"{base}: .lora_{k} is missing (llama.cpp needs both of each pair)", module=base))
    return pairs, bad


def _shape_findings(pairs: dict[str, dict[str, list[int]]], model: dict[str, list[int]]) -> list[Finding]:
    out = []
    for base, ab in sorted(pairs.items()):
        a, b, w = ab.get("a"), ab.get("b"), model.get(base)
        if a is None or b is None or w is None:
            continue
        if len(a) != 2 or len(b) != 2 or len(w) != 2:
            out.append(Finding(ERROR, f"{base}: LoRA tensors and the model tensor must be 2-d", module=base))
            continue
        if base.endswith("token_embd.weight"):  # stored [vocab, dim]; a [vocab, r], b [dim, r]
            fits = a[0] == w[0] and b[0] == w[1] and a[1] == b[1]
        else:  # a [r, in], b [out, r], w [out, in]
            fits = a[1] == w[1] and b[0] == w[0] and a[0] == b[1]
        if not fits:
            out.append(Finding(ERROR, f"{base}: lora_a {a} and lora_b {b} do not fit the model's {w}", module=base))
    return out


def check_gguf(adapter: str | os.PathLike, base: str | os.PathLike | None) -> CheckReport:
    """Check a GGUF LoRA against a GGUF model as llama.cpp's loader would."""
    t0 = time.perf_counter()
    if base is None or not str(base).endswith(".gguf"):
        raise UsageError("a GGUF LoRA is checked against a GGUF model: pass --base MODEL.gguf")
    a_meta, a_t = _header(Path(adapter), "adapter")
    b_meta, b_t = _header(Path(base), "base")
    if a_meta.get("general.type") != "adapter" or a_meta.get("adapter.type") != "lora":
        raise InvalidArtifactError(f"{Path(adapter).name} is not a GGUF LoRA (general.type adapter, adapter.type lora)")
    a_arch, b_arch = a_meta.get("general.architecture"), b_meta.get("general.architecture")
    ident = []
    if b_meta.get("general.type", "model") != "model":
        ident.append(Finding(ERROR, f"the base is a GGUF {b_meta.get('general.type')}, not a model"))
    if a_arch != b_arch:
        ident.append(Finding(ERROR, f"the LoRA is for architecture {a_arch!r}, the model is {b_arch!r} (llama.cpp: arch mismatch)"))
    pairs, name_findings = _pairs(a_t)
    for base_name in sorted(pairs):
        if base_name not in b_t:
            name_findings.append(Finding(ERROR, f"{base_name}: the model has no such tensor (llama.cpp: wrong base model?)", module=base_name))
    rules = (
        result("base-identity", ident, f"architecture {a_arch}"),
        result("target-modules", name_findings, f"{len(pairs)} LoRA pairs, each on a tensor of the model"),
        result("shapes", _shape_findings(pairs, b_t), "every lora_a/lora_b pair fits its model tensor"),
        *(skipped(r, _NOT_GGUF) for r in ("dtype", "tied-embeddings", "resized-vocab", "qlora-base", "peft-config")),
    )
    alpha = a_meta.get("adapter.lora.alpha")
    return CheckReport(
        adapter={"spec": str(adapter), "format": "gguf", "method": "LORA", "architecture": a_arch, "alpha": alpha},
        base={"spec": str(base), "format": "gguf", "architecture": b_arch},
        rules=rules,
        seconds=time.perf_counter() - t0,
    )
