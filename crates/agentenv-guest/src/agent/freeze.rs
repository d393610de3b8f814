//! `Freeze`/`Thaw`: `FIFREEZE` on every writable local file system, for
//! consistent disk snapshots.
//!
//! The frozen set is global (file systems are). A freeze thaws by itself
//! after [`AUTO_THAW`] without a `Thaw`, and when the session that froze ends:
//! a guest must never stay frozen because the host went away.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use agentenv_proto::{unescape_mount_field as unescape, ErrorCode, ErrorMsg};

use super::{lock, spawn, sys};

/// File system types that are frozen.
const FREEZABLE: [&str; 5] = ["ext4", "ext3", "ext2", "xfs", "btrfs"];

/// How long a freeze lasts without a `Thaw`.
pub const AUTO_THAW: Duration = Duration::from_secs(10);

/// One line of `/proc/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The mounted device.
    pub device: String,
    /// The mount point (octal escapes decoded).
    pub dir: String,
    /// The file system type.
    pub fstype: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Parses `/proc/mounts`; lines that do not parse are skipped.
pub fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (device, dir, fstype, opts) = (f.next()?, f.next()?, f.next()?, f.next()?);
            Some(Mount {
                device: unescape(device),
                dir: unescape(dir),
                fstype: fstype.to_string(),
                read_only: opts.split(',').any(|o| o == "ro"),
            })
        })
        .collect()
}

/// The mount points to freeze, deepest first: writable, of a freezable type,
/// one per device (the first listed), optionally only under `only_under`.
pub fn select(mounts: &[Mount], only_under: Option<&Path>) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out: Vec<String> = mounts
        .iter()
        .filter(|m| !m.read_only && FREEZABLE.contains(&m.fstype.as_str()))
        .filter(|m| match only_under {
            Some(p) => Path::new(&m.dir).starts_with(p),
            None => true,
        })
        .filter(|m| seen.insert(m.device.clone()))
        .map(|m| m.dir.clone())
        .collect();
    // Stable: equally deep ones keep the order of /proc/mounts.
    out.sort_by_key(|d| std::cmp::Reverse(Path::new(d).components().count()));
    out
}

struct FrozenState {
    /// Frozen mount points, in the order they were frozen.
    frozen: Vec<String>,
    /// Changes on every freeze and thaw; an auto-thaw timer acts only on its own epoch.
    epoch: u64,
    /// The session that froze.
    owner: u64,
}

static FROZEN: Mutex<FrozenState> = Mutex::new(FrozenState {
    frozen: Vec::new(),
    epoch: 0,
    owner: 0,
});
static CHANGED: Condvar = Condvar::new();

fn io_error(what: &str, dir: &str, e: &io::Error) -> ErrorMsg {
    let code = match e.kind() {
        io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        io::ErrorKind::NotFound => ErrorCode::NotFound,
        _ => ErrorCode::Io,
    };
    ErrorMsg::new(code, None, format!("{what} {dir}: {e}"))
}

/// Freezes the selected file systems for `session`; returns every frozen
/// mount point. On a failure, what this call froze is thawed again.
pub fn freeze(session: u64, only_under: Option<&Path>) -> Result<Vec<String>, ErrorMsg> {
    let text = std::fs::read_to_string("/proc/mounts")
        .map_err(|e| io_error("read", "/proc/mounts", &e))?;
    let targets = select(&parse_mounts(&text), only_under);
    let mut st = lock(&FROZEN);
    let mut newly: Vec<String> = Vec::new();
    for dir in targets {
        if st.frozen.contains(&dir) {
            continue;
        }
        match sys::fifreeze(Path::new(&dir)) {
            // EBUSY: already frozen (by someone else); counts as frozen.
            Ok(()) => newly.push(dir),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => newly.push(dir),
            Err(e) => {
                for d in newly.iter().rev() {
                    let _ = sys::fithaw(Path::new(d));
                }
                return Err(io_error("freeze", &dir, &e));
            }
        }
    }
    st.frozen.extend(newly);
    st.epoch += 1;
    st.owner = session;
    let epoch = st.epoch;
    let frozen = st.frozen.clone();
    drop(st);
    CHANGED.notify_all();
    if spawn("auto-thaw", move || auto_thaw(epoch)).is_err() {
        let _ = thaw();
        return Err(ErrorMsg::new(
            ErrorCode::Io,
            None,
            "cannot start the auto-thaw thread; thawed again",
        ));
    }
    Ok(frozen)
}

