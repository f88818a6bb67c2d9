# shellcheck shell=bash
# Shared host discovery and Python environment setup for ComfyUI-TokenFlow scripts.
#
#   source scripts/host_env.sh                        # from any script (bash); non-zero on failure
#   TOKENFLOW_HOST=v0.8.0 source scripts/host_env.sh  # one of the tested hosts (scripts/hosts.sh)
#
# Exports:
#   COMFYUI_PATH    the ComfyUI host root (holds comfy/model_patcher.py)
#   TOKENFLOW_VENV  the Python virtual environment used for tests and tools
#   PYTHON          that environment's python
#   TOKENFLOW_REPO  this repository's root
#
# Host, without TOKENFLOW_HOST: $COMFYUI_PATH; the ComfyUI root holding this pack when the repo
# sits in <root>/custom_nodes/<pack>; ~/comfy/ComfyUI; else a fresh clone of the minimum host
# (scripts/hosts.sh) into ~/comfy/ComfyUI when GitHub is reachable.
# Host with TOKENFLOW_HOST=<tag> (what `scripts/test.sh --all-hosts` sets for each tested host):
# $COMFYUI_PATH_<TAG> (v0.8.0 -> COMFYUI_PATH_V0_8_0); for the minimum host the places above;
# for a newer one ComfyUI-<tag> beside the minimum host (~/comfy/ComfyUI-v0.8.0 by default); else a
# clone of the tag there when GitHub is reachable. The host's comfyui_version.py must say that tag.
# Otherwise it fails and says how to provide one; it never skips silently.
#
# Python: $TOKENFLOW_VENV (with TOKENFLOW_HOST: $TOKENFLOW_VENV_<TAG>), else ~/comfy/venv for the
# minimum host and ~/comfy/venv-v<version> for any other, so every host has its own venv made
# from its own requirements.txt. A venv is reused as is when it imports everything the tests need
# and its stamp matches the host's and this pack's requirements (a rerun takes about two
# seconds); otherwise it is created (python -m venv) and/or completed with pip. Set
# TOKENFLOW_TORCH_INDEX_URL to install torch from another index (e.g.
# https://download.pytorch.org/whl/cpu). Everything is logged to stderr.

# shellcheck source=scripts/hosts.sh
source "$(dirname "${BASH_SOURCE[0]}")/hosts.sh"
_TF_TORCH_PINS="torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"
_TF_REPO_URL="${COMFYUI_REPO_URL:-https://github.com/comfyanonymous/ComfyUI}"

_tf_log() { printf '[host_env] %s\n' "$*" >&2; }

_tf_is_comfy_root() { [ -n "${1:-}" ] && [ -f "$1/comfy/model_patcher.py" ]; }

# What the environment must provide. The first group is really imported (catches broken
# installs); the rest is only looked up, which keeps a rerun's check to about two seconds.
_TF_IMPORTED_MODULES="torch av einops safetensors pytest cv2"
_TF_PRESENT_MODULES="torchvision torchaudio kornia transformers tokenizers torchsde PIL yaml scipy psutil requests"

# v0.8.0 -> V0_8_0: the suffix of a host's own variables (COMFYUI_PATH_V0_8_0, TOKENFLOW_VENV_V0_8_0).
_tf_tag_suffix() { local t="${1#v}"; t="${t//[.-]/_}"; printf 'V%s' "${t^^}"; }

_tf_host_version() { sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null; }

