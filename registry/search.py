"""Search over the index: full-text words and metadata filters, in one SQL query.

Full-text search runs over ``versions_fts`` (name, description and the
denormalised ``search_text`` built at push time); filters compare columns of
``artifacts``; ``derived_from`` walks the lineage table downwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapterhub.registry.index import _VERSION_SELECT, _row_to_version

if TYPE_CHECKING:
    from adapterhub.registry.index import Index, VersionInfo


def fts_query(text: str) -> str:
    """Quote user text for FTS5: every word must match, as a prefix."""
    words = [w for w in text.replace('"', " ").split() if w]
    return " ".join(f'"{w}"*' for w in words)


def _like_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def search(
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
) -> list[VersionInfo]:
    """Versions matching every filter given, by name then push order, at most ``limit``.

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
    sql = _VERSION_SELECT + join
    if where:
        sql += " where " + " and ".join(where)
    sql += " order by v.name, v.id"
    if limit:
        sql += f" limit {int(limit)}"
    return [_row_to_version(r) for r in index.conn.execute(sql, args).fetchall()]


def _count_artifacts(index: Index, cols: list[tuple[str, str]], ranks: list[tuple[str, int]]) -> int:
    """How many artifacts the column filters keep, counted through their indexes."""
    where = [f"{c} = ? collate nocase" for c, _ in cols] + [f"rank {op} ?" for op, _ in ranks]
    args = [v for _, v in cols] + [v for _, v in ranks]
    return int(index.conn.execute("select count(*) from artifacts where " + " and ".join(where), args).fetchone()[0])
