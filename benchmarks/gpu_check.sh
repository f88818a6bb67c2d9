#!/usr/bin/env bash
# The whole GPU check of TokenFlow's cost against plain CFG in one command (sized for about five minutes on an H200):
#   1. every phase at 40 frames of 512x512, full SD1.5 architecture, 10 steps (bench_gpu_full.sh);
#   2. host-device syncs inside the steps, 240 frames x 2 steps and 1000 frames x 1 step of PnP on the fly
#      under a ballast that leaves 24 GiB free, and a 3-step profile (gpu_extras.py);
#   3. Flux / SD3.5 at real widths (fewer blocks), 40 frames of 512x512, 4 steps: seconds per step against plain
#      Euler sampling, peak memory (bench_dit_gpu.py; about 3 more minutes, most of it building the models).
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
    "$PYTHON" "$repo/benchmarks/bench_dit_gpu.py" --device cpu --size tiny --frames 4 --latent 8 --steps 2 \
        --batch-size 2 --markdown "$out/dit.md"
    exit 0
fi
bash "$repo/benchmarks/bench_gpu_full.sh" --json "$out/gpu40.json" --markdown "$out/gpu40.md" 2>"$out/gpu40.log"
"$PYTHON" "$repo/benchmarks/gpu_extras.py" --device cuda --model full --latent 64 --sync-frames 40 \
    --long 240:2,1000:1 --ballast-free-gib 24 --profile-frames 40 --markdown "$out/extras.md" 2>"$out/extras.log"
"$PYTHON" "$repo/benchmarks/bench_dit_gpu.py" --device cuda --size real --frames 40 --latent 64 --steps 4 \
    --markdown "$out/dit.md" 2>"$out/dit.log"
