#!/usr/bin/env bash
# The GPU check: everything one GPU lease should yield, in one run of at most GPU_CHECK_BUDGET_S seconds
# (default 480), on an H100/H200 machine with no network (16 cores, Python 3.12, torch 2.11+cu130, nvcc 13.0,
# pytest-xdist, pytest-timeout, compute-sanitizer):
#
#   1. build        the extension for sm_90 only, 16 compile jobs, in place (nothing installed)
#   2. import       the CUDA kernels load
#   3. tests_quick  tests/test_cuda.py's quick subset: every kernel path, dtype and alignment case, the
#                   issue-7 crash shapes, host threads, > 2^31 elements; in parallel (xdist), each test capped
#   3b. tests_sm80  the quick subset's row-engine tests again with TORCH_VJP_DISABLE_CLUSTERS=1: the plans of
#                   an sm_80 GPU (no clusters: rows that take one on sm_90 go to the block and split paths), which
#                   a Hopper GPU runs otherwise never; the tests' path assertions follow (cluster cases skip)
#   3c. tests_serial  the tests that must run alone: the fused loss's bits under memory pressure (it holds all
#                   but 600 MiB of the GPU, which would starve parallel tests; under xdist it skips itself)
#   4. bench        the benchmark at the reference sizes (16384 × 4096 bf16 and fp32, row sweep n = 1024,
#                   8192, 32768) and the Jacobian sweep, timed by CUDA graph replay (host overhead apart)
#   5. memcheck     compute-sanitizer memcheck over benchmarks/sanitize_cases.py (every path, small sizes)
#   6. racecheck    compute-sanitizer racecheck over its softmax- and norm-family cases (the shared-memory reductions)
#   6b. synccheck   compute-sanitizer synccheck over the same cases in float32: every barrier and cluster sync
#                   reached by all the threads it waits for (row_kernel's Shuffle, Block and Cluster instances)
#   7. tests_rest   the rest of the test suite (CUDA through the `device` fixture), with whatever time is left
#
# Every step runs under a cap (CAP below; the caps of steps 1-6 add up to less than the deadline, and step 7
# gets the rest), logs to OUT_DIR/<step>.log as it goes, and is recorded in OUT_DIR/steps.log when it ends;
# a failed or timed-out step is recorded and the next one runs. The bench writes its CSVs after every case.
# With --pack FILE the whole OUT_DIR is re-packed into FILE after every step, so that a run killed from
# outside still returns all it did (the device tool brings back at most 8 files from $OUT).
#
#   bash benchmarks/gpu_check.sh /tmp/gc --pack $OUT/gpu_check.tar.gz   # the GPU machine
#   bash benchmarks/gpu_check.sh /tmp/gc --dry-run                      # rehearsal on a CPU machine: every step's
#                                                                       # CPU-side stand-in, real clock
#   bash benchmarks/gpu_check.sh /tmp/gc --dry-run --fake-clock         # ... timed as on the GPU machine: each step
#                                                                       # "takes" its EXPECTED seconds (override:
#                                                                       # GPU_CHECK_FAKE="build=200,bench=150")
# The last lines printed (also OUT_DIR/summary.txt): the forward + backward table at the reference size and
# a step / status / seconds table. Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S.
set -uo pipefail  # not -e: a failing step is recorded, and the steps after it still run

OUT="" DRY=0 FAKE=0 PACK=""
while (($#)); do
    case $1 in
        --dry-run) DRY=1 ;;
        --fake-clock) FAKE=1 ;;
        --pack) PACK=${2:?--pack needs a file}; shift ;;
        -*) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
        *) OUT=$1 ;;
    esac
    shift
done
[[ -n "$OUT" ]] || { echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--pack FILE] [--dry-run [--fake-clock]]" >&2; exit 2; }
((FAKE && !DRY)) && { echo "gpu_check: --fake-clock needs --dry-run" >&2; exit 2; }
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
[[ -n "$PACK" ]] && PACK=$(cd "$(dirname "$PACK")" && pwd)/$(basename "$PACK")
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1  # the repository root
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET_S:-480}

