#!/usr/bin/env bash
# The main job: edit a video with TokenFlow, headless (no browser), on a real ComfyUI host.
#
#   bash scripts/run.sh --video wolf.mp4 --prompt "a shiny silver robotic wolf" --inversion-prompt "a wolf" \
#       --checkpoint /path/to/v2-1_512-ema-pruned.safetensors --output robot_wolf.mp4
#
# Finds (or sets up) the ComfyUI host and the Python environment through scripts/host_env.sh, then
# runs scripts/tokenflow_edit.py with the given arguments (--help lists them). Exit code: the runner's.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/host_env.sh
source "$repo/scripts/host_env.sh"

exec "$PYTHON" "$repo/scripts/tokenflow_edit.py" --comfyui "$COMFYUI_PATH" "$@"
