# shellcheck shell=bash
# The Debian packages agentenv's quickstart, tests and CI need. Sourced by
# scripts/quickstart.sh and .ci/run, so the list lives in one place.
# shellcheck disable=SC2034
AGENTENV_PACKAGES=(
  qemu-system-x86   # the QEMU microvm backend
  busybox-static    # guest userland (initramfs, minimal rootfs)
  e2fsprogs         # mkfs.ext4 -d, debugfs
  kmod              # depmod for the initramfs
  lz4               # vmlinux extraction from Debian's bzImage
  cpio              # initramfs archive
  xz-utils zstd     # unpacking kernel modules
  nftables          # the networking firewall table
  iproute2          # ip netns for the network tests
  xfsprogs          # reflink tests (mkfs.xfs -m reflink=1)
  curl ca-certificates
  python3
  fakeroot          # building images without root
  libcap2-bin       # setcap: the non-root daemon test (cap_net_admin on a copy)
  util-linux        # unshare, setpriv: offline seed-command and non-root tests
)
# Only where the tests run (CI): the seed setup-remote-host test starts its own sshd on
# a loopback port. Installing openssh-server also enables the host's ssh service, so the
# quickstart does not install it.
AGENTENV_CI_PACKAGES=(
  openssh-server openssh-client
  python3-venv      # tests/e2b: a venv per pinned e2b SDK version
  debootstrap       # the E2B base template image (Debian)
  build-essential bc bison flex libelf-dev libssl-dev  # compiling the guest kernel (acpi=off test)
)