fn thaw_locked(st: &mut FrozenState) -> Result<Vec<String>, ErrorMsg> {
    st.epoch += 1;
    let mut thawed = Vec::new();
    let mut failed = Vec::new();
    // Shallowest first: the reverse of the freeze order.
    for dir in st.frozen.drain(..).rev() {
        match sys::fithaw(Path::new(&dir)) {
            // EINVAL: it was not frozen (any more).
            Ok(()) => thawed.push(dir),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => thawed.push(dir),
            Err(e) => failed.push((dir, e)),
        }
    }
    CHANGED.notify_all();
    if let Some((dir, e)) = failed.first() {
        let e = io_error("thaw", dir, e);
        // Keep them, so a later thaw (or the auto-thaw) tries again.
        st.frozen.extend(failed.into_iter().map(|(d, _)| d));
        return Err(e);
    }
    Ok(thawed)
}

/// Thaws everything frozen; returns the mount points thawed.
pub fn thaw() -> Result<Vec<String>, ErrorMsg> {
    thaw_locked(&mut lock(&FROZEN))
}

/// The session ended: thaws if it is the one that froze.
pub fn release(session: u64) {
    let mut st = lock(&FROZEN);
    if st.owner == session && !st.frozen.is_empty() {
        if let Err(e) = thaw_locked(&mut st) {
            eprintln!("agentenv-guest: thaw after the host went away: {}", e.error);
        }
    }
}

fn auto_thaw(epoch: u64) {
    let st = lock(&FROZEN);
    let (mut st, _) = CHANGED
        .wait_timeout_while(st, AUTO_THAW, |st| st.epoch == epoch)
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if st.epoch == epoch && !st.frozen.is_empty() {
        let mounts = st.frozen.join(" ");
        match thaw_locked(&mut st) {
            Ok(_) => eprintln!(
                "agentenv-guest: no thaw within {} s: thawed {mounts}",
                AUTO_THAW.as_secs()
            ),
            Err(e) => eprintln!("agentenv-guest: auto-thaw: {}", e.error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
proc /proc proc rw,relatime 0 0
/dev/vda / ext4 ro,relatime 0 0
/dev/vdb /run/agentenv/rw ext4 rw,relatime 0 0
overlay / overlay rw,lowerdir=/run/agentenv/lower,upperdir=/run/agentenv/rw/upper 0 0
/dev/vda /run/agentenv/lower ext4 ro,relatime 0 0
tmpfs /run tmpfs rw,nosuid 0 0
/dev/vdc /mnt/data ext4 rw,relatime 0 0
/dev/vdc /srv/data\\040copy ext4 rw,relatime 0 0
/dev/vdd /mnt/data/inner\\040dir xfs rw 0 0
/dev/vde /var/lib/b btrfs rw,ro_compat_thing 0 0
/dev/vdf /mnt/old ext2 rw,noatime 0 0
/dev/vdg /mnt/ro ext3 ro 0 0
bad line
";

    #[test]
    fn mounts_parse_with_escapes_and_read_only_flags() {
        let m = parse_mounts(SAMPLE);
        assert_eq!(m.len(), 12);
        assert_eq!(m[7].dir, "/srv/data copy");
        assert!(m[1].read_only);
        assert!(!m[9].read_only, "ro_compat_thing is not ro");
        assert_eq!(unescape("a\\134b\\011c\\012"), "a\\b\tc\n");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn selection_is_writable_freezable_one_per_device_deepest_first() {
        let m = parse_mounts(SAMPLE);
        assert_eq!(
            select(&m, None),
            vec![
                "/run/agentenv/rw",
                "/mnt/data/inner dir",
                "/var/lib/b",
                "/mnt/data",
                "/mnt/old",
            ]
        );
        assert_eq!(
            select(&m, Some(Path::new("/mnt/data"))),
            vec!["/mnt/data/inner dir", "/mnt/data"]
        );
        assert!(select(&m, Some(Path::new("/mnt/dat"))).is_empty());
        assert!(select(&parse_mounts("tmpfs /tmp tmpfs rw 0 0\n"), None).is_empty());
    }
}
