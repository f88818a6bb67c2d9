#!/usr/bin/env bash
# Run the ComfyUI-TokenFlow test suite against a real ComfyUI host.
#
#   bash scripts/test.sh [pytest args...]      e.g. bash scripts/test.sh -q -k tiny
#
# Finds (or sets up) the host and the Python environment through scripts/host_env.sh, then runs
# pytest from the repository root (on tests/ unless the arguments name test paths).
# The exit code is pytest's; "no tests collected" (5) is a failure too.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
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
