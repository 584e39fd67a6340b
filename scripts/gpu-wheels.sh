#!/usr/bin/env bash
# Download, here, the wheels that the GPU machine lacks (Python 3.12, x86-64):
# bitsandbytes and the few pure-Python packages adapterhub imports that its
# image does not hold. They go to .whl/ (ignored by git), which the device
# tool carries; scripts/gpu-check.sh installs them there. About 42 MB.
#   bash scripts/gpu-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl bitsandbytes==0.50.2 sqlite-utils==4.2.1 sqlite-fts4 click-default-group platformdirs gguf==0.19.0 \
    2>&1 | grep -v '^WARNING: Location' || true
ls -la .whl
