"""Merge: bad input fails before anything is written, interrupted merges leave
nothing behind, and base tensors are read one at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from adapterhub.errors import ConflictError, InvalidArtifactError, NotFoundError  # noqa: E402
from adapterhub.converters.formats import peft_math
from adapterhub.converters.merge import merge, prepare_merge  # noqa: E402
from adapterhub.converters.formats.safetensors_io import TensorSource, file_map  # noqa: E402
from adapterhub.converters.formats.shards import STAGE_BYTES  # noqa: E402

from .conftest import fake_lora  # noqa: E402
from .factories import adapter_from_tensors, synthetic_base  # noqa: E402


# --------------------------------------------------------------------------- builders (no transformers: fast)


def lora_files(path: Path, tensors: dict, **config) -> Path:
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "base_model_name_or_path": "org/tiny", **config}
    return adapter_from_tensors(path, tensors, **cfg)


def q_lora(path: Path, hidden: int = 32, r: int = 4, layers: int = 2, scale: float = 0.1, **config) -> Path:
    g = torch.Generator().manual_seed(1)
    t = {}
    for i in range(layers):
        p = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        t[f"{p}.lora_A.weight"] = scale * torch.randn(r, hidden, generator=g)
        t[f"{p}.lora_B.weight"] = scale * torch.randn(hidden, r, generator=g)
    return lora_files(path, t, r=r, **config)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and ("incomplete" in p.name or ".old" in p.name))


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return synthetic_base(tmp_path / "base")


# --------------------------------------------------------------------------- happy path on synthetic files


def test_synthetic_lora_formula_and_side_files(tmp_path, base):
    ad = q_lora(tmp_path / "a")
    report = merge(file_map(ad), file_map(base), tmp_path / "out", device="cpu", base_name="org/tiny", adapter_name="team/qa")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json", "README.md"]
    )
    assert list(report.files) == sorted(p.name for p in out.iterdir())
    src, b, a = TensorSource(file_map(out)), TensorSource(file_map(base)), TensorSource(file_map(ad))
    k = "model.layers.1.self_attn.q_proj.weight"
    p = "base_model.model.model.layers.1.self_attn.q_proj"
    want = b.get(k) + (a.get(f"{p}.lora_B.weight") @ a.get(f"{p}.lora_A.weight")) * (8 / 4)
    assert torch.equal(src.get(k), want)
    assert torch.equal(src.get("model.layers.1.self_attn.k_proj.weight"), b.get("model.layers.1.self_attn.k_proj.weight"))
    assert report.modules_merged == 2 and report.tensors_changed == 2 and report.tensors_written == len(b.keys())
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: org/tiny\nbase_model_relation: merged\nlibrary_name: transformers\ntags:\n")
    assert "team/qa" in card
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d and d["qlora_base"] == "original" and d["seconds"] >= 0


def test_progress_reports_every_byte(tmp_path, base):
    seen: list = []

    class Bar:
        def update(self, n):
            seen.append(n)

        def close(self):
            seen.append("closed")

    def factory(desc, total):
        seen.append(("start", desc, total))
        return Bar()

    merge(file_map(q_lora(tmp_path / "a")), file_map(base), tmp_path / "out", device="cpu", progress=factory)
    total = seen[0][2]
    assert seen[0][:2] == ("start", "merge") and seen[-1] == "closed" and sum(seen[1:-1]) == total


def test_legacy_bin_adapter(tmp_path, base):
    ad = q_lora(tmp_path / "a")
    st = TensorSource(file_map(ad))
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({k: st.get(k) for k in st.keys()}, legacy / "adapter_model.bin")
    (legacy / "adapter_config.json").write_text((ad / "adapter_config.json").read_text())
    merge(file_map(legacy), file_map(base), tmp_path / "o1", device="cpu")
    merge(file_map(ad), file_map(base), tmp_path / "o2", device="cpu")
    assert (tmp_path / "o1" / "model.safetensors").read_bytes() == (tmp_path / "o2" / "model.safetensors").read_bytes()


def test_adapter_tokenizer_wins_over_base(tmp_path, base):
    ad = q_lora(tmp_path / "a")
    (ad / "tokenizer_config.json").write_text('{"added": true}')
    report = merge(file_map(ad), file_map(base), tmp_path / "out", device="cpu")
    assert report.tokenizer_from == "adapter"
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == {"added": True}


def test_registry_style_file_map_is_read_in_place(tmp_path, base):
    """Files need not share a directory: a FileMap of content-addressed blobs works."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    fm = {}
    for i, (rel, p) in enumerate(sorted(file_map(base).items())):
        dst = blobs / f"{i:02d}ab"
        os.link(p, dst)
        fm[rel] = dst
    merge(file_map(q_lora(tmp_path / "a")), fm, tmp_path / "out", device="cpu")
    assert (tmp_path / "out" / "config.json").exists()


