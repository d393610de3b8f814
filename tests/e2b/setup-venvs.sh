#!/usr/bin/env bash
# Makes one Python venv per pinned e2b SDK version (tests/e2b/sdk-versions.txt)
# with the suite's requirements (tests/e2b/requirements.txt): DIR/e2b-<version>.
# Idempotent: a venv that already has the right versions is left as it is.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${1:-${AGENTENV_E2B_VENVS:-/var/cache/agentenv/e2b-venvs}}
case "$dir" in -h | --help)
    echo "Usage: tests/e2b/setup-venvs.sh [DIR]   (default \$AGENTENV_E2B_VENVS or /var/cache/agentenv/e2b-venvs)"
    exit 0 ;;
esac
mkdir -p "$dir"
mapfile -t versions < <(grep -v '^\s*#' "$here/sdk-versions.txt" | grep -v '^\s*$')
for v in "${versions[@]}"; do
    venv="$dir/e2b-$v"
    want=$(printf 'e2b==%s\n' "$v"; grep -v '^\s*#' "$here/requirements.txt" | grep -v '^\s*$')
    if [ -x "$venv/bin/python" ] &&
        "$venv/bin/python" -m pip freeze 2>/dev/null | grep -qx "e2b==$v" &&
        [ "$(cat "$venv/.agentenv-requirements" 2>/dev/null)" = "$want" ]; then
        echo "e2b $v: $venv is up to date"
        continue
    fi
    echo "e2b $v: making $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q --disable-pip-version-check $want
    printf '%s' "$want" >"$venv/.agentenv-requirements"
done
