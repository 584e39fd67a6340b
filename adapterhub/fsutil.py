"""Staging directories beside a destination, and cleaning up after killed runs.

A pull or a conversion builds its output in ``.<dest>.<pid>-<random>.incomplete``
beside ``<dest>`` and renames it into place at the end. A ``kill -9`` leaves
that directory behind; the next run for the same destination removes those
whose process is gone.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
from pathlib import Path

SUFFIX = ".incomplete"


def staging_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_staging(dest: Path) -> list[Path]:
    """Staging dirs for ``dest`` whose process no longer exists."""
    stale = []
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(\d+)-[0-9a-f]+{re.escape(SUFFIX)}$")
    for p in sorted(glob.glob(os.path.join(glob.escape(str(dest.parent)), f".{glob.escape(dest.name)}.*{SUFFIX}"))):
        m = pattern.match(os.path.basename(p))
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            stale.append(Path(p))
    return stale


def remove_stale_staging(dest: Path) -> list[Path]:
    """Remove staging dirs for ``dest`` left by processes that no longer exist."""
    removed = stale_staging(dest)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
