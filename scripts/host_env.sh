# shellcheck shell=bash
# Shared host discovery and Python environment setup for ComfyUI-TokenFlow scripts.
#
#   source scripts/host_env.sh      # from any script (bash); returns non-zero on failure
#
# Exports:
#   COMFYUI_PATH    the ComfyUI host root (holds comfy/model_patcher.py)
#   TOKENFLOW_VENV  the Python virtual environment used for tests and tools
#   PYTHON          that environment's python
#   TOKENFLOW_REPO  this repository's root
#
# Host, in order: $COMFYUI_PATH; the ComfyUI root holding this pack when the repo sits in
# <root>/custom_nodes/<pack>; ~/comfy/ComfyUI; else a fresh clone of ComfyUI $COMFYUI_TAG
# (default v0.3.64) into ~/comfy/ComfyUI when GitHub is reachable. Otherwise it fails and says
# how to provide one; it never skips silently.
#
# Python: $TOKENFLOW_VENV (default ~/comfy/venv) is reused as is when it already imports
# everything the tests need (no reinstall, so reruns are fast); otherwise it is created
# (python3 -m venv) and/or completed with pip. Set TOKENFLOW_TORCH_INDEX_URL to install torch
# from another index (e.g. https://download.pytorch.org/whl/cpu). Everything is logged to stderr.

_tf_log() { printf '[host_env] %s\n' "$*" >&2; }

_tf_is_comfy_root() { [ -n "${1:-}" ] && [ -f "$1/comfy/model_patcher.py" ]; }

# What the environment must provide. The first group is really imported (catches broken
# installs); the rest is only looked up, which keeps a rerun's check to about two seconds.
_TF_IMPORTED_MODULES="torch av einops safetensors pytest cv2"
_TF_PRESENT_MODULES="torchvision torchaudio kornia transformers tokenizers torchsde PIL yaml scipy psutil requests"

_tf_find_host() {
    local tag="${COMFYUI_TAG:-v0.3.64}"
    local url="${COMFYUI_REPO_URL:-https://github.com/comfyanonymous/ComfyUI}"
    local default="$HOME/comfy/ComfyUI"
    if [ -n "${COMFYUI_PATH:-}" ]; then
        if _tf_is_comfy_root "$COMFYUI_PATH"; then
            COMFYUI_PATH="$(cd "$COMFYUI_PATH" && pwd)"
            _tf_log "host: COMFYUI_PATH=$COMFYUI_PATH"
            return 0
        fi
        _tf_log "ERROR: COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI root (no comfy/model_patcher.py)."
        return 1
    fi
    local parent
    parent="$(dirname "$TOKENFLOW_REPO")"
    if [ "$(basename "$parent")" = "custom_nodes" ] && _tf_is_comfy_root "$(dirname "$parent")"; then
        COMFYUI_PATH="$(dirname "$parent")"
        _tf_log "host: the ComfyUI holding this pack: $COMFYUI_PATH"
        return 0
    fi
    if _tf_is_comfy_root "$default"; then
        COMFYUI_PATH="$default"
        _tf_log "host: $COMFYUI_PATH"
        return 0
    fi
    if [ -e "$default" ]; then
        _tf_log "ERROR: $default exists but is not a ComfyUI root; move it away or set COMFYUI_PATH."
        return 1
    fi
    _tf_log "no ComfyUI host found; checking whether $url is reachable to clone $tag ..."
    if command -v git >/dev/null 2>&1 \
        && GIT_TERMINAL_PROMPT=0 timeout 30 git ls-remote --exit-code --tags "$url" "refs/tags/$tag" >/dev/null 2>&1; then
        _tf_log "cloning ComfyUI $tag into $default"
        mkdir -p "$(dirname "$default")" || return 1
        if ! GIT_TERMINAL_PROMPT=0 git clone --quiet --depth 1 --branch "$tag" "$url" "$default" >&2; then
            _tf_log "ERROR: git clone of ComfyUI $tag failed."
            return 1
        fi
        COMFYUI_PATH="$default"
        return 0
    fi
    _tf_log "ERROR: no ComfyUI host found and GitHub is not reachable to clone one."
    _tf_log "  Provide a host in one of these ways, then rerun:"
    _tf_log "    export COMFYUI_PATH=/path/to/ComfyUI        # an existing ComfyUI >= 0.3.64 checkout"
    _tf_log "    git clone --depth 1 --branch $tag $url $default"
    _tf_log "    or put this repository in <ComfyUI>/custom_nodes/"
    return 1
}