# Caps (seconds) of steps 1-6: 130 + 15 + 80 + 50 + 20 + 75 + 45 + 30 + 20 = 465 < 480, so at least 15 s reach
# tests_rest. The bench fits its cases to its cap (--time-budget).
declare -A CAP=([build]=130 [import]=15 [tests_quick]=80 [tests_sm80]=50 [tests_serial]=20 [bench]=75 [memcheck]=45
                [racecheck]=30 [synccheck]=20)
# Expected seconds on the GPU machine (estimates from this machine's compile times and the sizes involved; no
# GPU has run this script yet): the fake clock's durations, and benchmarks/README.md's table.
declare -A EXPECTED=([build]=80 [import]=8 [tests_quick]=60 [tests_sm80]=40 [tests_serial]=10 [bench]=75 [memcheck]=40
                     [racecheck]=30 [synccheck]=15 [tests_rest]=240)
if [[ -n "${GPU_CHECK_FAKE:-}" ]]; then
    IFS=, read -ra overrides <<<"$GPU_CHECK_FAKE"
    for kv in "${overrides[@]}"; do EXPECTED[${kv%%=*}]=${kv#*=}; done
fi

START=$SECONDS CLOCK=0
now() { if ((FAKE)); then echo "$CLOCK"; else echo $((SECONDS - START)); fi; }
SUMMARY=()

pack() {
    [[ -n "$PACK" ]] && tar czf "$PACK.tmp" -C "$(dirname "$OUT")" "$(basename "$OUT")" 2>/dev/null && mv -f "$PACK.tmp" "$PACK"
    return 0
}

record() {  # record NAME STATUS SECONDS
    local line
    line=$(printf '%-12s %-34s %5s' "$1" "$2" "$3")
    SUMMARY+=("$line")
    echo "$line   (at ${4:-?} s)" >>"$OUT/steps.log"
    pack
}

# step NAME CAP COMMAND...: runs COMMAND under timeout (its cap, or less if the deadline is nearer), logging
# to $OUT/NAME.log. With the fake clock the command still runs (its stand-in), but the clock advances by the
# step's expected seconds, and a step expected to outlast its limit is recorded as a timeout.
step() {
    local name=$1 cap=$2 t0 left limit rc status took
    shift 2
    t0=$(now)
    left=$((BUDGET - t0))
    limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        record "$name" "skipped (no time)" 0 "$t0"
        return
    fi
    echo "== $name (limit ${limit}s, at ${t0}s): $*" | tee -a "$OUT/steps.log"
    local real0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    took=$((SECONDS - real0))
    if ((FAKE)); then
        took=${EXPECTED[$name]:-$took}
        if ((took > limit)); then took=$limit rc=124; fi
        CLOCK=$((CLOCK + took))
    fi
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT (${limit}s)" ;;
        *) status="FAIL (rc=$rc)" ;;
    esac
    if grep -q "Device not supported" "$OUT/$name.log" 2>/dev/null; then status="unsupported: Device not supported"; fi
    record "$name" "$status" "$took" "$(now)"
    tail -n 3 "$OUT/$name.log" | sed "s/^/   $name| /"
}

# The compute-sanitizer binary: $CUDA_HOME, PATH, the usual toolkit and Nsight folders, pip's nvidia packages.
find_sanitizer() {
    local c
    for c in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" "${CUDA_HOME:-/nonexistent}/compute-sanitizer/compute-sanitizer" \
        "$(command -v compute-sanitizer 2>/dev/null)" /usr/local/cuda/bin/compute-sanitizer; do
        [[ -n "$c" && -x "$c" ]] && { echo "$c"; return; }
    done
    local roots=(/usr/local /opt/nvidia "$("$PY" -c 'import os, nvidia; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null)")
    find "${roots[@]}" -maxdepth 5 -name compute-sanitizer -type f -perm -u+x 2>/dev/null | head -n 1
}

