"""ls and search print streamed rows (issue 14): the same bytes as the VersionInfo path, a page or all of it."""

from __future__ import annotations

import hashlib
import json

import pytest

from adapterhub.artifact import Inspection
from adapterhub.manifest import FileEntry, Manifest
from adapterhub.registry import Registry


def _fill(reg: Registry) -> None:
    """40 versions: several tags on one, missing method/rank/quant, sizes from bytes to terabytes, a hostile base."""
    sizes = [0, 1, 1023, 1024, 1536, 2**20 - 1, 2**20, 5 * 2**30 + 7, 2**40, 3 * 2**40 + 12345]
    with reg.index.bulk():
        for i in range(40):
            sha = hashlib.sha256(str(i).encode()).hexdigest()
            files = Manifest.from_entries([FileEntry("adapter_model.safetensors", sizes[i % len(sizes)], sha)])
            ins = Inspection(
                kind="adapter" if i % 5 else "merged",
                format="peft",
                method=None if i % 7 == 0 else "LORA",
                rank=None if i % 6 == 0 else 4 * (i % 4 + 1),
                quant="nf4" if i % 9 == 0 else None,
                base_model="evil\n\x1b[31mbase\tmodel" if i == 13 else f"org/model-{i % 3}",
            )
            reg.index.add_version(f"team/n{i % 6}", None, files, ins, description=f"run {i}")
    reg.index.set_tag(_ref("team/n1:2"), "prod")
    reg.index.set_tag(_ref("team/n1:2"), "b-stable")
    reg.index.set_tag(_ref("team/n1:2"), "alpha")


def _ref(text: str):
    from adapterhub.refs import Ref

    return Ref.parse(text)


