#!/usr/bin/env bash
# GPU validation of the CUDA kernels (issue 5). Run from the repository root on a machine with
# an NVIDIA GPU, a CUDA build of torch, a matching CUDA toolkit (nvcc) and compute-sanitizer.
# Nothing is downloaded: the build uses the installed torch (no build isolation, no pip).
#
#   benchmarks/gpu_validate.sh                       # all steps (about 15 min on an H100)
#   STEPS="build edge" benchmarks/gpu_validate.sh    # some steps (e.g. to fit 10-min slots)
#   PY=/path/to/python OUT=/tmp/logs benchmarks/gpu_validate.sh
#
# Steps, each logged to $OUT/<step>.txt (default OUT=gpu-validate):
#   build      compile the extension in place with the CUDA kernels (LSA_BUILD_CUDA=1; arch of
#              the visible GPU unless TORCH_CUDA_ARCH_LIST is set) and check lsa_ext.backend()
#              reports "compiled-cuda"
#   edge       benchmarks/cuda_edge_cases.py --huge: the CUDA ops against float64 references and
#              the CPU kernel (dtypes, empty, tails, misaligned, channels_last, >32 layers,
#              reproducibility, streams, no host sync, gradcheck, a >2**31-element tensor)
#   tests      the whole pytest suite (device-parametrised tests include cuda when it is there)
#   sanitizer  compute-sanitizer memcheck over the op tests and the edge cases, racecheck and
#              synccheck over the edge cases (PyTorch's caching allocator off, so that every
#              out-of-bounds access hits unallocated memory)
#   bench      benchmarks/bench_cuda.py: the markdown table (+ $OUT/bench_cuda.json)
# Exit status: 0 when every step passed; the failed steps are listed at the end.
set -uo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-gpu-validate}
STEPS=${STEPS:-"build edge tests sanitizer bench"}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
failed=()

run_step() {  # run_step NAME COMMAND...: runs COMMAND, logs to $OUT/NAME.txt, records failure
  local name=$1
  shift
  echo "=== $name: $*"
  if "$@" 2>&1 | tee "$OUT/$name.txt"; then
    echo "=== $name: ok"
  else
    echo "=== $name: FAILED (log: $OUT/$name.txt)"
    failed+=("$name")
  fi
}

build() {
  nvidia-smi || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  LSA_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py build_ext --inplace || return 1
  "$PY" - <<'EOF'
import lsa_ext
b = lsa_ext.backend()
print("backend:", b)
assert b["cuda"] == "compiled-cuda", b
EOF
}

op_tests() {  # the op test files when present, else the whole suite
  local files
  files=$(ls tests/test_*ops*.py tests/test_relative_error*.py 2>/dev/null | tr '\n' ' ')
  echo "${files:-tests}"
}

sanitizer() {
  local cs=(compute-sanitizer --error-exitcode 1 --target-processes all)
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  # shellcheck disable=SC2046
  "${cs[@]}" --tool memcheck "$PY" -m pytest -q -x -p no:cacheprovider $(op_tests) || return 1
  "${cs[@]}" --tool memcheck "$PY" benchmarks/cuda_edge_cases.py || return 1
  "${cs[@]}" --tool racecheck "$PY" benchmarks/cuda_edge_cases.py || return 1
  "${cs[@]}" --tool synccheck "$PY" benchmarks/cuda_edge_cases.py || return 1
}

for s in $STEPS; do
  case $s in
    build) run_step build build ;;
    edge) run_step edge "$PY" benchmarks/cuda_edge_cases.py --huge ;;
    tests) run_step tests "$PY" -m pytest -q tests ;;
    sanitizer) run_step sanitizer sanitizer ;;
    bench) run_step bench "$PY" benchmarks/bench_cuda.py --json "$OUT/bench_cuda.json" ;;
    *) echo "unknown step $s (build edge tests sanitizer bench)"; failed+=("$s") ;;
  esac
done

if ((${#failed[@]})); then
  echo "FAILED steps: ${failed[*]}"
  exit 1
fi
echo "all steps passed: $STEPS"
