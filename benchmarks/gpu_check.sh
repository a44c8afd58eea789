#!/usr/bin/env bash
# GPU check of pyengine on a fresh GPU machine (torch, triton, cmake, ninja, pybind11
# preinstalled; no network needed): build the extension, run the GPU tests, run the GPU kernel
# benchmark, and copy logs + JSON results to "$OUT".
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh [STAGE ...]
#
# Stages (default: build test bench), each under its own time limit so that its log survives a
# tool that kills long commands:
#   build   pip install --no-build-isolation --no-deps -e .  (CUDA kernels for this GPU's arch
#           only, unless PYENGINE_CUDA_ARCHS is set), then build_info
#   test    pytest -m "gpu or interpreter or not slow" on the GPU, then the Triton tests once
#           more under the interpreter with the GPU hidden (CUDA_VISIBLE_DEVICES=)
#   cuda    only tests/test_cuda_decode.py, tests/test_cuda_tc.py and tests/test_cuda_matryoshka.py
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

if [ -z "${PYENGINE_CUDA_ARCHS:-}" ]; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
          | head -n1 | tr -d ' .')
    case "$cap" in
        "") ;;
        90) export PYENGINE_CUDA_ARCHS="90a" ;;
        *) export PYENGINE_CUDA_ARCHS="$cap" ;;
    esac
fi

{
    date -u
    nvidia-smi 2>&1
    python - <<'PY' 2>&1
import sys, torch, triton
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY
    echo "PYENGINE_CUDA_ARCHS=${PYENGINE_CUDA_ARCHS:-<default>}"
    git rev-parse HEAD 2>/dev/null
    git status --short 2>/dev/null | head -50
} >"$OUT/environment.txt" 2>&1
note "environment: $(grep -m1 '^device' "$OUT/environment.txt"); archs ${PYENGINE_CUDA_ARCHS:-default}"

has_cuda_build() {
    python -c "import sys, pyengine; sys.exit(0 if pyengine.build_info()['cuda_kernels'] else 1)" \
        >/dev/null 2>&1
}

build() {
    run_logged build 480 python -m pip install --no-build-isolation --no-deps -v -e .
    python - >"$OUT/build_info.txt" 2>&1 <<'PY'
import json, pyengine
print(json.dumps(pyengine.build_info(), indent=1))
print("available backends:", pyengine.available_backends())
PY
    tee -a "$SUMMARY" <"$OUT/build_info.txt"
}

ensure_built() {
    has_cuda_build || build
}

for stage in "${STAGES[@]}"; do
    case "$stage" in
        build) build ;;
        test)
            ensure_built
            run_logged pytest_gpu 420 python -m pytest tests -q \
                -m "gpu or interpreter or not slow" -rs --durations=25 \
                --junitxml="$OUT/pytest_gpu.xml"
            run_logged pytest_interpreter 300 env CUDA_VISIBLE_DEVICES= \
                python -m pytest tests/test_triton_kernels.py -q -rs \
                --junitxml="$OUT/pytest_interpreter.xml"
            ;;
        cuda)
            ensure_built
            run_logged pytest_cuda_kernels 420 python -m pytest tests/test_cuda_decode.py \
                tests/test_cuda_tc.py tests/test_cuda_matryoshka.py -q -rs --durations=10 \
                --junitxml="$OUT/pytest_cuda_kernels.xml"
            ;;
        decode)
            ensure_built
            # shellcheck disable=SC2086
            run_logged decode 560 python benchmarks/bench_decode.py --device cuda \
                --json "$OUT/decode_cuda.json" ${DECODE_ARGS:-}
            [ -s "$OUT/decode_cuda.json" ] && python benchmarks/plot_results.py \
                "$OUT/decode_cuda.json" >>"$OUT/decode.log" 2>&1
            ;;
        matryoshka)
            ensure_built
            run_logged matryoshka 420 python benchmarks/bench_matryoshka_gpu.py \
                --json "$OUT/matryoshka_gpu.json"
            ;;
        bench|quick)
            ensure_built
            extra=()
            [ "$stage" = quick ] && extra=(--quick)
            # shellcheck disable=SC2086
            run_logged "bench_$stage" 540 python benchmarks/bench_gpu_kernels.py \
                ${extra[@]+"${extra[@]}"} ${BENCH_ARGS:-}
            cp benchmarks/results/gpu_kernels_*.json "$OUT/" 2>/dev/null \
                || note "  no JSON results written"
            ;;
        opsbench)
            ensure_built
            # shellcheck disable=SC2086
            run_logged opsbench 540 python -m pytest benchmarks/test_bench_ops.py -q -rs \
                -p no:cacheprovider --ops-device cuda --ops-profile full --ops-deadline 420 \
                --benchmark-columns median,iqr,rounds,iterations \
                --benchmark-json "$OUT/ops_bench_gpu.json" ${OPSBENCH_ARGS:-}
            if [ -s "$OUT/ops_bench_gpu.json" ]; then
                python benchmarks/summarize_ops_bench.py "$OUT/ops_bench_gpu.json" \
                    --markdown "$OUT/ops_bench_gpu.md" >"$OUT/ops_bench_gpu.txt" 2>&1 \
                    || { note "  summarize_ops_bench failed (see ops_bench_gpu.txt)"; status=1; }
            else
                note "  no ops_bench_gpu.json written"
            fi
            ;;
        *) note "unknown stage '$stage' (build, test, cuda, bench, quick, opsbench, decode," \
                "matryoshka)"; status=1 ;;
    esac
done

note "gpu_check: exit status $status"
exit $status
