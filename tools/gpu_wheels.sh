#!/usr/bin/env bash
# Download, here, the wheels a bare GPU machine lacks for tools/gpu_check.py, into one folder
# (default .gpu_wheels/, git-ignored) that travels with the command (the device tool's `carry`).
#
# The GPU machine has python3.12 with a CUDA build of torch, onnx and a CPU onnxruntime; it
# reaches no package index. diffusers and what it needs at import time come from here, for
# CPython 3.12 on manylinux x86_64; torch is never downloaded (the machine's CUDA build is used).
# tools/gpu_check.sh installs from this folder with --no-index, so pip takes only what is missing.
#
#   bash tools/gpu_wheels.sh [DEST] [PYTHON_VERSION]     e.g. bash tools/gpu_wheels.sh .gpu_wheels 3.12
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.gpu_wheels}"
PYVER="${2:-3.12}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$DEST"
# the versions this project is tested with (FACTS: diffusers 0.42.1); their dependencies resolved for the target
"$PYTHON" -m pip download --quiet --disable-pip-version-check --dest "$DEST" --only-binary=:all: \
  --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any \
  "diffusers==0.42.1" "safetensors>=0.4" "tqdm>=4.60" "numpy>=1.24,<3"
# torch and CUDA wheels must never travel: the machine has its own build
rm -f "$DEST"/torch-*.whl "$DEST"/nvidia_*.whl "$DEST"/triton-*.whl
du -sh "$DEST"
ls "$DEST"
