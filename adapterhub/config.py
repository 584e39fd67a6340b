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
