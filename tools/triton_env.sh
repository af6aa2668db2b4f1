#!/usr/bin/env bash
# Create (or reuse) .venv-triton: the environment that runs Triton Inference Server and its clients.
# Sourced by tools/test.sh (which then runs tests/serving in it); `bash tools/triton_env.sh` alone
# just builds it. Separate from .venv because nvidia-pytriton (which carries a Triton 2.51 server
# build) requires numpy<2, and the Python-backend model.py runs in this environment too, so it
# holds the whole project (editable) as well: torch pinned to the CPU build as in bootstrap.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TRITON_VENV="${ERTACACHE_TRITON_VENV:-$ROOT/.venv-triton}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$TRITON_VENV/bin/python" ]; then
  echo "[triton_env] creating $TRITON_VENV"
  "$PYTHON" -m venv "$TRITON_VENV"
fi
stamp="$TRITON_VENV/.ertacache-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] || [ "${BASH_SOURCE[0]}" -nt "$stamp" ]; then
  echo "[triton_env] installing nvidia-pytriton, tritonclient, torch==2.13.0 and ertacache[dev] with numpy<2 (a minute or two)"
  "$TRITON_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "numpy<2" "torch==2.13.0" "nvidia-pytriton==0.7.0" "tritonclient[http,grpc]" -e "$ROOT[dev]"
  touch "$stamp"
fi
export TRITON_PYTHON="$TRITON_VENV/bin/python"
