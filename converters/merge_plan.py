"""A merge, planned before the first byte is written: inputs opened, configs checked, every output spec known.

``prepare_merge(adapter, base)`` reads the adapter's config and tensor
names and shapes, the base's ``config.json`` and safetensors headers, and
returns a ``PreparedMerge``: the ``MergePlan`` (``formats.peft_math``), the
output specs, and for ``qlora_base="dequantized"`` the weights to requantize.
No tensor data of the base is read, so a wrong base fails here.
``PreparedMerge.iter_tensors`` then yields the merged tensors in output order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError, NotFoundError

from adapterhub.converters.formats import peft_math
from adapterhub.converters.formats.safetensors_io import FileMap, FileSpan, TensorSource, TensorSpec, Workspace

if TYPE_CHECKING:
    import torch

# --------------------------------------------------------------------------- inputs


class _DictSource:
    """An adapter held in memory (legacy ``adapter_model.bin``), with TensorSource's read API."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._t = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._t)

    def spec(self, name: str) -> TensorSpec:
        t = self._t[name]
        return TensorSpec(name, tuple(t.shape), t.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._t[name]


def _read_json(files: FileMap, rel: str, what: str) -> dict[str, Any]:
    if rel not in files:
        raise NotFoundError(f"{what} has no {rel}")
    from adapterhub import jsonio

    data = jsonio.read_json(files[rel], what=f"{what} {rel}", expect=None)  # size- and depth-capped
    if not isinstance(data, dict):
        raise InvalidArtifactError(f"{what} {rel}: not a JSON object")
    return data


# torch.load(weights_only=True) wraps the one line that says what it refused in these.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def open_adapter(files: FileMap) -> tuple[dict[str, Any], TensorSource | _DictSource]:
    """The adapter's config and tensors (safetensors, or a legacy pickle loaded with weights_only)."""
    config = _read_json(files, "adapter_config.json", "the adapter")
    peft_math.check_mergeable(config)  # prompt tuning etc. fail here, before looking at weights
    if "adapter_model.safetensors" in files:
        return config, TensorSource(files, weights=["adapter_model.safetensors"])
    if "adapter_model.bin" in files:
        import torch

        try:
            sd = torch.load(str(files["adapter_model.bin"]), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors come in many types; torch's span many lines
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
            why = next((ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)), lines[0].split(". ")[0])
            raise InvalidArtifactError(
                f"adapter_model.bin: refused or unreadable pickle ({why})",
                hint="convert the adapter's weights to safetensors",
            ) from None
        if not isinstance(sd, dict):
            raise InvalidArtifactError("adapter_model.bin does not hold a state dict")
        return config, _DictSource(sd)
    raise NotFoundError("the adapter has no adapter_model.safetensors (or adapter_model.bin)")


def check_base_config(config: Mapping[str, Any]) -> None:
    """Refuse quantized bases: a merge needs the 16-bit weights."""
    qc = config.get("quantization_config")
    if isinstance(qc, Mapping):
        method = str(qc.get("quant_method", "unknown"))
        if method == "bitsandbytes":
            bits = "4-bit" if qc.get("load_in_4bit") else "8-bit" if qc.get("load_in_8bit") else "quantized"
            raise InvalidArtifactError(
                f"the base is a bitsandbytes {bits} checkpoint; merging needs 16-bit weights",
                hint="run `adapterhub dequantize BASE -o BASE-bf16` and merge into that "
                "(use --qlora-base dequantized to merge as a QLoRA adapter saw the weights)",
            )
        raise InvalidArtifactError(
            f"the base is quantized ({method}); merging needs 16-bit weights", hint="merge into the unquantized base model"
        )


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArtifactError("--device cuda: no CUDA device is available", hint="use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidArtifactError(f"unknown device {device!r} (auto, cpu or cuda)")
    return device


_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).removeprefix("torch."))
    if name is None:
        raise InvalidArtifactError(f"unknown dtype {dtype!r} (bfloat16, float16 or float32)")
    return getattr(torch, name)


# --------------------------------------------------------------------------- plan


