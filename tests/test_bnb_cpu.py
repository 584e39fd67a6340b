"""The vectorized CPU quantizers (``converters.formats.bnb_cpu``) against bitsandbytes itself, byte for byte.

bitsandbytes 0.50 is the reference: every packed byte, absmax and SCB must be
bitwise equal to what ``bitsandbytes.functional`` returns for the same weight,
over shapes with partial blocks and odd element counts, in every input dtype,
with zeros, subnormals, huge values, values exactly on and beside the code
midpoints, every cell of the lookup table, every bfloat16 bit pattern, and
inf and NaN; and the nested 8-bit quantization of double quantization (codes and absmax).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

from adapterhub.converters.formats import bnb_cpu  # noqa: E402

MODES = ["nf4", "fp4"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def bits(t):
    """A tensor's bytes, so that NaNs compare too."""
    return t.contiguous().view(-1).view(torch.uint8)


def assert_4bit_same(W, mode):
    packed, state = F.quantize_4bit(W, blocksize=64, compress_statistics=False, quant_type=mode)
    got, absmax, code = bnb_cpu.quantize_4bit(W, 64, mode)
    assert got.shape == packed.shape and got.dtype == packed.dtype
    assert torch.equal(got, packed), f"{mode}: {int((got != packed).sum())} packed bytes differ"
    assert torch.equal(bits(absmax), bits(state.absmax))
    assert torch.equal(code, state.code)


def assert_int8_same(W):
    CB, SCB, _ = F.int8_vectorwise_quant(W.to(torch.float16))
    cb, scb = bnb_cpu.int8_rowwise(W)
    assert torch.equal(cb, CB), f"{int((cb != CB).sum())} int8 values differ"
    assert torch.equal(bits(scb), bits(SCB))


def test_tables_are_bitsandbytes():
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    for mode in MODES:
        assert torch.equal(bnb_cpu.code_table(mode), F.get_4bit_type(mode, device="cpu"))
        bounds, order = _get_4bit_quantize_bounds(mode, torch.device("cpu"))
        mine_bounds, mine_order = bnb_cpu._bounds(mode)
        assert torch.equal(mine_bounds, bounds) and torch.equal(mine_order, order)


