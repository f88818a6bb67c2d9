#!/usr/bin/env bash
# Run the ComfyUI-TokenFlow test suite against a real ComfyUI host.
#
#   bash scripts/test.sh [pytest args...]      e.g. bash scripts/test.sh -q -k tiny
#   bash scripts/test.sh --all-hosts [pytest args...]
#
# Finds (or sets up) the host and the Python environment through scripts/host_env.sh, then runs
# pytest from the repository root (on tests/ unless the arguments name test paths).
# The exit code is pytest's; "no tests collected" (5) is a failure too.
#
# --all-hosts runs the same on every tested host of scripts/hosts.sh (the minimum first), each
# with its own venv, one after the other: a failure on one does not skip the next. It prints a
# line per host with its result and time, and fails when any host failed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

all_hosts=0
passed=()
for arg in "$@"; do
    if [ "$arg" = "--all-hosts" ]; then all_hosts=1; else passed+=("$arg"); fi
done
set -- ${passed[@]+"${passed[@]}"}
if [ "$all_hosts" -eq 1 ]; then
    # shellcheck source=scripts/hosts.sh
    source "$repo/scripts/hosts.sh"
    overall=0
    summary=()
    for host in "${TOKENFLOW_HOSTS[@]}"; do
        echo "[test.sh] ===== ComfyUI $host =====" >&2
        started=$SECONDS
        host_status=0
        TOKENFLOW_HOST="$host" bash "$repo/scripts/test.sh" "$@" || host_status=$?
        result="passed"
        [ "$host_status" -eq 0 ] || { result="FAILED (exit $host_status)"; overall=1; }
        summary+=("ComfyUI $host: $result in $((SECONDS - started)) s")
    done
    for line in "${summary[@]}"; do
        echo "[test.sh] $line" >&2
    done
    exit "$overall"
fi
# shellcheck source=scripts/host_env.sh
source "$repo/scripts/host_env.sh"

cd "$repo"
# Run tests/ unless the arguments already name test paths (tests/test_x.py, tests/test_x.py::test_y).
targets=(tests)
for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
        targets=()
        break
    fi
done
echo "[test.sh] $PYTHON -m pytest ${targets[*]} $*" >&2
status=0
"$PYTHON" -m pytest -p no:cacheprovider ${targets[@]+"${targets[@]}"} "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "[test.sh] ERROR: pytest collected no tests" >&2
fi
exit "$status"
