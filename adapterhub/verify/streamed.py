"""``verify --streamed``: both models one decoder layer at a time.

The reference (the base's weights with the adapter applied unmerged, as PEFT
applies it: :mod:`adapter_apply`) and the candidate (its own weights,
dequantized as they are read: :mod:`weights`) each carry their hidden states
[sequences, positions, hidden] from layer to layer. Per layer, every module's
weights are mapped from the safetensors files, used and given back; so the
peak memory is about one layer of each model plus the activations, however big
the models are. After each layer the two hidden states are compared
(``--layers``), and a layer whose output is not finite is named. After the
last layer, the final norm and the head (read a slice of rows at a time) give
the logits, and the greedy decode runs on the same layer loop with a
key/value cache. The outputs go to the same judge as the whole-model path's.

Quantized candidates get a third stream, the same-recipe reference: per
module, base + adapter merged as PEFT merges them, quantized and dequantized
by bitsandbytes with the candidate's recipe.

>>> rep = verify("big-merged", "lora", "big-base", streamed=True)   # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import InvalidArtifactError, UsageError
from adapterhub.verify.adapter_apply import (
    AdapterWeights,
    ModuleAdapter,
    dora_linear,
    ia3_input,
    ia3_output,
    lora_embedding,
    lora_linear,
    merged_weight,
)
from adapterhub.verify.decoder import SUPPORTED, DecoderConfig, KVCache, decoder_layer, rms_norm, rotary
from adapterhub.verify.report import ModelRun, RunOutputs

if TYPE_CHECKING:
    import torch

    from adapterhub.verify.plan import VerifyPlan
    from adapterhub.verify.weights import WeightSource

HEAD_ROWS = 4096  # rows of the output head read at a time
_DT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def can_stream(base_cfg: dict[str, Any], base_dir: Path) -> bool:
    """Whether the streamed path computes this model: a supported causal decoder in safetensors."""
    archs = base_cfg.get("architectures") or []
    if base_cfg.get("model_type") not in SUPPORTED or not any(a.endswith("ForCausalLM") for a in archs):
        return False
    return any(base_dir.glob("*.safetensors"))


def layer_bytes(base_cfg: dict[str, Any], base_dir: Path, ref_bytes: int) -> int:
    """About one decoder layer of the reference, or 0 when the model cannot be streamed."""
    if not can_stream(base_cfg, base_dir):
        return 0
    return ref_bytes // max(1, int(base_cfg.get("num_hidden_layers") or 1))


def _dtype_of(cfg: dict[str, Any], weights: WeightSource, override: str | None) -> torch.dtype:
    """The dtype a model computes in: --dtype, else its config's, else its weights' majority."""
    import torch

    name = override or cfg.get("dtype") or cfg.get("torch_dtype")
    if name not in _DT:
        counts: dict[str, int] = {}
        for n in weights.keys():
            d = getattr(weights, "dtype", lambda _: "?")(n)
            counts[d] = counts.get(d, 0) + 1
        name = max((d for d in counts if d in _DT), key=counts.__getitem__, default="float32")
    return getattr(torch, name)


class Stream:
    """One model run layer by layer (see the module doc): its weights, dtype and hidden state."""

    def __init__(self, name: str, weights: WeightSource, dtype: torch.dtype, *, adapter: AdapterWeights | None = None,
                 merge: bool = False, requant: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                 compute: dict[str, torch.dtype] | None = None, device: str = "cpu") -> None:
        self.name, self.weights, self.dtype, self.device = name, weights, dtype, device
        self.adapter = adapter  # the reference: applied unmerged; the same-recipe stream: merged (``merge``)
        self.merge = merge
        self.requant = requant  # the same-recipe stream: module -> quantized-and-dequantized weight
        self.compute = compute or {}  # bitsandbytes candidates: module -> the dtype its layer computes in
        self.h: torch.Tensor | None = None
        self.cache = KVCache({}, {})
        self.nonfinite_layer: int | None = None
        self.seconds = 0.0
        self._touched: list[str] = []

    # ---------------------------------------------------------------- tensors

    def param(self, name: str, rows: slice | None = None, convert: bool = True) -> torch.Tensor | None:
        """A tensor (or its ``rows``) in the stream's dtype: the adapter's full
        replacement when it saved one, else the checkpoint's; None when neither has it."""
        if self.adapter is not None and name in self.adapter.replaced:
            t = self.adapter.tensor(self.adapter.replaced[name])
        elif name in self.weights:  # type: ignore[operator]
            t = self.weights.get(name)
            self._touched.append(name)
        else:
            return None
        if rows is not None:
            t = t[rows]
        t = t.to(self.device)  # a copy of this module's weights to the GPU; on the CPU, none
        return t.to(self.dtype) if convert and t.is_floating_point() and t.dtype != self.dtype else t

    def release(self) -> None:
        for n in self._touched:
            self.weights.release(n)
        self._touched.clear()

    def op(self, module: str) -> ModuleAdapter | None:
        return self.adapter.modules.get(module) if self.adapter is not None else None

    # ---------------------------------------------------------------- modules

    def linear(self, module: str, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """One linear layer as this stream computes it (see :class:`Stream`)."""
        import torch.nn.functional as F

        W = self.param(f"{module}.weight", None if self.merge else rows)
        if W is None:
            raise InvalidArtifactError(f"{module}.weight is missing from the {self.name}'s checkpoint")
        b = self.param(f"{module}.bias", rows)
        op = self.op(module)
        if self.merge:  # same-recipe: W merged as PEFT merges, then quantized as the candidate was
            W = merged_weight(W, op, self.adapter) if op is not None else W  # type: ignore[arg-type]
            if self.requant is not None:
                W = self.requant(module, W)
            W = W[rows] if rows is not None else W
            op = None
        if module in self.compute:  # a bitsandbytes layer computes in its compute dtype
            cd = self.compute[module]
            out = F.linear(x.to(cd), W.to(cd), b.to(cd) if b is not None else None).to(x.dtype)
        elif op is None:
            out = F.linear(x, W, b)
        elif op.kind == "ia3" and op.feedforward:
            out = F.linear(ia3_input(x, op, self.adapter), W, b)  # type: ignore[arg-type]
        else:
            out = F.linear(x, W, b)
            out = self._apply(op, x, out, W, b, rows)
        self.release()
        if op is not None and self.adapter is not None:
            self.adapter.release(op)
        return out

    def _apply(self, op: ModuleAdapter, x: torch.Tensor, out: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
               rows: slice | None) -> torch.Tensor:
        aw = self.adapter
        assert aw is not None
        if op.kind == "lora":
            return lora_linear(x, out, op, aw, rows)
        if op.kind == "dora":
            return dora_linear(x, out, W, b, op, aw, rows)
        if op.kind == "ia3":
            return ia3_output(out, op, aw, rows)
        raise InvalidArtifactError(f"{op.module}: a {op.kind} adapter on a linear layer")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        W = self.param("model.embed_tokens.weight", convert=False)  # rows are gathered, then converted
        if W is None:
            raise InvalidArtifactError(f"model.embed_tokens.weight is missing from the {self.name}'s checkpoint")
        if int(ids.max()) >= W.shape[0]:
            raise UsageError(f"the {self.name} has {W.shape[0]} token embeddings, the inputs use id {int(ids.max())}",
                             hint="verify it without --streamed")
        out = F.embedding(ids, W).to(self.dtype)
        op = self.op("model.embed_tokens")
        if op is not None and not self.merge:
            out = lora_embedding(ids, out, op, self.adapter)  # type: ignore[arg-type]
        elif op is not None:
            out = F.embedding(ids, merged_embedding(W.to(self.dtype), op, self.adapter))  # type: ignore[arg-type]
        self.release()
        return out

    def head(self, h: torch.Tensor, vocab: int) -> torch.Tensor:
        """Logits [P, vocab] in float32 for hidden states [P, H], the head read ``HEAD_ROWS`` rows at a time.
        A checkpoint without ``lm_head.weight`` has its head tied to the token embeddings."""
        import torch

        own = "lm_head.weight" in self.weights or (  # type: ignore[operator]
            self.adapter is not None and "lm_head.weight" in self.adapter.replaced
        )
        module = "lm_head" if own else "model.embed_tokens"
        if f"{module}.weight" in self.weights and self.weights.shape(f"{module}.weight")[0] < vocab:  # type: ignore[operator]
            raise UsageError(
                f"the {self.name}'s output head has {self.weights.shape(f'{module}.weight')[0]} rows for {vocab} tokens",
                hint="verify it without --streamed",
            )
        out = torch.empty((h.shape[0], vocab), dtype=torch.float32)  # on the CPU, for the judge
        for start in range(0, vocab, HEAD_ROWS):
            sl = slice(start, min(vocab, start + HEAD_ROWS))
            if own:
                out[:, sl] = self.linear(module, h, sl).float().cpu()
                continue
            W = self.param(f"{module}.weight", sl)
            if W is None:
                raise InvalidArtifactError(f"the {self.name} has neither lm_head.weight nor token embeddings")
            out[:, sl] = torch.nn.functional.linear(h, W).float().cpu()
            self.release()
        return out


def merged_embedding(W: torch.Tensor, op: ModuleAdapter, aw: AdapterWeights) -> torch.Tensor:
    """An embedding's LoRA merged as PEFT merges it (for the same-recipe stream)."""
    A, B = aw.tensor(op.tensors["A"]).float(), aw.tensor(op.tensors["B"]).float()
    return (W.float() + (B @ A).T * op.scale).to(W.dtype)


# --------------------------------------------------------------------------- checks and recipes


def return_freed_memory() -> None:
    """Have glibc's malloc give large freed blocks back to the kernel.

    By default its mmap threshold grows to the largest block freed so far, so
    the per-layer temporaries (a few MB each) end up in the heap, which keeps
    its peak; measured on the 0.94B benchmark model, the resident set then
    grows by about 15 MB a layer. A fixed 1 MB threshold serves those blocks
    with mmap and returns them on free. No effect off glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _layer_key(name: str) -> tuple[int, str]:
    import re

    m = re.match(r"model\.layers\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def check_match(base: WeightSource, cand: WeightSource, resized: bool) -> None:
    """Refuse a candidate whose tensors (names, layer count, shapes) differ from the base's, naming the first difference."""
    hint = "pass the --base the candidate was made from"
    b_names, c_names = set(base.keys()), set(cand.keys())
    for name in sorted(b_names | c_names, key=_layer_key):
        if name == "lm_head.weight" and (name not in b_names or name not in c_names):
            continue  # a head tied to the embeddings is saved by some writers and not by others
        if name not in c_names:
            raise InvalidArtifactError(f"the candidate does not match the base: {name} is missing from the candidate", hint=hint)
        if name not in b_names:
            raise InvalidArtifactError(f"the candidate does not match the base: it has {name}, which the base has not", hint=hint)
        bs, cs = tuple(base.shape(name)), tuple(cand.shape(name))
        if bs != cs and not (resized and len(bs) == 2 and bs[1:] == cs[1:]):
            raise InvalidArtifactError(
                f"the candidate does not match the base: {name} is {list(cs)} in the candidate, {list(bs)} in the base",
                hint=hint,
            )


def requantizer(recipe: dict[str, Any], modules: set[str]) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """module, W -> dequant(quant(W)) with the candidate's recipe, as transformers + bitsandbytes quantize on load."""
    import torch

    try:
        import bitsandbytes.functional as F
    except ImportError:
        raise UsageError("the candidate is a bitsandbytes checkpoint, and bitsandbytes is not installed") from None
    from adapterhub.converters.formats.qlora import QuantSpec, quantize_roundtrip

    def requant(module: str, W: torch.Tensor) -> torch.Tensor:
        if module not in modules:
            return W
        if recipe["quant_type"] == "int8":  # Int8Params._quantize: row-wise absmax of the float16 weight
            CB, SCB, _ = F.int8_vectorwise_quant(W.contiguous().to(torch.float16))
            return F.int8_vectorwise_dequant(CB, SCB).to(W.dtype)
        spec = QuantSpec(recipe["quant_type"], int(recipe.get("blocksize") or 64), bool(recipe.get("double_quant")))
        return quantize_roundtrip(W, spec).to(W.dtype)  # Params4bit._quantize, then dequantized

    return requant


# --------------------------------------------------------------------------- the runner


class StreamedRunner:
    """Runs the plan's streams layer by layer (see the module doc) and hands the outputs to the judge."""

    def __init__(self, plan: VerifyPlan, progress: Callable[[str, int], Any] | None = None) -> None:
        if not plan.causal:
            raise UsageError("--streamed runs decoder (causal LM) models; this one is an encoder",
                             hint="verify it without --streamed")
        self.plan = plan
        self.cfg = DecoderConfig.from_config(plan.base_cfg)
        longest = max(len(s) for s in plan.inputs.seqs) + plan.inputs.decode
        if self.cfg.sliding_window and longest > self.cfg.sliding_window:
            raise UsageError(f"--streamed attends over whole sequences; {longest} tokens exceed the sliding window "
                             f"of {self.cfg.sliding_window}", hint="use shorter prompts, or verify without --streamed")
        self.progress = progress
        self.streams: list[Stream] = []
        self._rot: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    def _open(self) -> list[Any]:
        """The streams, and what to close after the run."""
        import torch

        from adapterhub.verify.weights import SafetensorsWeights

        p = self.plan
        base = SafetensorsWeights(p.base_dir)
        cand = p.loader.weights(p.cand_dir, p.cand_cfg, p.fmt)
        check_match(base, cand, p.resized_vocab is not None)
        adapter = AdapterWeights(p.adapter_dir, device=p.device)
        ref = Stream("reference", base, _dtype_of(p.base_cfg, base, p.dtype), adapter=adapter, device=p.device)
        c_dtype = _dtype_of(p.cand_cfg, cand, p.dtype)
        quantized = set(getattr(cand, "quantized", {}) or ())
        cd = (p.recipe or {}).get("compute_dtype")
        compute = {m: getattr(torch, cd) if cd in _DT else c_dtype for m in quantized}
        self.streams = [ref, Stream("candidate", cand, c_dtype, compute=compute, device=p.device)]
        if p.want_same_recipe and p.recipe is not None:
            dtype = getattr(torch, p.dtype or p.recipe["dtype"])
            self.streams.append(Stream("same_recipe", base, dtype, adapter=adapter, merge=True,
                                       requant=requantizer(p.recipe, quantized), compute=compute, device=p.device))
        return [base, cand, adapter]

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary(self.cfg, positions, dtype)

    def _layer(self, s: Stream, i: int, rot: dict[Any, Any], keep: list[int] | None, step: bool) -> None:
        t = time.perf_counter()
        cos, sin = rot[s.dtype]
        cache = s.cache if (keep is not None or step) else None
        s.h = decoder_layer(self.cfg, i, s.h, s.linear, s.param, cos, sin, cache, keep, step)  # type: ignore[arg-type]
        s.release()
        s.seconds += time.perf_counter() - t

    def _final(self, s: Stream, h: torch.Tensor) -> torch.Tensor:
        w = s.param("model.norm.weight")
        if w is None:
            raise InvalidArtifactError(f"model.norm.weight is missing from the {s.name}'s checkpoint")
        out = rms_norm(h, w, self.cfg.eps)
        s.release()
        return out

    def _prefill(self, bar: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, torch.Tensor]:
        """Every stream over every sequence, layer by layer: (logits at real positions, layer rows, mask)."""
        import torch

        from adapterhub.verify import metrics as vm
        from adapterhub.verify.inputs import pad

        p = self.plan
        ids, mask = pad(p.inputs.seqs, p.inputs.pad_id)
        mask = mask.bool()
        dev = p.device
        ids, dmask = ids.to(dev), mask.to(dev)
        positions = torch.arange(ids.shape[1], device=dev).expand(ids.shape[0], -1)
        rot = {s.dtype: self._rotary(positions, s.dtype) for s in self.streams}
        keep = [len(x) for x in p.inputs.decode_seqs] if p.inputs.decode else None
        for s in self.streams:
            t = time.perf_counter()
            s.h = s.embed(ids)
            s.seconds += time.perf_counter() - t
        ref, cand = self.streams[0], self.streams[1]
        rows = [vm.layer_row(0, ref.h.cpu(), cand.h.cpu(), mask)] if p.layers else []  # type: ignore[union-attr]
        finals: dict[str, torch.Tensor] = {}
        for i in range(self.cfg.layers):
            for s in self.streams:
                self._layer(s, i, rot, keep if s.name != "same_recipe" else None, False)
                if s.nonfinite_layer is None and not bool(torch.isfinite(s.h[dmask]).all()):  # type: ignore[index]
                    s.nonfinite_layer = i
            last = i == self.cfg.layers - 1
            if last:
                finals = {s.name: self._final(s, s.h) for s in self.streams}  # type: ignore[arg-type]
            if p.layers:
                a, b = (finals["reference"], finals["candidate"]) if last else (ref.h, cand.h)
                rows.append(vm.layer_row(i + 1, a.cpu(), b.cpu(), mask))
            bar.update(1)
        logits = {}
        for s in self.streams:
            t = time.perf_counter()
            logits[s.name] = s.head(finals[s.name][dmask], p.vocab)
            s.h = None
            s.seconds += time.perf_counter() - t
        layer_rows = vm.drift_summary(rows, p.bounds.tolerance.get("rel")) if p.layers else None
        return logits, layer_rows, mask

    def _decode(self, logits: dict[str, torch.Tensor], mask: torch.Tensor, bar: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Greedy tokens of the decoded sequences, per stream, on the prefill's key/value cache;
        and per step the top token's lead over the runner-up."""
        import torch

        from adapterhub.verify.run import top_gap

        p = self.plan
        lens = [len(x) for x in p.inputs.decode_seqs]
        ends = (torch.cumsum(mask.sum(1), 0) - 1)[: len(lens)].tolist()
        streams = [s for s in self.streams if s.name != "same_recipe"]
        tokens: dict[str, list[list[int]]] = {s.name: [[] for _ in lens] for s in streams}
        gaps: dict[str, list[list[float]]] = {s.name: [[] for _ in lens] for s in streams}
        alive = {s.name: [True for _ in lens] for s in streams}

        def take(s: Stream, lg: torch.Tensor) -> None:
            for r in range(len(lens)):
                if alive[s.name][r] and bool(torch.isfinite(lg[r]).all()):
                    tokens[s.name][r].append(int(lg[r].argmax()))
                    gaps[s.name][r].append(top_gap(lg[r]))
                else:
                    alive[s.name][r] = False

        for s in streams:
            take(s, logits[s.name][ends])
        for step in range(1, p.inputs.decode):
            positions = torch.tensor([[n + step - 1] for n in lens], device=p.device)
            rot = {s.dtype: self._rotary(positions, s.dtype) for s in streams}
            for s in streams:
                ids = torch.tensor([[t[-1] if t else 0] for t in tokens[s.name]], device=p.device)
                s.h = s.embed(ids)
            for i in range(self.cfg.layers):
                for s in streams:
                    self._layer(s, i, rot, None, True)
            for s in streams:
                t = time.perf_counter()
                take(s, s.head(self._final(s, s.h)[:, -1], p.vocab))  # type: ignore[arg-type]
                s.seconds += time.perf_counter() - t
            bar.update(1)
        return tokens, gaps

    def run(self) -> RunOutputs:
        import torch

        from adapterhub.verify.run import NullBar

        p = self.plan
        steps = self.cfg.layers + max(0, p.inputs.decode - 1)
        bar = (self.progress or (lambda desc, total: NullBar()))("verifying (streamed)", steps)
        return_freed_memory()
        closing = self._open()
        try:
            with torch.inference_mode():
                logits, layer_rows, mask = self._prefill(bar)
                decoded, gaps = self._decode(logits, mask, bar) if p.inputs.decode else ({}, {})
        finally:
            bar.close()
            for c in closing:
                c.close()
        runs = {
            s.name: ModelRun(logits[s.name].unsqueeze(0), None, decoded.get(s.name), 0.0, s.seconds, gaps.get(s.name))
            for s in self.streams
        }
        dtypes = {s.name: str(s.dtype).removeprefix("torch.") for s in self.streams}
        nonfinite = {s.name: s.nonfinite_layer for s in self.streams if s.nonfinite_layer is not None}
        real = torch.ones((1, int(mask.sum())), dtype=torch.bool)
        return RunOutputs(runs, real, dtypes, len(p.inputs.seqs), layer_rows=layer_rows, nonfinite_layer=nonfinite)
