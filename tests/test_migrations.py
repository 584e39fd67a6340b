import sqlite3

from sqlite_utils import Database

from adapterhub.registry.index import SCHEMA, Index
from adapterhub.registry.migrations import migrations


def test_schema_names_match_migrations():
    assert tuple(m.name for m in migrations._migrations) == SCHEMA


def test_migrations_create_expected_tables():
    db = Database(memory=True)
    migrations.apply(db)
    tables = set(db.table_names())
    assert {"artifacts", "versions", "tags", "files", "metadata", "lineage", "signatures", "names"} <= tables
    assert "versions_fts" in tables
    assert {"digest", "kind", "method", "base_model", "rank", "quant", "inspection"} <= set(db["artifacts"].columns_dict)
    assert db["tags"].pks == ["name", "tag"]
    assert db["files"].pks == ["digest", "path"]


def test_index_opens_in_wal_mode_and_reopens_without_migrating(tmp_path):
    Index(tmp_path / "index.db").close()
    conn = sqlite3.connect(tmp_path / "index.db")
    assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"
    applied = conn.execute("select count(*) from _sqlite_migrations").fetchone()[0]
    Index(tmp_path / "index.db").close()
    assert conn.execute("select count(*) from _sqlite_migrations").fetchone()[0] == applied == len(SCHEMA)


def test_newer_index_is_refused(tmp_path):
    import pytest

    from adapterhub.errors import StorageError

    Index(tmp_path / "index.db").close()
    conn = sqlite3.connect(tmp_path / "index.db")
    conn.execute(
        "insert into _sqlite_migrations (migration_set, name, applied_at) values ('adapterhub', 'm999_future', 'x')"
    )
    conn.commit()
    with pytest.raises(StorageError, match="newer adapterhub"):
        Index(tmp_path / "index.db")
