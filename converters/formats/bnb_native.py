"""The C bitsandbytes quantizers (converters/_c/bnb_kernels.c) through ctypes, run on every core.

The kernels read a weight's bf16, f16 or f32 bytes where they lie (a buffer
or a memory map) and write bitsandbytes' packed codes and absmax values into
the caller's buffers; they take addresses, not tensors, so this module needs
neither torch nor numpy. A weight is cut into pieces of whole blocks (whole
rows for int8), which the calling thread and ``workers() - 1`` pooled threads
take in turn: ctypes drops the GIL for each call, so the pieces run on all
cores, and a core busy with another process simply takes fewer of them.

Each function returns the number of blocks (rows) whose absmax is inf or
NaN, which the kernel leaves for the caller to redo (``bnb_cpu`` redoes them
with bitsandbytes' torch operations). Where the library is not built, or
``ADAPTERHUB_NO_NATIVE=1``, :func:`available` is False and ``bnb_cpu`` takes
its torch path: the same bytes (tests/test_bnb_native.py).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from adapterhub.converters.formats import native

#: The kernels' source kinds, by safetensors / torch dtype name.
KINDS = {"bfloat16": 0, "float16": 1, "float32": 2}
MODES = {"nf4": 0, "fp4": 1}
#: Elements per piece (about a megabyte of bf16): small enough to share a tensor
#: out over the cores, large enough that a call's cost (microseconds) is lost.
PIECE = 1 << 19
MAX_BLOCKSIZE = 4096


def workers() -> int:
    """Threads the kernels use: every core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


@functools.cache
def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    for name, args in (
        ("ah_bnb_quantize_4bit", [ptr, i32, i64, i64, i32, ptr, ptr]),
        ("ah_bnb_block_absmax", [ptr, i32, i64, i64, ptr]),
        ("ah_bnb_int8_rowwise", [ptr, i32, i64, i64, ptr, ptr]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = i64, args
    lib.ah_bnb_set_isa.restype, lib.ah_bnb_set_isa.argtypes = ctypes.c_int, [i32]
    lib.ah_bnb_codebook.restype = ctypes.c_int
    lib.ah_bnb_codebook.argtypes = [i32, ptr, ptr]
    return lib


def library() -> ctypes.CDLL | None:
    """The bound kernel library, or None (not built, or ``ADAPTERHUB_NO_NATIVE``)."""
    lib = native.load("bnb")
    return None if lib is None else _bind(lib)


def available() -> bool:
    return library() is not None


_pool: ThreadPoolExecutor | None = None
_pool_threads = 0
_pool_lock = threading.Lock()


def _executor(threads: int) -> ThreadPoolExecutor:
    """The module's thread pool, grown to ``threads`` on demand."""
    global _pool, _pool_threads
    with _pool_lock:
        if _pool is None or _pool_threads < threads:
            _pool = ThreadPoolExecutor(threads, thread_name_prefix="adapterhub-quantize")
            _pool_threads = threads
        return _pool


def run_parallel(fn: Callable[[int], int | None], starts: Sequence[int], threads: int | None = None) -> int:
    """Sum of ``fn(start)`` (None counts 0) over ``starts``, taken in turn by this thread and pooled ones.

    The calling thread and ``threads - 1`` pooled threads (``workers()`` by
    default, at most one per start) take the next
    start until none is left, so a core busy elsewhere just takes fewer. The
    first error stops the others taking more and is raised once they are
    done. A pooled helper that has not started when the calling thread runs
    out of starts is cancelled, not waited for: so a caller running on a
    pooled thread itself never waits for a free one.
    """
    n = min(workers() if threads is None else threads, len(starts))
    if n <= 1:
        return sum(fn(s) or 0 for s in starts)
    lock = threading.Lock()
    todo = iter(starts)
    failed: list[BaseException] = []

    def drain() -> int:
        total = 0
        while True:
            with lock:
                s = None if failed else next(todo, None)
            if s is None:
                return total
            try:
                total += fn(s) or 0
            except BaseException as e:
                failed.append(e)
                raise

    helpers = [_executor(n - 1).submit(drain) for _ in range(n - 1)]
    try:
        total = drain()
    finally:
        for f in helpers:
            if not f.cancel():
                f.exception()  # wait: they write into the caller's buffers
    return total + sum(f.result() for f in helpers if not f.cancelled())


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise ValueError(f"the bnb kernel refused the arguments of {what}")
    return rc


def quantize_4bit(
    src: int, dtype: str, n: int, blocksize: int, mode: str, packed: int, absmax: int, piece: int = PIECE
) -> int:
    """bitsandbytes' ``quantize_4bit`` of the ``n`` values at address ``src`` into ``packed`` and ``absmax``.

    ``packed`` holds ``(n + 1) // 2`` bytes, ``absmax`` one float32 per block
    (the last block partial when ``blocksize`` does not divide ``n``).
    Returns the blocks whose absmax is not finite (their bytes are not written).
    ``piece``: elements per call (fewer, longer calls take the GIL fewer times).
    """
    lib = library()
    assert lib is not None
    kind, code = KINDS[dtype], MODES[mode]
    size = 4 if dtype == "float32" else 2
    step = max(piece - piece % blocksize, blocksize)

    def part(i: int) -> int:
        m = min(step, n - i)
        rc = lib.ah_bnb_quantize_4bit(src + i * size, kind, m, blocksize, code, packed + i // 2,
                                      absmax + (i // blocksize) * 4)
        return _check(rc, "quantize_4bit")

    return run_parallel(part, range(0, n, step))


def block_absmax(src: int, dtype: str, n: int, blocksize: int, absmax: int, piece: int = PIECE) -> int:
    """The float32 absmax per block that :func:`quantize_4bit` stores. Returns the non-finite blocks."""
    lib = library()
    assert lib is not None
    kind, size = KINDS[dtype], 4 if dtype == "float32" else 2
    step = max(piece - piece % blocksize, blocksize)

    def part(i: int) -> int:
        m = min(step, n - i)
        rc = lib.ah_bnb_block_absmax(src + i * size, kind, m, blocksize, absmax + (i // blocksize) * 4)
        return _check(rc, "block_absmax")

    return run_parallel(part, range(0, n, step))


def int8_rowwise(src: int, dtype: str, rows: int, cols: int, cb: int, scb: int) -> int:
    """LLM.int8 of a (rows, cols) weight at ``src`` into ``cb`` (int8) and ``scb`` (float32 per row).

    Returns the rows whose absmax is not finite (their codes are not written).
    """
    lib = library()
    assert lib is not None
    kind, size = KINDS[dtype], 4 if dtype == "float32" else 2
    band = max(1, PIECE // max(cols, 1))

    def piece(r: int) -> int:
        k = min(band, rows - r)
        rc = lib.ah_bnb_int8_rowwise(src + r * cols * size, kind, k, cols, cb + r * cols, scb + r * 4)
        return _check(rc, "int8_rowwise")

    return run_parallel(piece, range(0, rows, band))
