#!/usr/bin/env bash
# GPU check of pyengine on a fresh GPU machine (torch, triton, cmake, ninja, pybind11
# preinstalled; no network needed): build the extension, run the GPU tests, run the GPU kernel
# benchmark, and copy logs + JSON results to "$OUT". Python: $PYTHON, else python3, else python.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh [STAGE ...]
#
#   budget  the whole check in one command under 9 minutes (BUDGET_S, default 520 s, for every
#           step together; each step's limit is what is left after the later steps' shares):
#           builds in place for sm_90a only (python setup.py build_ext --inplace, no pip
#           install) and stops unless build_info has cuda_kernels; compiles the benchmark's
#           Triton kernels with every core (pyengine.kernels.aot, with the cache `prepare` made
#           carried in .triton-cache: cache hits compile nothing); runs the key kernel rows
#           (bench_gpu_kernels.py --incremental: int2/3/4/8 at M = 1, 16, 1024 on 14336 x 4096
#           against cuBLAS fp16, the cuda backend's default route (the tensor-core decode
#           kernel at M <= 16) and its decode GEMV forced beside it, copy bandwidth in the same
#           run; JSON rewritten after every row); then the kernel test files (CUDA decode /
#           tensor-core / Matryoshka, Triton kernels / Matryoshka) in parallel (pytest-xdist,
#           per-test timeout). Leaves 8 files in $OUT: summary.txt (environment first), build.log,
#           aot_warm.log, aot_warm.json, bench.log, gpu_kernels_budget.json, tests.log,
#           pytest_budget.xml.
#   prepare on this machine, no GPU needed: the Triton cache `budget` carries. Compiles the
#           benchmark's Triton calls (bench_gpu_kernels.py --plan-aot) for sm_90 with triton
#           $DEVICE_TRITON (default 3.6.0, the GPU machines' version, installed into a folder of
#           its own) into .triton-cache, filed under the key of that triton's build for the GPU
#           machine's Python ($DEVICE_PYTHON, default python3.12: its wheel is fetched to read
#           the key). Carry it: run(carry=[".triton-cache"], command="... budget").
#
# Other stages (default: build test bench), each under its own time limit so that its log
# survives a tool that kills long commands:
#   build   pip install --no-build-isolation --no-deps -e .  (CUDA kernels for this GPU's arch
#           only, unless PYENGINE_CUDA_ARCHS is set), then build_info
#   test    pytest -m "gpu or interpreter or not slow" on the GPU, then the Triton tests once
#           more under the interpreter with the GPU hidden (CUDA_VISIBLE_DEVICES=)
#   cuda    only tests/backends/test_cuda_decode.py, test_cuda_tc.py and test_cuda_matryoshka.py
#           (the CUDA decode GEMV, tensor-core GEMM and Matryoshka plane kernels against the
#           reference and the simple CUDA kernel), for a run too short for the whole test stage
#   decode  benchmarks/bench_decode.py: end-to-end decode of a Llama-3-8B-shaped model, dense fp16
#           vs 4-bit vs mixed 3-bit vs 25% slicing + mixed 3-bit (+ peers where installed):
#           $OUT/decode_cuda.json and .png (DECODE_ARGS passed on, e.g. "--layers 8")
#   matryoshka  benchmarks/bench_matryoshka_gpu.py: the plane-layout Triton and CUDA kernels at
#           r = 8/4/2 against the plain r-bit kernel of the same backend: $OUT/matryoshka_gpu.json
#   bench   benchmarks/bench_gpu_kernels.py (BENCH_ARGS are passed on, e.g. "--quick")
#   quick   bench with --quick
#   opsbench  the pytest-benchmark suite benchmarks/test_bench_ops.py, full profile (Llama-3-8B
#           shapes and 28672x8192, M 1/16/256/1024, every CUDA backend and the fp16 F.linear
#           rows): $OUT/ops_bench_gpu.json and its table ops_bench_gpu.md / .txt. Not in the
#           default stages (several minutes); OPSBENCH_ARGS are passed on to pytest (e.g.
#           "--ops-profile small" or -k filters); cases that would start after 420 s are
#           skipped so that the JSON is still written inside the stage's limit
# every stage but build builds first when pyengine._C is missing or has no CUDA kernels
# (a fresh machine), so each stage can run in a separate call. Exit status: 0 when every stage
# passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build test bench)
status=0
PY="${PYTHON:-$(command -v python3 || command -v python)}"
# the budget run's benchmark rows (also what `prepare` compiles ahead of time)
BUDGET_BENCH_ARGS=(--shapes 14336x4096 --m 1,16,1024 --bits 8,4,3,2 --cuda-kernels decode)
BUDGET_TESTS=(tests/backends/test_cuda_decode.py tests/backends/test_cuda_tc.py
              tests/backends/test_cuda_matryoshka.py tests/kernels/test_triton_kernels.py
              tests/kernels/test_triton_matryoshka.py
              tests/ops/test_hadamard.py::test_triton_on_a_gpu
              tests/test_decoder.py::test_decoder_on_a_gpu_matches_the_model)
