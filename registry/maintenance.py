"""``rm``, ``gc`` and ``fsck``: plan, then act; check the store against the index.

Blobs are deleted only after the index rows that referred to them are gone,
under the exclusive registry lock that no push or pull holds at the same
time. A ``kill -9`` at any point leaves at worst unreferenced blobs or
``.incomplete`` temp files, which ``gc`` reclaims and ``fsck`` reports as
reclaimable, not as damage.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import NotFoundError
from adapterhub.fsutil import stale_staging_in
from adapterhub.manifest import hash_file
from adapterhub.progress import Progress, ProgressFactory, start
from adapterhub.refs import Ref, check_name
from adapterhub.registry import records, signatures

if TYPE_CHECKING:
    from adapterhub.registry.blobs import BlobInfo
    from adapterhub.registry.registry import Registry
    from adapterhub.registry.remotes.oci import StagedLeftover

HF_IMPORT_DIR = "hf-import"  # Hub imports stage in .hf-import.<pid>-<hex>.incomplete


@dataclass(frozen=True)
class RemovePlan:
    """What ``rm``/``gc`` will delete. Built first, printed, then executed."""

    versions: tuple[tuple[str, str], ...]  # (name, version)
    blobs: tuple[tuple[str, int], ...]  # (sha256, size) no longer referenced afterwards
    temp_files: tuple[str, ...] = ()
    staging: tuple[StagedLeftover, ...] = ()  # stale partial downloads of remote pulls
    staging_busy: bool = False  # a remote pull holds the staging area: left alone
    dependents: tuple[str, ...] = ()  # refs derived (merged, quantized, ...) from content that goes
    records: tuple[tuple[str, int], ...] = ()  # superseded record blobs (registry/records.py)

    @property
    def dependents_warning(self) -> str | None:
        """Removing content others were derived from is allowed, but worth saying."""
        if not self.dependents:
            return None
        n = len(self.dependents)
        what = "it" if len(self.versions) == 1 else "them"
        return (
            f"{n} artifact{'s were' if n != 1 else ' was'} derived from {what}: {', '.join(self.dependents)}; "
            f"{'their' if n != 1 else 'its'} lineage will point at a digest that is no longer here"
        )

    @property
    def freed_bytes(self) -> int:
        return (
            sum(size for _, size in self.blobs) + sum(s.freed for s in self.staging) + sum(n for _, n in self.records)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "versions": [f"{n}:{v}" for n, v in self.versions],
            "blobs": [{"sha256": s, "size": n} for s, n in self.blobs],
            "temp_files": list(self.temp_files),
            "staging": [{"path": str(s.path), "size": s.freed} for s in self.staging],
            "staging_busy": self.staging_busy,
            "freed_bytes": self.freed_bytes,
            "dependents": list(self.dependents),
            "records": len(self.records),
        }


@dataclass(frozen=True)
class FsckReport:
    problems: tuple[str, ...]
    blobs_checked: int
    bytes_checked: int
    unreferenced: tuple[str, ...] = ()  # reclaimable by gc, not damage
    temp_files: tuple[str, ...] = ()
    staging: tuple[str, ...] = ()  # stale partial downloads of remote pulls, reclaimable by gc
    unrecorded: int = 0  # versions without a record blob (made before records): a rebuild would miss them
    records_checked: int = 0  # record blobs re-hashed (registry/records.py)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": list(self.problems),
            "blobs_checked": self.blobs_checked,
            "bytes_checked": self.bytes_checked,
            "unreferenced_blobs": list(self.unreferenced),
            "temp_files": list(self.temp_files),
            "staging": list(self.staging),
            "unrecorded_versions": self.unrecorded,
            "records_checked": self.records_checked,
        }


def plan_rm(reg: Registry, ref: str | Ref, *, all_versions: bool = False) -> RemovePlan:
    if all_versions:
        name = check_name(str(ref))
        versions = [(v.name, v.version) for v in reg.index.versions(name)]
        if not versions:
            raise NotFoundError(f"unknown name {name!r}")
    else:
        info = reg.resolve(ref)
        versions = [(info.name, info.version)]
    gone = set(versions)
    drop_digests, blobs = reg.index.removal(gone)
    # Children that stay keep their lineage rows, now pointing at a digest
    # that is gone: allowed, but the plan says so.
    dependents = sorted(
        {
            ref
            for d in drop_digests
            for child in reg.index.children(d)
            if child["digest"] not in drop_digests
            for ref in reg.index.refs_of(child["digest"])
            if tuple(ref.rsplit(":", 1)) not in gone
        }
    )
    return RemovePlan(tuple(versions), tuple(sorted(blobs.items())), dependents=tuple(dependents))


def execute_rm(reg: Registry, plan: RemovePlan) -> RemovePlan:
    """Delete index rows first, then blobs nothing refers to any more."""
    reg.index.remove_versions(plan.versions)
    delete_unreferenced(reg, {s for s, _ in plan.blobs})
    return plan


def _temp_files(reg: Registry) -> tuple[str, ...]:
    """Blob and record temp files, and every staging area in the home whose process is gone."""
    return tuple(sorted(str(p) for p in [*reg.blobs.temp_files(), *reg.records.temp_files()])) + tuple(
        str(p) for p in stale_home_staging(reg.home)
    )


# Staging areas made before they carried their owner's pid (mkdtemp names):
# a merge --push's ``.convert-*``, a sign's ``.view-*.incomplete``, a signature's
# ``.sig-*.incomplete``. Their owner cannot be asked, so they count as leftovers
# once untouched for a day.
_LEGACY_STAGING = re.compile(r"^\.(convert|view|sig)-[A-Za-z0-9_]+(\.incomplete)?$")
LEGACY_STAGING_AGE_S = 24 * 3600


def stale_home_staging(home: Path) -> list[Path]:
    """Staging areas in the home left by processes that are gone: conversions
    (``merge --push``), signing views, Hub imports (``.<purpose>.<pid>-<hex>.incomplete``)."""
    stale = stale_staging_in(home)
    try:
        names = sorted(os.listdir(home))
    except FileNotFoundError:
        return stale
    now = time.time()
    for name in names:
        if _LEGACY_STAGING.match(name):
            p = home / name
            try:
                if now - p.lstat().st_mtime > LEGACY_STAGING_AGE_S:
                    stale.append(p)
            except FileNotFoundError:
                pass
    return stale


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def plan_gc(reg: Registry, staging_max_age_s: float | None = None) -> RemovePlan:
    """Unreferenced blobs, temp files, and remote downloads untouched for
    ``staging_max_age_s`` (default: a day) that no running pull holds."""
    from adapterhub.registry.remotes.oci import STAGING_MAX_AGE_S, stale_staging

    referenced = reg.index.referenced_blobs()
    blobs = tuple((b.sha256, b.size) for b in reg.blobs if b.sha256 not in referenced)
    current = records.referenced(reg.index)
    superseded = tuple((b.sha256, b.size) for b in reg.records if b.sha256 not in current)
    age = STAGING_MAX_AGE_S if staging_max_age_s is None else staging_max_age_s
    staged, busy = stale_staging(reg, age)
    return RemovePlan((), blobs, _temp_files(reg), tuple(staged), busy, records=superseded)


def execute_gc(reg: Registry, plan: RemovePlan) -> RemovePlan:
    from adapterhub.registry.remotes.oci import remove_staging

    with reg._lock(exclusive=True):
        # No push or pull runs now, so every temp file is a leftover.
        for p in [*reg.blobs.temp_files(), *reg.records.temp_files()]:
            p.unlink(missing_ok=True)
        for p in stale_home_staging(reg.home):  # re-checks that their process is gone
            _remove(p)
    # Under the pull lock (never waited for): a pull that started since
    # the plan keeps its files.
    remove_staging(reg, plan.staging)
    delete_unreferenced(reg, {s for s, _ in plan.blobs})
    if plan.records:
        with reg._lock(exclusive=True):
            current = records.referenced(reg.index)  # re-read: a write may have pointed at one since
            for sha in sorted({s for s, _ in plan.records} - current):
                reg.records.remove(sha)
    return plan


def delete_unreferenced(reg: Registry, candidates: set[str]) -> None:
    if not candidates:
        return
    with reg._lock(exclusive=True):
        # Re-read under the lock: a push may have referenced a blob since the plan.
        referenced = reg.index.referenced_blobs()
        for sha in sorted(candidates - referenced):
            reg.blobs.remove(sha)


def fsck(reg: Registry, progress: ProgressFactory | None = None) -> FsckReport:
    """Re-hash every blob and cross-check the index against the store.

    Every file row's size is compared with its blob's (a blob recorded with
    the wrong size is damage even when its hash is right), and every blob is
    re-hashed: a blob changed in place, through a hard link or otherwise,
    is found whatever its size.
    """
    problems = list(reg.index.check())
    referenced: dict[str, list[str]] = {}
    sizes: dict[str, set[tuple[int, str]]] = {}
    for digest, path, sha, size in reg.index.file_rows():
        referenced.setdefault(sha, []).append(path)
        sizes.setdefault(sha, set()).add((size, f"{path} in {digest[:19]}…"))
    for sha in signatures.blobs(reg.index):
        referenced.setdefault(sha, []).append("(signature)")
    stored = {b.sha256: b for b in reg.blobs}
    records_stored = {b.sha256: b for b in reg.records}
    records_used = records.referenced(reg.index)
    total = sum(b.size for s, b in stored.items() if s in referenced)
    total += sum(b.size for s, b in records_stored.items() if s in records_used)
    bar = start(progress, "checking blobs", total)
    checked = nbytes = records_checked = 0
    try:
        for sha in sorted(referenced):
            b = stored.get(sha)
            users = ", ".join(sorted(set(referenced[sha]))[:3])
            if b is None:
                problems.append(f"blob {sha} is missing (used by {users})")
                continue
            corrupt = _rehash(b, bar, f"used by {users}")
            problems += corrupt or [
                f"blob {sha} is {b.size} bytes, but {where} is recorded as {size} bytes"
                for size, where in sorted(sizes.get(sha, ()))
                if size != b.size
            ]
            checked += 1
            nbytes += b.size
        for sha in sorted(records_used):  # counted apart: blobs_checked is the artifacts' blobs
            b = records_stored.get(sha)
            if b is None:
                problems.append(f"record blob {sha} is missing (an index rebuild would lose what it records)")
                continue
            problems += _rehash(b, bar, "a record blob")
            records_checked += 1
    finally:
        bar.close()
    unreferenced = tuple(sorted(s for s in stored if s not in referenced))
    from adapterhub.registry.remotes.oci import stale_staging

    staged = tuple(str(s.path) for s in stale_staging(reg)[0])
    return FsckReport(
        tuple(problems), checked, nbytes, unreferenced, _temp_files(reg), staged, records.missing_versions(reg.index),
        records_checked,
    )


def _rehash(b: BlobInfo, bar: Progress, what: str) -> list[str]:
    got = hash_file(b.path, bar.update)
    return [] if got == b.sha256 else [f"blob {b.sha256} is corrupt: its content hashes to {got} ({what})"]
