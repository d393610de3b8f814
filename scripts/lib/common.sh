# shellcheck shell=bash
# Helpers shared by the scripts in scripts/. Source it; it does nothing on its own.
#
# Conventions every script follows:
#   - errors go to stderr as "SCRIPT: error: ..." and name the offending argument or path;
#     argument errors exit 2, other failures exit 1;
#   - each step prints one "==> step" line, and its duration when the next step starts;
#   - downloads and unpacked packages live in the cache directory (see cache_root), outside
#     the repository, so repeated runs on one machine reuse them.

# shellcheck disable=SC2034 # used by the scripts that source this file
AGENTENV_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PROG=$(basename "$0")

# die MESSAGE: print an error and exit 1.
die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

# usage_error MESSAGE: print an argument error and exit 2.
usage_error() {
    echo "$PROG: error: $*" >&2
    echo "Run '$PROG --help' for usage." >&2
    exit 2
}

warn() {
    echo "$PROG: warning: $*" >&2
}

# need_value OPTION ARGC: fail unless OPTION was given a value.
need_value() {
    [ "$2" -ge 2 ] || usage_error "$1 needs a value"
}

# need_uint OPTION VALUE: fail unless VALUE is a positive decimal integer.
need_uint() {
    [[ $2 =~ ^[1-9][0-9]*$ ]] || usage_error "$1 must be a positive integer, got '$2'"
}

# check_parent_dir OPTION PATH: fail (argument error) unless PATH's directory exists or
# can be made by ensure_parent_dir: one missing level below an existing directory (e.g.
# artifacts/ of a fresh clone), not a whole invented tree (a typo).
check_parent_dir() {
    local parent
    parent=$(dirname -- "$2")
    [ -d "$parent" ] || [ -d "$(dirname -- "$parent")" ] \
        || usage_error "$1: directory $parent does not exist, nor does its parent"
}

# ensure_parent_dir OPTION PATH: create PATH's directory when it is missing (after
# check_parent_dir accepted it).
ensure_parent_dir() {
    local parent
    parent=$(dirname -- "$2")
    [ -d "$parent" ] || mkdir -- "$parent" || die "$1: cannot create the directory $parent"
}

# need_cmd COMMAND DEBIAN_PACKAGE: fail unless COMMAND is on PATH.
need_cmd() {
    command -v "$1" >/dev/null 2>&1 \
        || die "'$1' is not installed (Debian package: $2; see scripts/README.md)"
}

_step_name=""
_step_start=0

# step NAME: announce a step; also reports how long the previous one took.
step() {
    _step_done
    _step_name=$1
    _step_start=$(date +%s.%N)
    echo "==> $1"
}

# step_end: report the duration of the running step (called automatically by the next step).
step_end() {
    _step_done
}

_step_done() {
    if [ -n "$_step_name" ]; then
        echo "    ($_step_name: $(elapsed_since "$_step_start") s)"
        _step_name=""
    fi
}

# elapsed_since START: seconds (with decimals) since START (a `date +%s.%N` value).
elapsed_since() {
    awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}

# cache_root: where downloads and unpacked packages are kept.
# $AGENTENV_CACHE, else /var/cache/agentenv when writable, else ~/.cache/agentenv.
cache_root() {
    if [ -n "${AGENTENV_CACHE:-}" ]; then
        echo "$AGENTENV_CACHE"
    elif mkdir -p /var/cache/agentenv 2>/dev/null && [ -w /var/cache/agentenv ]; then
        echo /var/cache/agentenv
    else
        echo "${XDG_CACHE_HOME:-$HOME/.cache}/agentenv"
    fi
}

# abspath PATH: PATH made absolute (need not exist).
abspath() {
    case "$1" in
        /*) echo "$1" ;;
        *) echo "$PWD/$1" ;;
    esac
}

# sha256 FILE: the hex digest of FILE.
sha256() {
    sha256sum "$1" | cut -d' ' -f1
}

# stamp_file KIND OUTPUT: the cache file recording what OUTPUT was built from.
# Stamps live in the cache, not beside the outputs, so output directories hold only artifacts.
stamp_file() {
    local key
    key=$(printf '%s' "$(abspath "$2")" | sha256sum | cut -c1-24)
    echo "$(cache_root)/stamps/$1-$key"
}

# stamp_matches STAMP INPUTS_HASH FILE...: true when STAMP records INPUTS_HASH and every FILE
# still has the digest recorded when the stamp was written.
stamp_matches() {
    local stamp=$1 inputs=$2 f
    shift 2
    [ -f "$stamp" ] || return 1
    grep -qx "inputs $inputs" "$stamp" || return 1
    for f in "$@"; do
        [ -f "$f" ] || return 1
        grep -qx "file $(sha256 "$f") $(abspath "$f")" "$stamp" || return 1
    done
}

# stamp_write STAMP INPUTS_HASH FILE...: record INPUTS_HASH and the digests of FILEs.
stamp_write() {
    local stamp=$1 inputs=$2 f
    shift 2
    mkdir -p "$(dirname "$stamp")"
    {
        echo "inputs $inputs"
        for f in "$@"; do
            echo "file $(sha256 "$f") $(abspath "$f")"
        done
    } >"$stamp.tmp"
    mv -f "$stamp.tmp" "$stamp"
}

# is_static_elf FILE: true when FILE is a statically linked executable.
is_static_elf() {
    local out
    out=$(LC_ALL=C ldd "$1" 2>&1 || true)
    case "$out" in
        *"not a dynamic executable"* | *"statically linked"*) return 0 ;;
        *) return 1 ;;
    esac
}
