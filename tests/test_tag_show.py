import json

from .conftest import fake_lora


def test_tag_moves_and_untag(cli, tmp_path):
    cli("push", fake_lora(tmp_path / "a", seed=1), "qa")
    cli("push", fake_lora(tmp_path / "b", seed=2), "qa")
    r = cli("tag", "qa:1", "prod", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["version"] == "1"
    assert json.loads(cli("show", "qa@prod", "--json").stdout)["version"] == "1"
    cli("tag", "qa:2", "prod")
    assert json.loads(cli("show", "qa@prod", "--json").stdout)["version"] == "2"
    assert cli("untag", "qa@prod").exit_code == 0
    assert cli("show", "qa@prod").exit_code == 3
    assert cli("untag", "qa@latest").exit_code == 5
    assert cli("tag", "qa:9", "prod").exit_code == 3
    assert cli("tag", "qa:1", "bad/tag").exit_code == 4


def test_show(cli, tmp_path):
    cli("push", fake_lora(tmp_path / "a", r=4, alpha=8), "qa", "-d", "a test adapter", "-t", "dev")
    r = cli("show", "qa", "--json")
    d = json.loads(r.stdout)
    assert d["ref"] == "qa:1" and d["description"] == "a test adapter"
    assert set(d["tags"]) == {"dev", "latest"}
    assert d["inspection"]["rank"] == 4 and d["inspection"]["alpha"] == 8
    assert sorted(f["path"] for f in d["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
    r = cli("show", "qa@dev", "--files")
    assert r.exit_code == 0
    assert "adapter_model.safetensors" in r.stdout and d["digest"] in r.stdout


def test_tag_refuses_latest(cli, tmp_path):
    cli("push", fake_lora(tmp_path / "a", seed=1), "qa")
    cli("push", fake_lora(tmp_path / "b", seed=2), "qa")
    r = cli("tag", "qa:1", "latest")
    assert r.exit_code == 5 and "`latest` is managed by adapterhub" in r.stderr
    assert json.loads(cli("show", "qa", "--json").stdout)["version"] == "2"


def test_show_files_prints_full_sha256(cli, tmp_path):
    cli("push", fake_lora(tmp_path / "a"), "qa")
    files = json.loads(cli("show", "qa", "--json").stdout)["files"]
    out = cli("show", "qa", "--files").stdout
    for f in files:
        assert f"{f['sha256']}  " in out and len(f["sha256"]) == 64


def test_push_with_a_word_for_a_version_hints_at_tag(cli, tmp_path):
    r = cli("push", fake_lora(tmp_path / "a"), "team/x:prod")
    assert r.exit_code == 4 and "did you mean `--tag prod`?" in r.stderr
    assert cli("ls", "--quiet").stdout.split() == []  # no version called prod, latest not moved
    assert cli("push", fake_lora(tmp_path / "a"), "team/x:v1.0").exit_code == 0


def test_show_name_colon_tag_says_it_is_a_tag(cli, tmp_path):
    cli("push", fake_lora(tmp_path / "a"), "team/x", "--tag", "prod")
    r = cli("show", "team/x:prod")
    assert r.exit_code == 4 and "'prod' is a tag of team/x" in r.stderr and "team/x@prod" in r.stderr
    assert "unknown ref" not in r.stderr
    r = cli("show", "team/x:nosuch")
    assert r.exit_code == 4 and "is a tag" not in r.stderr


def test_a_version_stored_before_the_digit_rule_can_still_be_named(cli, tmp_path):
    from adapterhub.inspect import inspect_path
    from adapterhub.manifest import Manifest
    from adapterhub.registry import Registry

    src = fake_lora(tmp_path / "a")
    reg = Registry()
    reg.push(src, "team/x")
    # What `push DIR team/x:prod` recorded before versions had to start with a digit.
    reg.index.add_version("team/x", "prod", Manifest.from_dir(src), inspect_path(src))
    assert reg.resolve("team/x:prod").version == "prod"
    assert json.loads(cli("show", "team/x:prod", "--json").stdout)["version"] == "prod"