TRITON_CACHE="$PWD/.triton-cache"

note() { echo "$*" | tee -a "$SUMMARY"; }

run_logged() {  # run_logged NAME LIMIT_S CMD...: runs CMD, log in $OUT/NAME.log, records rc
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    note "+ [$name] $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    note "  [$name] rc=$rc in $((SECONDS - t0)) s (log: $name.log)"
    tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    [ $rc -eq 0 ] || status=1
    return $rc
}

if [ "${STAGES[0]}" = prepare ]; then
    # ---- prepare: here, without a GPU ----------------------------------------------------
    DEVICE_TRITON="${DEVICE_TRITON:-3.6.0}"
    DEVICE_PYTHON="${DEVICE_PYTHON:-python3.12}"
    store="${PYENGINE_CACHE:-$HOME/.cache/pyengine}"
    here_tag=$("$PY" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
    dev_tag=$("$DEVICE_PYTHON" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")') \
        || { echo "prepare: $DEVICE_PYTHON (the GPU machine's Python version) not found"; exit 2; }
    for pair in "$PY:$here_tag" "$DEVICE_PYTHON:$dev_tag"; do
        py=${pair%%:*}; dir="$store/triton-$DEVICE_TRITON-${pair##*:}"
        [ -f "$dir/triton/__init__.py" ] || "$py" -m pip install --quiet --no-deps --target "$dir" \
            "triton==$DEVICE_TRITON" || { echo "prepare: no triton==$DEVICE_TRITON for $py"; exit 2; }
    done
    mkdir -p "$TRITON_CACHE"
    PYTHONPATH="$store/triton-$DEVICE_TRITON-$dev_tag" "$DEVICE_PYTHON" -c \
        'from triton.runtime.cache import triton_key; print(triton_key())' >"$TRITON_CACHE/triton_key.txt" \
        || { echo "prepare: cannot read the key of triton $DEVICE_TRITON for $DEVICE_PYTHON"; exit 2; }
    "$PY" benchmarks/bench_gpu_kernels.py "${BUDGET_BENCH_ARGS[@]}" \
        --plan-aot "$TRITON_CACHE/budget_cases.json" || exit 1
    env -u TRITON_INTERPRET TRITON_CACHE_DIR="$TRITON_CACHE" \
        PYTHONPATH="$store/triton-$DEVICE_TRITON-$here_tag:$PWD" "$PY" -m pyengine.kernels.aot \
        --arch 90 --no-ledger --cases-json "$TRITON_CACHE/budget_cases.json" \
        --triton-key-file "$TRITON_CACHE/triton_key.txt" --json "$TRITON_CACHE/prepare_report.json"
    rc=$?
    echo "prepare: $(du -sh "$TRITON_CACHE" | cut -f1) in $TRITON_CACHE (triton $DEVICE_TRITON," \
         "sm_90, key of $dev_tag), exit status $rc"
    exit $rc
fi

if [ -z "${PYENGINE_CUDA_ARCHS:-}" ]; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
          | head -n1 | tr -d ' .')
    case "$cap" in
        "") ;;
        90) export PYENGINE_CUDA_ARCHS="90a" ;;
        *) export PYENGINE_CUDA_ARCHS="$cap" ;;
    esac
