#!/usr/bin/env bash
# The README's main job on the embedded default (wan2.1-tiny, CPU, a few minutes):
# calibrate a 2x ERTACache profile, then generate the same prompt cached and uncached.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/tools/bootstrap.sh"
cd "$ROOT"
OUT="${1:-$ROOT/engines/demo}"
PROMPT="${PROMPT:-digit 3 moving left}"
mkdir -p "$OUT"
ertacache-profile --model wan2.1-tiny --steps 50 --speedup 2.0 --out "$OUT/profile" --force
ertacache-generate --model wan2.1-tiny --no-cache --prompt "$PROMPT" --seed 1 --out "$OUT/uncached.gif"
ertacache-generate --model wan2.1-tiny --profile "$OUT/profile" --prompt "$PROMPT" --seed 1 --out "$OUT/cached.gif"
echo
echo "profile:        $OUT/profile (profile.json, correction.safetensors, error_profile.png)"
echo "videos:         $OUT/uncached.gif  $OUT/cached.gif"
