//! Cgroups for the VMs' resource limits: one cgroup per VM below a parent
//! cgroup the daemon owns, on cgroup v2 (one unified hierarchy) or v1 (one
//! hierarchy per controller), whichever the host mounts.
//!
//! The layout is read from `/proc/self/mountinfo` and `/proc/self/cgroup`,
//! never assumed: v2 is used when a `cgroup2` mount offers the `cpu`,
//! `memory` and `pids` controllers, v1 otherwise (its `cpu`, `memory` and
//! `pids` hierarchies, plus `cpuacct` and `blkio` when mounted). A relative
//! parent is placed below the daemon's own cgroup, an absolute one below the
//! hierarchy's root.
//!
//! A VMM joins its cgroup itself, in the forked child before it executes
//! ([`CgroupJoin`]): every thread and every page it ever has is accounted.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentenv_api::VmLimitsInfo;
use agentenv_core::host::HostError;
use agentenv_core::limits::{CgroupPlacement, HostCgroups, VmLimits};
use agentenv_proto::unescape_mount_field as unescape;

/// Controllers every VM cgroup needs.
const REQUIRED: [&str; 3] = ["cpu", "memory", "pids"];

/// How long a removal waits for the kernel to release a cgroup.
const REMOVE_WAIT: Duration = Duration::from_secs(3);

/// Why the cgroups cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A controller the limits need is not mounted (or not offered).
    #[error("cgroup controller `{controller}` is not available: {why}")]
    MissingController {
        /// The controller.
        controller: String,
        /// What was found instead.
        why: String,
    },
    /// A cgroup file or directory could not be read or written.
    #[error("cgroup {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Controllers cannot be enabled for the parent's children.
    #[error("cgroup v2: cannot enable {controllers} in {path}: {source}{hint}")]
    Subtree {
        /// The `cgroup.subtree_control` file.
        path: PathBuf,
        /// What was written.
        controllers: String,
        /// The OS error.
        source: std::io::Error,
        /// Why, when it is the no-internal-processes rule.
        hint: &'static str,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Its controllers (v1; empty for v2).
    pub controllers: Vec<String>,
    /// Where it is mounted.
    pub mount: PathBuf,
    /// The cgroup path the mount shows as its root (mountinfo's 4th field).
    pub mount_root: String,
}

/// The cgroup hierarchies of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// 1 or 2.
    pub version: u8,
    /// The unified hierarchy (v2), or those of the controllers used (v1).
    pub hierarchies: Vec<Hierarchy>,
}

/// The cgroup mounts in a mountinfo text: (fstype, mount root, mount point, super options).
fn cgroup_mounts(mountinfo: &str) -> Vec<(String, String, PathBuf, String)> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        if r[0] == "cgroup" || r[0] == "cgroup2" {
            out.push((
                r[0].to_string(),
                unescape(l[3]),
                PathBuf::from(unescape(l[4])),
                r[2].to_string(),
            ));
        }
    }
    out
}

impl Layout {
    /// Finds the hierarchies to use in a mountinfo text. `v2_controllers`
    /// reads a unified mount's `cgroup.controllers` (so a hybrid host whose
    /// `cgroup2` mount holds no controllers uses v1).
    pub fn detect(
        mountinfo: &str,
        v2_controllers: impl Fn(&Path) -> Option<String>,
    ) -> Result<Layout, CgroupError> {
        let mounts = cgroup_mounts(mountinfo);
        let mut v2_why = String::from("no cgroup2 mount");
        for (fstype, root, mount, _) in &mounts {
            if fstype != "cgroup2" {
                continue;
            }
            let offered = v2_controllers(mount).unwrap_or_default();
            let offered: Vec<&str> = offered.split_whitespace().collect();
            if REQUIRED.iter().all(|c| offered.contains(c)) {
                return Ok(Layout {
                    version: 2,
                    hierarchies: vec![Hierarchy {
                        controllers: offered.iter().map(|s| s.to_string()).collect(),
                        mount: mount.clone(),
                        mount_root: root.clone(),
                    }],
                });
            }
            v2_why = format!(
                "the cgroup2 mount {} offers [{}]",
                mount.display(),
                offered.join(" ")
            );
        }
        let mut hierarchies: Vec<Hierarchy> = Vec::new();
        for (fstype, root, mount, opts) in &mounts {
            if fstype != "cgroup" {
                continue;
            }
            let controllers: Vec<String> = opts
                .split(',')
                .filter(|o| ["cpu", "cpuacct", "memory", "pids", "blkio"].contains(o))
                .map(str::to_string)
                .collect();
            if controllers.is_empty() || hierarchies.iter().any(|h| h.mount == *mount) {
                continue;
            }
            // The same hierarchy mounted twice: the first mount serves.
            if hierarchies
                .iter()
                .any(|h| h.controllers.iter().any(|c| controllers.contains(c)))
            {
                continue;
            }
            hierarchies.push(Hierarchy {
                controllers,
                mount: mount.clone(),
                mount_root: root.clone(),
            });
        }
        for c in REQUIRED {
            if !hierarchies
                .iter()
                .any(|h| h.controllers.iter().any(|x| x == c))
            {
                return Err(CgroupError::MissingController {
                    controller: c.to_string(),
                    why: format!("{v2_why}, and no cgroup v1 hierarchy has it"),
                });
            }
        }
        Ok(Layout {
            version: 1,
            hierarchies,
        })
    }

