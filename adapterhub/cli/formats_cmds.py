"""convert: one artifact into another format (``--to gguf``, ...).

``--to`` picks a row of ``TARGETS``: a function that takes SRC and the
parsed options and returns a ``ConversionResult``. A new target adds a row
(and its own options, which ``OPTIONS_FOR`` ties to the targets that read
them, so a misplaced option is a usage error rather than silently ignored).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from adapterhub.cli import extract_cmds
from adapterhub.cli._output import Output, echo, human_size, json_option, quiet_option
from adapterhub.cli.convert_cmds import (
    _description_option,
    _force_option,
    _out_option,
    _print_result,
    _push_option,
    _require_sig_option,
    _sign_option,
    _tag_option,
)

GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def _to_gguf(src: str, opts: dict[str, Any], common: dict[str, Any]) -> Any:
    from adapterhub.convert.gguf import to_gguf

    return to_gguf(
        src, base=opts["base"], outtype=opts["outtype"], tokenizer_pre=opts["tokenizer_pre"],
        modelfile=opts["modelfile"], **common,
    )


#: --to NAME -> the conversion.
TARGETS: dict[str, Callable[[str, dict[str, Any], dict[str, Any]], Any]] = {
    "gguf": _to_gguf,
    "mlx": extract_cmds.to_mlx_target,
    "peft": extract_cmds.to_peft_target,
    "lora": extract_cmds.to_lora_target,
}
#: option -> the targets that read it (options not listed are read by every target).
OPTIONS_FOR: dict[str, tuple[str, ...]] = {
    "outtype": ("gguf",),
    "tokenizer_pre": ("gguf",),
    "modelfile": ("gguf",),
    "rank": ("lora",),
    "energy": ("lora",),
    "svd": ("lora",),
}


def print_gguf(res: Any, o: Output) -> None:
    """The conversion result, then what the GGUF holds (human output only)."""
    _print_result(res, o)
    if o.json or o.quiet:
        return
    rep = res.report.to_dict()
    types = ", ".join(f"{n} {t}" for t, n in rep["tensor_types"].items())
    echo(f"{rep['kind']} GGUF for {rep['architecture']}: {rep['tensors_written']} tensors ({types}), {human_size(rep['bytes_written'])} of tensor data")
    if rep.get("tokenizer"):
        tk = rep["tokenizer"]
        echo(f"tokenizer: {tk['kind']} ({tk['tokens']} tokens, pre-tokenizer {tk['pre']}){', chat template' if tk['chat_template'] else ''}")
    if rep.get("lora"):
        lo = rep["lora"]
        echo(
            f"LoRA: {lo['modules']} modules, ranks {lo['ranks']}, alpha {lo['alpha']:g}"
            + (f"; per-module scales folded into lora_b for {lo['scales_folded_into_b']}" if lo["scales_folded_into_b"] else "")
        )
    if "Modelfile" in rep.get("files", []):
        echo("Modelfile written beside it: `ollama create NAME -f Modelfile`")


@click.command(name="convert")
@click.argument("src")
@click.option("--to", "to", type=click.Choice(sorted(TARGETS)), required=True, help="The format to convert into.")
@click.option("--base", "-b", help="For an adapter: its base model (dir, registry ref or cached Hub id; only its config is read). Default: the adapter's base_model_name_or_path.")
@click.option(
    "--outtype", type=click.Choice(GGUF_OUTTYPES),
    help="GGUF tensor type (default f16 for a model, f32 for a LoRA). Norms stay f32; rows that are not whole blocks fall back to f16.",
)
@click.option("--tokenizer-pre", metavar="NAME", help="GGUF: the BPE pre-tokenizer family when it is not recognised (llama-bpe, qwen2, gpt-2, ...).")
@click.option("--modelfile", is_flag=True, help="GGUF model: also write an Ollama Modelfile beside it (FROM, TEMPLATE).")
@extract_cmds.rank_option
@extract_cmds.energy_option
@click.option("--svd", type=click.Choice(["randomized", "exact"]), help="--to lora: the SVD (default randomized; its error is reported).")
@_out_option
@_push_option
@_force_option
@_tag_option
@_description_option
@_require_sig_option
@_sign_option
@json_option
@quiet_option
def formats_convert(src, to, base, outtype, tokenizer_pre, modelfile, rank, energy, svd, out, push, force, tags, description, require_signature, sign, json_, quiet):
    """Convert SRC into another format: a checkpoint or a PEFT LoRA to GGUF.

    SRC may be a directory, a registry ref or a Hub model id already in the
    local Hugging Face cache. A checkpoint (Llama, Mistral, Qwen2, Qwen3,
    Phi-3) becomes one GGUF model file with its tokenizer, that llama.cpp,
    Ollama and LM Studio load. A PEFT LoRA becomes a GGUF LoRA for its base,
    with PEFT's exact per-module scales (rsLoRA, rank and alpha patterns).
    Tensors are streamed one at a time; OUT appears only when complete.
    --to mlx writes an mlx-lm adapter, --to peft reads one back, --to lora
    turns DoRA, IA3, LoHa, LoKr, AdaLoRA or VeRA into a plain LoRA by SVD
    (--rank or --energy, --base; the error is reported).

    \b
    Examples:
      adapterhub convert ./qa-merged --to gguf --outtype q8_0 -o qa.q8_0.gguf --modelfile
      adapterhub convert team/qa-lora:3 --to gguf --base ./Llama-2-7b-hf -o qa-lora.gguf
      adapterhub convert team/qa-merged --to gguf --push team/qa-gguf
      adapterhub convert ./qa-lora --to mlx --base ./Llama-2-7b-hf -o ./qa-mlx
      adapterhub convert ./qa-mlx --to peft --base ./Llama-2-7b-hf -o ./qa-peft
      adapterhub convert ./qa-dora --to lora --rank 32 --base ./Llama-2-7b-hf -o ./qa-lora32
    """
    from adapterhub.errors import UsageError

    given = {"outtype": outtype, "tokenizer_pre": tokenizer_pre, "modelfile": modelfile, "rank": rank, "energy": energy, "svd": svd}
    for opt, targets in OPTIONS_FOR.items():
        if given.get(opt) and to not in targets:
            raise UsageError(f"--{opt.replace('_', '-')} applies to --to {'/'.join(targets)}, not --to {to}")
    o = Output(json_, quiet)
    common = dict(
        out=out, push=push, force=force, tags=tags, description=description, progress=o.progress,
        require_signature=require_signature, sign=sign,
    )
    res = TARGETS[to](src, {"base": base, **given}, common)
    printers = {"gguf": print_gguf, "lora": extract_cmds.print_extraction, "mlx": extract_cmds.print_mlx, "peft": extract_cmds.print_mlx}
    printers.get(to, _print_result)(res, o)


def merge_gguf(args: dict[str, Any]) -> None:
    """``merge ... --to gguf``: the merge command's arguments (its locals) -> one GGUF file."""
    from adapterhub.convert.gguf import merge_to_gguf
    from adapterhub.errors import UsageError

    if args["to"] != "gguf":
        raise UsageError("--outtype and --modelfile apply to --to gguf")
    for opt, flag in (("dtype", "--dtype"), ("quantize_to", "--quantize"), ("double_quant", "--double-quant")):
        if args[opt]:
            raise UsageError(f"{flag} applies to a safetensors merge; with --to gguf the type is --outtype")
    o = Output(args["json_"], args["quiet"])
    res = merge_to_gguf(
        args["adapter"], args["base"], outtype=args["outtype"] or "q8_0", out=args["out"], push=args["push"],
        device=args["device"], qlora_base=args["qlora_base"], force=args["force"], modelfile=args["modelfile"],
        tags=args["tags"], description=args["description"], progress=o.progress,
        require_signature=args["require_signature"], sign=args["sign"],
    )
    print_gguf(res, o)
