#!/usr/bin/env bash
# GPU checks in one call, for a machine with CUDA (CI has none: these tests
# skip there). Runs the tests marked `gpu` plus the conversion tests with
# CUDA visible, and prints the versions it ran with.
#   bash scripts/gpu-check.sh            # uses the current python
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
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
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/ "$@"