@dataclass
class PreparedMerge:
    """Everything decided before the first byte is written."""

    adapter_config: dict[str, Any]
    base_config: dict[str, Any]
    plan: peft_math.MergePlan
    adapter: TensorSource | _DictSource
    base: TensorSource
    specs: list[TensorSpec]
    dtype: torch.dtype | None
    qlora_base: str
    quant: peft_math.QuantSpec | None
    requantize: frozenset[str]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    requantize_conv1d: frozenset[str] = frozenset()  # stored (in, out): quantized transposed, as transformers does

    def passthrough(self, index: int) -> bool:
        """True if output tensor ``index`` is the base tensor's bytes, unchanged."""
        tp, spec = self.plan.tensors[index], self.specs[index]
        return not tp.ops and tp.name not in self.requantize and spec.dtype == self.base.spec(tp.source).dtype

    def iter_tensors(
        self,
        device: str,
        progress: Any = None,
        *,
        spans: bool = False,
        exclude: frozenset[str] = frozenset(),
        out_buffers: int = 0,
    ) -> Iterator[tuple[str, torch.Tensor | FileSpan]]:
        """Yield (name, merged tensor on the CPU) in output order, one at a time.

        Every tensor yielded is a view of a reused buffer: write it (or copy
        it) before asking for the next one. With ``spans``, a tensor that
        passes through unchanged (and is not in ``exclude``) is yielded as the
        ``FileSpan`` of its bytes in the base, for a file-to-file copy.

        With ``out_buffers=n`` every tensor is yielded in its own output
        buffer, taken in turn from ``n``: tensor ``i`` stays intact until
        tensor ``i + n`` is computed, so a writer thread can still be writing
        it while the next one is merged.
        """
        from concurrent.futures import Future, ThreadPoolExecutor

        cpu = Workspace("cpu")
        dev = cpu if device == "cpu" else Workspace(device)
        # The tensors read from the base, in order. A reader thread reads the
        # next one (pread drops the GIL) while this one is merged, into the
        # other of two input buffers: tensor k's buffer is read into again
        # only once tensor k+1 has been asked for.
        reads = [
            i for i in range(len(self.specs))
            if not (spans and self.specs[i].name not in exclude and self.passthrough(i))
        ]
        pending: dict[int, Future[torch.Tensor]] = {}
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterhub-read")

        def prefetch(k: int) -> None:
            if k < len(reads):
                source = self.plan.tensors[reads[k]].source
                pending[reads[k]] = reader.submit(self.base.read_into, source, cpu, f"in{k % 2}")

        try:
            prefetch(0)
            k = 0
            for i, (spec, tp) in enumerate(zip(self.specs, self.plan.tensors)):
                if k >= len(reads) or reads[k] != i:
                    yield spec.name, self.base.span(tp.source)
                    if progress is not None:
                        progress.update(spec.nbytes)
                    continue
                t = pending.pop(i).result()
                k += 1
                prefetch(k)
                out = self._merge_one(i, spec, tp, t, device, cpu, dev, out_buffers)
                del t
                yield spec.name, out
                del out
                if progress is not None:
                    progress.update(spec.nbytes)
        finally:
            for f in pending.values():
                f.cancel()
            reader.shutdown(wait=True)  # a read in flight writes into our buffer

    def _merge_one(
        self, i: int, spec: TensorSpec, tp: peft_math.TensorPlan, t: torch.Tensor, device: str,
        cpu: Workspace, dev: Workspace, out_buffers: int,
    ) -> torch.Tensor:
        """Output tensor ``i`` (on the CPU, in a workspace buffer) from its base tensor ``t``."""
        role = f"out{i % out_buffers}" if out_buffers else "out"
        if tp.name in self.requantize:
            if tp.name in self.requantize_conv1d:
                t = peft_math.quantize_roundtrip(t.T, self.quant, device=device).T
            else:
                t = peft_math.quantize_roundtrip(t, self.quant, device=device)
        if tp.ops:
            # One finiteness test, on the output: inf/NaN from any op
            # survives the cast, and so does an overflow of the cast.
            out = dev.tensor(role, spec.shape, spec.dtype)
            finite = peft_math.merge_into(
                out, t, tp.ops, self.adapter.get, device, ws=dev, extra=self.extra,
                shape_of=lambda k: self.adapter.spec(k).shape,
            )
            if not finite:
                # Again, op by op, to name the adapter parameter that broke it.
                peft_math.apply_ops(t, tp.ops, self.adapter.get, device, extra=self.extra)
                raise InvalidArtifactError(
                    f"{tp.ops[-1].module}: the merged {tp.name} overflows {spec.dtype} (non-finite values)",
                    hint="nothing was written; try --dtype float32 or bfloat16",
                )
        elif t.dtype == spec.dtype and not out_buffers:
            out = t
        else:
            out = dev.tensor(role, t.shape, spec.dtype)
            out.copy_(t)
        if out.device.type != "cpu":
            host = cpu.tensor(f"host{role}", out.shape, out.dtype)
            host.copy_(out)
            out = host
        return out


