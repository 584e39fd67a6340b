"""``quantize`` on the CPU without torch: the C kernel between the page cache and the shard writer.

``import torch`` alone costs 1.0-1.8 s of CPU on the 2-core VM, about as long
as the rest of quantizing a 0.94B model once the C kernel
(converters/_c/bnb_kernels.c) does the arithmetic. So where that kernel is
built and the work is on the CPU, :func:`adapterhub.converters.quantize.quantize`
plans from the safetensors headers by dtype name (:class:`RawSpec`), a reader
thread maps the next weight from the page cache while this one is quantized
on every core (``formats.bnb_native``), and the output bytes go to the shard
writer as they are. The files are the torch path's, byte for byte
(tests/test_bnb_native.py compares whole outputs of both).

Double quantization needs torch for its offsets: each is the float32 mean
of a weight's block absmax, which must be torch's to the bit (its summation
order is torch's own), and the quant state's JSON holds it, so its length is
known only once the offsets are. :func:`double_quant_prepass` therefore
starts ``import torch`` on a thread and meanwhile runs the kernel over every
weight, keeping the finished 4-bit output (up to ``HOLD_BYTES``) while the
import is under way and only the absmax after; once torch is there, it takes
the means, the header is planned, and the nested 8-bit step (``bnb_quant``'s
own, so the torch path's bytes) runs per weight as it is written. Models with
Conv1D (transposed) weights take the torch path.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from typing import Any

from adapterhub.errors import InvalidArtifactError
from adapterhub.platform import pread_into

from adapterhub.converters.formats.bnb_layout import CONV1D_MODEL_TYPES, QuantSettings, quant_state_json, quantized_layout
from adapterhub.converters.formats.safetensors_io import TensorSource, map_array

# safetensors dtype -> torch's dtype name, and bytes per element
_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64",
}
_SIZES = {"float32": 4, "int8": 1, "uint8": 1}


@dataclass(frozen=True)
class RawSpec:
    """A planned tensor by dtype name: what ``StreamingShardWriter`` and ``Quantizer.wants`` read of a spec."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch's name: bfloat16, uint8, ...
    nbytes: int


def no_gpu() -> bool:
    """On Linux, no NVIDIA, ROCm or WSL GPU device node: CUDA cannot be available, so ``auto`` is the CPU."""
    nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")
    return sys.platform == "linux" and not any(os.path.exists(p) for p in nodes)


def usable(settings: QuantSettings, config: Mapping[str, Any], device: str) -> bool:
    """Whether this quantization takes the kernel path here (no torch, but for double quantization's offsets)."""
    if device != "cpu" or settings.mode not in ("nf4", "fp4", "int8"):
        return False
    if config.get("model_type") in CONV1D_MODEL_TYPES or sys.byteorder != "little":  # the files are little-endian
        return False
    from adapterhub.converters.formats import bnb_native

    return bnb_native.available() and (settings.mode == "int8" or settings.blocksize <= bnb_native.MAX_BLOCKSIZE)


def source_spec(src: TensorSource, name: str) -> RawSpec:
    shape, st = src.header(name)
    return RawSpec(name, tuple(shape), _NAMES[st], src.span(name).nbytes)


def output_specs(settings: QuantSettings, spec: RawSpec, nested_offset: float | None = None) -> list[RawSpec]:
    """The tensors that replace the weight ``spec``, as ``Quantizer.specs`` plans them."""
    layout = quantized_layout(spec.name.removesuffix(".weight"), spec.shape, spec.dtype, settings.mode,
                              double_quant=settings.double_quant, blocksize=settings.blocksize,
                              nested_offset=nested_offset)
    return [RawSpec(n, dims, dt, math.prod(dims) * _SIZES[dt]) for n, dims, dt in layout]


class _Buffer:
    """A reusable anonymous mapping, grown to the largest request, and its address for the kernel."""

    def __init__(self) -> None:
        self._map: mmap.mmap | None = None
        self._pin: Any = None
        self.addr = 0

    def view(self, nbytes: int) -> memoryview:
        if self._map is None or len(self._map) < nbytes:
            self._map = mmap.mmap(-1, max(nbytes, mmap.PAGESIZE))
            self._pin = ctypes.c_char.from_buffer(self._map)  # keeps the mapping (and the address) alive
            self.addr = ctypes.addressof(self._pin)
        return memoryview(self._map)[:nbytes]


