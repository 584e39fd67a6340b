"""``converters.bnb``: bitsandbytes quantize / dequantize against transformers' own output.

The strongest check is the first one: transformers + bitsandbytes quantize a
tiny model and ``save_pretrained`` it; adapterhub quantizes the same 16-bit
checkpoint from the files alone; the two checkpoints must hold the same tensor
names, dtypes, shapes and bytes, and the same ``config.json`` text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

from adapterhub.errors import ConflictError, InvalidArtifactError, UsageError  # noqa: E402
from adapterhub.converters import quantize as conversions
from adapterhub.converters.formats import bnb, bnb_cpu, bnb_layout, bnb_quant
from adapterhub.converters.formats.safetensors_io import TensorSource, TensorSpec, file_map  # noqa: E402

_NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
MODES: dict[str, tuple[dict[str, Any] | None, dict[str, Any]]] = {
    # name: (our quantize() kwargs, BitsAndBytesConfig kwargs)
    "nf4": ({"to": "nf4", "compute_dtype": "bfloat16"}, {**_NF4, "bnb_4bit_compute_dtype": "bfloat16"}),
    "fp4": ({"to": "fp4", "compute_dtype": "float32"}, {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}),
    "nf4-dq": (
        {"to": "nf4", "double_quant": True, "compute_dtype": "float16"},
        {**_NF4, "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float16"},
    ),
    "int8": ({"to": "int8"}, {"load_in_8bit": True}),
    # transformers only: packed 4-bit codes stored as bfloat16 (we write uint8, and read both)
    "nf4-bf16-storage": (None, {**_NF4, "bnb_4bit_quant_storage": "bfloat16"}),
}

# Tiny models: name -> builder kwargs. In "odd", k/v_proj (20x40) and the MLP
# (60x40) hold element counts that are not multiples of the 64-value block,
# which bitsandbytes handles with a partial last block.
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {"arch": "llama", "hidden_size": 64, "intermediate_size": 128, "vocab": 96},
    "llama-tied": {"arch": "llama", "hidden_size": 64, "intermediate_size": 128, "vocab": 96,
                   "tie_word_embeddings": True},
    "llama-fp32": {"arch": "llama", "hidden_size": 64, "intermediate_size": 128, "vocab": 96,
                   "dtype": "float32"},
    "odd": {"arch": "llama", "hidden_size": 40, "intermediate_size": 60, "vocab": 100},
    "gpt2": {"arch": "gpt2", "hidden_size": 64, "vocab": 96},
}


@pytest.fixture(autouse=True)
def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()


def _build(
    path: Path, arch: str, hidden_size: int, vocab: int, dtype: str = "bfloat16", shard: str = "50GB", **kw: Any
) -> Path:
    torch.manual_seed(0)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=hidden_size, intermediate_size=kw.pop("intermediate_size"), num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
            tie_word_embeddings=kw.pop("tie_word_embeddings", False),
        )
        model = LlamaForCausalLM(cfg)
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_embd=hidden_size, n_layer=2, n_head=4, vocab_size=vocab, n_positions=64))
    model.to(getattr(torch, dtype)).save_pretrained(str(path), max_shard_size=shard)
    return path


class Models:
    """Tiny bases and transformers' quantized saves, built once per worker."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._done: dict[tuple[str, ...], Path] = {}

    def base(self, arch: str) -> Path:
        key = ("base", arch)
        if key not in self._done:
            self._done[key] = _build(self.root / f"base-{arch}", **ARCHS[arch])
        return self._done[key]

    def hf_quantized(self, arch: str, mode: str) -> Path:
        """transformers + bitsandbytes quantize on CPU, then save_pretrained."""
        key = ("hf", arch, mode)
        if key not in self._done:
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            model = AutoModelForCausalLM.from_pretrained(
                self.base(arch), quantization_config=BitsAndBytesConfig(**MODES[mode][1]), device_map="cpu"
            )
            out = self.root / f"hf-{arch}-{mode}"
            model.save_pretrained(str(out))
            self._done[key] = out
        return self._done[key]

    def ours(self, arch: str, mode: str) -> Path:
        key = ("ours", arch, mode)
        if key not in self._done:
            out = self.root / f"ours-{arch}-{mode}"
            conversions.quantize(file_map(self.base(arch)), out, device="cpu", **(MODES[mode][0] or {}))
            self._done[key] = out
        return self._done[key]


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return Models(tmp_path_factory.mktemp("bnb-models"))


