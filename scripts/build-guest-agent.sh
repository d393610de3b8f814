#!/usr/bin/env bash
# Builds the guest agent (crates/agentenv-guest) as a static x86_64 binary. See --help.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

TARGET=x86_64-unknown-linux-gnu

usage() {
    cat <<EOF
Usage: $PROG [--out FILE] [--force]

Builds agentenv-guest, the agent every agentenv guest runs (/usr/sbin/agentenv-guest in the
images scripts/create-rootfs.sh makes; see docs/guest-contract.md), as a statically linked
executable:

  cargo build --release -p agentenv-guest --target $TARGET \\
      --target-dir $AGENTENV_REPO/target/guest
  with RUSTFLAGS="-C target-feature=+crt-static", without debug info

checks that the result is a static ELF executable and installs it as FILE. Cargo rebuilds
only what changed (target/guest is kept between runs), and FILE is left alone when it
already is that binary.

Options:
  --out FILE            where to install the binary (default:
                        $AGENTENV_REPO/artifacts/agentenv-guest); --output is the same
  --force               install FILE again even when it is up to date
  -h, --help            show this help

Environment:
  CARGO                 the cargo to run (default: cargo on PATH, else ~/.cargo/bin/cargo)

Needs: a Rust toolchain with the $TARGET target and glibc's static libraries (libc6-dev).
EOF
}

default_out="$AGENTENV_REPO/artifacts/agentenv-guest"
out=""
force=0
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --out | --output) need_value "$1" $#; out=$2; shift 2 ;;
        --out=* | --output=*) out=${1#*=}; shift ;;
        --force) force=1; shift ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done

if [ -z "$out" ]; then
    out=$default_out
    mkdir -p "$(dirname "$out")" || die "cannot create $(dirname "$out")"
fi
[ ! -d "$out" ] || usage_error "--out: $out is a directory; give the binary's path (e.g. $out/agentenv-guest)"
[ -d "$(dirname "$out")" ] || usage_error "--out: directory $(dirname "$out") does not exist"
out=$(abspath "$out")

cargo=${CARGO:-}
if [ -z "$cargo" ]; then
    if command -v cargo >/dev/null 2>&1; then
        cargo=cargo
    elif [ -x "${HOME:-/root}/.cargo/bin/cargo" ]; then
        cargo="${HOME:-/root}/.cargo/bin/cargo"
    else
        die "cargo is not installed (a Rust toolchain: https://rustup.rs), and \$CARGO is not set"
    fi
fi

target_dir="$AGENTENV_REPO/target/guest"
built="$target_dir/$TARGET/release/agentenv-guest"

step "cargo build --release -p agentenv-guest --target $TARGET (static)"
# Only these flags: RUSTFLAGS from the environment (or a cargo config) would change the
# binary, and CARGO_ENCODED_RUSTFLAGS would override RUSTFLAGS altogether.
# The workspace's release profile keeps line tables (debug = 1) for the host binaries; the
# guest copy drops debug info (function names stay, for backtraces): ~1/4 of the size.
unset CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS
RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    "$cargo" build --release --quiet -p agentenv-guest --bin agentenv-guest \
    --target "$TARGET" --target-dir "$target_dir" --manifest-path "$AGENTENV_REPO/Cargo.toml" \
    || die "cargo build of agentenv-guest failed (output above)"
[ -f "$built" ] || die "cargo did not produce $built"

step "checking $built"
[ "$(head -c 4 "$built" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] \
    || die "$built is not an ELF file"
is_static_elf "$built" \
    || die "$built is dynamically linked (was -C target-feature=+crt-static ignored? ldd: $(ldd "$built" 2>&1 | head -1))"

if [ "$force" = 0 ] && [ -f "$out" ] && cmp -s "$built" "$out"; then
    step_end
    echo "==> up to date: $out (--force installs it again)"
    exit 0
fi
step "installing $out"
install -m 0755 "$built" "$out.tmp" || die "cannot write $out.tmp"
mv -f "$out.tmp" "$out"
step_end
echo "==> done: $out ($(du -h --apparent-size "$out" | cut -f1), static $TARGET)"
