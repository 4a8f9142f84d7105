#!/usr/bin/env bash
# One prepared script for a lent GPU (issue 15), finishing within 8 minutes: the kernel table at
# ResNet-50 shapes against the ceilings measured in the same run, ResNet-50 calibration
# overhead, the targets computed from them, the kernels' sm_90 compile report, the GPU tests
# (`-m gpu`, the kernel and backend tests on CUDA) and, with the time left, a block-size sweep.
#
#   bash bench/gpu.sh            on the GPU machine, from a copy of the repository; writes
#                                <gpu>-gpu_kernels.md and <gpu>-gpu_tests.md into $OUT_DIR, else
#                                $OUT (the device tool's folder that comes back), else
#                                bench/results/. Commit them under bench/results/.
#   bash bench/gpu.sh --dry-run  on the CPU, the same steps with TRITON_INTERPRET=1 and tiny
#                                shapes, into $OUT_DIR (required: a dry run never overwrites
#                                results). tests/bench/test_gpu_bench.py runs it.
#
# The device has PyTorch, Triton, pytest, hypothesis and pytest-xdist but reaches no registry:
# icprune is installed there editable with --no-index --no-deps and without its C++ extension
# (ICPRUNE_BUILD_EXT=0; the CUDA path does not use it). Nothing needs to be carried.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
BUDGET=470  # seconds for the whole script (8 minutes, less a margin)
if (( DRY )); then
  export TRITON_INTERPRET=1
  PY=${PYTHON:-.venv/bin/python}
  RESULTS=${OUT_DIR:?"--dry-run writes into \$OUT_DIR (never over bench/results)"}
else
  PY=${PYTHON:-python3}
  RESULTS=${OUT_DIR:-${OUT:-bench/results}}
  ICPRUNE_BUILD_EXT=0 timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation \
    --no-index -e . || { echo "gpu.sh: installing icprune failed" >&2; exit 1; }
fi
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
NAME=$("$PY" -c "from bench.gpu_kernels import device_name; print(device_name())") || exit 1
if (( DRY )); then NAME="dryrun-$NAME"; fi
REPORT="$RESULTS/$NAME-gpu_kernels.md"
TESTS="$RESULTS/$NAME-gpu_tests.md"
left() { echo $(( BUDGET - SECONDS )); }
status=0

# 1. Kernel table, calibration overhead, targets, sm_90 compile report.
BENCH=(--out "$REPORT")
if (( DRY )); then BENCH+=(--dry-run); else BENCH+=(--sass); fi
timeout "$(( $(left) < 260 ? $(left) : 260 ))" "$PY" -m bench.gpu_kernels "${BENCH[@]}" \
  > "$RESULTS/$NAME-gpu_kernels.log" 2>&1 || { status=1; echo "gpu.sh: bench failed" >&2; }

# 2. GPU tests: everything marked gpu, and the kernel/backend tests on CUDA tensors.
PYTEST=(-q -p no:cacheprovider -o addopts="" -r fEs)
KERNEL_TESTS=(tests/kernels tests/test_backends.py)
if (( DRY )); then
  KERNEL_TESTS=(tests/kernels/test_channel_stats_kernel.py -k "minimal and float32")
elif "$PY" -c "import xdist" 2>/dev/null; then
  PYTEST+=(-n 8)  # compiles in parallel
fi
{
  echo "# GPU tests on $NAME"
  echo
  if command -v nvidia-smi > /dev/null; then
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
    echo '```'
  fi
  echo
  echo "## \`pytest -m gpu\`"
  echo '```'
  timeout "$(( $(left) < 100 ? $(left) : 100 ))" "$PY" -m pytest -m gpu "${PYTEST[@]}" 2>&1 \
    | tail -n 25
  echo "exit status ${PIPESTATUS[0]}"
  echo '```'
  echo
  echo "## kernel and backend tests (${KERNEL_TESTS[*]})"
  echo '```'
  timeout "$(( $(left) < 170 ? $(left) : 170 ))" "$PY" -m pytest "${KERNEL_TESTS[@]}" \
    "${PYTEST[@]}" 2>&1 | tail -n 40
  echo "exit status ${PIPESTATUS[0]}"
  echo '```'
} > "$TESTS"
grep -q "exit status [^0]" "$TESTS" && status=1

# 3. Block-size sweep with the time that is left (appended to the report).
if (( DRY )) || (( $(left) > 70 )); then
  SWEEP=(--sweep-only); if (( DRY )); then SWEEP+=(--dry-run); fi
  timeout "$(( $(left) > 80 ? $(left) - 10 : 70 ))" "$PY" -m bench.gpu_kernels "${SWEEP[@]}" \
    >> "$REPORT" 2>> "$RESULTS/$NAME-gpu_kernels.log" || true
fi
echo "gpu.sh: done in ${SECONDS}s, status $status; wrote $REPORT and $TESTS"
exit $status
