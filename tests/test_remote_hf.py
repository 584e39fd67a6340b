"""The Hugging Face Hub remote (registry/remotes/hf.py).

No Hub server runs here, so uploads are tested through their plan (the
operations, card, metadata and tags a push sends), and downloads through the
real huggingface_hub client reading its cache offline: the files a push would
upload are laid out as a download of that commit leaves them
(``models--org--repo/{blobs,snapshots/<commit>,refs/<rev>}``), and ``pull``
imports them with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import ClassVar

import pytest

from adapterhub.trust import keys
from adapterhub.trust import signing
from adapterhub.trust import policy
from adapterhub.errors import (
    ConflictError,
    InvalidArtifactError,
    InvalidNameError,
    NotFoundError,
    RemoteAuthError,
    RemoteError,
    TrustError,
)
from adapterhub.registry import Registry
from adapterhub.registry.remotes import hf

from ._hf_cache import COMMIT, cache_snapshot
from .conftest import fake_lora, make_files

REPO = "tiny-org/qa-lora"


def uploaded(plan: hf.UploadPlan) -> dict[str, bytes]:
    """The bytes of every file a push of ``plan`` sends."""
    return {p: src if isinstance(src, bytes) else Path(src).read_bytes() for p, src in plan.files}


def hf_pull(reg, source, *, require_signature=False, require_provenance=False, **kw):
    """``hf.pull`` with the trust gate the CLI gives it."""
    from adapterhub.trust.remote_gate import remote_gate

    gate = remote_gate(reg, require_signature=require_signature, require_provenance=require_provenance)
    return hf.pull(reg, source, gate=gate, **kw)


@pytest.fixture
def signer(home):
    k = keys.generate("default")
    with Registry() as reg:
        policy.add(reg, k.public_pem, name="default")
    return k


def _push_local(tmp_path, name="team/qa-lora", *, sign_with=None, files=None, **kw):
    src = fake_lora(tmp_path / "src" / name.replace("/", "_"), **kw)
    if files:
        make_files(src, files)
    with Registry() as reg:
        res = reg.push(src, name, description="QA on support tickets", tags=["prod"])
        if sign_with is not None:
            signing.sign_ref(reg, res.ref, sign_with)
    return res


def _other(tmp_path, key=None, rules=(), home="other-home") -> Registry:
    """A second registry, as on a teammate's machine (trusting ``key``)."""
    reg = Registry(tmp_path / home)
    if key is not None:
        policy.add(reg, key.public_pem, name="teammate")
    for rule in rules:
        policy.set_rule(reg, rule)
    return reg


# -- URLs and names ------------------------------------------------------------------


def test_parse_url():
    assert hf.parse_url("hf://tiny-org/qa-lora") == hf.HubRepo("tiny-org/qa-lora", None)
    assert hf.parse_url("hf://tiny-org/qa-lora@v3") == hf.HubRepo("tiny-org/qa-lora", "v3")
    assert hf.parse_url("hf://Org/Repo_1.x@refs/pr/1").revision == "refs/pr/1"
    assert str(hf.parse_url("hf://o/r@main")) == "hf://o/r@main"


@pytest.mark.parametrize("url, match", [
    ("oci://host/team", "not a Hugging Face Hub URL"),
    ("hf://just-a-name", "expected hf://ORG/REPO"),
    ("hf://a/b/c", "expected hf://ORG/REPO"),
    ("hf://org/bad name", "invalid Hub repo id"),
    ("hf://a--b/c", "invalid Hub repo id"),
    ("hf://org/-repo", "invalid Hub repo id"),
    ("hf://org/" + "x" * 97, "invalid Hub repo id"),
    ("hf://org/repo@", "invalid revision"),
    ("hf://org/repo@../../etc", "invalid revision"),
    ("hf://org/repo@a b", "invalid revision"),
])
def test_invalid_urls(url, match):
    with pytest.raises(InvalidNameError, match=match):
        hf.parse_url(url)


def test_names_and_tags():
    assert hf.name_for("Tiny-Org/QA_LoRA.v2") == "tiny-org/qa_lora.v2"
    assert hf.version_tag("3") == "v3" and hf.version_tag("1.2.0") == "v1.2.0" and hf.version_tag("beta") == "beta"
    assert hf.parse_org_url("hf://tiny-org") == ("tiny-org", None)
    assert hf.parse_org_url("hf://tiny-org/qa") == ("tiny-org", "qa")
    with pytest.raises(InvalidNameError):
        hf.parse_org_url("hf://bad org")


# -- what a push sends -------------------------------------------------------------------


