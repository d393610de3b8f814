#!/usr/bin/env bash
# Builds the guest kernel and the initramfs agentenv boots VMs with. See --help.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

# Modules the initramfs loads (their dependencies are added automatically). See
# docs/guest-contract.md; button + evdev let busybox acpid see the ACPI power button.
DEFAULT_MODULES=(
    virtio_ring virtio virtio_mmio virtio_blk
    failover net_failover virtio_net
    vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
    virtio_console overlay
    button evdev virtio_rng virtio_balloon
)
META_PACKAGE=linux-image-cloud-amd64

usage() {
    cat <<EOF
Usage: $PROG [OPTIONS]

Builds, into the directory OUTPUT (directory form):
  kernels/vmlinuz         the kernel as a bzImage (what QEMU boots)
  kernels/vmlinux         the same kernel as an uncompressed ELF (what Firecracker boots)
  kernels/*.config        the kernel's config beside each (read by the daemon for acpi=off)
  initramfs/initrd.img    gzip newc cpio: busybox, the virtio/vsock/overlay modules and an
                          /init that mounts agentenv.root and runs /sbin/overlay-init
                          (docs/guest-contract.md)
or, when OUTPUT is a file path (file form, e.g. --output artifacts/vmlinux):
  OUTPUT                  the uncompressed ELF kernel (what Firecracker boots)
  DIR/initrd.img          the initramfs, beside it (DIR is OUTPUT's directory)
OUTPUT is a directory when it exists as one, ends in '/', or is not given; otherwise it
is the kernel's file path (a missing parent directory, one level, is created).

Default mode: takes Debian's cloud kernel (the package $META_PACKAGE depends on,
resolved with apt-cache), downloads it with apt-get and unpacks it into the cache.
Compile mode (--version): builds a kernel from source with a config fragment; everything
is built in, so the initramfs carries no modules.

Options:
  --output PATH        a directory for kernels/ and initramfs/, or the kernel's file path
                       (see above; default: the directory $AGENTENV_REPO/artifacts)
  --package NAME       Debian kernel package to use instead of the one $META_PACKAGE
                       depends on (e.g. linux-image-6.1.0-56-cloud-amd64)
  --deb FILE           use this kernel .deb instead of downloading one
  --module NAME        load one more module in the initramfs (repeatable)
  --busybox FILE       static busybox to put in the initramfs (default: /bin/busybox from
                       busybox-static)
  --version V          compile mode: build kernel V (e.g. 6.1 or 6.1.119) from source, from
                       Debian's linux-source-X.Y package when it has that version (apt:
                       works with a Debian mirror), else from cdn.kernel.org (needs the
                       internet, or the tarball put into the cache's src/ directory)
  --fragment FILE      compile mode: config fragment merged over x86_64_defconfig
                       (default: resources/kernel/firecracker.fragment)
  --jobs N             compile mode: parallel make jobs (default: nproc)
  --force              rebuild even when the outputs are up to date
  -h, --help           show this help

Environment:
  AGENTENV_CACHE       cache directory (default /var/cache/agentenv when writable, else
                       ~/.cache/agentenv)

Needs: apt-get/apt-cache, dpkg-deb, kmod (depmod, modprobe), lz4, cpio, gzip,
busybox-static; compile mode also build-essential bc bison flex libelf-dev libssl-dev.
EOF
}

output="$AGENTENV_REPO/artifacts"
output_given=""
package=""
deb=""
busybox=/bin/busybox
version=""
fragment=""
jobs=""
force=0
extra_modules=()

while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --output) need_value "$1" $#; output=$2; output_given=1; shift 2 ;;
        --output=*) output=${1#*=}; output_given=1; shift ;;
        --package) need_value "$1" $#; package=$2; shift 2 ;;
        --package=*) package=${1#*=}; shift ;;
        --deb) need_value "$1" $#; deb=$2; shift 2 ;;
        --deb=*) deb=${1#*=}; shift ;;
        --module) need_value "$1" $#; extra_modules+=("$2"); shift 2 ;;
        --module=*) extra_modules+=("${1#*=}"); shift ;;
        --busybox) need_value "$1" $#; busybox=$2; shift 2 ;;
        --busybox=*) busybox=${1#*=}; shift ;;
        --version) need_value "$1" $#; version=$2; shift 2 ;;
        --version=*) version=${1#*=}; shift ;;
        --fragment) need_value "$1" $#; fragment=$2; shift 2 ;;
        --fragment=*) fragment=${1#*=}; shift ;;
        --jobs) need_value "$1" $#; jobs=$2; shift 2 ;;
        --jobs=*) jobs=${1#*=}; shift ;;
        --force) force=1; shift ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done

[ -n "$output" ] || usage_error "--output must not be empty"
# Directory form when OUTPUT is (or is written as) a directory; file form otherwise.
output_form="file"
if [ -z "$output_given" ] || [ -d "$output" ] || [[ $output == */ ]]; then
    output_form="dir"
