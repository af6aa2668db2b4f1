#!/usr/bin/env bash
# The README's test command: make the environment, then run the test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/tools/bootstrap.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
