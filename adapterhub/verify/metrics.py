"""Numbers that say how far a candidate model's outputs are from a reference's.

Pure functions over tensors (no models, no files), used by ``adapterhub.verify``.
Every function takes float32 outputs shaped ``[batch, seq, dim]`` and a boolean
``mask`` ``[batch, seq]`` that is True at real (not padding) positions; only
those positions count.

"Clear" positions: top-1 agreement and top-k overlap are counted only where the
reference's most likely token beats the runner-up by at least ``margin`` nats
of log-probability (default 1.0: the top token is at least e ≈ 2.7 times as
likely as the next). Where the reference itself hesitates between two tokens,
any rounding flips the argmax, so counting such positions would measure noise,
not correctness (random models are almost all such positions).

>>> m = compare(ref_logits, cand_logits, mask, logits=True)      # doctest: +SKIP
>>> failures(m, {"rel": 0.02, "cos": 0.999})
[]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

DEFAULT_MARGIN = 1.0  # nats: see the module docstring
DEFAULT_K = 5

# Tolerance keys: name -> (metric in the report, direction). "max": the metric
# must not exceed the tolerance; "min": it must not fall below it.
TOLERANCE_KEYS: dict[str, tuple[str, str]] = {
    "rel": ("rel", "max"),
    "cos": ("cos_min", "min"),
    "kl": ("kl_mean", "max"),
    "top1": ("top1", "min"),
    "topk": ("topk", "min"),
    "max_abs": ("max_abs", "max"),
    "mean_abs": ("mean_abs", "max"),
    # share of greedy decodes that never leave the reference's at a clear step
    "decode": ("decode_agree", "min"),
}
# Keys that tune how metrics are computed rather than bound them.
SETTING_KEYS = ("margin", "k", "decode_margin")
SAME_RECIPE_PREFIX = "same."  # bounds of the same-recipe comparison: same.rel, same.cos, ...


CHUNK_ROWS = 64  # positions compared at a time: a [positions, vocab] float32 copy of 32k-token logits is 8 MB


def _rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask].float()


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the real positions, in order."""
    return mask.reshape(-1).nonzero().squeeze(1)


def _chunks(x: torch.Tensor, idx: torch.Tensor):
    flat = x.reshape(-1, x.shape[-1])
    for i in range(0, idx.numel(), CHUNK_ROWS):
        yield flat[idx[i : i + CHUNK_ROWS]].float()


def nonfinite(x: torch.Tensor, mask: torch.Tensor) -> int:
    """How many values at real positions are NaN or infinite."""
    return sum(int((~torch.isfinite(c)).sum()) for c in _chunks(x, _positions(mask)))


def compare(
    ref: torch.Tensor,
    cand: torch.Tensor,
    mask: torch.Tensor,
    *,
    logits: bool,
    margin: float = DEFAULT_MARGIN,
    k: int = DEFAULT_K,
) -> dict[str, Any]:
    """Distance metrics between two outputs; distribution metrics too when ``logits``.

    Non-finite values in either output make every metric ``None`` (the
    verdict is then FAIL), with their counts under ``nonfinite_*``. The
    positions are taken ``CHUNK_ROWS`` at a time, so comparing logits over a
    large vocabulary needs no full-size temporaries.
    """
    if ref.shape[-1] != cand.shape[-1] or ref.shape[:-1] != cand.shape[:-1]:
        raise ValueError(f"output shapes differ: reference {tuple(ref.shape)}, candidate {tuple(cand.shape)}")
    idx = _positions(mask)
    out: dict[str, Any] = {
        "positions": int(idx.numel()),
        "nonfinite_reference": nonfinite(ref, mask),
        "nonfinite_candidate": nonfinite(cand, mask),
    }
    names = ["max_abs", "mean_abs", "rel", "cos_min", "cos_mean"]
    if logits:
        names += ["kl_mean", "kl_max", "top1", "topk", "clear_positions"]
    if out["nonfinite_reference"] or out["nonfinite_candidate"] or idx.numel() == 0:
        return {**out, **{n: None for n in names}}
    acc = _Acc(logits, margin, k)
    for r, c in zip(_chunks(ref, idx), _chunks(cand, idx)):
        acc.add(r, c)
    return {**out, **acc.result()}