SHAPES = [(1, 1), (1, 2), (3, 1), (1, 63), (1, 64), (1, 65), (2, 64), (7, 9), (37, 129), (64, 64), (300, 256), (129, 127)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_random_weights(shape, dtype):
    W = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.02).to(dtype)
    for mode in MODES:
        assert_4bit_same(W, mode)
    assert_int8_same(W)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_chunks_on_several_threads(monkeypatch, dtype):
    """Chunks of 896 elements (7 pairs of blocks), spread over the worker threads, and a partial last block."""
    monkeypatch.setattr(bnb_cpu, "CHUNK", 1000)
    monkeypatch.setattr(bnb_cpu, "INT8_CHUNK", 1000)
    monkeypatch.setattr(bnb_cpu, "workers", lambda: 3)
    W = (torch.randn(97, 301, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    for mode in MODES:
        assert_4bit_same(W, mode)
    assert_int8_same(W)
    assert torch.equal(bnb_cpu.block_absmax(W, 64), F.quantize_4bit(W, blocksize=64, quant_type="nf4")[1].absmax)


def test_zero_blocks_rows_and_partial_block():
    W = torch.randn(16, 101, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    W[3] = 0  # zero rows (int8: 0 * inf) and whole zero blocks (absmax 0, clamped to 1e-38 for the scale)
    W[7, :50] = 0
    W[-1, -16:] = 0  # 1616 = 25 * 64 + 16: the partial last block is zero
    assert_int8_same(W)
    for mode in MODES:
        assert_4bit_same(W, mode)
        assert_4bit_same(torch.zeros(3, 37, dtype=torch.bfloat16), mode)  # a zero partial block: absmax stored as 1e-38
        assert_4bit_same(torch.zeros(1, 1), mode)
    assert_int8_same(torch.zeros(3, 37, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_subnormal_and_huge_values(dtype):
    g = torch.Generator().manual_seed(3)
    tiny = torch.finfo(dtype).smallest_normal
    for scale in (tiny, tiny / 8, tiny * 3, 1e-38, 1e-40, torch.finfo(dtype).max / 4):
        W = (torch.rand(9, 70, generator=g) * 2 - 1).mul(float(scale)).to(dtype)
        W[0, 0] = float(scale) if scale < float(torch.finfo(dtype).max) else W[0, 0]
        for mode in MODES:
            assert_4bit_same(W, mode)
        if dtype != torch.float32 or scale < 6e4:
            assert_int8_same(W)


@pytest.mark.parametrize("mode", MODES)
def test_values_on_and_beside_every_midpoint(mode):
    """With absmax 1 the scaled value is the value itself: midpoints exactly, and one float either side."""
    bounds, _ = bnb_cpu._bounds(mode)
    vals = torch.cat([bounds, torch.nextafter(bounds, torch.tensor(2.0)), torch.nextafter(bounds, torch.tensor(-2.0))])
    vals = torch.cat([vals, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45])])
    blocks = vals.reshape(-1, 3)
    W = torch.cat([torch.ones(blocks.shape[0], 1), blocks, torch.zeros(blocks.shape[0], 60)], dim=1)  # 64 a block
    assert_4bit_same(W, mode)
    assert_4bit_same(W.to(torch.float64).to(torch.float32).flip(0), mode)


@pytest.mark.parametrize("mode", MODES)
def test_every_cell_of_the_lookup_table(mode):
    """The lowest and highest float32 of every cell in [-1, 1], each in a block whose absmax is 1."""
    cells = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int64) << 16
    edges = torch.stack([cells, cells + 0xFFFF], 1).reshape(-1).to(torch.int32).view(torch.float32)
    edges = edges[torch.isfinite(edges) & (edges.abs() <= 1)]
    edges = torch.cat([edges, torch.zeros(-edges.numel() % 63)]).reshape(-1, 63)
    W = torch.cat([torch.ones(edges.shape[0], 1), edges], dim=1)
    assert_4bit_same(W, mode)


def test_every_bfloat16_value():
    finite = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = finite[torch.isfinite(finite)]
    W = finite[: finite.numel() // 64 * 64].reshape(-1, 64)
    g = torch.Generator().manual_seed(4)
    W = W.flatten()[torch.randperm(W.numel(), generator=g)].reshape(-1, 64)  # mixed magnitudes in each block
    for mode in MODES:
        assert_4bit_same(W, mode)
    assert_int8_same(W[:, :40])


def inf_nan_weight(dtype: torch.dtype) -> torch.Tensor:
    """6 x 130 values with inf, -inf and NaN in three rows, one NaN in the partial last block."""
    W = torch.randn(6, 130, generator=torch.Generator().manual_seed(5)).to(dtype)
    W[0, 3] = float("inf")
    W[1, 70] = float("-inf")
    W[2, 5] = float("nan")
    W[5, -1] = float("nan")  # in the partial last block
    return W


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inf_and_nan_give_the_same_bytes(dtype):
    """bitsandbytes' own result for blocks holding inf or NaN (adapterhub refuses such weights before writing)."""
    W = inf_nan_weight(dtype)
    for mode in MODES:
        assert_4bit_same(W, mode)
    assert_int8_same(W)
    if dtype != torch.float16:
        big = torch.full((2, 64), 1e30, dtype=dtype)  # overflows float16: inf in every row
        assert_int8_same(big)


def test_quantize_weight_refuses_non_finite_and_float16_overflow():
    from adapterhub.converters.formats import bnb
    from adapterhub.errors import InvalidArtifactError

    W = torch.randn(4, 64).to(torch.bfloat16)
    W[1, 1] = float("nan")
    for mode in ("nf4", "fp4", "int8"):
        with pytest.raises(InvalidArtifactError, match="non-finite"):
            bnb.quantize_weight("m", W, mode)
    with pytest.raises(InvalidArtifactError, match="overflows float16"):
        bnb.quantize_weight("m", torch.full((2, 64), 1e30, dtype=torch.bfloat16), "int8")


def test_dynamic_code_is_bitsandbytes():
    assert torch.equal(bnb_cpu.dynamic_code(), F.create_dynamic_map())


def assert_blockwise_same(A):
    q, state = F.quantize_blockwise(A, blocksize=256)
    got, absmax = bnb_cpu.quantize_blockwise_8bit(A, 256)
    assert got.dtype == q.dtype and got.shape == q.shape
    assert torch.equal(got, q), f"{int((got != q).sum())} of {q.numel()} 8-bit codes differ"
    assert torch.equal(bits(absmax), bits(state.absmax))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 255, 256, 257, 1001, 4099, 180224, 180227])
def test_nested_8bit_of_absmax_values(n):
    """What double quantization feeds it: a weight's block absmax less their mean, partial blocks and odd tails too."""
    g = torch.Generator().manual_seed(n)
    absmax = torch.rand(n, generator=g) * 0.05 + torch.rand(1, generator=g) * 0.01
    assert_blockwise_same(absmax - absmax.mean())
    assert_blockwise_same(torch.randn(n, generator=g) * 10 ** float(torch.randint(-30, 30, (1,), generator=g)))


def test_nested_8bit_on_and_beside_every_code_value_and_midpoint():
    code = bnb_cpu.dynamic_code()
    mids = (code[:-1] + code[1:]) / 2
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    vals = torch.cat([code, mids, torch.nextafter(mids, up), torch.nextafter(mids, down), torch.nextafter(code, up),
                      torch.nextafter(code, down)])
    grid = torch.tensor(-1.0) + 2.0 * torch.arange(1 << 16, dtype=torch.float32) / torch.tensor(65535.0)
    vals = torch.cat([vals, grid, torch.nextafter(grid, up), torch.nextafter(grid, down)]).clamp(-1, 1)
    A = torch.cat([torch.ones(255), vals]).reshape(-1)
    blocks = torch.cat([A, torch.zeros(-A.numel() % 255)]).reshape(-1, 255)
    A = torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1)  # absmax 1 in every block: the values as they are
    assert_blockwise_same(A.reshape(-1))
    assert_blockwise_same((A * 3.7).reshape(-1)[:-5])


