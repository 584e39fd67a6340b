#!/usr/bin/env bash
# Build the sdist and the wheel (`python -m build`: the wheel is built from the
# sdist, so a file missing from the sdist fails here), install the wheel alone
# into a fresh virtual environment (the torch-free core, no extras), and run
# scripts/smoke_core.py there. Catches missing package data and modules that
# only an editable install can find. Run by .ci/run after the test suite.
#   bash scripts/wheel-smoke.sh          # needs .venv (scripts/setup.sh) for `build`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BASE_PY=${BASE_PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/adapterhub-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

quietly() {
    # The command's exit status decides; its output is shown only when it fails.
    local log="$work/log" status=0
    "$@" >"$log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        grep -v '^WARNING: Location' "$log" >&2 || true
        echo "wheel-smoke: '$*' failed (exit $status)" >&2
        exit "$status"
    fi
}

echo "wheel-smoke: building the sdist and the wheel"
quietly "$PY" -m build --outdir "$work/dist" .
sdist=$(ls "$work"/dist/adapterhub-*.tar.gz)
wheel=$(ls "$work"/dist/adapterhub-*.whl)
echo "wheel-smoke: built $(basename "$sdist") and $(basename "$wheel")"

"$BASE_PY" -m venv "$work/venv"
quietly "$work/venv/bin/python" -m pip install --disable-pip-version-check "$wheel"
cd "$work"  # from here on, nothing of the source tree is importable
"$work/venv/bin/python" - <<'EOF'
import importlib.util as u
import sys
heavy = [m for m in ("torch", "transformers", "peft", "bitsandbytes", "model_signing", "huggingface_hub") if u.find_spec(m)]
assert not heavy, f"the core install brought optional packages: {heavy}"
for top in ("registry", "converters"):  # installed only as adapterhub.registry and adapterhub.converters
    assert u.find_spec(top) is None, f"a top-level {top!r} package is installed"
import adapterhub.registry, adapterhub.converters, adapterhub.cli  # noqa: E401,F401
from adapterhub.converters.formats import native
# The wheel is built where a compiler is (CI): it must carry both C kernels, loadable.
missing = [k for k in ("ggml", "bnb") if not native.built(k)]
assert not missing, f"the wheel lacks the C kernels {missing}"
print("wheel-smoke: the wheel installs the core only:", sys.prefix)
EOF
"$work/venv/bin/python" "$OLDPWD/scripts/smoke_core.py"