fi

ENV_FILE="$OUT/environment.txt"
[ "${STAGES[0]}" = budget ] && ENV_FILE="$SUMMARY"   # budget: 8 files at most come back
{
    date -u
    nvidia-smi 2>&1
    "$PY" - <<'PY' 2>&1
import sys, torch, triton
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY
    echo "PYENGINE_CUDA_ARCHS=${PYENGINE_CUDA_ARCHS:-<default>}"
    git rev-parse HEAD 2>/dev/null
    git status --short 2>/dev/null | head -50
} >>"$ENV_FILE" 2>&1
note "environment: $(grep -m1 '^device' "$ENV_FILE"); archs ${PYENGINE_CUDA_ARCHS:-default}"

has_cuda_build() {
    "$PY" -c "import sys, pyengine; sys.exit(0 if pyengine.build_info()['cuda_kernels'] else 1)" \
        >/dev/null 2>&1
}

build() {
    run_logged build 480 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
    "$PY" - >"$OUT/build_info.txt" 2>&1 <<'PY'
import json, pyengine
print(json.dumps(pyengine.build_info(), indent=1))
print("available backends:", pyengine.available_backends())
PY
    tee -a "$SUMMARY" <"$OUT/build_info.txt"
}

cache_entries() { ls "$TRITON_CACHE_DIR" 2>/dev/null | wc -l; }

budget() {
    local t_end=$((SECONDS + ${BUDGET_S:-520}))
    # limit WANT RESERVE: WANT seconds, or what is left before the reserve of the later steps
    limit() { local l=$((t_end - SECONDS - $2)); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 20 ] && l=20
              echo "$l"; }
    export PYENGINE_CUDA_ARCHS=90a PYENGINE_BUILD_JOBS="$(nproc)"
    run_logged build "$(limit 200 300)" "$PY" setup.py build_ext --inplace
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PY" - >>"$SUMMARY" 2>&1 <<'PY'
import json, sys, pyengine
info = pyengine.build_info()
print("build_info:", json.dumps({k: info[k] for k in ("cuda_kernels", "cuda_archs",
                                                      "cpu_isa_selected", "extension_error")}))
print("available backends:", pyengine.available_backends())
sys.exit(0 if info["cuda_kernels"] and "sm_90a" in info["cuda_archs"] else 1)
PY
    then
        note "budget: the build has no sm_90a CUDA kernels; stopping"
        status=1
        return
    fi
    export TRITON_CACHE_DIR="$TRITON_CACHE"
    mkdir -p "$TRITON_CACHE_DIR"
    [ -s "$TRITON_CACHE/budget_cases.json" ] || "$PY" benchmarks/bench_gpu_kernels.py \
        "${BUDGET_BENCH_ARGS[@]}" --plan-aot "$TRITON_CACHE/budget_cases.json" >>"$SUMMARY" 2>&1
    local n0 n1 n2
    n0=$(cache_entries)
    run_logged aot_warm "$(limit 90 230)" "$PY" -m pyengine.kernels.aot --arch 90 --no-ledger \
        --jobs "$(nproc)" --cases-json "$TRITON_CACHE/budget_cases.json" --json "$OUT/aot_warm.json"
    n1=$(cache_entries)
    run_logged bench "$(limit 180 150)" "$PY" benchmarks/bench_gpu_kernels.py \
        "${BUDGET_BENCH_ARGS[@]}" --incremental --json "$OUT/gpu_kernels_budget.json"
    n2=$(cache_entries)
    note "triton cache: $n0 entries carried, $((n1 - n0)) compiled by the warm-up," \
         "$((n2 - n1)) compiled during the benchmark (0: it ran on the warmed cache)"
    run_logged tests "$(limit 400 5)" "$PY" -m pytest "${BUDGET_TESTS[@]}" -q -rs -n 8 \
        --timeout 120 -p no:cacheprovider --junitxml="$OUT/pytest_budget.xml"
    note "triton cache: $(( $(cache_entries) - n2 )) compiled during the tests"
}