def test_nested_8bit_zero_blocks_and_tiny_values():
    A = torch.zeros(1000)
    A[600] = 3.0
    A[300] = 1e-40
    assert_blockwise_same(A)
    assert_blockwise_same(torch.zeros(300))
    assert_blockwise_same(torch.full((513,), -1e-38))


@pytest.mark.parametrize("mode", MODES)
def test_double_quant_on_the_cpu_is_bitsandbytes(mode):
    """quantize_weight's nested tensors against bitsandbytes' quantize_4bit(compress_statistics=True)."""
    from adapterhub.converters.formats import bnb

    W = (torch.randn(67, 300, generator=torch.Generator().manual_seed(9)) * 0.02).to(torch.bfloat16)
    packed, state = F.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type=mode)
    got = bnb.quantize_weight("m", W, mode, double_quant=True, nested_offset=float(state.offset))
    assert torch.equal(got["m.weight"], packed)
    assert torch.equal(got["m.weight.absmax"], state.absmax)
    assert torch.equal(bits(got["m.weight.nested_absmax"]), bits(state.state2.absmax))
    assert torch.equal(got["m.weight.nested_quant_map"], state.state2.code)


def test_the_cpu_quantizers_do_not_import_bitsandbytes():
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from adapterhub.converters.formats import bnb\n"
        "W = torch.randn(64, 300).to(torch.bfloat16)\n"
        "for mode in ('nf4', 'fp4'):\n"
        "    bnb.quantize_weight('m', W, mode, double_quant=True)\n"
        "bnb.quantize_weight('m', W, 'int8')\n"
        "print('bitsandbytes' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_double_quant_prepass_refuses_non_finite(value):
    """Quantizer.offset (the pre-pass of double quantization) tells a non-finite weight from its absmax mean."""
    from adapterhub.converters.formats import bnb
    from adapterhub.errors import InvalidArtifactError

    qz = bnb.Quantizer(bnb.QuantSettings("nf4", double_quant=True), {"model_type": "llama"})
    name = "model.layers.0.mlp.up_proj.weight"
    W = (torch.randn(8, 200, generator=torch.Generator().manual_seed(12)) * 0.02).to(torch.bfloat16)
    want = float(F.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")[1].offset)
    assert qz.offset(name, W) == want
    W[5, 77] = value
    with pytest.raises(InvalidArtifactError, match="non-finite"):
        qz.offset(name, W)
    huge = torch.full((4, 64), 3e38)  # finite, but the float32 sum of the block maxima overflows: not refused
    assert qz.offset(name, huge) == float("inf")