def test_push_plan_operations_card_and_metadata(tmp_path, signer):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    res = _push_local(tmp_path, sign_with=signer)
    with Registry() as reg:
        plan = hf.plan_push(reg, res.ref, f"hf://{REPO}")
        sig = reg.read_signature(reg.signatures(res.digest, kind="model")[0]["blob"])
        blobs = {e.path: p for e, p in reg.files(res.ref)}
    assert plan.paths == ["README.md", "adapter_config.json", "adapter_model.safetensors", "adapterhub.json", "model.sig"]
    assert plan.tags == ["v1"] and plan.card_mode == "generated" and plan.digest == res.digest
    files = dict(plan.files)
    # Artifact files are read in place from the registry's blobs, not copied.
    assert files["adapter_model.safetensors"] == blobs["adapter_model.safetensors"]
    assert files["model.sig"] == sig
    ops = plan.operations(existing=[".gitattributes", "adapter_config.json", "old-weights.bin", "model.sig"])
    adds = [o for o in ops if isinstance(o, CommitOperationAdd)]
    assert [o.path_in_repo for o in adds] == plan.paths
    assert [o.path_in_repo for o in ops if isinstance(o, CommitOperationDelete)] == ["old-weights.bin"]
    meta = json.loads(files["adapterhub.json"])
    assert meta["format"] == hf.FORMAT and meta["name"] == "team/qa-lora" and meta["version"] == "1"
    assert meta["digest"] == res.digest and meta["registry_tags"] == ["prod"]
    assert meta["description"] == "QA on support tickets"
    assert meta["inspection"]["method"] == "LORA" and meta["inspection"]["rank"] == 8
    assert [f["path"] for f in meta["files"]] == ["adapter_config.json", "adapter_model.safetensors"]
    assert meta["card"] == {"file": "README.md", "mode": "generated", "original": None}
    assert meta["signature"]["key_id"] == signer.key_id and meta["provenance"] is None


def test_model_card_front_matter(tmp_path):
    from huggingface_hub import ModelCard, metadata_load

    res = _push_local(tmp_path, r=16)
    with Registry() as reg:
        plan = hf.plan_push(reg, res.ref, f"hf://{REPO}")
    text = dict(plan.files)["README.md"].decode()
    card = ModelCard(text)
    assert card.data.base_model == "meta-llama/Llama-2-7b-hf"
    assert card.data.base_model_relation == "adapter"
    assert card.data.library_name == "peft"
    assert {"lora", "rank-16", "peft", "adapterhub"} <= set(card.data.tags)
    assert "team/qa-lora:1" in card.text and f"adapterhub pull hf://{REPO}" in card.text
    p = tmp_path / "README.md"
    p.write_text(text)
    assert metadata_load(p)["library_name"] == "peft"


def test_card_metadata_for_derived_kinds():
    merged = hf.card_metadata({"kind": "merged", "format": "transformers", "method": "LORA", "base_model": "org/base"})
    assert merged["base_model_relation"] == "merged" and merged["library_name"] == "transformers"
    q = hf.card_metadata({"kind": "quantized", "format": "transformers", "quant": "nf4", "base_model": "org/base"})
    assert q["base_model_relation"] == "quantized" and {"nf4", "bitsandbytes", "quantized"} <= set(q["tags"])
    # A local path is not a Hub id: no base_model link to nowhere.
    local = hf.card_metadata({"kind": "adapter", "format": "peft", "method": "IA3", "base_model": "/data/base"})
    assert "base_model" not in local and "base_model_relation" not in local and local["library_name"] == "peft"


def test_artifact_card_is_merged_and_its_bytes_kept(tmp_path):
    from huggingface_hub import ModelCard

    own = b"---\nlicense: mit\ntags:\n- support\n---\n# Our adapter\n\nTrained on tickets.\n"
    res = _push_local(tmp_path, files={"README.md": own})
    with Registry() as reg:
        plan = hf.plan_push(reg, res.ref, f"hf://{REPO}")
    files = dict(plan.files)
    card = ModelCard(files["README.md"].decode())
    assert plan.card_mode == "merged"
    assert card.data.license == "mit" and card.data.library_name == "peft"
    assert card.data.tags[0] == "support" and "lora" in card.data.tags
    assert "Trained on tickets." in card.text
    original = json.loads(files["adapterhub.json"])["card"]["original"]
    assert original["data"].encode() == own and original["sha256"] == hashlib.sha256(own).hexdigest()


def test_reserved_file_names_are_refused(tmp_path):
    res = _push_local(tmp_path, files={"adapterhub.json": b"{}"})
    with Registry() as reg, pytest.raises(ConflictError, match="adapterhub.json"):
        hf.plan_push(reg, res.ref, f"hf://{REPO}")


