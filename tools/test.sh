#!/usr/bin/env bash
# The README's test command: make the environment, then run the test suite.
#   bash tools/test.sh                  what CI runs: the whole suite, then tests/serving again in
#                                       .venv-triton (tools/triton_env.sh builds it on first use: it
#                                       starts a real Triton server, whose nvidia-pytriton wheel and
#                                       tritonclient need numpy<2)
#   bash tools/test.sh -m "not slow"    the fast lane; any arguments go to pytest, in .venv only
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/tools/bootstrap.sh"
cd "$ROOT"
if [ "$#" -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
echo "[test] the whole suite in .venv (tens of minutes on 2 cores; the fast lane is: bash tools/test.sh -m \"not slow\")"
python -m pytest -q
echo "[test] tests/serving in .venv-triton (a real Triton server; the environment is built on first use)"
# shellcheck disable=SC1091
. "$ROOT/tools/triton_env.sh"
exec "$TRITON_PYTHON" -m pytest -q tests/serving
