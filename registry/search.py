"""Search over the index: full-text words and metadata filters, in one SQL query; and listings.

``ls`` and ``search`` stream plain rows (:data:`ROW_FIELDS`) from one query
to the output, so that listing 100,000 versions never builds 100,000 objects.

Full-text search runs over ``versions_fts`` (name, description and the
denormalised ``search_text`` built at push time); filters compare columns of
``artifacts``; ``derived_from`` walks the lineage table downwards.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from adapterhub.registry.index import VersionInfo

if TYPE_CHECKING:
    from adapterhub.registry.index import Index

# A listing row: VersionInfo's fields in order, with the tags last (a
# comma-joined string in no order, or None). ``ls`` and ``search`` stream these
# to the output; :func:`to_version` and :func:`row_dict` turn one into the API's forms.
ROW_FIELDS = (
    "name", "version", "digest", "created_at", "description",
    "kind", "method", "base_model", "rank", "quant", "size", "file_count", "tags",
)
_COLUMNS = """select v.name, v.version, v.digest, v.created_at, v.description,
       a.kind, a.method, a.base_model, a.rank, a.quant, a.size, a.file_count"""
# A version's tags by a correlated lookup on tags(name, version): a join on a
# grouped subquery would read every tag for every lookup.
_TAGS = ",\n       (select group_concat(t.tag, ',') from tags t where t.name = v.name and t.version = v.version)"
_ROW_SELECT = _COLUMNS + _TAGS + "\nfrom versions v join artifacts a on a.digest = v.digest\n"
# Every version at once: the artifact's columns from the covering index of
# migration m009 (one b-tree step per version instead of two, and never the
# wide artifacts rows with their inspection JSON), the tags read once beforehand.
_ALL_SELECT = (
    _COLUMNS + "\nfrom versions v join artifacts a indexed by idx_artifacts_listing on a.digest = v.digest"
    "\norder by v.name, v.id"
)
# What the table shows: digest, description and file_count come back as None
# (a tenth of the query's time at 100,000 versions is making those objects).
_BRIEF_SELECT = _ALL_SELECT.replace("v.digest, v.created_at, v.description", "null, v.created_at, null").replace(
    "a.size, a.file_count", "a.size, null"
)
MMAP_BYTES = 1 << 30


def to_version(row: tuple[Any, ...]) -> VersionInfo:
    return VersionInfo(*row[:5], tags_of(row), *row[5:12])


def tags_of(row: tuple[Any, ...]) -> tuple[str, ...]:
    t = row[12]
    if not t:
        return ()
    return tuple(sorted(t.split(","))) if "," in t else (t,)


def row_dict(r: tuple[Any, ...]) -> dict[str, Any]:
    """The row as :meth:`VersionInfo.to_dict` writes it (same keys, same order)."""
    return {
        "ref": f"{r[0]}:{r[1]}", "name": r[0], "version": r[1], "digest": r[2], "tags": list(tags_of(r)),
        "created_at": r[3], "description": r[4], "kind": r[5], "method": r[6], "base_model": r[7], "rank": r[8],
        "quant": r[9], "size": r[10], "file_count": r[11],
    }


def listing(
    index: Index, name: str | None = None, limit: int | None = None, *, brief: bool = False,
) -> Iterator[tuple[Any, ...]]:
    """Rows (:data:`ROW_FIELDS`) of every version (of ``name``), by name then push order, at most ``limit``.

    Rows come one at a time from one query, so ``ls --all`` of 100,000
    versions never holds them as Python objects. ``brief``: in a listing
    of every version, digest, description and file_count are None.
    """
    if name is not None:
        tail = f" limit {int(limit)}" if limit is not None else ""
        return iter(index.conn.execute(_ROW_SELECT + " where v.name = ? order by v.id" + tail, (name,)))
    if limit is not None:
        return iter(index.conn.execute(_ROW_SELECT + f" order by v.name, v.id limit {int(limit)}"))
    return _everything(index, _BRIEF_SELECT if brief else _ALL_SELECT)


# ls --all's table: every cell as it is shown but the size, made by SQLite (a tenth of
# the per-version Python work). The tags come from the dict that listing_table fills.
TABLE_FIELDS = ("ref", "tags", "kind", "method", "rank", "quant", "base_model", "size", "created")
_TABLE_SELECT = (
    "select v.name || ':' || v.version, a.kind, ifnull(a.method, '-'), ifnull(a.rank, '-'), ifnull(a.quant, '-'),"
    " ifnull(a.base_model, '-'), a.size, replace(rtrim(v.created_at, 'Z'), 'T', ' ')"
    "\nfrom versions v join artifacts a indexed by idx_artifacts_listing on a.digest = v.digest"
    "\norder by v.name, v.id"
)


def listing_table(index: Index) -> list[Sequence[Any]]:
    """Every version by name then push order, as the columns of ``ls --all``'s table (:data:`TABLE_FIELDS`).

    Each column is a sequence of str, but ``size`` (int or None, for the caller to
    write): ``NAME:VERSION``; the tags sorted and comma-joined or ``-``; the
    kind as ``str()`` writes it; method, rank, quant and base model or ``-``
    where absent; ``created_at`` without its ``T`` and ``Z``. The same cells
    as :func:`listing`'s rows give, built column by column rather than row by row.
    """
    conn = index.conn
    own = not conn.in_transaction
    if own:  # one snapshot for both reads, as in _everything
        conn.execute("begin")
    try:
        joined: dict[str, str] = {}
        for ref, t in conn.execute("select name || ':' || version, tag from tags"):
            joined[ref] = f"{joined[ref]},{t}" if ref in joined else t
        with _mapped(index):
            rows = conn.execute(_TABLE_SELECT).fetchall()
    finally:
        if own and conn.in_transaction:
            conn.execute("commit")
    if not rows:
        return [() for _ in TABLE_FIELDS]
    refs, kinds, methods, ranks, quants, bases, sizes, created = zip(*rows)
    del rows
    tags = {ref: ",".join(sorted(t.split(","))) if "," in t else t or "-" for ref, t in joined.items()}
    return [
        refs, list(map(tags.get, refs, itertools.repeat("-"))), list(map(str, kinds)), methods,
        list(map(str, ranks)), quants, bases, sizes, created,
    ]


def _everything(index: Index, sql: str) -> Iterator[tuple[Any, ...]]:
    conn = index.conn
    own = not conn.in_transaction
    if own:  # one snapshot for both reads: a push between them must not move a tag out of step
        conn.execute("begin")
    try:
        tags: dict[tuple[str, str], str] = {}
        for n, v, t in conn.execute("select name, version, tag from tags"):
            k = (n, v)
            tags[k] = f"{tags[k]},{t}" if k in tags else t
        with _mapped(index):
            for row in conn.execute(sql):
                yield (*row, tags.get(row[:2]))
    finally:
        if own and conn.in_transaction:
            conn.execute("commit")


@contextmanager
def _mapped(index: Index) -> Iterator[None]:
    """Read the file through a memory map while reading all of it.

    SQLite's own page cache is 2 MiB; on a 500 MiB index every lookup that
    misses it is a ``pread`` system call: 0.1 s of the query's 0.4 s CPU at
    100,000 versions. The mapped pages show in the process's RSS (they are
    the page cache's, shared). The map is dropped again afterwards.
    """
    index.conn.execute(f"pragma mmap_size = {MMAP_BYTES}").fetchall()
    try:
        yield
    finally:
        index.conn.execute("pragma mmap_size = 0").fetchall()


def fts_query(text: str) -> str:
    """Quote user text for FTS5: every word must match, as a prefix."""
    words = [w for w in text.replace('"', " ").split() if w]
    return " ".join(f'"{w}"*' for w in words)


def _like_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def search(index: Index, text: str | None = None, **filters: Any) -> list[VersionInfo]:
    """Versions matching every filter given, by name then push order; see :func:`search_rows`."""
    return [to_version(r) for r in search_rows(index, text, **filters)]


def search_rows(
    index: Index,
    text: str | None = None,
    *,
    base: str | None = None,
    method: str | None = None,
    rank: int | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
    quant: str | None = None,
    kind: str | None = None,
    name: str | None = None,
    derived_from: str | None = None,
    limit: int | None = None,
    verified: bool = False,
) -> Iterator[tuple[Any, ...]]:
    """Rows (:data:`ROW_FIELDS`) of the versions matching every filter given, by name then push order, at most ``limit``.

    With a ``limit`` (the CLI's page) and filters that match many versions,
    the versions are walked in (name, id) order through their index and each
    is checked, so the query stops after ``limit`` matches instead of
    collecting and sorting every match (a third of a 100,000-artifact
    registry for ``--rank 16``); the unary ``+`` keeps SQLite from driving the
    query from a filter's index. Filters that match few (counted first through
    their indexes: a few milliseconds) drive the query instead.
    """
    cols = [(c, v) for c, v in (("method", method), ("quant", quant), ("kind", kind)) if v]
    ranks = [(op, v) for op, v in (("=", rank), (">=", min_rank), ("<=", max_rank)) if v is not None]
    walk = bool(limit) and not (verified or derived_from or name)
    if walk:
        estimates = [_count_artifacts(index, cols, ranks)] if cols or ranks else []
        if text:
            estimates.append(index.conn.execute(
                "select count(*) from versions_fts where versions_fts match ?", (fts_query(text),)
            ).fetchone()[0])
        walk = not estimates or min(estimates) > 10 * int(limit or 0)
    p = "+" if walk else ""
    where: list[str] = []
    args: list[Any] = []
    if verified:
        # The newest numerical verification of the digest says PASS, found from
        # the PASS rows (an index), not checked version by version.
        where.append(
            "v.digest in (select x.digest from verifications x where x.verdict = 'PASS' and x.id = "
            "(select y.id from verifications y where y.digest = x.digest order by y.created_at desc, y.id desc limit 1))"
        )
    if derived_from:
        # Descendants at any depth: an adapter's merged children and their quantized children.
        where.append(
            "v.digest in (with recursive d(digest) as ("
            " select digest from lineage where parent = ?"
            " union select l.digest from lineage l join d on l.parent = d.digest"
            ") select digest from d)"
        )
        args.append(derived_from)
    join = ""
    if text and walk:
        # Checked per walked row. Never as an index constraint: used as one, the IN
        # list is probed once per candidate (50,000 x 56,000 probes for "llama" at 100k).
        where.append("+v.id in (select rowid from versions_fts where versions_fts match ?)")
        args.append(fts_query(text))
    elif text:
        join = " join versions_fts f on f.rowid = v.id and versions_fts match ?"  # the matches drive
        args.insert(0, fts_query(text))  # the join's placeholder comes before the where clause's
    if base:
        # A substring, case-insensitive (LIKE is, for ASCII): "llama-2-7b" finds
        # "meta-llama/Llama-2-7b-hf". No index serves a substring: this reads
        # the base_model column of every artifact (once per artifact, not per version).
        where.append(f"{p}v.digest in (select digest from artifacts where base_model like ? escape '\\')")
        args.append("%" + _like_escape(base.lower()) + "%")
    for col, val in cols:
        where.append(f"{p}a.{col} = ? collate nocase")  # the NOCASE indexes of migration m008
        args.append(val)
    for op, val in ranks:
        where.append(f"{p}a.rank {op} ?")
        args.append(val)
    if name:
        where.append("v.name = ?")
        args.append(name)
    sql = _ROW_SELECT + join
    if where:
        sql += " where " + " and ".join(where)
    sql += " order by v.name, v.id"
    if limit:
        sql += f" limit {int(limit)}"
    return iter(index.conn.execute(sql, args))


def _count_artifacts(index: Index, cols: list[tuple[str, str]], ranks: list[tuple[str, int]]) -> int:
    """How many artifacts the column filters keep, counted through their indexes."""
    where = [f"{c} = ? collate nocase" for c, _ in cols] + [f"rank {op} ?" for op, _ in ranks]
    args = [v for _, v in cols] + [v for _, v in ranks]
    return int(index.conn.execute("select count(*) from artifacts where " + " and ".join(where), args).fetchone()[0])
