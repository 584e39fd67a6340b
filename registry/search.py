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
    where: list[str] = []
    args: list[Any] = []
    if verified:
        # The newest numerical verification of the digest says PASS.
        where.append(
            "(select x.verdict from verifications x where x.digest = v.digest"
            " order by x.created_at desc, x.id desc limit 1) = 'PASS'"
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
    if text:
        where.append("v.id in (select rowid from versions_fts where versions_fts match ?)")
        args.append(fts_query(text))
    if base:
        # A substring, case-insensitive: "llama-2-7b" finds "meta-llama/Llama-2-7b-hf".
        where.append("lower(a.base_model) like ? escape '\\'")
        args.append("%" + _like_escape(base.lower()) + "%")
    for col, val in (("method", method), ("quant", quant), ("kind", kind)):
        if val:
            where.append(f"lower(a.{col}) = ?")
            args.append(val.lower())
    if rank is not None:
        where.append("a.rank = ?")
        args.append(rank)
    if min_rank is not None:
        where.append("a.rank >= ?")
        args.append(min_rank)
    if max_rank is not None:
        where.append("a.rank <= ?")
        args.append(max_rank)
    if name:
        where.append("v.name = ?")
        args.append(name)
    sql = _VERSION_SELECT
    if where:
        sql += " where " + " and ".join(where)
    sql += " order by v.name, v.id"
    if limit:
        sql += f" limit {int(limit)}"
    return [_row_to_version(r) for r in index.conn.execute(sql, args).fetchall()]
