"""How ``adapterhub check`` shows a report: a table, JUnit XML, GitHub Actions annotations.

JUnit: one ``<testcase>`` per rule, named by the rule id. An error is a
``<failure type="error">``. A warning is a ``<failure type="warning">`` with
``--strict`` (the run fails on it) and otherwise a ``<skipped>`` whose message
starts with ``warning:``, so test reporters show it without failing the run.
A rule that does not apply is ``<skipped>`` with ``not applicable:``.
Every testcase carries its findings in ``<system-out>``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from adapterhub.check import (
    ERROR,
    WARNING,
    CheckReport,
    Finding,
    RuleResult,
)

from adapterhub.cli._output import echo, table
from adapterhub.fsutil import write_atomic

_SHOWN = 5  # findings per rule in the human table
_ANNOTATIONS = 10  # GitHub shows at most 10 errors and 10 warnings per step


def _short(text: str, width: int = 88) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _side(d: dict) -> str:
    return d.get("ref") or d.get("hub_id") and f"{d['hub_id']}@{d.get('revision') or 'main'}" or d.get("path") or d["spec"]


def _verdict(report: CheckReport) -> str:
    counts = {s: sum(r.status == s for r in report.rules) for s in ("pass", "warning", "error", "skipped")}
    parts = f"{counts['pass']} passed, {counts['warning']} warning{'s' if counts['warning'] != 1 else ''}, " + (
        f"{counts['error']} error{'s' if counts['error'] != 1 else ''}, {counts['skipped']} skipped"
    )
    word = {"ok": "compatible", "warnings": "compatible, with warnings", "incompatible": "INCOMPATIBLE"}[report.status]
    return f"{word} ({parts})"


def print_report(report: CheckReport) -> None:
    a, b = report.adapter, report.base
    facts_a = ", ".join(
        str(x)
        for x in (
            a.get("method") and (f"{a['method']} r={a['rank']}" if a.get("rank") else a["method"]),
            a.get("modules") and f"{a['modules']} modules",
            ", ".join(a.get("dtypes") or []) or None,
        )
        if x
    )
    fp = b.get("fingerprint")
    facts_b = ", ".join(
        str(x)
        for x in (b.get("architecture"), b.get("dtype"), b.get("quant"), fp and f"fingerprint {fp[:19]}")
        if x
    )
    echo(f"adapter  {_side(a)}" + (f"  ({facts_a})" if facts_a else ""))
    echo(f"base     {_side(b)}" + (f"  ({facts_b})" if facts_b else ""))
    if report.peft_version:
        echo(f"peft     {report.peft_version} (installed)")
    echo()
    table(["rule", "status", "summary"], [(r.id, r.status, _short(r.summary)) for r in report.rules])
    lines = []
    for r in report.rules:
        shown = [f for f in r.findings if f.severity in (ERROR, WARNING)][:_SHOWN]
        shown += [f for f in r.findings if f.severity not in (ERROR, WARNING)][:2]
        for f in shown:
            label = "note" if f.severity == "info" else f.severity
            lines.append(f"  {label}: {r.id}: {f.message}")
        hidden = sum(f.severity in (ERROR, WARNING) for f in r.findings) - _SHOWN
        if hidden > 0:
            lines.append(f"  ... {hidden} more {r.id} findings (see --json)")
    if lines:
        echo()
        echo("\n".join(lines))
    echo()
    echo(_verdict(report))


# --------------------------------------------------------------------------- JUnit


def _findings_text(r: RuleResult) -> str:
    return "\n".join(f"{f.severity}: {f.message}" for f in r.findings) or r.summary


def junit_xml(report: CheckReport, strict: bool = False) -> bytes:
    """The report as JUnit XML: one testcase per rule."""
    failures = sum(r.status == "error" or (strict and r.status == "warning") for r in report.rules)
    skipped = sum(r.status == "skipped" or (not strict and r.status == "warning") for r in report.rules)
    attrs = {
        "tests": str(len(report.rules)),
        "failures": str(failures),
        "errors": "0",
        "skipped": str(skipped),
        "time": f"{report.seconds:.3f}",
    }
    suites = ET.Element("testsuites", {"name": "adapterhub check", **attrs})
    suite = ET.SubElement(
        suites, "testsuite", {"name": f"adapterhub check {_side(report.adapter)} --base {_side(report.base)}", **attrs}
    )
    props = ET.SubElement(suite, "properties")
    for name, value in (
        ("adapter", _side(report.adapter)),
        ("base", _side(report.base)),
        ("status", report.status),
        ("strict", str(strict).lower()),
        ("peft_version", report.peft_version or ""),
        ("base_fingerprint", report.base.get("fingerprint") or ""),
    ):
        ET.SubElement(props, "property", {"name": name, "value": value})
    for r in report.rules:
        case = ET.SubElement(suite, "testcase", {"classname": "adapterhub.check", "name": r.id, "time": "0"})
        if r.status == "error" or (strict and r.status == "warning"):
            el = ET.SubElement(case, "failure", {"type": r.status, "message": r.summary})
            el.text = _findings_text(r)
        elif r.status == "warning":
            ET.SubElement(case, "skipped", {"message": f"warning: {r.summary}"})
        elif r.status == "skipped":
            ET.SubElement(case, "skipped", {"message": f"not applicable: {r.summary}"})
        out = ET.SubElement(case, "system-out")
        out.text = f"{r.id}: {r.title}\n{r.status}: {r.summary}\n" + (
            "".join(f"{f.severity}: {f.message}\n" for f in r.findings)
        )
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data=data)


def write_junit(report: CheckReport, path: Path, strict: bool = False) -> None:
    _write(path, junit_xml(report, strict))


def write_junit_error(path: Path, adapter: str, base: str | None, message: str, exit_code: int) -> None:
    """A report with one errored testcase, ``inputs``, when the check could not run at all."""
    attrs = {"tests": "1", "failures": "0", "errors": "1", "skipped": "0", "time": "0"}
    suites = ET.Element("testsuites", {"name": "adapterhub check", **attrs})
    suite = ET.SubElement(suites, "testsuite", {"name": f"adapterhub check {adapter} --base {base or '(default)'}", **attrs})
    case = ET.SubElement(suite, "testcase", {"classname": "adapterhub.check", "name": "inputs", "time": "0"})
    el = ET.SubElement(case, "error", {"type": f"exit {exit_code}", "message": message})
    el.text = message
    ET.indent(suites)
    _write(path, ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n")


# --------------------------------------------------------------------------- GitHub Actions


def _escape_data(s: str) -> str:
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_prop(s: str) -> str:
    return _escape_data(s).replace(":", "%3A").replace(",", "%2C")


def _annotation_file(report: CheckReport, f: Finding) -> str | None:
    path = report.adapter.get("path")
    if f.file is None or report.adapter.get("origin") != "path" or not path:
        return None
    full = Path(path) / f.file
    try:
        rel = os.path.relpath(full)
    except ValueError:
        return str(full)
    return str(full) if rel.startswith("..") else rel


def github_lines(report: CheckReport, strict: bool = False) -> Iterator[str]:
    """GitHub Actions workflow commands: one ::error or ::warning per finding (capped per rule)."""
    for r in report.rules:
        if r.status not in ("error", "warning"):
            continue
        hits = [f for f in r.findings if f.severity == r.status] or [Finding(r.status, r.summary)]
        for f in hits[:_ANNOTATIONS]:
            props = []
            file = _annotation_file(report, f)
            if file:
                props.append(f"file={_escape_prop(file)}")
            props.append(f"title={_escape_prop(f'adapterhub check: {r.id}')}")
            yield f"::{r.status} {','.join(props)}::{_escape_data(f.message)}"
        if len(hits) > _ANNOTATIONS:
            yield f"::{r.status} title={_escape_prop(f'adapterhub check: {r.id}')}::{len(hits) - _ANNOTATIONS} more {r.id} findings (see the JSON or JUnit report)"
    word = "error" if report.errors else "warning" if report.warnings and strict else "notice"
    yield f"::{word} title=adapterhub check::{_escape_data(_verdict(report))}"


def github_error(message: str) -> str:
    return f"::error title={_escape_prop('adapterhub check: inputs')}::{_escape_data(message)}"


def step_summary(report: CheckReport) -> None:
    """Append a Markdown table to $GITHUB_STEP_SUMMARY when GitHub Actions provides one."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return

    def cell(s: str) -> str:
        return _short(s, 160).replace("|", "\\|").replace("\n", " ")

    lines = [
        f"### adapterhub check: {_verdict(report)}",
        "",
        f"adapter `{_side(report.adapter)}`, base `{_side(report.base)}`",
        "",
        "| rule | status | summary |",
        "|---|---|---|",
    ]
    lines += [f"| `{r.id}` | {r.status} | {cell(r.summary)} |" for r in report.rules]
    with open(target, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n\n")
