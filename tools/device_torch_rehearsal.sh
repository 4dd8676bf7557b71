#!/usr/bin/env bash
# Rehearse the GPU machine's software on this CPU machine, before spending device time on it.
#
# The GPU machines run a CUDA build of torch (2.11.0+cu130 as of 2026-11, see the device tool's KINDS.md) with the
# machine's own setuptools and `pip install -e . --no-build-isolation`; CI runs a CPU torch. The differences bit us
# once: torch's extension build passes -D__CUDA_NO_HALF_CONVERSIONS__ & co. to nvcc, and a source that passed every
# CPU-side check failed the real build. This script installs that torch (CUDA wheel from PyPI with its CUDA
# libraries, ~3 GB; no GPU needed to import it) in a venv and, in a fresh clone of HEAD:
#   1. runs `benchmarks/gpu_check.sh --part kernels` with it: the real CUDA build of the extension exactly as on
#      the device (every GPU test then skips cleanly, the sweep reports that it needs a GPU);
#   2. runs the CPU test suite (Triton through TRITON_INTERPRET=1) and the benchmark smoke run against that build.
# Usage: tools/device_torch_rehearsal.sh [VENV]   (default /tmp/jedi-devtorch; reused when it exists)
#   JEDI_DEVICE_TORCH=2.11.0  the torch version to rehearse;  JEDI_REHEARSAL_INDEX=https://pypi.org/simple
#   JEDI_REHEARSAL_PYTHON     the interpreter for the venv (default python3.12, the device's, when installed)
# Needs nvcc (CUDA 13 for cu130 torch) and network access to the index. Not part of CI (the download is too big);
# run it after touching csrc/, setup.py, pyproject.toml or benchmarks/gpu_check.sh. ~10 min on 2 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-/tmp/jedi-devtorch}
TORCH=${JEDI_DEVICE_TORCH:-2.11.0}
INDEX=${JEDI_REHEARSAL_INDEX:-https://pypi.org/simple}
PY=$VENV/bin/python
BASE_PY=${JEDI_REHEARSAL_PYTHON:-python3}
if [ -z "${JEDI_REHEARSAL_PYTHON:-}" ] && python3.12 -c "" 2>/dev/null; then BASE_PY=python3.12; fi  # (a shim may fail)

if [ ! -x "$PY" ] || ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH')" 2>/dev/null; then
  echo "[rehearsal] venv $VENV with torch $TORCH (CUDA wheel) from $INDEX"
  "$BASE_PY" -m venv "$VENV"
  "$PY" -m pip install -q --index-url "$INDEX" "torch==$TORCH" "numpy<2.4" pytest pytest-benchmark matplotlib \
    einops safetensors tqdm pyyaml pillow transformers diffusers ninja pybind11 wheel
fi
"$PY" -c "import sys, torch, triton, setuptools; print('[rehearsal] python', sys.version.split()[0], 'torch',
  torch.__version__, 'triton', triton.__version__, 'setuptools', setuptools.__version__)"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
git clone -q "$ROOT" "$WORK/repo"
cd "$WORK/repo"
echo "[rehearsal] gpu_check.sh --part kernels (the device's build step; GPU steps skip)"
PYTHON="$PY" benchmarks/gpu_check.sh "$WORK/out" --part kernels >"$WORK/gpu_check.out" 2>&1 || true
grep -E "^(torch|nvcc|build:|pytest rc|harness rc|sweep rc|bench rc|results.json)" "$WORK/out/gpu_check.log"
grep -q "^build: full" "$WORK/out/gpu_check.log" || { echo "[rehearsal] FAIL: the full CUDA build failed"; \
  tar xzf "$WORK/out/logs.tgz" -C "$WORK/out" build.log 2>/dev/null; grep -E "error" "$WORK/out/build.log" | head -20; exit 1; }
"$PY" -c "
import torch, jedi_kernels
names = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith('jedi::')}
need = {'jedi::prepare_inputs_ext', 'jedi::set_attention_fwd_ext', 'jedi::set_attention_bwd_ext'}
assert need <= names, names
for n in sorted(need):
    assert 'CUDA: registered' in torch._C._dispatch_dump(n), n + ' has no CUDA kernel'
print('[rehearsal] extension loads; CUDA kernels registered for', ', '.join(sorted(need)))
"
echo "[rehearsal] CPU test suite and benchmark smoke run against the CUDA build"
export TRITON_INTERPRET=1
"$PY" -m pytest tests -q -p no:cacheprovider -x
"$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider --benchmark-min-rounds=1 \
  --benchmark-max-time=0.05 --benchmark-warmup=off
echo "[rehearsal] OK: torch $TORCH builds, loads and passes the CPU suite"
