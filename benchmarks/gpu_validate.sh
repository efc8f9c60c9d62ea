#!/usr/bin/env bash
# GPU validation of the CUDA kernels: build, edge cases (incl. > 2**31 elements), op and autograd
# tests on CUDA tensors, compute-sanitizer, a 1-process torchrun (nccl) analysis, the benchmark.
# Writes $OUT/summary.md (OUT from the environment, default benchmarks/results/gpu) and one log
# per step. Downloads and installs nothing. Steps, timeouts and options: benchmarks/gpu_validate.py.
#
#   bash benchmarks/gpu_validate.sh --quick                # limits itself to 420 s (7 min)
#   bash benchmarks/gpu_validate.sh                        # full (about 15 min)
#   bash benchmarks/gpu_validate.sh --device cpu --quick   # the steps that apply on CPU
#   PY=/path/to/python bash benchmarks/gpu_validate.sh --quick --steps build,edge
#
# Python: $PY, else .venv/bin/python when present, else python3 (e.g. a GPU machine's
# preinstalled torch). Exit status 0 when every step passed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" benchmarks/gpu_validate.py "$@"