def test_push_and_search_refuse_offline_before_any_request(tmp_path, hf_cache):
    res = _push_local(tmp_path)
    with Registry() as reg:
        with pytest.raises(RemoteError, match="HF_HUB_OFFLINE"):
            hf.push(reg, res.ref, f"hf://{REPO}")
        with pytest.raises(InvalidNameError):
            hf.push(reg, res.ref, "hf://bad org/x")
        with pytest.raises(InvalidNameError, match="not to a commit"):
            hf.push(reg, res.ref, f"hf://{REPO}@{COMMIT}")
    with pytest.raises(RemoteError, match="HF_HUB_OFFLINE"):
        hf.search("hf://tiny-org")


class RecordingApi:
    """Stands in for ``huggingface_hub.HfApi`` in push's orchestration test.

    Not a Hub: it records the calls, checks each one against the real
    ``HfApi`` method's signature, and answers from ``state``. What the real
    Hub does with these calls is not tested here.
    """

    state: ClassVar[dict] = {}

    def __init__(self, endpoint=None, token=None, **kw):
        self.endpoint, self.token = endpoint, token

    def _record(self, name, *args, **kw):
        import inspect

        from huggingface_hub import HfApi

        inspect.signature(getattr(HfApi, name)).bind(self, *args, **kw)  # a wrong argument fails here
        self.state.setdefault("calls", []).append((name, args, kw))

    def create_repo(self, *a, **kw):
        from huggingface_hub.hf_api import RepoUrl

        self._record("create_repo", *a, **kw)
        return RepoUrl(f"https://huggingface.co/{a[0]}")

    def list_repo_refs(self, *a, **kw):
        from huggingface_hub.hf_api import GitRefInfo, GitRefs

        self._record("list_repo_refs", *a, **kw)
        tags = [GitRefInfo(name=t, ref=f"refs/tags/{t}", target_commit="b" * 40) for t in self.state.get("tags", {})]
        return GitRefs(branches=[GitRefInfo(name="main", ref="refs/heads/main", target_commit="a" * 40)], converts=[], tags=tags)

    def hf_hub_download(self, *a, **kw):
        self._record("hf_hub_download", *a, **kw)
        path = Path(kw["cache_dir"]) / "remote-adapterhub.json"
        path.write_bytes(self.state["tags"][kw["revision"]])
        return str(path)

    def create_branch(self, *a, **kw):
        self._record("create_branch", *a, **kw)

    def list_repo_files(self, *a, **kw):
        self._record("list_repo_files", *a, **kw)
        return self.state.get("files", [".gitattributes"])

    def create_commit(self, *a, **kw):
        from huggingface_hub.hf_api import CommitInfo

        self._record("create_commit", *a, **kw)
        return CommitInfo(commit_url=f"https://huggingface.co/{a[0]}/commit/{'c' * 40}", commit_message=kw["commit_message"],
                          commit_description="", oid="c" * 40, pr_url=None)

    def create_tag(self, *a, **kw):
        self._record("create_tag", *a, **kw)


@pytest.fixture
def recording_api(monkeypatch, hf_cache):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.state = {}
    return RecordingApi.state


def test_push_orchestration_with_a_recording_client(tmp_path, recording_api):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    res = _push_local(tmp_path)
    recording_api["files"] = [".gitattributes", "README.md", "stale.bin"]
    with Registry() as reg:
        out = hf.push(reg, res.ref, f"hf://{REPO}@dev", token="hf_test")
        calls = [c[0] for c in recording_api["calls"]]
        assert calls == ["create_repo", "list_repo_refs", "create_branch", "list_repo_files", "create_commit", "create_tag"]
        kw = {name: (args, kw) for name, args, kw in recording_api["calls"]}
        assert kw["create_repo"][1]["exist_ok"] is True
        assert kw["create_branch"][1] == {"branch": "dev", "exist_ok": True}
        ops = kw["create_commit"][0][1]
        assert [o.path_in_repo for o in ops if isinstance(o, CommitOperationAdd)] == [
            "README.md", "adapter_config.json", "adapter_model.safetensors", "adapterhub.json"]
        assert [o.path_in_repo for o in ops if isinstance(o, CommitOperationDelete)] == ["stale.bin"]
        assert kw["create_commit"][1]["revision"] == "dev"
        assert kw["create_tag"][1]["tag"] == "v1" and kw["create_tag"][1]["revision"] == "c" * 40
        assert out["commit"] == "c" * 40 and out["tags"] == ["v1"] and out["created"] is True
        assert out["url"] == f"https://huggingface.co/{REPO}"

        # The tag is there with this digest: nothing is sent again.
        meta = dict(hf.plan_push(reg, res.ref, f"hf://{REPO}").files)["adapterhub.json"]
        recording_api.update(calls=[], tags={"v1": meta})
        again = hf.push(reg, res.ref, f"hf://{REPO}")
        assert again["created"] is False and [c[0] for c in recording_api["calls"]] == [
            "create_repo", "list_repo_refs", "hf_hub_download"]

        # The tag holds other content: a conflict, and no commit.
        other = _push_local(tmp_path, "team/other", seed=4)
        recording_api.update(calls=[])
        with pytest.raises(ConflictError, match="already has tag v1"):
            hf.push(reg, other.ref, f"hf://{REPO}")
        assert "create_commit" not in [c[0] for c in recording_api["calls"]]
        with pytest.raises(ConflictError, match="is a tag"):
            hf.push(reg, other.ref, f"hf://{REPO}@v1")


