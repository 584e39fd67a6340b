"""merge, quantize, dequantize: streaming conversions with lineage."""

from __future__ import annotations

from pathlib import Path

import click

from adapterhub.cli._output import (
    Output,
    echo,
    human_size,
    json_option,
    quiet_option,
)

_out_option = click.option(
    "--out", "-o", type=click.Path(path_type=Path),
    help="Write the result into this directory (with --push too: write OUT, then push it).",
)
_push_option = click.option("--push", metavar="NAME[:VERSION]", help="Store the result in the registry, with its lineage.")
_description_option = click.option("--description", "-d", help="With --push: a line describing the output (searchable).")
_force_option = click.option("--force", "-f", is_flag=True, help="Replace OUT if it exists (only once the new output is complete).")
_device_option = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
    help="Where the arithmetic runs; auto uses a GPU when there is one.",
)
_tag_option = click.option("--tag", "-t", "tags", multiple=True, help="With --push: also set this tag (repeatable).")
_require_sig_option = click.option(
    "--require-signature", is_flag=True, help="Refuse inputs without a valid signature by a trusted key (exit 8)."
)
_sign_option = click.option(
    "--sign/--no-sign", "sign", default=None,
    help="With --push: sign the output and its provenance (default: when you have a default key).",
)


def _print_result(res, out: Output) -> None:
    for w in getattr(res.report, "warnings", ()) or ():
        out.warn(w)

    def human():
        rep = res.report.to_dict() if hasattr(res.report, "to_dict") else {}
        facts = ", ".join(
            f"{k.replace('_', ' ')} {v}" for k, v in rep.items()
            if k in ("modules_merged", "tensors_written", "tensors_quantized", "device", "dtype", "qlora_base", "to") and v is not None
        )
        if res.out:
            echo(f"{res.operation}: wrote {res.out}" + (f" ({facts})" if facts else ""))
        if res.pushed:
            p = res.pushed
            if p.created:
                echo(f"pushed {p.ref}  {p.digest[:19]}  {p.file_count} files, {human_size(p.size)}")
            else:  # a deterministic conversion of the same inputs: the same bytes
                echo(f"unchanged: {p.ref} already holds this content ({p.digest[:19]})")
            echo(f"lineage: {', '.join(f'{k} {v.describe()}' for k, v in res.inputs.items())}")
        if res.signed and res.signed.get("skipped"):
            out.warn(f"not signed: {res.signed['skipped']}")
        elif res.signed:
            echo(f"signed (files and provenance) with key {res.signed['key_name']} ({res.signed['key_id'][:16]})")
        echo(f"took {res.seconds:.1f} s")

    out.result(res.to_dict(), human)