def _read(src: TensorSource, name: str, buf: _Buffer) -> tuple[memoryview, int]:
    """``name``'s bytes read into ``buf``: (a view of them, their address)."""
    span = src.span(name)
    mv = buf.view(span.nbytes)
    try:
        fd = os.open(span.path, os.O_RDONLY)
        try:
            done = 0
            while done < span.nbytes:
                n = pread_into(fd, mv[done:], span.offset + done)
                if n == 0:
                    raise InvalidArtifactError(f"{span.rel}: truncated while reading tensor {name}")
                done += n
        finally:
            os.close(fd)
    except OSError as e:
        raise InvalidArtifactError(f"{span.rel}: cannot read tensor {name} ({e.strerror or e})") from None
    return mv, buf.addr


def _map(src: TensorSource, name: str, buf: _Buffer) -> tuple[Any, int]:
    """``name``'s bytes mapped from the page cache (read-only, populated): (a holder to keep, their address).

    ``pread`` copies every byte once more (0.3 s of system time per 1.75 GiB
    on the 2-core VM); the map shares the page cache's pages. The file's size
    is checked first: a mapped read past its end is SIGBUS, not an error. A
    file that cannot be mapped is read into ``buf``.
    """
    span = src.span(name)
    if not span.nbytes:
        return _read(src, name, buf)
    try:
        fd = os.open(span.path, os.O_RDONLY)
    except OSError as e:
        raise InvalidArtifactError(f"{span.rel}: cannot read tensor {name} ({e.strerror or e})") from None
    try:
        _, view = map_array(fd, span.offset, span.nbytes, span.rel, f"tensor {name}")  # the view holds the map
    except OSError:
        return _read(src, name, buf)
    finally:
        os.close(fd)
    return view, int(view.ctypes.data)


def _code_bytes(mode: str) -> bytes:
    from adapterhub.converters.formats.bnb_cpu import FP4_CODE, NF4_CODE

    return struct.pack("<16f", *(NF4_CODE if mode == "nf4" else FP4_CODE))  # float32, as torch.tensor rounds


def _non_finite(module: str) -> InvalidArtifactError:
    return InvalidArtifactError(f"{module}.weight has non-finite values (NaN or inf); refusing to quantize it")


def _mapped(src: TensorSource, names: Sequence[str]) -> Iterator[tuple[Any, int]]:
    """(a holder to keep, the address) of each of ``names`` in turn; a reader thread maps the next meanwhile.

    ``mmap`` drops the GIL while it populates. A read that cannot map falls
    back to the other of two buffers: the one before the last is free again.
    """
    bufs = (_Buffer(), _Buffer())
    with ThreadPoolExecutor(1, thread_name_prefix="adapterhub-read") as reader:

        def submit(r: int) -> Any:
            return reader.submit(_map, src, names[r], bufs[r % 2]) if r < len(names) else None

        fut = submit(0)
        try:
            for r in range(len(names)):
                held, addr = fut.result()
                fut = submit(r + 1)
                yield held, addr
                del held
        finally:
            if fut is not None:
                fut.cancel()


def _nested(spec: RawSpec, settings: QuantSettings, packed: Any, absmax: Any, offset: float) -> list[Any]:
    """The double-quant outputs of a weight from its packed codes and float32 absmax (torch is imported by now).

    The nested 8-bit step is ``bnb_quant``'s, the torch path's own code.
    """
    import numpy as np
    import torch

    from adapterhub.converters.formats.bnb_quant import _double_quant

    module = spec.name.removesuffix(".weight")
    out: dict[str, Any] = {}
    _double_quant(out, module, torch.from_numpy(np.frombuffer(absmax, dtype=np.float32)), offset)
    qs = quant_state_json(settings.mode, spec.shape, spec.dtype, blocksize=settings.blocksize, double_quant=True,
                          nested_offset=offset)
    w = f"{module}.weight"
    return [packed, out[f"{w}.absmax"].numpy(), _code_bytes(settings.mode), out[f"{w}.nested_absmax"].numpy(),
            out[f"{w}.nested_quant_map"].numpy(), qs]


