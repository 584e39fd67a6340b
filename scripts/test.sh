#!/usr/bin/env bash
# The README's test command: set up (if needed), then run the whole suite.
# pytest exits 5 when it collects no test, which fails this script too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 -q "$@"
