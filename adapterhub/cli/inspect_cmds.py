"""inspect: metadata of a directory or file, from headers only."""

from __future__ import annotations

from typing import Any

import click

from adapterhub.cli._output import Output, echo, human_size, json_option

# Raw config copies: in --json output only.
_RAW = {"peft_config", "adapter_config", "config", "card"}

_FIELDS = ("kind", "format", "method", "base_model", "base_revision", "rank", "alpha", "quant", "task_type")


def print_inspection(d: dict[str, Any], indent: str = "", with_files: bool = True) -> None:
    for key in _FIELDS:
        if d.get(key) is not None:
            echo(f"{indent}{key + ':':<13}{d[key]}")
    if d.get("dtypes"):
        echo(f"{indent}{'dtypes:':<13}{', '.join(d['dtypes'])}")
    params = d.get("params")
    echo(f"{indent}{'params:':<13}{'unknown' if params is None else format(params, ',')}")
    echo(f"{indent}{'size:':<13}{human_size(d.get('size'))}")
    details = d.get("details") or {}
    for key, value in details.items():
        if value in (None, [], {}, False) or key in _RAW:
            continue
        if isinstance(value, dict) and len(value) <= 12 and all(not isinstance(v, (dict, list)) or len(str(v)) < 60 for v in value.values()):
            echo(f"{indent}{key}:")
            for k, v in value.items():
                if v not in (None, [], {}):
                    echo(f"{indent}  {k + ':':<20}{_short(v)}")
            continue
        text = _short(value)
        echo(f"{indent}{key + ':':<13}{text}" if len(key) < 12 else f"{indent}{key}: {text}")
    fp = d.get("fingerprint") or {}
    if fp.get("digest"):
        echo(f"{indent}{'fingerprint:':<13}{fp['digest'][:23]}  ({len(fp.get('modules', {}))} modules)")
    elif fp.get("modules"):
        echo(f"{indent}{'expects:':<13}{len(fp['modules'])} base modules")
    if with_files:
        echo(f"{indent}{'files:':<13}{', '.join(d.get('files', []))}")
    for w in d.get("warnings", []):
        echo(f"{indent}warning: {w}", err=True)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        text = ", ".join(f"{k}={v}" for k, v in value.items())
        if len(text) > 100:
            vals = {str(v) for v in value.values()}
            same = f", all {vals.pop()}" if len(vals) == 1 else ""
            return f"{len(value)} entries{same} (see --json)"
        return text
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if len(text) <= 100 else text[:97] + "..."


@click.command(name="inspect")
@click.argument("path")
@click.option("--hash", "with_hash", is_flag=True, help="Also hash every file and print the artifact digest.")
@json_option
def inspect_cmd(path: str, with_hash: bool, json_: bool):
    """Report an artifact's metadata without loading tensors.

    PATH is a directory or file, or a registry ref (as check, merge and
    verify take). Reads JSON files and safetensors/GGUF headers only: PEFT
    adapters of every type, bottleneck adapters, full and sharded
    checkpoints, bitsandbytes NF4/FP4/int8 checkpoints and GGUF files.

    \b
    Examples:
      adapterhub inspect ./out/qa-lora
      adapterhub inspect ./Llama-2-7b-hf --json
      adapterhub inspect ./model.Q4_K_M.gguf --hash
      adapterhub inspect team/qa-lora@prod
    """
    from adapterhub.cli._common import inspect_spec

    out = Output(json_)
    ins, label = inspect_spec(path, with_hash)

    def human():
        echo(label)
        if "digest" in ins:
            echo(f"  {'digest:':<13}{ins['digest']}")
        print_inspection(ins, indent="  ")

    out.result(ins, human)
