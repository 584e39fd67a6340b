"""The pre-commit hook: `adapterhub check` on every adapter directory a commit touches.

pre-commit passes the changed files that match the hook's pattern
(``adapter_config.json``, ``adapter_model.safetensors``); each directory that
holds one is checked once, against ``--base`` or the base its config names.
The hook fails with the worst exit code of the checks (1 incompatible, 10
warnings under ``--strict``, 3/4 an unreadable input).

    python -m adapterhub.cli.precommit [--base B] [--target T] [--strict] FILE...

See ``.pre-commit-hooks.yaml`` at the repository root and docs/checks.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from adapterhub.cli._output import echo

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def adapter_dirs(files: tuple[str, ...]) -> list[Path]:
    """Each directory holding a changed adapter file, once, in order."""
    return sorted({Path(f).parent for f in files if Path(f).name in ADAPTER_FILES})


@click.command(name="adapterhub-pre-commit")
@click.option("--base", "-b", help="The base model for every adapter (default: the one each adapter's config names).")
@click.option("--target", help="Also apply a serving engine's rules (as `check --target`).")
@click.option("--strict", is_flag=True, help="Fail on warnings too.")
@click.argument("files", nargs=-1)
def main(base: str | None, target: str | None, strict: bool, files: tuple[str, ...]) -> None:
    """Check the adapter directories that hold FILES.

    \b
    Example (.pre-commit-config.yaml):
      - repo: https://github.com/adapterhub-dev/adapterhub
        rev: v0.1.0
        hooks:
          - id: adapterhub-check
            args: [--base, ./models/base]
    """
    worst = 0
    for d in adapter_dirs(files):
        argv = [sys.executable, "-m", "adapterhub.cli", "check", str(d)]
        argv += ["--base", base] if base else []
        argv += ["--target", target] if target else []
        argv += ["--strict"] if strict else []
        echo(f"adapterhub check {d}")
        code = subprocess.run(argv, check=False).returncode
        worst = max(worst, code)
    sys.exit(worst)


if __name__ == "__main__":
    main()