def quantize_weight(
    spec: RawSpec, data: int, settings: QuantSettings, outs: Sequence[_Buffer], nested_offset: float | None = None
) -> list[bytes | memoryview]:
    """The bytes of each tensor ``output_specs(settings, spec)`` plans, from the weight at address ``data``.

    With double quantization, ``nested_offset`` is the pre-pass's and torch is imported.
    """
    from adapterhub.converters.formats import bnb_native

    module = spec.name.removesuffix(".weight")
    rows, cols = spec.shape
    n = rows * cols
    if settings.mode == "int8":
        cb, scb = outs[0].view(n), outs[1].view(4 * rows)
        if bnb_native.int8_rowwise(data, spec.dtype, rows, cols, outs[0].addr, outs[1].addr):
            outs[2].view(4 * -(-n // 64))
            if bnb_native.block_absmax(data, spec.dtype, n, 64, outs[2].addr):
                raise _non_finite(module)
            raise InvalidArtifactError(f"{module}.weight overflows float16, which int8 quantization goes through")
        return [cb, scb, b"\0"]  # weight_format 0: the row layout
    bs, mode = settings.blocksize, settings.mode
    packed, absmax = outs[0].view((n + 1) // 2), outs[1].view(4 * -(-n // bs))
    if bnb_native.quantize_4bit(data, spec.dtype, n, bs, mode, outs[0].addr, outs[1].addr):
        raise _non_finite(module)
    if settings.double_quant:
        assert nested_offset is not None
        return _nested(spec, settings, packed, absmax, nested_offset)
    return [packed, absmax, _code_bytes(mode), quant_state_json(mode, (rows, cols), spec.dtype, blocksize=bs)]


#: Finished 4-bit output (packed codes and float32 absmax) that the double-quant
#: pre-pass keeps while torch is being imported, at most: these weights are not
#: read nor quantized a second time. On the 2-core VM (0.94B bf16 model, 493 MB
#: of such output; single runs hand-timed) each 256 MiB kept took about 0.2 s
#: off the run, and added as much to its peak RSS.
HOLD_BYTES = 512 * 1024**2
#: ``sys.setswitchinterval`` while torch is imported beside the kernel (Python's default: 0.005 s).
SWITCH_INTERVAL = 0.0002
#: Kernel calls per weight while torch is imported beside them (1: on the calling thread alone).
PIECES_IMPORTING = 1


class _TorchImport:
    """``import torch`` on a thread of its own, started as soon as it is known to be needed."""

    def __init__(self) -> None:
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adapterhub-import-torch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            import torch  # noqa: F401
        except BaseException as e:  # noqa: BLE001 - handed to the thread that waits
            self._error = e
        finally:
            self._done.set()

    def ready(self) -> bool:
        return self._done.is_set()

    def join(self) -> None:
        self._thread.join()

    def wait(self) -> None:
        """Until torch is imported; its import's error, if any, is raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error


@dataclass
class DoubleQuantPrepass:
    """The pre-pass's result: each weight's offset, and the 4-bit output kept of the first weights."""

    offsets: dict[str, float] = field(default_factory=dict)
    #: weight name -> (packed codes, float32 absmax), as numpy arrays
    held: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def _offsets(waiting: list[tuple[str, Any]], offsets: dict[str, float]) -> None:
    """torch's float32 mean of each absmax, as the torch path's pre-pass takes it (torch on one thread)."""
    import torch

    from adapterhub.converters.formats.bnb_cpu import one_torch_thread

    with one_torch_thread("cpu"):
        for k, absmax in waiting:
            offsets[k] = float(torch.from_numpy(absmax).clone().mean().item())
    waiting.clear()


def double_quant_prepass(
    src: TensorSource, settings: QuantSettings, wanted: set[str], progress: Callable[[str, int], Any] | None = None
) -> DoubleQuantPrepass:
    """Every wanted weight's double-quant offset, with torch imported meanwhile (see the module doc).

    Until torch is there (and up to ``HOLD_BYTES``) a weight is quantized
    whole and its output kept; after that only its absmax is taken. A
    weight with inf or NaN is refused here, as the torch path's pre-pass does.
    """
    names = [k for k in src.keys() if k in wanted]
    specs = [source_spec(src, k) for k in names]
    bar = progress("scanning for double quantization", sum(s.nbytes for s in specs)) if progress else None
    done = DoubleQuantPrepass()
    try:
        _prepass(src, names, specs, settings, done, bar)
    finally:
        if bar is not None:
            bar.close()
    return done


def _prepass(
    src: TensorSource, names: list[str], specs: list[RawSpec], settings: QuantSettings, done: DoubleQuantPrepass,
    bar: Any,
) -> None:
    """:func:`_prepass_loop` with torch imported on a thread meanwhile."""
    import numpy as np  # noqa: F401 - the loop's imports come first: the two threads never wait on each other

    from adapterhub.converters.formats import bnb_native  # noqa: F401

    # The import holds the GIL but for a switch every interval, and each kernel
    # call waits for one on its way out: short slices while it runs.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    torch_import = _TorchImport()
    try:
        _prepass_loop(src, names, specs, settings, done, bar, torch_import)
    finally:
        sys.setswitchinterval(interval)
        torch_import.join()  # on an error too: no import left running while the process ends


def _prepass_loop(
    src: TensorSource, names: list[str], specs: list[RawSpec], settings: QuantSettings, done: DoubleQuantPrepass,
    bar: Any, torch_import: _TorchImport,
) -> None:
    """Each weight's absmax, and its whole output while torch is not there yet; the offsets once it is."""
    import numpy as np

    from adapterhub.converters.formats import bnb_native

    waiting: list[tuple[str, Any]] = []
    held_bytes, bs = 0, settings.blocksize
    with closing(_mapped(src, names)) as mapped:
        for spec, (view, addr) in zip(specs, mapped):
            n = math.prod(spec.shape)
            importing = not torch_import.ready()
            if not importing:
                torch_import.wait()
                _offsets(waiting, done.offsets)
            # While the import runs: one kernel call a weight, on this thread (each call waits for
            # the GIL on its way out, and the import has the other core).
            piece = max(bnb_native.PIECE, -(-n // PIECES_IMPORTING)) if importing else bnb_native.PIECE
            absmax = np.empty(-(-n // bs), dtype=np.float32)
            need = (n + 1) // 2 + absmax.nbytes
            if importing and held_bytes + need <= HOLD_BYTES:
                packed = np.empty((n + 1) // 2, dtype=np.uint8)
                bad = bnb_native.quantize_4bit(addr, spec.dtype, n, bs, settings.mode, packed.ctypes.data,
                                               absmax.ctypes.data, piece)
                done.held[spec.name], held_bytes = (packed, absmax), held_bytes + need
            else:
                bad = bnb_native.block_absmax(addr, spec.dtype, n, bs, absmax.ctypes.data, piece)
            del view
            if bad:
                raise _non_finite(spec.name.removesuffix(".weight"))
            waiting.append((spec.name, absmax))
            if bar is not None:
                bar.update(spec.nbytes)
    torch_import.wait()
    _offsets(waiting, done.offsets)


def quantize_tensors(
    src: TensorSource,
    settings: QuantSettings,
    wanted: set[str],
    writer: Any,
    advance: Callable[[int], None],
    specs: Mapping[str, RawSpec],
    done: list[str],
    prepass: DoubleQuantPrepass | None = None,
) -> None:
    """Quantize the ``wanted`` tensors of ``src`` in order into ``writer``; copy the others file to file.

    A reader thread maps the next weight while this one is quantized. With
    double quantization, ``prepass`` has the offsets and the output it kept;
    the nested step of the kept weights runs ahead on a thread of its own
    (torch drops the GIL) while this one writes.
    """
    keys = src.keys()
    held = prepass.held if prepass is not None else {}
    offsets = prepass.offsets if prepass is not None else {}
    if settings.double_quant:
        from adapterhub.converters.formats.bnb_cpu import one_torch_thread

        torch_threads: Any = one_torch_thread("cpu")  # as the torch path quantizes
    else:
        torch_threads = nullcontext()
    ahead = ThreadPoolExecutor(1, thread_name_prefix="adapterhub-nested")
    reads = [k for k in keys if k in wanted and k not in held]
    try:
        with closing(_mapped(src, reads)) as mapped, torch_threads:
            kept = {k: ahead.submit(_nested, source_spec(src, k), settings, *held.pop(k), offsets[k])
                    for k in keys if k in held}
            _write_all(src, settings, wanted, writer, advance, specs, done, offsets, kept, mapped)
    finally:
        ahead.shutdown(wait=True, cancel_futures=True)


def _write_all(
    src: TensorSource, settings: QuantSettings, wanted: set[str], writer: Any, advance: Callable[[int], None],
    specs: Mapping[str, RawSpec], done: list[str], offsets: Mapping[str, float], kept: Mapping[str, Any],
    mapped: Iterator[tuple[Any, int]],
) -> None:
    outs = (_Buffer(), _Buffer(), _Buffer())
    for k in src.keys():
        spec = source_spec(src, k)
        if k in wanted:
            offset = offsets.get(k)
            if k in kept:
                data = kept[k].result()
            else:
                view, addr = next(mapped)
                data = quantize_weight(spec, addr, settings, outs, offset)
            for o, d in zip(output_specs(settings, spec, offset), data):
                writer.write_bytes(o.name, o.shape, o.dtype, d)
            done.append(k.removesuffix(".weight"))
            data = view = None
        else:
            writer.copy_span(k, specs[k], src.span(k))  # unchanged: file to file
        advance(spec.nbytes)
