#!/usr/bin/env bash
# Issue 9's whole GPU check in one command (sized for about five minutes on an H200):
#   1. every phase at 40 frames of 512x512, full SD1.5 architecture, 10 steps (bench_gpu_full.sh);
#   2. host-device syncs inside the steps, 240 frames x 2 steps and 1000 frames x 1 step of PnP on the fly
#      under a ballast that leaves 24 GiB free, and a 3-step profile (gpu_extras.py).
#
#   bash .gpu-carry/run.sh bash benchmarks/gpu_check.sh "$OUT"       # on the device machine
#   bash benchmarks/gpu_check.sh /tmp/out --cpu                     # the code path on a CPU, tiny sizes
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-results}"
mkdir -p "$out"
if [ -z "${PYTHON:-}" ]; then
    # shellcheck source=scripts/host_env.sh
    source "$repo/scripts/host_env.sh"
fi
if [ "${2:-}" = "--cpu" ]; then
    bash "$repo/benchmarks/bench_gpu_full.sh" --device cpu --model tiny --frames 9 --latent 8 --steps 2 --threads 1 \
        --json "$out/gpu40.json" --markdown "$out/gpu40.md"
    "$PYTHON" "$repo/benchmarks/gpu_extras.py" --device cpu --model tiny --latent 8 --sync-frames 9 --long 20:1 \
        --profile-frames 9 --markdown "$out/extras.md"
    exit 0
fi
bash "$repo/benchmarks/bench_gpu_full.sh" --json "$out/gpu40.json" --markdown "$out/gpu40.md" 2>"$out/gpu40.log"
"$PYTHON" "$repo/benchmarks/gpu_extras.py" --device cuda --model full --latent 64 --sync-frames 40 \
    --long 240:2,1000:1 --ballast-free-gib 24 --profile-frames 40 --markdown "$out/extras.md" 2>"$out/extras.log"
