#!/usr/bin/env bash
# Builds an ext4 root file system image for agentenv guests without mounting anything
# (mkfs.ext4 -d). See --help.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
    cat <<EOF
Usage: $PROG --output IMG --size-mib N [--flavor minimal|debian|e2b] [--dockerfile FILE]
       [--tar FILE] [--agent FILE] [--force]

Builds the ext4 image IMG of N MiB. Every image carries /sbin/overlay-init (the program the
agentenv initramfs starts; it stacks the overlay disk over the read-only image, starts the
guest agent and runs /sbin/init), /sbin/agentenv-boot (hostname, network, AGENTENV_READY,
heartbeat) and the guest agent /usr/sbin/agentenv-guest; see docs/guest-contract.md.

Flavors:
  minimal   busybox (busybox-static) with busybox init; builds in seconds; what the tests use.
            Prints AGENTENV_READY, powers off on the ACPI power button (acpid) and reboots
            at once on Ctrl-Alt-Del. No root needed (uses fakeroot when not root).
  debian    Debian (debootstrap, minbase) with systemd and openssh-server. Needs root and the
            Debian mirror. Root has no password on the console; SSH logins need --ssh-key.
  e2b       the E2B \`base\` template: Debian (debootstrap, minbase) with systemd, bash,
            coreutils, python3 and sudo, and the user \`user\` (uid 1000, home /home/user,
            shell bash, passwordless sudo), as E2B's base image has. No SSH server, no udev,
            no docs/man pages/locales/apt lists (dpkg keeps skipping docs for later
            installs); systemd starts only what a sandbox needs (resources/e2b/). Needs root and the Debian mirror.
            See docs/e2b-templates.md.

Options:
  --output IMG          image file to write (required; a missing parent directory, one
                        level, e.g. artifacts/, is created)
  --size-mib N          image size in MiB (required)
  --flavor F            minimal (default), debian or e2b
  --dockerfile FILE     build the file system from a Dockerfile instead of a flavor (needs a
                        running docker engine); e.g. resources/rootfs/Dockerfile
  --tar FILE            build the file system from a container's exported file system
                        (a tar file, e.g. made elsewhere with 'docker build' and
                        'docker export CONTAINER >FILE'); needs no docker here
  --busybox FILE        minimal: static busybox to use (default /bin/busybox)
  --suite S             debian/e2b: release (default bookworm)
  --mirror URL          debian/e2b: mirror (default: the first deb.debian.org-style URL apt
                        uses, else http://deb.debian.org/debian)
  --include PKGS        debian/e2b: extra packages, comma-separated
  --ssh-key FILE        debian/e2b/dockerfile: install FILE as /root/.ssh/authorized_keys
  --agent FILE          the guest agent to install as /usr/sbin/agentenv-guest, a static
                        executable (default $default_agent;
                        built with scripts/build-guest-agent.sh when missing; run that
                        script, or build-artifacts.sh, to refresh it)
  --force               rebuild even when IMG is up to date
  -h, --help            show this help

Environment:
  AGENTENV_CACHE        cache directory (default /var/cache/agentenv when writable, else
                        ~/.cache/agentenv): build stamps, debootstrap's package cache

Needs: e2fsprogs (mkfs.ext4 >= 1.43 for -d); minimal: busybox-static, fakeroot when not
root; debian: debootstrap; dockerfile: docker with a running engine; tar: root; without --agent and
without the default agent: a Rust toolchain (see scripts/build-guest-agent.sh).
EOF
}

default_agent="$AGENTENV_REPO/artifacts/agentenv-guest"

output=""
size_mib=""
flavor=""
dockerfile=""
tarfile=""
busybox=/bin/busybox
suite=bookworm
mirror=""
include=""
ssh_key=""
agent=""
force=0
orig_args=("$@")

while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --output) need_value "$1" $#; output=$2; shift 2 ;;
        --output=*) output=${1#*=}; shift ;;
        --size-mib) need_value "$1" $#; size_mib=$2; shift 2 ;;
        --size-mib=*) size_mib=${1#*=}; shift ;;
        --flavor) need_value "$1" $#; flavor=$2; shift 2 ;;
        --flavor=*) flavor=${1#*=}; shift ;;
        --dockerfile) need_value "$1" $#; dockerfile=$2; shift 2 ;;
        --dockerfile=*) dockerfile=${1#*=}; shift ;;
        --tar) need_value "$1" $#; tarfile=$2; shift 2 ;;
        --tar=*) tarfile=${1#*=}; shift ;;
        --busybox) need_value "$1" $#; busybox=$2; shift 2 ;;
        --busybox=*) busybox=${1#*=}; shift ;;
        --suite) need_value "$1" $#; suite=$2; shift 2 ;;
        --suite=*) suite=${1#*=}; shift ;;
        --mirror) need_value "$1" $#; mirror=$2; shift 2 ;;
        --mirror=*) mirror=${1#*=}; shift ;;
        --include) need_value "$1" $#; include=$2; shift 2 ;;
        --include=*) include=${1#*=}; shift ;;
        --ssh-key) need_value "$1" $#; ssh_key=$2; shift 2 ;;
        --ssh-key=*) ssh_key=${1#*=}; shift ;;
        --agent) need_value "$1" $#; agent=$2; shift 2 ;;
        --agent=*) agent=${1#*=}; [ -n "$agent" ] || usage_error "--agent needs a value"; shift ;;
        --force) force=1; shift ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done

[ -n "$output" ] || usage_error "--output IMG is required"
[ -n "$size_mib" ] || usage_error "--size-mib N is required"
need_uint --size-mib "$size_mib"
[ "$size_mib" -ge 8 ] || usage_error "--size-mib must be at least 8, got $size_mib"
[ "$size_mib" -le 1048576 ] || usage_error "--size-mib must be at most 1048576 (1 TiB), got $size_mib"
if [ -n "$dockerfile" ]; then
    [ -z "$flavor" ] || usage_error "--flavor and --dockerfile cannot be combined (the Dockerfile is the flavor)"
    [ -f "$dockerfile" ] || usage_error "--dockerfile: no such file '$dockerfile'"
    flavor=dockerfile
fi
if [ -n "$tarfile" ]; then
    [ -z "$flavor" ] || usage_error "--tar cannot be combined with --flavor or --dockerfile (the tar file is the flavor)"
    [ -f "$tarfile" ] || usage_error "--tar: no such file '$tarfile'"
    flavor=tar
fi
flavor=${flavor:-minimal}
case "$flavor" in
    minimal | debian | e2b | dockerfile | tar) ;;
    *) usage_error "--flavor must be minimal, debian or e2b, got '$flavor'" ;;
esac
[ ! -d "$output" ] || usage_error "--output: $output is a directory; give the image file's path"
check_parent_dir --output "$output"
if [ "$flavor" = minimal ]; then
    [ -f "$busybox" ] || usage_error "--busybox: no such file '$busybox' (install busybox-static)"
fi
if [ -n "$ssh_key" ]; then
    [ "$flavor" != minimal ] || usage_error "--ssh-key needs --flavor debian or --dockerfile (minimal has no SSH server)"
    [ -f "$ssh_key" ] || usage_error "--ssh-key: no such file '$ssh_key'"
fi
[[ $suite =~ ^[a-z]+$ ]] || usage_error "--suite must be a Debian release name such as bookworm, got '$suite'"
[[ -z $include || $include =~ ^[a-z0-9.+,-]+$ ]] || usage_error "--include must be comma-separated package names, got '$include'"
if [ -n "$agent" ]; then
    [ -f "$agent" ] || usage_error "--agent: no such file '$agent' (scripts/build-guest-agent.sh --out FILE builds one)"
fi

need_cmd mkfs.ext4 e2fsprogs

# --dockerfile needs a docker engine: say so (with the other ways to an image) before the
# guest agent is built or anything else is done.
if [ "$flavor" = dockerfile ]; then
    docker_alternatives="Other ways to a root file system image:
  - $PROG --flavor debian --output $output --size-mib $size_mib
      (debootstrap from the Debian mirror; systemd and openssh-server, like resources/rootfs/Dockerfile)
  - $PROG --flavor minimal --output $output --size-mib $size_mib
      (busybox, offline, seconds; what scripts/build-artifacts.sh builds)
  - on a machine with docker: docker build -t img -f $dockerfile $(dirname "$dockerfile") &&
      docker export \$(docker create img /sbin/init) >rootfs.tar; then here: $PROG --tar rootfs.tar --output $output --size-mib $size_mib"
    command -v podman >/dev/null 2>&1 \
        && docker_alternatives+="
  - podman is installed: its docker-compatible socket (systemctl start podman.socket;
      DOCKER_HOST=unix:///run/podman/podman.sock) serves as the docker engine"
    command -v docker >/dev/null 2>&1 \
        || die "--dockerfile needs docker with a running engine, and 'docker' is not installed (Debian package docker.io).
$docker_alternatives"
    docker_err=$(docker info 2>&1 >/dev/null) \
        || die "--dockerfile needs a running docker engine, and 'docker info' failed: $(echo "$docker_err" | head -3 | tr '\n' ' ')
$docker_alternatives"
fi

# The guest agent: the default one is built when missing (before a fakeroot re-run, which
# then finds it).
if [ -z "$agent" ]; then
    agent=$default_agent
    if [ ! -f "$agent" ]; then
        step "building the guest agent (no $agent)"
        "$AGENTENV_REPO/scripts/build-guest-agent.sh" --out "$agent" 2>&1 | sed 's/^/    /' \
            || die "building the guest agent failed (output above); or pass --agent FILE"
        step_end
    fi
fi
[ "$(head -c 4 "$agent" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] \
    || die "--agent: $agent is not an executable (not an ELF file)"
is_static_elf "$agent" \
    || die "--agent: $agent is not statically linked (scripts/build-guest-agent.sh builds a static one)"
agent=$(abspath "$agent")

# Files in the image must be owned by root: without root, redo the whole run under fakeroot.
if [ "$(id -u)" != 0 ]; then
    case "$flavor" in
        minimal)
            command -v fakeroot >/dev/null 2>&1 \
                || die "building as a non-root user needs fakeroot (Debian package fakeroot), or run as root"
            [ -z "${AGENTENV_UNDER_FAKEROOT:-}" ] || die "fakeroot did not give root (id -u is $(id -u))"
            AGENTENV_UNDER_FAKEROOT=1 exec fakeroot -- "$0" "${orig_args[@]}"
            ;;
        debian | e2b) die "--flavor $flavor needs root (debootstrap)" ;;
        dockerfile) die "--dockerfile needs root (to unpack the container's files with their owners)" ;;
        tar) die "--tar needs root (to unpack the container's files with their owners)" ;;
    esac
fi

ensure_parent_dir --output "$output"
output=$(abspath "$output")
cache=$(cache_root)
res="$AGENTENV_REPO/resources/rootfs"
stamp=$(stamp_file rootfs "$output")
mkdir -p "$cache"

# Everything the image is built from; a change in any of it rebuilds the image.
inputs=$( {
    echo "flavor $flavor size $size_mib suite $suite include $include"
    sha256 "$0"
    find "$res" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    case "$flavor" in
        minimal) sha256 "$busybox" ;;
        e2b) find "$AGENTENV_REPO/resources/e2b" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum ;;
        dockerfile) sha256 "$dockerfile" ;;
        tar) sha256 "$tarfile" ;;
    esac
    [ -z "$ssh_key" ] || sha256 "$ssh_key"
    sha256 "$agent"
} | sha256sum | cut -d' ' -f1)
if [ "$force" = 0 ] && stamp_matches "$stamp" "$inputs" "$output"; then
    echo "==> up to date: $output (--force rebuilds)"
    exit 0
fi

workdir=$(mktemp -d "$cache/create-rootfs.XXXXXX")
cleanup() {
    rm -rf "$workdir" "$output.tmp"
}
trap cleanup EXIT
chmod 0755 "$workdir"
root="$workdir/root"
mkdir -p "$root"

# install_agentenv_files ROOT: what every image carries, whatever its flavor.
install_agentenv_files() {
    local r=$1
    mkdir -p "$r/sbin" "$r/usr/sbin" "$r/etc/agentenv"
    for d in dev proc sys run tmp mnt root; do
        mkdir -p "$r/$d"
    done
    chmod 1777 "$r/tmp"
    chmod 0700 "$r/root"
    install -m 0755 "$res/overlay-init" "$r/sbin/overlay-init"
    install -m 0755 "$res/agentenv-boot" "$r/sbin/agentenv-boot"
    install -m 0755 "$agent" "$r/usr/sbin/agentenv-guest"
    echo "flavor=$flavor inputs=$inputs" >"$r/etc/agentenv/build-info"
}

build_minimal() {
    is_static_elf "$busybox" || die "--busybox: $busybox is not statically linked (install busybox-static)"
    step "assembling the minimal (busybox) tree"
    local r=$root
    mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc,home,var/log,var/tmp,lib}
    install -m 0755 "$busybox" "$r/bin/busybox"
    local applet
    for applet in $("$busybox" --list-full); do
        case "$applet" in
            bin/busybox | linuxrc) continue ;;
        esac
        mkdir -p "$r/$(dirname "$applet")"
        ln -sf /bin/busybox "$r/$applet"
    done
    chmod 1777 "$r/var/tmp"
    cp -a "$res/minimal/." "$r/"
    chmod 0755 "$r/etc/init.d/rcS" "$r/etc/acpi/PWRF/00000080" "$r"/sbin/agentenv-*
    install_agentenv_files "$r"
    printf 'root::0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$r/etc/passwd"
    printf 'root::0:\ntty:x:5:\nnogroup:x:65534:\n' >"$r/etc/group"
    printf 'root::19000:0:99999:7:::\n' >"$r/etc/shadow"
    chmod 0600 "$r/etc/shadow"
    echo agentenv >"$r/etc/hostname"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$r/etc/hosts"
    : >"$r/etc/fstab"
    : >"$r/etc/resolv.conf"
    ln -sf /proc/mounts "$r/etc/mtab"
    printf '/bin/sh\n/bin/ash\n' >"$r/etc/shells"
    cat >"$r/etc/profile" <<'EOF'
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PS1='\h:\w\$ '
EOF
    cat >"$r/etc/os-release" <<'EOF'
NAME="agentenv minimal"
ID=agentenv-minimal
PRETTY_NAME="agentenv minimal (busybox)"
EOF
}

debian_mirror() {
    if [ -n "$mirror" ]; then
        echo "$mirror"
        return
    fi
    local m
    m=$(grep -rhoE '^deb (\[[^]]*\] )?https?://[^ ]+/debian/? ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '{ print $NF }' | head -1 || true)
    if [ -z "$m" ]; then
        m=$(grep -rhE '^URIs: .*/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{ print $2 }' | head -1 || true)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

# add_systemd_units ROOT: enable the agentenv units when ROOT runs systemd.
add_systemd_units() {
    local r=$1 unit
    [ -e "$r/lib/systemd/systemd" ] || [ -e "$r/usr/lib/systemd/systemd" ] || return 0
    mkdir -p "$r/etc/systemd/system/multi-user.target.wants" "$r/etc/systemd/system/sysinit.target.wants" \
        "$r/etc/systemd/network"
    for unit in agentenv-setup agentenv-ready agentenv-heartbeat; do
        install -m 0644 "$res/debian/$unit.service" "$r/etc/systemd/system/$unit.service"
    done
    ln -sf ../agentenv-setup.service "$r/etc/systemd/system/sysinit.target.wants/agentenv-setup.service"
    ln -sf ../agentenv-ready.service "$r/etc/systemd/system/multi-user.target.wants/agentenv-ready.service"
    ln -sf ../agentenv-heartbeat.service "$r/etc/systemd/system/multi-user.target.wants/agentenv-heartbeat.service"
    # Keep the kernel's interface names: agentenv.ip configures eth0.
    ln -sf /dev/null "$r/etc/systemd/network/99-default.link"
    : >"$r/etc/machine-id"
}

finish_debian_like() {
    local r=$1
    install_agentenv_files "$r"
    add_systemd_units "$r"
    echo agentenv >"$r/etc/hostname"
    : >"$r/etc/fstab"
    rm -f "$r"/etc/ssh/ssh_host_*key* # each VM generates its own (agentenv-boot setup)
    if [ -n "$ssh_key" ]; then
        install -d -m 0700 "$r/root/.ssh"
        install -m 0600 "$ssh_key" "$r/root/.ssh/authorized_keys"
    fi
    rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb
}

# debootstrap_root PKGS: debootstrap (minbase) $suite into $root with PKGS and --include.
debootstrap_root() {
    need_cmd debootstrap debootstrap
    local m pkgs=$1
    m=$(debian_mirror)
    step "debootstrap $suite from $m"
    mkdir -p "$cache/debootstrap"
    [ -z "$include" ] || pkgs="$pkgs,$include"
    debootstrap --variant=minbase --include="$pkgs" --cache-dir="$cache/debootstrap" \
        "$suite" "$root" "$m" >"$workdir/debootstrap.log" 2>&1 \
        || { tail -20 "$workdir/debootstrap.log" >&2; die "debootstrap $suite from $m failed (log above)"; }
}

build_debian() {
    debootstrap_root systemd-sysv,udev,dbus,openssh-server,iproute2,procps,iputils-ping,ca-certificates,netbase
    step "adding the agentenv files"
    chroot "$root" passwd -d root >/dev/null
    finish_debian_like "$root"
}

# The E2B base template (docs/e2b-templates.md): what E2B's base image has, small and quick
# to boot. resources/e2b/ holds its dpkg excludes and the systemd units it masks.
build_e2b() {
    local e2b="$AGENTENV_REPO/resources/e2b" r=$root unit
    debootstrap_root systemd-sysv,iproute2,procps,ca-certificates,netbase,sudo,python3,bash,coreutils
    step "adding the user, sudo and the agentenv files"
    chroot "$r" passwd -d root >/dev/null
    chroot "$r" groupadd --gid 1000 user
    chroot "$r" useradd --uid 1000 --gid 1000 --groups sudo --create-home --home-dir /home/user \
        --shell /bin/bash user
    chroot "$r" passwd -d user >/dev/null
    install -m 0440 "$e2b/sudoers" "$r/etc/sudoers.d/user"
    install -m 0644 "$e2b/dpkg-excludes" "$r/etc/dpkg/dpkg.cfg.d/excludes"
    install -D -m 0644 "$e2b/journald.conf" "$r/etc/systemd/journald.conf.d/e2b.conf"
    finish_debian_like "$r"
    # What systemd would start and a sandbox does not need (each costs seconds under TCG).
    while read -r unit; do
        case "$unit" in '' | '#'*) continue ;; esac
        ln -sf /dev/null "$r/etc/systemd/system/$unit"
    done <"$e2b/masked-units"
    ln -sf /lib/systemd/system/multi-user.target "$r/etc/systemd/system/default.target"
    step "removing docs, man pages, locales and caches"
    rm -rf "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* \
        "$r"/usr/share/lintian "$r"/usr/share/linda "$r"/var/cache/debconf/*-old \
        "$r"/var/log/*.log "$r"/var/log/apt/* "$r"/var/cache/ldconfig/aux-cache
    find "$r/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
}

build_dockerfile() {
    local tag="agentenv-rootfs-build:$$" ctr
    step "docker build $(basename "$dockerfile")"
    docker build -q -t "$tag" -f "$dockerfile" "$(dirname "$dockerfile")" >/dev/null \
        || die "docker build of $dockerfile failed"
    step "exporting the container file system"
    ctr=$(docker create "$tag" /sbin/init)
    docker export "$ctr" | tar -x -C "$root" --numeric-owner \
        || { docker rm -f "$ctr" >/dev/null; die "docker export failed"; }
    docker rm -f "$ctr" >/dev/null
    docker rmi "$tag" >/dev/null 2>&1 || true
    [ -e "$root/sbin/init" ] || [ -L "$root/sbin/init" ] || warn "the image has no /sbin/init; pass agentenv.init=PATH when booting it"
    rm -f "$root/.dockerenv"
    step "adding the agentenv files"
    finish_debian_like "$root"
}

build_tar() {
    step "unpacking $(basename "$tarfile")"
    tar -x -f "$tarfile" -C "$root" --numeric-owner 2>"$workdir/tar.err" \
        || die "--tar: cannot unpack $tarfile: $(head -3 "$workdir/tar.err" | tr '\n' ' ')"
    [ -e "$root/sbin/init" ] || [ -L "$root/sbin/init" ] || warn "the image has no /sbin/init; pass agentenv.init=PATH when booting it"
    rm -f "$root/.dockerenv"
    step "adding the agentenv files"
    finish_debian_like "$root"
}

case "$flavor" in
    minimal) build_minimal ;;
    debian) build_debian ;;
    e2b) build_e2b ;;
    dockerfile) build_dockerfile ;;
    tar) build_tar ;;
esac

step "mkfs.ext4 -d ($size_mib MiB)"
used_kib=$(du -sk --apparent-size "$root" | cut -f1)
# ext4 needs room for its metadata and journal besides the files.
need_mib=$((used_kib * 12 / 10 / 1024 + 8))
[ "$size_mib" -ge "$need_mib" ] \
    || die "--size-mib $size_mib is too small: the $flavor tree has $((used_kib / 1024)) MiB; use at least $need_mib"
rm -f "$output.tmp"
mkfs.ext4 -q -F -t ext4 -L agentenv-root -m 0 -E root_owner=0:0 -d "$root" "$output.tmp" "${size_mib}M" \
    >"$workdir/mkfs.log" 2>&1 || { cat "$workdir/mkfs.log" >&2; die "mkfs.ext4 -d failed for $output"; }
mv -f "$output.tmp" "$output"
stamp_write "$stamp" "$inputs" "$output"
step_end
echo "==> done: $output ($flavor, $size_mib MiB, $((used_kib / 1024)) MiB of files)"
