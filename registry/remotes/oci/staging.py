"""The pull staging area, ``$ADAPTERHUB_HOME/remote-staging``: downloads kept for a
resume, the lock that lets one pull at a time use them, and what ``gc`` may
collect there.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapterhub.errors import StorageError
from adapterhub.fsutil import storage_error

if TYPE_CHECKING:
    from adapterhub.registry import Registry


def staging_root(reg: Registry) -> Path:
    return reg.home / "remote-staging"


def _staging_lock_path(stage: Path) -> Path:
    return stage / "pull.lock"


@contextmanager
def staging_lock(stage: Path) -> Iterator[None]:
    try:
        stage.mkdir(parents=True, exist_ok=True)
        fh = open(_staging_lock_path(stage), "a")  # noqa: SIM115 - held across the yield
    except OSError as e:
        raise storage_error(e, "the pull's staging area") from e
    with fh:
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageError("another pull into this registry is still running",
                                       hint="retry when it has finished") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# Partial downloads are kept so that running a broken pull again resumes it;
# after this long, ``gc`` takes them to be abandoned.
STAGING_MAX_AGE_S = 24 * 3600.0


@contextmanager
def _staging_idle(stage: Path) -> Iterator[bool]:
    """Hold the pull lock without waiting; yields False when a pull holds it now.

    Creates nothing: with no lock file, no pull has ever staged anything here.
    """
    try:
        fh = open(_staging_lock_path(stage), "rb")  # noqa: SIM115 - held across the yield
    except FileNotFoundError:
        yield True
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass(frozen=True)
class StagedLeftover:
    """A file or work dir in ``remote-staging/`` that no pull needs any more."""

    path: Path
    freed: int  # bytes that deleting it gives back (0 for hard links)
    mtime_ns: int  # as listed; a file changed since then is kept (-1: a work dir)


def _stale_staging(stage: Path, max_age_s: float, now: float) -> list[StagedLeftover]:
    out = []
    for d in sorted(stage.glob("pull-*.incomplete")):  # a killed pull's work dir: any age
        freed = 0
        for p in d.rglob("*"):
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if not os.path.isdir(p) and st.st_nlink == 1:
                freed += st.st_size
        out.append(StagedLeftover(d, freed, -1))
    blobs = stage / "blobs"
    if blobs.is_dir():
        for p in sorted(blobs.iterdir()):
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if now - st.st_mtime >= max_age_s:
                out.append(StagedLeftover(p, st.st_size if st.st_nlink == 1 else 0, st.st_mtime_ns))
    return out


def stale_staging(reg: Registry, max_age_s: float = STAGING_MAX_AGE_S) -> tuple[list[StagedLeftover], bool]:
    """Leftovers of broken pulls in ``remote-staging/``; returns (leftovers, busy).

    Downloads (``blobs/<hex>``, ``blobs/<hex>.partial``) untouched for
    ``max_age_s``, and work dirs of killed pulls. ``busy`` is True, and
    nothing is listed, while a pull holds the staging lock.
    """
    stage = staging_root(reg)
    if not stage.is_dir():
        return [], False
    with _staging_idle(stage) as idle:
        if not idle:
            return [], True
        return _stale_staging(stage, max_age_s, time.time()), False


def remove_staging(reg: Registry, planned: Iterable[StagedLeftover]) -> tuple[list[StagedLeftover], bool]:
    """Delete what :func:`stale_staging` listed; returns (removed, busy).

    Under the pull lock, taken without waiting: while a pull runs nothing is
    removed (busy). A download changed since it was listed (a pull resumed
    it meanwhile) is kept.
    """
    stage = staging_root(reg)
    planned = list(planned)
    if not planned or not stage.is_dir():
        return [], False
    removed = []
    with _staging_idle(stage) as idle:
        if not idle:
            return [], True
        for item in planned:
            p = Path(item.path)
            if p.parent not in (stage, stage / "blobs"):
                continue  # only ever what stale_staging lists
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if item.mtime_ns < 0:
                shutil.rmtree(p, ignore_errors=True)
            elif st.st_mtime_ns == item.mtime_ns:
                p.unlink(missing_ok=True)
            else:
                continue
            removed.append(item)
    return removed, False