class _Acc:
    """Sums over chunks of positions, for :func:`compare`."""

    def __init__(self, logits: bool, margin: float, k: int) -> None:
        self.logits, self.margin, self.k = logits, margin, k
        self.max_abs, self.sum_abs, self.n = 0.0, 0.0, 0
        self.d2, self.r2 = 0.0, 0.0
        self.cos: list[torch.Tensor] = []
        self.kl: list[torch.Tensor] = []
        self.clear, self.top1, self.topk = 0, 0.0, 0.0

    def add(self, r: torch.Tensor, c: torch.Tensor) -> None:
        d = c - r
        self.max_abs = max(self.max_abs, float(d.abs().max()))
        self.sum_abs += float(d.abs().double().sum())
        self.n += d.numel()
        self.d2 += float(d.double().pow(2).sum())
        self.r2 += float(r.double().pow(2).sum())
        self.cos.append(torch.nn.functional.cosine_similarity(r, c, dim=-1, eps=1e-12))
        if self.logits:
            kl, clear, top1, topk = _distribution_rows(r, c, self.margin, self.k)
            self.kl.append(kl)
            self.clear += clear
            self.top1 += top1
            self.topk += topk

    def result(self) -> dict[str, Any]:
        cos = torch.cat(self.cos)
        d, rn = math.sqrt(self.d2), math.sqrt(self.r2)
        out: dict[str, Any] = {
            "max_abs": self.max_abs,
            "mean_abs": self.sum_abs / max(self.n, 1),
            "rel": d / rn if rn > 0 else (0.0 if d == 0 else math.inf),
            "cos_min": float(cos.min()),
            "cos_mean": float(cos.mean()),
        }
        if self.logits:
            kl = torch.cat(self.kl)
            out.update(kl_mean=float(kl.mean()), kl_max=float(kl.max()), clear_positions=self.clear)
            out["top1"] = self.top1 / self.clear if self.clear else None
            out["topk"] = self.topk / self.clear if self.clear else None
        return out


def _distribution_rows(r: torch.Tensor, c: torch.Tensor, margin: float, k: int) -> tuple[torch.Tensor, int, float, float]:
    """Per position KL(ref ‖ cand); and the count of clear positions with the sums of
    their top-1 agreement and top-k overlap."""
    lr = torch.log_softmax(r, dim=-1)
    lc = torch.log_softmax(c, dim=-1)
    kl = (lr.exp() * (lr - lc)).sum(-1).clamp_min(0)
    k = max(1, min(int(k), r.shape[-1]))
    top2 = lr.topk(min(2, r.shape[-1]), dim=-1).values
    gap = top2[:, 0] - top2[:, 1] if top2.shape[-1] > 1 else torch.full_like(top2[:, 0], math.inf)
    clear = gap >= margin
    n = int(clear.sum())
    if n == 0:
        return kl, 0, 0.0, 0.0
    rc, cc = r[clear], c[clear]
    top1 = float((rc.argmax(-1) == cc.argmax(-1)).float().sum())
    tr, tc = rc.topk(k, dim=-1).indices, cc.topk(k, dim=-1).indices
    overlap = (tr.unsqueeze(-1) == tc.unsqueeze(-2)).any(-1).float().sum(-1) / k
    return kl, n, top1, float(overlap.sum())


