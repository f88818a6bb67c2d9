#!/usr/bin/env bash
# Full-size check on a GPU: every phase at 40 frames of 512x512 (latent 64x64), 10 steps, with a
# random-weight UNet (and ControlNet) of the real SD1.5 architecture (860M parameters, ComfyUI's own
# dtype choice: fp16 on most GPUs): seconds per step against plain CFG (targets: PnP on the fly <= 1.7x,
# PnP extracted <= 1.5x, SDEdit / ControlNet extracted <= 1.15x, inversion <= 0.55x), peak memory, UNet
# calls and torch ops per step. Ten steps give the same per-step mix as fifty (--mix-steps 50).
#
#   bash benchmarks/bench_gpu_full.sh                       # on a CUDA machine (../shared/gpu/README.md)
#   bash benchmarks/bench_gpu_full.sh --device cpu --model tiny --frames 9 --latent 8 --steps 2   # code path, no GPU
#
# Extra arguments go to bench_tokenflow.py and override the defaults below (the last one wins).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    # shellcheck source=scripts/host_env.sh
    source "$repo/scripts/host_env.sh"
fi
exec "$PYTHON" "$repo/benchmarks/bench_tokenflow.py" --device cuda --model full --frames 40 --latent 64 --steps 10 \
    --phases inversion,extraction,plain,plain_controlnet,pnp,pnp_extracted,sdedit_extracted,controlnet_extracted \
    --repeats 1 --threads 0 "$@"