# Uses the ComfyUI root at $1 for tag $2, clones tag $2 there when $1 does not exist and GitHub
# answers, or says how to provide it. $3 names the variable that would point at it.
_tf_place_or_clone() {
    local place="$1" tag="$2" variable="$3"
    if _tf_is_comfy_root "$place"; then
        COMFYUI_PATH="$place"
        _tf_log "host: $COMFYUI_PATH"
        return 0
    fi
    if [ -e "$place" ]; then
        _tf_log "ERROR: $place exists but is not a ComfyUI root; move it away or set $variable."
        return 1
    fi
    _tf_log "no ComfyUI $tag found at $place; checking whether $_TF_REPO_URL is reachable to clone it ..."
    if command -v git >/dev/null 2>&1 \
        && GIT_TERMINAL_PROMPT=0 timeout 30 git ls-remote --exit-code --tags "$_TF_REPO_URL" "refs/tags/$tag" >/dev/null 2>&1; then
        _tf_log "cloning ComfyUI $tag into $place"
        mkdir -p "$(dirname "$place")" || return 1
        if ! GIT_TERMINAL_PROMPT=0 git clone --quiet --depth 1 --branch "$tag" "$_TF_REPO_URL" "$place" >&2; then
            _tf_log "ERROR: git clone of ComfyUI $tag failed."
            return 1
        fi
        COMFYUI_PATH="$place"
        return 0
    fi
    _tf_log "ERROR: no ComfyUI $tag host: set $variable to a ComfyUI $tag checkout, or clone one" \
        "(git clone --depth 1 --branch $tag $_TF_REPO_URL $place), then rerun."
    return 1
}

_tf_use_root() {  # $1: a path given by the variable named $2
    if _tf_is_comfy_root "$1"; then
        COMFYUI_PATH="$(cd "$1" && pwd)"
        _tf_log "host: $2=$COMFYUI_PATH"
        return 0
    fi
    _tf_log "ERROR: $2=$1 is not a ComfyUI root (no comfy/model_patcher.py)."
    return 1
}

# The minimum host without a variable: the ComfyUI holding this pack, else ~/comfy/ComfyUI (or a clone).
_tf_find_minimum_host() {
    local parent
    parent="$(dirname "$TOKENFLOW_REPO")"
    if [ "$(basename "$parent")" = "custom_nodes" ] && _tf_is_comfy_root "$(dirname "$parent")"; then
        COMFYUI_PATH="$(dirname "$parent")"
        _tf_log "host: the ComfyUI holding this pack: $COMFYUI_PATH"
        return 0
    fi
    _tf_place_or_clone "$HOME/comfy/ComfyUI" "$TOKENFLOW_MIN_HOST" "COMFYUI_PATH"
}

