"""extract: a LoRA from a fine-tuned or merged model (MODEL − BASE)."""

from __future__ import annotations

from typing import Any

import click

from adapterhub.cli._output import Output, echo, json_option, quiet_option
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

rank_option = click.option("--rank", "-r", type=click.IntRange(min=1), help="One rank for every module.")
energy_option = click.option(
    "--energy", "-e", type=float, help="Per-module rank: the smallest that keeps this fraction of the delta's energy (0 < E ≤ 1)."
)
svd_option = click.option(
    "--svd", type=click.Choice(["randomized", "exact"]), default="randomized", show_default=True,
    help="Randomized SVD (fast; the error is measured and reported) or the exact SVD.",
)
dtype_option = click.option(
    "--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), help="dtype of the LoRA factors (default: MODEL's)."
)


def print_extraction(res, o: Output) -> None:
    """The conversion result, then the per-module figures (human output only)."""
    _print_result(res, o)
    rep = res.report.to_dict()
    if o.json or o.quiet:
        return
    echo(
        f"{len(rep['modules'])} modules as LoRA (ranks {rep['ranks']}), modules_to_save: "
        f"{', '.join(rep['modules_to_save']) or 'none'}, largest relative error {rep['max_rel_error']:.3g}"
    )
    for m in rep["modules"]:
        echo(f"  {m['module']:<48} rank {m['rank']:>4}  kept energy {m['kept_energy']:.6f}  rel error {m['rel_error']:.3g}")


@click.command(name="extract")
@click.argument("model")
@click.option("--base", "-b", required=True, help="The model MODEL was fine-tuned or merged from: a directory, registry ref or cached Hub id.")
@rank_option
@energy_option
@click.option("--target", "targets", multiple=True, help="Only these modules (a name such as q_proj, or a dotted path; repeatable).")
@svd_option
@dtype_option
@_out_option
@_push_option
@_force_option
@_tag_option
@_description_option
@_require_sig_option
@_sign_option
@json_option
@quiet_option
def extract_cmd(model, base, rank, energy, targets, svd, dtype, out, push, force, tags, description, require_signature, sign, json_, quiet):
    """Extract a LoRA whose application to BASE reproduces MODEL.

    MODEL is a fully fine-tuned or merged checkpoint (a directory, a registry
    ref such as a merged output, or a cached Hub id). Each changed weight's
    delta is factored by truncated SVD, one tensor pair at a time; unchanged
    tensors are skipped, changed embeddings get an embedding LoRA, changed
    norms and biases go to modules_to_save. The report gives every module's
    rank, kept energy and relative error. Exit 2 for --rank larger than a
    module allows; exit 4 for a BASE of another shape or architecture,
    non-finite weights, or a MODEL identical to BASE (nothing to extract).

    \b
    Examples:
      adapterhub extract ./qa-merged --base ./Llama-2-7b-hf --rank 16 -o ./qa-lora
      adapterhub extract team/qa-merged:1 --base team/llama --energy 0.99 --push team/qa-lora-x
    """
    from adapterhub.convert.extract import extract

    o = Output(json_, quiet)
    res = extract(
        model, base=base, rank=rank, energy=energy, targets=targets or None, svd=svd, dtype=dtype, out=out, push=push,
        force=force, tags=tags, description=description, progress=o.progress, require_signature=require_signature,
        sign=sign,
    )
    print_extraction(res, o)


# --------------------------------------------------------------------------- convert --to mlx | peft | lora
# Rows of ``formats_cmds.TARGETS``: (SRC, the target's options, the options every target takes) -> result.


def to_mlx_target(src: str, opts: dict[str, Any], common: dict[str, Any]) -> Any:
    from adapterhub.convert.mlx import to_mlx

    return to_mlx(src, base=opts["base"], **common)


def to_peft_target(src: str, opts: dict[str, Any], common: dict[str, Any]) -> Any:
    from adapterhub.convert.mlx import to_peft

    return to_peft(src, base=opts["base"], **common)


def to_lora_target(src: str, opts: dict[str, Any], common: dict[str, Any]) -> Any:
    from adapterhub.convert.extract import to_lora

    return to_lora(
        src, base=opts["base"], rank=opts.get("rank"), energy=opts.get("energy"), svd=opts.get("svd") or "randomized",
        **common,
    )


def print_mlx(res: Any, o: Output) -> None:
    _print_result(res, o)
    if o.json or o.quiet:
        return
    rep = res.report.to_dict()
    echo(f"{rep['method']}: {rep['modules']} modules, rank {rep['rank']}, scale {rep['scale']:g} ({rep['direction']})")
    for note in rep["notes"]:
        echo(f"  {note}")
