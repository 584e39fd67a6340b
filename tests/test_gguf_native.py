"""The C ggml kernel (converters/_c/ggml_kernels.c) against the references, byte for byte.

The references: the ``gguf`` package's numpy quantizers (F32, F16, BF16, Q8_0),
numpy's float16 conversion, and the torch path of gguf_quant (``ADAPTERHUB_NO_NATIVE=1``).
Each comparison runs with the kernel's AVX2 code and with its portable C code
(``ah_ggml_simd``), so a machine without AVX2, or another architecture, gets
the bytes tested here. Also: permuted and strided rows, odd shapes, the
slabs of a file, and that ``convert --to gguf`` of a checkpoint never imports torch.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import quantize  # noqa: E402

from adapterhub.converters.formats import gguf_arch as ga  # noqa: E402
from adapterhub.converters.formats import native  # noqa: E402
from adapterhub.converters.formats.gguf_quant import Rows, encode, encode_rows_into, encoded_nbytes, kernel  # noqa: E402

pytestmark = pytest.mark.skipif(not native.built("ggml"), reason="the ggml kernel is not built (no C compiler)")

KINDS = ["f32", "f16", "bf16"]
OUT = [T.F32, T.F16, T.BF16, T.Q8_0]


@pytest.fixture(params=["simd", "portable"])
def code(request, monkeypatch):
    """Run the test with the kernel's SIMD code (where the CPU has it) and with its portable code."""
    monkeypatch.delenv("ADAPTERHUB_NO_NATIVE", raising=False)
    lib = kernel()
    if request.param == "simd" and not lib.ah_ggml_simd(1):
        pytest.skip("this CPU has no AVX2 + F16C")
    if request.param == "portable":
        lib.ah_ggml_simd(0)
    yield request.param
    lib.ah_ggml_simd(1)