@click.command(name="merge")
@click.argument("adapter")
@click.option("--base", "-b", help="Base model: a directory, registry ref or cached Hub id (default: the adapter's base_model_name_or_path).")
@_out_option
@_push_option
@_device_option
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), help="Output dtype (default: the base's).")
@click.option(
    "--qlora-base", type=click.Choice(["original", "dequantized"]), default="original", show_default=True,
    help="Merge into W, or into dequant(quant_nf4(W)) as a QLoRA adapter saw it in training.",
)
@click.option("--quantize", "quantize_to", type=click.Choice(["nf4", "fp4", "int8"]), help="Quantize while merging (no 16-bit copy on disk).")
@click.option("--double-quant", is_flag=True, help="With --quantize nf4/fp4: quantize the absmax too (refused without --quantize).")
@click.option("--compute-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--to", "to", type=click.Choice(["safetensors", "gguf"]), default="safetensors", show_default=True, help="gguf: write one GGUF file (-o OUT.gguf) in the same pass, no 16-bit copy on disk.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]), help="With --to gguf: the GGUF tensor type (default q8_0).")
@click.option("--modelfile", is_flag=True, help="With --to gguf: also write an Ollama Modelfile beside OUT.")
@_force_option
@_tag_option
@_description_option
@_require_sig_option
@_sign_option
@json_option
@quiet_option
def convert_merge(adapter, base, out, push, device, dtype, qlora_base, quantize_to, double_quant, compute_dtype, to, outtype, modelfile, force, tags, description, require_signature, sign, json_, quiet):
    """Merge an adapter into its base, streaming one tensor at a time.

    ADAPTER and --base may each be a directory, a registry ref or a Hub model
    id already in the local Hugging Face cache. The arithmetic matches PEFT's
    merge_and_unload; it runs in fp32 and is cast back to the base dtype.
    Memory stays bounded by one tensor, and the output appears only when it
    is complete.

    \b
    Examples:
      adapterhub merge ./qa-lora --base ./Llama-2-7b-hf -o ./qa-merged
      adapterhub merge team/qa-lora:3 --push team/qa-merged
      adapterhub merge team/qa-lora --quantize nf4 --push team/qa-nf4 --qlora-base dequantized
      adapterhub merge team/qa-lora --to gguf --outtype q8_0 -o qa.q8_0.gguf
    """
    if to == "gguf" or outtype or modelfile:
        from adapterhub.cli.formats_cmds import merge_gguf

        return merge_gguf(locals())
    from adapterhub.convert import merge

    o = Output(json_, quiet)
    res = merge(
        adapter, base, out=out, push=push, device=device, dtype=dtype, qlora_base=qlora_base,
        quantize=quantize_to, double_quant=double_quant, compute_dtype=compute_dtype, force=force,
        tags=tags, description=description, progress=o.progress, require_signature=require_signature, sign=sign,
    )
    _print_result(res, o)


@click.command(name="quantize")
@click.argument("model")
@click.option("--to", "to", type=click.Choice(["nf4", "fp4", "int8"]), default="nf4", show_default=True)
@_out_option
@_push_option
@click.option("--double-quant", is_flag=True, help="4-bit only: quantize the absmax too (saves ~0.4 bit per weight).")
@click.option("--compute-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@_device_option
@_force_option
@_tag_option
@_description_option
@_require_sig_option
@_sign_option
@json_option
@quiet_option
def convert_quantize(model, to, out, push, double_quant, compute_dtype, device, force, tags, description, require_signature, sign, json_, quiet):
    """Quantize a checkpoint to a bitsandbytes NF4, FP4 or int8 checkpoint.

    The output has the layout transformers + bitsandbytes save (block size 64),
    with quantization_config in config.json, so AutoModelForCausalLM loads it.
    lm_head and embeddings stay in their original precision, as transformers
    keeps them.

    \b
    Examples:
      adapterhub quantize ./qa-merged --to nf4 -o ./qa-nf4
      adapterhub quantize team/qa-merged:1 --to int8 --push team/qa-int8
    """
    from adapterhub.convert import quantize

    o = Output(json_, quiet)
    res = quantize(
        model, to=to, out=out, push=push, double_quant=double_quant, compute_dtype=compute_dtype,
        device=device, force=force, tags=tags, description=description, progress=o.progress, require_signature=require_signature, sign=sign,
    )
    _print_result(res, o)


@click.command(name="dequantize")
@click.argument("model")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@_out_option
@_push_option
@_device_option
@_force_option
@_tag_option
@_description_option
@_require_sig_option
@_sign_option
@json_option
@quiet_option
def convert_dequantize(model, dtype, out, push, device, force, tags, description, require_signature, sign, json_, quiet):
    """Turn a bitsandbytes 4-bit or 8-bit checkpoint back into 16-bit weights.

    The result holds the quantized values, not the original weights:
    quantization loses information that no conversion brings back.

    \b
    Examples:
      adapterhub dequantize ./qa-nf4 -o ./qa-bf16
      adapterhub dequantize team/qa-nf4 --dtype float16 --push team/qa-fp16
    """
    from adapterhub.convert import dequantize

    o = Output(json_, quiet)
    res = dequantize(
        model, dtype=dtype, out=out, push=push, device=device, force=force, tags=tags, description=description, progress=o.progress,
        require_signature=require_signature, sign=sign,
    )
    _print_result(res, o)
