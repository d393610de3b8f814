#!/usr/bin/env bash
# Installs agentenv on a remote host over SSH and runs it as a systemd service. See --help.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

PREFIX=/opt/agentenv
UNIT=agentenv.service
# The staged name of the config as installed (with the keys naming the installed files).
INSTALLED_CONFIG=agentenv.toml
# The keys the installed config gets from the installed files.
FILE_KEYS=(firecracker_binary kernel_root default_kernel rootfs_root initramfs_root default_initrd)

usage() {
    cat <<EOF
Usage: $PROG --host USER@HOST --firecracker FILE --agentenv BIN --kernel FILE
          --rootfs FILE --config FILE [--initrd FILE] [--no-service] [--sudo]
          [--ssh-opts "..."] [--listen ADDR] [--prefix DIR] [--dry-run]
       $PROG --print-unit [--listen ADDR] [--prefix DIR]

Copies the files to USER@HOST with scp and ssh:
  $PREFIX/bin/agentenv              <- --agentenv (the agentenv daemon binary)
  $PREFIX/bin/firecracker           <- --firecracker
  $PREFIX/bin/setup-runtime.sh      <- scripts/setup-runtime.sh (run there to make the
                                              config's directories, from $PREFIX)
  $PREFIX/kernels/NAME              <- --kernel
  $PREFIX/initramfs/NAME            <- --initrd
  $PREFIX/rootfs/NAME               <- --rootfs
  $PREFIX/config/agentenv.toml      <- --config, with the keys that name the installed
                                     files set to them: firecracker_binary, kernel_root,
                                     default_kernel, rootfs_root, initramfs_root and
                                     default_initrd (when there is an initramfs)
and installs, enables and (re)starts the systemd unit $UNIT. The unit runs the daemon
from $PREFIX (the config's other relative paths, e.g. session_root, are taken from
there) with KillMode=process, so VMMs survive a daemon restart. The rootfs is then
created with "rootfs_id": "NAME", NAME being the --rootfs file's name.

Options:
  --host USER@HOST     the SSH destination
  --firecracker FILE   the firecracker binary
  --agentenv BIN       the agentenv daemon binary
  --hypervisor BIN     the same (the option's former name, still accepted)
  --kernel FILE        guest kernel (vmlinux for Firecracker, vmlinuz for QEMU)
  --initrd FILE        guest initramfs (default: initrd.img beside --kernel when there is
                       one, as scripts/build-kernel.sh --output DIR/vmlinux leaves it)
  --no-initrd          install no initramfs, even when there is one beside --kernel
  --rootfs FILE        base root file system image
  --config FILE        the daemon's TOML config
  --listen ADDR        address the daemon listens on (default 127.0.0.1:8080)
  --prefix DIR         where to install on the host (default $PREFIX)
  --no-service         copy the files only; leave systemd alone
  --sudo               run the remote install commands with sudo (for a non-root USER)
  --ssh-opts "OPTS"    extra options for ssh and scp, split on spaces (e.g. "-p 2222 -i key")
  --dry-run            print the commands instead of running them
  --print-unit         print the systemd unit and exit
  -h, --help           show this help

Needs: ssh, scp (openssh-client); systemd on the remote host.
EOF
}

host=""
firecracker=""
agentenv_bin=""
agentenv_opt=""
kernel=""
initrd=""
no_initrd=0
rootfs=""
config=""
listen=127.0.0.1:8080
service=1
use_sudo=0
ssh_opts=""
dry_run=0
print_unit=0

# --agentenv and its former name --hypervisor name the same file: use one of them.
set_agentenv() {
    [ -z "$agentenv_opt" ] || [ "$agentenv_opt" = "$1" ] \
        || usage_error "$agentenv_opt and $1 both name the agentenv binary; give one of them"
    agentenv_opt=$1
    agentenv_bin=$2
}

while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --host) need_value "$1" $#; host=$2; shift 2 ;;
        --host=*) host=${1#*=}; shift ;;
        --firecracker) need_value "$1" $#; firecracker=$2; shift 2 ;;
        --firecracker=*) firecracker=${1#*=}; shift ;;
        --agentenv | --hypervisor) need_value "$1" $#; set_agentenv "$1" "$2"; shift 2 ;;
        --agentenv=* | --hypervisor=*) set_agentenv "${1%%=*}" "${1#*=}"; shift ;;
        --kernel) need_value "$1" $#; kernel=$2; shift 2 ;;
        --kernel=*) kernel=${1#*=}; shift ;;
        --initrd) need_value "$1" $#; initrd=$2; shift 2 ;;
        --initrd=*) initrd=${1#*=}; shift ;;
        --no-initrd) no_initrd=1; shift ;;
        --prefix) need_value "$1" $#; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --rootfs) need_value "$1" $#; rootfs=$2; shift 2 ;;
        --rootfs=*) rootfs=${1#*=}; shift ;;
        --config) need_value "$1" $#; config=$2; shift 2 ;;
        --config=*) config=${1#*=}; shift ;;
        --listen) need_value "$1" $#; listen=$2; shift 2 ;;
        --listen=*) listen=${1#*=}; shift ;;
        --no-service) service=0; shift ;;
        --sudo) use_sudo=1; shift ;;
        --ssh-opts) need_value "$1" $#; ssh_opts=$2; shift 2 ;;
        --ssh-opts=*) ssh_opts=${1#*=}; shift ;;
        --dry-run) dry_run=1; shift ;;
        --print-unit) print_unit=1; shift ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done