def _reference_table(headers, rows) -> str:
    """The table as it was laid out before the streamed path: one cell at a time."""
    from adapterhub.cli._output import escape

    cells = [["-" if c is None else str(c) for c in r] for r in rows]
    cells = [[escape(c, one_line=True) for c in r] for r in cells]
    widths = [len(h) for h in headers]
    for r in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*(h.upper() for h in headers)).rstrip()] + [fmt.format(*r).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


@pytest.fixture
def reg():
    reg = Registry()
    _fill(reg)
    yield reg
    reg.close()


def test_ls_all_prints_what_the_versioninfo_path_prints(cli, reg, monkeypatch):
    from adapterhub.cli import registry_cmds

    versions = reg.ls()
    assert len(versions) == 40
    monkeypatch.setattr(registry_cmds, "JSON_CHUNK", 7)  # JSON written in several chunks
    r = cli("ls", "--all", "--json")
    assert r.exit_code == 0 and r.stderr == ""
    assert r.stdout == json.dumps([v.to_dict() for v in versions]) + "\n"  # byte for byte
    tagged = {d["ref"]: d["tags"] for d in json.loads(r.stdout)}["team/n1:2"]
    assert tagged == ["alpha", "b-stable", "prod"]
    r = cli("ls", "--all")
    assert r.stdout == _reference_table(registry_cmds._VERSION_HEADERS, registry_cmds._version_rows(versions))
    assert "\\x1b[31mbase\\tmodel" in r.stdout and "\x1b" not in r.stdout  # escaped, one line per row
    assert len(r.stdout.splitlines()) == 41
    assert cli("ls", "--all", "-q").stdout.split() == [f"{v.name}:{v.version}" for v in versions]


def test_ls_name_and_search_print_what_the_versioninfo_path_prints(cli, reg):
    from adapterhub.cli import registry_cmds

    r = cli("ls", "team/n1")
    assert r.stdout == _reference_table(registry_cmds._VERSION_HEADERS, registry_cmds._version_rows(reg.ls("team/n1")))
    found = reg.search(method="lora", min_rank=8)
    assert found
    r = cli("search", "--method", "lora", "--min-rank", "8", "--json")
    assert r.stdout == json.dumps([v.to_dict() for v in found]) + "\n"
    r = cli("search", "--method", "lora", "--min-rank", "8")
    assert r.stdout == _reference_table(registry_cmds._VERSION_HEADERS, registry_cmds._version_rows(found))
    assert cli("search", "--rank", "999", "--json").stdout == "[]\n"
    assert cli("ls", "nope", "--json").exit_code == 3


def test_a_page_says_there_is_more_and_all_lists_everything(cli, reg):
    r = cli("ls", "--limit", "39", "--json")
    assert len(json.loads(r.stdout)) == 39 and "first 39 versions" in r.stderr
    r = cli("ls", "--limit", "40", "--json")
    assert len(json.loads(r.stdout)) == 40 and r.stderr == ""  # exactly a page: no warning
    r = cli("search", "--kind", "merged", "--limit", "3", "-q")
    assert r.stdout.split() == [f"{v.name}:{v.version}" for v in reg.search(kind="merged")][:3]
    assert "first 3 matches" in r.stderr


def test_rows_match_versioninfo_and_a_stream_left_early_leaves_the_index_usable(reg):
    from adapterhub.registry.search import row_dict, to_version

    rows = list(reg.ls_rows())
    assert [to_version(r) for r in rows] == reg.ls()
    brief = list(reg.ls_rows(brief=True))  # what the table shows: no digest, description or file count
    assert [r[:2] + r[3:4] + r[5:11] + r[12:] for r in brief] == [r[:2] + r[3:4] + r[5:11] + r[12:] for r in rows]
    assert {(r[2], r[4], r[11]) for r in brief} == {(None, None, None)}
    assert [row_dict(r) for r in rows] == [v.to_dict() for v in reg.ls()]
    stream = reg.ls_rows()
    next(stream)
    stream.close()  # as when stdout closes early (`| head`)
    assert reg.index.conn.execute("pragma mmap_size").fetchone()[0] == 0
    assert not reg.index.conn.in_transaction  # its read snapshot ended with it
    with reg.index.write():  # inside a write, the listing joins that transaction
        assert len(list(reg.ls_rows())) == 40
    assert len(list(reg.ls_rows())) == 40
    assert [to_version(r) for r in reg.search_rows(quant="nf4")] == reg.search(quant="nf4")


def test_human_size_matches_repeated_division():
    from adapterhub.cli._output import human_size

    def reference(n):
        size = float(n)
        for unit in ("B", "KB", "MB", "GB", "TB"):
            if size < 1024 or unit == "TB":
                return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
            size /= 1024

    values = {0, 1, 1023, 1024, 1025, 10**15, 2**60 + 1, -5}
    for k in range(1, 5):
        for d in (-1, 0, 1):
            values.add(1024**k + d)
            values.add(int(1024**k * 1023.95) + d)
    values.update(hashlib.sha256(str(i).encode()).digest()[0] * 7919**i % 2**45 for i in range(200))
    for n in values:
        assert human_size(n) == reference(n), n
    assert human_size(None) == "-"


@pytest.mark.parametrize("cell", ["plain", "café", "\u202eevil", "a\tb", "a\x7fb", "a\rb", "a\nb", "a\x1bb", "\u200bz", "é\nb"])
def test_table_escapes_exactly_what_the_cell_by_cell_layout_escaped(cell, capsys):
    from adapterhub.cli._output import table

    headers = ("name", "base")
    rows = [("x", cell), ("longer-name", None), ("y", "ok")]
    table(headers, rows)
    assert capsys.readouterr().out == _reference_table(headers, rows)
    table(headers, [tuple("-" if c is None else c for c in r) for r in rows], strings=True)
    assert capsys.readouterr().out == _reference_table(headers, rows)


HOSTILE = ['q"uo\\te', "nul\x00byte", "del\x7f", "é 日本 \U0001f600", "line\u2028sep", "\x1b[2Jtab\there", "\ufeffbom"]


def test_hostile_fields_print_the_same_bytes_in_the_table_and_json(cli):
    """Quotes, backslashes, NUL, DEL, control, bidi and non-ASCII characters, astral ones, absent fields:
    the column-by-column table and JSON give what the VersionInfo path gives."""
    from adapterhub.cli import registry_cmds

    reg = Registry()
    try:
        with reg.index.bulk():
            for i, text in enumerate(HOSTILE * 2):
                sha = hashlib.sha256(f"h{i}".encode()).hexdigest()
                files = Manifest.from_entries([FileEntry("a.safetensors", 1280 * (i + 1), sha)])
                odd = i >= len(HOSTILE)
                ins = Inspection(kind="adapter", format="peft", method=None if odd else text, rank=None if odd else i,
                                 quant=text if odd else None, base_model=None if i == 3 else text)
                reg.index.add_version(f"h/n{i % 3}", None, files, ins, description=None if odd else text)
        reg.index.set_tag(_ref("h/n1:1"), "zeta")
        reg.index.set_tag(_ref("h/n1:1"), "alpha")
        versions = reg.ls()
        expected_json = json.dumps([v.to_dict() for v in versions]) + "\n"
        expected_table = _reference_table(registry_cmds._VERSION_HEADERS, registry_cmds._version_rows(versions))
    finally:
        reg.close()
    assert "\\u0000" in expected_json and "\\ud83d\\ude00" in expected_json and '\\"' in expected_json
    assert "\\x00" in expected_table and "\\x1b[2J" in expected_table and "日本" in expected_table
    r = cli("ls", "--all", "--json")
    assert r.exit_code == 0 and r.stdout == expected_json
    assert cli("search", "--all", "--json").stdout == expected_json
    assert cli("ls", "--all").stdout == expected_table
    assert cli("search", "--all").stdout == expected_table
    assert cli("ls", "h/n1", "--json").stdout == json.dumps([v.to_dict() for v in versions if v.name == "h/n1"]) + "\n"


def test_ls_table_columns_equal_the_rows_and_come_from_the_covering_indexes(reg):
    """Registry.ls_table: the cells of the rows, column by column, read through the listing indexes."""
    from adapterhub.cli import registry_cmds

    columns = reg.ls_table()
    cells = registry_cmds._cell_columns(list(reg.ls_rows(brief=True)))
    cells[7] = [r.size for r in reg.ls()]  # the size column stays an int for the caller
    assert [list(c) for c in columns] == cells
    plans = []
    reg.index.conn.set_trace_callback(lambda sql: plans.append(sql) if sql.lstrip().lower().startswith("select") else None)
    reg.ls_table()
    reg.index.conn.set_trace_callback(None)
    listing = [s for s in plans if "from versions v" in s]
    assert len(listing) == 1
    steps = " | ".join(row[3] for row in reg.index.conn.execute("explain query plan " + listing[0]))
    assert "SCAN v USING COVERING INDEX idx_versions_listing" in steps
    assert "SEARCH a USING COVERING INDEX idx_artifacts_listing (digest=?)" in steps
    assert "TEMP B-TREE" not in steps  # in (name, id) order from the index, not sorted afterwards
    assert not reg.index.conn.in_transaction and reg.index.conn.execute("pragma mmap_size").fetchone()[0] == 0


def test_ls_all_of_an_empty_registry_says_so(cli):
    Registry().close()
    r = cli("ls", "--all")
    assert r.stdout == "" and "the registry is empty" in r.stderr
    assert cli("ls", "--all", "--json").stdout == "[]\n"


def test_human_sizes_is_human_size_of_each():
    from adapterhub.cli._output import human_size, human_sizes

    values = [None, 0, 1, 1023, 1024, 1280, 1536, 2**20 - 1, 2**20, 2**20 + 2**19 // 10 * 5, 2**30 - 1, 2**30,
              5 * 2**30 + 7, 2**40 - 1, 2**40, 2**60 + 1, -5, 3.5, 2**53 + 1]
    values += [int(1024**k * f) + d for k in (1, 2, 3) for f in (1.05, 1.25, 1.45, 1023.95, 1023.9999) for d in (-1, 0, 1)]
    values += [hashlib.sha256(str(i).encode()).digest()[0] * 7919**i % 2**45 for i in range(300)]
    assert human_sizes(values) == [human_size(n) for n in values]
    assert human_sizes([]) == []
