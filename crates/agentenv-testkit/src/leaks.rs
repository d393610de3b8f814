//! A leak checker: what a test left behind under its own directory.
//!
//! Every integration test owns one temporary directory holding all its roots
//! (sessions, sockets, disks). At the end, the directory's files must be back
//! to the baseline and no process may mention the directory on its command line.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What existed when the baseline was taken.
#[derive(Debug, Clone)]
pub struct Baseline {
    root: PathBuf,
    files: BTreeSet<PathBuf>,
    processes: BTreeSet<u32>,
    /// VM cgroups below the test daemon's parent cgroup.
    cgroups: BTreeSet<PathBuf>,
    mounts: BTreeSet<PathBuf>,
    /// Paths that may appear and stay (caches such as overlay templates).
    allowed: Vec<PathBuf>,
}

/// Processes whose command line mentions `needle`, as `(pid, cmdline)`.
pub fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.as_os_str().as_encoded_bytes();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if is_zombie(pid) {
            continue;
        }
        if cmd.windows(needle.len()).any(|w| w == needle) {
            let text = String::from_utf8_lossy(&cmd).replace('\0', " ");
            out.push((pid, text.trim().to_string()));
        }
    }
    out
}

/// Live processes whose working directory is `dir` (a VMM started there).
pub fn processes_in(dir: &Path) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !is_zombie(*pid))
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd"))
                .ok()
                .as_deref()
                == Some(dir)
        })
        .collect()
}

/// The files process `pid` holds open (empty when it is gone).
pub fn open_files(pid: u32) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect()
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s[s.rfind(')')? + 2..].to_string();
            rest.split_whitespace().next().map(|st| st == "Z")
        })
        .unwrap_or(false)
}

/// Mount points at or below `root` in this process's mount namespace
/// (`/proc/self/mountinfo`; a jailed VMM's own mounts live in its namespace
/// and go with it, so one seen here is a leak on the host).
pub fn mounts_below(root: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        // Spaces and the like are octal escapes (`\040`).
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect()
}

/// Every file and directory below `root` (not following symlinks).
pub fn files_below(root: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p.clone());
            }
            out.insert(p);
        }
    }
    out
}

/// VM cgroups below the parent cgroup of the test daemon rooted at `root`
/// ([`Baseline::cgroup_parent`]), in every hierarchy.
pub fn cgroups_left(root: &Path) -> Vec<PathBuf> {
    let parent = Baseline::cgroup_parent(root);
    let dirs = agentenv_host::cgroup::Cgroups::locate_host(&parent).unwrap_or_default();
    dirs.iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// Removes `agentenv-test`, the cgroup holding the test daemons' parents,
/// once no test uses it (a daemon's clean stop removes its own parent).
pub fn remove_test_cgroups() {
    for d in agentenv_host::cgroup::Cgroups::locate_host("agentenv-test").unwrap_or_default() {
        let _ = std::fs::remove_dir(&d);
    }
}

impl Baseline {
    /// Records the files below `root` and the processes mentioning it.
    pub fn capture(root: &Path) -> Baseline {
        Baseline {
            root: root.to_path_buf(),
            files: files_below(root),
            processes: processes_mentioning(root)
                .into_iter()
                .map(|p| p.0)
                .collect(),
            cgroups: cgroups_left(root).into_iter().collect(),
            mounts: mounts_below(root).into_iter().collect(),
            allowed: Vec::new(),
        }
    }

    /// Lets files at or below `path` appear without counting as leaks.
    pub fn allow(mut self, path: &Path) -> Baseline {
        self.allowed.push(path.to_path_buf());
        self
    }

    /// The parent cgroup of the VMs of a test daemon whose roots are in
    /// `root` (`[cgroup] parent`): its own, so tests in parallel never see
    /// each other's VM cgroups.
    pub fn cgroup_parent(root: &Path) -> String {
        format!(
            "agentenv-test/{}",
            root.file_name().unwrap_or_default().to_string_lossy()
        )
    }

    /// What is there now and was not at the baseline (waiting up to `grace` for
    /// exiting processes to go). Empty means no leak.
    pub fn leaks(&self, grace: Duration) -> Vec<String> {
        let start = Instant::now();
        loop {
            let mut leaks = Vec::new();
            for (pid, cmd) in processes_mentioning(&self.root) {
                if !self.processes.contains(&pid) {
                    leaks.push(format!("process {pid}: {cmd}"));
                }
            }
            for m in mounts_below(&self.root) {
                if !self.mounts.contains(&m) {
                    leaks.push(format!("mount {}", m.display()));
                }
            }
            for f in files_below(&self.root).difference(&self.files) {
                if !self.allowed.iter().any(|a| f.starts_with(a)) {
                    leaks.push(format!("file {}", f.display()));
                }
            }
            for c in cgroups_left(&self.root) {
                if !self.cgroups.contains(&c) {
                    leaks.push(format!("cgroup {}", c.display()));
                }
            }
            if leaks.is_empty() || start.elapsed() >= grace {
                return leaks;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics listing every leak.
    pub fn assert_clean(&self) {
        let leaks = self.leaks(Duration::from_secs(2));
        assert!(leaks.is_empty(), "leaked:\n  {}", leaks.join("\n  "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_new_files_and_processes() {
        let dir = std::env::temp_dir().join(format!("leaks-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = Baseline::capture(&dir);
        assert!(base.leaks(Duration::ZERO).is_empty());
        std::fs::write(dir.join("left"), b"x").unwrap();
        // `cat -` blocks on its (piped) stdin; its command line names the marker.
        let mut child = std::process::Command::new("cat")
            .arg("-")
            .arg(dir.join("marker"))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The child's command line is visible once it has exec'd.
        let start = Instant::now();
        while processes_mentioning(&dir).is_empty() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let leaks = base.leaks(Duration::ZERO);
        assert!(
            leaks
                .iter()
                .any(|l| l.starts_with("file ") && l.ends_with("/left")),
            "{leaks:?}"
        );
        assert!(
            leaks
                .iter()
                .any(|l| l.starts_with("process ") && l.contains("cat -")),
            "{leaks:?}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_file(dir.join("left")).unwrap();
        assert!(base.leaks(Duration::ZERO).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finds_a_mount_left_below_the_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPING: mounting a tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("mnt");
        std::fs::create_dir(&m).unwrap();
        let base = Baseline::capture(dir.path());
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "none"])
            .arg(&m)
            .status()
            .unwrap();
        assert!(status.success());
        let leaks = base.leaks(Duration::ZERO);
        let umount = std::process::Command::new("umount")
            .arg(&m)
            .status()
            .unwrap();
        assert!(umount.success());
        assert_eq!(leaks, vec![format!("mount {}", m.display())]);
        assert!(base.leaks(Duration::ZERO).is_empty());
    }
}