# --------------------------------------------------------------------------- wrong base, wrong keys


def test_wrong_base_names_module_and_both_shapes(tmp_path):
    small = synthetic_base(tmp_path / "small", hidden=16)
    ad = q_lora(tmp_path / "a", hidden=32)
    with pytest.raises(InvalidArtifactError) as e:
        merge(file_map(ad), file_map(small), tmp_path / "out", device="cpu")
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "[32, 32]" in msg and "[16, 16]" in msg
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_target_module(tmp_path):
    base = synthetic_base(tmp_path / "base", layers=1)  # adapter has layers 0 and 1
    with pytest.raises(InvalidArtifactError, match=r"model\.layers\.1\.self_attn\.q_proj: target module not found"):
        merge(file_map(q_lora(tmp_path / "a")), file_map(base), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_adapter_keys_that_match_no_module(tmp_path, base):
    ad = q_lora(tmp_path / "a")
    src = TensorSource(file_map(ad))
    t = {k: src.get(k) for k in src.keys()}
    t["base_model.model.model.bogus_head.weight"] = torch.zeros(3, 3)
    lora_files(tmp_path / "b", t)
    with pytest.raises(InvalidArtifactError, match="base_model.model.model.bogus_head.weight matches no tensor"):
        merge(file_map(tmp_path / "b"), file_map(base), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_lora_for_another_architecture(tmp_path, base):
    t = {
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4, 32),
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(96, 4),
    }
    lora_files(tmp_path / "a", t, target_modules=["c_attn"])
    with pytest.raises(InvalidArtifactError, match="transformer.h.0.attn.c_attn: target module not found"):
        merge(file_map(tmp_path / "a"), file_map(base), tmp_path / "out", device="cpu")


def test_rank_in_config_disagrees_with_tensors(tmp_path, base):
    ad = q_lora(tmp_path / "a", r=4)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["r"] = 8
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidArtifactError, match="rank 8 but the saved tensors have rank 4"):
        merge(file_map(ad), file_map(base), tmp_path / "out", device="cpu")


