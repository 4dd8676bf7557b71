#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment and build the package into it, from nothing but Python 3.10+.
#   scripts/setup_env.sh            -> .venv with CPU torch 2.13, triton 3.6, numpy<2.4, test extras; builds _C
# Env: PYTHON (interpreter for the venv, default python3), JEDI_VENV (default .venv), JEDI_TORCH_INDEX (a PyTorch
# wheel index URL, e.g. https://download.pytorch.org/whl/cpu, when PyPI's default torch is not the one you want),
# JEDI_SKIP_EXT=1 (pure-Python install), MAX_JOBS.
# Re-running is cheap: nothing is reinstalled unless the build inputs changed (stamp file in the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${JEDI_VENV:-.venv}

"$PY" -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is required"'
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $("$PY" --version)"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

stamp_now=$(cat pyproject.toml setup.py scripts/setup_env.sh csrc/*.cpp csrc/cpu/*.cpp 2>/dev/null | sha1sum | cut -c1-16)
stamp_now="$stamp_now-${JEDI_SKIP_EXT:-0}"
if [ -f "$VENV/.jedi-stamp" ] && [ "$(cat "$VENV/.jedi-stamp")" = "$stamp_now" ] && "$VPY" -c "import jedi_kernels" 2>/dev/null; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

echo "[setup] installing dependencies"
"$VPY" -m pip install -q --upgrade pip setuptools wheel
idx=()
if [ -n "${JEDI_TORCH_INDEX:-}" ]; then idx=(--index-url "$JEDI_TORCH_INDEX" --extra-index-url https://pypi.org/simple); fi
# torch first, pinned: everything after must reuse it (numpy<2.4 for the Triton interpreter, triton 3.6)
"$VPY" -m pip install -q "${idx[@]}" "torch==2.13.0"
"$VPY" -m pip install -q "numpy<2.4" "triton==3.6.*" pybind11 ninja

echo "[setup] building jedi-kernels (pip install -e . --no-build-isolation)"
# --no-build-isolation: build against the torch installed above (an isolated build env would fetch another torch
# and the extension would not load: ABI mismatch)
"$VPY" -m pip install -q --no-build-isolation -e ".[test,diffusers]"
"$VPY" -c "import jedi_kernels as jk; print('[setup] backends:', {k: v for k, v in jk.available_backends().items() if k != 'reasons'})"
echo "$stamp_now" > "$VENV/.jedi-stamp"
