//! TAP devices through `/dev/net/tun`.
//!
//! A TAP is created *persistent* so it outlives the descriptor that created
//! it; the VMM later attaches to it by name. It is created single-queue (no
//! `IFF_MULTI_QUEUE`), which is what Firecracker and QEMU's default
//! `-netdev tap,ifname=…` open: the kernel refuses an open whose multi-queue
//! flag differs from the device's. `IFF_VNET_HDR` and `IFF_NO_PI` are
//! per-descriptor and set again by each opener (Firecracker always asks for
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`); they are given at creation to match.
//! Like every `/dev/net/tun` call, these act in the calling thread's network
//! namespace.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

const TUN_PATH: &str = "/dev/net/tun";

/// Creates the persistent TAP `name`; fails with `EBUSY` when a device of that
/// name already exists (it is then left alone).
pub fn create_persistent(name: &str) -> io::Result<()> {
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL;
    let file = attach(name, flags)?;
    if !crate::caps::is_root() {
        // A non-root daemon (CAP_NET_ADMIN from setcap) starts VMMs that hold no
        // capability: they may attach to the TAP because it is theirs (same
        // uid). A root daemon leaves the TAP ownerless: only CAP_NET_ADMIN
        // holders may attach.
        // SAFETY: `file` is an open /dev/net/tun descriptor attached to a device
        // by TUNSETIFF above; TUNSETOWNER takes the uid by value.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETOWNER,
                crate::caps::euid() as libc::c_ulong,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: `file` is an open /dev/net/tun descriptor attached to a device by
    // TUNSETIFF above; TUNSETPERSIST takes its argument by value.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        // Not persistent: the device goes away with `file`.
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a queue of the existing TAP `name` the way a single-queue VMM does
/// (`IFF_TAP | IFF_NO_PI`, plus `IFF_VNET_HDR` when asked). Reads and writes on
/// the file are whole Ethernet frames. Used by tests and benchmarks.
pub fn open_queue(name: &str, vnet_hdr: bool) -> io::Result<File> {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    attach(name, flags)
}

fn attach(name: &str, flags: libc::c_int) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(|e| io::Error::new(e.kind(), format!("{TUN_PATH}: {e}")))?;
    // SAFETY: `ifreq` is plain old data (arrays, integers and a union of
    // them); all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: `file` is an open /dev/net/tun descriptor and `req` a valid,
    // NUL-terminated `ifreq` (name shorter than IFNAMSIZ, rest zeroed) that
    // lives across the call; the kernel writes back at most `sizeof(ifreq)`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}
