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
)