def test_lora_bias_needs_a_base_bias(tmp_path, base):
    ad = q_lora(tmp_path / "a")
    src = TensorSource(file_map(ad))
    t = {k: src.get(k) for k in src.keys()}
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.ones(32)
    lora_files(tmp_path / "b", t, lora_bias=True)
    with pytest.raises(InvalidArtifactError, match="q_proj: the adapter trained a LoRA bias"):
        merge(file_map(tmp_path / "b"), file_map(base), tmp_path / "out", device="cpu")


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_truncated_shard(tmp_path, base, which):
    ad = q_lora(tmp_path / "a")
    f = (base if which == "base" else ad) / ("model.safetensors" if which == "base" else "adapter_model.safetensors")
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(InvalidArtifactError, match="truncated"):
        merge(file_map(ad), file_map(base), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_files(tmp_path, base):
    ad = q_lora(tmp_path / "a")
    (ad / "adapter_model.safetensors").unlink()
    with pytest.raises(NotFoundError, match="adapter_model.safetensors"):
        merge(file_map(ad), file_map(base), tmp_path / "out", device="cpu")
    ad = q_lora(tmp_path / "b")
    (base / "config.json").unlink()
    with pytest.raises(NotFoundError, match="config.json"):
        merge(file_map(ad), file_map(base), tmp_path / "out", device="cpu")


# --------------------------------------------------------------------------- methods that cannot be merged


@pytest.mark.parametrize(
    "peft_type,needle",
    [
        ("PROMPT_TUNING", "virtual tokens"),
        ("PREFIX_TUNING", "prefixes"),
        ("P_TUNING", "prompt encoder"),
        ("ADAPTION_PROMPT", "prompt tokens"),
        ("MULTITASK_PROMPT_TUNING", "virtual tokens"),
    ],
)
def test_prompt_methods_cannot_be_merged(tmp_path, base, peft_type, needle):
    lora_files(tmp_path / "a", {"prompt_embeddings": torch.zeros(8, 32)}, peft_type=peft_type)
    with pytest.raises(InvalidArtifactError) as e:
        merge(file_map(tmp_path / "a"), file_map(base), tmp_path / "out", device="cpu")
    assert "cannot be merged" in str(e.value) and needle in str(e.value)
    assert e.value.hint and "keep the adapter as is" in e.value.hint
    assert not (tmp_path / "out").exists()


def test_bottleneck_adapter_cannot_be_merged(tmp_path, base):
    from .factories import bottleneck_adapter

    ad = bottleneck_adapter(tmp_path / "a")
    with pytest.raises(InvalidArtifactError, match="bottleneck adapters insert new") as e:
        merge(file_map(ad), file_map(base), tmp_path / "out", device="cpu")
    assert "keep the adapter as is" in (e.value.hint or "")


@pytest.mark.parametrize(
    "config,needle",
    [
        ({"peft_type": "OFT"}, "not supported yet: merging OFT"),
        ({"peft_type": "LORA", "alora_invocation_tokens": [1, 2]}, "not supported yet: this LoRA uses alora_invocation_tokens"),
        ({"peft_type": "LORA", "init_lora_weights": "pissa"}, "rewrites the base weights"),
    ],
)
def test_unsupported_variants(tmp_path, base, config, needle):
    ad = q_lora(tmp_path / "a", **config)
    with pytest.raises(InvalidArtifactError, match=needle):
        merge(file_map(ad), file_map(base), tmp_path / "out", device="cpu")


def test_lora_conv_is_not_supported_yet(tmp_path, base):
    t = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32, 1, 1),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4, 1, 1),
    }
    with pytest.raises(InvalidArtifactError, match="not supported yet: .*convolution"):
        merge(file_map(lora_files(tmp_path / "a", t)), file_map(base), tmp_path / "out", device="cpu")


# --------------------------------------------------------------------------- output handling


def test_out_exists_without_force(tmp_path, base):
    ad = q_lora(tmp_path / "a")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConflictError, match="already exists"):
        merge(file_map(ad), file_map(base), out, device="cpu")
    assert (out / "keep.txt").read_text() == "mine"
    merge(file_map(ad), file_map(base), out, device="cpu", force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []


def test_quantized_base_is_refused(tmp_path, base):
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidArtifactError, match="bitsandbytes 4-bit") as e:
        merge(file_map(q_lora(tmp_path / "a")), file_map(base), tmp_path / "out", device="cpu")
    assert "adapterhub dequantize" in (e.value.hint or "")
    assert not (tmp_path / "out").exists()


def test_real_bnb_checkpoint_is_refused(tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("transformers")
    from .factories import bnb_checkpoint

    q = bnb_checkpoint(tmp_path / "nf4", "nf4")
    with pytest.raises(InvalidArtifactError, match="bitsandbytes 4-bit"):
        merge(file_map(q_lora(tmp_path / "a", hidden=64)), file_map(q), tmp_path / "out", device="cpu")
    # the same tensors without the config entry are caught by their names
    cfg = json.loads((q / "config.json").read_text())
    del cfg["quantization_config"]
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidArtifactError, match="bitsandbytes-quantized tensors"):
        merge(file_map(q_lora(tmp_path / "b", hidden=64)), file_map(q), tmp_path / "out", device="cpu")


def test_ctrl_c_mid_merge_leaves_nothing(tmp_path, base):
    class Bar:
        n = 0

        def update(self, n):
            Bar.n += 1
            if Bar.n == 3:
                raise KeyboardInterrupt

        def close(self):
            pass

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        merge(file_map(q_lora(tmp_path / "a")), file_map(base), out, device="cpu", progress=lambda d, t: Bar(), max_shard_bytes=5000)
    assert Bar.n == 3
    assert not out.exists() and leftovers(tmp_path) == []