def as_source(x: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(the source array the kernel reads, its values as float32): bf16 as uint16 bits, rounded to nearest even."""
    x = np.asarray(x, dtype=np.float32)
    if kind == "f32":
        return x, x
    if kind == "f16":  # values beyond float16's range clipped: no infinities in the source
        h = np.clip(x, -65504, 65504).astype(np.float16)
        return h, h.astype(np.float32)
    b = quantize(x, T.BF16).view(np.uint16).reshape(x.shape)
    return b, (b.astype(np.uint32) << 16).view(np.float32)


def native_bytes(src, qtype) -> bytes:
    rows = Rows.of(src)
    assert rows is not None
    out = np.empty(encoded_nbytes(rows.rows * rows.cols, qtype), dtype=np.uint8)
    encode_rows_into(rows, 0, rows.rows, qtype, out)
    return out.tobytes()


def awkward(rows: int = 96, cols: int = 256, seed: int = 0) -> np.ndarray:
    """Zero blocks, ties after scaling, tiny and large magnitudes, float32 subnormals beside a normal maximum."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 3).astype(np.float32)
    x[0, :32] = 0
    x[1, :32] = np.float32(1e-30)
    x[2] = np.arange(cols, dtype=np.float32) * np.float32(0.5)
    x[3, :32] = np.linspace(-127, 127, 32, dtype=np.float32)
    x[4] = np.float32(60000.0)
    x[5, :32] = np.float32(1e-40)  # float32 subnormals
    x[5, 0] = np.float32(1e-30)
    x[6, :32] = np.float32(-0.0)
    x[7, :32] = rng.standard_normal(32).astype(np.float32) * np.float32(1e30)  # d overflows float16
    x[8, 32:64] = np.float32(65504.0 * 127)
    return x


def q8_0_edges() -> np.ndarray:
    """Blocks of max 127 (d = 1) holding every float within 3 ulps of k + 1/2, both signs, and 0.49999997."""
    edges = []
    for k in range(127):
        mid = np.float32(k + 0.5)
        lo = hi = mid
        edges.append(mid)
        for _ in range(3):
            lo, hi = np.nextafter(lo, np.float32(0)), np.nextafter(hi, np.float32(200))
            edges += [lo, hi]
    edges.append(np.float32(0.49999997))
    vals = np.array(edges + [-e for e in edges], dtype=np.float32)
    vals = np.concatenate([vals, np.zeros(-len(vals) % 31, np.float32)]).reshape(-1, 31)
    return np.concatenate([np.full((len(vals), 1), 127, np.float32), vals], axis=1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", OUT)
@pytest.mark.parametrize("values", ["random", "awkward", "edges"])
def test_kernel_equals_gguf_reference(code, kind, qtype, values):
    x = {"random": lambda: np.random.default_rng(3).standard_normal((67, 160)).astype(np.float32),
         "awkward": awkward, "edges": q8_0_edges}[values]()
    src, f = as_source(x, kind)
    with np.errstate(over="ignore"):
        ref = quantize(f, qtype)
    assert native_bytes(src, qtype) == ref.tobytes()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", OUT)
def test_kernel_equals_the_torch_path(code, kind, qtype, monkeypatch):
    torch = pytest.importorskip("torch")
    x = awkward(33, 96, seed=1)
    x[10, :5] = [np.inf, -np.inf, 70000.0, -65520.0, 65519.0]  # f16 overflow: infinities
    if qtype == T.Q8_0:
        x[10, :5] = 1.0  # a block holding inf has no defined Q8_0 in the reference
    src, f = as_source(x, kind)
    t = torch.from_numpy(f).to({"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[kind])
    ours = encode(t, qtype).tobytes()
    assert native_bytes(src, qtype) == ours
    monkeypatch.setenv("ADAPTERHUB_NO_NATIVE", "1")
    assert kernel() is None
    assert encode(t, qtype).tobytes() == ours


def all_bf16() -> np.ndarray:
    b = np.arange(1 << 16, dtype=np.uint32)
    b = b[~np.isnan((b << 16).view(np.float32))].astype(np.uint16)  # no NaNs
    return np.concatenate([b, np.zeros(-len(b) % 64, np.uint16)])


def test_every_bf16_value_to_f16_and_f32(code):
    b = all_bf16().reshape(-1, 64)
    f = (b.astype(np.uint32) << 16).view(np.float32)
    with np.errstate(over="ignore"):
        assert native_bytes(b, T.F16) == f.astype(np.float16).tobytes()  # subnormals, overflow to inf
    assert native_bytes(b, T.F32) == f.tobytes()


def test_every_f16_value_to_f32_and_bf16(code):
    torch = pytest.importorskip("torch")
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    h = h[~np.isnan(h)]
    h = np.concatenate([h, np.zeros(-len(h) % 16, np.float16)]).reshape(-1, 16)
    assert native_bytes(h, T.F32) == h.astype(np.float32).tobytes()
    assert native_bytes(h, T.BF16) == torch.from_numpy(h).to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def test_f32_to_f16_rounds_to_nearest_even_at_every_boundary(code):
    # every midpoint between neighbouring float16 values, and the float32s just beside it
    h = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)  # 0 .. 65504
    mids = (h[:-1] + h[1:]) / np.float32(2)  # exact in float32
    top = np.float32(65520.0)  # the midpoint above 65504: rounds to infinity
    x = np.concatenate([mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf)),
                        [top, np.nextafter(top, np.float32(0)), np.float32(1e-45), np.float32(2.9802322e-08)]])
    x = np.concatenate([x, -x]).astype(np.float32)
    x = np.concatenate([x, np.zeros(-len(x) % 40, np.float32)]).reshape(-1, 40)
    with np.errstate(over="ignore"):
        assert native_bytes(x, T.F16) == x.astype(np.float16).tobytes()


def test_random_f32_bit_patterns(code):
    u = np.random.default_rng(7).integers(0, 1 << 32, size=(4000, 24), dtype=np.uint64).astype(np.uint32)
    x = u.view(np.float32)
    x[np.isnan(x)] = 0
    with np.errstate(over="ignore"):
        assert native_bytes(x, T.F16) == x.astype(np.float16).tobytes()
    assert native_bytes(x, T.BF16) == quantize(x, T.BF16).tobytes()


def test_nan_stays_nan(code):
    x = np.full((1, 8), np.nan, np.float32)
    assert np.isnan(np.frombuffer(native_bytes(x, T.F16), np.float16)).all()
    assert np.frombuffer(native_bytes(x, T.BF16), np.uint16).tolist() == [0x7FC0] * 8  # as torch writes it


def test_simd_and_portable_code_agree_where_the_reference_is_undefined():
    """Blocks whose scale's inverse overflows, or holding infinities or NaN: no reference, but one answer."""
    lib = kernel()
    if not lib.ah_ggml_simd(1):
        pytest.skip("this CPU has no AVX2 + F16C")
    x = np.zeros((4, 64), np.float32)
    x[0, :32] = np.float32(1e-40)
    x[1, 3] = np.inf
    x[2, 5] = np.nan
    x[3] = np.random.default_rng(0).standard_normal(64).astype(np.float32) * np.float32(1e-39)
    try:
        outs = {mode: [native_bytes(x, q) for q in OUT] for mode in (1, 0) if lib.ah_ggml_simd(mode) == mode}
    finally:
        lib.ah_ggml_simd(1)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", OUT)
def test_permuted_and_strided_rows(code, kind, qtype):
    x = awkward(64, 96, seed=2)
    src, f = as_source(x, kind)
    for heads in (1, 4, 8):
        view = ga.permuted_view(src, heads)  # 4-D, rows in llama.cpp's order
        assert native_bytes(view, qtype) == quantize(np.ascontiguousarray(ga.permute_rows(f, heads)), qtype).tobytes()
    for view, ref in ((src[::3], f[::3]), (src[::-1], f[::-1]), (src[5:6], f[5:6]), (src[7], f[7])):
        assert native_bytes(view, qtype) == quantize(np.ascontiguousarray(ref), qtype).tobytes()


@pytest.mark.parametrize("kind", KINDS)
def test_odd_shapes(code, kind):
    rng = np.random.default_rng(4)
    for shape in ((1, 32), (33, 32), (7, 288), (5, 13), (1, 1), (9, 1), (4100,), (0, 64)):
        x = rng.standard_normal(shape).astype(np.float32)
        src, f = as_source(x, kind)
        for qtype in OUT:
            if qtype == T.Q8_0 and shape[-1] % 32:
                continue
            assert native_bytes(src, qtype) == quantize(f, qtype).tobytes(), (shape, qtype)


def test_torch_sources(code):
    torch = pytest.importorskip("torch")
    x = awkward(48, 64, seed=5)
    for kind, dtype in (("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)):
        t = torch.from_numpy(as_source(x, kind)[1]).to(dtype)  # float16 within its range
        f = t.float().numpy()
        for qtype in OUT:
            assert native_bytes(t, qtype) == quantize(f, qtype).tobytes()
            assert native_bytes(ga.permuted_view(t, 4), qtype) == quantize(np.ascontiguousarray(ga.permute_rows(f, 4)), qtype).tobytes()
        assert native_bytes(t[:, 32:], T.Q8_0) == quantize(np.ascontiguousarray(f[:, 32:]), T.Q8_0).tobytes()


def test_what_the_kernel_cannot_read_is_left_to_torch(code):
    torch = pytest.importorskip("torch")
    assert Rows.of(np.zeros((4, 8), np.int32)) is None
    assert Rows.of(np.zeros((4, 8), np.float64)) is None
    assert Rows.of(np.zeros((4, 8), ">f4")) is None
    assert Rows.of(np.zeros((8, 4), np.float32).T) is None  # the values of a row are not contiguous
    assert Rows.of(torch.zeros(4, 8, dtype=torch.int8)) is None
    assert Rows.of(np.float32(1.0).reshape(())) is None
    t = torch.randn(64, 32).T  # transposed: encode() goes through torch, same bytes
    assert encode(t, T.Q8_0).tobytes() == quantize(np.ascontiguousarray(t.numpy()), T.Q8_0).tobytes()


def test_kernel_refuses_bad_arguments():
    lib = kernel()
    x = np.zeros((2, 40), np.float32)
    out = np.zeros(1024, np.uint8)
    assert lib.ah_ggml_encode_rows(x.ctypes.data, 0, None, 160, 2, 40, out.ctypes.data, 8) == -2  # not whole blocks
    assert lib.ah_ggml_encode_rows(x.ctypes.data, 2, None, 160, 2, 40, out.ctypes.data, 0) == -1  # Q4_0 source
    assert lib.ah_ggml_encode_rows(x.ctypes.data, 0, None, 160, 2, 40, out.ctypes.data, 2) == -1  # Q4_0 output
    assert lib.ah_abi_version() == native.ABI_VERSION


def test_convert_to_gguf_imports_no_torch(trained_llama, tmp_path):
    """``convert CHECKPOINT --to gguf`` reads numpy memory maps and encodes with the kernel: no torch,
    transformers or peft in the process, and the same file as the torch path writes."""
    out = tmp_path / "m.q8_0.gguf"
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['adapterhub', 'convert', {str(trained_llama)!r}, '--to', 'gguf', '--outtype', 'q8_0', '-o', {str(out)!r}, '--quiet']\n"
        "try:\n    runpy.run_module('adapterhub.cli', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    env = {"PATH": "/usr/bin:/bin", "ADAPTERHUB_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "HEAVY []" in r.stdout, r.stdout + r.stderr
    ref = tmp_path / "ref.gguf"
    r = subprocess.run([sys.executable, "-m", "adapterhub.cli", "convert", str(trained_llama), "--to", "gguf", "--outtype",
                        "q8_0", "-o", str(ref), "--quiet"], capture_output=True, text=True, env={**env, "ADAPTERHUB_NO_NATIVE": "1"})
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == ref.read_bytes()
