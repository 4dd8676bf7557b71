#!/usr/bin/env bash
# The whole CPU test suite, as CI runs it (README: `make test`):
#   build/refresh the venv, compile-check every CUDA source (nvcc, when present) and the CUDA glue, build the C++
#   tests with CMake and run ctest, compile every Triton kernel for sm_90/sm_80 (tools/triton_aot_check.py), run
#   pytest (Triton kernels through TRITON_INTERPRET=1), then a benchmark smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${JEDI_VENV:-.venv}
scripts/setup_env.sh
VPY="$VENV/bin/python"
export PATH="$PWD/$VENV/bin:$PATH"
JOBS=${MAX_JOBS:-$(nproc)}

echo "[test] CUDA glue syntax check"
tools/check_cuda_sources.sh --glue-only "$VPY"

echo "[test] CMake build (+ nvcc compile check of csrc/cuda/*.cu when nvcc exists) and ctest"
mkdir -p build
cmake -S . -B build/cmake -DPython_EXECUTABLE="$PWD/$VPY" -DCMAKE_BUILD_TYPE=Release >build/cmake.log 2>&1 \
  || { cat build/cmake.log; exit 1; }
cmake --build build/cmake -j "$JOBS" >>build/cmake.log 2>&1 || { tail -60 build/cmake.log; exit 1; }
ctest --test-dir build/cmake --output-on-failure

echo "[test] Triton kernels compiled for sm_90 and sm_80 (ptxas; the interpreter cannot catch GPU compile errors)"
"$VPY" tools/triton_aot_check.py --arch 90 --arch 80 --no-spills >build/triton_aot.log 2>&1 \
  || { grep -E "rror|spills [1-9]" build/triton_aot.log | head -20; tail -3 build/triton_aot.log; exit 1; }
tail -1 build/triton_aot.log

echo "[test] pytest"
export TRITON_INTERPRET=1
"$VPY" -m pytest tests -q -p no:cacheprovider "$@"

echo "[test] benchmark smoke run"
"$VPY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider --benchmark-min-rounds=1 \
  --benchmark-max-time=0.05 --benchmark-warmup=off
