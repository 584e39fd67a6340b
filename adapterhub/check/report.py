"""What a check reports: rule results with their findings, and the whole report.

Each rule gives ``pass``, ``warning``, ``error`` or ``skipped`` (does not apply),
with findings of severity ``error``, ``warning`` or ``info``. An error means
the adapter does not fit this base; a warning means it fits but something
deserves a look; info is context.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from adapterhub.check.targets_table import TARGET_RULE_SOURCES, TARGET_RULE_TITLES

__all__ = ["ERROR", "INFO", "RULES", "SCHEMA", "WARNING", "CheckReport", "Finding", "RuleResult", "result", "skipped"]

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


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Finding:
    severity: str  # error | warning | info
    message: str
    module: str | None = None  # the module or tensor it is about
    file: str | None = None  # the adapter file it is about (relative path)
    fix: str | None = None  # target rules: the adapterhub command that makes the adapter servable

    def to_dict(self) -> dict[str, Any]:
        d = {"severity": self.severity, "message": self.message, "module": self.module, "file": self.file}
        if self.fix is not None:
            d["fix"] = f"adapterhub {self.fix}"
        return d


@dataclass(frozen=True)
class RuleResult:
    id: str
    status: str  # pass | warning | error | skipped
    summary: str
    findings: tuple[Finding, ...] = ()

    @property
    def title(self) -> str:
        return RULES.get(self.id) or TARGET_RULE_TITLES[self.id]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "status": self.status,
            "summary": self.summary,
            "findings": [f.to_dict() for f in self.findings],
        } | ({"source": TARGET_RULE_SOURCES[self.id]} if self.id in TARGET_RULE_SOURCES else {})


@dataclass(frozen=True)
class CheckReport:
    adapter: dict[str, Any]  # where it came from and what it is
    base: dict[str, Any]
    rules: tuple[RuleResult, ...]
    peft_version: str | None = None
    notes: tuple[str, ...] = ()  # inspection warnings of either input
    seconds: float = 0.0
    targets: tuple[str, ...] = ()  # --target engines whose rules were added

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
        } | ({"targets": list(self.targets)} if self.targets else {})


def result(rule_id: str, findings: Iterable[Finding], ok_summary: str) -> RuleResult:
    fs = tuple(findings)
    worst = max((_RANK[f.severity] for f in fs), default=0)
    if worst >= _RANK[WARNING]:
        level = ERROR if worst == _RANK[ERROR] else WARNING
        hits = [f for f in fs if f.severity == level]
        more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
        return RuleResult(rule_id, level, hits[0].message + more, fs)
    return RuleResult(rule_id, "pass", ok_summary, fs)


def skipped(rule_id: str, why: str) -> RuleResult:
    return RuleResult(rule_id, "skipped", why)