# Prints "python X torch Y" and succeeds when $1 is a python with everything the tests need.
_tf_env_ok() {
    local py="$1"
    [ -x "$py" ] || return 1
    "$py" - "$_TF_IMPORTED_MODULES" "$_TF_PRESENT_MODULES" 2>/dev/null <<'PY'
import importlib, importlib.util, sys
for name in sys.argv[1].split():
    importlib.import_module(name)
missing = [name for name in sys.argv[2].split() if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(1)
import torch
print("python", sys.version.split()[0], "torch", torch.__version__)
PY
}

_tf_setup_venv() {
    local venv="${TOKENFLOW_VENV:-$HOME/comfy/venv}"
    local py="$venv/bin/python"
    local versions
    if versions="$(_tf_env_ok "$py")"; then
        _tf_log "python: reusing $venv ($versions)"
    else
        if [ ! -x "$py" ]; then
            local boot="${TOKENFLOW_BOOTSTRAP_PYTHON:-python3}"
            if ! "$boot" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
                _tf_log "ERROR: need Python >= 3.10 to create $venv (set TOKENFLOW_BOOTSTRAP_PYTHON or TOKENFLOW_VENV)."
                return 1
            fi
            _tf_log "creating virtual environment $venv with $("$boot" --version 2>&1)"
            "$boot" -m venv "$venv" >&2 || { _tf_log "ERROR: python -m venv $venv failed."; return 1; }
        else
            _tf_log "python: $venv misses some of: $_TF_IMPORTED_MODULES $_TF_PRESENT_MODULES; installing"
        fi
        local pip=("$py" -m pip install --disable-pip-version-check)
        local torch_index=()
        [ -n "${TOKENFLOW_TORCH_INDEX_URL:-}" ] && torch_index=(--index-url "$TOKENFLOW_TORCH_INDEX_URL")
        _tf_log "pip install torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"
        "${pip[@]}" ${torch_index[@]+"${torch_index[@]}"} torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0 >&2 \
            || { _tf_log "ERROR: installing torch failed."; return 1; }
        _tf_log "pip install -r $COMFYUI_PATH/requirements.txt, test tools and $TOKENFLOW_REPO/requirements.txt"
        "${pip[@]}" -r "$COMFYUI_PATH/requirements.txt" requests pytest opencv-python-headless \
            -r "$TOKENFLOW_REPO/requirements.txt" >&2 \
            || { _tf_log "ERROR: installing the host's and this pack's requirements failed."; return 1; }
        if ! versions="$(_tf_env_ok "$py")"; then
            _tf_log "ERROR: $venv still lacks some of: $_TF_IMPORTED_MODULES $_TF_PRESENT_MODULES"
            return 1
        fi
        _tf_log "python: $venv ready ($versions)"
    fi
    TOKENFLOW_VENV="$venv"
    PYTHON="$py"
}

_tf_host_env_main() {
    TOKENFLOW_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    _tf_find_host || return 1
    if [ -f "$COMFYUI_PATH/comfyui_version.py" ]; then
        _tf_log "ComfyUI version $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFYUI_PATH/comfyui_version.py")"
    fi
    _tf_setup_venv || return 1
    export COMFYUI_PATH PYTHON TOKENFLOW_VENV TOKENFLOW_REPO
}

if ! _tf_host_env_main; then
    _tf_log "host/venv setup failed"
    # shellcheck disable=SC2317
    return 1 2>/dev/null || exit 1
fi