def test_ctrl_c_with_force_keeps_the_old_output(tmp_path, base):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def boom(desc, total):
        class Bar:
            def update(self, n):
                raise KeyboardInterrupt

            def close(self):
                pass

        return Bar()

    with pytest.raises(KeyboardInterrupt):
        merge(file_map(q_lora(tmp_path / "a")), file_map(base), out, device="cpu", force=True, progress=boom)
    assert (out / "old.txt").read_text() == "old" and leftovers(tmp_path) == []


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_result_is_refused(tmp_path, base, bad):
    ad = q_lora(tmp_path / "a")
    src = TensorSource(file_map(ad))
    t = {k: src.get(k) for k in src.keys()}
    t["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"][3, 1] = bad
    lora_files(tmp_path / "b", t)
    with pytest.raises(InvalidArtifactError, match=r"model\.layers\.1\.self_attn\.q_proj: merging gives non-finite values"):
        merge(file_map(tmp_path / "b"), file_map(base), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_overflow_when_casting_is_refused(tmp_path, base):
    ad = q_lora(tmp_path / "a", scale=1000.0)  # |delta| ~ 1e6·r: beyond float16's 65504
    with pytest.raises(InvalidArtifactError, match="overflows torch.float16"):
        merge(file_map(ad), file_map(base), tmp_path / "out", device="cpu", dtype="float16")
    assert not (tmp_path / "out").exists()


def test_cuda_requested_without_a_gpu(tmp_path, base):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(InvalidArtifactError, match="no CUDA device"):
        merge(file_map(q_lora(tmp_path / "a")), file_map(base), tmp_path / "out", device="cuda")
    report = merge(file_map(q_lora(tmp_path / "b")), file_map(base), tmp_path / "out", device="auto")
    assert report.device == "cpu"


@pytest.mark.gpu
def test_cuda_merge_matches_cpu(tmp_path, base):
    ad = q_lora(tmp_path / "a")
    merge(file_map(ad), file_map(base), tmp_path / "cpu", device="cpu")
    merge(file_map(ad), file_map(base), tmp_path / "gpu", device="cuda")
    a, b = TensorSource(file_map(tmp_path / "cpu")), TensorSource(file_map(tmp_path / "gpu"))
    for k in a.keys():
        torch.testing.assert_close(a.get(k), b.get(k), atol=1e-5, rtol=1e-5)


def test_tied_synthetic_base_unties_only_when_touched(tmp_path):
    base = synthetic_base(tmp_path / "base", tie=True)
    report = merge(file_map(q_lora(tmp_path / "a")), file_map(base), tmp_path / "o1", device="cpu")
    assert report.untied == () and "lm_head.weight" not in TensorSource(file_map(tmp_path / "o1")).keys()
    g = torch.Generator().manual_seed(0)
    t = {
        "base_model.model.lm_head.lora_A.weight": torch.randn(4, 32, generator=g),
        "base_model.model.lm_head.lora_B.weight": torch.randn(64, 4, generator=g),
    }
    report = merge(file_map(lora_files(tmp_path / "b", t, target_modules=["lm_head"])), file_map(base), tmp_path / "o2", device="cpu")
    out = TensorSource(file_map(tmp_path / "o2"))
    assert report.untied == ("lm_head.weight",)
    assert torch.equal(out.get("model.embed_tokens.weight"), TensorSource(file_map(base)).get("model.embed_tokens.weight"))
    assert not torch.equal(out.get("lm_head.weight"), out.get("model.embed_tokens.weight"))
    assert json.loads((tmp_path / "o2" / "config.json").read_text())["tie_word_embeddings"] is False


# --------------------------------------------------------------------------- streaming


def test_base_tensors_are_read_once_into_reused_buffers(tmp_path, monkeypatch):
    """Each base tensor is read once, into a buffer that is reused, or copied file to file."""
    from adapterhub.converters.formats.safetensors_io import Workspace

    base = synthetic_base(tmp_path / "base", layers=12)
    ad = q_lora(tmp_path / "a", layers=12)
    base_files = file_map(base)
    seen = {"read": [], "span": [], "allocs": 0}
    orig_read, orig_span, orig_raw = TensorSource.read_into, TensorSource.span, Workspace.raw

    def read_into(self, name, ws, role="in"):
        if self.files is base_files:
            seen["read"].append(name)
        return orig_read(self, name, ws, role)

    def span(self, name):
        if self.files is base_files:
            seen["span"].append(name)
        return orig_span(self, name)

    def raw(self, role, nbytes):
        before = self._bufs.get(role)
        out = orig_raw(self, role, nbytes)
        seen["allocs"] += self._bufs[role] is not before
        return out

    monkeypatch.setattr(TensorSource, "read_into", read_into)
    monkeypatch.setattr(TensorSource, "span", span)
    monkeypatch.setattr(Workspace, "raw", raw)
    orig_get = TensorSource.get

    def get(self, name):
        if self.files is base_files:
            pytest.fail(f"base tensor {name} was read whole into a new tensor")
        return orig_get(self, name)

    monkeypatch.setattr(TensorSource, "get", get)
    report = merge(file_map(ad), base_files, tmp_path / "out", device="cpu")
    keys = TensorSource(base_files).keys()
    assert sorted(seen["read"] + seen["span"]) == sorted(keys)  # every tensor exactly once
    assert len(seen["read"]) == report.tensors_changed and seen["span"]  # unchanged ones never enter memory
    # One buffer per role (two inputs, one of them read ahead; the float32
    # weight; the delta; two cast outputs for the writer thread), grown only
    # when a larger tensor comes: never one allocation per tensor.
    assert len(seen["read"]) == 12 and seen["allocs"] <= 6


def test_merge_restores_torch_threads(tmp_path):
    import torch

    before = torch.get_num_threads()
    merge(file_map(q_lora(tmp_path / "a", layers=2)), file_map(synthetic_base(tmp_path / "base", layers=2)),
          tmp_path / "out", device="cpu")
    assert torch.get_num_threads() == before


RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from adapterhub.converters.merge import merge
    from adapterhub.converters.formats.safetensors_io import file_map

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    a, b, out, wa, wb = map(Path, sys.argv[1:6])
    af, bf = file_map(a), file_map(b)
    merge(file_map(wa), file_map(wb), out.with_name(out.name + "-warm"), device="cpu")  # imports, kernels
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = status("VmRSS:")
    merge(af, bf, out, device="cpu", max_shard_bytes=64 * 2**20)
    print(json.dumps({"before": before, "peak": status("VmHWM:")}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_rss_stays_near_one_tensor(tmp_path):
    """40 tensors of 4 MiB (160 MiB of base): peak RSS grows by a few tensors, not the model."""
    from safetensors.torch import save_file

    base = tmp_path / "base"
    base.mkdir()
    hidden, layers, r = 1024, 40, 4
    g = torch.Generator().manual_seed(0)
    save_file(
        {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(hidden, hidden, generator=g) for i in range(layers)},
        str(base / "model.safetensors"),
    )
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False}))
    t = {}
    for i in range(layers):
        p = f"base_model.model.model.layers.{i}.mlp.down_proj"
        t[f"{p}.lora_A.weight"] = torch.randn(r, hidden, generator=g)
        t[f"{p}.lora_B.weight"] = torch.randn(hidden, r, generator=g)
    ad = lora_files(tmp_path / "a", t, r=r, target_modules=["down_proj"])
    warm_base = synthetic_base(tmp_path / "warm_base")
    warm = q_lora(tmp_path / "warm_a")
    res = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(ad), str(base), str(tmp_path / "out"), str(warm), str(warm_base)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=300,
        # glibc otherwise serves freed 4 MiB blocks from a heap it rarely trims, which
        # makes the peak noisy (20-45 MiB here, not growing with the model)
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["before"]
    tensor = hidden * hidden * 4
    print(f"peak RSS grew by {grew / 2**20:.1f} MiB")
    # six buffers of a tensor each (two inputs, one read ahead; the float32
    # weight; the delta; two outputs for the writer thread) and one tensor of
    # slack, plus the writer's two fixed-size staging buffers for O_DIRECT
    budget = 7 * tensor + 2 * STAGE_BYTES
    assert grew < budget, f"peak RSS grew by {grew / 2**20:.0f} MiB for a {layers * tensor / 2**20:.0f} MiB model"


