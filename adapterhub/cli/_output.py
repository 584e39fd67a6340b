"""One sink for human, ``--json`` and quiet output.

Machine output (tables, JSON) goes to stdout; messages and progress go to
stderr, so ``adapterhub ls --json | jq`` and pipes stay clean.

Human output passes through :func:`echo`, which escapes control characters:
file names, descriptions and metadata come from artifacts that may be hostile,
and an escape sequence in a file name must not reach the terminal as one. JSON
is safe already (``json.dumps`` escapes them). Colour is used only for the
``error:``/``warning:`` prefixes on a terminal, never with ``NO_COLOR`` set.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

import click

json_option = click.option("json_", "--json", is_flag=True, help="Print machine-readable JSON on stdout.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="Print only what scripts need.")

PROGRESS_MIN_BYTES = 32 * 1024 * 1024

# C0 controls but newline and tab, DEL, C1 controls, and the Unicode marks that
# reorder or hide text (bidi embeddings, overrides and isolates, zero-width joiners).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_CONTROL_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape(text: str, *, one_line: bool = False) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``), so it prints as it is.

    ``one_line`` escapes newlines and tabs too: for a table cell or a name,
    where a newline would forge a line of output.
    """
    return (_CONTROL_LINE if one_line else _CONTROL).sub(_escape_char, text)