def distribution(r: torch.Tensor, c: torch.Tensor, *, margin: float = DEFAULT_MARGIN, k: int = DEFAULT_K) -> dict[str, Any]:
    """KL(ref ‖ cand) per position, and top-1 / top-k agreement at clear positions.

    ``r`` and ``c`` are ``[positions, vocab]`` logits. ``top1`` and ``topk``
    are ``None`` when no position is clear.
    """
    kl, n, top1, topk = _distribution_rows(r.float(), c.float(), margin, k)
    out: dict[str, Any] = {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "clear_positions": n}
    out["top1"] = top1 / n if n else None
    out["topk"] = topk / n if n else None
    return out


def mean_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers pools them: the mean over real tokens."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1)


def layer_row(i: int, ref: torch.Tensor, cand: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """Drift of one layer's hidden states (index 0 is the embedding output)."""
    m = compare(ref, cand, mask, logits=False)
    return {"layer": i, "rel": m["rel"], "cos_min": m["cos_min"], "max_abs": m["max_abs"]}


def drift_summary(rows: list[dict[str, Any]], rel_tol: float | None) -> dict[str, Any]:
    """The rows, and ``first_divergent``: the first layer whose relative error
    exceeds ``rel_tol`` or whose output is not finite."""
    first = next((r["layer"] for r in rows if r["rel"] is None or (rel_tol is not None and r["rel"] > rel_tol)), None)
    return {"layers": rows, "first_divergent": first}


def layer_drift(
    ref: Sequence[torch.Tensor], cand: Sequence[torch.Tensor], mask: torch.Tensor, *, rel_tol: float | None
) -> dict[str, Any]:
    """Per-layer hidden-state drift; ``first_divergent`` is the first layer whose
    relative error exceeds ``rel_tol`` (index 0 is the embedding output)."""
    return drift_summary([layer_row(i, r, c, mask) for i, (r, c) in enumerate(zip(ref, cand))], rel_tol)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token of two greedy decodes, ``None`` if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def parse_tolerance(items: Sequence[str] | Mapping[str, Any] | None) -> dict[str, float]:
    """``["rel=0.02", "cos=0.999"]`` (or a dict) -> ``{"rel": 0.02, "cos": 0.999}``.

    A bound prefixed ``same.`` (``same.rel=0.02``) is for the same-recipe
    comparison of quantized candidates and keeps its prefix.
    """
    if not items:
        return {}
    pairs = items.items() if isinstance(items, Mapping) else (str(s).partition("=")[::2] for s in items)
    out: dict[str, float] = {}
    for key, value in pairs:
        key = str(key).strip().lower()
        bare = key.removeprefix(SAME_RECIPE_PREFIX)
        if bare not in TOLERANCE_KEYS and (key != bare or key not in SETTING_KEYS):
            known = ", ".join([*TOLERANCE_KEYS, *SETTING_KEYS, *(SAME_RECIPE_PREFIX + k for k in TOLERANCE_KEYS)])
            raise ValueError(f"unknown tolerance {key!r} (known: {known})")
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"tolerance {key} needs a number, got {value!r}") from None
    return out


def failures(metrics: Mapping[str, Any], tolerance: Mapping[str, float | None]) -> list[str]:
    """Which bounds ``metrics`` breaks, as sentences. Non-finite output always fails."""
    bad = []
    nf = (metrics.get("nonfinite_candidate") or 0, metrics.get("nonfinite_reference") or 0)
    if nf[0]:
        bad.append(f"the candidate produced {nf[0]} non-finite values (NaN or inf)")
    if nf[1]:
        bad.append(f"the reference produced {nf[1]} non-finite values (NaN or inf)")
    if any(nf):
        return bad
    for key, (metric, direction) in TOLERANCE_KEYS.items():
        tol = tolerance.get(key)
        value = metrics.get(metric)
        if tol is None or value is None:
            continue
        if (direction == "max" and value > tol) or (direction == "min" and value < tol):
            sign = ">" if direction == "max" else "<"
            bad.append(f"{metric} {value:.6g} {sign} {tol:g}")
    return bad
