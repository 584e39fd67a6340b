#!/usr/bin/env bash
# Run every adapterhub benchmark with modest defaults (about 3 minutes on a 2-core VM).
#   bench/run_all.sh                 # temp data under /tmp
#   BENCH_TMP=/scratch bench/run_all.sh
#   PYTHON=python3 bench/run_all.sh  # another interpreter with adapterhub installed
#   BENCH_QUICK=1 bench/run_all.sh   # skip merge and quantize (together about 35 minutes on the VM)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-$here/../.venv/bin/python}"
tmp="${BENCH_TMP:-/tmp}"

echo "== push / pull (1 GiB checkpoint) =="
"$py" "$here/bench_push_pull.py" --size-gb 1 --repeats 3 --tmp "$tmp"
echo
echo "== ls / search (10,000 artifacts) =="
"$py" "$here/bench_ls_search.py" --artifacts 10000 --repeats 5 --tmp "$tmp"
echo
echo "== inspect (Llama-7B-shaped headers) =="
"$py" "$here/bench_inspect.py" --repeats 5 --tmp "$tmp"
echo
echo "== check (LoRA r=16 against Llama-7B-shaped headers) =="
"$py" "$here/bench_check.py" --repeats 7 --tmp "$tmp"
if [ -z "${BENCH_QUICK:-}" ]; then
  # The ~1B fixture (1.75 GiB + a 41 MiB adapter) is built once and kept in $tmp/adapterhub-bench.
  echo
  echo "== merge (0.94B Llama shape, LoRA r=16 on all 7 projections) =="
  "$py" "$here/bench_merge.py" --repeats 3 --tmp "$tmp/adapterhub-bench"
  echo
  echo "== quantize nf4 / int8 (same checkpoint) =="
  "$py" "$here/bench_quantize.py" --repeats 3 --tmp "$tmp/adapterhub-bench"
fi
