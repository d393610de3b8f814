#!/usr/bin/env bash
# Downloads an official Firecracker release binary. See --help.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
    cat <<EOF
Usage: $PROG --version V --output PATH [--arch x86_64|aarch64] [--from FILE] [--force]

Downloads firecracker-vV-ARCH.tgz from Firecracker's GitHub releases (cached), extracts
release-vV-ARCH/firecracker-vV-ARCH to PATH and checks that it runs '--version'.
Needs the internet (github.com) unless --from gives the release file.

Options:
  --version V           release, e.g. 1.13.1 (a leading v is accepted)
  --output PATH         the firecracker binary's path (not a directory); a missing parent
                        directory (one level, e.g. artifacts/) is created
  --from FILE           offline: take the release from FILE instead of downloading it,
                        either the release tarball firecracker-vV-ARCH.tgz or the
                        firecracker binary itself (a tarball is kept in the cache)
  --arch A              x86_64 or aarch64 (default: this machine's, $(uname -m))
  --force               download and extract again even when PATH is already that version
  --connect-timeout S   seconds to wait for the connection (default 15)
  --max-time S          seconds the whole download may take (default 600)
  --base-url URL        release download base (default
                        https://github.com/firecracker-microvm/firecracker/releases/download)
  -h, --help            show this help

Without internet access the download fails and says which URL it needs: fetch that file
on a machine that has access and give it with --from FILE (or put it in the cache
directory, \$AGENTENV_CACHE/firecracker/, default /var/cache/agentenv/firecracker/).

Needs: curl, tar.
EOF
}

version=""
output=""
arch=$(uname -m)
force=0
from=""
connect_timeout=15
max_time=600
base_url=https://github.com/firecracker-microvm/firecracker/releases/download

while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --version) need_value "$1" $#; version=$2; shift 2 ;;
        --version=*) version=${1#*=}; shift ;;
        --output) need_value "$1" $#; output=$2; shift 2 ;;
        --output=*) output=${1#*=}; shift ;;
        --arch) need_value "$1" $#; arch=$2; shift 2 ;;
        --arch=*) arch=${1#*=}; shift ;;
        --from) need_value "$1" $#; from=$2; shift 2 ;;
        --from=*) from=${1#*=}; shift ;;
        --force) force=1; shift ;;
        --connect-timeout) need_value "$1" $#; connect_timeout=$2; shift 2 ;;
        --connect-timeout=*) connect_timeout=${1#*=}; shift ;;
        --max-time) need_value "$1" $#; max_time=$2; shift 2 ;;
        --max-time=*) max_time=${1#*=}; shift ;;
        --base-url) need_value "$1" $#; base_url=$2; shift 2 ;;
        --base-url=*) base_url=${1#*=}; shift ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done

[ -n "$version" ] || usage_error "--version V is required (e.g. --version 1.13.1)"
[ -n "$output" ] || usage_error "--output PATH is required"
version=${version#v}
[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || usage_error "--version must look like 1.13.1, got '$version'"
case "$arch" in
    x86_64 | aarch64) ;;
    *) usage_error "--arch must be x86_64 or aarch64, got '$arch'" ;;
esac
need_uint --connect-timeout "$connect_timeout"
need_uint --max-time "$max_time"
if [ -n "$from" ]; then
    [ -f "$from" ] || usage_error "--from: no such file '$from'"
fi
if [ -d "$output" ] || [[ $output == */ ]]; then
    usage_error "--output: $output is a directory; give the binary's path (e.g. ${output%/}/firecracker)"
fi
check_parent_dir --output "$output"
ensure_parent_dir --output "$output"
[ -n "$from" ] || need_cmd curl curl
need_cmd tar tar

name="firecracker-v$version-$arch"
cache="$(cache_root)/firecracker"
tarball="$cache/$name.tgz"
url="$base_url/v$version/$name.tgz"

# can_run: true when this machine can execute binaries of the requested architecture.
can_run() {
    [ "$arch" = "$(uname -m)" ]
}

if [ "$force" = 0 ] && [ -x "$output" ] && can_run \
    && "$output" --version 2>/dev/null | head -1 | grep -q "v$version\b"; then
    echo "==> up to date: $output is Firecracker v$version (--force replaces it)"
    exit 0
fi

mkdir -p "$cache"
binary=""
if [ -n "$from" ]; then
    if [ "$(head -c 4 "$from" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
        step "using the firecracker binary $from"
        binary=$from
    else
        step "using the release file $from"
        gzip -t "$from" 2>/dev/null || die "--from: $from is neither a firecracker binary (ELF) nor a .tgz release file"
        install -m 0644 "$from" "$tarball.part"
        mv -f "$tarball.part" "$tarball"
    fi
elif [ "$force" = 1 ] || [ ! -s "$tarball" ]; then
    step "downloading $url"
    rm -f "$tarball.part"
    if ! err=$(curl --fail --location --silent --show-error --proto '=https,http' \
        --connect-timeout "$connect_timeout" --max-time "$max_time" \
        --output "$tarball.part" "$url" 2>&1); then
        rm -f "$tarball.part"
        die "download of $url failed: ${err:-curl failed}
This machine may have no internet access. Without it, download
  $url
on a machine that has access and run this again with --from FILE, e.g.
  $PROG --version $version --output $output --from ./$name.tgz
(--from also takes the firecracker binary itself; or put the tarball at $tarball,
or copy a firecracker binary to $output yourself)."
    fi
    mv -f "$tarball.part" "$tarball"
else
    step "using the cached $tarball"
fi

workdir=$(mktemp -d "$cache/extract.XXXXXX")
trap 'rm -rf "$workdir" "$output.tmp"' EXIT
if [ -z "$binary" ]; then
    step "extracting release-v$version-$arch/$name"
    tar -xzf "$tarball" -C "$workdir" "release-v$version-$arch/$name" 2>"$workdir/tar.err" \
        || die "$tarball has no release-v$version-$arch/$name ($(head -1 "$workdir/tar.err")); remove it and run again"
    binary="$workdir/release-v$version-$arch/$name"
fi
install -m 0755 "$binary" "$output.tmp"

step "checking $name --version"
if can_run; then
    out=$("$output.tmp" --version 2>&1 | head -1) || die "$name --version failed: $out"
    echo "$out" | grep -q "v$version\b" || die "$name --version says '$out', expected v$version"
    echo "    $out"
else
    echo "    skipped: $arch binary on a $(uname -m) machine"
fi
mv -f "$output.tmp" "$output"
step_end
echo "==> done: $output"
