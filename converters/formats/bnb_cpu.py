"""bitsandbytes quantization on the CPU, vectorized: the bytes bitsandbytes 0.50 writes, at a fraction of its time.

bitsandbytes' own CPU path for 4-bit is a chain of whole-tensor torch
operations ending in ``torch.bucketize``, a binary search per element: about
35 ns of CPU per element on the 2-core VM, where reading and writing the bytes
costs about 2. Here the same arithmetic runs a chunk of whole blocks at a time in
cache-sized buffers, on every core, and the search becomes two table lookups:

- per block of 64: ``absmax = max |x|`` (float32), ``s = x * (1 / max(absmax,
  1e-38))``: bitsandbytes' float32 operations, in its order, so ``s`` has the
  same bits;
- the code of ``s`` is the number of the 15 code midpoints below it. The top
  16 bits of ``s`` (sign, exponent, 7 mantissa bits) name a cell of floats;
  ``_tables`` holds, per cell, the code of its lowest value and the one
  midpoint that falls inside it (+inf when none does), so ``code = lo[cell] +
  (s > midpoint[cell])``, exact for every float;
- the cell is the float's high 16 bits, taken in one widening copy; the
  codes are uint8;
- two codes a byte, the first in the high nibble. FP4's codes are not in
  value order: a 512-entry table turns each pair of buckets into the byte
  of their two codes.

A partial last block (``n % 64``) and an odd element count follow
bitsandbytes' own special case (a true division, the block's absmax stored
clamped to 1e-38, a zero appended), computed with its operations on those few
values. 8-bit (LLM.int8) is row-wise: ``round(W16 * (127 / max |row|))``,
again bitsandbytes' operations, a band of rows at a time. Double
quantization's nested 8-bit blockwise quantization of the absmax values
(``quantize_blockwise_8bit``) follows bitsandbytes' CPU kernel: a grid of
65536 points over [-1, 1] and a table of the code at each, so that the CPU
path never imports bitsandbytes (seconds of start-up).

Where the C kernel is built (``bnb_native``, converters/_c/bnb_kernels.c),
``quantize_4bit``, ``block_absmax`` and ``int8_rowwise`` hand the whole
weight to it instead (one pass per element) and redo only blocks or rows with
inf or NaN here; the torch code below is the path without it
(``ADAPTERHUB_NO_NATIVE=1``, no C compiler at install time).

Tests compare every output with bitsandbytes tensor for tensor
(``tests/test_bnb_cpu.py``, ``tests/test_bnb_native.py``). On CUDA,
``bnb_quant`` calls bitsandbytes itself.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from adapterhub.converters.formats.bnb_native import run_parallel, workers

if TYPE_CHECKING:
    import torch

#: bitsandbytes' 4-bit codes (``get_4bit_type``), as the float32 values it stores in ``quant_map``.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
#: FP4 (1 sign, 2 exponent, 1 mantissa bit), in bit-pattern order, normalised by 12 as bitsandbytes does.
FP4_CODE = tuple(v / 12.0 for v in (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0))
#: The code indices in increasing value, as bitsandbytes' ``argsort`` orders them (its two zeros: 0, then 8).
FP4_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)

#: Elements per step of the 4-bit kernel: a multiple of 2 blocks of every
#: supported size, small enough that a step's four float32/int32 buffers stay
#: in a core's L2 cache. On the 2-core VM 2^16 took 4.1 ns of CPU per element,
#: 2^15 4.6 and 2^18 5.4.
CHUNK = 1 << 16
#: Rows per step of the 8-bit kernel, at most (fewer for long rows).
INT8_CHUNK = 1 << 16
_CELL_BITS = 16  # the top bits of a float32 that name a cell of the lookup tables


def code_table(mode: str) -> torch.Tensor:
    """``quant_map``: bitsandbytes' 16 float32 values of ``mode`` (nf4 or fp4)."""
    import torch

    return torch.tensor(NF4_CODE if mode == "nf4" else FP4_CODE, dtype=torch.float32)