def _tensors(d: Path) -> dict[str, Any]:
    src = TensorSource(file_map(d))
    return {k: src.get(k) for k in src.keys()}


def _ids(vocab: int = 96) -> Any:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def _load(path: Path, **kw: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), device_map=kw.pop("device_map", "cpu"), **kw)


# --------------------------------------------------------------------------- layout equality


LAYOUT_CASES = [
    ("llama", "nf4"), ("llama", "fp4"), ("llama", "nf4-dq"), ("llama", "int8"),
    ("llama-tied", "nf4"), ("llama-fp32", "fp4"), ("odd", "nf4-dq"), ("odd", "int8"),
    ("gpt2", "nf4-dq"), ("gpt2", "int8"),
]


@pytest.mark.parametrize(("arch", "mode"), LAYOUT_CASES, ids=[f"{a}-{m}" for a, m in LAYOUT_CASES])
def test_layout_equals_transformers_save(models: Models, arch: str, mode: str) -> None:
    theirs = _tensors(models.hf_quantized(arch, mode))
    ours = _tensors(models.ours(arch, mode))
    assert sorted(ours) == sorted(theirs)
    for k, t in theirs.items():
        o = ours[k]
        assert (o.dtype, tuple(o.shape)) == (t.dtype, tuple(t.shape)), k
        assert torch.equal(o, t), f"{k} differs"
    # config.json is the same text: quantization_config and everything else.
    hf_cfg = (models.hf_quantized(arch, mode) / "config.json").read_text()
    assert (models.ours(arch, mode) / "config.json").read_text() == hf_cfg