QUICK='test_paths or test_more_than_2_31'  # tests/test_cuda.py's quick subset (its docstring says why)
# Its tests whose plans change without clusters (not the elementwise, gated and alignment ones).
SM80='test_paths and not elementwise and not gated and not misaligned and not concurrent'
SERIAL='memory_pressure'  # tests that must have the GPU to themselves
# 8 workers; a hung test is ended alone (well inside the quick step's cap; the rest holds a cold torch.compile).
XDIST=() QUICK_TIMEOUT=() REST_TIMEOUT=()
"$PY" -c 'import xdist, pytest_timeout' 2>/dev/null && XDIST=(-n 8) QUICK_TIMEOUT=(--timeout=60) REST_TIMEOUT=(--timeout=240)

SAN=$(find_sanitizer)
{
    echo "date: $(date -u '+%F %T UTC')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no -- csrc torch_vjp setup.py 2>/dev/null | grep -q . && echo +dirty)"
    echo "command: bash benchmarks/gpu_check.sh $OUT$( ((DRY)) && echo ' --dry-run')$( ((FAKE)) && echo ' --fake-clock')"
    echo "budget: ${BUDGET}s; caps: $(for k in build import tests_quick tests_sm80 tests_serial bench memcheck racecheck synccheck; do printf '%s=%s ' "$k" "${CAP[$k]}"; done)"
    nvidia-smi -L 2>&1 || echo "nvidia-smi: not available"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1 | tail -n 1
    "$PY" -m pip list 2>/dev/null | grep -iE '^(pytest|pytest-xdist|pytest-timeout|liger.kernel|matplotlib) ' || true
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    echo "compute-sanitizer: ${SAN:-not found}"
    [[ -n "$SAN" ]] && "$SAN" --version 2>&1 | head -n 2
    echo "xdist/timeout: ${XDIST[*]:-not installed (tests run serially, uncapped per test)} ${QUICK_TIMEOUT[*]} ${REST_TIMEOUT[*]}"
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"
pack

# Seconds the benchmark may spend starting cases: its limit less 30 s for the last case and the report.
bench_budget() { if (($1 > 60)); then echo $(($1 - 30)); else echo $(($1 / 2)); fi; }
bench_limit() { local left=$((BUDGET - $(now))); echo $((CAP[bench] < left ? CAP[bench] : left)); }
rest_limit() { echo $((BUDGET - $(now) - 5)); }

if ((DRY)); then
    # Rehearsal on a CPU machine: the same steps, each replaced by its CPU-side part.
    step build "${CAP[build]}" "$PY" -c 'import torch_vjp; print("torch_vjp imports; cpu kernels:", torch_vjp.has_kernel("softmax", "cpu"))'
    step import "${CAP[import]}" "$PY" -c 'import torch_vjp; print(torch_vjp.backends())'
    step tests_quick "${CAP[tests_quick]}" "$PY" -m pytest -v -p no:cacheprovider "${XDIST[@]}" "${QUICK_TIMEOUT[@]}" tests/test_cuda.py -k "$QUICK"
    step tests_sm80 "${CAP[tests_sm80]}" env TORCH_VJP_DISABLE_CLUSTERS=1 "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" \
        "${QUICK_TIMEOUT[@]}" tests/test_cuda.py -k "$SM80"
    step tests_serial "${CAP[tests_serial]}" "$PY" -m pytest -v -p no:cacheprovider tests/test_cuda.py -k "$SERIAL"
    step bench "${CAP[bench]}" "$PY" -m benchmarks --device cpu --quick --ops exp,softmax,logsumexp --no-progress \
        --out "$OUT/bench" --time-budget "$(bench_budget "$(bench_limit)")"
    step memcheck "${CAP[memcheck]}" "$PY" -m benchmarks.sanitize_cases --device cpu --dtypes float32,bfloat16
    step racecheck "${CAP[racecheck]}" "$PY" -m benchmarks.sanitize_cases --device cpu --family softmax,norm --dtypes float32,bfloat16
    step synccheck "${CAP[synccheck]}" "$PY" -m benchmarks.sanitize_cases --device cpu --family softmax,norm --dtypes float32
    step tests_rest "$(rest_limit)" "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" "${REST_TIMEOUT[@]}" tests/test_benchmarks.py tests/test_cuda.py \
        -k "not ($QUICK) and not ($SERIAL)"
else
    export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1
    [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]] && export CUDA_HOME=/usr/local/cuda
    step build "${CAP[build]}" "$PY" setup.py build_ext --inplace
    step import "${CAP[import]}" "$PY" -c 'import torch_vjp; assert torch_vjp.has_kernel("softmax", "cuda"), "no CUDA kernels"; print("CUDA kernels loaded:", torch_vjp.backends())'
    step tests_quick "${CAP[tests_quick]}" "$PY" -m pytest -v -p no:cacheprovider "${XDIST[@]}" "${QUICK_TIMEOUT[@]}" tests/test_cuda.py -k "$QUICK"
    # The sm_80 plans on this GPU (read once per process: the variable must be set before torch_vjp plans).
    step tests_sm80 "${CAP[tests_sm80]}" env TORCH_VJP_DISABLE_CLUSTERS=1 "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" \
        "${QUICK_TIMEOUT[@]}" tests/test_cuda.py -k "$SM80"
    step tests_serial "${CAP[tests_serial]}" "$PY" -m pytest -v -p no:cacheprovider tests/test_cuda.py -k "$SERIAL"
    # Not the compile provider: it compiles cold for every case (seconds each); run it on its own when wanted.
    step bench "${CAP[bench]}" "$PY" -m benchmarks --providers torch_vjp,eager,liger --no-progress --out "$OUT/bench" \
        --time-budget "$(bench_budget "$(bench_limit)")"
    if [[ -z "$SAN" ]]; then
        record memcheck "skipped (compute-sanitizer not found)" 0 "$(now)"
        record racecheck "skipped (compute-sanitizer not found)" 0 "$(now)"
        record synccheck "skipped (compute-sanitizer not found)" 0 "$(now)"
    else
        # Without the caching allocator every tensor is its own cudaMalloc, so an out-of-bounds access lands
        # outside an allocation, where memcheck sees it. API errors are not reported: torch probes the driver
        # with calls that fail by design; the kernels' memory accesses are what is checked.
        step memcheck "${CAP[memcheck]}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --report-api-errors no \
            --error-exitcode 1 "$PY" -m benchmarks.sanitize_cases --dtypes float32,bfloat16
        if grep -q "Device not supported" "$OUT/memcheck.log" 2>/dev/null; then
            record racecheck "skipped (Device not supported)" 0 "$(now)"
            record synccheck "skipped (Device not supported)" 0 "$(now)"
        else
            step racecheck "${CAP[racecheck]}" "$SAN" --tool racecheck --report-api-errors no --error-exitcode 1 \
                "$PY" -m benchmarks.sanitize_cases --family softmax,norm --dtypes float32,bfloat16
            step synccheck "${CAP[synccheck]}" "$SAN" --tool synccheck --report-api-errors no --error-exitcode 1 \
                "$PY" -m benchmarks.sanitize_cases --family softmax,norm --dtypes float32
        fi
    fi
    step tests_rest "$(rest_limit)" "$PY" -m pytest -v -p no:cacheprovider "${XDIST[@]}" "${REST_TIMEOUT[@]}" tests -k "not ($QUICK) and not ($SERIAL)"
fi

{
    if [[ -f "$OUT/bench/summary.md" ]]; then
        echo
        # The headline: forward + backward of every op at the first (reference) size.
        awk '/^#/ {p = (/^### Forward \+ backward/ && !seen++)} /^Forward and backward alone/ {p = 0} p && /^\|/' \
            "$OUT/bench/summary.md"
    fi
    echo
    for log in tests_quick tests_sm80 tests_serial tests_rest; do
        [[ -f "$OUT/$log.log" ]] && echo "$log: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/$log.log" | tail -n 1)"
    done
    printf '%-12s %-34s %5s\n' step status seconds
    printf '%s\n' "${SUMMARY[@]}"
    printf '%-12s %-34s %5d\n' total "$( ((FAKE)) && echo '(fake clock: expected on the GPU)')" "$(now)"
} | tee "$OUT/summary.txt"
pack
