#!/usr/bin/env bash
# Creates (or wipes) the directories an agentenv daemon config names. See --help.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

# The directory keys of the config and their defaults (agentenv-core's Config::default).
KEYS=(session_root socket_root rootfs_root snapshots_root tmpfs_snapshot_root hdfs_snapshot_root kernel_root initramfs_root)
# What --clean wipes: the daemon's runtime state. The other keys hold what the operator
# built or copied (base images, kernels, initramfs images); --clean never removes them.
STATE_KEYS=(session_root socket_root snapshots_root tmpfs_snapshot_root hdfs_snapshot_root)
INPUT_KEYS=(rootfs_root kernel_root initramfs_root)
declare -A DEFAULTS=(
    [session_root]=data/sessions
    [socket_root]=data/sockets
    [rootfs_root]=data/rootfs
    [snapshots_root]=data/snapshots
    [tmpfs_snapshot_root]=data/snapshots/tmpfs
    [hdfs_snapshot_root]=data/snapshots/durable
    [kernel_root]=data/kernels
    [initramfs_root]=data/initramfs
)
# Other names of those keys (the daemon's too): the durable snapshot tier is
# any mounted path, so it may be written durable_snapshot_root.
declare -A ALIASES=(
    [durable_snapshot_root]=hdfs_snapshot_root
)

usage() {
    cat <<EOF
Usage: $PROG [--config FILE] [--clean [--force]]

Creates every directory the daemon config names: ${KEYS[*]}
(hdfs_snapshot_root, the durable snapshot tier, may be written durable_snapshot_root).
Keys missing from the file (or every key, without --config) take the daemon's defaults:
data/sessions, data/sockets, data/rootfs, data/snapshots, data/snapshots/tmpfs,
data/snapshots/durable, data/kernels, data/initramfs. Relative paths are taken from the
current directory, as the daemon does.

Options:
  --config FILE   the daemon's TOML config (default: none, i.e. all defaults)
  --clean         first wipe the runtime state: ${STATE_KEYS[*]}
                  (a directory that is a mount point is emptied and kept), then create
                  every directory again. Never touches ${INPUT_KEYS[*]}
                  (base images, kernels, initramfs images) nor the repository's artifacts/.
                  Refuses /, top-level system directories, symlinks, and a state directory
                  that holds the current or home directory, the repository, artifacts/ (the
                  repository's or the current directory's), the config file or one of ${INPUT_KEYS[*]};
                  and refuses while a VMM socket in socket_root or session_root accepts
                  connections (a running VM)
  --force         with --clean: also remove state directories that are not empty
  -h, --help      show this help

Needs: python3 >= 3.11 (tomllib) for full TOML; without it only simple top-level
key = "value" lines are understood.
EOF
}

config=""
clean=0
force=0
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --config) need_value "$1" $#; config=$2; shift 2 ;;
        --config=*) config=${1#*=}; shift ;;
        --clean) clean=1; shift ;;
        --force) force=1; shift ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done
if [ -n "$config" ]; then
    [ -f "$config" ] || usage_error "--config: no such file '$config'"
fi
if [ "$force" = 1 ] && [ "$clean" = 0 ]; then
    usage_error "--force only makes sense with --clean"
fi