def use_color(stream: IO[str]) -> bool:
    """Colour only on a terminal, and never with NO_COLOR set (https://no-color.org) or TERM=dumb."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def echo(text: str = "", err: bool = False, nl: bool = True) -> None:
    """Human output: control characters escaped, ANSI never sent where colour is off."""
    click.echo(escape(str(text)), err=err, nl=nl, color=False)


def prefix(word: str, err: bool = True) -> str:
    """``error:``/``warning:``/``hint:``, coloured on a terminal unless NO_COLOR."""
    colors = {"error": "red", "warning": "yellow", "hint": "cyan"}
    label = f"{word}:"
    if word in colors and use_color(sys.stderr if err else sys.stdout):
        return click.style(label, fg=colors[word], bold=word == "error")
    return label


def say(word: str, text: str) -> None:
    """One ``error: …``, ``warning: …`` or ``hint: …`` line on stderr."""
    click.echo(f"{prefix(word)} {escape(str(text))}", err=True, color=use_color(sys.stderr))


def quiet_libraries(verbose: bool) -> None:
    """Keep third-party warnings, log lines and loading bars off the terminal.

    transformers' FutureWarnings, PEFT's UserWarnings and bitsandbytes' kernel
    messages say nothing the user can act on in a conversion or a verify run.
    ``-v`` or ADAPTERHUB_DEBUG=1 lets them through. Nothing is imported here:
    the settings are in place before a command imports those libraries.
    """
    if verbose:
        return
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "torch", "huggingface_hub", "kernels",
                 "mlx", "mlx_lm", "gguf", "model_signing", "sigstore", "urllib3", "filelock", "safetensors"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Read by transformers and huggingface_hub when they configure their own loggers and bars.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def progress_wanted(json_: bool = False, quiet: bool = False) -> bool:
    """Bars only on a terminal (or with ADAPTERHUB_PROGRESS=1), never with --json or --quiet."""
    if json_ or quiet:
        return False
    if os.environ.get("ADAPTERHUB_PROGRESS"):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Output:
    def __init__(self, json_: bool = False, quiet: bool = False) -> None:
        self.json = json_
        self.quiet = quiet
        ctx = click.get_current_context(silent=True)
        if ctx is not None:
            ctx.meta["adapterhub.json"] = json_

    def result(self, data: Any, human: Callable[[], None] | None = None) -> None:
        """``data`` may be a callable, so human output never builds the JSON form."""
        if self.json:
            if callable(data):
                data = data()
            # Indented for people; compact for pipes (the indenting encoder is
            # pure Python and several times slower on 10,000 rows).
            indent = 2 if sys.stdout.isatty() else None
            click.echo(json.dumps(data, indent=indent, default=str))
        elif human is not None:
            human()

    def message(self, text: str) -> None:
        """Progress and notes: stderr, suppressed by --quiet and --json."""
        if not (self.quiet or self.json):
            echo(text, err=True)

    def warn(self, text: str) -> None:
        say("warning", text)

    def progress(self, desc: str, total: int) -> Any:
        """A tqdm bar on stderr for big transfers on a terminal, else a no-op."""
        if total < PROGRESS_MIN_BYTES or not progress_wanted(self.json, self.quiet):
            return _Null()
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)

    def steps(self, unit: str) -> Callable[[str, int], Any] | None:
        """A factory of bars counted in ``unit`` (batches, tensors), or None where no bar is wanted."""
        if not progress_wanted(self.json, self.quiet):
            return None

        def make(desc: str, total: int) -> Any:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)

        return make


class _Null:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    # Unrolled (ls --all formats 100,000 sizes); dividing by a power of two is exact,
    # so this gives what repeated division by 1024 gives.
    x = float(n)
    if x < 1024.0:
        return f"{x:.0f} B"
    if x < 1048576.0:
        return f"{x / 1024.0:.1f} KB"
    if x < 1073741824.0:
        return f"{x / 1048576.0:.1f} MB"
    if x < 1099511627776.0:
        return f"{x / 1073741824.0:.1f} GB"
    return f"{x / 1099511627776.0:.1f} TB"


def human_sizes(sizes: Sequence[int | None]) -> list[str]:
    """``human_size`` of each (a column of ``ls``)."""
    return [human_size(n) for n in sizes]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, strings: bool = False) -> None:
    """Columns padded to their widest cell; None shows as ``-``. ``strings``: every cell is a str already."""
    cells = rows if strings else [["-" if c is None else str(c) for c in r] for r in rows]
    text = _render(headers, cells)
    # One scan of the whole text for what a cell must not carry (the table itself
    # has no tab or control character, and a newline only after each row);
    # escape and lay out again only then.
    if not _clean(text, len(cells)):
        text = _render(headers, [[escape(c, one_line=True) for c in r] for r in cells])
    click.echo(text, color=False)  # one write: 10,000 echo calls cost 0.2 s


def table_columns(headers: Sequence[str], columns: Sequence[Sequence[str]]) -> None:
    """As :func:`table` with ``strings``, from the columns (each a sequence of str, all of one length)."""
    text = _render_columns(headers, columns)
    rows = len(columns[0]) if columns else 0
    if not _clean(text, rows):
        text = _render_columns(headers, [[escape(c, one_line=True) for c in col] for col in columns])
    # One write, not click.echo: that copies the text to add the newline and scans
    # it for ANSI sequences (the check above leaves none): 0.03-0.06 s on the 16 MB of ls --all.
    out = sys.stdout
    out.write(text)
    out.write("\n")
    out.flush()


def _render_columns(headers: Sequence[str], columns: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *map(len, col)) if col else len(h) for h, col in zip(headers, columns)]
    fmt = "  ".join(f"%-{w}s" for w in widths)
    head = (fmt % tuple(h.upper() for h in headers)).rstrip()
    return "\n".join([head, *map(str.rstrip, map(fmt.__mod__, zip(*columns)))])


# _CONTROL_LINE but the newline, which only the table's own line ends put in the text.
_CONTROL_CELL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_PRINTABLE_ASCII = bytes(range(0x20, 0x7F))


def _clean(text: str, rows: int) -> bool:
    """No control character in ``text`` but the ``rows`` newlines that end its lines."""
    if text.isascii():  # known without a scan; then only C0 controls and DEL can be there
        # Delete every printable byte: what is left must be the line ends (a third of the regex's time).
        return len(text.encode("ascii").translate(None, _PRINTABLE_ASCII)) == rows
    return text.count("\n") == rows and not _CONTROL_CELL.search(text)


def _render(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    # Widths column by column with max() over map(len): no Python loop per cell.
    widths = [max(len(h), *map(len, col)) for h, col in zip(headers, zip(*cells))] if cells else [len(h) for h in headers]
    fmt = "  ".join(f"%-{w}s" for w in widths)  # printf-style: a third faster than str.format here
    lines = [(fmt % tuple(h.upper() for h in headers)).rstrip()]
    lines += [(fmt % tuple(r)).rstrip() for r in cells]
    return "\n".join(lines)