_tf_find_host() {
    if [ -z "${TOKENFLOW_HOST:-}" ]; then
        if [ -n "${COMFYUI_PATH:-}" ]; then
            _tf_use_root "$COMFYUI_PATH" COMFYUI_PATH
            return
        fi
        _tf_find_minimum_host
        return
    fi
    local tag="$TOKENFLOW_HOST" variable first_variable
    variable="COMFYUI_PATH_$(_tf_tag_suffix "$tag")"
    first_variable="COMFYUI_PATH_$(_tf_tag_suffix "$TOKENFLOW_MIN_HOST")"
    if [ -n "${!variable:-}" ]; then
        _tf_use_root "${!variable}" "$variable" || return 1
    elif [ "$tag" = "$TOKENFLOW_MIN_HOST" ]; then
        if [ -n "${COMFYUI_PATH:-}" ]; then  # the usual variable names the minimum host too
            _tf_use_root "$COMFYUI_PATH" COMFYUI_PATH || return 1
        else
            _tf_find_minimum_host || return 1
        fi
    else
        # Beside the minimum host, wherever that one is (its own variable, COMFYUI_PATH, the ComfyUI holding
        # this pack, else ~/comfy/ComfyUI).
        local first="${!first_variable:-${COMFYUI_PATH:-}}" parent
        if [ -z "$first" ]; then
            parent="$(dirname "$TOKENFLOW_REPO")"
            first="$HOME/comfy/ComfyUI"
            if [ "$(basename "$parent")" = "custom_nodes" ] && _tf_is_comfy_root "$(dirname "$parent")"; then
                first="$(dirname "$parent")"
            fi
        fi
        _tf_place_or_clone "$(cd "$(dirname "$first")" 2>/dev/null && pwd || dirname "$first")/ComfyUI-$tag" \
            "$tag" "$variable" || return 1
    fi
    local version
    version="$(_tf_host_version "$COMFYUI_PATH")"
    if [ "v$version" != "$tag" ]; then
        _tf_log "ERROR: TOKENFLOW_HOST=$tag but $COMFYUI_PATH is ComfyUI ${version:-of unknown version};" \
            "point $variable at a $tag checkout."
        return 1
    fi
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

# The venv's default place: ~/comfy/venv for the minimum host, ~/comfy/venv-v<version> for another.
_tf_default_venv() {
    local version
    version="$(_tf_host_version "$COMFYUI_PATH")"
    if [ -z "$version" ] || [ "v$version" = "$TOKENFLOW_MIN_HOST" ]; then
        printf '%s' "$HOME/comfy/venv"
    else
        printf '%s' "$HOME/comfy/venv-v$version"
    fi
}

# What a venv was made from: the torch pins, the host's and this pack's requirements. A venv
# whose stamp differs (another host, a changed requirements file) is completed with pip.
_tf_requirements_stamp() {
    { printf '%s\n' "$_TF_TORCH_PINS"; cat "$COMFYUI_PATH/requirements.txt" "$TOKENFLOW_REPO/requirements.txt"; } \
        | sha256sum | cut -d' ' -f1
}

_tf_setup_venv() {
    local venv
    if [ -n "${TOKENFLOW_HOST:-}" ]; then
        local variable
        variable="TOKENFLOW_VENV_$(_tf_tag_suffix "$TOKENFLOW_HOST")"
        venv="${!variable:-$(_tf_default_venv)}"
    else
        venv="${TOKENFLOW_VENV:-$(_tf_default_venv)}"
    fi
    local py="$venv/bin/python"
    local stamp_file="$venv/.tokenflow-requirements" stamp versions
    stamp="$(_tf_requirements_stamp)"
    versions="$(_tf_env_ok "$py")" || versions=""
    if [ -n "$versions" ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ]; then
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
        fi
        local pip=("$py" -m pip install --disable-pip-version-check)
        if [ -n "$versions" ]; then
            # A working venv (its torch kept as it is, a CUDA build included) only gets what the host lists.
            _tf_log "python: $venv was not made from $COMFYUI_PATH/requirements.txt and this pack's; completing it"
        else
            local torch_index=()
            [ -n "${TOKENFLOW_TORCH_INDEX_URL:-}" ] && torch_index=(--index-url "$TOKENFLOW_TORCH_INDEX_URL")
            _tf_log "pip install $_TF_TORCH_PINS"
            # shellcheck disable=SC2086  # the pins are words
            "${pip[@]}" ${torch_index[@]+"${torch_index[@]}"} $_TF_TORCH_PINS >&2 \
                || { _tf_log "ERROR: installing torch failed."; return 1; }
        fi
        _tf_log "pip install -r $COMFYUI_PATH/requirements.txt, test tools and $TOKENFLOW_REPO/requirements.txt"
        "${pip[@]}" -r "$COMFYUI_PATH/requirements.txt" requests pytest opencv-python-headless \
            -r "$TOKENFLOW_REPO/requirements.txt" >&2 \
            || { _tf_log "ERROR: installing the host's and this pack's requirements failed."; return 1; }
        if ! versions="$(_tf_env_ok "$py")"; then
            _tf_log "ERROR: $venv still lacks some of: $_TF_IMPORTED_MODULES $_TF_PRESENT_MODULES"
            return 1
        fi
        printf '%s\n' "$stamp" > "$stamp_file"
        _tf_log "python: $venv ready ($versions)"
    fi
    TOKENFLOW_VENV="$venv"
    PYTHON="$py"
}

_tf_host_env_main() {
    TOKENFLOW_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    _tf_find_host || return 1
    _tf_log "ComfyUI version $(_tf_host_version "$COMFYUI_PATH")"
    _tf_setup_venv || return 1
    export COMFYUI_PATH PYTHON TOKENFLOW_VENV TOKENFLOW_REPO
}

if ! _tf_host_env_main; then
    _tf_log "host/venv setup failed"
    # shellcheck disable=SC2317
    return 1 2>/dev/null || exit 1
fi