@functools.cache
def _bounds(mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the 15 midpoints between sorted codes, float32; the code index of each bucket), as bitsandbytes builds them."""
    import torch

    code = code_table(mode)
    order = torch.arange(16) if mode == "nf4" else torch.tensor(FP4_ORDER)
    return (code[order[:-1]] + code[order[1:]]) / 2, order


def _reference_codes(scaled: torch.Tensor, mode: str) -> torch.Tensor:
    """bitsandbytes' code of each (already scaled) value: clamp, bucketize, reorder. int32."""
    import torch

    bounds, order = _bounds(mode)
    q = torch.bucketize(torch.clamp(scaled, -1, 1), bounds, out_int32=True)
    return q if mode == "nf4" else order[q].to(torch.int32)


@functools.cache
def _tables(mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, midpoint) per cell of floats, indexed by the top 16 bits of the float32 as an unsigned number.

    ``lo`` (uint8) is the bucket of the cell's lowest value; ``midpoint``
    (float32) the one bound inside the cell, or +inf. Every cell holds at most
    one bound (they are at least 0.0026 apart), which is checked here. Cells
    of NaNs are never looked up: blocks that hold inf or NaN are redone by
    ``_non_finite_blocks``.
    """
    import torch

    bounds, order = _bounds(mode)
    shift = 32 - _CELL_BITS
    half = 1 << (_CELL_BITS - 1)
    first = torch.arange(-half, half, dtype=torch.int64) << shift
    ends = torch.stack([first, first + ((1 << shift) - 1)]).to(torch.int32).view(torch.float32)
    low, high = ends.amin(0), ends.amax(0)  # negative cells run downwards in value
    qlow = torch.bucketize(torch.clamp(low, -1, 1), bounds, out_int32=True)
    qhigh = torch.bucketize(torch.clamp(high, -1, 1), bounds, out_int32=True)
    finite = torch.isfinite(low) & torch.isfinite(high)
    step = torch.where(finite, qhigh - qlow, torch.zeros_like(qlow))
    if int(step.max()) > 1:
        raise AssertionError("two 4-bit bounds share a cell of the lookup table")
    mid = torch.full_like(low, float("inf"))
    split = step == 1
    mid[split] = bounds[qlow[split].long()]
    # Cells were built in signed order (-2**15 ..); the kernel indexes them unsigned (0 .. 2**16 - 1).
    half_turn = 1 << (_CELL_BITS - 1)
    return torch.roll(qlow.to(torch.uint8), half_turn).contiguous(), torch.roll(mid, half_turn).contiguous()


_local = threading.local()  # each thread's buffers, kept between calls


def _parallel(fn: Callable[[int, dict[Any, Any]], None], starts: Sequence[int]) -> None:
    """Run ``fn(start, buffers)`` for every start, on ``workers()`` threads, each with its own buffers.

    The calling thread and ``workers() - 1`` pooled threads take the next
    start in turn until none is left. torch's own thread pool is held to one
    thread meanwhile: each operation here is small and runs on the thread
    that calls it, and the cores are shared out by chunk instead (torch's
    pool, which spins while other processes hold the cores, was up to 20
    times slower on a loaded 2-core VM).
    """
    import torch

    n = min(workers(), len(starts))
    threads = torch.get_num_threads()
    if n > 1 and threads != 1:
        torch.set_num_threads(1)
    try:
        run_parallel(lambda s: fn(s, _local.__dict__.setdefault("bufs", {})), starts, threads=n)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@contextmanager
def one_torch_thread(device: str = "cpu") -> Iterator[None]:
    """On the CPU, hold torch's own thread pool to one thread (the kernels here share the cores out themselves)."""
    import torch

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _buf(bufs: dict[Any, Any], role: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    import torch

    b = bufs.get((role, dtype))
    if b is None or b.numel() < n:
        b = bufs[(role, dtype)] = torch.empty(n, dtype=dtype)
    return b[:n]


def quantize_4bit(W: torch.Tensor, blocksize: int, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``bitsandbytes.functional.quantize_4bit(W, blocksize, quant_type=mode)`` on the CPU: (packed, absmax, code).

    ``packed`` is uint8 (ceil(n / 2), 1), ``absmax`` float32 (ceil(n / blocksize),),
    ``code`` the float32 ``quant_map``; the same bytes as bitsandbytes for any
    finite ``W`` (float16, bfloat16 or float32; non-finite values give a
    non-finite absmax, which callers refuse).
    """
    import torch

    flat = W.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    if _native(flat, blocksize):
        from adapterhub.converters.formats import bnb_native

        dtype = str(flat.dtype).removeprefix("torch.")
        bad = bnb_native.quantize_4bit(flat.data_ptr(), dtype, n, blocksize, mode, packed.data_ptr(), absmax.data_ptr())
        if bad:
            _redo_non_finite(flat, packed, absmax, blocksize, mode)
        return packed.view(-1, 1), absmax, code_table(mode)
    step = max(CHUNK - CHUNK % (2 * blocksize), 2 * blocksize)
    lo_t, mid_t = _tables(mode)

    def chunk(i: int, bufs: dict[Any, Any]) -> None:
        j = min(i + step, full)
        m, nb = j - i, (j - i) // blocksize
        x = _buf(bufs, "x", m, torch.float32)
        x.copy_(flat[i:j])
        xb = x.view(nb, blocksize)
        t = _buf(bufs, "t", m, torch.float32)
        am = absmax[i // blocksize : j // blocksize]
        torch.amax(torch.abs(xb, out=t.view(nb, blocksize)), dim=1, out=am)
        r = _buf(bufs, "r", nb, torch.float32)
        xb.mul_(torch.clamp(am, min=1e-38, out=r).reciprocal_()[:, None])  # A * (1.0 / absmax.clamp(min=1e-38))
        cell = _buf(bufs, "cell", m, torch.int32)
        _top16(x, cell)
        q = _buf(bufs, "q", m, torch.uint8)
        torch.index_select(lo_t, 0, cell, out=q)
        torch.index_select(mid_t, 0, cell, out=t)
        q.add_(torch.gt(x, t, out=_buf(bufs, "up", m, torch.bool)))  # s > midpoint: one bucket up
        _pack(q, packed[i // 2 : j // 2], mode, bufs)

    _parallel(chunk, range(0, full, step))
    _non_finite_blocks(flat[:full], packed[: full // 2], absmax[: full // blocksize], blocksize, mode)
    if full < n:
        _partial_block(flat[full:], packed[full // 2 :], absmax[-1:], mode)
    return packed.view(-1, 1), absmax, code_table(mode)


def _native(flat: torch.Tensor, blocksize: int = 2) -> bool:
    """Whether the C kernel (``bnb_native``) takes this CPU tensor: built, not disabled, a dtype and block size it reads."""
    import torch

    if flat.dtype not in (torch.bfloat16, torch.float16, torch.float32) or flat.device.type != "cpu":
        return False
    if blocksize % 2 or not 2 <= blocksize <= 4096:
        return False
    from adapterhub.converters.formats import bnb_native

    return bnb_native.available()


def _redo_non_finite(flat: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, mode: str) -> None:
    """After the C kernel: blocks whose absmax is inf or NaN, absmax and codes, with bitsandbytes' own operations."""
    import torch

    n = flat.numel()
    full = n - n % blocksize
    nb = full // blocksize
    bad = (~torch.isfinite(absmax[:nb])).nonzero().view(-1)
    if bad.numel():
        absmax[bad] = flat[:full].view(-1, blocksize)[bad].float().abs().amax(dim=1)
        _non_finite_blocks(flat[:full], packed[: full // 2], absmax[:nb], blocksize, mode)
    if full < n and not bool(torch.isfinite(absmax[-1])):
        _partial_block(flat[full:], packed[full // 2 :], absmax[-1:], mode)


def _non_finite_blocks(flat: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, mode: str) -> None:
    """Redo, with bitsandbytes' own operations, the blocks whose absmax is inf or NaN.

    Their scaled values are NaN (0 * inf, x * NaN), which the tables do not
    cover. adapterhub refuses such weights anyway; the bytes still match.
    """
    import torch

    bad = (~torch.isfinite(absmax)).nonzero().view(-1)
    if not bad.numel():
        return
    x = flat.view(-1, blocksize)[bad].float()
    scaled = torch.clamp(x * (1.0 / absmax[bad].clamp(min=1e-38).view(-1, 1)), -1, 1)
    q = _reference_codes(scaled.reshape(-1), mode).to(torch.uint8)
    packed.view(-1, blocksize // 2)[bad] = ((q[0::2] << 4) | q[1::2]).view(-1, blocksize // 2)


def block_absmax(W: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The float32 absmax per block that :func:`quantize_4bit` stores (a partial last block's clamped to 1e-38)."""
    import torch

    flat = W.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    full = n - n % blocksize
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    if _native(flat, blocksize):
        from adapterhub.converters.formats import bnb_native

        dtype = str(flat.dtype).removeprefix("torch.")
        if bnb_native.block_absmax(flat.data_ptr(), dtype, n, blocksize, absmax.data_ptr()):
            bad = (~torch.isfinite(absmax[: full // blocksize])).nonzero().view(-1)  # torch's NaN, not the kernel's
            absmax[bad] = flat[:full].view(-1, blocksize)[bad].float().abs().amax(dim=1)
            if full < n:
                absmax[-1] = flat[full:].float().abs().max().clamp(min=1e-38)
        return absmax
    step = max(CHUNK - CHUNK % blocksize, blocksize)

    def chunk(i: int, bufs: dict[Any, Any]) -> None:
        j = min(i + step, full)
        x = _buf(bufs, "x", j - i, torch.float32)
        x.copy_(flat[i:j])
        torch.amax(x.abs_().view(-1, blocksize), dim=1, out=absmax[i // blocksize : j // blocksize])

    _parallel(chunk, range(0, full, step))
    if full < n:
        absmax[-1] = flat[full:].float().abs().max().clamp(min=1e-38)
    return absmax


def _top16(x: torch.Tensor, out: torch.Tensor) -> None:
    """The top 16 bits of each float32 of ``x``, unsigned, into the int32 ``out`` (the lookup tables' cell)."""
    import torch

    if sys.byteorder == "little":
        out.copy_(x.view(torch.uint16)[1::2])  # the high half of each float: one strided widening copy
    else:
        torch.bitwise_right_shift(x.view(torch.int32), 32 - _CELL_BITS, out=out).bitwise_and_(0xFFFF)


def _pack(q: torch.Tensor, out: torch.Tensor, mode: str, bufs: dict[Any, Any]) -> None:
    """Two uint8 bucket indices a byte, the first in the high nibble; FP4 buckets become its codes.

    In a block holding inf or NaN a bucket may come out as 16 and an NF4 byte
    wrap around; ``_non_finite_blocks`` redoes those blocks.
    """
    import torch

    if mode == "nf4":
        torch.add(q[1::2], q[0::2], alpha=16, out=out)
        return
    idx = _buf(bufs, "pair", q.numel() // 2, torch.int32)
    torch.add(q[1::2], q[0::2], alpha=16, out=idx)
    torch.index_select(_fp4_pairs(), 0, idx, out=out)


@functools.cache
def _fp4_pairs() -> torch.Tensor:
    """16 * bucket + bucket -> the byte of their two FP4 codes (uint8).

    512 entries: in a block holding inf or NaN a bucket may come out as 16,
    before ``_non_finite_blocks`` redoes that block.
    """
    import torch

    _, order = _bounds("fp4")
    b = torch.arange(512)
    return ((order[(b >> 4).clamp(max=15)] << 4) | order[b & 15]).to(torch.uint8)


def _partial_block(tail: torch.Tensor, out: torch.Tensor, absmax: torch.Tensor, mode: str) -> None:
    """bitsandbytes' partial last block: absmax clamped to 1e-38 and stored so, a true division, a zero appended if odd."""
    import torch

    x = tail.float()
    am = x.abs().max().clamp(min=1e-38)
    absmax.copy_(am.reshape(1))
    q = _reference_codes(torch.clamp(x / am, -1, 1), mode).to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, _reference_codes(torch.zeros(1), mode).to(torch.uint8)])
    out.copy_((q[0::2] << 4) | q[1::2])


def int8_rowwise(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``bitsandbytes.functional.int8_vectorwise_quant(W.half())[:2]`` on the CPU: (int8 weight, float32 row absmax).

    ``W`` is the (out, in) weight in any float dtype; as transformers does, it
    goes through float16 (a band of rows at a time here). Per row,
    bitsandbytes' operations: ``round(W16 * (127.0 / max |row|))`` in float32,
    then int8 (a zero row's 0 * inf gives NaN, which becomes 0, as it does
    there). A row that overflows float16 has an infinite absmax, which
    callers refuse.
    """
    import torch

    W = W.detach()
    if not W.is_contiguous():
        W = W.contiguous()
    rows, cols = W.shape
    CB = torch.empty((rows, cols), dtype=torch.int8)
    SCB = torch.empty(rows, dtype=torch.float32)
    band = max(1, min(rows, INT8_CHUNK // max(cols, 1)))

    def rows_torch(i: int, j: int, bufs: dict[Any, Any]) -> None:
        a = _buf(bufs, "a", (j - i) * cols, torch.float16).view(j - i, cols)
        a.copy_(W[i:j])  # W.to(float16)
        t = _buf(bufs, "t", (j - i) * cols, torch.float16).view(j - i, cols)
        s16 = _buf(bufs, "s16", j - i, torch.float16)
        torch.amax(torch.abs(a, out=t), dim=1, out=s16)
        stats = SCB[i:j]
        stats.copy_(s16)
        x = _buf(bufs, "x", (j - i) * cols, torch.float32).view(j - i, cols)
        x.copy_(a)
        x.mul_(stats.reciprocal()[:, None].mul_(127.0))  # bitsandbytes: A * (127.0 / row_stats)
        torch.round(x, out=x)
        CB[i:j].copy_(x)

    if _native(W) and rows:
        from adapterhub.converters.formats import bnb_native

        dtype = str(W.dtype).removeprefix("torch.")
        if bnb_native.int8_rowwise(W.data_ptr(), dtype, rows, cols, CB.data_ptr(), SCB.data_ptr()):
            for r in (~torch.isfinite(SCB)).nonzero().view(-1).tolist():  # inf or NaN: bitsandbytes' operations
                rows_torch(r, r + 1, {})
        return CB, SCB
    _parallel(lambda i, bufs: rows_torch(i, min(i + band, rows), bufs), range(0, rows, band))
    return CB, SCB


#: Block size of the nested (double) quantization of 4-bit absmax values.
NESTED_BLOCKSIZE = 256
_LUT_SIZE = 1 << 16  # grid points of [-1, 1] in the 8-bit code lookup table


@functools.cache
def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map()``): 256 sorted float32 values in [-1, 1].

    Per decimal exponent ``e`` from -6 to 0, the midpoints of ``2**(e + 6) + 1``
    float32 steps from 0.1 to 1, times ``10**e``, with both signs; then 0 and 1.
    """
    import torch

    vals = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        vals += (scale * mids).tolist() + (-scale * mids).tolist()
    return torch.tensor(sorted(vals), dtype=torch.float32)


@functools.cache
def _dynamic_lut() -> torch.Tensor:
    """Grid point ``i`` of [-1, 1] (``-1 + 2i / 65535`` in float32) -> the code bitsandbytes' CPU kernel picks (uint8).

    That code is the number of code midpoints strictly below the grid point.
    """
    import torch

    code = dynamic_code()
    mids = 0.5 * (code[:-1] + code[1:])
    grid = torch.tensor(-1.0) + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / torch.tensor(_LUT_SIZE - 1.0)
    return torch.searchsorted(mids, grid, side="left").to(torch.uint8)


def quantize_blockwise_8bit(A: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``bitsandbytes.functional.quantize_blockwise(A, blocksize=blocksize)`` on the CPU: (uint8 codes, float32 absmax).

    For finite ``A`` (the nested quantization of double-quant absmax values):
    per block ``absmax = max |x|``; a zero block gives code 0 throughout;
    otherwise ``v = clamp(x * (1 / absmax), -1, 1)`` (NaN to -1) snaps to the grid point
    ``trunc(((v + 1) * 0.5) * 65535 + 0.5)`` (float32 at every step), whose
    code a 65536-entry table gives: bitsandbytes' CPU kernel, to the bit.
    """
    import torch

    flat = A.detach().reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    x = torch.zeros(blocks * blocksize, dtype=torch.float32)
    x[:n] = flat
    xb = x.view(blocks, blocksize)
    absmax = xb.abs().amax(dim=1)
    zero = absmax == 0
    inv = torch.where(zero, torch.zeros_like(absmax), torch.reciprocal(absmax))
    # 0 * inf (a subnormal absmax has no float32 reciprocal) is NaN, which bitsandbytes' clamp makes -1
    xb.mul_(inv[:, None]).nan_to_num_(nan=-1.0).clamp_(-1, 1)
    x.add_(1.0).mul_(0.5).mul_(float(_LUT_SIZE - 1)).add_(0.5)
    q = torch.index_select(_dynamic_lut(), 0, x.to(torch.int32))
    q.view(blocks, blocksize)[zero] = 0
    return q[:n].view(A.shape), absmax