def test_blocked_merge_that_differs_falls_back_to_whole_tensor_ops(monkeypatch):
    """A signature whose blocked result is not bytewise the whole-tensor result is never used."""
    from adapterhub.converters.formats import peft_blocked, peft_math
    from adapterhub.converters.formats.safetensors_io import Workspace

    monkeypatch.setattr(peft_blocked, "_blocked_ok", {})
    real = peft_blocked._merge_blocked

    def off_by_one_bit(weight, ops, t, out, ws, rows):
        ok = real(weight, ops, t, out, ws, rows)
        out.view(torch.int32)[-1, -1] ^= 1  # what a BLAS that sums in another order per block would do
        return ok

    monkeypatch.setattr(peft_blocked, "_merge_blocked", off_by_one_bit)
    g = torch.Generator().manual_seed(0)
    tensors = {"A": torch.randn(8, 512, generator=g), "B": torch.randn(600, 8, generator=g)}
    op = peft_math.ModuleOp("lora", "m", "weight", {"A": "A", "B": "B"}, scale=0.5)
    w = torch.randn(600, 512, generator=g)
    want = peft_math.apply_ops(w, [op], tensors.__getitem__)
    for _ in range(2):
        out = torch.empty(600, 512)
        assert peft_math.merge_into(out, w, [op], tensors.__getitem__, "cpu", ws=Workspace(), shape_of=lambda k: tensors[k].shape)
        assert torch.equal(out, want)
    assert list(peft_blocked._blocked_ok.values()) == [False]


