#!/usr/bin/env bash
# Create .venv (if missing) and install adapterhub with everything the
# quickstart and the tests need. Idempotent. torch==2.13.0 goes first, pinned
# by constraints.txt: any other release makes pip fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import adapterhub, torch, transformers, peft; print('adapterhub', adapterhub.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
