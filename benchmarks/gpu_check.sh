#!/usr/bin/env bash
# GPU check for a CUDA machine with torch, triton, nvcc, ninja and pybind11 (no package index;
# the tests that need a package it lacks, cleanlab say, skip): build the extension in place,
# test on the GPU, benchmark, sweep Triton launch configurations, and write everything into
# OUTDIR, with a short table printed last. No stage starts past CSL_CHECK_BUDGET_S (480 s),
# and each is cut to what is left of it, so the whole fits a ten-minute run with room to
# pack OUTDIR up; a shorter budget drops the last stages first.
#
#   bash benchmarks/gpu_check.sh OUTDIR             # on the GPU machine
#   bash benchmarks/gpu_check.sh OUTDIR --dry-run   # on a CPU: every stage as far as it can
#
# Stages, in order (correctness first; each logged to OUTDIR/<stage>.log and bounded by a
# timeout; a failing stage does not stop the later ones):
#   env        30 s  nvidia-smi, versions, GPU count, nvcc/ninja                  env.log
#   build     140 s  setup.py build_ext --inplace (ninja, TORCH_CUDA_ARCH_LIST=9.0),
#                    csl_fast.info, the cuda backend must load                   build.log
#   tests_gpu 190 s  pytest -k "cuda or gpu or triton" (pytest-xdist workers where it is
#                    installed): every GPU parametrisation, the Triton kernels, the
#                    out-of-range/canary tests and, with two GPUs, the second-GPU tests
#   probe      90 s  tests/test_cxx_exceptions.py and benchmarks/exception_probe.py: which C++
#                    errors reach Python on this build                        probe.log
#   kernels    60 s  benchmarks/gpu_kernels.py: each kernel of the fused op timed alone
#                    beside PyTorch's, and one small call's launches      kernels.log
#   launches   30 s  benchmarks/launch_count.py: the CUDA kernels of one accumulate +
#                    backward per case (dtype, reduction, tensor or tracker)  launches.log
#   bench      60 s  benchmarks/run.py --no-compile (eager candidates; warm-up runs before
#                    each comparison's timed budget)                             bench.log
#   sweep      25 s  benchmarks/triton_sweep.py on two shapes, at most 4 configurations
#                    each (every configuration is a Triton compilation)          sweep.log
#   compile    25 s  benchmarks/run.py --sections cross_entropy with torch.compile: the
#                    cold compilation last, into OUTDIR/compile                compile.log
#   tests_cpu  40 s  the rest of the suite (CI runs it too), in what is left of the budget
# A pytest stage that hits its limit gets SIGINT, so pytest still writes its junit XML
# (<stage>.xml) and failure summary (-rA); failures.log gets every failure's full report
# the moment it happens (benchmarks/incremental_log.py), whatever stops the run.
# Exit status: 0 when every stage passed, else 1 (the table says which failed).
# Knobs (environment): TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (16), CSL_CHECK_BUDGET_S (480),
# CSL_TEST_WORKERS (8, with pytest-xdist), CSL_TESTS_GPU_S (190, the GPU tests' limit),
# CSL_BENCH_ARGS (extra run.py arguments),
# CSL_COMMIT (the commit this tree holds, recorded in the reports as git_commit; the GPU
# machine's copy of .git can be stale, so pass CSL_COMMIT=$(git rev-parse HEAD) from the
# checkout that sent the tree). Unset, it is this copy's git HEAD when csl_fast/ and csrc/
# match that commit, else "unknown (...)"; every report also records source_hash, a SHA-256
# of the sources under csl_fast/ and csrc/ (csl_fast/bench/env.py) to check it against.
#
# --dry-run (a machine without a GPU): Triton runs in its interpreter, the optional packages
# are hidden (.ci/hide_optional) as on the GPU machine, the in-place build is skipped (the
# build stage reports what is loaded), benchmarks run on the CPU with small budgets.
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR [--dry-run]}
DRY=0
[ "${2:-}" = --dry-run ] && DRY=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
BUDGET=${CSL_CHECK_BUDGET_S:-480}
START=$(date +%s)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
export CSL_INCREMENTAL_LOG="$OUT/failures.log"
# Provenance for the reports (csl_fast/bench/env.py): git HEAD only when the sources match it.
if [ -z "${CSL_COMMIT:-}" ]; then
    HEAD_SHA=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || true)
    if [ -n "$HEAD_SHA" ] && [ -z "$(git -C "$ROOT" status --porcelain --untracked-files=all -- csl_fast csrc 2>/dev/null)" ]; then
        CSL_COMMIT=$HEAD_SHA
    else
        CSL_COMMIT="unknown (csl_fast/ or csrc/ differ from this copy's git HEAD ${HEAD_SHA:-none}; see source_hash)"
    fi