# -- pulling from the cache, offline ---------------------------------------------------------


def test_round_trip_through_the_cache_keeps_digest_metadata_and_signature(tmp_path, hf_cache, signer):
    res = _push_local(tmp_path, sign_with=signer)
    with Registry() as reg:
        plan = hf.plan_push(reg, res.ref, f"hf://{REPO}")
    snap = cache_snapshot(hf_cache, REPO, uploaded(plan), refs=("main", "v1"))
    modes = {p: os.stat(p).st_mode for p in (snap.parent.parent / "blobs").iterdir()}

    with _other(tmp_path, signer) as reg2:
        out = hf_pull(reg2, f"hf://{REPO}@v1")
        assert out["offline"] is True and out["commit"] == COMMIT
        assert out["digest"] == res.digest and out["digest_matches_metadata"] is True
        assert out["ref"] == "tiny-org/qa-lora:1"  # name from the repo id, version from adapterhub.json
        assert [f["path"] for f in out["files"]] == ["adapter_config.json", "adapter_model.safetensors"]
        info = reg2.show(out["ref"])
        assert info.version.description == "QA on support tickets"
        assert info.inspection["method"] == "LORA" and info.version.rank == 8
        assert "prod" not in info.version.tags  # registry tags stay local
        assert [s["key_id"] for s in info.signatures] == [signer.key_id]
        assert signing.verify_ref(reg2, out["ref"]).ok
        pulled = reg2.pull(out["ref"], tmp_path / "pulled")
        assert sorted(p.name for p in pulled.dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        again = hf_pull(reg2, f"hf://{REPO}")  # the same content again: a no-op
        assert again["created"] is False and again["ref"] == out["ref"]
        assert not list(reg2.home.glob(".hf-import*"))
    assert {p: os.stat(p).st_mode for p in modes} == modes  # the HF cache is left as it was


@pytest.mark.parametrize("own", [
    b"# Our adapter\n\nno front matter here\n",
    b"---\nlicense: mit\n---\n# Ours\n",
    b"---\n: : not yaml\n  - x\n---\nbody\n",
    b"\xff\xfe not utf-8",
    b"",
], ids=["plain", "front-matter", "bad-yaml", "binary", "empty"])
def test_round_trip_restores_the_artifacts_own_card(tmp_path, hf_cache, own):
    res = _push_local(tmp_path, files={"README.md": own})
    with Registry() as reg:
        plan = hf.plan_push(reg, res.ref, f"hf://{REPO}")
    cache_snapshot(hf_cache, REPO, uploaded(plan))
    with _other(tmp_path) as reg2:
        out = hf_pull(reg2, f"hf://{REPO}", name="team/qa:7")
        assert out["ref"] == "team/qa:7" and out["digest"] == res.digest
        readme = next(p for e, p in reg2.files(out["ref"]) if e.path == "README.md")
        assert readme.read_bytes() == own


def test_round_trip_of_a_derived_artifact_with_provenance(tmp_path, hf_cache, signer):
    from adapterhub.trust import provenance

    parent = _push_local(tmp_path, "team/base-lora")
    src = fake_lora(tmp_path / "derived", r=4, seed=3)
    with Registry() as reg:
        d = reg.push(src, "team/derived", derived_from=[(parent.digest, "adapter")], recipe={"operation": "merge", "options": {}})
        signing.sign_ref(reg, d.ref, signer)
        provenance.sign(reg, d.ref, signer)
        plan = hf.plan_push(reg, d.ref, "hf://tiny-org/derived")
    assert "provenance.sig" in plan.paths
    cache_snapshot(hf_cache, "tiny-org/derived", uploaded(plan))
    with _other(tmp_path, signer, rules=("require-signature", "require-provenance")) as reg2:
        out = hf_pull(reg2, "hf://tiny-org/derived")
        assert out["trust"]["signature"]["verified"] is True and out["trust"]["provenance"] == "verified"
        assert out["lineage_imported"] == 1
        [edge] = reg2.index.parents(out["digest"])
        assert edge["digest"] == parent.digest and edge["relation"] == "adapter" and edge["recipe"]["operation"] == "merge"
        assert {s["kind"] for s in reg2.show(out["ref"]).signatures} == {"model", "provenance"}


def test_provenance_policy_on_pull(tmp_path, hf_cache, signer):
    from adapterhub.trust import provenance

    parent = _push_local(tmp_path, "team/base-lora")
    with Registry() as reg:
        for name, attest in (("with-prov", True), ("without-prov", False)):
            d = reg.push(fake_lora(tmp_path / name, r=4, seed=5 if attest else 6), f"team/{name}",
                         derived_from=[(parent.digest, "adapter")], recipe={"operation": "merge"})
            if attest:
                provenance.sign(reg, d.ref, signer)
            cache_snapshot(hf_cache, f"tiny-org/{name}", uploaded(hf.plan_push(reg, d.ref, f"hf://tiny-org/{name}")))
    # Signed by a key this registry does not trust: refused under the policy ...
    with _other(tmp_path, rules=("require-provenance",)) as strict:
        with pytest.raises(TrustError, match="not trusted"):
            hf_pull(strict, "hf://tiny-org/with-prov")
        with pytest.raises(TrustError, match="without verifiable provenance"):
            hf_pull(strict, "hf://tiny-org/without-prov")
        _nothing_imported(strict)
    # ... and kept without one, to be checked when it is used (the key may be trusted later).
    with _other(tmp_path, home="lenient") as lenient:
        out = hf_pull(lenient, "hf://tiny-org/with-prov")
        assert "provenance" not in out["trust"]
        assert [s["kind"] for s in lenient.show(out["ref"]).signatures] == ["provenance"]
        assert not provenance.verify_chain(lenient, out["ref"]).ok


def test_snapshot_in_the_shared_blob_store(tmp_path, hf_cache):
    res = _push_local(tmp_path)
    with Registry() as reg:
        cache_snapshot(hf_cache, REPO, uploaded(hf.plan_push(reg, res.ref, f"hf://{REPO}")), shared=True)
    with _other(tmp_path) as reg2:
        assert hf_pull(reg2, f"hf://{REPO}")["digest"] == res.digest


def test_plain_hub_repo_is_imported_as_it_is(tmp_path, hf_cache):
    src = fake_lora(tmp_path / "plain")
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    files["README.md"] = b"---\nlibrary_name: peft\n---\nsomeone else's card\n"
    cache_snapshot(hf_cache, "Other-Org/Plain_Adapter", files)
    with _other(tmp_path) as reg2:
        out = hf_pull(reg2, "hf://Other-Org/Plain_Adapter")
        assert out["ref"] == "other-org/plain_adapter:1" and out["digest_matches_metadata"] is None
        assert "README.md" in [f["path"] for f in out["files"]] and out["origin"] is None


def test_files_changed_on_the_hub_after_the_push(tmp_path, hf_cache, signer):
    res = _push_local(tmp_path, sign_with=signer)
    with Registry() as reg:
        plan = hf.plan_push(reg, res.ref, f"hf://{REPO}")
    files = uploaded(plan)
    files["adapter_config.json"] = files["adapter_config.json"].replace(b'"lora_dropout": 0.0', b'"lora_dropout": 0.1')
    cache_snapshot(hf_cache, REPO, files)
    with _other(tmp_path, signer) as reg2:
        out = hf_pull(reg2, f"hf://{REPO}")
        assert out["digest"] != res.digest and out["digest_matches_metadata"] is False
        assert out["ref"] == "tiny-org/qa-lora:1" and out["lineage_imported"] == 0
        assert any("changed after the push" in w for w in out["warnings"])
        assert any("model.sig is for another artifact" in w for w in out["warnings"])
        assert reg2.signatures(out["digest"]) == []


# -- refused pulls leave nothing -------------------------------------------------------------


def _nothing_imported(reg: Registry) -> None:
    assert reg.ls() == []
    assert not list(reg.home.glob(".hf-import*"))


def test_policy_refuses_unsigned_and_untrusted(tmp_path, hf_cache, signer):
    res = _push_local(tmp_path)  # unsigned
    with Registry() as reg:
        cache_snapshot(hf_cache, REPO, uploaded(hf.plan_push(reg, res.ref, f"hf://{REPO}")))
    with _other(tmp_path, signer, rules=("require-signature",)) as reg2:
        with pytest.raises(TrustError, match="not signed"):
            hf_pull(reg2, f"hf://{REPO}")
        _nothing_imported(reg2)

    signed = _push_local(tmp_path, "team/signed", sign_with=signer)
    with Registry() as reg:
        cache_snapshot(hf_cache, "tiny-org/signed", uploaded(hf.plan_push(reg, signed.ref, "hf://tiny-org/signed")))
    with _other(tmp_path, home="third-home") as reg3:  # trusts nobody
        with pytest.raises(TrustError, match="not trusted"):
            hf_pull(reg3, "hf://tiny-org/signed", require_signature=True)
        _nothing_imported(reg3)


def test_not_in_the_cache_while_offline(tmp_path, hf_cache):
    with _other(tmp_path) as reg2:
        with pytest.raises(NotFoundError, match="not in the local Hugging Face cache") as e:
            hf_pull(reg2, "hf://tiny-org/absent")
        assert "HF_HUB_OFFLINE" in (e.value.hint or "")
        cache_snapshot(hf_cache, REPO, {"x.bin": b"x"})
        with pytest.raises(NotFoundError):
            hf_pull(reg2, f"hf://{REPO}@no-such-branch")
        _nothing_imported(reg2)


def test_partial_snapshot_is_not_imported(tmp_path, hf_cache):
    pytest.importorskip("huggingface_hub._tree_cache", reason="this huggingface_hub keeps no tree listing")
    src = fake_lora(tmp_path / "a")
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    snap = cache_snapshot(hf_cache, REPO, files)
    (snap / "adapter_model.safetensors").unlink()  # an interrupted download
    with _other(tmp_path) as reg2:
        with pytest.raises(NotFoundError, match="only partly in the local Hugging Face cache"):
            hf_pull(reg2, f"hf://{REPO}")
        _nothing_imported(reg2)


def test_not_an_artifact_and_bad_metadata(tmp_path, hf_cache):
    cache_snapshot(hf_cache, "tiny-org/notes", {"notes.txt": b"hello"})
    cache_snapshot(hf_cache, "tiny-org/bad-meta", {"adapterhub.json": b"{not json"})
    cache_snapshot(hf_cache, "tiny-org/future", {"adapterhub.json": json.dumps({"format": hf.FORMAT, "format_version": 99}).encode()})
    with _other(tmp_path) as reg2:
        with pytest.raises(InvalidArtifactError):
            hf_pull(reg2, "hf://tiny-org/notes")
        with pytest.raises(InvalidArtifactError, match="not valid JSON"):
            hf_pull(reg2, "hf://tiny-org/bad-meta")
        with pytest.raises(InvalidArtifactError, match="format version 99") as e:
            hf_pull(reg2, "hf://tiny-org/future")
        assert e.value.hint == "upgrade adapterhub"
        with pytest.raises(InvalidNameError):
            hf_pull(reg2, "hf://tiny-org/notes", name="Bad Name")
        _nothing_imported(reg2)


def test_version_taken_by_other_content(tmp_path, hf_cache):
    res = _push_local(tmp_path)
    with Registry() as reg:
        cache_snapshot(hf_cache, REPO, uploaded(hf.plan_push(reg, res.ref, f"hf://{REPO}")))
    with _other(tmp_path) as reg2:
        reg2.push(fake_lora(tmp_path / "different", seed=9), "tiny-org/qa-lora:1")
        with pytest.raises(ConflictError) as e:
            hf_pull(reg2, f"hf://{REPO}")
        assert "--name" in (e.value.hint or "")
        assert len(reg2.ls()) == 1


# -- errors from the Hub, with real responses ---------------------------------------------------


def _http():
    import huggingface_hub.utils._http as h

    return getattr(h, "httpx2", None) or getattr(h, "httpx", None) or pytest.skip("unknown HTTP client")


def _hub_exception(status: int, url: str, headers: dict[str, str] | None = None) -> Exception:
    from huggingface_hub.utils import hf_raise_for_status

    httpx = _http()
    resp = httpx.Response(status, headers=headers or {}, request=httpx.Request("POST", url))
    with pytest.raises(Exception) as e:
        hf_raise_for_status(resp)
    return e.value


@pytest.mark.parametrize("status, url, headers, kind, match", [
    (401, "https://huggingface.co/api/models/tiny-org/qa-lora/commit/main",
     {"X-Error-Message": "Invalid credentials in Authorization header"}, RemoteAuthError, "credentials"),
    (403, "https://huggingface.co/api/models/tiny-org/qa-lora/commit/main", {}, RemoteAuthError, "refused"),
    (401, "https://huggingface.co/api/models/tiny-org/private", {}, NotFoundError, "private"),
    (404, "https://huggingface.co/api/models/tiny-org/qa-lora", {"X-Error-Code": "RepoNotFound"}, NotFoundError, "no such repo"),
    (404, "https://huggingface.co/api/models/tiny-org/qa-lora/revision/nope", {"X-Error-Code": "RevisionNotFound"}, NotFoundError, "revision"),
    (403, "https://huggingface.co/api/models/meta/gated", {"X-Error-Code": "GatedRepo"}, RemoteAuthError, "gated"),
    (409, "https://huggingface.co/api/models/tiny-org/qa-lora/tag/main", {}, ConflictError, "conflict"),
    (503, "https://huggingface.co/api/models/tiny-org/qa-lora", {}, RemoteError, "503"),
])
def test_hub_http_errors_are_mapped(status, url, headers, kind, match):
    err = hf.hub_error(_hub_exception(status, url, headers), "hf://tiny-org/qa-lora")
    assert type(err) is kind and match in str(err), (type(err), str(err))
    if kind is RemoteAuthError:
        assert err.hint and err.exit_code == 9


def test_network_and_validation_errors_are_mapped():
    from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled

    httpx = _http()
    err = hf.hub_error(httpx.ConnectError("no route", request=httpx.Request("GET", "https://hub.example")), "hf://o/r", "https://hub.example")
    assert isinstance(err, RemoteError) and "https://hub.example" in str(err)
    assert isinstance(hf.hub_error(OfflineModeIsEnabled("offline"), "hf://o/r"), RemoteError)
    assert isinstance(hf.hub_error(HFValidationError("Repo id must ..."), "hf://o/r"), InvalidNameError)
    assert hf.hub_error(KeyError("a bug"), "hf://o/r") is None  # not ours to translate


def test_search_rows_from_model_info():
    from huggingface_hub.hf_api import ModelInfo

    m = ModelInfo(
        id="tiny-org/qa-lora", sha="a" * 40, library_name="peft", downloads=3, private=False,
        lastModified="2026-01-01T00:00:00.000Z",
        tags=["peft", "safetensors", "adapterhub", "lora", "rank-16", "base_model:adapter:meta-llama/Llama-2-7b-hf"],
        cardData={"base_model": "meta-llama/Llama-2-7b-hf", "base_model_relation": "adapter", "library_name": "peft"},
    )
    row = hf.model_row(m)
    assert row["repository"] == "tiny-org/qa-lora" and row["url"] == "hf://tiny-org/qa-lora"
    assert (row["kind"], row["method"], row["rank"], row["base_model"]) == ("adapter", "LORA", 16, "meta-llama/Llama-2-7b-hf")
    assert row["metadata"]["adapterhub"] is True and row["revision"] == "a" * 40
    bare = hf.model_row(ModelInfo(id="x/y", tags=[]))
    assert bare["kind"] is None and bare["rank"] is None and bare["metadata"]["adapterhub"] is False


# -- an endpoint that cannot be reached (a closed port on loopback, no server) ----------------


@pytest.fixture
def unreachable(monkeypatch, hf_cache) -> str:
    """Online mode, with the Hub at a loopback port nothing listens on."""
    import socket

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once, when huggingface_hub was imported
    with socket.socket() as s:  # a free port, closed again: connections to it are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_unreachable_endpoint_falls_back_to_the_cache(tmp_path, unreachable):
    res = _push_local(tmp_path)
    with Registry() as reg:
        cache_snapshot(Path(os.environ["HF_HUB_CACHE"]), REPO, uploaded(hf.plan_push(reg, res.ref, f"hf://{REPO}")))
    with _other(tmp_path) as reg2:
        out = hf_pull(reg2, f"hf://{REPO}", endpoint=unreachable)
        assert out["offline"] is True and out["digest"] == res.digest
        with pytest.raises(NotFoundError, match="not in the local Hugging Face cache"):
            hf_pull(reg2, "hf://tiny-org/absent", endpoint=unreachable)


def test_push_to_an_unreachable_endpoint(tmp_path, unreachable):
    # (search is not tried here: huggingface_hub retries listings with a backoff of about 20 s.)
    res = _push_local(tmp_path)
    with Registry() as reg, pytest.raises(RemoteError, match="cannot reach the Hub at " + unreachable) as e:
        hf.push(reg, res.ref, f"hf://{REPO}", endpoint=unreachable, token="hf_test")
    assert e.value.exit_code == 9


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_pull_from_the_cache_offline(cli, tmp_path, hf_cache, signer):
    res = _push_local(tmp_path, sign_with=signer)
    with Registry() as reg:
        cache_snapshot(hf_cache, "tiny-org/shared", uploaded(hf.plan_push(reg, res.ref, "hf://tiny-org/shared")))
    r = cli("pull", "hf://tiny-org/shared", "--name", "team/shared", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["ref"] == "team/shared:1" and out["digest"] == res.digest and out["offline"] is True
    r = cli("pull", "hf://tiny-org/shared", tmp_path / "dest", "--name", "team/shared")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "model.sig"]
    assert cli("verify-signature", "team/shared:1").exit_code == 0


def test_cli_errors(cli, tmp_path, hf_cache):
    r = cli("pull", "hf://tiny-org/absent")
    assert r.exit_code == 3 and "not in the local Hugging Face cache" in r.stderr
    r = cli("pull", "hf://tiny-org/bad name")
    assert r.exit_code == 4
    res = _push_local(tmp_path)
    r = cli("push", res.ref, "hf://tiny-org/qa-lora")
    assert r.exit_code == 9 and "HF_HUB_OFFLINE" in r.stderr
    assert cli("remote", "add", "hub", "hf://tiny-org").exit_code == 0
    r = cli("search", "--remote", "hub")
    assert r.exit_code == 9 and "HF_HUB_OFFLINE" in r.stderr


def test_cli_remote_add_checks_the_token_when_online(cli, unreachable, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    real_whoami = HfApi.whoami

    def refuse(self, token=None, **kw):
        calls.append((self.endpoint, token))
        raise _hub_exception(401, f"{self.endpoint}/api/whoami-v2")

    monkeypatch.setattr(HfApi, "whoami", refuse)
    r = cli("remote", "add", "hub", "hf://tiny-org", "--endpoint", "https://hub.example", "--token-stdin", input="hf_bad\n")
    assert r.exit_code == 9 and "did not accept the credentials" in r.stderr, r.output
    assert calls == [("https://hub.example", "hf_bad")]
    assert json.loads(cli("remote", "ls", "--json").stdout) == []  # refused: nothing stored
    r = cli("remote", "add", "hub", "hf://tiny-org", "--token-stdin", "--no-check", "--json", input="hf_bad\n")
    assert r.exit_code == 0 and json.loads(r.stdout)["credentials_check"] == "skipped" and len(calls) == 1
    # The real client again, against an endpoint nothing listens on: added, with a warning.
    monkeypatch.setattr(HfApi, "whoami", real_whoami)
    r = cli("remote", "add", "down", "hf://tiny-org", "--endpoint", unreachable, "--token-stdin", "--json", input="hf_x\n")
    assert r.exit_code == 0 and json.loads(r.stdout)["credentials_check"] == "unchecked", r.output
    assert "credentials were not checked: cannot reach the Hub" in r.stderr


def test_cli_remote_add_does_not_check_offline(cli, hf_cache):
    r = cli("remote", "add", "hub", "hf://tiny-org", "--token-stdin", input="hf_x\n")
    assert r.exit_code == 0 and "not checked: HF_HUB_OFFLINE is set" in r.stderr, r.output


def test_cli_search_takes_a_hub_url_and_quiet_prints_pullable_urls(cli, recording_api):
    from huggingface_hub.hf_api import ModelInfo

    def list_models(self, *a, **kw):
        self._record("list_models", *a, **kw)
        return [ModelInfo(id="tiny-org/qa-lora", sha="a" * 40, library_name="peft", tags=["peft", "lora", "rank-16"])]

    RecordingApi.list_models = list_models  # type: ignore[attr-defined]
    try:
        r = cli("search", "--remote", "hf://tiny-org", "-q")
        assert r.exit_code == 0, r.output
        assert r.stdout == "hf://tiny-org/qa-lora\n"  # what `pull` takes
        assert cli("remote", "add", "hub", "hf://tiny-org").exit_code == 0
        assert cli("search", "--remote", "hub", "-q").stdout == "hf://tiny-org/qa-lora\n"
        assert cli("search", "--remote", "hub", "--cached", "-q").stdout == "hf://tiny-org/qa-lora\n"
        assert [c[2]["author"] for c in recording_api["calls"]] == ["tiny-org", "tiny-org"]
    finally:
        del RecordingApi.list_models
