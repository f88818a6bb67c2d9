#!/usr/bin/env bash
# Full-size check on a GPU: a 50-step TokenFlow PnP edit of 40 frames at 512x512 (latent 64x64) with a
# random-weight UNet of the real SD1.5 architecture (860M parameters, ComfyUI's own dtype choice:
# fp16 on most GPUs), against the 30 s target and against plain CFG sampling of the same frames.
#
#   bash benchmarks/bench_gpu_full.sh                       # on a CUDA machine
#   bash benchmarks/bench_gpu_full.sh --device cpu --frames 2 --latent 8 --steps 2   # code-path check, no GPU
#
# Extra arguments go to bench_tokenflow.py and override the defaults below (the last one wins).
# The inversion runs 50 steps here (time is reported per step: the official 500 steps cost 10x that).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    # shellcheck source=scripts/host_env.sh
    source "$repo/scripts/host_env.sh"
fi
exec "$PYTHON" "$repo/benchmarks/bench_tokenflow.py" --device cuda --model full --frames 40 --latent 64 --steps 50 \
    --phases inversion,plain,pnp --repeats 1 --threads 0 --target-seconds 30 "$@"
