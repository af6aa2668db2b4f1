#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install ertacache into it.
# Sourced by tools/demo.sh and tools/test.sh, so each README command makes its own environment.
# torch is pinned to the CPU build 2.13.0 here (installing an unpinned torch pulls GBs of CUDA
# wheels); the package metadata itself accepts any torch >= 2.5, CUDA builds included.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ERTACACHE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.ertacache-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "[bootstrap] installing torch==2.13.0 and ertacache[dev] (a minute or two)"
  python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  python -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]"
  touch "$stamp"
fi
