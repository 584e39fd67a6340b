"""check: static compatibility of an adapter with a base, for people and CI."""

from __future__ import annotations

from pathlib import Path

import click

from adapterhub.cli._output import Output, echo, json_option

# adapterhub.check.TARGET_NAMES, spelled out so that the CLI starts without importing the check
# (tests/test_targets.py holds the two equal).
TARGETS = ("vllm", "llama.cpp", "ollama", "mlx", "tgi")


@click.command(name="check")
@click.argument("adapter")
@click.option(
    "--base", "-b",
    help="Base model: a directory, registry ref, cached Hub id, or a base left where it is kept: oci://HOST/NS/NAME:TAG or hf://ORG/MODEL[@REV] (config and safetensors headers only; default: the adapter's base_model_name_or_path).",
)
@click.option("--junit", "junit", type=click.Path(dir_okay=False, path_type=Path), help="Also write a JUnit XML report (one testcase per rule).")
@click.option("--github", is_flag=True, help="Print GitHub Actions annotations (::error / ::warning) after the table.")
@click.option("--strict", is_flag=True, help="Exit 10 when the adapter fits but a rule warns.")
@click.option(
    "--target", "targets", multiple=True, type=click.Choice(TARGETS),
    help="Also check that this serving engine loads the adapter as it is (repeatable); a failing rule names the conversion that fixes it.",
)
@json_option
@click.pass_context
def check_cmd(
    ctx: click.Context, adapter: str, base: str | None, junit: Path | None, github: bool, strict: bool,
    targets: tuple[str, ...], json_: bool,
):
    """Check that an adapter fits a base model, from headers only.

    Reads JSON files and safetensors headers (and scans the adapter's own
    tensors); never loads a model or imports torch. Rules: target-modules,
    shapes, base-identity, dtype, tied-embeddings, resized-vocab,
    qlora-base, peft-config, finite-weights, untrained-lora. --target adds
    the rules of a serving engine (vllm, llama.cpp, ollama, mlx, tgi), each
    citing its source, e.g. vllm/dora, vllm/max-lora-rank, ollama/architecture.

    \b
    Examples:
      adapterhub check ./out/qa-lora --base ./Llama-2-7b-hf
      adapterhub check team/qa-lora:3                    # base from adapter_config.json
      adapterhub check ./qa-lora --base meta-llama/Llama-2-7b-hf --json
      adapterhub check ./qa-lora --base ./base --github --junit report.xml --strict
      adapterhub check ./qa-lora --base ./base --target vllm --target llama.cpp

    Exits 0 when compatible, 1 when incompatible, and, with --strict, 10
    when compatible with warnings.
    """
    from adapterhub.check import check

    from adapterhub.cli._check_output import (
        github_error,
        github_lines,
        print_report,
        step_summary,
        write_junit,
        write_junit_error,
    )

    if json_ and github:
        raise click.UsageError("--json and --github both write to stdout; choose one")
    from adapterhub.errors import AdapterhubError

    out = Output(json_)
    try:
        report = check(adapter, base, targets=targets)
    except AdapterhubError as e:
        # CI still gets a report (and an annotation) when an input cannot be read.
        if junit is not None:
            write_junit_error(junit, adapter, base, str(e), e.exit_code)
        if github:
            echo(github_error(str(e)))
        raise
    code = report.exit_code(strict)
    if junit is not None:
        write_junit(report, junit, strict=strict)
    out.result(lambda: {**report.to_dict(), "strict": strict, "exit_code": code}, lambda: print_report(report))
    if github:
        for line in github_lines(report, strict=strict):
            echo(line)
        step_summary(report)
    ctx.exit(code)
