#!/usr/bin/env bash
# Install what tests/test_frontend.py needs to drive the real ComfyUI frontend headlessly:
#
#   * Debian's `chromium` (apt-get), unless $TOKENFLOW_CHROMIUM (default /usr/bin/chromium) already
#     runs. Playwright is pointed at it with executable_path; this script never runs
#     `playwright install` (no browser downloads from outside the distribution's archive).
#   * the `playwright` Python package, into the test venv ($PYTHON from scripts/host_env.sh, or
#     $PYTHON as given), unless that python already imports it.
#
#   bash scripts/install_browser.sh          # idempotent: a rerun with both present does nothing
#
# Needs root (or sudo without a password) for apt-get, and network access to the Debian mirror and
# PyPI. Exits non-zero with a message saying what is missing when it cannot install something.
set -euo pipefail

log() { printf '[install_browser] %s\n' "$*" >&2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
chromium="${TOKENFLOW_CHROMIUM:-/usr/bin/chromium}"

if [ -z "${PYTHON:-}" ]; then
    # shellcheck source=scripts/host_env.sh
    source "$repo/scripts/host_env.sh"
fi

status=0
chromium_runs() { [ -x "$chromium" ] && "$chromium" --version >/dev/null 2>&1; }
chromium_version() { "$chromium" --version 2>/dev/null | head -n1; }

# --- chromium -----------------------------------------------------------------------------------
if chromium_runs; then
    log "chromium: present ($(chromium_version))"
else
    log "chromium: $chromium missing; installing Debian's chromium with apt-get"
    as_root=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            as_root=(sudo -n)
        else
            log "ERROR: not root and no password-less sudo; install it yourself: apt-get install -y chromium"
            as_root=(false)
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        log "ERROR: apt-get not found; install a Chromium build yourself and set TOKENFLOW_CHROMIUM=/path/to/it"
        status=1
    elif ! { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 \
             && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                chromium fonts-dejavu-core >&2; }; then
        log "ERROR: apt-get install chromium failed"
        status=1
    elif chromium_runs; then
        log "chromium: installed ($(chromium_version))"
    else
        log "ERROR: apt-get installed chromium but $chromium does not run"
        status=1
    fi
fi

# --- playwright (Python package only) ------------------------------------------------------------
if "$PYTHON" -c 'import playwright.sync_api' >/dev/null 2>&1; then
    log "playwright: present in $PYTHON ($("$PYTHON" -m pip show playwright 2>/dev/null | sed -n 's/^Version: //p'))"
else
    log "playwright: installing the Python package into $PYTHON (no 'playwright install': chromium comes from apt)"
    if "$PYTHON" -m pip install --disable-pip-version-check -q playwright >&2 \
        && "$PYTHON" -c 'import playwright.sync_api' >/dev/null 2>&1; then
        log "playwright: installed ($("$PYTHON" -m pip show playwright 2>/dev/null | sed -n 's/^Version: //p'))"
    else
        log "ERROR: pip install playwright into $PYTHON failed"
        status=1
    fi
fi

exit "$status"
