#!/usr/bin/env bash
# Put part N of the packed onnxruntime-gpu archive (from /tmp/ortparts_local/)
# alone into .whl/ at the repository root, ready to travel to the GPU machine
# with a device call that carries ".whl" and runs:
#   mkdir -p /tmp/ortparts && cp .whl/part-NN /tmp/ortparts/
# Usage: benchmarks/stage_part.sh N
set -euo pipefail
n=$(printf '%02d' "${1:?usage: stage_part.sh N}")
root=$(cd "$(dirname "$0")/.." && pwd)
src=${ORT_PARTS_LOCAL:-/tmp/ortparts_local}/part-$n
[ -f "$src" ] || { echo "no $src" >&2; exit 1; }
rm -rf "$root/.whl"
mkdir -p "$root/.whl"
cp "$src" "$root/.whl/"
ls -l "$root/.whl"