else
    check_parent_dir --output "$output"
fi
if [ -n "$version" ]; then
    [[ $version =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]] \
        || usage_error "--version must look like 6.1 or 6.1.119, got '$version'"
    [ -z "$package" ] || usage_error "--package cannot be combined with --version (compile mode)"
    [ -z "$deb" ] || usage_error "--deb cannot be combined with --version (compile mode)"
    [ ${#extra_modules[@]} -eq 0 ] || usage_error "--module cannot be combined with --version (compile mode builds everything in)"
    fragment=${fragment:-$AGENTENV_REPO/resources/kernel/firecracker.fragment}
    [ -f "$fragment" ] || usage_error "--fragment: no such file '$fragment'"
else
    [ -z "$fragment" ] || usage_error "--fragment needs --version (it selects compile mode)"
    [ -z "$jobs" ] || usage_error "--jobs needs --version (it selects compile mode)"
fi
if [ -n "$jobs" ]; then need_uint --jobs "$jobs"; fi
if [ -n "$deb" ]; then
    [ -f "$deb" ] || usage_error "--deb: no such file '$deb'"
    [ -z "$package" ] || usage_error "--deb and --package cannot be combined"
fi
[ -n "$package" ] && { [[ $package =~ ^linux-image-[a-z0-9.+-]+$ ]] || usage_error "--package must name a linux-image-* package, got '$package'"; }
for m in "${extra_modules[@]}"; do
    [[ $m =~ ^[A-Za-z0-9_-]+$ ]] || usage_error "--module: '$m' is not a module name"
done
[ -f "$busybox" ] || usage_error "--busybox: no such file '$busybox' (install busybox-static)"

output=$(abspath "$output")
cache=$(cache_root)
init_script="$AGENTENV_REPO/resources/initramfs/init"
[ -f "$init_script" ] || die "missing $init_script (is the repository complete?)"

need_cmd cpio cpio
need_cmd gzip gzip
is_static_elf "$busybox" || die "--busybox: $busybox is not statically linked (install busybox-static)"

if [ "$output_form" = dir ]; then
    vmlinuz_out="$output/kernels/vmlinuz"
    vmlinux_out="$output/kernels/vmlinux"
    initrd_out="$output/initramfs/initrd.img"
    outputs=("$vmlinuz_out" "$vmlinux_out" "$initrd_out")
else
    vmlinuz_out="" # the file form makes no bzImage
    vmlinux_out=$output
    initrd_out="$(dirname "$output")/initrd.img"
    [ "$initrd_out" != "$vmlinux_out" ] || usage_error "--output: $output would be overwritten by the initramfs; name the kernel otherwise"
    outputs=("$vmlinux_out" "$initrd_out")
fi
stamp=$(stamp_file build-kernel "$output")
mkdir -p "$cache"
for f in "${outputs[@]}"; do
    mkdir -p "$(dirname "$f")" || die "--output: cannot create the directory $(dirname "$f")"
done
workdir=$(mktemp -d "$cache/build-kernel.XXXXXX")
trap 'rm -rf "$workdir"' EXIT
chmod 0755 "$workdir" # apt-get download runs as _apt and must reach $workdir/download

# ---------------------------------------------------------------------------------------
# Kernel sources: a Debian package (default) or a compiled tree (--version).

# Sets kernel_root (a directory with boot/ and lib/modules/), kver and kernel_id.
use_debian_package() {
    need_cmd dpkg-deb dpkg
    need_cmd depmod kmod
    need_cmd modprobe kmod
    local debfile pkg ver
    if [ -n "$deb" ]; then
        step "using kernel package $deb"
        debfile=$(abspath "$deb")
        pkg=$(dpkg-deb -f "$debfile" Package) || die "--deb: $deb is not a Debian package"
        ver=$(dpkg-deb -f "$debfile" Version)
    else
        step "resolving the kernel package"
        need_cmd apt-cache apt
        pkg=$package
        if [ -z "$pkg" ]; then
            pkg=$(apt-cache depends "$META_PACKAGE" 2>/dev/null \
                | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
        fi
        ver=""
        if [ -n "$pkg" ]; then
            ver=$(apt-cache policy "$pkg" 2>/dev/null | awk '$1 == "Candidate:" { print $2 }')
            [ "$ver" = "(none)" ] && ver=""
        fi
        if [ -z "$pkg" ] || [ -z "$ver" ]; then
            # apt has no lists (offline, or not Debian): reuse the newest cached package.
            debfile=$(ls -1 "$cache"/debs/"${pkg:-linux-image-*-cloud-amd64}"_*.deb 2>/dev/null | sort -V | tail -1 || true)
            [ -n "$debfile" ] || die "cannot resolve ${pkg:-the package $META_PACKAGE depends on} with apt-cache" \
                "and nothing is cached in $cache/debs; run 'apt-get update', or pass --deb FILE"
            pkg=$(dpkg-deb -f "$debfile" Package)
            ver=$(dpkg-deb -f "$debfile" Version)
            warn "apt-cache could not resolve the kernel; using the cached $(basename "$debfile")"
        else
            debfile="$cache/debs/${pkg}_${ver}_amd64.deb"
            echo "    $pkg $ver"
            if [ ! -f "$debfile" ]; then
                step "downloading $pkg $ver"
                need_cmd apt-get apt
                local dl="$workdir/download"
                mkdir -p "$dl" "$cache/debs"
                chmod 0777 "$dl" # apt's _apt user downloads into it
                (cd "$dl" && apt-get download -q "$pkg=$ver") \
                    || die "apt-get download $pkg=$ver failed (run 'apt-get update'? no network?)"
                mv -f "$dl"/*.deb "$debfile.tmp"
                mv -f "$debfile.tmp" "$debfile"
            else
                echo "    cached: $debfile"
            fi
        fi
    fi
    kernel_id="${pkg}_${ver}"
    kernel_root="$cache/kernel/$kernel_id"
    if [ ! -f "$kernel_root/.unpacked" ]; then
        step "unpacking $kernel_id"
        rm -rf "$kernel_root"
        mkdir -p "$kernel_root"
        dpkg-deb -x "$debfile" "$kernel_root" || die "cannot unpack $debfile"
        kver=$(ls -1 "$kernel_root/lib/modules" | head -1)
        [ -n "$kver" ] || die "$debfile has no lib/modules/ directory"
        depmod -b "$kernel_root" "$kver" || die "depmod failed on $kernel_root"
        touch "$kernel_root/.unpacked"
    fi
    kver=$(ls -1 "$kernel_root/lib/modules" | head -1)
    [ -f "$kernel_root/boot/vmlinuz-$kver" ] || die "$kernel_root has no boot/vmlinuz-$kver"
    echo "    kernel $kver from $kernel_id"
}

# debian_source_versions: the kernel sources apt can fetch (Debian's linux-source-X.Y
# packages), as --version choices, for the offline message.
debian_source_versions() {
    local pkg ver list=""
    for pkg in $(apt-cache search --names-only '^linux-source-[0-9]+\.[0-9]+$' 2>/dev/null | awk '{ print $1 }' | sort -V); do
        ver=$(apt-cache policy "$pkg" 2>/dev/null | awk '$1 == "Candidate:" { print $2 }')
        if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then continue; fi
        list+="${list:+, }--version ${pkg#linux-source-} ($pkg $ver)"
    done
    echo "${list:-none (apt knows no linux-source-X.Y package; run 'apt-get update' with a Debian mirror)}"
}

# Sets kernel_root, kver and kernel_id for a kernel compiled from source.
compile_kernel() {
    need_cmd xz xz-utils
    local series=${version%.*}
    [[ $version =~ ^[0-9]+\.[0-9]+$ ]] && series=$version
    local srcdir="$cache/src/linux-$version"
    if [ ! -f "$srcdir/.unpacked" ]; then
        step "fetching the source of linux $version"
        local tarball="" debsrc="linux-source-$series"
        local debver
        debver=$(apt-cache policy "$debsrc" 2>/dev/null | awk '$1 == "Candidate:" { print $2 }' || true)
        if [ -n "$debver" ] && [ "$debver" != "(none)" ] \
            && { [ "$series" = "$version" ] || [ "${debver%%-*}" = "$version" ]; }; then
            mkdir -p "$cache/debs"
            local srcdeb="$cache/debs/${debsrc}_${debver}_all.deb"
            if [ ! -f "$srcdeb" ]; then
                local dl="$workdir/download"
                mkdir -p "$dl" && chmod 0777 "$dl"
                (cd "$dl" && apt-get download -q "$debsrc=$debver") || die "apt-get download $debsrc=$debver failed"
                mv -f "$dl"/*.deb "$srcdeb"
            fi
            dpkg-deb -x "$srcdeb" "$workdir/srcdeb"
            tarball=$(ls "$workdir"/srcdeb/usr/src/linux-source-*.tar.* | head -1)
            echo "    source: Debian $debsrc $debver"
        else
            local major=${version%%.*}
            local url="https://cdn.kernel.org/pub/linux/kernel/v$major.x/linux-$version.tar.xz"
            tarball="$cache/src/linux-$version.tar.xz"
            if [ ! -f "$tarball" ]; then
                mkdir -p "$cache/src"
                need_cmd curl curl
                local err
                if ! err=$(curl -fsSL --proto '=https' --connect-timeout 20 -o "$tarball.tmp" "$url" 2>&1); then
                    rm -f "$tarball.tmp"
                    die "cannot download $url (${err:-curl failed}), and apt offers no $debsrc with $version.
The source of linux $version needs the internet (cdn.kernel.org). Without it:
  - build a version apt has: $(debian_source_versions)
  - or download $url on a machine that has access and put it at $tarball, then run this again"
                fi
                mv -f "$tarball.tmp" "$tarball"
            fi
            echo "    source: $url"
        fi
        rm -rf "$srcdir" && mkdir -p "$srcdir"
        tar -xf "$tarball" -C "$srcdir" --strip-components=1 || die "cannot unpack $tarball"
        touch "$srcdir/.unpacked"
    fi
    need_cmd make build-essential
    need_cmd gcc build-essential
    need_cmd flex flex
    need_cmd bison bison
    need_cmd bc bc
    step "configuring (x86_64_defconfig + $(basename "$fragment"))"
    make -C "$srcdir" -s x86_64_defconfig >/dev/null
    (cd "$srcdir" && ./scripts/kconfig/merge_config.sh -m .config "$(abspath "$fragment")") >/dev/null \
        || die "merging $fragment failed"
    make -C "$srcdir" -s olddefconfig >/dev/null
    local missing
    missing=$(grep -E '^CONFIG_[A-Z0-9_]+=y' "$fragment" | while read -r line; do
        grep -qx "$line" "$srcdir/.config" || echo "${line%%=*}"
    done)
    [ -z "$missing" ] || warn "options from $fragment not set in the final config: $(echo "$missing" | tr '\n' ' ')"
    step "compiling linux $version (make -j${jobs:-$(nproc)})"
    make -C "$srcdir" -s -j"${jobs:-$(nproc)}" vmlinux bzImage || die "the kernel build failed in $srcdir"
    kver=$(make -C "$srcdir" -s kernelrelease)
    kernel_root="$workdir/compiled"
    mkdir -p "$kernel_root/boot"
    cp "$srcdir/arch/x86/boot/bzImage" "$kernel_root/boot/vmlinuz-$kver"
    cp "$srcdir/vmlinux" "$kernel_root/boot/vmlinux-$kver"
    cp "$srcdir/.config" "$kernel_root/boot/config-$kver"
    kernel_id="compiled-$kver-$(sha256 "$srcdir/.config" | cut -c1-12)"
}

if [ -n "$version" ]; then
    modules=()
else
    modules=("${DEFAULT_MODULES[@]}" "${extra_modules[@]}")
fi

# Up to date when the stamp records the same inputs and the outputs are unchanged.
if [ -z "$version" ]; then
    use_debian_package
    source_id=$kernel_id
else
    source_id="compile linux-$version $(sha256 "$fragment")"
fi
inputs=$( {
    echo "$source_id"
    echo "${modules[*]}"
    sha256 "$0"
    sha256 "$init_script"
    sha256 "$busybox"
} | sha256sum | cut -d' ' -f1)
if [ "$force" = 0 ] && stamp_matches "$stamp" "$inputs" "${outputs[@]}"; then
    step_end
    echo "==> up to date: $(printf '%s, ' "${outputs[@]}" | sed 's/, $//') (--force rebuilds)"
    exit 0
fi
if [ -n "$version" ]; then
    compile_kernel
fi

# ---------------------------------------------------------------------------------------
# kernels/vmlinuz and kernels/vmlinux

# check_elf FILE: FILE is a complete 64-bit ELF (it reaches past its section header table).
check_elf() {
    [ "$(head -c 4 "$1" | od -An -c | tr -d ' ')" = '177ELF' ] || return 1
    local shoff shentsize shnum size
    shoff=$(od -An -t u8 -j 40 -N 8 "$1" | tr -d ' ')
    shentsize=$(od -An -t u2 -j 58 -N 2 "$1" | tr -d ' ')
    shnum=$(od -An -t u2 -j 60 -N 2 "$1" | tr -d ' ')
    size=$(stat -c %s "$1")
    [ "$size" -ge $((shoff + shentsize * shnum)) ]
}

bzimage="$kernel_root/boot/vmlinuz-$kver"
if [ -n "$vmlinuz_out" ]; then
    step "kernels/vmlinuz"
    cp -f "$bzimage" "$vmlinuz_out.tmp"
    mv -f "$vmlinuz_out.tmp" "$vmlinuz_out"
    echo "    $vmlinuz_out ($(du -h "$vmlinuz_out" | cut -f1))"
fi

step "$( [ "$output_form" = dir ] && echo kernels/vmlinux || echo "$vmlinux_out") (ELF)"
if [ -f "$kernel_root/boot/vmlinux-$kver" ]; then
    cp -f "$kernel_root/boot/vmlinux-$kver" "$vmlinux_out.tmp"
else
    # Debian builds with CONFIG_KERNEL_LZ4: the payload is an LZ4 legacy frame, magic 02 21 4c 18.
    need_cmd lz4 lz4
    grep -q '^CONFIG_KERNEL_LZ4=y' "$kernel_root/boot/config-$kver" \
        || die "$kernel_id is not LZ4-compressed (CONFIG_KERNEL_LZ4); cannot extract vmlinux"
    found=0
    for off in $(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$bzimage" | cut -d: -f1); do
        # lz4 stops with an error at the bzImage's trailing bytes; check_elf judges the result.
        tail -c +$((off + 1)) "$bzimage" | lz4 -dc >"$vmlinux_out.tmp" 2>/dev/null || true
        if check_elf "$vmlinux_out.tmp"; then
            found=1
            echo "    LZ4 payload at offset $off"
            break
        fi
    done
    [ "$found" = 1 ] || die "no LZ4 payload in $bzimage decompresses to an ELF kernel"
fi
check_elf "$vmlinux_out.tmp" || die "$vmlinux_out.tmp is not a complete ELF kernel"
mv -f "$vmlinux_out.tmp" "$vmlinux_out"
echo "    $vmlinux_out ($(du -h "$vmlinux_out" | cut -f1), ELF)"

# The kernel's config beside each image (KERNEL.config): the daemon reads it to tell whether
# the kernel finds virtio-mmio devices without ACPI (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES) and
# refuses `acpi=off` for one that cannot, instead of a guest that never gets ready.
for img in "$vmlinuz_out" "$vmlinux_out"; do
    cp -f "$kernel_root/boot/config-$kver" "$img.config"
done

# ---------------------------------------------------------------------------------------
# initramfs/initrd.img

step "$( [ "$output_form" = dir ] && echo initramfs/initrd.img || echo "$initrd_out")"
tree="$workdir/initramfs"
mkdir -p "$tree"/{bin,dev,proc,sys,newroot,etc/agentenv,lib/modules}
ln -s bin "$tree/sbin"
ln -s . "$tree/usr"
cp "$busybox" "$tree/bin/busybox"
chmod 0755 "$tree/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$tree/bin/$applet"
done
install -m 0755 "$init_script" "$tree/init"
: >"$tree/etc/agentenv/modules"
if [ ${#modules[@]} -gt 0 ]; then
    moddir="$kernel_root/lib/modules/$kver"
    declare -A seen=()
    for m in "${modules[@]}"; do
        deps=$(modprobe -d "$kernel_root" -S "$kver" --show-depends "$m" 2>&1) \
            || die "module '$m' is not in $kernel_id: $deps"
        while read -r kind path _; do
            [ "$kind" = insmod ] || continue # "builtin NAME": nothing to load
            rel=${path#"$moddir"/}
            [ -z "${seen[$rel]:-}" ] || continue
            seen[$rel]=1
            mkdir -p "$tree/lib/modules/$kver/$(dirname "$rel")"
            cp "$path" "$tree/lib/modules/$kver/$rel"
            echo "$rel" >>"$tree/etc/agentenv/modules"
        done <<<"$deps"
    done
    cp "$moddir"/modules.{order,builtin,builtin.modinfo} "$tree/lib/modules/$kver/" 2>/dev/null || true
    depmod -b "$tree" "$kver" || die "depmod failed on the initramfs tree"
    echo "    $(wc -l <"$tree/etc/agentenv/modules") modules for $kver"
fi

# Reproducible archive: sorted names, fixed times, owned by root. dev/console lets the kernel
# open the console before /init runs; creating it needs root (or fakeroot).
find "$tree" -exec touch -h -d @0 {} +
archive_cmd='cd "$1" && find . -mindepth 1 -print0 | LC_ALL=C sort -z | cpio --null --create --format=newc --owner=0:0 --reproducible --quiet'
console_cmd='mknod -m 0600 "$1/dev/console" c 5 1 && touch -h -d @0 "$1/dev/console" "$1/dev"'
if [ "$(id -u)" = 0 ]; then
    bash -o pipefail -c "$console_cmd && $archive_cmd" _ "$tree" | gzip -6 -n >"$initrd_out.tmp"
elif command -v fakeroot >/dev/null 2>&1; then
    fakeroot -- bash -o pipefail -c "$console_cmd && $archive_cmd" _ "$tree" | gzip -6 -n >"$initrd_out.tmp"
else
    warn "not root and no fakeroot: initrd.img has no /dev/console node (its /init copes)"
    bash -o pipefail -c "$archive_cmd" _ "$tree" | gzip -6 -n >"$initrd_out.tmp"
fi
mv -f "$initrd_out.tmp" "$initrd_out"
echo "    $initrd_out ($(du -h "$initrd_out" | cut -f1))"

stamp_write "$stamp" "$inputs" "${outputs[@]}"
step_end
echo "==> done: kernel $kver ($kernel_id) in $(printf '%s, ' "${outputs[@]}" | sed 's/, $//')"