    /// The directory of cgroup `path` (absolute within the hierarchy) in `h`.
    fn dir_of(h: &Hierarchy, path: &str) -> PathBuf {
        let root = h.mount_root.trim_end_matches('/');
        let rel = path.strip_prefix(root).unwrap_or(path);
        let mut dir = h.mount.clone();
        for c in rel.split('/').filter(|c| !c.is_empty()) {
            dir.push(c);
        }
        dir
    }
}

/// The daemon's own cgroup in hierarchy `h`, from a `/proc/self/cgroup` text.
fn own_path(h: &Hierarchy, version: u8, proc_cgroup: &str) -> String {
    for line in proc_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let matches = if version == 2 {
            ctrls.is_empty()
        } else {
            ctrls
                .split(',')
                .any(|c| h.controllers.iter().any(|x| x == c))
        };
        if matches {
            return path.to_string();
        }
    }
    "/".into()
}

/// The directories from where `parent` starts (the daemon's own cgroup, or
/// the root for an absolute one) down to `parent` itself, in hierarchy `h`.
fn parent_chain(layout: &Layout, h: &Hierarchy, proc_cgroup: &str, parent: &str) -> Vec<PathBuf> {
    let start = if parent.starts_with('/') {
        "/".to_string()
    } else {
        own_path(h, layout.version, proc_cgroup)
    };
    let mut dir = Layout::dir_of(h, &start);
    let mut chain = vec![dir.clone()];
    for c in parent.split('/').filter(|c| !c.is_empty()) {
        dir.push(c);
        chain.push(dir.clone());
    }
    chain
}

/// One hierarchy's parent cgroup directory.
#[derive(Debug, Clone)]
struct ParentDir {
    controllers: Vec<String>,
    dir: PathBuf,
}

/// The VMs' cgroups: the real [`HostCgroups`].
#[derive(Debug)]
pub struct Cgroups {
    version: u8,
    parents: Vec<ParentDir>,
}

impl Cgroups {
    /// Whether `[cgroup] enable` is on when the config does not say: when the
    /// daemon runs as root (only root may make cgroups and move VMMs there).
    pub fn on_by_default() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// Uses this host's cgroups (`/proc/self/mountinfo`, `/proc/self/cgroup`)
    /// with the parent cgroup `parent`, made if missing.
    pub fn open_host(parent: &str) -> Result<Cgroups, CgroupError> {
        let read = |p: &str| std::fs::read_to_string(p).map_err(io_err(Path::new(p)));
        let mountinfo = read("/proc/self/mountinfo")?;
        let own = read("/proc/self/cgroup")?;
        let layout = Layout::detect(&mountinfo, |m| {
            std::fs::read_to_string(m.join("cgroup.controllers")).ok()
        })?;
        Cgroups::open(&layout, &own, parent)
    }

