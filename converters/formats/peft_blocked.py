"""Blocked CPU arithmetic for LoRA and IA3 merges: rows of a weight at a time, in cache.

``merge_into`` writes ``apply_ops(...)`` cast to the output dtype into a
buffer. On the CPU a tall matrix is merged block by block of rows, with the
same float32 operations per element as ``peft_deltas.apply_ops``; the first
tensor of every shape is also computed whole and the blocked path is used
only where the bytes match.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from adapterhub.converters.formats.peft_deltas import TensorGetter, _T, all_finite, apply_ops
from adapterhub.converters.formats.peft_plan import ModuleOp

if TYPE_CHECKING:
    import torch

#: Bytes of float32 rows per block in ``merge_into``'s blocked path: two such
#: buffers (the rows of the weight and of the LoRA product) stay in a 1-2 MiB
#: L2 cache. Measured on the 2-core VM (one thread, bf16 weights, r=16), the
#: blocked path took 0.17x the time of whole-tensor ops for 2048x5632 and
#: 4096x14336 weights: whole-tensor float32 temporaries go to memory and back
#: five times per element.
BLOCK_BYTES = 512 * 1024
#: Block heights are multiples of this: BLAS kernels work on panels of rows,
#: and a block boundary inside a panel can change the order of a product's sums.
BLOCK_ALIGN = 32

_BLOCKABLE = frozenset({"lora", "ia3"})
# signature -> whether the blocked path gave the same bytes as whole-tensor ops
_blocked_ok: dict[tuple[Any, ...], bool] = {}


def _block_signature(
    weight: torch.Tensor, out: torch.Tensor, ops: Sequence[ModuleOp], shape_of: Callable[[str], Sequence[int]],
    device: str | torch.device,
) -> tuple[Any, ...] | None:
    """What decides how BLAS computes a blocked merge of ``ops``, or None if it cannot run block-wise."""
    import torch

    on_cpu = torch.device(device).type == weight.device.type == out.device.type == "cpu"
    if not on_cpu or weight.dim() != 2 or not out.is_floating_point():
        return None  # on a GPU, memory bandwidth is not what limits the merge
    n_out, n_in = weight.shape
    rows = max(BLOCK_ALIGN, BLOCK_BYTES // (4 * max(n_in, 1)) // BLOCK_ALIGN * BLOCK_ALIGN)
    if rows >= n_out:
        return None  # one block: the whole-tensor path is the same work
    sig: list[Any] = [n_out, n_in, rows, str(weight.dtype), str(out.dtype)]
    for op in ops:
        if op.kind not in _BLOCKABLE:
            return None
        if op.kind == "lora":
            if op.fan_in_fan_out:
                return None
            sig.append(("lora", tuple(shape_of(op.tensors["A"])), tuple(shape_of(op.tensors["B"]))))
        else:
            l_shape = tuple(shape_of(op.tensors["l"]))
            if len(l_shape) != 2:
                return None
            l_shape = l_shape[::-1] if op.fan_in_fan_out else l_shape
            if l_shape not in ((n_out, 1), (1, n_in)):
                return None
            sig.append(("ia3", l_shape))
    return tuple(sig)


def _merge_blocked(
    weight: torch.Tensor, ops: Sequence[ModuleOp], t: Callable[[str], torch.Tensor], out: torch.Tensor, ws: Any, rows: int
) -> bool:
    """``ops`` applied block by block of rows, each block's float32 temporaries kept in cache.

    Per element, the same float32 operations in the same order as
    ``apply_ops``: (B @ A) * scale added to the float32 weight, IA3 vectors
    multiplied in, then one cast to ``out``'s dtype. Returns whether every
    output value is finite.
    """
    import torch

    n_out, n_in = weight.shape
    steps: list[tuple[str, torch.Tensor, torch.Tensor | None, float]] = []
    for op in ops:
        if op.kind == "lora":
            steps.append(("lora", t(op.tensors["A"]), t(op.tensors["B"]), op.scale))
        else:
            steps.append(("ia3", _T(t(op.tensors["l"]), op.fan_in_fan_out), None, 1.0))
    wbuf = ws.tensor("block_w", (rows, n_in), torch.float32)
    pbuf = ws.tensor("block_p", (rows, n_in), torch.float32)
    finite = True
    for i in range(0, n_out, rows):
        j = min(i + rows, n_out)
        w = wbuf[: j - i]
        w.copy_(weight[i:j])
        for kind, x, y, scale in steps:
            if kind == "lora":
                assert y is not None
                p = pbuf[: j - i]
                torch.matmul(y[i:j], x, out=p)
                p.mul_(scale)
                w.add_(p)
            else:
                w.mul_(x[i:j] if x.shape[0] == n_out else x)
        o = out[i:j]
        o.copy_(w)
        finite = finite and all_finite(o)
    return finite


def merge_into(
    out: torch.Tensor,
    weight: torch.Tensor,
    ops: Sequence[ModuleOp],
    get: TensorGetter,
    device: str | torch.device,
    *,
    ws: Any,
    extra: Mapping[str, torch.Tensor] | None = None,
    shape_of: Callable[[str], Sequence[int]] | None = None,
) -> bool:
    """Write ``apply_ops(weight, ops, ...)`` cast to ``out.dtype`` into ``out``; return whether it is all finite.

    On the CPU, LoRA and IA3 ops on a matrix taller than one block run block
    by block (``_merge_blocked``), which touches memory about a sixth as
    often. Whether a product computed in row blocks has the same bits as the
    whole product depends on the BLAS kernels, so the first tensor of every
    signature (shapes, dtypes, ops) is computed both ways and compared
    bytewise: a signature whose blocks differ is computed whole from then on.
    """
    import torch

    sig = _block_signature(weight, out, ops, shape_of, device) if shape_of is not None and not extra else None
    if sig is not None and _blocked_ok.get(sig) is not False:

        def t(key: str) -> torch.Tensor:
            return get(key).to(device=device, dtype=torch.float32)

        finite = _merge_blocked(weight, ops, t, out, ws, sig[2])
        if sig in _blocked_ok or not finite:
            return finite
        ref = apply_ops(weight, ops, get, device, extra=extra, ws=ws, check=False)
        # Compared a block at a time: a whole-tensor copy in out's dtype would
        # be one more tensor-sized buffer at peak.
        rows = sig[2]
        cmp = ws.tensor("block_cmp", (rows, out.shape[1]), out.dtype)
        same = True
        for i in range(0, out.shape[0], rows):
            c = cmp[: min(rows, out.shape[0] - i)]
            c.copy_(ref[i : i + rows])
            if not torch.equal(c, out[i : i + rows]):
                same = False
                break
        _blocked_ok[sig] = same
        if not same:
            out.copy_(ref)
        # The whole-tensor buffers served this one check: a signature that
        # passed never uses them again (two float32 tensors of RSS otherwise).
        ws.release("w", "delta", "block_cmp")
        return True if same else all_finite(out)
    out.copy_(apply_ops(weight, ops, get, device, extra=extra, ws=ws, check=False))
    return all_finite(out)
