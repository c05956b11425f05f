#!/usr/bin/env bash
# The GPU check, for a CUDA machine with no network (H100/H200, Python 3.12, torch 2.11+cu130, nvcc 13.0):
# build from source, CUDA test suite, compute-sanitizer (memcheck; racecheck on the reduction kernels),
# then the benchmark at the reference sizes. Under 6 minutes in all: every step is time-boxed, a failed
# step is recorded and the next one runs, and the last lines printed are a summary table.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh OUT_DIR --dry-run  # CPU-side rehearsal: no build, no GPU, no sanitizer
#
# Everything lands in OUT_DIR: env.log, one <step>.log per step, bench/ (results.csv, jacobian.csv,
# summary.md, sol.png, jacobian.png, command.txt) and summary.txt. Through the device tool, which returns
# at most 8 files from $OUT, pack it:  bash benchmarks/gpu_check.sh /tmp/gc; tar czf $OUT/gpu_check.tar.gz -C /tmp gc
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 350: the whole run's deadline).
set -uo pipefail  # not -e: a failing step is recorded, and the steps after it still run

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]}
DRY=0
[[ "${2:-}" == "--dry-run" ]] && DRY=1
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1  # the repository root
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
START=$SECONDS
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-350}))
SUMMARY=()

# step NAME CAP_SECONDS COMMAND...: runs COMMAND under timeout (its cap, or less if the deadline is nearer),
# logs it to $OUT/NAME.log and records status and seconds.
step() {
    local name=$1 cap=$2; shift 2
    local left=$((DEADLINE - SECONDS)) t0=$SECONDS rc status
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        SUMMARY+=("$(printf '%-10s %-22s %5s' "$name" "skipped (no time)" 0)")
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/steps.log"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT (${limit}s)" ;;
        *) status="FAIL (rc=$rc)" ;;
    esac
    SUMMARY+=("$(printf '%-10s %-22s %5d' "$name" "$status" $((SECONDS - t0)))")
    tail -n 3 "$OUT/$name.log" | sed "s/^/   $name| /"
}

# Seconds the benchmark may spend starting cases: its limit less 30 s for the last case and the report.
bench_budget() { if (($1 > 60)); then echo $(($1 - 30)); else echo $(($1 / 2)); fi; }

{
    echo "date: $(date -u '+%F %T UTC')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "command: bash benchmarks/gpu_check.sh $*"
    nvidia-smi -L 2>&1 || echo "nvidia-smi: not available"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 2
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

if ((DRY)); then
    # Rehearsal on a CPU machine: the same steps, each replaced by its CPU-side part.
    step build 60 "$PY" -c 'import torch_vjp; print("torch_vjp imports; cpu kernels:", torch_vjp.has_kernel("softmax", "cpu"))'
    step tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_benchmarks.py
    step memcheck 60 "$PY" -m benchmarks.sanitize_cases --device cpu --dtypes float32,bfloat16
    step racecheck 60 "$PY" -m benchmarks.sanitize_cases --device cpu --family softmax --dtypes float32,bfloat16
    BENCH_LIMIT=$((DEADLINE - SECONDS - 5))
    step bench "$BENCH_LIMIT" "$PY" -m benchmarks --device cpu --quick --no-progress --out "$OUT/bench" \
        --time-budget $(bench_budget "$BENCH_LIMIT")
else
    # Build: the CUDA kernels for Hopper only (9.0), 16 compile jobs, against the torch already here
    # (no build isolation, no index: this machine has no network). In place, so nothing is installed.
    export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1
    [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]] && export CUDA_HOME=/usr/local/cuda
    step build 170 "$PY" setup.py build_ext --inplace
    step import 30 "$PY" -c 'import torch_vjp; assert torch_vjp.has_kernel("softmax", "cuda"), "no CUDA kernels"; print("torch_vjp CUDA kernels loaded")'
    step tests 90 "$PY" -m pytest -q -p no:cacheprovider tests
    # Without the caching allocator every tensor is its own cudaMalloc, so an out-of-bounds access lands
    # outside an allocation, where memcheck sees it. API errors are not reported: torch probes the driver
    # with calls that fail by design; the kernels' memory accesses are what is checked.
    step memcheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 \
        "$PY" -m benchmarks.sanitize_cases --dtypes float32,bfloat16
    step racecheck 45 compute-sanitizer --tool racecheck --report-api-errors no --error-exitcode 1 \
        "$PY" -m benchmarks.sanitize_cases --family softmax --dtypes float32,bfloat16
    # Whatever time is left: the benchmark stops starting cases 30 s before its limit and writes its report.
    BENCH_LIMIT=$((DEADLINE - SECONDS - 5))
    step bench "$BENCH_LIMIT" "$PY" -m benchmarks --no-progress --out "$OUT/bench" --time-budget $(bench_budget "$BENCH_LIMIT")
fi

{
    if [[ -f "$OUT/bench/summary.md" ]]; then
        echo
        # The headline: forward + backward of every op at the first (reference) size.
        awk '/^#/ {p = (/^### Forward \+ backward/ && !seen++)} /^Forward and backward alone/ {p = 0} p && /^\|/' \
            "$OUT/bench/summary.md"
    fi
    echo
    printf '%-10s %-22s %5s\n' step status seconds
    printf '%s\n' "${SUMMARY[@]}"
    printf '%-10s %-22s %5d\n' total "" $((SECONDS - START))
} | tee "$OUT/summary.txt"
