"""rm, gc and fsck: commands that delete plan first, then act."""

from __future__ import annotations

import sys

import click

from adapterhub.cli._common import registry
from adapterhub.cli._output import Output, echo, human_size, json_option


def _confirm_or_stop(out: Output, plan, dry_run: bool, yes: bool) -> bool:
    """True when the plan should run. Never prompts when stdin is not a terminal."""
    if dry_run:
        out.message("dry run: nothing was deleted")
        return False
    if yes:
        return True
    if not sys.stdin.isatty():
        raise click.UsageError("refusing to delete without --yes (stdin is not a terminal); --dry-run shows the plan")
    return click.confirm("Proceed?", default=False, err=True)


def _print_plan(plan, verb: str) -> None:
    for v in plan.versions:
        echo(f"  {verb} {v}" if isinstance(v, str) else f"  {verb} {v[0]}:{v[1]}")
    for sha, size in plan.blobs:
        echo(f"  delete blob {sha[:16]}…  {human_size(size)}")
    for p in plan.temp_files:
        echo(f"  delete leftover {p}")
    for s in plan.staging:
        echo(f"  delete stale download {s.path}  {human_size(s.freed)}")
    if plan.records:
        echo(f"  delete {len(plan.records)} superseded record blob(s)")
    if plan.staging_busy:
        echo("  a remote pull is running: its staging area is left alone")
    echo(f"frees {human_size(plan.freed_bytes)}")


@click.command(name="rm")
@click.argument("ref")
@click.option("--all", "all_versions", is_flag=True, help="REF is a NAME: remove every version of it.")
@click.option("--dry-run", "-n", is_flag=True, help="Print the plan and stop.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
def registry_rm(ref: str, all_versions: bool, dry_run: bool, yes: bool, json_: bool):
    """Remove a version (or, with --all, a whole name) and the blobs only it used.

    The plan (versions, blobs and bytes freed) is printed first. Index rows
    go first and blobs last, so an interrupted rm never leaves a version
    pointing at missing data.

    \b
    Examples:
      adapterhub rm team/qa-lora:2 --dry-run
      adapterhub rm team/qa-lora:2 --yes
      adapterhub rm team/qa-lora --all --yes
    """
    out = Output(json_)
    if all_versions and (":" in ref or "@" in ref):
        name = ref.partition("@")[0] if "@" in ref else ref.rpartition(":")[0]
        raise click.UsageError(f"--all takes a NAME, not a {'version' if '@' not in ref else 'tag or digest'} ({name})")
    with registry() as reg:
        plan = reg.plan_rm(ref, all_versions=all_versions)
        if not json_:
            _print_plan(plan, "remove")
        if plan.dependents_warning:
            out.warn(plan.dependents_warning)
        run = _confirm_or_stop(out, plan, dry_run, yes)
        if run:
            reg.execute_rm(plan)
    out.result({**plan.to_dict(), "executed": run}, lambda: echo("done") if run else None)


@click.command(name="gc")
@click.option("--dry-run", "-n", is_flag=True, help="Print the plan and stop.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--staging-age", type=click.FloatRange(min=0), default=24, show_default=True, metavar="HOURS",
              help="Delete remote downloads left by broken pulls once untouched this long (0: all).")
@json_option
def registry_gc(dry_run: bool, yes: bool, staging_age: float, json_: bool):
    """Delete blobs that no version refers to, and leftovers of killed pushes and pulls.

    Leftovers are temp files of pushes, work dirs of killed Hub imports, and,
    in remote-staging/, downloads that a broken remote pull kept so that
    running it again resumes them.
    Those go once untouched for --staging-age hours, and never while a
    remote pull is running.

    \b
    Examples:
      adapterhub gc --dry-run
      adapterhub gc --yes
      adapterhub gc --yes --staging-age 0     # drop every kept download now
    """
    out = Output(json_)
    with registry() as reg:
        plan = reg.plan_gc(staging_max_age_s=staging_age * 3600)
        if not json_:
            _print_plan(plan, "remove")
        run = bool(plan.blobs or plan.temp_files or plan.staging or plan.records) and _confirm_or_stop(
            out, plan, dry_run, yes
        )
        if run:
            reg.execute_gc(plan)
    out.result({**plan.to_dict(), "executed": run}, lambda: echo("done") if run else None)


@click.command(name="fsck")
@click.option("--rebuild-index", is_flag=True,
              help="Rebuild a lost or damaged index.db from the record blobs in the store, then check.")
@click.option("--write-records", is_flag=True,
              help="Write the record blobs that versions made by an older adapterhub lack.")
@json_option
def registry_fsck(json_: bool, rebuild_index: bool = False, write_records: bool = False):
    """Re-hash every blob and check the index against the blob store.

    Lists every problem (missing or corrupt blobs, dangling tags, file lists
    that do not add up to their digest) and exits 6 if there is any.
    Unreferenced blobs, temp files from interrupted pushes and stale
    downloads of broken remote pulls are reported as reclaimable with
    `adapterhub gc`, not as damage.

    \b
    An empty, missing or damaged index.db beside a non-empty blob store is
    a problem (exit 6) for every command, gc included; --rebuild-index
    rebuilds it from the record blobs that every change also writes.

    \b
    Examples:
      adapterhub fsck --json
      adapterhub fsck --rebuild-index
    """
    out = Output(json_)
    rebuilt = None
    if rebuild_index:
        from adapterhub.registry import Registry

        reg, rebuilt = Registry.rebuild_index()
        for line in rebuilt.skipped:
            out.message(f"not restored: {line}")
        kept = f"; the old index is kept as {rebuilt.kept_aside}" if rebuilt.kept_aside else ""
        restored = ", ".join(f"{n} {kind}(s)" for kind, n in sorted(rebuilt.restored.items())) or "nothing"
        out.message(f"rebuilt the index: {restored}{kept}")
    else:
        reg = registry()
    with reg:
        if write_records:
            out.message(f"wrote {reg.write_records()} record(s)")
        report = reg.fsck(progress=out.progress)

    def human():
        for p in report.problems:
            echo(f"problem: {p}")
        echo(
            f"checked {report.blobs_checked} blobs ({human_size(report.bytes_checked)}): "
            + ("ok" if report.ok else f"{len(report.problems)} problem(s)")
        )
        if report.unreferenced or report.temp_files or report.staging:
            echo(
                f"reclaimable: {len(report.unreferenced)} unreferenced blob(s), "
                f"{len(report.temp_files)} temp file(s), {len(report.staging)} stale download(s); run `adapterhub gc`"
            )
        if report.unrecorded:
            echo(
                f"note: {report.unrecorded} version(s) have no record blob (made by an older adapterhub), so a lost "
                "index could not restore them: run `adapterhub fsck --write-records`"
            )

    out.result({**report.to_dict(), **({"rebuilt": rebuilt.to_dict()} if rebuilt else {})}, human)
    if not report.ok:
        sys.exit(6)
