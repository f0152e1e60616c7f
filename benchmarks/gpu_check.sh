#!/usr/bin/env bash
# GPU check for a CUDA machine with torch, triton, nvcc, ninja and pybind11 (no package index
# needed): build the extension in place, run the test suite on the GPU, run the GPU benchmarks,
# write everything into OUTDIR and print a short table last. About 8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Stages (each logged to OUTDIR/<stage>.log, each bounded by a timeout; a failing stage does
# not stop the later ones):
#   env    nvidia-smi, versions, ninja/nvcc availability             -> env.log
#   build  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 setup.py build_ext --inplace (ninja)
#                                                                       -> build.log, info.log
#   tests  python -m pytest tests -q --maxfail=25 (parametrized over cpu and cuda) -> tests.log, tests.xml
#   bench  benchmarks/run.py --device cuda --out OUTDIR                 -> bench.log, <gpu>-<date>.{md,json}
#   sweep  benchmarks/triton_sweep.py: Triton launch configurations    -> sweep.log, triton-sweep.{md,json}
# Exit status: 0 when every stage passed, else 1 (the table says which failed).
# Knobs (environment): TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (16), CSL_CHECK_BUDGET_S (470),
# CSL_BUILD_TIMEOUT_S (240), CSL_TEST_TIMEOUT_S (200), CSL_BENCH_ARGS (extra run.py arguments),
# CSL_SWEEP_S (60: time kept for the sweep).
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
BUDGET=${CSL_CHECK_BUDGET_S:-470}
START=$(date +%s)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
declare -A STATUS SECONDS_USED
ORDER=()

elapsed() { echo $(($(date +%s) - START)); }

# stage NAME TIMEOUT_S CMD...: run CMD under a timeout, log it, record pass/fail/timeout.
stage() {
    local name=$1 limit=$2
    shift 2
    ORDER+=("$name")
    local t0=$(date +%s)
    echo "== [$(elapsed)s] $name (limit ${limit}s): $*" | tee -a "$OUT/gpu_check.log"
    # Shell functions run through `bash -c` (they are exported below) so `timeout` can bound them.
    timeout --kill-after=15 "$limit" bash -c '"$@"' _ "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    SECONDS_USED[$name]=$(($(date +%s) - t0))
    if [ $rc -eq 0 ]; then
        STATUS[$name]=pass
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        STATUS[$name]="TIMEOUT after ${limit}s"
    else
        STATUS[$name]="FAIL (exit $rc)"
    fi
    echo "   -> ${STATUS[$name]} in ${SECONDS_USED[$name]}s" | tee -a "$OUT/gpu_check.log"
    if [ "${STATUS[$name]}" != pass ]; then
        tail -n 25 "$OUT/$name.log" | sed 's/^/   | /'
    fi
}

env_info() {
    date -u +%Y-%m-%dT%H:%M:%SZ
    git -C "$ROOT" rev-parse HEAD 2>/dev/null && git -C "$ROOT" status --short 2>/dev/null | head -20
    nvidia-smi || true
    command -v nvcc && nvcc --version | tail -n 2
    command -v ninja && ninja --version
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton missing:", e)
try:
    import pybind11; print("pybind11", pybind11.__version__)
except Exception as e: print("pybind11 missing:", e)
from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available
print("CUDA_HOME", CUDA_HOME, "ninja", is_ninja_available())
try:
    import liger_kernel; print("liger_kernel importable")
except Exception as e: print("liger_kernel not importable:", e)
EOF
}

build() {
    "$PY" setup.py build_ext --inplace || return $?
    "$PY" -m csl_fast.info
    # The check is for the CUDA backend: fail the stage when it did not load.
    "$PY" -c "import csl_fast, sys; b = csl_fast.available_backends('cuda'); print('cuda backends:', b); sys.exit(0 if 'cuda' in b else 3)"
}

tests() {
    # The nvcc compile checks and the sm_90 AOT check are for machines without a GPU: the
    # build stage has just compiled the real thing. --maxfail rather than -x: a first GPU
    # run should show every failure it can within its time.
    "$PY" -m pytest tests -q -p no:cacheprovider --maxfail=25 --junitxml="$OUT/tests.xml" \
        -o junit_family=xunit2 --durations=15 \
        --ignore=tests/test_cuda_compile.py --ignore=tests/_triton/test_triton_compile_sm90.py
}

export OUT ROOT PY
export -f env_info build tests
stage env 60 env_info
stage build "${CSL_BUILD_TIMEOUT_S:-240}" build
stage tests "${CSL_TEST_TIMEOUT_S:-200}" tests

SWEEP_S=${CSL_SWEEP_S:-60}
left=$((BUDGET - SWEEP_S - $(elapsed)))
[ $left -lt 150 ] && left=150
# Smaller time budgets per comparison when little time is left (the report is written after
# every section, so a run cut short still leaves its finished sections in OUTDIR).
scale=$("$PY" -c "print(round(min(1.0, max(0.3, $left / 300)), 2))")
# shellcheck disable=SC2086
stage bench "$left" "$PY" benchmarks/run.py --device cuda --out "$OUT" --budget-scale "$scale" \
    ${CSL_BENCH_ARGS:-}

# The Triton launch-configuration sweep (data for _config's heuristic), in what is left.
sweep_left=$((BUDGET - $(elapsed)))
[ $sweep_left -lt "$SWEEP_S" ] && sweep_left=$SWEEP_S
stage sweep "$sweep_left" "$PY" benchmarks/triton_sweep.py --out "$OUT" --budget-s $((sweep_left - 15))

# ------------------------------------------------------------------ short table, last
echo
echo "== gpu_check summary ($(elapsed)s, results in $OUT)"
printf '%-7s %-24s %s\n' stage status seconds
fail=0
for s in "${ORDER[@]}"; do
    printf '%-7s %-24s %s\n' "$s" "${STATUS[$s]}" "${SECONDS_USED[$s]}"
    [ "${STATUS[$s]}" = pass ] || fail=1
done
grep -E '^[0-9]+ (passed|failed)|^(FAILED|ERROR) |[0-9]+ (passed|failed|error)' "$OUT/tests.log" | tail -n 5
if [ -f "$OUT/bench.log" ]; then
    # run.py prints its summary table on stdout after the [..s] progress lines.
    grep -v '^\[' "$OUT/bench.log" | grep -E '^(CE |step |targets|  MISSED|FAILED)' || true
fi
grep -A8 '^Best per shape' "$OUT/triton-sweep.md" 2>/dev/null | grep '^- ' | sed 's/^- /sweep best /' || true
ls "$OUT"/*.md 2>/dev/null | sed 's/^/report: /'
exit $fail
