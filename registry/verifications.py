"""The ``verifications`` table: numerical verification reports, several per digest over time.

``show`` prints the newest, ``search --verified`` keeps digests whose newest
verdict is PASS, and a signed provenance statement carries the summary.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from adapterhub.errors import NotFoundError
from adapterhub.registry import records

if TYPE_CHECKING:
    from adapterhub.registry.index import Index

_SUMMARY_METRICS = ("rel", "cos_min", "kl_mean", "top1", "max_abs")


def add(index: Index, digest: str, report: dict[str, Any]) -> int:
    """Store ``report`` (``VerifyReport.to_dict()``) for ``digest``; return its id."""
    from adapterhub.registry.index import now

    text = json.dumps(report, sort_keys=True, default=str)
    ts = report.get("created_at") or now()
    with index.write():
        if not index.has_artifact(digest):
            raise NotFoundError(f"unknown artifact {digest}")
        cur = index.conn.execute(
            "insert into verifications (digest, verdict, format, device, report, created_at) values (?, ?, ?, ?, ?, ?)",
            (digest, report.get("verdict"), report.get("format"), report.get("device"), text, ts),
        )
        records.note(index, "verification", f"{digest}/{hashlib.sha256(text.encode()).hexdigest()[:16]}",
                     {"digest": digest, "report": json.loads(text), "created_at": ts}, digest=digest)
    return int(cur.lastrowid or 0)


def rows(index: Index, digest: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Verification records of ``digest``, newest first: id, verdict, format, device, report (parsed), created_at."""
    sql = (
        "select id, verdict, format, device, report, created_at from verifications"
        " where digest = ? order by created_at desc, id desc"
    )
    if limit:
        sql += f" limit {int(limit)}"
    return [
        {"id": i, "verdict": v, "format": f, "device": d, "report": json.loads(r), "created_at": c}
        for i, v, f, d, r, c in index.conn.execute(sql, (digest,)).fetchall()
    ]


def latest_summary(index: Index, digest: str) -> dict[str, Any] | None:
    """The newest verification record, without the bulky per-layer and decode details."""
    found = rows(index, digest, limit=1)
    if not found:
        return None
    r = found[0]
    rep = r["report"]
    metrics = rep.get("metrics") or {}
    out = {
        "verdict": r["verdict"],
        "format": r["format"],
        "device": r["device"],
        "created_at": r["created_at"],
        "metrics": {k: metrics.get(k) for k in _SUMMARY_METRICS},
        "tolerance": rep.get("tolerance"),
        "failures": rep.get("failures") or [],
    }
    same = rep.get("same_recipe") or {}
    if same.get("metrics"):
        # Quantized candidates: the comparison with base + adapter quantized the same way.
        out["same_recipe"] = {
            "verdict": same.get("verdict"),
            "metrics": {k: same["metrics"].get(k) for k in _SUMMARY_METRICS},
        }
    return out
