//! Memory and CPU figures of processes from `/proc`, and the host's
//! description and load for the reports.

use std::path::Path;

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`, …), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kib(&text, field)
}

fn parse_status_kib(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// KiB (as `/proc` gives them) in MiB, for the reports.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Resident and peak-resident memory of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rss {
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// `VmHWM` (the peak of `VmRSS` over the process's life), KiB.
    pub hwm_kib: u64,
}

impl Rss {
    /// Reads both figures; `None` when the process is gone.
    pub fn of(pid: u32) -> Option<Rss> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        Some(Rss {
            rss_kib: parse_status_kib(&text, "VmRSS")?,
            hwm_kib: parse_status_kib(&text, "VmHWM")?,
        })
    }
}

/// Proportional set size of a process (`Pss` of `/proc/PID/smaps_rollup`),
/// KiB: each page shared with other processes counts for its share.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_status_kib(&text, "Pss")
}

/// The threads of a process with the CPU time each has used so far (clock
/// ticks, from `/proc/PID/task/TID/stat`).
pub fn thread_cpu_ticks(pid: u32) -> Vec<(u32, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let text = std::fs::read_to_string(e.path().join("stat")).ok()?;
            Some((tid, parse_stat_cpu_ticks(&text)?))
        })
        .collect()
}

/// The scheduler state of one thread (`R` running or runnable, `S`
/// sleeping, …: field 3 of `/proc/PID/task/TID/stat`).
pub fn thread_state(pid: u32, tid: u32) -> Option<char> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    text[text.rfind(')')? + 1..].trim_start().chars().next()
}

/// utime + stime from a `/proc/PID/stat` line. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat_cpu_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11); // fields 3..=13
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The file-system type of a path, by `statfs` magic (for the report: fsync
/// costs differ a lot between tmpfs and a disk).
pub fn fs_type(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return "unknown".into();
    };
    // SAFETY: `c` is a valid NUL-terminated path and `buf` a writable statfs.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        return "unknown".into();
    }
    #[allow(clippy::unnecessary_cast)]
    match buf.f_type as i64 {
        0xEF53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x0102_1997 => "9p".into(),
        0x6573_5546 => "fuse".into(),
        other => format!("0x{other:x}"),
    }
}

/// The 1-minute load average (0 when it cannot be read).
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The machine a benchmark ran on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// CPUs available to this process.
    pub cpus: usize,
    /// The kernel release.
    pub kernel: String,
    /// The first CPU's model name.
    pub cpu_model: String,
}

impl HostInfo {
    /// Reads it (fields it cannot read are 0 or empty).
    pub fn read() -> HostInfo {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix("model name")
                        .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
                })
            })
            .unwrap_or_default();
        HostInfo {
            cpus,
            kernel,
            cpu_model,
        }
    }

    /// True when the higher of two load averages is above half the CPUs: the
    /// figures of such a run are noisy.
    pub fn busy(&self, load: (f64, f64)) -> bool {
        load.0.max(load.1) > self.cpus as f64 * 0.5
    }

    /// As JSON: `cpus`, `kernel`, `cpu_model`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"cpus": self.cpus, "kernel": self.kernel, "cpu_model": self.cpu_model})
    }
}

impl std::fmt::Display for HostInfo {
    /// "N CPUs, model, Linux release".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} CPUs, {}, Linux {}",
            self.cpus, self.cpu_model, self.kernel
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_threads_pss_and_state_are_read() {
        let pid = std::process::id();
        assert!(pss_kib(pid).unwrap() > 0);
        // SAFETY: gettid(2) has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        assert_eq!(thread_state(pid, tid), Some('R'));
        // Reading /proc/PID/task can miss an entry while other threads (the
        // other tests') come and go: one of a few reads sees this one.
        assert!((0..20).any(|_| thread_cpu_ticks(pid).iter().any(|(t, _)| *t == tid)));
        assert_eq!(thread_state(pid, u32::MAX), None);
    }

    #[test]
    fn status_fields_are_read() {
        let text = "Name:\tx\nVmHWM:\t   12345 kB\nVmRSS:\t    2048 kB\nThreads:\t3\n";
        assert_eq!(parse_status_kib(text, "VmRSS"), Some(2048));
        assert_eq!(parse_status_kib(text, "VmHWM"), Some(12345));
        assert_eq!(parse_status_kib(text, "VmSwap"), None);
        let me = Rss::of(std::process::id()).unwrap();
        assert!(me.rss_kib > 0 && me.hwm_kib >= me.rss_kib);
    }

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name() {
        let line = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 1 0 5 0 0\n";
        assert_eq!(parse_stat_cpu_ticks(line), Some(281));
        assert_eq!(parse_stat_cpu_ticks("42 (x) S 1"), None);
    }
}
