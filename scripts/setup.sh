#!/usr/bin/env bash
# Create .venv (if missing) and install adapterhub with everything the
# quickstart and the tests need (the `test` extra). Idempotent. torch==2.13.0
# goes first, pinned by constraints.txt: any other release makes pip fetch a
# multi-GB CUDA build. That pin is for this developer set-up and CI only; the
# package itself takes the user's own torch (docs/install.md).
#
# A failing pip stops the set-up with pip's own message: nothing is swallowed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi

pip_install() {
    # pip's exit status decides. Only the "Location ... is ignored" warnings that
    # this machine's pip configuration prints for every install are left out.
    local log status=0
    log=$(mktemp)
    .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1 || status=$?
    grep -v '^WARNING: Location' "$log" >&2 || true
    rm -f "$log"
    if [ "$status" -ne 0 ]; then
        echo "setup: 'pip install $*' failed (exit $status)" >&2
        exit "$status"
    fi
}

pip_install --upgrade pip
pip_install -c constraints.txt torch==2.13.0
pip_install -c constraints.txt -e '.[test]'
# llama.cpp's own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) ship only in the
# llama-cpp-python sdist: the GGUF tests and bench/bench_gguf.py run them as the peer (never copied).
LCPP=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
if [ ! -f ".cache/llama_cpp_python-$LCPP/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
    mkdir -p .cache
    .venv/bin/python -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps -d .cache "llama-cpp-python==$LCPP"
    tar -xzf ".cache/llama_cpp_python-$LCPP.tar.gz" -C .cache
fi
.venv/bin/python -c "import adapterhub, torch, transformers, peft; print('adapterhub', adapterhub.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
