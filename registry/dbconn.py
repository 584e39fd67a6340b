"""The SQLite connection of the index, with SQLite's errors said in the user's terms.

Every statement and every fetch goes through :class:`Connection` and its
cursors, so an error from any query, in any command, comes out the same way:

- a damaged file (``SQLITE_CORRUPT``: "database disk image is malformed",
  ``SQLITE_NOTADB``: "file is not a database") is an ``IntegrityError``
  (exit 6) that says how to rebuild the index from the blob store;
- a full disk or an I/O error is a ``StorageError`` (exit 7).

Other SQLite errors (busy, a constraint) stay ``sqlite3`` errors for the
caller to handle.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from adapterhub.errors import AdapterhubError, IntegrityError, StorageError
from adapterhub.fsutil import storage_error

BUSY_TIMEOUT_S = 120.0
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_NOTADB = 26
SQLITE_IOERR = 10
REBUILD_HINT = (
    "run `adapterhub fsck --rebuild-index`: it rebuilds the index from the records kept in the blob store"
    " (the damaged file is kept beside it); do not run `adapterhub gc` before that"
)


def damaged(path: Path, why: str) -> IntegrityError:
    return IntegrityError(f"the registry index {path} is damaged ({why})", hint=REBUILD_HINT)


def storage_problem(e: sqlite3.Error, path: Path) -> StorageError | None:
    """SQLite's disk-full and I/O errors as ``StorageError`` (exit 7), not as a crash.

    On a full disk SQLite says SQLITE_FULL when a write fails, but
    SQLITE_IOERR when it cannot even size the WAL index (``-shm``) on open.
    """
    code = getattr(e, "sqlite_errorcode", None)  # Python 3.11+
    msg = str(e)
    full = code == SQLITE_FULL if code is not None else "disk is full" in msg
    ioerr = (code is not None and (code & 0xFF) == SQLITE_IOERR) or "disk I/O error" in msg  # SQLITE_IOERR_*
    if full or (ioerr and shutil.disk_usage(path.parent).free < (1 << 20)):
        return storage_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), f"the registry index {path}")
    if ioerr:
        return storage_error(OSError(errno.EIO, msg), f"the registry index {path}")
    return None


def user_error(e: sqlite3.Error, path: Path) -> AdapterhubError | None:
    """``e`` as the error a user can act on, or None when it is not about the file itself."""
    code = getattr(e, "sqlite_errorcode", None)
    msg = str(e)
    if (code is not None and (code & 0xFF) in (SQLITE_CORRUPT, SQLITE_NOTADB)) or (
        "malformed" in msg or "not a database" in msg
    ):
        return damaged(path, msg)
    return storage_problem(e, path)


class Cursor(sqlite3.Cursor):
    def _fail(self, e: sqlite3.Error) -> BaseException:
        return user_error(e, self.connection.path) or e  # type: ignore[attr-defined]

    def execute(self, *a: Any) -> Cursor:  # type: ignore[override]
        try:
            return super().execute(*a)
        except sqlite3.Error as e:
            raise self._fail(e) from e

    def executemany(self, *a: Any) -> Cursor:  # type: ignore[override]
        try:
            return super().executemany(*a)
        except sqlite3.Error as e:
            raise self._fail(e) from e

    def executescript(self, *a: Any) -> Cursor:  # type: ignore[override]
        try:
            return super().executescript(*a)
        except sqlite3.Error as e:
            raise self._fail(e) from e

    def fetchone(self) -> Any:
        try:
            return super().fetchone()
        except sqlite3.Error as e:
            raise self._fail(e) from e

    def fetchmany(self, *a: Any) -> list[Any]:
        try:
            return super().fetchmany(*a)
        except sqlite3.Error as e:
            raise self._fail(e) from e

    def fetchall(self) -> list[Any]:
        try:
            return super().fetchall()
        except sqlite3.Error as e:
            raise self._fail(e) from e

    def __next__(self) -> Any:
        try:
            return super().__next__()
        except sqlite3.Error as e:
            raise self._fail(e) from e


class Connection(sqlite3.Connection):
    path: Path

    def cursor(self, factory: Any = Cursor) -> Any:  # type: ignore[override]
        return super().cursor(factory)


def connect(path: Path) -> Connection:
    try:
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False, factory=Connection
        )
    except sqlite3.Error as e:
        raise user_error(e, path) or e from e
    conn.path = path
    conn.execute(f"pragma busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    return conn
