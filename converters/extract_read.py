"""Reading MODEL and BASE for extraction: float32 deltas formed chunk by chunk.

``DeltaReader.delta(name, slot)`` reads one 2-D tensor of MODEL and of BASE a
block of rows at a time, from read-only memory maps of a window of each file
(8 MiB, populated at once; the page cache's own pages, so no copy of the
bytes as ``pread`` made), and for each block:

- until the first block whose stored bytes differ (same dtype), the blocks
  are only compared: those rows of the delta are zero. A tensor whose blocks
  are all equal is unchanged: no delta is formed and no buffer the size of
  the tensor is touched;
- from the first differing block on (blocks are no longer compared: in a
  changed weight nearly every block differs) ``ΔW[rows] = float32(W_model[rows]) − float32(W_base[rows])``,
  and the float32 row norms of those rows are kept while they are in cache.

So the delta costs one pass over the bytes of the two files and one write of
the float32 delta (no full-size float32 copy of BASE, no second pass for
‖ΔW‖²), and the blocks stay in a core's cache while they are converted.
``‖ΔW‖_F²`` is the float64 sum of the squared float32 row norms (as
``lowrank.sq_norm`` computes it).

The delta lands in one of two float32 buffers (``slot`` 0 or 1), so one
module's delta can be factored while the next one is read into the other:
memory is bounded by two deltas and the small block buffers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError

from adapterhub.converters.formats.safetensors_io import FileSpan, TensorSource, Workspace, dtype_size, map_bytes

if TYPE_CHECKING:
    import torch

#: Bytes of float32 delta per block: small enough to stay in a core's L2 cache while converted.
BLOCK_BYTES = 1 << 20
#: Bytes of each file mapped at a time.
WINDOW_BYTES = 8 << 20


@dataclass
class PairDelta:
    name: str
    delta: torch.Tensor | None  # float32 (rows, cols), a view of a reused buffer; None: the values are equal
    sq_norm: float  # ‖ΔW‖_F², float64 sum of float32 row norms squared (inf/NaN if the delta is not finite)
    dtype: torch.dtype  # MODEL's dtype


class DeltaReader:
    """Float32 deltas of 2-D tensors, MODEL − BASE, one block of rows at a time. Not thread-safe: one reader thread."""

    def __init__(
        self, model: TensorSource, base: TensorSource, *, block_bytes: int = BLOCK_BYTES, window_bytes: int = WINDOW_BYTES
    ) -> None:
        self.model, self.base = model, base
        self.block_bytes, self.window_bytes = block_bytes, window_bytes
        self.ws = Workspace("cpu")
        self._fds: dict[str, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, span: FileSpan) -> int:
        key = str(span.path)
        fd = self._fds.get(key)
        if fd is None:
            try:
                fd = os.open(span.path, os.O_RDONLY)
            except OSError as e:
                raise InvalidArtifactError(f"{span.rel}: cannot open ({e.strerror or e})") from None
            self._fds[key] = fd
        return fd

    def _window(self, span: FileSpan, start: int, nbytes: int) -> tuple[Any, torch.Tensor]:
        """Bytes ``start:start + nbytes`` of a tensor: a read-only, populated memory map of the file (no copy)."""
        try:
            return map_bytes(self._fd(span), span.offset + start, nbytes, span.rel, "a tensor")
        except OSError as e:
            raise InvalidArtifactError(f"{span.rel}: cannot read ({e.strerror or e})") from None

    def delta(self, name: str, slot: int) -> PairDelta:
        """MODEL − BASE of the 2-D tensor ``name`` in float32, into buffer ``slot`` (None where the values are equal)."""
        import torch

        ms, bs = self.model.spec(name), self.base.spec(name)
        mspan, bspan = self.model.span(name), self.base.span(name)
        rows, cols = (int(x) for x in ms.shape)
        mi, bi = dtype_size(ms.dtype), dtype_size(bs.dtype)
        same_dtype = ms.dtype == bs.dtype
        if rows * cols == 0:
            return PairDelta(name, None, 0.0, ms.dtype)
        step = max(1, self.block_bytes // max(1, 4 * cols))
        cap = min(step, rows)
        # Rows mapped at a time: whole blocks, about WINDOW_BYTES of each file (so at most that much is mapped).
        wrows = max(1, self.window_bytes // max(1, cols * max(mi, bi)) // step) * step
        tmp = self.ws.tensor("block-f32", (cap, cols), torch.float32)
        norms = self.ws.tensor("row-norms", (rows,), torch.float32)
        delta: torch.Tensor | None = None
        for w0 in range(0, rows, wrows):
            wn = min(wrows, rows - w0)
            _mm, mwin = self._window(mspan, w0 * cols * mi, wn * cols * mi)
            _bm, bwin = self._window(bspan, w0 * cols * bi, wn * cols * bi)
            for k0 in range(0, wn, step):
                n, r0 = min(step, wn - k0), w0 + k0
                mb = mwin[k0 * cols * mi : (k0 + n) * cols * mi]
                bb = bwin[k0 * cols * bi : (k0 + n) * cols * bi]
                if delta is None and same_dtype and torch.equal(mb, bb):
                    continue  # no difference yet: these rows of the delta are zero (written if one follows)
                if delta is None:  # the first differing block: the rows before it are zero
                    delta = self.ws.tensor(f"delta{slot}", (rows, cols), torch.float32)
                    delta[:r0].zero_()
                    norms[:r0].zero_()
                out, t = delta[r0 : r0 + n], tmp[:n]
                out.copy_(mb.view(ms.dtype).view(n, cols))
                t.copy_(bb.view(bs.dtype).view(n, cols))
                out.sub_(t)
                torch.linalg.vector_norm(out, dim=-1, out=norms[r0 : r0 + n])
            del mb, bb, mwin, bwin, _mm, _bm  # unmapped here: at most one window of each file is mapped
        if delta is None:
            return PairDelta(name, None, 0.0, ms.dtype)
        sq = float(norms.double().pow_(2).sum())
        if sq == 0.0:  # the same values in another dtype, or bytes that differ only in the sign of a zero
            return PairDelta(name, None, 0.0, ms.dtype)
        return PairDelta(name, delta, sq if math.isfinite(sq) else math.nan, ms.dtype)