[[ $listen =~ ^[^[:space:]]+:[0-9]+$ ]] || usage_error "--listen must be ADDR:PORT, got '$listen'"
if [[ ! $PREFIX =~ ^/[A-Za-z0-9._/-]*[A-Za-z0-9._-]$ ]] || [[ $PREFIX =~ (^|/)\.\.?(/|$) ]]; then
    usage_error "--prefix must be an absolute directory of letters, digits, '.', '_', '-' and '/' (not / itself, no . or ..), got '$PREFIX'"
fi

unit_text() {
    cat <<EOF
[Unit]
Description=agentenv microVM control plane
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
WorkingDirectory=$PREFIX
ExecStartPre=$PREFIX/bin/setup-runtime.sh --config $PREFIX/config/agentenv.toml
ExecStart=$PREFIX/bin/agentenv --config $PREFIX/config/agentenv.toml --listen $listen
Restart=on-failure
RestartSec=2
# Only the daemon is stopped on restart: the VMM processes it started keep running and the
# restarted daemon adopts them.
KillMode=process
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target
EOF
}

if [ "$print_unit" = 1 ]; then
    unit_text
    exit 0
fi

[ -n "$host" ] || usage_error "--host USER@HOST is required"
[[ $host =~ ^([A-Za-z0-9._-]+@)?[A-Za-z0-9.:_-]+$ ]] || usage_error "--host must look like user@host, got '$host'"
for pair in "--firecracker:$firecracker" "--agentenv:$agentenv_bin" "--kernel:$kernel" \
    "--rootfs:$rootfs" "--config:$config"; do
    opt=${pair%%:*}
    file=${pair#*:}
    [ -n "$file" ] || usage_error "$opt FILE is required"
    [ -f "$file" ] || usage_error "$opt: no such file '$file'"
done
if [ -n "$initrd" ]; then
    [ "$no_initrd" = 0 ] || usage_error "--initrd and --no-initrd cannot be combined"
    [ -f "$initrd" ] || usage_error "--initrd: no such file '$initrd'"
elif [ "$no_initrd" = 0 ] && [ -f "$(dirname "$kernel")/initrd.img" ]; then
    initrd="$(dirname "$kernel")/initrd.img"
    echo "==> using the initramfs $initrd beside the kernel (--initrd FILE or --no-initrd to change)"
fi
declare -A seen_names=()
for file in "$agentenv_bin" "$firecracker" "$kernel" "$rootfs" ${initrd:+"$initrd"}; do
    name=$(basename "$file")
    [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || usage_error "file name '$name' must be letters, digits, '.', '_' or '-' only"
    case "$name" in setup-runtime.sh | common.sh | "$INSTALLED_CONFIG") usage_error "file name '$name' clashes with the helper scripts and the config copied along" ;; esac
    [ -z "${seen_names[$name]:-}" ] || usage_error "two of the files are named '$name'; rename one"
    seen_names[$name]=1
done
if [ "$dry_run" = 0 ]; then
    need_cmd ssh openssh-client
    need_cmd scp openssh-client
fi

# The config as installed: the keys naming installed files are set to them (a first block
# of top-level keys; the config's own lines for those keys, which must be top-level
# one-line `key = value` lines, are commented out), everything else is kept as written.
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
installed_config="$workdir/$INSTALLED_CONFIG"
{
    echo "# Installed by $PROG from $(basename "$config"): the keys below name the installed files."
    echo "firecracker_binary = \"$PREFIX/bin/firecracker\""
    echo "kernel_root = \"$PREFIX/kernels\""
    echo "default_kernel = \"$(basename "$kernel")\""
    echo "rootfs_root = \"$PREFIX/rootfs\""
    echo "initramfs_root = \"$PREFIX/initramfs\""
    [ -z "$initrd" ] || echo "default_initrd = \"$(basename "$initrd")\""
    echo "# --- $(basename "$config") as given (its lines for the keys above are commented out) ---"
    awk -v keys="${FILE_KEYS[*]}" '
        BEGIN { n = split(keys, k, " "); for (i = 1; i <= n; i++) drop[k[i]] = 1 }
        /^[ \t]*\[/ { table = 1 }
        !table && match($0, /^[ \t]*[A-Za-z0-9_]+[ \t]*=/) {
            key = substr($0, RSTART, RLENGTH); gsub(/[ \t=]/, "", key)
            if (key in drop) { print "# (set above) " $0; next }
        }
        { print }' "$config"
} >"$installed_config"
if python3 -c 'import tomllib' 2>/dev/null; then
    python3 - "$installed_config" "$config" "${FILE_KEYS[@]}" <<'EOF' || die "--config: $config cannot be installed (see above)"
import sys, tomllib
path, given, keys = sys.argv[1], sys.argv[2], sys.argv[3:]
try:
    with open(path, "rb") as f:
        tomllib.load(f)
except tomllib.TOMLDecodeError as e:
    sys.exit(f"{given}: not valid TOML once the installed file keys are set ({e}); "
             f"write {', '.join(keys)} as top-level one-line key = \"value\" lines")
EOF
fi

# shellcheck disable=SC2206 # --ssh-opts is split on spaces on purpose
ssh_args=($ssh_opts)
sudo=""
[ "$use_sudo" = 1 ] && sudo="sudo -n "
stage=".agentenv-install"

# scp spells ssh's -p PORT as -P PORT.
scp_args=()
for arg in ${ssh_args[@]+"${ssh_args[@]}"}; do
    if [ "$arg" = -p ]; then scp_args+=(-P); else scp_args+=("$arg"); fi
done

# shell_quote WORD: WORD as the shell would need it typed.
shell_quote() {
    if [[ $1 =~ ^[A-Za-z0-9@%+=:,./_-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

# run CMD...: run or (with --dry-run) print a command.
run() {
    if [ "$dry_run" = 1 ]; then
        local first=1 word
        for word in "$@"; do
            [ "$first" = 1 ] || printf ' '
            first=0
            shell_quote "$word"
        done
        echo
    else
        "$@"
    fi
}

remote() {
    run ssh ${ssh_args[@]+"${ssh_args[@]}"} "$host" "$1"
}

step "preparing $host:$PREFIX"
remote "set -e; mkdir -p $stage; ${sudo}mkdir -p $PREFIX/bin $PREFIX/kernels $PREFIX/initramfs $PREFIX/rootfs $PREFIX/config" \
    || die "cannot prepare $PREFIX on $host over ssh (reachable? key? --sudo needed for a non-root user?)"

step "copying files to $host"
files=("$agentenv_bin" "$firecracker" "$AGENTENV_REPO/scripts/setup-runtime.sh" "$AGENTENV_REPO/scripts/lib/common.sh" "$kernel" "$rootfs" "$installed_config")
[ -n "$initrd" ] && files+=("$initrd")
run scp -p ${scp_args[@]+"${scp_args[@]}"} "${files[@]}" "$host:$stage/" \
    || die "copying the files to $host:$stage/ failed (scp; the remote sshd needs its sftp subsystem)"

step "installing into $PREFIX"
install_cmd="set -e; cd $stage"
install_cmd+="; ${sudo}install -m 0755 $(basename "$agentenv_bin") $PREFIX/bin/agentenv"
install_cmd+="; ${sudo}install -m 0755 $(basename "$firecracker") $PREFIX/bin/firecracker"
install_cmd+="; ${sudo}install -m 0755 setup-runtime.sh $PREFIX/bin/setup-runtime.sh"
install_cmd+="; ${sudo}install -D -m 0644 common.sh $PREFIX/bin/lib/common.sh"
install_cmd+="; ${sudo}install -m 0644 $(basename "$kernel") $PREFIX/kernels/$(basename "$kernel")"
[ -n "$initrd" ] && install_cmd+="; ${sudo}install -m 0644 $(basename "$initrd") $PREFIX/initramfs/$(basename "$initrd")"
install_cmd+="; ${sudo}install -m 0644 $(basename "$rootfs") $PREFIX/rootfs/$(basename "$rootfs")"
install_cmd+="; ${sudo}install -m 0644 $INSTALLED_CONFIG $PREFIX/config/agentenv.toml"
install_cmd+="; cd $PREFIX && ${sudo}$PREFIX/bin/setup-runtime.sh --config $PREFIX/config/agentenv.toml"
install_cmd+="; rm -rf ~/$stage"
remote "$install_cmd" || die "installing into $PREFIX on $host failed"

if [ "$service" = 1 ]; then
    step "installing the systemd unit $UNIT"
    if [ "$dry_run" = 1 ]; then
        echo "# with the unit ($PROG --print-unit) on stdin:"
        remote "${sudo}tee /etc/systemd/system/$UNIT >/dev/null"
    else
        unit_text | remote "${sudo}tee /etc/systemd/system/$UNIT >/dev/null" \
            || die "writing /etc/systemd/system/$UNIT on $host failed"
    fi
    step "enabling and (re)starting $UNIT"
    remote "${sudo}systemctl daemon-reload && ${sudo}systemctl enable $UNIT && ${sudo}systemctl restart $UNIT && ${sudo}systemctl is-active $UNIT" \
        || die "starting $UNIT on $host failed (does it run systemd? 'journalctl -u $UNIT' there tells more);" \
            "the files are installed, --no-service skips this step"
fi
step_end
echo "==> done: $host runs agentenv from $PREFIX$([ "$service" = 1 ] && echo " as $UNIT, listening on $listen")"
