"""The SQLite index: names, versions, tags, files, metadata.

Reads go through the standard library's sqlite3 so that read-only commands
start fast; schema changes and writes of structured rows go through
sqlite-utils (imported on first write). The database runs in WAL mode with a
busy timeout, and every write is one ``BEGIN IMMEDIATE`` transaction, so
concurrent pushers serialise on the write lock and a ``kill -9`` at any point
leaves either the whole push or none of it.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import ConflictError, NotFoundError, StorageError
from adapterhub.registry import records
from adapterhub.registry.dbconn import connect, user_error
from adapterhub.manifest import FileEntry, Manifest
from adapterhub.refs import Ref

if TYPE_CHECKING:
    from sqlite_utils import Database

    from adapterhub.artifact import Inspection
    from adapterhub.registry.records import RecordStore

# Names of the migrations in registry/migrations.py, in order.
SCHEMA: tuple[str, ...] = ("m001_initial", "m002_trust", "m003_files_size_index", "m004_verifications", "m005_remotes",
                          "m006_version_seq", "m007_records",
                          "m008_read_indexes", "m009_listing_indexes")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    digest: str
    created_at: str
    description: str | None
    tags: tuple[str, ...]
    kind: str
    method: str | None
    base_model: str | None
    rank: int | None
    quant: str | None
    size: int
    file_count: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": f"{self.name}:{self.version}",
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "tags": list(self.tags),
            "created_at": self.created_at,
            "description": self.description,
            "kind": self.kind,
            "method": self.method,
            "base_model": self.base_model,
            "rank": self.rank,
            "quant": self.quant,
            "size": self.size,
            "file_count": self.file_count,
        }


# The tags of each row come from a correlated subquery on tags(name, version):
# a join on a grouped subquery would read every tag for every lookup.
_VERSION_SELECT = """
select v.name, v.version, v.digest, v.created_at, v.description,
       (select group_concat(t.tag, ',') from tags t where t.name = v.name and t.version = v.version) as tags,
       a.kind, a.method, a.base_model, a.rank, a.quant, a.size, a.file_count
