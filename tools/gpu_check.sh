#!/usr/bin/env bash
# Run tools/gpu_check.py on a bare GPU machine in one command:
#   bash tools/gpu_check.sh WHEELS_DIR [gpu_check.py args...]      e.g. bash tools/gpu_check.sh .gpu_wheels
# 1. makes a venv over the system Python (--system-site-packages: the machine's CUDA torch is used as is),
# 2. installs what is missing from WHEELS_DIR only (no index; tools/gpu_wheels.sh prepared it),
# 3. runs the check with this checkout on PYTHONPATH, writing into $OUT (the device tool's output
#    folder) or gpu_check_out/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${1:?usage: bash tools/gpu_check.sh WHEELS_DIR [gpu_check.py args...]}"
shift
VENV="${GPU_CHECK_VENV:-/tmp/ertacache-gpu-venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" \
  "diffusers==0.42.1" "safetensors>=0.4" "tqdm>=4.60"
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
OUT_DIR="${OUT:-$ROOT/gpu_check_out}"
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$VENV/bin/python" tools/gpu_check.py --out "$OUT_DIR" "$@"
