"""Output directories of conversions: staged beside OUT and renamed into place when complete.

``staged_dir`` yields a temp dir beside OUT; on success it replaces OUT in
one rename, on any error (Ctrl-C included) it is removed and OUT is
untouched. ``write_text`` and ``copy_file`` put the small side files
(config, model card, tokenizer) into it atomically.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapterhub.errors import ConflictError
from adapterhub.fsutil import fsync_dir, storage_error, write_atomic


def write_text(path: Path, text: str) -> None:
    """Write a small file via temp + fsync + rename."""
    write_atomic(path, data=text.encode())


def copy_file(src: Path, dst: Path) -> None:
    """Copy a side file (config, tokenizer) into the staged output."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dst, src, mode=0o644)


@contextmanager
def staged_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``out``; rename it to ``out`` on success.

    On any exception (Ctrl-C included) the temp dir is removed and ``out`` is
    untouched. With ``force`` an existing ``out`` is replaced only once the
    new output is complete.
    """
    out = Path(out)
    if out.exists() and not force:
        raise ConflictError(f"{out} already exists", hint="pass --force to replace it")
    from adapterhub.fsutil import remove_stale_staging, staging_path

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)  # left by a killed run
        tmp = staging_path(out)
        tmp.mkdir()
    except OSError as e:
        raise storage_error(e, str(out)) from e
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.{secrets.token_hex(6)}.old"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