# read_roots: prints "key<TAB>path" for each directory key the config sets.
read_roots() {
    [ -n "$config" ] || return 0
    if python3 -c 'import tomllib' 2>/dev/null; then
        python3 - "$config" "${KEYS[@]}" "${!ALIASES[@]}" <<'EOF'
import sys, tomllib
path, keys = sys.argv[1], sys.argv[2:]
try:
    with open(path, "rb") as f:
        doc = tomllib.load(f)
except (OSError, tomllib.TOMLDecodeError) as e:
    sys.exit(f"cannot parse {path}: {e}")
for key in keys:
    if key in doc:
        value = doc[key]
        if not isinstance(value, str) or not value:
            sys.exit(f"{path}: {key} must be a non-empty string")
        if "\t" in value or "\n" in value:
            sys.exit(f"{path}: {key} must not contain tabs or newlines")
        print(f"{key}\t{value}")
EOF
    else
        # Top-level `key = "value"` lines only (before the first [table]).
        awk -v keys="${KEYS[*]} ${!ALIASES[*]}" '
            BEGIN { n = split(keys, k, " "); for (i = 1; i <= n; i++) want[k[i]] = 1 }
            /^[ \t]*\[/ { exit }
            match($0, /^[ \t]*[a-z_]+[ \t]*=[ \t]*"[^"]*"/) {
                line = substr($0, RSTART, RLENGTH)
                key = line; sub(/^[ \t]*/, "", key); sub(/[ \t]*=.*/, "", key)
                val = line; sub(/^[^"]*"/, "", val); sub(/"$/, "", val)
                if (key in want) print key "\t" val
            }' "$config"
    fi
}

declare -A roots=()
for key in "${KEYS[@]}"; do
    roots[$key]=${DEFAULTS[$key]}
done
parsed=$(read_roots) || die "cannot read the directory keys of ${config}"
declare -A given=()
while IFS=$'\t' read -r key value; do
    [ -n "$key" ] || continue
    name=${ALIASES[$key]:-$key}
    if [ -n "${given[$name]:-}" ] && [ "${given[$name]}" != "$key" ]; then
        die "$config: keys ${given[$name]} and $key name the same directory; give one of them"
    fi
    given[$name]=$key
    roots[$name]=$value
done <<<"$parsed"

# is_mountpoint DIR
is_mountpoint() {
    if command -v mountpoint >/dev/null 2>&1; then
        mountpoint -q "$1"
    else
        [ "$(stat -c %d "$1")" != "$(stat -c %d "$1/..")" ]
    fi
}

# refuse_to_clean KEY DIR: dies when DIR must never be wiped.
refuse_to_clean() {
    local key=$1 dir=$2 real
    if [ -L "$dir" ]; then
        die "$key = $dir is a symlink (to $(readlink "$dir")); refusing to clean through it"
    fi
    real=$(realpath -m -- "$dir")
    case "$real" in
        / | /bin | /boot | /dev | /etc | /home | /lib | /lib32 | /lib64 | /libx32 | /media | /mnt | /opt \
            | /proc | /root | /run | /sbin | /srv | /sys | /tmp | /usr | /var)
            die "$key = $dir is $real; refusing to clean it" ;;
    esac
    local keep what
    for keep in "$(realpath -m -- "$PWD")" "$(realpath -m -- "${HOME:-/}")" "$AGENTENV_REPO" \
        "$AGENTENV_REPO/artifacts" "$(realpath -m -- "$PWD/artifacts")" ${config:+"$(realpath -m -- "$config")"} "${protected[@]}"; do
        if [ "$real" = "$keep" ] || [[ $keep == "$real"/* ]]; then
            what=$keep
            [ -z "${protected_key[$keep]:-}" ] || what="${protected_key[$keep]} ($keep)"
            die "$key = $dir ($real) is or contains $what; refusing to clean it"
        fi
    done
}

source_desc=${config:-"(defaults)"}

# create_all: make every directory of the config (they may exist already).
create_all() {
    step "creating the runtime directories of $source_desc"
    for key in "${KEYS[@]}"; do
        dir=${roots[$key]}
        if [ -d "$dir" ]; then
            printf '    %-20s %s (exists)\n' "$key" "$dir"
        else
            mkdir -p -- "$dir" || die "cannot create $key = $dir"
            printf '    %-20s %s (created)\n' "$key" "$dir"
        fi
        [ -w "$dir" ] || warn "$key = $dir is not writable by $(id -un)"
    done
    fstype=$(stat -f -c %T -- "${roots[tmpfs_snapshot_root]}" 2>/dev/null || echo unknown)
    if [ "$fstype" != tmpfs ]; then
        echo "    note: tmpfs_snapshot_root (${roots[tmpfs_snapshot_root]}) is on $fstype, not tmpfs;" \
            "for the fast tier mount one: mount -t tmpfs -o size=8G tmpfs ${roots[tmpfs_snapshot_root]}"
    fi
}

if [ "$clean" = 0 ]; then
    create_all
    step_end
    echo "==> done"
    exit 0
fi

# --clean: check everything first, then remove deepest first, then create everything again.
# The input directories (and whatever they hold) are protected: no state directory may be
# one of them or contain one.
protected=()
declare -A protected_key=()
for key in "${INPUT_KEYS[@]}"; do
    real=$(realpath -m -- "${roots[$key]}")
    protected+=("$real")
    protected_key[$real]=$key
done
step "cleaning the runtime state of $source_desc"
existing=()
for key in "${STATE_KEYS[@]}"; do
    dir=${roots[$key]}
    [ -e "$dir" ] || [ -L "$dir" ] || continue
    refuse_to_clean "$key" "$dir"
    [ -d "$dir" ] || die "$key = $dir is not a directory; refusing to clean it"
    if [ "$force" = 0 ] && [ -n "$(find "$dir" -mindepth 1 -maxdepth 1 -print -quit)" ]; then
        die "$key = $dir is not empty; pass --force to remove it with its contents"
    fi
    existing+=("$(realpath -- "$dir")"$'\t'"$key")
done
# live_sockets DIR...: the Unix sockets below DIRs that accept a connection (a VMM's API or
# QMP socket of a running VM; a stale socket file refuses).
live_sockets() {
    local dirs=() d
    for d in "$@"; do [ -d "$d" ] && dirs+=("$d"); done
    [ ${#dirs[@]} -gt 0 ] || return 0
    if ! command -v python3 >/dev/null 2>&1; then
        warn "python3 is missing: cannot check for running VMs' sockets"
        return 0
    fi
    { find "${dirs[@]}" -type s -print0 2>/dev/null || true; } | python3 -c '
import socket, sys
for path in sys.stdin.buffer.read().split(b"\0"):
    if not path:
        continue
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(path)
        print(path.decode(errors="replace"))
    except OSError:
        pass
    finally:
        s.close()
'
}
live=$(live_sockets "${roots[socket_root]}" "${roots[session_root]}")
if [ -n "$live" ]; then
    die "VMs are running: $(echo "$live" | wc -l) VMM socket(s) accept connections, e.g. $(echo "$live" | head -1);
wiping their state would orphan them. Delete the VMs first (or stop the daemon with on_shutdown = \"stop\"), then run this again"
fi
for key in "${INPUT_KEYS[@]}"; do
    printf '    %-20s %s (kept: never cleaned)\n' "$key" "${roots[$key]}"
done
status=0
if [ ${#existing[@]} -eq 0 ]; then
    echo "    nothing to clean"
else
    mapfile -t ordered < <(printf '%s\n' "${existing[@]}" | awk -F'\t' '{ print length($1) "\t" $0 }' \
        | sort -t$'\t' -k1,1nr -k2,2 -u | cut -f2-)
    for entry in "${ordered[@]}"; do
        dir=${entry%%$'\t'*}
        key=${entry#*$'\t'}
        [ -d "$dir" ] || continue # removed with a parent already
        if is_mountpoint "$dir"; then
            find "$dir" -mindepth 1 -maxdepth 1 -exec rm -rf --one-file-system -- {} + \
                || { status=1; warn "could not empty every entry of $dir"; }
            printf '    %-20s %s (mount point: emptied, kept)\n' "$key" "$dir"
        else
            if rm -rf --one-file-system -- "$dir"; then
                printf '    %-20s %s (removed)\n' "$key" "$dir"
            else
                status=1
                warn "could not remove all of $key = $dir (a mount point inside it?)"
            fi
        fi
    done
fi
[ "$status" = 0 ] || die "some directories could not be removed (see above)"
create_all
step_end
echo "==> done"
