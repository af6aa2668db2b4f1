#!/usr/bin/env bash
# The README's test command: make the environment, then run the test suite.
# With no arguments it also runs tests/serving in .venv-triton (tools/triton_env.sh): those tests
# start a real Triton server, whose nvidia-pytriton wheel and tritonclient need numpy<2.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/tools/bootstrap.sh"
cd "$ROOT"
if [ "$#" -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
python -m pytest -q
# shellcheck disable=SC1091
. "$ROOT/tools/triton_env.sh"
exec "$TRITON_PYTHON" -m pytest -q tests/serving
