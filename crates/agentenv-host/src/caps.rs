//! Linux capabilities of the daemon process, for running it as a non-root user.
//!
//! `sudo setcap cap_net_admin+ep agentenv` lets a non-root daemon do automatic
//! networking: it then holds `CAP_NET_ADMIN` (TAPs over `/dev/net/tun`,
//! rtnetlink, the `net.ipv4.ip_forward` sysctl of its namespace). A file
//! capability is not passed on by `execve` to a program without one, so the
//! `nft` child that loads agentenv's table gets the capability through the
//! ambient set, raised in that child only ([`pass_net_admin`]); VMM processes
//! never get it. See `docs/seed-commands.md`.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// `CAP_NET_ADMIN` (linux/capability.h).
pub const CAP_NET_ADMIN: u32 = 12;

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's capability sets.
#[derive(Clone, Copy)]
struct CapSets([CapData; 2]);

impl CapSets {
    fn current() -> io::Result<CapSets> {
        let mut header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        // SAFETY: capget writes two `CapData` records (version 3) into `data`,
        // which has room for exactly two; `header` is a valid, initialised
        // header; pid 0 is the calling thread.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_capget,
                &mut header as *mut CapHeader,
                data.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(CapSets(data))
    }

    fn has(set: impl Fn(&CapData) -> u32, data: &[CapData; 2], cap: u32) -> bool {
        let word = &data[(cap / 32) as usize];
        set(word) & (1 << (cap % 32)) != 0
    }

    fn effective(&self, cap: u32) -> bool {
        Self::has(|d| d.effective, &self.0, cap)
    }

    fn permitted(&self, cap: u32) -> bool {
        Self::has(|d| d.permitted, &self.0, cap)
    }
}

/// Whether the process runs as root (effective uid 0).
pub fn is_root() -> bool {
    euid() == 0
}

/// The effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether the calling thread holds `cap` in its effective set.
pub fn has_effective(cap: u32) -> io::Result<bool> {
    Ok(CapSets::current()?.effective(cap))
}

/// Drops every capability of the calling thread (effective, permitted and
/// inheritable sets), for a non-root daemon that does not need the one a file
/// capability gave it. Threads started afterwards inherit the empty sets.
pub fn drop_all() -> io::Result<()> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads two `CapData` records (version 3) from `data`, which
    // holds exactly two; `header` is valid; pid 0 is the calling thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lets the child `cmd` starts keep `CAP_NET_ADMIN` across its `execve`, when
/// this process is not root and holds it (from a file capability): the child
/// raises it into its inheritable and ambient sets just before the exec. A
/// root daemon needs nothing (its children run as root); a daemon without the
/// capability passes none on.
pub fn pass_net_admin(cmd: &mut Command) {
    if is_root() {
        return;
    }
    let Ok(sets) = CapSets::current() else {
        return;
    };
    if !sets.permitted(CAP_NET_ADMIN) {
        return;
    }
    let mut data = sets.0;
    data[(CAP_NET_ADMIN / 32) as usize].inheritable |= 1 << (CAP_NET_ADMIN % 32);
    // SAFETY: the hook runs in the forked child before execve and only makes
    // two system calls (capset, prctl) on data prepared here, in the parent:
    // no allocation, no locks, nothing that is not async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let mut header = CapHeader {
                version: CAP_VERSION_3,
                pid: 0,
            };
            if libc::syscall(
                libc::SYS_capset,
                &mut header as *mut CapHeader,
                data.as_ptr(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                CAP_NET_ADMIN as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_sets() {
        let sets = CapSets::current().expect("capget works");
        // Effective is always a subset of permitted.
        for cap in 0..41 {
            assert!(!sets.effective(cap) || sets.permitted(cap), "cap {cap}");
        }
        if is_root() {
            // Tests run as root here, with the full set.
            assert!(has_effective(CAP_NET_ADMIN).unwrap());
        }
    }
}