ensure_built() {
    has_cuda_build || build
}

for stage in "${STAGES[@]}"; do
    case "$stage" in
        build) build ;;
        budget) budget ;;
        test)
            ensure_built
            run_logged pytest_gpu 420 "$PY" -m pytest tests -q \
                -m "gpu or interpreter or not slow" -rs --durations=25 \
                --junitxml="$OUT/pytest_gpu.xml"
            run_logged pytest_interpreter 300 env CUDA_VISIBLE_DEVICES= \
                "$PY" -m pytest tests/kernels/test_triton_kernels.py -q -rs \
                --junitxml="$OUT/pytest_interpreter.xml"
            ;;
        cuda)
            ensure_built
            run_logged pytest_cuda_kernels 420 "$PY" -m pytest \
                tests/backends/test_cuda_decode.py tests/backends/test_cuda_tc.py \
                tests/backends/test_cuda_matryoshka.py -q -rs --durations=10 \
                --junitxml="$OUT/pytest_cuda_kernels.xml"
            ;;
        decode)
            ensure_built
            # shellcheck disable=SC2086
            run_logged decode 560 "$PY" benchmarks/bench_decode.py --device cuda \
                --json "$OUT/decode_cuda.json" ${DECODE_ARGS:-}
            [ -s "$OUT/decode_cuda.json" ] && "$PY" benchmarks/plot_results.py \
                "$OUT/decode_cuda.json" >>"$OUT/decode.log" 2>&1
            ;;
        matryoshka)
            ensure_built
            run_logged matryoshka 420 "$PY" benchmarks/bench_matryoshka_gpu.py \
                --json "$OUT/matryoshka_gpu.json"
            ;;
        bench|quick)
            ensure_built
            extra=()
            [ "$stage" = quick ] && extra=(--quick)
            # shellcheck disable=SC2086
            run_logged "bench_$stage" 540 "$PY" benchmarks/bench_gpu_kernels.py \
                ${extra[@]+"${extra[@]}"} ${BENCH_ARGS:-}
            cp benchmarks/results/gpu_kernels_*.json "$OUT/" 2>/dev/null \
                || note "  no JSON results written"
            ;;
        opsbench)
            ensure_built
            # shellcheck disable=SC2086
            run_logged opsbench 540 "$PY" -m pytest benchmarks/test_bench_ops.py -q -rs \
                -p no:cacheprovider --ops-device cuda --ops-profile full --ops-deadline 420 \
                --benchmark-columns median,iqr,rounds,iterations \
                --benchmark-json "$OUT/ops_bench_gpu.json" ${OPSBENCH_ARGS:-}
            if [ -s "$OUT/ops_bench_gpu.json" ]; then
                "$PY" benchmarks/summarize_ops_bench.py "$OUT/ops_bench_gpu.json" \
                    --markdown "$OUT/ops_bench_gpu.md" >"$OUT/ops_bench_gpu.txt" 2>&1 \
                    || { note "  summarize_ops_bench failed (see ops_bench_gpu.txt)"; status=1; }
            else
                note "  no ops_bench_gpu.json written"
            fi
            ;;
        *) note "unknown stage '$stage' (budget, prepare, build, test, cuda, bench, quick," \
                "opsbench, decode, matryoshka)"; status=1 ;;
    esac
done

note "gpu_check: exit status $status"
exit $status