def prepare_merge(
    adapter: FileMap,
    base: FileMap,
    *,
    dtype: Any = None,
    qlora_base: str = "original",
) -> PreparedMerge:
    """Read configs, names and shapes; check everything; return the plan (reads no tensor data of the base)."""
    if qlora_base not in ("original", "dequantized"):
        raise InvalidArtifactError(f"qlora_base must be original or dequantized, not {qlora_base!r}")
    adapter_config, asrc = open_adapter(adapter)
    base_config = _read_json(base, "config.json", "the base")
    check_base_config(base_config)
    bsrc = TensorSource(base)
    if any(k.endswith((".absmax", ".SCB", ".quant_map")) or ".quant_state." in k for k in bsrc.keys()):
        raise InvalidArtifactError(
            "the base holds bitsandbytes-quantized tensors; merging needs 16-bit weights",
            hint="run `adapterhub dequantize BASE -o BASE-bf16` and merge into that",
        )
    out_dtype = _resolve_dtype(dtype)

    ashapes = {k: asrc.spec(k).shape for k in asrc.keys()}
    aplan = peft_math.parse_adapter(adapter_config, ashapes)
    bshapes = {k: bsrc.spec(k).shape for k in bsrc.keys()}
    plan = peft_math.resolve_plan(aplan, bshapes, base_config)
    warnings = list(plan.warnings)

    extra: dict[str, torch.Tensor] = {}
    if plan.method == "VERA":
        if "base_model.vera_A" in ashapes:
            peft_math.check_vera_projections(plan, ashapes)
        else:
            extra = peft_math.vera_projections(plan, int(adapter_config.get("r", 256)), int(adapter_config.get("projection_prng_key", 0)))

    specs = []
    for tp in plan.tensors:
        src_dtype = bsrc.spec(tp.source).dtype
        d = out_dtype if (out_dtype is not None and src_dtype.is_floating_point) else src_dtype
        specs.append(TensorSpec(tp.name, tp.shape, d))

    card = None
    if "README.md" in adapter:
        try:
            card = Path(adapter["README.md"]).read_text(encoding="utf-8", errors="replace")
        except OSError:
            card = None
    detected = peft_math.detect_qlora(adapter_config, card)
    quant: peft_math.QuantSpec | None = None
    requantize: frozenset[str] = frozenset()
    conv1d: frozenset[str] = frozenset()
    if qlora_base == "dequantized":
        if detected is not None:
            quant = detected
        else:
            quant = peft_math.QuantSpec(source="default")
            warnings.append(
                "the adapter does not record how its base was quantized; assumed NF4, block size 64, double quantization"
            )
        from adapterhub.converters.formats.bnb import QuantSettings, Quantizer, is_conv1d

        # The same rule `adapterhub quantize` uses, checked against transformers:
        # the weights transformers would have loaded in 4-bit for training.
        qz = Quantizer(QuantSettings(quant.quant_type, double_quant=quant.double_quant), base_config)
        requantize = frozenset(
            tp.name
            for tp in plan.tensors
            if tp.name == tp.source
            and not any(op.kind == "replace" for op in tp.ops)
            and bsrc.spec(tp.source).dtype.is_floating_point
            and qz.wants(TensorSpec(tp.name, tp.shape, bsrc.spec(tp.source).dtype))
        )
        conv1d = frozenset(n for n in requantize if is_conv1d(n.removesuffix(".weight"), base_config))
    elif detected is not None:
        warnings.append(
            f"the adapter was trained on a {detected.quant_type} 4-bit base ({detected.source}) and was merged into the "
            "original weights; --qlora-base dequantized merges into the weights it saw in training"
        )
    return PreparedMerge(
        adapter_config, base_config, plan, asrc, bsrc, specs, out_dtype, qlora_base, quant, requantize, extra, warnings,
        requantize_conv1d=conv1d,
    )
