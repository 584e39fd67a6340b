"""The C quantizers (converters/_c/bnb_kernels.c) against bitsandbytes and the torch path, byte for byte.

Every instruction-set level this CPU runs is tested (portable C, AVX2,
AVX-512: ``ah_bnb_set_isa``), since users' CPUs pick any of them. The torch
path (``ADAPTERHUB_NO_NATIVE=1``) must write the same bytes as the kernel.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

from adapterhub.converters.formats import bnb, bnb_cpu, bnb_native  # noqa: E402
from tests.test_bnb_cpu import inf_nan_weight  # noqa: E402

pytestmark = pytest.mark.skipif(
    not bnb_native.available(), reason="the bnb kernel is not built (no C compiler) or ADAPTERHUB_NO_NATIVE is set"
)

MODES = ["nf4", "fp4"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _levels() -> list[int]:
    lib = bnb_native.library()
    if lib is None:
        return [0]
    levels = sorted({lib.ah_bnb_set_isa(level) for level in (0, 1, 2)})
    lib.ah_bnb_set_isa(-1)
    return levels


@pytest.fixture(params=_levels(), ids=lambda v: ["portable", "avx2", "avx512"][v])
def isa(request):
    lib = bnb_native.library()
    assert lib.ah_bnb_set_isa(request.param) == request.param
    yield request.param
    lib.ah_bnb_set_isa(-1)


def bits(t):
    return t.contiguous().view(-1).view(torch.uint8)


def torch_path(fn, *args, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("ADAPTERHUB_NO_NATIVE", "1")
        assert not bnb_native.available()
        return fn(*args)


def assert_4bit(W, mode, monkeypatch, blocksize=64):
    packed, state = F.quantize_4bit(W, blocksize=blocksize, compress_statistics=False, quant_type=mode)
    got, absmax, code = bnb_cpu.quantize_4bit(W, blocksize, mode)
    assert torch.equal(got, packed), f"{mode}: {int((got != packed).sum())} of {packed.numel()} bytes differ"
    assert torch.equal(bits(absmax), bits(state.absmax))
    assert torch.equal(code, state.code)
    t_got, t_absmax, _ = torch_path(bnb_cpu.quantize_4bit, W, blocksize, mode, monkeypatch=monkeypatch)
    assert torch.equal(t_got, got) and torch.equal(bits(t_absmax), bits(absmax))


def assert_int8(W, monkeypatch):
    CB, SCB, _ = F.int8_vectorwise_quant(W.to(torch.float16))
    cb, scb = bnb_cpu.int8_rowwise(W)
    assert torch.equal(cb, CB), f"{int((cb != CB).sum())} int8 values differ"
    assert torch.equal(bits(scb), bits(SCB))
    t_cb, t_scb = torch_path(bnb_cpu.int8_rowwise, W, monkeypatch=monkeypatch)
    assert torch.equal(t_cb, cb) and torch.equal(bits(t_scb), bits(scb))


def test_codebook_is_bitsandbytes():
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    lib = bnb_native.library()
    c_char = bnb_native.ctypes.c_char
    for code, mode in enumerate(MODES):
        mid, order = bytearray(60), bytearray(16)
        assert lib.ah_bnb_codebook(code, (c_char * 60).from_buffer(mid), (c_char * 16).from_buffer(order)) == 0
        bounds, want_order = _get_4bit_quantize_bounds(mode, torch.device("cpu"))
        assert torch.equal(torch.frombuffer(mid, dtype=torch.float32), bounds)
        assert list(order) == want_order.tolist()


SHAPES = [(1, 1), (1, 3), (1, 63), (1, 64), (1, 65), (3, 33), (7, 9), (37, 129), (64, 64), (129, 127), (300, 256)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_weights_every_shape(isa, dtype, monkeypatch):
    for shape in SHAPES:
        W = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.02).to(dtype)
        for mode in MODES:
            assert_4bit(W, mode, monkeypatch)
        assert_int8(W, monkeypatch)


@pytest.mark.parametrize("blocksize", [32, 128, 256, 1024, 4096])
def test_other_block_sizes(isa, blocksize, monkeypatch):
    W = torch.randn(33, 301, generator=torch.Generator().manual_seed(blocksize)).to(torch.bfloat16)
    for mode in MODES:
        assert_4bit(W, mode, monkeypatch, blocksize=blocksize)


def test_large_weight_across_pieces(isa, monkeypatch):
    """More elements than one piece of the thread split, with a partial last block and an odd count."""
    W = (torch.randn(1031, 1033, generator=torch.Generator().manual_seed(7)) * 0.1).to(torch.bfloat16)
    monkeypatch.setattr(bnb_native, "PIECE", 1 << 14)
    for mode in MODES:
        assert_4bit(W, mode, monkeypatch)
    assert_int8(W, monkeypatch)


@pytest.mark.parametrize("mode", MODES)
def test_every_midpoint_and_its_neighbours(isa, mode, monkeypatch):
    bounds, _ = bnb_cpu._bounds(mode)
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    vals = torch.cat([bounds, torch.nextafter(bounds, up), torch.nextafter(bounds, down),
                      torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 0.5, -0.5])])
    vals = torch.cat([vals, torch.zeros(-vals.numel() % 63)]).reshape(-1, 63)
    W = torch.cat([torch.ones(vals.shape[0], 1), vals], dim=1)  # absmax 1: the scaled values are the values
    assert_4bit(W, mode, monkeypatch)
    assert_4bit(-W.flip(1), mode, monkeypatch)
    assert_4bit(W.reshape(-1)[:-3].reshape(1, -1), mode, monkeypatch)  # the same in a partial last block


def test_zero_blocks_rows_and_subnormal_absmax(isa, monkeypatch):
    W = torch.randn(16, 101, generator=torch.Generator().manual_seed(2)).to(torch.float32)
    W[3] = 0
    W[7, :64] = 0
    W[-1, -16:] = 0
    W[9] *= 1e-39  # a subnormal float32 absmax: clamped to 1e-38 for the scale
    W[10, :64] = torch.tensor([1e-45, -2e-45] * 32)
    assert_int8(W, monkeypatch)
    for dtype in DTYPES:
        for mode in MODES:
            assert_4bit(W.to(dtype), mode, monkeypatch)
            assert_4bit(torch.zeros(3, 37, dtype=dtype), mode, monkeypatch)
    assert_int8(torch.zeros(3, 37, dtype=torch.bfloat16), monkeypatch)


def every_finite_value(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Each finite bit pattern of a 16-bit float type, shuffled (mixed magnitudes in every block), in rows of 64."""
    v = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    v = v[torch.isfinite(v)]
    v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(seed))]
    return v[: v.numel() // 64 * 64].reshape(-1, 64)


def test_every_float16_value(isa, monkeypatch):
    """Each float16 bit pattern as a source (the kernel widens it itself), mixed magnitudes in every block."""
    W = every_finite_value(torch.float16, 3)
    for mode in MODES:
        assert_4bit(W, mode, monkeypatch)
    assert_int8(W[:, :48], monkeypatch)


def test_every_bfloat16_value(isa, monkeypatch):
    W = every_finite_value(torch.bfloat16, 4)
    for mode in MODES:
        assert_4bit(W, mode, monkeypatch)
    small = W[(W.float().abs() < 6e4).all(dim=1)]  # rows that do not overflow float16
    assert_int8(small, monkeypatch)


def test_int8_float16_rounding_ties_and_edges(isa, monkeypatch):
    """float32 values on, beside and halfway between float16 values, subnormal to the overflow edge."""
    h = torch.arange(0, 0x7BFF, 7, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    nxt = torch.arange(1, 0x7C00, 7, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    half = (h + nxt) / 2  # exact ties: round to even
    up, down = torch.tensor(1e9), torch.tensor(-1e9)
    vals = torch.cat([h, half, torch.nextafter(half, up), torch.nextafter(half, down),
                      torch.tensor([65504.0, 65519.99, 6e-8, 2.9e-8, 3e-8, 1e-30])])
    vals = torch.cat([vals, -vals])
    vals = torch.cat([vals, torch.zeros(-vals.numel() % 97)]).reshape(-1, 97)
    assert_int8(vals, monkeypatch)
    assert_int8(vals * 1e-3, monkeypatch)
    assert_int8(vals.to(torch.bfloat16), monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inf_and_nan_blocks_and_rows(isa, dtype, monkeypatch):
    W = inf_nan_weight(dtype)
    for mode in MODES:
        assert_4bit(W, mode, monkeypatch)
    assert_int8(W, monkeypatch)
    if dtype != torch.float16:
        assert_int8(torch.full((2, 64), 1e30, dtype=dtype), monkeypatch)  # overflows float16


@pytest.mark.parametrize("mode", MODES)
def test_double_quant(isa, mode, monkeypatch):
    W = (torch.randn(67, 300, generator=torch.Generator().manual_seed(9)) * 0.02).to(torch.bfloat16)
    packed, state = F.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type=mode)
    assert bnb.nested_offset(W) == pytest.approx(float(state.offset), rel=0, abs=0)
    got = bnb.quantize_weight("m", W, mode, double_quant=True, nested_offset=float(state.offset))
    assert torch.equal(got["m.weight"], packed)
    assert torch.equal(got["m.weight.absmax"], state.absmax)
    assert torch.equal(bits(got["m.weight.nested_absmax"]), bits(state.state2.absmax))
    with monkeypatch.context() as m:
        m.setenv("ADAPTERHUB_NO_NATIVE", "1")
        slow = bnb.quantize_weight("m", W, mode, double_quant=True, nested_offset=float(state.offset))
    assert all(torch.equal(bits(slow[k]), bits(v)) for k, v in got.items())


def test_block_absmax_is_the_stored_absmax(isa):
    W = torch.randn(7, 333, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    W[2] = 0
    for blocksize in (64, 256):
        want = F.quantize_4bit(W, blocksize=blocksize, quant_type="nf4")[1].absmax
        assert torch.equal(bits(bnb_cpu.block_absmax(W, blocksize)), bits(want))


def test_bad_arguments_are_refused():
    lib = bnb_native.library()
    buf = bytearray(64)
    ptr = bnb_native.ctypes.addressof((bnb_native.ctypes.c_char * 64).from_buffer(buf))
    assert lib.ah_bnb_quantize_4bit(ptr, 3, 8, 64, 0, ptr, ptr) == -1  # unknown source kind
    assert lib.ah_bnb_quantize_4bit(ptr, 0, 8, 63, 0, ptr, ptr) == -1  # odd block size
    assert lib.ah_bnb_quantize_4bit(ptr, 0, 8, 8192, 0, ptr, ptr) == -1  # larger than bitsandbytes allows
    assert lib.ah_bnb_quantize_4bit(ptr, 0, 8, 64, 2, ptr, ptr) == -1  # unknown mode
    assert lib.ah_bnb_int8_rowwise(ptr, 0, 1, 0, ptr, ptr) == -1
    assert lib.ah_bnb_block_absmax(ptr, 0, 8, 0, ptr) == -1


# --------------------------------------------------------------------------- quantize() without torch


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    from tests.factories import tiny_llama_base

    root = tmp_path_factory.mktemp("bases")
    return {
        dtype: tiny_llama_base(root / dtype, hidden_size=40, layers=2, vocab=100, intermediate_size=60,
                               sharded=True, dtype=dtype)
        for dtype in ("bfloat16", "float16", "float32")
    }


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_quantize_without_torch_writes_the_torch_paths_bytes(tiny_bases, tmp_path, monkeypatch, mode, dtype):
    from adapterhub.converters import quantize_cpu
    from adapterhub.converters.formats.bnb_layout import QuantSettings
    from adapterhub.converters.formats.safetensors_io import file_map
    from adapterhub.converters.quantize import quantize

    base = file_map(tiny_bases[dtype])
    assert quantize_cpu.usable(QuantSettings(mode), {"model_type": "llama"}, "cpu")
    fast = quantize(base, tmp_path / "fast", to=mode, device="cpu", max_shard_bytes=20_000, hash_outputs=True)
    with monkeypatch.context() as m:
        m.setenv("ADAPTERHUB_NO_NATIVE", "1")
        slow = quantize(base, tmp_path / "slow", to=mode, device="cpu", max_shard_bytes=20_000, hash_outputs=True)
    assert len(fast.files) > 3 and fast.files == slow.files and fast.file_sha256 == slow.file_sha256
    for rel in fast.files:
        assert (tmp_path / "fast" / rel).read_bytes() == (tmp_path / "slow" / rel).read_bytes(), rel
    assert fast.modules_quantized == slow.modules_quantized and fast.bytes_out == slow.bytes_out


def _torch_ready_after(weights):
    """A torch import that reports itself done only after ``weights`` weights (None: only when waited for).

    The import thread is the real one; only the moment the pre-pass sees it
    finish is fixed, so that each of its branches runs whatever the timing.
    """
    from adapterhub.converters import quantize_cpu

    class Late(quantize_cpu._TorchImport):
        calls = 0

        def ready(self):  # asked once a weight
            self.calls += 1
            if weights is None or self.calls <= weights:
                return False
            self.join()
            return super().ready()

    return Late


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("ready_after, hold", [(None, None), (0, None), (3, None), (None, 6000)],
                         ids=["all-held", "none-held", "three-held", "held-up-to-a-cap"])
def test_double_quant_without_the_torch_path_writes_its_bytes(
    tiny_bases, tmp_path, monkeypatch, mode, dtype, ready_after, hold
):
    """``--double-quant`` on the CPU: the kernel pre-pass while torch loads, then the torch path's exact files."""
    from adapterhub.converters import quantize as quantize_module
    from adapterhub.converters import quantize_cpu
    from adapterhub.converters.formats.bnb_layout import QuantSettings
    from adapterhub.converters.formats.safetensors_io import file_map

    base = file_map(tiny_bases[dtype])
    assert quantize_cpu.usable(QuantSettings(mode, double_quant=True), {"model_type": "llama"}, "cpu")
    with monkeypatch.context() as m:
        m.setenv("ADAPTERHUB_NO_NATIVE", "1")
        slow = quantize_module.quantize(base, tmp_path / "slow", to=mode, double_quant=True, device="cpu",
                                        max_shard_bytes=20_000, hash_outputs=True)
    prepasses = []

    def torch_path(*args, **kwargs):
        raise AssertionError("the torch path ran")

    def prepass(*args, **kwargs):
        done = real_prepass(*args, **kwargs)
        prepasses.append((done, len(done.held)))
        return done

    real_prepass = quantize_cpu.double_quant_prepass
    monkeypatch.setattr(quantize_module, "_double_quant_offsets", torch_path)
    monkeypatch.setattr(quantize_module, "_quantize_tensors", torch_path)
    monkeypatch.setattr(quantize_cpu, "double_quant_prepass", prepass)
    monkeypatch.setattr(quantize_cpu, "_TorchImport", _torch_ready_after(ready_after))
    if hold is not None:
        monkeypatch.setattr(quantize_cpu, "HOLD_BYTES", hold)
    fast = quantize_module.quantize(base, tmp_path / "fast", to=mode, double_quant=True, device="cpu",
                                    max_shard_bytes=20_000, hash_outputs=True)
    assert len(fast.files) > 3 and fast.files == slow.files and fast.file_sha256 == slow.file_sha256
    for rel in fast.files:
        assert (tmp_path / "fast" / rel).read_bytes() == (tmp_path / "slow" / rel).read_bytes(), rel
    assert fast.modules_quantized == slow.modules_quantized and fast.bytes_out == slow.bytes_out
    ((done, held),) = prepasses
    assert len(done.offsets) == len(fast.modules_quantized) == 14 and not done.held  # every kept output was written
    assert held == {None: 14, 0: 0, 3: 3}[ready_after] if hold is None else 0 < held < 14


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_quantize_on_the_cpu_does_not_import_torch(tiny_bases, tmp_path, device):
    from adapterhub.converters import quantize_cpu

    if device == "auto" and not quantize_cpu.no_gpu():
        pytest.skip("a GPU device node is there: auto asks torch whether CUDA is available")
    import json
    import subprocess
    import sys

    from adapterhub.converters.formats.bnb_layout import transformers_hints

    # transformers' hints about the model class are cached on first use; that first use imports it
    transformers_hints(json.loads((tiny_bases["bfloat16"] / "config.json").read_text()))
    code = (
        "import sys\n"
        "from adapterhub.converters.formats.safetensors_io import file_map\n"
        "from adapterhub.converters.quantize import quantize\n"
        f"for mode in ('nf4', 'fp4', 'int8'):\n"
        f"    quantize(file_map({str(tiny_bases['bfloat16'])!r}), {str(tmp_path)!r} + '/' + mode, to=mode, device={device!r})\n"
        "print(sorted(m for m in ('torch', 'bitsandbytes', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("value, message", [(float("nan"), "non-finite"), (1e30, "overflows float16")])
def test_int8_refusals_without_torch(tiny_bases, tmp_path, value, message):
    from safetensors.torch import load_file, save_file

    from adapterhub.converters.formats.safetensors_io import file_map
    from adapterhub.converters.quantize import quantize
    from adapterhub.errors import InvalidArtifactError

    base = tiny_bases["bfloat16"]
    bad = tmp_path / "bad"
    bad.mkdir()
    sd = {}
    for p in sorted(base.glob("*.safetensors")):
        sd.update(load_file(str(p)))
    sd["model.layers.1.mlp.up_proj.weight"][3, 7] = value
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_text((base / "config.json").read_text())
    with pytest.raises(InvalidArtifactError, match=message):
        quantize(file_map(bad), tmp_path / "o", to="int8", device="cpu")
    assert not (tmp_path / "o").exists()


def test_quantize_without_torch_reads_where_it_cannot_map(tiny_bases, tmp_path, monkeypatch):
    """The fallback for files that cannot be memory-mapped: pread into reused buffers, the same bytes."""
    from adapterhub.converters import quantize_cpu
    from adapterhub.converters.formats.safetensors_io import file_map
    from adapterhub.converters.quantize import quantize

    base = file_map(tiny_bases["bfloat16"])
    mapped = quantize(base, tmp_path / "mapped", to="nf4", device="cpu", hash_outputs=True)
    monkeypatch.setattr(quantize_cpu, "_map", quantize_cpu._read)
    read = quantize(base, tmp_path / "read", to="nf4", device="cpu", hash_outputs=True)
    assert mapped.file_sha256 == read.file_sha256


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_double_quant_refuses_non_finite_weights_in_its_pre_pass(tiny_bases, tmp_path, monkeypatch, mode):
    from safetensors.torch import load_file, save_file

    from adapterhub.converters import quantize as quantize_module
    from adapterhub.converters.formats.safetensors_io import file_map
    from adapterhub.errors import InvalidArtifactError

    def torch_path(*args, **kwargs):
        raise AssertionError("the torch path ran")

    monkeypatch.setattr(quantize_module, "_double_quant_offsets", torch_path)
    base = tiny_bases["bfloat16"]
    bad = tmp_path / "bad"
    bad.mkdir()
    sd = {}
    for p in sorted(base.glob("*.safetensors")):
        sd.update(load_file(str(p)))
    sd["model.layers.1.self_attn.v_proj.weight"][5, 1] = float("inf")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_text((base / "config.json").read_text())
    with pytest.raises(InvalidArtifactError, match="v_proj.weight has non-finite"):
        quantize_module.quantize(file_map(bad), tmp_path / "o", to=mode, double_quant=True, device="cpu")
    assert not (tmp_path / "o").exists()


def test_run_parallel_called_from_its_own_pool_does_not_wait_for_a_free_thread(monkeypatch):
    """A pooled helper that has not started when the caller runs out of work is cancelled: with a pool of
    one thread, a run_parallel inside a pooled task would otherwise wait for that very thread."""
    import threading

    monkeypatch.setattr(bnb_native, "_pool", None)
    monkeypatch.setattr(bnb_native, "_pool_threads", 0)
    inner_sums = []

    def outer(i: int) -> int:
        inner_sums.append(bnb_native.run_parallel(lambda j: j + 1, range(3), threads=2))
        return i

    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(bnb_native.run_parallel(outer, range(4), threads=2)), daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "run_parallel waited for a pooled thread that was busy running its caller"
    assert result == [6] and inner_sums == [6, 6, 6, 6]
