#!/usr/bin/env bash
# Downloads an official Firecracker release binary. See --help.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
    cat <<EOF
Usage: $PROG --version V --output PATH [--arch x86_64|aarch64] [--force]

Downloads firecracker-vV-ARCH.tgz from Firecracker's GitHub releases (cached), extracts
release-vV-ARCH/firecracker-vV-ARCH to PATH and checks that it runs '--version'.

Options:
  --version V           release, e.g. 1.13.1 (a leading v is accepted)
  --output PATH         where to put the firecracker binary
  --arch A              x86_64 or aarch64 (default: this machine's, $(uname -m))
  --force               download and extract again even when PATH is already that version
  --connect-timeout S   seconds to wait for the connection (default 15)
  --max-time S          seconds the whole download may take (default 600)
  --base-url URL        release download base (default
                        https://github.com/firecracker-microvm/firecracker/releases/download)
  -h, --help            show this help

Without internet access the download fails: fetch the tarball elsewhere and put it in the
cache directory (\$AGENTENV_CACHE/firecracker/, default /var/cache/agentenv/firecracker/),
or copy a firecracker binary to PATH yourself.

Needs: curl, tar.
EOF
}

version=""
output=""
arch=$(uname -m)
force=0
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
[ ! -d "$output" ] || usage_error "--output: $output is a directory; give the binary's path (e.g. $output/firecracker)"
[ -d "$(dirname "$output")" ] || usage_error "--output: directory $(dirname "$output") does not exist"
need_cmd curl curl
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
if [ "$force" = 1 ] || [ ! -s "$tarball" ]; then
    step "downloading $url"
    rm -f "$tarball.part"
    if ! err=$(curl --fail --location --silent --show-error --proto '=https,http' \
        --connect-timeout "$connect_timeout" --max-time "$max_time" \
        --output "$tarball.part" "$url" 2>&1); then
        rm -f "$tarball.part"
        die "download of $url failed: ${err:-curl failed}
This machine may have no internet access. Without it, copy a firecracker binary to
$output yourself, or download $name.tgz on a machine that has access
(https://github.com/firecracker-microvm/firecracker/releases) and put it at
$tarball, then run this again."
    fi
    mv -f "$tarball.part" "$tarball"
else
    step "using the cached $tarball"
fi

step "extracting release-v$version-$arch/$name"
workdir=$(mktemp -d "$cache/extract.XXXXXX")
trap 'rm -rf "$workdir"' EXIT
tar -xzf "$tarball" -C "$workdir" "release-v$version-$arch/$name" 2>"$workdir/tar.err" \
    || die "$tarball has no release-v$version-$arch/$name ($(head -1 "$workdir/tar.err")); remove it and run again"
install -m 0755 "$workdir/release-v$version-$arch/$name" "$output.tmp"
mv -f "$output.tmp" "$output"

step "checking $output --version"
if can_run; then
    out=$("$output" --version 2>&1 | head -1) || die "$output --version failed: $out"
    echo "$out" | grep -q "v$version\b" || die "$output --version says '$out', expected v$version"
    echo "    $out"
else
    echo "    skipped: $arch binary on a $(uname -m) machine"
fi
step_end
echo "==> done: $output"
