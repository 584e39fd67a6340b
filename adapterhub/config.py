"""Where the registry lives, and other settings read from the environment."""

from __future__ import annotations

import os
from pathlib import Path

APP = "adapterhub"


def home() -> Path:
    """Registry home: ``$ADAPTERHUB_HOME``, else the per-user data directory.

    Read on every call (not at import) so a test fixture or a wrapper script can
    point it somewhere else at any time.
    """
    env = os.environ.get("ADAPTERHUB_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg:
        return Path(xdg) / APP
    # platformdirs costs an import; the XDG default is what it returns on Linux.
    if os.name == "posix" and not _is_macos():
        return Path.home() / ".local" / "share" / APP
    import platformdirs

    return Path(platformdirs.user_data_dir(APP, appauthor=False))


def _is_macos() -> bool:
    import sys

    return sys.platform == "darwin"


def debug() -> bool:
    return os.environ.get("ADAPTERHUB_DEBUG", "") not in ("", "0")


def env_number(name: str, default: float, *, low: float, high: float, integer: bool = False) -> float:
    """A number from ``$name`` within ``[low, high]``, else ``default`` when unset or empty.

    Anything else (not a number, nan, inf, out of range, a fraction where a
    count belongs) is a ``UsageError`` (exit 2) that names the variable, instead
    of a silent default or a crash far from the cause.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    from adapterhub.errors import UsageError

    what = "a whole number" if integer else "a number"
    hint = f"set {name} to {what} from {low:g} to {high:g}, or unset it for the default ({default:g})"
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw[:40]!r} is not a number", hint=hint) from None
    if not (low <= value <= high) or (integer and value != int(value)):  # nan fails both comparisons
        raise UsageError(f"{name}={raw[:40]!r} is out of range", hint=hint)
    return int(value) if integer else value
