import json

from adapterhub.registry import Registry

from .conftest import fake_lora


def _populate(tmp_path):
    reg = Registry()
    reg.push(fake_lora(tmp_path / "a", r=8, base="meta-llama/Llama-2-7b-hf", seed=1), "team/qa-lora",
             description="question answering on support tickets")
    reg.push(fake_lora(tmp_path / "b", r=16, base="meta-llama/Llama-2-7b-hf", seed=2), "team/qa-lora")
    reg.push(fake_lora(tmp_path / "c", r=64, base="mistralai/Mistral-7B-v0.1", seed=3,
                       targets=("q_proj", "k_proj", "v_proj", "o_proj")), "sql-lora", description="text to SQL")
    return reg


def refs(result):
    return [f"{v.name}:{v.version}" for v in result]


def test_search_filters(tmp_path):
    reg = _populate(tmp_path)
    assert refs(reg.search(rank=16)) == ["team/qa-lora:2"]
    assert refs(reg.search(min_rank=16)) == ["sql-lora:1", "team/qa-lora:2"]
    assert refs(reg.search(max_rank=16)) == ["team/qa-lora:1", "team/qa-lora:2"]
    assert refs(reg.search(base="mistral")) == ["sql-lora:1"]
    assert refs(reg.search(base="LLAMA-2-7b")) == ["team/qa-lora:1", "team/qa-lora:2"]
    assert refs(reg.search(method="lora", base="llama", min_rank=10)) == ["team/qa-lora:2"]
    assert refs(reg.search(method="ia3")) == []
    assert refs(reg.search(kind="adapter")) == ["sql-lora:1", "team/qa-lora:1", "team/qa-lora:2"]
    assert refs(reg.search(quant="nf4")) == []


def test_full_text_search(tmp_path):
    reg = _populate(tmp_path)
    assert refs(reg.search("support")) == ["team/qa-lora:1"]
    assert refs(reg.search("supp tick")) == ["team/qa-lora:1"]  # word prefixes, all must match
    assert refs(reg.search("sql")) == ["sql-lora:1"]
    assert refs(reg.search("k_proj")) == ["sql-lora:1"]  # metadata is searchable
    assert refs(reg.search("mistral")) == ["sql-lora:1"]
    assert refs(reg.search('"quoted" OR NEAR(')) == []  # user text is never FTS syntax


def test_search_cli_json_and_table(cli, tmp_path):
    _populate(tmp_path)
    r = cli("search", "--base", "llama", "--min-rank", "10", "--json")
    assert r.exit_code == 0
    assert [d["ref"] for d in json.loads(r.stdout)] == ["team/qa-lora:2"]
    r = cli("search", "--rank", "64")
    assert r.exit_code == 0 and "sql-lora:1" in r.stdout and "RANK" in r.stdout
    r = cli("search", "--rank", "3")
    assert r.exit_code == 0 and r.stdout == "" and "no matches" in r.stderr


def test_ls(cli, tmp_path):
    _populate(tmp_path)
    r = cli("ls", "--json")
    data = json.loads(r.stdout)
    assert [d["ref"] for d in data] == ["sql-lora:1", "team/qa-lora:1", "team/qa-lora:2"]
    assert data[2]["tags"] == ["latest"]
    assert cli("ls", "team/qa-lora", "-q").stdout.split() == ["team/qa-lora:1", "team/qa-lora:2"]
    assert cli("ls", "nope").exit_code == 3


def test_ls_empty(cli):
    r = cli("ls")
    assert r.exit_code == 0 and r.stdout == "" and "empty" in r.stderr


def test_search_takes_several_words(cli, tmp_path):
    _populate(tmp_path)
    r = cli("search", "support", "tickets", "--json")  # the example in `search --help`
    assert r.exit_code == 0, r.output
    assert [d["ref"] for d in json.loads(r.stdout)] == ["team/qa-lora:1"]
    assert json.loads(cli("search", "support", "sql", "--json").stdout) == []  # every word must match


def test_every_filter_combination_pages_and_lists_the_same_versions(tmp_path):
    """The plan a page uses (walk in order, or let the matches drive) never changes the answer."""
    import itertools

    from adapterhub.registry import Registry

    reg = Registry()
    parent = reg.push(fake_lora(tmp_path / "p", seed=100), "team/base-lora")
    for i in range(12):
        reg.push(fake_lora(tmp_path / f"a{i}", seed=i, r=(4, 8, 16)[i % 3]), f"team/qa-{i % 4}", derived_from=[(parent.digest, "adapter")] if i % 2 else ())
    filters = {"text": "lora", "rank": 8, "min_rank": 8, "method": "lora", "base": "llama", "derived_from": "team/base-lora:1", "name": "team/qa-1"}
    for n in range(0, 4):
        for combo in itertools.combinations(filters, n):
            kw = {k: filters[k] for k in combo}
            text = kw.pop("text", None)
            every = [v.to_dict() for v in reg.search(text, **kw)]
            for limit in (1, 2, 5, 100):
                assert [v.to_dict() for v in reg.search(text, limit=limit, **kw)] == every[:limit], (combo, limit)


def test_ls_and_search_page_by_default_and_all_lists_everything(cli, tmp_path):
    """A registry of many versions prints a page (1000) and says so; --all prints everything."""
    import hashlib

    from adapterhub.artifact import Inspection
    from adapterhub.manifest import FileEntry, Manifest

    reg = Registry()
    with reg.index.bulk():  # 1001 versions in one transaction (no blobs: only the index is read)
        for i in range(1001):
            sha = hashlib.sha256(str(i).encode()).hexdigest()
            files = Manifest.from_entries([FileEntry("adapter_model.safetensors", 100 + i, sha)])
            ins = Inspection(kind="adapter", format="peft", method="LORA", rank=8, base_model="org/llama")
            reg.index.add_version(f"n{i // 10:03d}", None, files, ins)
    reg.close()
    r = cli("ls", "--quiet")
    assert len(r.stdout.split()) == 1000 and "--all" in r.stderr
    assert len(cli("ls", "--quiet", "--all").stdout.split()) == 1001
    r = cli("ls", "--quiet", "--limit", "5")
    assert r.stdout.split() == ["n000:1", "n000:2", "n000:3", "n000:4", "n000:5"] and "first 5" in r.stderr
    assert len(cli("ls", "n100", "--quiet").stdout.split()) == 1  # a NAME is never cut
    r = cli("search", "--method", "lora", "--json")
    assert len(json.loads(r.stdout)) == 1000 and "--all" in r.stderr
    assert len(json.loads(cli("search", "--method", "lora", "--all", "--json").stdout)) == 1001
    r = cli("search", "--rank", "8", "--quiet", "--limit", "3")
    assert r.stdout.split() == ["n000:1", "n000:2", "n000:3"]
