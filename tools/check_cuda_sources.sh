#!/usr/bin/env bash
# Compile-check the CUDA sources on a machine without a GPU (and without a CUDA build of torch):
#  1. every torch-free csrc/cuda/*.cu with nvcc for sm_80 and sm_90a (objects only; setup.py builds 9.0 as 9.0a);
#  2. every CUDA glue csrc/cuda/*.cpp with g++ -fsyntax-only against the installed torch's headers, with a stand-in
#     for the one header only a CUDA build of torch generates (tools/stub_include).
# Usage: tools/check_cuda_sources.sh [--glue-only] [PYTHON]   (exit 0 = all compile; part 1 skipped without nvcc)
# (--glue-only: CMake's jedi_cuda_check target already compiles the .cu files)
set -euo pipefail
cd "$(dirname "$0")/.."
GLUE_ONLY=0
if [ "${1:-}" = "--glue-only" ]; then GLUE_ONLY=1; shift; fi
PY=${1:-python}
JOBS=${MAX_JOBS:-$(nproc)}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
status=0

shopt -s nullglob
cu=(csrc/cuda/*.cu)
if [ $GLUE_ONLY = 1 ]; then
  :
elif command -v nvcc >/dev/null; then
  # the flags torch's extension build passes to nvcc (no implicit half/bfloat16 conversions or operators)
  NVF=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join(c.COMMON_NVCC_FLAGS))" 2>/dev/null) \
    || NVF="-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr"
  echo "nvcc check: ${#cu[@]} files (sm_80, sm_90a), $JOBS jobs, torch's flags: $NVF"
  printf '%s\n' "${cu[@]}" | xargs -P "$JOBS" -I{} sh -c \
    'nvcc -std=c++17 -O3 $2 -DJEDI_SM90A -Icsrc/cuda -c -gencode arch=compute_80,code=sm_80 \
       -gencode arch=compute_90a,code=sm_90a -o "$1/$(basename {}).o" {} && echo "  ok   {}" || { echo "  FAIL {}"; exit 255; }' _ "$OUT" "$NVF" \
    || status=1
else
  echo "nvcc not found: skipping the .cu compile check"
fi

glue=(csrc/cuda/*.cpp)
TI=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))")
CUDA_INC=-I${CUDA_HOME:-/usr/local/cuda}/include
echo "glue syntax check: ${#glue[@]} files"
printf '%s\n' "${glue[@]}" | xargs -P "$JOBS" -I{} sh -c \
  "g++ -std=c++20 -fsyntax-only -DJEDI_WITH_CUDA -Itools/stub_include $TI $CUDA_INC -Icsrc -Icsrc/cuda {} && echo '  ok   {}' || { echo '  FAIL {}'; exit 255; }" \
  || status=1
exit $status
