#!/usr/bin/env bash
# The README's main job: set up (if needed), then run the quickstart on the
# default registry ($ADAPTERHUB_HOME, else ~/.local/share/adapterhub).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/quickstart.py "$@"
