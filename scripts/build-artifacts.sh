#!/usr/bin/env bash
# Builds every guest artifact the tests and the QEMU config use, timing each. See --help.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
    cat <<EOF
Usage: $PROG [--output DIR] [--force] [--rootfs-size-mib N] [--e2b] [--e2b-size-mib N]
       [--timings FILE]

Builds into DIR (default: $AGENTENV_REPO/artifacts):
  kernels/vmlinuz, kernels/vmlinux, initramfs/initrd.img    scripts/build-kernel.sh
  agentenv-guest (the guest agent, static)                  scripts/build-guest-agent.sh
  rootfs/minimal.ext4 (with that agent)                     scripts/create-rootfs.sh --flavor minimal
and with --e2b (root, debootstrap, the Debian mirror; docs/e2b-templates.md) also
  rootfs/e2b-base.ext4 (the E2B base template)              scripts/create-rootfs.sh --flavor e2b
and prints how long each took. Up-to-date artifacts are kept (each script checks); --force
rebuilds them.

Options:
  --output DIR           where the artifacts go
  --force                rebuild everything
  --rootfs-size-mib N    size of minimal.ext4 (default 64)
  --e2b                  also build rootfs/e2b-base.ext4, the E2B \`base\` template's image
  --e2b-size-mib N       size of e2b-base.ext4 (default 1024; the image is sparse and
                         read-only in VMs, whose writes go to their overlay disks)
  --timings FILE         also write the timings as JSON to FILE
  -h, --help             show this help
EOF
}

output="$AGENTENV_REPO/artifacts"
force=()
size=64
timings=""
e2b=0
e2b_size=1024
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --output) need_value "$1" $#; output=$2; shift 2 ;;
        --output=*) output=${1#*=}; shift ;;
        --force) force=(--force); shift ;;
        --rootfs-size-mib) need_value "$1" $#; size=$2; shift 2 ;;
        --rootfs-size-mib=*) size=${1#*=}; shift ;;
        --e2b) e2b=1; shift ;;
        --e2b-size-mib) need_value "$1" $#; e2b_size=$2; shift 2 ;;
        --e2b-size-mib=*) e2b_size=${1#*=}; shift ;;
        --timings) need_value "$1" $#; timings=$2; shift 2 ;;
        --timings=*) timings=${1#*=}; shift ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done
[ -n "$output" ] || usage_error "--output must not be empty"
need_uint --rootfs-size-mib "$size"
need_uint --e2b-size-mib "$e2b_size"
if [ "$e2b" = 1 ] && [ "$(id -u)" != 0 ]; then
    usage_error "--e2b needs root (debootstrap)"
fi
output=$(abspath "$output")
mkdir -p "$output/rootfs" || die "cannot create $output/rootfs"

here=$(dirname "${BASH_SOURCE[0]}")
names=()
secs=()

# timed NAME CMD...: run CMD, record its wall time under NAME.
timed() {
    local name=$1 start
    shift
    echo "==> [$name] $*"
    start=$(date +%s.%N)
    "$@" 2>&1 | sed 's/^/    /'
    names+=("$name")
    secs+=("$(elapsed_since "$start")")
    echo "==> [$name] took ${secs[-1]} s"
}

total_start=$(date +%s.%N)
timed kernel+initramfs "$here/build-kernel.sh" --output "$output" ${force[@]+"${force[@]}"}
timed guest-agent "$here/build-guest-agent.sh" --out "$output/agentenv-guest" ${force[@]+"${force[@]}"}
timed rootfs-minimal "$here/create-rootfs.sh" --flavor minimal --size-mib "$size" \
    --agent "$output/agentenv-guest" --output "$output/rootfs/minimal.ext4" ${force[@]+"${force[@]}"}
files=(kernels/vmlinuz kernels/vmlinux initramfs/initrd.img agentenv-guest rootfs/minimal.ext4)
if [ "$e2b" = 1 ]; then
    timed rootfs-e2b-base "$here/create-rootfs.sh" --flavor e2b --size-mib "$e2b_size" \
        --agent "$output/agentenv-guest" --output "$output/rootfs/e2b-base.ext4" ${force[@]+"${force[@]}"}
    files+=(rootfs/e2b-base.ext4)
fi
total=$(elapsed_since "$total_start")

echo "==> build times"
for i in "${!names[@]}"; do
    printf '    %-18s %6s s\n' "${names[$i]}" "${secs[$i]}"
done
printf '    %-18s %6s s\n' total "$total"
echo "==> artifacts in $output:"
for f in "${files[@]}"; do
    printf '    %-22s %s\n' "$f" "$(du -h --apparent-size "$output/$f" | cut -f1)"
done

if [ -n "$timings" ]; then
    {
        printf '{"output": "%s", "seconds": {' "$output"
        for i in "${!names[@]}"; do
            [ "$i" = 0 ] || printf ', '
            printf '"%s": %s' "${names[$i]}" "${secs[$i]}"
        done
        printf ', "total": %s}}\n' "$total"
    } >"$timings" || die "--timings: cannot write $timings"
    echo "==> timings written to $timings"
fi