    /// Where the parent cgroup `parent` is on this host (one directory per
    /// hierarchy), without making anything.
    pub fn locate_host(parent: &str) -> Result<Vec<PathBuf>, CgroupError> {
        let read = |p: &str| std::fs::read_to_string(p).map_err(io_err(Path::new(p)));
        let layout = Layout::detect(&read("/proc/self/mountinfo")?, |m| {
            std::fs::read_to_string(m.join("cgroup.controllers")).ok()
        })?;
        let own = read("/proc/self/cgroup")?;
        Ok(layout
            .hierarchies
            .iter()
            .map(|h| {
                parent_chain(&layout, h, &own, parent)
                    .pop()
                    .unwrap_or_default()
            })
            .collect())
    }

    /// Sets up the parent cgroup `parent` in `layout` (relative: below the
    /// cgroup `proc_cgroup` names, absolute: below the root), enables the
    /// controllers its children need (v2), and checks it can make a child.
    pub fn open(layout: &Layout, proc_cgroup: &str, parent: &str) -> Result<Cgroups, CgroupError> {
        let mut parents = Vec::new();
        for h in &layout.hierarchies {
            let chain = parent_chain(layout, h, proc_cgroup, parent);
            let start_dir = chain[0].clone();
            let dir = chain[chain.len() - 1].clone();
            if !start_dir.is_dir() {
                return Err(CgroupError::Io {
                    path: start_dir,
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            }
            for d in &chain[1..] {
                match std::fs::create_dir(d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_err(d)(e)),
                }
            }
            if layout.version == 2 {
                let wanted: Vec<&str> = ["cpu", "memory", "pids", "io"]
                    .into_iter()
                    .filter(|c| h.controllers.iter().any(|x| x == c))
                    .collect();
                let line = wanted
                    .iter()
                    .map(|c| format!("+{c}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                for d in &chain {
                    let file = d.join("cgroup.subtree_control");
                    let have = std::fs::read_to_string(&file).unwrap_or_default();
                    if wanted
                        .iter()
                        .all(|c| have.split_whitespace().any(|x| x == *c))
                    {
                        continue;
                    }
                    write_file(&file, &line).map_err(|source| CgroupError::Subtree {
                        hint: if source.raw_os_error() == Some(libc::EBUSY) {
                            " (it holds processes, and cgroup v2 lets only a cgroup without \
                             processes give controllers to its children: give cgroup.parent \
                             as an absolute path such as \"/agentenv\", or run the daemon in a \
                             delegated cgroup of its own)"
                        } else {
                            ""
                        },
                        path: file,
                        controllers: line.clone(),
                        source,
                    })?;
                }
            }
            parents.push(ParentDir {
                controllers: h.controllers.clone(),
                dir,
            });
        }
        let cg = Cgroups {
            version: layout.version,
            parents,
        };
        // Writable? Make and remove a child of the parent.
        let probe = format!(".probe-{}", std::process::id());
        for p in &cg.parents {
            let d = p.dir.join(&probe);
            std::fs::create_dir(&d).map_err(io_err(&d))?;
            let _ = std::fs::remove_dir(&d);
        }
        Ok(cg)
    }

    /// The cgroup version in use.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// The parent cgroup directories (one per hierarchy on v1).
    pub fn parent_dirs(&self) -> Vec<PathBuf> {
        self.parents.iter().map(|p| p.dir.clone()).collect()
    }

    /// VM `vm_id`'s cgroup directories.
    pub fn vm_dirs(&self, vm_id: &str) -> Result<Vec<PathBuf>, HostError> {
        if vm_id.is_empty() || vm_id.starts_with('.') || vm_id.contains('/') {
            return Err(HostError {
                context: format!("cgroup of vm {vm_id:?}"),
                message: "not a vm id".into(),
                no_space: false,
            });
        }
        Ok(self.parents.iter().map(|p| p.dir.join(vm_id)).collect())
    }

    fn has(p: &ParentDir, c: &str) -> bool {
        p.controllers.iter().any(|x| x == c)
    }

    /// Writes `limits` into VM cgroup `dir` of hierarchy `p`; notes what
    /// the host cannot limit in `unsupported`. Returns the I/O weight set.
    fn write_limits(
        &self,
        p: &ParentDir,
        dir: &Path,
        l: &VmLimits,
        unsupported: &mut Vec<String>,
    ) -> std::io::Result<Option<u32>> {
        let w = |name: &str, value: &str| {
            write_file(&dir.join(name), value).map_err(|e| {
                std::io::Error::new(e.kind(), format!("{}: {e}", dir.join(name).display()))
            })
        };
        let mut io_weight = None;
        if self.version == 2 {
            w(
                "cpu.max",
                &format!("{} {}", l.cpu_quota_us, l.cpu_period_us),
            )?;
            w("memory.max", &l.memory_bytes.to_string())?;
            if dir.join("memory.swap.max").exists() {
                w("memory.swap.max", "0")?;
            }
            w("pids.max", &l.pids_max.to_string())?;
            if dir.join("io.weight").exists() {
                w("io.weight", &format!("default {}", l.io_weight))?;
                io_weight = Some(l.io_weight);
            } else {
                unsupported.push("io_weight: io.weight does not exist (no io controller)".into());
            }
            return Ok(io_weight);
        }
        if Self::has(p, "cpu") {
            w("cpu.cfs_period_us", &l.cpu_period_us.to_string())?;
            w("cpu.cfs_quota_us", &l.cpu_quota_us.to_string())?;
        }
        if Self::has(p, "memory") {
            let mem = l.memory_bytes.to_string();
            let memsw = dir.join("memory.memsw.limit_in_bytes").exists();
            // memsw may never be below the memory limit: lower the memory
            // limit first, raise memsw first.
            if w("memory.limit_in_bytes", &mem).is_err() && memsw {
                w("memory.memsw.limit_in_bytes", &mem)?;
                w("memory.limit_in_bytes", &mem)?;
            } else if memsw {
                w("memory.limit_in_bytes", &mem)?;
                w("memory.memsw.limit_in_bytes", &mem)?;
            } else {
                w("memory.limit_in_bytes", &mem)?;
            }
        }
        if Self::has(p, "pids") {
            w("pids.max", &l.pids_max.to_string())?;
        }
        if Self::has(p, "blkio") {
            if dir.join("blkio.weight").exists() {
                let v = l.io_weight.clamp(10, 1000);
                w("blkio.weight", &v.to_string())?;
                io_weight = Some(v);
            } else {
                unsupported.push(
                    "io_weight: blkio.weight does not exist (the block I/O scheduler has no weights)"
                        .into(),
                );
            }
        }
        Ok(io_weight)
    }

    fn prepare_dirs(
        &self,
        dirs: &[PathBuf],
        limits: &VmLimits,
    ) -> std::io::Result<(Option<u32>, Vec<String>)> {
        let mut unsupported = Vec::new();
        let mut io_weight = None;
        for (p, d) in self.parents.iter().zip(dirs) {
            if let Some(v) = self.write_limits(p, d, limits, &mut unsupported)? {
                io_weight = Some(v);
            }
        }
        if self.version == 1 && !self.parents.iter().any(|p| Self::has(p, "blkio")) {
            unsupported.push("io_weight: no blkio hierarchy is mounted".into());
        }
        Ok((io_weight, unsupported))
    }
}

/// Writes `value` to an existing cgroup file (or, in a test's fake tree, a
/// new plain file).
fn write_file(path: &Path, value: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    f.write_all(value.as_bytes())
}

fn cg_err(context: String, e: impl std::fmt::Display) -> HostError {
    HostError {
        context,
        message: e.to_string(),
        no_space: false,
    }
}

/// The `key value` line `key` of a flat-keyed cgroup file.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

impl HostCgroups for Cgroups {
    fn prepare(
        &self,
        vm_id: &str,
        limits: &VmLimits,
        running: Option<u32>,
    ) -> Result<CgroupPlacement, HostError> {
        let dirs = self.vm_dirs(vm_id)?;
        let mut made = Vec::new();
        let fail = |e: std::io::Error, made: &[PathBuf], what: &Path| {
            for d in made.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
            cg_err(format!("cgroup of vm {vm_id} ({})", what.display()), e)
        };
        for d in &dirs {
            match std::fs::create_dir(d) {
                Ok(()) => made.push(d.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(fail(e, &made, d)),
            }
        }
        let (io_weight, unsupported) = match self.prepare_dirs(&dirs, limits) {
            Ok(r) => r,
            Err(e) => return Err(fail(e, &made, &self.parents[0].dir)),
        };
        if let Some(pid) = running {
            for d in &dirs {
                let procs = d.join("cgroup.procs");
                let inside = std::fs::read_to_string(&procs)
                    .is_ok_and(|t| t.lines().any(|l| l.trim() == pid.to_string()));
                if !inside {
                    // The whole process, every thread, moves (what it
                    // allocated before stays charged where it was).
                    write_file(&procs, &pid.to_string()).map_err(|e| {
                        cg_err(format!("cannot move vmm {pid} into {}", procs.display()), e)
                    })?;
                }
            }
        }
        Ok(CgroupPlacement {
            procs: dirs.iter().map(|d| d.join("cgroup.procs")).collect(),
            info: VmLimitsInfo {
                cgroup_version: self.version,
                cgroup_paths: dirs.iter().map(|d| d.display().to_string()).collect(),
                cpu_quota_us: limits.cpu_quota_us,
                cpu_period_us: limits.cpu_period_us,
                memory_bytes: limits.memory_bytes,
                pids_max: limits.pids_max,
                io_weight,
                unsupported,
            },
        })
    }

    fn remove(&self, vm_id: &str) -> Result<(), HostError> {
        let deadline = Instant::now() + REMOVE_WAIT;
        for d in self.vm_dirs(vm_id)? {
            loop {
                match std::fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        // A VMM just killed may not be released by the kernel yet.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        return Err(cg_err(format!("cannot remove cgroup {}", d.display()), e))
                    }
                }
            }
        }
        Ok(())
    }

    fn oom_killed(&self, vm_id: &str) -> bool {
        let Ok(dirs) = self.vm_dirs(vm_id) else {
            return false;
        };
        self.parents.iter().zip(dirs).any(|(p, d)| {
            if self.version == 2 {
                let ev = std::fs::read_to_string(d.join("memory.events")).unwrap_or_default();
                keyed(&ev, "oom_kill").unwrap_or(0) > 0
            } else if Self::has(p, "memory") {
                let oc = std::fs::read_to_string(d.join("memory.oom_control")).unwrap_or_default();
                keyed(&oc, "oom_kill").unwrap_or(0) > 0 || keyed(&oc, "under_oom") == Some(1)
            } else {
                false
            }
        })
    }

    fn remove_parent(&self) {
        for p in &self.parents {
            // Fails (and is left) while a VM cgroup is below it.
            let _ = std::fs::remove_dir(&p.dir);
        }
    }

    fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for p in &self.parents {
            for e in std::fs::read_dir(&p.dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.file_type().is_ok_and(|t| t.is_dir())
                    && !name.starts_with('.')
                    && !names.contains(&name)
                {
                    names.push(name);
                }
            }
        }
        names
    }
}