def test_layout_facts(models: Models) -> None:
    """The facts the module doc states, read off transformers' own nf4+double-quant save."""
    t = _tensors(models.hf_quantized("llama", "nf4-dq"))
    m = "model.layers.0.mlp.down_proj"  # W is (64, 128): 8192 values, 128 blocks
    assert (t[f"{m}.weight"].dtype, tuple(t[f"{m}.weight"].shape)) == (torch.uint8, (4096, 1))
    assert (t[f"{m}.weight.absmax"].dtype, tuple(t[f"{m}.weight.absmax"].shape)) == (torch.uint8, (128,))
    assert tuple(t[f"{m}.weight.quant_map"].shape) == (16,)
    assert tuple(t[f"{m}.weight.nested_absmax"].shape) == (1,)
    assert tuple(t[f"{m}.weight.nested_quant_map"].shape) == (256,)
    qs = json.loads(bytes(t[f"{m}.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert list(qs) == [
        "quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"
    ]
    assert qs["dtype"] == "bfloat16" and qs["shape"] == [64, 128] and qs["blocksize"] == 64
    assert t["lm_head.weight"].dtype == torch.bfloat16
    i8 = _tensors(models.hf_quantized("llama", "int8"))
    assert i8[f"{m}.weight"].dtype == torch.int8 and i8[f"{m}.SCB"].dtype == torch.float32
    assert i8[f"{m}.weight_format"].shape == () and int(i8[f"{m}.weight_format"]) == 0


@pytest.mark.parametrize("mode", ["nf4", "fp4", "nf4-dq", "int8"])
def test_quantization_config_matches_bitsandbytesconfig(mode: str) -> None:
    from transformers import BitsAndBytesConfig

    ours_kw, hf_kw = MODES[mode]
    assert ours_kw is not None
    qs = bnb.QuantSettings(ours_kw["to"], ours_kw.get("double_quant", False), ours_kw.get("compute_dtype", "bfloat16"))
    assert qs.quantization_config() == BitsAndBytesConfig(**hf_kw).to_dict()
    skip = ["lm_head", "mlp"]
    assert bnb.quantization_config_for("nf4", skip_modules=skip) == BitsAndBytesConfig(
        **_NF4, bnb_4bit_compute_dtype="bfloat16", llm_int8_skip_modules=skip
    ).to_dict()


# --------------------------------------------------------------------------- per tensor


SHAPES = [(64, 64), (32, 64), (7, 9), (40, 60), (64, 100), (300, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
@pytest.mark.parametrize("mode", ["nf4", "fp4", "nf4-dq", "int8"])
def test_specs_match_tensors_and_bitsandbytes(shape: tuple[int, int], mode: str) -> None:
    import bitsandbytes.functional as F

    to, dq = ("nf4", True) if mode == "nf4-dq" else (mode, False)
    W = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    off = bnb.nested_offset(W) if dq else None
    got = bnb.quantize_weight("m", W, to, double_quant=dq, nested_offset=off)
    specs = bnb.quantized_specs("m", shape, W.dtype, to, double_quant=dq, nested_offset=off)
    assert [(s.name, s.shape, s.dtype) for s in specs] == [(k, tuple(v.shape), v.dtype) for k, v in got.items()]
    if to == "int8":
        CB, SCB, _ = F.int8_vectorwise_quant(W.half())
        assert torch.equal(got["m.weight"], CB) and torch.equal(got["m.SCB"], SCB)
        return
    # Exactly what bitsandbytes packs for this weight (offset computed by bnb itself).
    packed, state = F.quantize_4bit(W, blocksize=64, compress_statistics=dq, quant_type=to)
    want = {"m.weight": packed, **{f"m.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    if dq:
        assert off == state.offset.item()


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(300, 256), (37, 129)])  # the second: odd element count, a partial last block
def test_cpu_quantize_in_chunks_is_one_bitsandbytes_call(monkeypatch, mode: str, shape: tuple[int, int]) -> None:
    import bitsandbytes.functional as F

    W = (torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 0.02).to(torch.bfloat16)
    packed, state = F.quantize_4bit(W, blocksize=64, compress_statistics=False, quant_type=mode)
    monkeypatch.setattr(bnb_cpu, "CHUNK", 1000)  # 896 elements (7 pairs of blocks) per step
    got = bnb_quant._quantize_4bit(W, 64, mode)
    assert torch.equal(got[0], packed) and torch.equal(got[1], state.absmax) and torch.equal(got[2], state.code)


def test_transformers_hints_are_remembered_per_version(tmp_path: Path, monkeypatch) -> None:
    """The class attributes transformers would read cost an import of transformers: kept in a per-user cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    computed: list[str] = []
    real = bnb_layout._transformers_hints

    def counting(config):
        computed.append(str(config.get("model_type")))
        return real(config)

    monkeypatch.setattr(bnb_layout, "_transformers_hints", counting)
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    moe = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}
    first = [bnb_layout.transformers_hints(c) for c in (llama, moe)]
    assert first == [real(llama), real(moe)] and first[1][1] is not None  # mixtral is refused
    assert [bnb_layout.transformers_hints(c) for c in (llama, moe)] == first
    assert computed == ["llama", "mixtral"]  # the second time from the cache
    cache = tmp_path / "adapterhub" / "bnb-hints.json"
    cache.write_text("{not json")
    assert bnb_layout.transformers_hints(llama) == first[0] and computed[-1] == "llama"  # a broken cache is skipped
    assert json.loads(cache.read_text())  # and written again


def test_double_quant_without_known_offset_is_fixed_width_and_equivalent() -> None:
    """``nested_offset=None``: same length for any data, same state once parsed."""
    import bitsandbytes.functional as F

    lengths = set()
    for seed in range(5):
        W = (torch.randn(64, 128, generator=torch.Generator().manual_seed(seed)) * (seed + 1) / 7).to(torch.float16)
        specs = {s.name: s for s in bnb.quantized_specs("m", W.shape, W.dtype, "nf4", double_quant=True)}
        got = bnb.quantize_weight("m", W, "nf4", double_quant=True)
        exact = bnb.quantize_weight("m", W, "nf4", double_quant=True, nested_offset=bnb.nested_offset(W))
        qs_name = "m.weight.quant_state.bitsandbytes__nf4"
        lengths.add(got[qs_name].numel())
        assert got[qs_name].numel() == specs[qs_name].shape[0]
        parsed, exact_parsed = (json.loads(bytes(d[qs_name].tolist())) for d in (got, exact))
        assert parsed == exact_parsed  # same float once parsed
        rel = lambda d: {k[2:]: v for k, v in d.items()}  # noqa: E731
        assert torch.equal(bnb.dequantize_weight(rel(got)), bnb.dequantize_weight(rel(exact)))
        _, state = F.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(bnb.dequantize_weight(rel(got)), F.dequantize_4bit(got["m.weight"], state))
    assert len(lengths) == 1


def test_quantizer_streaming_without_prepass_loads_like_transformers(models: Models, tmp_path: Path) -> None:
    """The merge --quantize path: specs up front, tensors on the fly, double-quant offsets unknown."""
    from adapterhub.converters.formats.shards import StreamingShardWriter

    base = models.base("gpt2")  # Conv1D weights too
    src = TensorSource(file_map(base))
    config = json.loads((base / "config.json").read_text())
    qz = bnb.Quantizer(bnb.QuantSettings("nf4", double_quant=True, compute_dtype="float16"), config)
    specs = [o for k in src.keys() for o in (qz.specs(src.spec(k)) if qz.wants(src.spec(k)) else [src.spec(k)])]
    out = tmp_path / "out"
    out.mkdir()
    w = StreamingShardWriter(out, specs)
    for k in src.keys():
        t = src.get(k)
        for name, v in (qz.quantize(k, t) if qz.wants(src.spec(k)) else {k: t}).items():
            w.write(name, v)
    w.close()
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": qz.settings.quantization_config()}))
    ours, theirs = _tensors(out), _tensors(models.hf_quantized("gpt2", "nf4-dq"))
    assert sorted(ours) == sorted(theirs)
    differ = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert differ and all(k.endswith("quant_state.bitsandbytes__nf4") for k in differ)  # only the number's spelling
    for k in differ:
        assert json.loads(bytes(ours[k].tolist())) == json.loads(bytes(theirs[k].tolist()))
    with torch.no_grad():
        assert torch.equal(_load(out)(_ids()).logits, _load(models.hf_quantized("gpt2", "nf4-dq"))(_ids()).logits)


def test_quantize_weight_refuses_non_finite_and_float16_overflow() -> None:
    W = torch.randn(64, 64)
    W[3, 5] = float("nan")
    with pytest.raises(InvalidArtifactError, match="non-finite"):
        bnb.quantize_weight("m", W, "nf4")
    with pytest.raises(InvalidArtifactError, match="float16"):
        bnb.quantize_weight("m", torch.full((4, 64), 1e6), "int8")


# --------------------------------------------------------------------------- which modules


def _transformers_choice(model: Any) -> set[str]:
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model) + list(model._keep_in_fp32_modules or [])
    return {
        n for n, m in model.named_modules()
        if (type(m) is torch.nn.Linear or isinstance(m, Conv1D)) and should_convert_module(n, skip)
    }


_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 96}
RULE_CASES = {
    "llama": _SMALL, "llama-tied": {**_SMALL, "tie_word_embeddings": True}, "mistral": _SMALL, "qwen2": _SMALL,
    "qwen3": _SMALL, "gemma2": {**_SMALL, "head_dim": 16}, "phi": _SMALL, "gpt_neox": _SMALL, "stablelm": _SMALL,
    "opt": {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 96,
            "word_embed_proj_dim": 64},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 96},
    "bloom": {"hidden_size": 64, "n_layer": 2, "n_head": 4, "vocab_size": 96},
    "falcon": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 96},
}


@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_name_rule_picks_the_modules_transformers_picks(case: str) -> None:
    """Our name+config rule against transformers' module-type rule, on meta-device models."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    for auto in (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModel):
        cfg = AutoConfig.for_model(case.split("-")[0], **RULE_CASES[case])
        with torch.device("meta"):
            model = auto.from_config(cfg)
        config = {**cfg.to_dict(), "architectures": [type(model).__name__]}
        keep, _ = bnb_layout._transformers_hints(config)
        ours = {
            k.removesuffix(".weight") for k, v in model.state_dict().items()
            if bnb.should_quantize(TensorSpec(k, tuple(v.shape), v.dtype), config, keep_in_fp32=keep)
        }
        assert ours == _transformers_choice(model), type(model).__name__


def test_skip_modules_replace_the_default_skips_as_in_transformers(models: Models, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    skip = ["mlp.down_proj", "layers.1.self_attn"]
    theirs = tmp_path / "hf"
    AutoModelForCausalLM.from_pretrained(
        models.base("llama"), device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_compute_dtype="bfloat16", llm_int8_skip_modules=skip),
    ).save_pretrained(str(theirs))
    ours = tmp_path / "ours"
    conversions.quantize(file_map(models.base("llama")), ours, to="nf4", skip_modules=skip, device="cpu")
    a, b = _tensors(theirs), _tensors(ours)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "lm_head.weight.absmax" in b  # with explicit skips transformers quantizes the head too
    assert (ours / "config.json").read_text() == (theirs / "config.json").read_text()


# --------------------------------------------------------------------------- loading and logits


@pytest.mark.parametrize("mode", ["nf4", "nf4-dq", "int8"])
def test_output_loads_with_transformers_and_gives_its_logits(models: Models, mode: str) -> None:
    import bitsandbytes as bnb_lib

    ids = _ids()
    ours = _load(models.ours("llama", mode))
    theirs = _load(models.hf_quantized("llama", mode))
    base = _load(models.base("llama"))
    cls = bnb_lib.nn.Linear8bitLt if mode == "int8" else bnb_lib.nn.Linear4bit
    assert isinstance(ours.model.layers[0].self_attn.q_proj, cls)
    assert type(ours.lm_head) is torch.nn.Linear and ours.lm_head.weight.dtype == torch.bfloat16  # lm_head stays 16-bit
    with torch.no_grad():
        lo, lt, lb = ours(ids).logits.float(), theirs(ids).logits.float(), base(ids).logits.float()
    assert torch.equal(lo, lt)  # same bytes in, same logits out
    # Close-ish to the 16-bit model: well below the logits' own spread.
    err = (lo - lb).abs().max().item()
    assert err < 0.25 * lb.std().item() + 0.05, err


# --------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize(
    ("arch", "mode"), [("llama", "nf4"), ("llama", "nf4-dq"), ("llama", "int8"), ("odd", "fp4"), ("gpt2", "nf4-dq")]
)
def test_dequantize_equals_bitsandbytes_dequantization(models: Models, tmp_path: Path, arch: str, mode: str) -> None:
    """Our dequantize == transformers' ``model.dequantize()`` (bitsandbytes' kernels), tensor by tensor."""
    src = models.ours(arch, mode)
    out = tmp_path / "deq"
    rep = conversions.dequantize(file_map(src), out, dtype="float32" if mode == "int8" else "auto", device="cpu")
    assert rep.modules_dequantized
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    ours = _tensors(out)
    ref = _load(src).dequantize()  # transformers: bnb.functional.dequantize_4bit / int8_vectorwise_dequant
    ref_sd = ref.state_dict()
    for m in rep.modules_dequantized:
        w = ref_sd[f"{m}.weight"]
        if arch == "gpt2":
            w = w.T  # transformers' dequantize makes nn.Linear (out, in); GPT-2's Conv1D stores (in, out)
        # transformers casts to the model's dtype (bf16); ours is float32 for int8, the exact value
        assert torch.equal(ours[f"{m}.weight"].to(w.dtype), w), m
    if mode == "int8":
        import bitsandbytes.functional as F

        q = _tensors(src)
        for m in rep.modules_dequantized:
            assert torch.equal(ours[f"{m}.weight"], F.int8_vectorwise_dequant(q[f"{m}.weight"], q[f"{m}.SCB"])), m
    base = _tensors(models.base(arch))
    assert sorted(ours) == sorted(base)
    for k, v in base.items():
        assert tuple(ours[k].shape) == tuple(v.shape), k


def test_dequantize_reads_other_quant_storage(models: Models, tmp_path: Path) -> None:
    import bitsandbytes.functional as F

    src = models.hf_quantized("llama", "nf4-bf16-storage")
    assert TensorSource(file_map(src)).spec("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    rep = conversions.dequantize(file_map(src), tmp_path / "deq", dtype="auto", device="cpu")
    ours = _tensors(tmp_path / "deq")
    model = _load(src)
    for m in rep.modules_dequantized:
        w = model.get_submodule(m).weight
        assert torch.equal(ours[f"{m}.weight"], F.dequantize_4bit(w.data, w.quant_state)), m


def test_dequantized_model_loads_and_matches_the_quantized_logits(models: Models, tmp_path: Path) -> None:
    out = tmp_path / "deq"
    conversions.dequantize(file_map(models.ours("gpt2", "nf4-dq")), out, dtype="bfloat16", device="cpu")
    ids = _ids()
    with torch.no_grad():
        q = _load(models.ours("gpt2", "nf4-dq"))(ids).logits.float()
        d = _load(out)(ids).logits.float()
    assert torch.allclose(q, d, atol=2e-2), (q - d).abs().max()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_int8_round_trip_is_exact(models: Models, tmp_path: Path) -> None:
    """Dequantize then quantize again gives back the same int8 checkpoint."""
    deq = tmp_path / "deq"
    conversions.dequantize(file_map(models.ours("llama", "int8")), deq, dtype="float32", device="cpu")
    again = tmp_path / "again"
    # The dequantized config has no quantization_config, so it may be quantized again.
    conversions.quantize(file_map(deq), again, to="int8", device="cpu")
    a, b = _tensors(models.ours("llama", "int8")), _tensors(again)
    for k in a:
        if a[k].dtype == torch.int8 or k.endswith(".SCB"):
            assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- files around the weights


def test_sharded_in_and_out_side_files_and_card(models: Models, tmp_path: Path) -> None:
    base = _build(tmp_path / "base", **ARCHS["llama"], shard="60KB")  # the same weights as models.base("llama")
    assert (base / "model.safetensors.index.json").exists()
    (base / "tokenizer.json").write_text("{}")
    (base / "README.md").write_text("# the original card\n")
    (base / "original").mkdir()
    (base / "original" / "consolidated.00.pth").write_bytes(b"16-bit weights")
    out = tmp_path / "out"
    rep = conversions.quantize(file_map(base), out, to="nf4", device="cpu", max_shard_bytes=20_000, base_model="org/tiny")
    assert (out / "model.safetensors.index.json").exists() and len(rep.files) > 3
    assert "tokenizer.json" in rep.copied and (out / "tokenizer.json").read_text() == "{}"
    assert rep.dropped == ["original/consolidated.00.pth"] and not (out / "original").exists()
    card = (out / "README.md").read_text()
    assert "base_model_relation: quantized" in card and 'base_model: "org/tiny"' in card
    assert rep.to_dict()["tensors_quantized"] == 14 and sorted(rep.kept_16bit) == ["lm_head", "model.embed_tokens"]
    src = TensorSource(file_map(out))
    assert len({src.shard_of(k) for k in src.keys()}) > 1
    # Sharding changes nothing in the tensors: the same as the single-file output.
    single = _tensors(models.ours("llama", "nf4"))
    assert sorted(single) == sorted(src.keys()) and all(torch.equal(src.get(k), v) for k, v in single.items())
    _load(out)  # transformers reads the sharded quantized output
    # Registry blobs: files named by content, not by their place in the artifact.
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    fmap = {}
    for i, (rel, p) in enumerate(sorted(file_map(base).items())):
        fmap[rel] = blobs / f"{i:04d}"
        fmap[rel].write_bytes(p.read_bytes())
    conversions.quantize(fmap, tmp_path / "from-blobs", to="nf4", device="cpu", max_shard_bytes=20_000)
    assert all(torch.equal(v, single[k]) for k, v in _tensors(tmp_path / "from-blobs").items())


# --------------------------------------------------------------------------- bad input


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_already_quantized_input_is_refused(models: Models, tmp_path: Path) -> None:
    with pytest.raises(InvalidArtifactError, match="already quantized"):
        conversions.quantize(file_map(models.hf_quantized("llama", "nf4")), tmp_path / "out")
    # Quantized tensors without the config entry are caught too.
    fake = tmp_path / "fake"
    fake.mkdir()
    for f in models.hf_quantized("llama", "int8").iterdir():
        (fake / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((fake / "config.json").read_text())
    del cfg["quantization_config"]
    (fake / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidArtifactError, match="already quantized"):
        conversions.quantize(file_map(fake), tmp_path / "out2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_non_quantized_input_to_dequantize_is_refused(models: Models, tmp_path: Path) -> None:
    with pytest.raises(InvalidArtifactError, match="not quantized"):
        conversions.dequantize(file_map(models.base("llama")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_out_is_refused_without_force(models: Models, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConflictError, match="already exists"):
        conversions.quantize(file_map(models.base("llama")), out, device="cpu")
    assert _listing(out) == ["keep.txt"]
    conversions.quantize(file_map(models.base("llama")), out, device="cpu", force=True)
    assert "keep.txt" not in _listing(out) and "model.safetensors" in _listing(out)
    assert _listing(tmp_path) == ["out"]  # no temp dirs left beside it


def test_out_inside_the_input_is_refused(models: Models, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    for f in models.base("llama").iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConflictError, match="holds the input"):
        conversions.quantize(file_map(base), base, force=True, device="cpu")
    assert (base / "model.safetensors").exists()


def test_truncated_shard_is_refused_and_leaves_nothing(models: Models, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    for f in models.base("llama").iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    st = base / "model.safetensors"
    with open(st, "r+b") as fh:
        fh.truncate(os.path.getsize(st) - 1000)
    with pytest.raises(InvalidArtifactError, match="truncated"):
        conversions.quantize(file_map(base), tmp_path / "out", device="cpu")
    assert _listing(tmp_path) == ["base"]


def test_ctrl_c_mid_run_leaves_nothing(models: Models, tmp_path: Path) -> None:
    class Bar:
        seen = 0

        def update(self, n: int) -> None:
            Bar.seen += 1
            if Bar.seen == 5:
                raise KeyboardInterrupt

        def close(self) -> None:
            pass

    with pytest.raises(KeyboardInterrupt):
        conversions.quantize(file_map(models.base("llama")), tmp_path / "out", device="cpu", progress=lambda d, t: Bar())
    assert Bar.seen == 5
    assert _listing(tmp_path) == []
    Bar.seen = 0
    with pytest.raises(KeyboardInterrupt):
        conversions.dequantize(
            file_map(models.ours("llama", "nf4")), tmp_path / "deq", device="cpu", progress=lambda d, t: Bar()
        )
    assert _listing(tmp_path) == []


def test_other_bad_input(models: Models, tmp_path: Path) -> None:
    base = models.base("llama")
    with pytest.raises(UsageError, match="double quantization applies to 4-bit"):
        conversions.quantize(file_map(base), tmp_path / "o", to="int8", double_quant=True)
    with pytest.raises(UsageError, match="unknown quantization"):
        conversions.quantize(file_map(base), tmp_path / "o", to="int4")
    # An adapter is not a model.
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text("{}")
    (ad / "config.json").write_text("{}")
    with pytest.raises(InvalidArtifactError, match="adapter"):
        conversions.quantize(file_map(ad), tmp_path / "o")
    # No config.json.
    nocfg = tmp_path / "nocfg"
    nocfg.mkdir()
    (nocfg / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())
    with pytest.raises(InvalidArtifactError, match="config.json"):
        conversions.quantize(file_map(nocfg), tmp_path / "o")
    # Architectures whose checkpoints transformers rewrites on load, and Falcon (no nn.Linear to quantize).
    for model_type, match in (("mixtral", "rewrites"), ("falcon", "no Linear weights")):
        d = tmp_path / model_type
        d.mkdir()
        (d / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())
        (d / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(InvalidArtifactError, match=match):
            conversions.quantize(file_map(d), tmp_path / "o")
    # A non-finite weight stops the run before anything is renamed into place.
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    bad.mkdir()
    sd = load_file(str(base / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_text((base / "config.json").read_text())
    with pytest.raises(InvalidArtifactError, match="non-finite"):
        conversions.quantize(file_map(bad), tmp_path / "o", device="cpu")
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_damaged_quant_state_is_refused(models: Models, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    d = tmp_path / "q"
    d.mkdir()
    src = models.ours("llama", "nf4")
    (d / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(str(src / "model.safetensors"))
    k = "model.layers.0.self_attn.q_proj.weight.absmax"
    sd[k] = sd[k][:-1].clone()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InvalidArtifactError, match="absmax"):
        conversions.dequantize(file_map(d), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu  # loads the NF4 output with device_map='cuda'
def test_nf4_output_loads_on_gpu_and_tracks_bf16_logits(models: Models, tmp_path: Path) -> None:
    """Run on a GPU machine: ``pytest tests/test_quantize.py -m gpu``."""
    import bitsandbytes as bnb_lib
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = models.base("llama")
    out = tmp_path / "nf4-cuda"
    rep = conversions.quantize(file_map(base), out, to="nf4", double_quant=True, compute_dtype="float16", device="cuda")
    assert rep.device == "cuda"
    ids = _ids().to("cuda")
    with torch.no_grad():
        lb = _load(base, device_map="cuda", dtype=torch.bfloat16)(ids).logits.float()
        ours_model = _load(out, device_map="cuda")
        assert isinstance(ours_model.model.layers[0].mlp.up_proj, bnb_lib.nn.Linear4bit)
        assert ours_model.lm_head.weight.dtype == torch.bfloat16
        ours = ours_model(ids).logits.float()
        ours_cpu_made = _load(models.ours("llama", "nf4-dq"), device_map="cuda")(ids).logits.float()
        theirs = AutoModelForCausalLM.from_pretrained(
            str(base), device_map="cuda",
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="float16"),
        )(ids).logits.float()
    quant_err = (theirs - lb).abs().max().item()
    # Ours (quantized on the GPU, or on the CPU) is much closer to transformers' GPU
    # quantization than either is to the bf16 model.
    for got in (ours, ours_cpu_made):
        assert (got - theirs).abs().max().item() <= 0.1 * quant_err + 1e-3, ((got - theirs).abs().max(), quant_err)
    assert (ours - lb).abs().max().item() < 0.25 * lb.std().item() + 0.05
