#!/usr/bin/env bash
# GPU checks in one call, for a machine with CUDA (CI has none: these tests
# skip there). Runs the tests marked `gpu` plus the conversion tests with
# CUDA visible, then bench/gpu_e2e.py (merge, quantize and verify a ~1.1B
# model on the GPU), and prints the versions it ran with.
#   bash scripts/gpu-check.sh            # uses the current python
#
# On the device machine (torch, transformers and peft preinstalled; no
# bitsandbytes): run `bash scripts/gpu-wheels.sh` here first and carry `.whl`;
# the wheels found there are installed into /tmp/site before anything runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PYEOF'
import torch, transformers, peft
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print("transformers", transformers.__version__, "peft", peft.__version__)
try:
    import bitsandbytes
    print("bitsandbytes", bitsandbytes.__version__)
except ImportError:
    print("bitsandbytes: not installed")
PYEOF
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
# Only the files that hold GPU tests: collecting every test module would need
# the signing, remote and test-only packages that the GPU image lacks.
"$PY" -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_merge.py tests/test_quantize.py tests/test_verify_gpu.py "$@" || status=$?
# End to end on a ~1.1B bf16 Llama: LoRA, merge, quantize nf4/int8 (when
# bitsandbytes is installed), verify each on the GPU; prints time, peak GPU
# memory and the metrics. Runs even when a test above failed.
"$PY" bench/gpu_e2e.py --size 1b --device cuda || status=$?
exit $status