from versions v join artifacts a on a.digest = v.digest
"""


def _row_to_version(row: Sequence[Any]) -> VersionInfo:
    tags = tuple(sorted(row[5].split(","))) if row[5] else ()
    return VersionInfo(row[0], row[1], row[2], row[3], row[4], tags, *row[6:])


class Index:
    def __init__(self, path: str | os.PathLike, *, create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists() and not create:
            raise NotFoundError(f"no registry index at {self.path}")
        self._db: Database | None = None
        self._depth = 0  # nesting of write(): inner ones join the outer transaction
        # Where record blobs go (registry/records.py); None: no records (a bare Index, as in benchmarks).
        self.record_store: RecordStore | None = None
        self.conn = connect(self.path)
        try:
            self._ensure_schema()
        except sqlite3.Error as e:
            raise user_error(e, self.path) or e from e

    # -- schema ---------------------------------------------------------------

    def _applied(self) -> list[str]:
        try:
            rows = self.conn.execute(
                "select name from _sqlite_migrations where migration_set = 'adapterhub' order by id"
            ).fetchall()
        except sqlite3.OperationalError:
            return []
        return [r[0] for r in rows]

    def _ensure_schema(self) -> None:
        if self._applied() == list(SCHEMA):
            return
        # First open (or an upgrade): serialise migrations across processes.
        lock = self.path.with_name(self.path.name + ".migrate.lock")
        with open(lock, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            self.conn.execute("pragma journal_mode = wal")
            from adapterhub.registry.migrations import migrations

            migrations.apply(self.db)
            applied = self._applied()
        unknown = [m for m in applied if m not in SCHEMA]
        if unknown:
            raise StorageError(
                f"the registry index was written by a newer adapterhub (migrations {unknown})",
                hint="upgrade adapterhub",
            )

    @property
    def db(self) -> Database:
        if self._db is None:
            from sqlite_utils import Database

            self._db = Database(self.conn)
        return self._db

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking SQLite's write lock up front.

        Inside another ``write()`` (see :meth:`bulk`) it joins the outer one.
        """
        if self._depth:
            self._depth += 1
            try:
                yield self.conn
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            yield from self._transaction()
        finally:
            self._depth = 0

    bulk = write  # ``with index.bulk(): ...many add_version...``: one transaction for all

    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self.conn.execute("begin immediate")
        except sqlite3.OperationalError as e:
            raise user_error(e, self.path) or StorageError(f"registry index is busy: {e}") from e
        try:
            yield self.conn
        except BaseException as e:
            if self.conn.in_transaction:
                self.conn.execute("rollback")
            if isinstance(e, sqlite3.Error):
                raise user_error(e, self.path) or e
            raise
        else:
            try:
                self.conn.execute("commit")
            except sqlite3.Error as e:
                # A failed COMMIT (SQLITE_FULL) can leave the transaction open.
                if self.conn.in_transaction:
                    self.conn.execute("rollback")
                raise user_error(e, self.path) or e

    def close(self) -> None:
        self.conn.close()

    # -- writes ---------------------------------------------------------------

    def add_version(
        self,
        name: str,
        version: str | None,
        manifest: Manifest,
        inspection: Inspection,
        *,
        description: str | None = None,
        tags: Sequence[str] = (),
        derived_from: Sequence[tuple[str, str]] = (),
        recipe: dict[str, Any] | None = None,
        created_at: str | None = None,
        move_latest: bool = True,
    ) -> tuple[VersionInfo, bool]:
        """Record ``manifest`` as ``name:version``. Returns (version, created).

        Identical content already under ``name`` is a no-op that returns the
        existing version. A new version moves ``latest`` (with
        ``move_latest=False``, as a remote import does, only a name that has
        no ``latest`` yet gets one). ``created_at`` (default: now) is for a
        rebuild, which restores the original times.
        """
        digest = manifest.digest
        ts = created_at or now()
        with self.write():
            existing = self._existing_version(name, version, digest)
            if existing is None:
                self._insert_artifact(manifest, inspection, ts)
                version = self._insert_version(name, version, digest, description, _search_text(inspection), ts)
                if move_latest or self.conn.execute(
                    "select 1 from tags where name = ? and tag = 'latest'", (name,)
                ).fetchone() is None:
                    self._set_tag(name, "latest", version, ts)
            else:
                version = existing
            for tag in tags:
                self._set_tag(name, tag, version, ts)
            recipe_json = json.dumps(recipe, sort_keys=True) if recipe is not None else None
            for parent, relation in derived_from:
                self.conn.execute(
                    "insert into lineage (digest, parent, relation, recipe, created_at) values (?, ?, ?, ?, ?) "
                    "on conflict(digest, parent, relation) do update set recipe = excluded.recipe, "
                    "created_at = excluded.created_at",
                    (digest, parent, relation, recipe_json, ts),
                )
            if existing is None or derived_from:
                records.note_version(self, name, version)
        return self.get_version(name, version), existing is None

    def _existing_version(self, name: str, version: str | None, digest: str) -> str | None:
        """The version of ``name`` that already holds ``digest`` (the one asked for, or any)."""
        if version is not None:
            row = self.conn.execute(
                "select digest from versions where name = ? and version = ?", (name, version)
            ).fetchone()
            if row is None:
                return None
            if row[0] != digest:
                raise ConflictError(
                    f"{name}:{version} already exists with other content ({row[0][:19]}…)",
                    hint="versions are immutable: push without a version to get the next one",
                )
            return version
        row = self.conn.execute(
            "select version from versions where name = ? and digest = ? order by id limit 1", (name, digest)
        ).fetchone()
        return row[0] if row is not None else None

    def _insert_version(
        self, name: str, version: str | None, digest: str, description: str | None, search_text: str, ts: str,
    ) -> str:
        if version is None:
            # Never reuse a number, even one whose version was removed.
            (top,) = self.conn.execute(
                "select max(coalesce((select last_seq from names where name = ?), 0),"
                " coalesce((select max(seq) from versions where name = ?), 0))",
                (name, name),
            ).fetchone()
            version = str(top + 1)
        seq = int(version) if version.isdigit() else None
        self.conn.execute(
            "insert into names (name, description, created_at, updated_at, last_seq) values (?, ?, ?, ?, ?) "
            "on conflict(name) do update set updated_at = excluded.updated_at, "
            "description = coalesce(excluded.description, names.description), "
            "last_seq = max(names.last_seq, excluded.last_seq)",
            (name, description, ts, ts, seq or 0),
        )
        self.conn.execute(
            "insert into versions (name, version, seq, digest, description, search_text, created_at)"
            " values (?, ?, ?, ?, ?, ?, ?)",
            (name, version, seq, digest, description, search_text, ts),
        )
        return version

    def _insert_artifact(self, manifest: Manifest, ins: Inspection, ts: str) -> None:
        # Plain SQL: sqlite-utils' insert looks the table up again on every
        # call, which was most of a push's index time (issue 14).
        digest = manifest.digest
        if self.has_artifact(digest):
            return
        d = ins.to_dict()
        self.conn.execute(
            "insert into artifacts (digest, kind, format, method, base_model, base_revision, rank, alpha, quant,"
            " task_type, size, file_count, params, dtypes, fingerprint, inspection, created_at)"
            " values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                digest, ins.kind, ins.format, ins.method, ins.base_model, ins.base_revision, ins.rank, ins.alpha,
                ins.quant, ins.task_type, manifest.size, len(manifest), ins.params, json.dumps(ins.dtypes),
                (ins.fingerprint or {}).get("digest"), json.dumps(d, sort_keys=True), ts,
            ),
        )
        self.conn.executemany(
            "insert into files (digest, path, size, sha256) values (?, ?, ?, ?)",
            [(digest, f.path, f.size, f.sha256) for f in manifest.files],
        )
        self.conn.executemany(
            "insert into metadata (digest, key, value) values (?, ?, ?)", [(digest, k, v) for k, v in _flatten(d)]
        )

    def _set_tag(self, name: str, tag: str, version: str, ts: str) -> None:
        self.conn.execute(
            "insert into tags (name, tag, version, updated_at) values (?, ?, ?, ?) "
            "on conflict(name, tag) do update set version = excluded.version, updated_at = excluded.updated_at",
            (name, tag, version, ts),
        )
        records.note_tag(self, name, tag, version, ts)

    def set_tag(self, ref: Ref, tag: str) -> VersionInfo:
        with self.write():
            info = self.resolve(ref)
            self._set_tag(info.name, tag, info.version, now())
        return self.get_version(info.name, info.version)

    def remove_tag(self, name: str, tag: str) -> None:
        with self.write():
            cur = self.conn.execute("delete from tags where name = ? and tag = ?", (name, tag))
            if cur.rowcount == 0:
                raise NotFoundError(f"{name} has no tag {tag!r}")
            records.note_tag(self, name, tag, None)

    def remove_versions(self, versions: Sequence[tuple[str, str]]) -> None:
        """Delete versions, their tags, and artifacts no version refers to any more.

        The ``names`` row stays, with the highest integer version the name
        has had, so that the next push never reuses a removed number.
        """
        with self.write():
            for name, version in versions:
                for (tag,) in self.conn.execute(
                    "select tag from tags where name = ? and version = ?", (name, version)
                ).fetchall():
                    records.note_tag(self, name, tag, None)
                records.note(self, "version", f"{name}:{version}", None)
                self.conn.execute("delete from tags where name = ? and version = ?", (name, version))
                self.conn.execute(
                    "delete from versions where name = ? and version = ?", (name, version)
                )
                # `latest` falls back to the newest remaining version.
                newest = self.conn.execute(
                    "select version from versions where name = ? order by id desc limit 1", (name,)
                ).fetchone()
                if newest is not None and not self.conn.execute(
                    "select 1 from tags where name = ? and tag = 'latest'", (name,)
                ).fetchone():
                    self._set_tag(name, "latest", newest[0], now())
            for table in ("files", "metadata", "lineage", "signatures", "verifications", "artifacts"):
                self.conn.execute(
                    f"delete from {table} where digest not in (select digest from versions)"
                )
            records.drop_orphans(self)

    # -- reads ----------------------------------------------------------------

    def get_version(self, name: str, version: str) -> VersionInfo:
        row = self.conn.execute(
            _VERSION_SELECT + " where v.name = ? and v.version = ?", (name, version)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"unknown ref {name}:{version}")
        return _row_to_version(row)

    def resolve(self, ref: Ref) -> VersionInfo:
        if ref.version is not None:
            return self.get_version(ref.name, ref.version)
        if ref.digest is not None:
            row = self.conn.execute(
                _VERSION_SELECT + " where v.name = ? and v.digest = ? order by v.id limit 1",
                (ref.name, ref.digest),
            ).fetchone()
            if row is None:
                raise NotFoundError(f"unknown ref {ref}")
            return _row_to_version(row)
        row = self.conn.execute(
            "select version from tags where name = ? and tag = ?", (ref.name, ref.tag)
        ).fetchone()
        if row is None:
            known = self.conn.execute("select 1 from versions where name = ? limit 1", (ref.name,)).fetchone()
            raise NotFoundError(
                f"unknown ref {ref}" if known else f"unknown name {ref.name!r}",
                hint="`adapterhub ls` lists what the registry holds",
            )
        return self.get_version(ref.name, row[0])

    def files(self, digest: str) -> list[FileEntry]:
        rows = self.conn.execute(
            "select path, size, sha256 from files where digest = ?", (digest,)
        ).fetchall()
        return list(Manifest.from_entries(FileEntry(*r) for r in rows).files)

    def inspection(self, digest: str) -> dict[str, Any]:
        row = self.conn.execute("select inspection from artifacts where digest = ?", (digest,)).fetchone()
        if row is None:
            raise NotFoundError(f"unknown artifact {digest}")
        return json.loads(row[0])

    def versions(self, name: str | None = None, limit: int | None = None) -> list[VersionInfo]:
        """Every version (of ``name``), by name then push order; at most ``limit``."""
        tail = f" limit {int(limit)}" if limit is not None else ""
        if name is None:
            rows = self.conn.execute(_VERSION_SELECT + " order by v.name, v.id" + tail).fetchall()
        else:
            rows = self.conn.execute(_VERSION_SELECT + " where v.name = ? order by v.id" + tail, (name,)).fetchall()
        return [_row_to_version(r) for r in rows]

    def search(self, text: str | None = None, **filters: Any) -> list[VersionInfo]:
        """Versions matching ``text`` (full-text, every word as a prefix) and filters; see ``registry.search``."""
        from adapterhub.registry.search import search

        return search(self, text, **filters)

    def parents(self, digest: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "select parent, relation, recipe, created_at from lineage where digest = ? order by relation", (digest,)
        ).fetchall()
        return [
            {"digest": p, "relation": r, "recipe": json.loads(rc) if rc else None, "created_at": c}
            for p, r, rc, c in rows
        ]

    def children(self, digest: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "select digest, relation, recipe, created_at from lineage where parent = ? order by created_at", (digest,)
        ).fetchall()
        return [
            {"digest": d, "relation": r, "recipe": json.loads(rc) if rc else None, "created_at": c}
            for d, r, rc, c in rows
        ]

    def has_artifact(self, digest: str) -> bool:
        return self.conn.execute("select 1 from artifacts where digest = ?", (digest,)).fetchone() is not None

    def kind_of(self, digest: str) -> str | None:
        """The artifact's kind (adapter, merged, quantized, ...); None when the registry does not hold it."""
        row = self.conn.execute("select kind from artifacts where digest = ?", (digest,)).fetchone()
        return row[0] if row else None

    def file_rows(self) -> Iterator[tuple[str, str, str, int]]:
        """Every file row: (artifact digest, path, sha256, size)."""
        yield from self.conn.execute("select digest, path, sha256, size from files")

    def removal(self, gone: set[tuple[str, str]]) -> tuple[set[str], dict[str, int]]:
        """What removing the versions ``gone`` frees: (artifact digests, {blob sha256: size})."""
        keep_digests: set[str] = set()
        drop_digests: set[str] = set()
        for n, v, d in self.conn.execute("select name, version, digest from versions"):
            (drop_digests if (n, v) in gone else keep_digests).add(d)
        drop_digests -= keep_digests
        keep_blobs: set[str] = set()
        for d in keep_digests:
            keep_blobs.update(s for (s,) in self.conn.execute("select sha256 from files where digest = ?", (d,)))
        blobs: dict[str, int] = {}
        for d in drop_digests:
            for s, size in self.conn.execute("select sha256, size from files where digest = ?", (d,)):
                if s not in keep_blobs:
                    blobs[s] = size
        return drop_digests, blobs

    def refs_of(self, digest: str) -> list[str]:
        return [
            f"{n}:{v}"
            for n, v in self.conn.execute(
                "select name, version from versions where digest = ? order by id", (digest,)
            )
        ]

    def file_sizes(self, sizes: set[int]) -> set[int]:
        """Which of ``sizes`` some stored file has (content of another size is new)."""
        found: set[int] = set()
        for size in sizes:
            if self.conn.execute("select 1 from files where size = ? limit 1", (size,)).fetchone():
                found.add(size)
        return found

    def referenced_blobs(self) -> set[str]:
        """sha256 hex of every blob the index refers to (files and signatures)."""
        refs = {r[0] for r in self.conn.execute("select distinct sha256 from files")}
        refs |= {r[0] for r in self.conn.execute("select distinct blob from signatures")}
        return refs

    def check(self) -> list[str]:
        """Problems inside the index itself (fsck's first pass)."""
        problems = []
        (ok,) = self.conn.execute("pragma quick_check").fetchone()
        if ok != "ok":
            problems.append(f"index: sqlite quick_check: {ok}")
        for (digest,) in self.conn.execute(
            "select distinct v.digest from versions v left join artifacts a on a.digest = v.digest "
            "where a.digest is null"
        ):
            problems.append(f"index: version points at unknown artifact {digest}")
        for name, tag, version in self.conn.execute(
            "select t.name, t.tag, t.version from tags t left join versions v "
            "on v.name = t.name and v.version = t.version where v.id is null"
        ):
            problems.append(f"index: tag {name}@{tag} points at missing version {version}")
        for digest, n, size in self.conn.execute(
            "select a.digest, a.file_count, a.size from artifacts a"
        ).fetchall():
            entries = self.files(digest)
            if len(entries) != n or sum(e.size for e in entries) != size:
                problems.append(f"index: artifact {digest} file list does not match its totals")
            elif Manifest(tuple(entries)).digest != digest:
                problems.append(f"index: artifact {digest} file hashes do not add up to its digest")
        return problems


def _flatten(d: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """An inspection's fields as (key, text) rows for the metadata table."""
    d = dict(d)
    details = d.pop("details", {}) or {}
    for drop in ("files", "fingerprint", "warnings"):
        d.pop(drop, None)
    for key, value in list(d.items()) + [(f"details.{k}", v) for k, v in details.items()]:
        if value is None or value == [] or value == {}:
            continue
        yield key, value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _search_text(ins: Inspection) -> str:
    parts = [ins.kind, ins.format, ins.method, ins.base_model, ins.quant, ins.task_type]
    details = ins.details or {}
    for key in ("target_modules", "architecture", "model_type", "modules_to_save"):
        v = details.get(key)
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, list):
            parts.extend(str(x) for x in v)
    if ins.rank is not None:
        parts.append(f"r{ins.rank}")
    return " ".join(p for p in parts if p)