/// A VMM's way into its cgroup: the `cgroup.procs` files, opened before the
/// fork (close-on-exec), so the child only writes to descriptors it has.
#[derive(Debug, Default)]
pub struct CgroupJoin {
    files: Vec<OwnedFd>,
}

impl CgroupJoin {
    /// Opens `procs` (the `cgroup.procs` files of one VM) for writing.
    pub fn open(procs: &[PathBuf]) -> std::io::Result<CgroupJoin> {
        let mut files = Vec::new();
        for p in procs {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
            files.push(OwnedFd::from(f));
        }
        Ok(CgroupJoin { files })
    }

    /// No cgroup to join.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The descriptors to hand to [`join_in_child`] (valid while `self` lives).
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.files.iter().map(|f| f.as_raw_fd()).collect()
    }
}

/// Moves the calling process into the cgroups behind `fds` (from
/// [`CgroupJoin::raw_fds`]) by writing `0` (itself) to each `cgroup.procs`.
/// Async-signal-safe (only `write(2)`), so a forked child may call it
/// before it executes.
pub fn join_in_child(fds: &[RawFd]) -> std::io::Result<()> {
    for &fd in fds {
        // SAFETY: `fd` is an open descriptor the parent opened (it outlives
        // the fork), and the buffer is a static one-byte string.
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn a_hybrid_host_without_v2_controllers_uses_v1() {
        let l = Layout::detect(V1, |_| Some(String::new())).unwrap();
        assert_eq!(l.version, 1);
        let names: Vec<String> = l
            .hierarchies
            .iter()
            .map(|h| h.controllers.join(","))
            .collect();
        assert_eq!(names, ["cpu", "cpuacct", "memory", "blkio", "pids"]);
        assert_eq!(l.hierarchies[2].mount, Path::new("/sys/fs/cgroup/memory"));
    }

    #[test]
    fn a_unified_mount_with_the_controllers_is_v2() {
        let mi = "30 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let l = Layout::detect(mi, |m| {
            assert_eq!(m, Path::new("/sys/fs/cgroup"));
            Some("cpuset cpu io memory pids\n".into())
        })
        .unwrap();
        assert_eq!(l.version, 2);
        assert_eq!(l.hierarchies.len(), 1);
        assert!(l.hierarchies[0].controllers.contains(&"io".to_string()));
    }

    #[test]
    fn a_missing_controller_is_named() {
        let mi = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu,cpuacct\n\
                  39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n";
        let e = Layout::detect(mi, |_| None).unwrap_err().to_string();
        assert!(e.contains("`memory`"), "{e}");
        let e = Layout::detect("", |_| None).unwrap_err().to_string();
        assert!(e.contains("`cpu`") && e.contains("no cgroup2 mount"), "{e}");
    }

    #[test]
    fn co_mounted_controllers_and_escaped_paths() {
        let mi = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                  35 31 0:32 /inner /x\\040y/memory rw - cgroup cgroup rw,memory\n\
                  39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n";
        let l = Layout::detect(mi, |_| None).unwrap();
        assert_eq!(l.hierarchies[0].controllers, ["cpu", "cpuacct"]);
        assert_eq!(l.hierarchies[1].mount, Path::new("/x y/memory"));
        // A mount whose root is a cgroup (a cgroup namespace) shows its paths below it.
        assert_eq!(
            Layout::dir_of(&l.hierarchies[1], "/inner/a/b"),
            Path::new("/x y/memory/a/b")
        );
    }

    /// A v1 tree in a tempdir: each hierarchy a directory with the files
    /// the kernel would show (`blkio.weight` missing, as on this host).
    fn fake_v1(root: &Path) -> Layout {
        let mut mi = String::new();
        for (i, c) in ["cpu", "memory", "pids", "blkio"].iter().enumerate() {
            let m = root.join(c);
            std::fs::create_dir_all(m.join("own/slice")).unwrap();
            mi.push_str(&format!(
                "{} 1 0:{i} / {} rw - cgroup cgroup rw,{c}\n",
                30 + i,
                m.display()
            ));
        }
        Layout::detect(&mi, |_| None).unwrap()
    }

    fn limits() -> VmLimits {
        VmLimits {
            cpu_quota_us: 125_000,
            cpu_period_us: 100_000,
            memory_bytes: 300 << 20,
            pids_max: 512,
            io_weight: 5000,
        }
    }

    #[test]
    fn v1_files_hold_the_limits_in_a_parent_below_the_daemons_cgroup() {
        let t = tempfile::tempdir().unwrap();
        let layout = fake_v1(t.path());
        let own = "4:memory:/own/slice\n1:cpu:/\n8:pids:/\n7:blkio:/\n0::/\n";
        let cg = Cgroups::open(&layout, own, "agentenv").unwrap();
        assert_eq!(cg.version(), 1);
        let mem_parent = t.path().join("memory/own/slice/agentenv");
        assert!(cg.parent_dirs().contains(&mem_parent));
        assert!(cg.parent_dirs().contains(&t.path().join("cpu/agentenv")));
        // Existing memsw file (the kernel made it at mkdir): the swap limit too.
        let vm_mem = mem_parent.join("vm1");
        std::fs::create_dir(&vm_mem).unwrap();
        std::fs::write(vm_mem.join("memory.memsw.limit_in_bytes"), "").unwrap();
        let placed = cg.prepare("vm1", &limits(), None).unwrap();
        let f = |d: &Path, n: &str| std::fs::read_to_string(d.join(n)).unwrap();
        let cpu = t.path().join("cpu/agentenv/vm1");
        assert_eq!(f(&cpu, "cpu.cfs_quota_us"), "125000");
        assert_eq!(f(&cpu, "cpu.cfs_period_us"), "100000");
        assert_eq!(
            f(&vm_mem, "memory.limit_in_bytes"),
            (300u64 << 20).to_string()
        );
        assert_eq!(
            f(&vm_mem, "memory.memsw.limit_in_bytes"),
            (300u64 << 20).to_string()
        );
        assert_eq!(f(&t.path().join("pids/agentenv/vm1"), "pids.max"), "512");
        assert_eq!(placed.info.cgroup_version, 1);
        assert_eq!(placed.info.io_weight, None);
        assert!(
            placed.info.unsupported[0].contains("blkio.weight"),
            "{:?}",
            placed.info
        );
        assert_eq!(placed.procs.len(), 4);
        assert!(placed.procs.contains(&vm_mem.join("cgroup.procs")));
        assert_eq!(cg.list(), ["vm1"]);

        // blkio.weight present: clamped into v1's range.
        let blk = t.path().join("blkio/agentenv/vm1");
        std::fs::write(blk.join("blkio.weight"), "").unwrap();
        let placed = cg.prepare("vm1", &limits(), None).unwrap();
        assert_eq!(f(&blk, "blkio.weight"), "1000");
        assert_eq!(placed.info.io_weight, Some(1000));

        // A re-adopted VMM outside its cgroup is moved in, in every hierarchy.
        cg.prepare("vm1", &limits(), Some(4242)).unwrap();
        for p in &placed.procs {
            assert_eq!(f(p.parent().unwrap(), "cgroup.procs"), "4242");
        }

        assert!(!cg.oom_killed("vm1"));
        std::fs::write(
            vm_mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        )
        .unwrap();
        assert!(cg.oom_killed("vm1"));
    }

    #[test]
    fn v2_enables_controllers_down_to_the_parent_and_writes_its_files() {
        let t = tempfile::tempdir().unwrap();
        let m = t.path().join("unified");
        std::fs::create_dir_all(&m).unwrap();
        let mi = format!("30 1 0:27 / {} rw - cgroup2 cgroup2 rw\n", m.display());
        let layout = Layout::detect(&mi, |_| Some("cpu io memory pids".into())).unwrap();
        let cg = Cgroups::open(&layout, "0::/daemon.service\n", "/agentenv/vms").unwrap();
        for d in ["", "agentenv", "agentenv/vms"] {
            assert_eq!(
                std::fs::read_to_string(m.join(d).join("cgroup.subtree_control")).unwrap(),
                "+cpu +memory +pids +io"
            );
        }
        let vm = m.join("agentenv/vms/a");
        std::fs::create_dir(&vm).unwrap();
        std::fs::write(vm.join("memory.swap.max"), "").unwrap();
        std::fs::write(vm.join("io.weight"), "").unwrap();
        let placed = cg.prepare("a", &limits(), None).unwrap();
        let f = |n: &str| std::fs::read_to_string(vm.join(n)).unwrap();
        assert_eq!(f("cpu.max"), "125000 100000");
        assert_eq!(f("memory.max"), (300u64 << 20).to_string());
        assert_eq!(f("memory.swap.max"), "0");
        assert_eq!(f("pids.max"), "512");
        assert_eq!(f("io.weight"), "default 5000");
        assert_eq!(placed.info.io_weight, Some(5000));
        assert!(placed.info.unsupported.is_empty());
        assert_eq!(placed.procs, [vm.join("cgroup.procs")]);
        std::fs::write(
            vm.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert!(cg.oom_killed("a"));
    }

    #[test]
    fn bad_vm_ids_and_unwritable_parents_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let layout = fake_v1(t.path());
        let cg = Cgroups::open(&layout, "", "/agentenv").unwrap();
        assert!(cg.prepare("../x", &limits(), None).is_err());
        assert!(cg.prepare(".probe", &limits(), None).is_err());
        // A parent below a file cannot be made: the error names the path.
        std::fs::write(t.path().join("cpu/file"), "").unwrap();
        let e = Cgroups::open(&layout, "", "/file/agentenv")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cpu/file"), "{e}");
    }

    #[test]
    fn keyed_files_parse() {
        assert_eq!(keyed("oom 2\noom_kill 7\n", "oom_kill"), Some(7));
        assert_eq!(keyed("oom_kill_disable 0\n", "oom_kill"), None);
    }
}
