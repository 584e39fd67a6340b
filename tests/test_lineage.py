import json

from adapterhub.registry import Registry

from .conftest import fake_lora


def test_lineage_up_down_and_derived_from_search(cli, tmp_path):
    reg = Registry()
    adapter = reg.push(fake_lora(tmp_path / "a"), "qa-lora")
    base = reg.push(fake_lora(tmp_path / "b", seed=9), "fake-base")  # any artifact can be a parent
    merged = reg.push(
        fake_lora(tmp_path / "m", seed=3), "qa-merged",
        derived_from=[(adapter.digest, "adapter"), (base.digest, "base")],
        recipe={"operation": "merge", "adapterhub": "0.1.0", "dtype": "bfloat16"},
    )
    reg.push(
        fake_lora(tmp_path / "q", seed=4), "qa-nf4",
        derived_from=[(merged.digest, "source")], recipe={"operation": "quantize", "to": "nf4"},
    )
    reg.push(fake_lora(tmp_path / "x", seed=5), "unrelated")

    assert [f"{v.name}:{v.version}" for v in reg.search(derived_from="qa-lora")] == ["qa-merged:1", "qa-nf4:1"]
    assert [f"{v.name}:{v.version}" for v in reg.search(derived_from="qa-merged:1")] == ["qa-nf4:1"]
    assert reg.search(derived_from="unrelated") == []

    tree = reg.lineage("qa-nf4")
    (m,) = tree["up"]
    assert m["refs"] == ["qa-merged:1"] and m["relation"] == "source" and m["recipe"]["to"] == "nf4"
    assert {(p["relation"], p["refs"][0]) for p in m["up"]} == {("adapter", "qa-lora:1"), ("base", "fake-base:1")}
    down = reg.lineage("qa-lora")["down"]
    assert down[0]["refs"] == ["qa-merged:1"] and down[0]["down"][0]["refs"] == ["qa-nf4:1"]

    r = cli("lineage", "qa-merged")
    assert r.exit_code == 0
    assert "derived from:" in r.stdout and "qa-lora:1" in r.stdout and "used by:" in r.stdout and "[merge]" in r.stdout
    r = cli("search", "--derived-from", "qa-lora", "--json")
    assert [d["ref"] for d in json.loads(r.stdout)] == ["qa-merged:1", "qa-nf4:1"]
    show = json.loads(cli("show", "qa-merged", "--json").stdout)
    assert {(e["relation"], e["parent_refs"][0]) for e in show["lineage"]} == {("adapter", "qa-lora:1"), ("base", "fake-base:1")}
    assert cli("lineage", "unrelated").stdout.count("no recorded lineage") == 1


def test_removing_a_child_removes_its_lineage(tmp_path):
    reg = Registry()
    a = reg.push(fake_lora(tmp_path / "a"), "a")
    reg.push(fake_lora(tmp_path / "c", seed=2), "c", derived_from=[(a.digest, "adapter")], recipe={"operation": "merge"})
    reg.execute_rm(reg.plan_rm("c:1"))
    assert reg.lineage("a")["down"] == []
    assert reg.index.check() == []
