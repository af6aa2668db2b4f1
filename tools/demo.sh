#!/usr/bin/env bash
# The README's main job on the embedded default (wan2.1-tiny, CPU, a few minutes):
#   1. calibrate a 2x ERTACache profile (50 steps),
#   2. bake it into static full-step / cached-step graphs (ONNX + AOTInductor), validated vs eager,
#   3. run the exported graphs with ONNX Runtime and write the video,
#   4. verify the runtime against the eager cached sampler, and generate the uncached reference.
# Everything lands in engines/demo/ (or the folder given as $1); the README's next steps reuse it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/tools/bootstrap.sh"
cd "$ROOT"
OUT="${1:-engines/demo}"
PROMPT="${PROMPT:-digit 3 moving left}"
mkdir -p "$OUT"
ertacache-profile --model wan2.1-tiny --steps 50 --speedup 2.0 --out "$OUT/profile" --force
ertacache-export --model wan2.1-tiny --profile "$OUT/profile" --targets onnx,aoti --engines "$OUT/export" --force
ertacache-run --engines "$OUT/export" --backend onnxruntime --prompt "$PROMPT" --seed 1 --out "$OUT/cached.gif" --force
ertacache-verify --engines "$OUT/export" --backend onnxruntime --prompt "$PROMPT" --seed 1
ertacache-generate --model wan2.1-tiny --no-cache --prompt "$PROMPT" --seed 1 --out "$OUT/uncached.gif" --force
cat <<SUMMARY

Everything is in $OUT/:
  profile   $OUT/profile   (profile.json, correction.safetensors, error_profile.png: the 2x schedule)
  export    $OUT/export    (manifest.json, onnx/, aoti/, profile/: the static step graphs)
  videos    $OUT/cached.gif (exported graphs, ONNX Runtime)   $OUT/uncached.gif (eager, every step full)

Next, reusing this profile and export folder (no second calibration):
  . .venv/bin/activate
  ertacache-generate --model wan2.1-tiny --profile $OUT/profile --prompt "digit 7 moving up" --seed 3 --out seven.gif
  ertacache-run --engines $OUT/export --backend aoti --prompt "digit 7 moving up" --seed 3 --out seven-aoti.gif
  ertacache-triton --engines $OUT/export --repo engines/triton     # then: serve it (README, "Serving")
SUMMARY