# --------------------------------------------------------------------------- pure functions


def test_plan_is_made_without_reading_base_tensors(tmp_path, base, monkeypatch):
    def no_reads(self, name):
        raise AssertionError("prepare_merge read tensor data")

    ad = q_lora(tmp_path / "a")
    monkeypatch.setattr(TensorSource, "get", no_reads)
    prep = prepare_merge(file_map(ad), file_map(base))
    assert [t.name for t in prep.plan.changed] == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]


def test_get_pattern_key_mirrors_peft():
    from peft.utils.other import get_pattern_key as peft_get

    keys = ["q_proj", r"layers\.1\.mlp\.down_proj", "layers.0.self_attn.v_proj", "proj"]
    for module in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.v_proj", "lm_head"]:
        assert peft_math.get_pattern_key(keys, module) == peft_get(keys, module)


def test_prefix_resolution_both_ways():
    plan = peft_math.parse_adapter(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2},
        {"base_model.model.layers.0.q.lora_A.weight": (2, 4), "base_model.model.layers.0.q.lora_B.weight": (4, 2)},
    )
    mp = peft_math.resolve_plan(plan, {"model.layers.0.q.weight": (4, 4), "model.norm.weight": (4,)}, {})
    assert [t.name for t in mp.changed] == ["model.layers.0.q.weight"]
    plan = peft_math.parse_adapter(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2},
        {"base_model.model.bert.layers.0.q.lora_A.weight": (2, 4), "base_model.model.bert.layers.0.q.lora_B.weight": (4, 2)},
    )
    mp = peft_math.resolve_plan(plan, {"layers.0.q.weight": (4, 4)}, {})
    assert [t.name for t in mp.changed] == ["layers.0.q.weight"]


def test_detect_qlora_from_card_and_config():
    card = "- load_in_4bit: True\n- bnb_4bit_quant_type: fp4\n- bnb_4bit_use_double_quant: True\n"
    assert peft_math.detect_qlora({}, card) == peft_math.QuantSpec("fp4", 64, True, "adapter model card")
    assert peft_math.detect_qlora({}, "- load_in_8bit: True\n- load_in_4bit: False\n") is None
    assert peft_math.detect_qlora({}, None) is None
    q = peft_math.detect_qlora({"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}, None)
    assert q is not None and q.quant_type == "nf4" and not q.double_quant


def test_tied_aliases_only_for_models_with_a_head():
    shapes = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,)}
    assert peft_math.tied_aliases(shapes, {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}) == {
        "lm_head.weight": "model.embed_tokens.weight"
    }
    assert peft_math.tied_aliases(shapes, {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}) == {}
    assert peft_math.tied_aliases({"embeddings.word_embeddings.weight": (8, 4)}, {"architectures": ["BertModel"]}) == {}


def test_fake_lora_fixture_merges(tmp_path, base):
    """The registry tests' torch-free LoRA (q_proj and v_proj, hidden 32) merges too."""
    ad = fake_lora(tmp_path / "a", hidden=32, r=4, alpha=8)
    report = merge(file_map(ad), file_map(base), tmp_path / "out", device="cpu")
    assert report.modules_merged == 4