fi
export CSL_COMMIT
# The checkout itself first: the GPU machine has no installed csl_fast, only the in-place build.
export PYTHONPATH="$ROOT:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=cuda
if [ $DRY -eq 1 ]; then
    DEVICE=cpu
    export TRITON_INTERPRET=1
    export PYTHONPATH="$ROOT/.ci/hide_optional:$PYTHONPATH"
    # A bare pytest: no plugins from the (hidden) optional packages.
    export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
else
    unset TRITON_INTERPRET
fi
: >"$CSL_INCREMENTAL_LOG"
declare -A STATUS SECONDS_USED
ORDER=()

elapsed() { echo $(($(date +%s) - START)); }

# stage NAME LIMIT_S CMD...: run CMD under a timeout (SIGINT first, SIGKILL 10 s later),
# log it, record pass/fail/timeout. The limit is cut to what is left of the budget.
stage() {
    local name=$1 limit=$2
    shift 2
    ORDER+=("$name")
    local left=$((BUDGET - $(elapsed)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        STATUS[$name]="SKIPPED (budget spent)"
        SECONDS_USED[$name]=0
        echo "== [$(elapsed)s] $name skipped: ${left}s of the budget left" | tee -a "$OUT/gpu_check.log"
        return
    fi
    local t0=$(date +%s)
    echo "== [$(elapsed)s] $name (limit ${limit}s): $*" | tee -a "$OUT/gpu_check.log"
    # Shell functions run through `bash -c` (they are exported below) so `timeout` can bound them.
    timeout -s INT --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >"$OUT/$name.log" 2>&1
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
    echo "CSL_COMMIT $CSL_COMMIT"
    git -C "$ROOT" rev-parse HEAD 2>/dev/null && git -C "$ROOT" status --short 2>/dev/null | head -20
    "$PY" -c "from csl_fast.bench.env import source_hash; print('source_hash', source_hash())"
    nvidia-smi || echo "nvidia-smi: not available"
    command -v nvcc && nvcc --version | tail -n 2
    command -v ninja && ninja --version
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
n = torch.cuda.device_count()
print("gpus", n, "- the second-GPU tests", "run" if n >= 2 else "skip (one GPU or none)")
for i in range(n):
    print(f"gpu {i}", torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
for mod in ("triton", "pybind11", "numpy", "pytest", "sklearn", "pandas", "cleanlab"):
    try:
        m = __import__(mod); print(mod, getattr(m, "__version__", "?"))
    except Exception as e: print(mod, "missing:", e)
from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available
print("CUDA_HOME", CUDA_HOME, "ninja", is_ninja_available())
try:
    import liger_kernel; print("liger_kernel importable")
except Exception as e: print("liger_kernel not importable:", e)
EOF
}

build() {
    if [ "$DRY" -eq 1 ]; then
        echo "dry run: no in-place build (csl_fast/_C is what this checkout has)"
        "$PY" -m csl_fast.info
        return 0
    fi
    "$PY" setup.py build_ext --inplace || return $?
    "$PY" -m csl_fast.info
    # The check is for the CUDA backend: fail the stage when it did not load.
    "$PY" -c "import csl_fast, sys; b = csl_fast.available_backends('cuda'); print('cuda backends:', b); sys.exit(0 if 'cuda' in b else 3)"
}

# run_tests NAME PYTEST_ARGS...: -v/-rA to the log as it goes, junit XML at the end (also on
# SIGINT), failures.log at once. The nvcc compile checks and the sm_90 AOT check are for
# machines without a GPU (the build stage compiled the real thing).
run_tests() {
    local name=$1
    shift
    local workers=()
    # pytest-xdist where it is installed (the GPU machine has it): the Triton compilations of
    # the GPU parametrisations are the bulk of the stage, and they run in parallel.
    "$PY" -c "import xdist" 2>/dev/null && workers=(-n "${CSL_TEST_WORKERS:-8}")
    # Without plugin autoloading (the dry run) xdist must be named; with it, naming it too
    # registers it twice and pytest refuses to start.
    [ -n "${PYTEST_DISABLE_PLUGIN_AUTOLOAD:-}" ] && [ ${#workers[@]} -gt 0 ] &&
        workers=(-p xdist.plugin "${workers[@]}")
    "$PY" -m pytest -v -rA -p no:cacheprovider -p incremental_log --maxfail=300 "${workers[@]}" \
        --junitxml="$OUT/$name.xml" -o junit_family=xunit2 --durations=10 \
        --ignore=tests/test_cuda_compile.py --ignore=tests/_triton/test_triton_compile_sm90.py \
        --ignore=tests/test_optional_deps.py "$@"
}
SELECT_GPU="cuda or gpu or triton"
tests_gpu() {
    # The out-of-range/canary and device-guard tests first, then the rest that touches a GPU.
    run_tests tests_gpu tests/_triton/test_triton_bounds.py tests/_triton/test_triton_device.py \
        tests -k "$SELECT_GPU"
}
tests_cpu() { run_tests tests_cpu tests -k "not ($SELECT_GPU)"; }

export OUT ROOT PY DRY SELECT_GPU
export -f env_info build run_tests tests_gpu tests_cpu

stage env 30 env_info
stage build 140 build
stage tests_gpu "${CSL_TESTS_GPU_S:-190}" tests_gpu
if [ $DRY -eq 1 ]; then
    BENCH=("$PY" benchmarks/run.py --device cpu --quick --sections cross_entropy)
else
    BENCH=("$PY" benchmarks/run.py --device cuda --no-compile --budget-scale 0.15)
fi
# Which C++ errors reach Python on this build (the second H200 check crashed on some).
probe() {
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cxx_exceptions.py
    local rc=$?
    env | grep -E '^(LD_|GLIBC_TUNABLES|TORCH_|CXX)'
    CXX=${CXX:-$(command -v /opt/gcc/bin/g++ || echo c++)} "$PY" benchmarks/exception_probe.py --out "$OUT/probe"
    return $rc
}
export -f probe
stage probe 90 probe
if [ $DRY -eq 1 ]; then
    stage kernels 60 "$PY" benchmarks/gpu_kernels.py --out "$OUT" --dry-run
else
    stage kernels 60 "$PY" benchmarks/gpu_kernels.py --out "$OUT"
fi
stage launches 30 "$PY" benchmarks/launch_count.py --json "$OUT/launch-count.json"
# shellcheck disable=SC2086
stage bench 60 "${BENCH[@]}" --out "$OUT" ${CSL_BENCH_ARGS:-}
if [ $DRY -eq 1 ]; then
    stage sweep 25 "$PY" benchmarks/triton_sweep.py --device cpu --out "$OUT" --budget-s 5 \
        --shapes 3x10 --max-configs 2
else
    stage sweep 25 "$PY" benchmarks/triton_sweep.py --out "$OUT" --budget-s 18 \
        --shapes 8192x128256 --max-configs 4
fi
# torch.compile of the reference: a cold compilation per shape, so last and on its own.
stage compile 25 "$PY" benchmarks/run.py --device "$DEVICE" --sections cross_entropy \
    --reps 10 --budget-scale 0.1 --out "$OUT/compile"
# CI runs the CPU tests too: here they get what is left of the budget.
stage tests_cpu 40 tests_cpu

# ------------------------------------------------------------------ short table, last
echo
echo "== gpu_check summary ($(elapsed)s of ${BUDGET}s, results in $OUT)"
[ $DRY -eq 1 ] && echo "   (dry run on $(uname -m): Triton interpreted, optional packages hidden)"
printf '%-10s %-24s %s\n' stage status seconds
fail=0
for s in "${ORDER[@]}"; do
    printf '%-10s %-24s %s\n' "$s" "${STATUS[$s]}" "${SECONDS_USED[$s]}"
    [ "${STATUS[$s]}" = pass ] || fail=1
done
for s in tests_gpu tests_cpu; do
    [ -f "$OUT/$s.log" ] && echo "$s: $(grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* =+$' "$OUT/$s.log" | tail -n 1)"
done
n_fail=$(grep -cE '^(FAILED|ERROR|COLLECTION ERROR) ' "$OUT/failures.log")
echo "failures.log: $n_fail failing tests with their full reports"
grep -E '^(FAILED|ERROR|COLLECTION ERROR) ' "$OUT/failures.log" | head -n 10
if [ -f "$OUT/bench.log" ]; then
    # run.py prints its summary table on stdout after the [..s] progress lines.
    grep -v '^\[' "$OUT/bench.log" | grep -E '^(CE |step |targets|  MISSED|FAILED)' || true
fi
grep -A8 '^Best per shape' "$OUT/triton-sweep.md" 2>/dev/null | grep '^- ' | sed 's/^- /sweep best /' || true
[ -f "$OUT/kernels.log" ] && grep '^|' "$OUT/kernels.log"
ls "$OUT"/*.md "$OUT"/compile/*.md 2>/dev/null | sed 's/^/report: /'
exit $fail
