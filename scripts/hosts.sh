# shellcheck shell=bash
# The ComfyUI releases this pack is tested on, oldest first: the minimum (pyproject's
# requires-comfyui) and the newest one reachable. scripts/host_env.sh finds or sets up each;
# `bash scripts/test.sh --all-hosts` runs the suite on every one of them.
TOKENFLOW_HOSTS=(v0.3.64 v0.8.0)
TOKENFLOW_MIN_HOST="${TOKENFLOW_HOSTS[0]}"
