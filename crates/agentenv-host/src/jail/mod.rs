//! The VMM jail: every VMM starts in new mount, PID, IPC and UTS namespaces,
//! under a per-VM root holding only what it needs, as an unprivileged uid with
//! `no_new_privs` and rlimits.
//!
//! The per-VM root is `chroot_base/<vm_id>`: an empty host directory on which
//! the VMM's own (private) mount namespace mounts a small tmpfs. Inside it,
//! every path the VMM is given appears at the *same* path as on the host (a
//! bind mount of just that file or directory), so command lines and API
//! bodies need no rewriting; nothing else of the host is there. The tree
//! lives only in the VMM's mount namespace: it disappears with the process,
//! and the host directory is removed once the process is gone.
//!
//! All of the tree is described before the process is cloned ([`PreparedJail`]
//! holds every C string); the child only makes system calls (it is a copy of
//! a multi-threaded process, so it must not allocate or lock).
//!
//! A control socket cannot be bound at its host path from inside the jail
//! (its directory is shared by all VMs): the VMM binds it in a per-VM staging
//! directory (`.jail-<vm_id>` beside it, mounted at the socket's directory in
//! the jail) and the daemon renames it to its host path once it exists.

use std::collections::BTreeSet;
use std::ffi::{CString, OsStr};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use agentenv_core::backend::LaunchSpec;
use agentenv_core::config::JailConfig;

pub mod spawn;

/// Host directories every dynamically linked VMM needs, read-only: the
/// binaries' libraries and QEMU's firmware (`/usr/share/qemu`). A symlink
/// among them (merged-`/usr` systems) is recreated as the same symlink.
const SYSTEM_PATHS: &[&str] = &[
    "/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin",
];

/// Single host files the dynamic loader reads when present.
const SYSTEM_FILES: &[&str] = &["/etc/ld.so.cache"];

/// Device nodes of the jail's minimal `/dev` (only those that exist).
const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/kvm",
    "/dev/net/tun",
];

/// Paths that name no host file (an inherited descriptor's path): never bound.
const NOT_FILES: &[&str] = &["/proc/", "/dev/fdset/"];

/// Open files a jailed VMM may hold.
pub const RLIMIT_NOFILE: u64 = 4096;
/// Processes (threads) its uid may have.
pub const RLIMIT_NPROC: u64 = 4096;

/// Where a Firecracker started through its jailer finds its session
/// directory (it runs in `/` of its chroot, not in its session directory):
/// the same path in every VM's chroot, so a full snapshot's drive and vsock
/// paths name the restoring VM's own files.
pub const JAILER_SESSION: &str = "/vm";

/// What the jail's child executes.
#[derive(Debug, Clone, Copy)]
enum Launcher<'a> {
    /// The VMM itself, after the child's own `pivot_root` and uid drop.
    Direct {
        binary: &'a Path,
        cwd: Option<&'a Path>,
    },
    /// Firecracker's jailer, which does those itself, then runs Firecracker.
    Jailer {
        jailer: &'a Path,
        firecracker: &'a Path,
        session_dir: &'a Path,
    },
}

/// A VMM started through Firecracker's jailer.
#[derive(Debug)]
pub(crate) struct JailerRun {
    /// The jailer and its arguments up to `--` (Firecracker's follow).
    pub(crate) argv: Vec<CString>,
    session_dir: PathBuf,
    /// Of the tmpfs on the jail directory.
    pub(crate) tmpfs_options: CString,
}

/// A detached mount of the file `path` names (`open_tree` with
/// `OPEN_TREE_CLONE`): for a descriptor's `/proc/self/fd/N`, of the very file
/// it holds. A jail's child (in a new mount namespace) can attach it, which
/// it could not bind from a mount of the daemon's namespace.
fn open_tree(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let p = cpath(path);
    // SAFETY: a NUL-terminated path; open_tree returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            p.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as std::os::fd::RawFd) })
}

/// Checks `[jail] firecracker_jailer`: an absolute path to an executable
/// regular file. Returns its canonical path.
fn check_jailer(path: &Path) -> Result<PathBuf, JailError> {
    let bad = |reason: String| JailError::Jailer {
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_absolute() {
        return Err(bad("must be an absolute path".into()));
    }
    let canonical = std::fs::canonicalize(path).map_err(|e| bad(e.to_string()))?;
    let m = std::fs::metadata(&canonical).map_err(|e| bad(e.to_string()))?;
    if !m.is_file() {
        return Err(bad("is not a regular file".into()));
    }
    if m.mode() & 0o111 == 0 {
        return Err(bad("is not executable".into()));
    }
    Ok(canonical)
}

/// A jail that cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// `chroot_base` cannot be used.
    #[error("config key `jail.chroot_base`: {path}: {reason}")]
    Base {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `firecracker_jailer` cannot be used.
    #[error("config key `jail.firecracker_jailer`: {path}: {reason}")]
    Jailer {
        /// The configured path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Every uid of `uid_range` is in use.
    #[error("config key `jail.uid_range`: all {count} uids from {start} are in use")]
    RangeFull {
        /// The first uid.
        start: u32,
        /// How many.
        count: u32,
    },
    /// A host file operation failed.
    #[error("jail for vm {vm_id}: {context}: {source}")]
    Io {
        /// The VM.
        vm_id: String,
        /// What was being done, with the path.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// How the VMM may use a host path given to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only; the file may be shared with other VMs (a kernel, a base
    /// image). It is made readable to the jail group when it is not.
    ReadOnly,
    /// Read and write, shared with other VMs: opened read-write though never
    /// written through (a snapshot memory file QEMU maps privately). It is
    /// made read-write to the jail group.
    SharedWritable,
    /// Read and write, this VM's own (session directory, overlay, memory
    /// file): owned by the VM's uid.
    Owned,
}

/// The jail settings of a daemon.
#[derive(Debug)]
pub struct Jail {
    base: PathBuf,
    ids: Ids,
    gid: u32,
    read_only_paths: Vec<PathBuf>,
    /// The network namespace VMMs join (where their TAPs are), when not the
    /// daemon's.
    netns: Option<PathBuf>,
    /// Firecracker's own `jailer` (`[jail] firecracker_jailer`): Firecracker
    /// VMMs start through it (see [`Jail::prepare_jailer`]).
    firecracker_jailer: Option<PathBuf>,
    /// Serializes uid allocation.
    alloc: Mutex<()>,
}

#[derive(Debug, Clone, Copy)]
enum Ids {
    Fixed(u32),
    Range { start: u32, count: u32 },
}

impl Jail {
    /// The jail for `cfg`, with its roots under `base` (created 0700 when
    /// missing; it must be a real directory on a file system that can hold a
    /// mount point).
    pub fn new(cfg: &JailConfig, base: &Path) -> Result<Jail, JailError> {
        let bad = |reason: String| JailError::Base {
            path: base.to_path_buf(),
            reason,
        };
        if !base.is_absolute() {
            return Err(bad("must be an absolute path".into()));
        }
        match std::fs::symlink_metadata(base) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(bad("is a symlink".into()));
            }
            Ok(m) if !m.is_dir() => return Err(bad("is not a directory".into())),
            Ok(m) if m.uid() != 0 && nix::unistd::geteuid().is_root() => {
                return Err(bad(format!("is owned by uid {}, not root", m.uid())));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(base).map_err(|e| bad(format!("cannot create: {e}")))?;
            }
            Err(e) => return Err(bad(e.to_string())),
        }
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| bad(format!("cannot set mode 0700: {e}")))?;
        let ids = match cfg.uid {
            Some(uid) => Ids::Fixed(uid),
            None => Ids::Range {
                start: cfg.uid_range[0],
                count: cfg.uid_range[1],
            },
        };
        Ok(Jail {
            base: base.to_path_buf(),
            ids,
            gid: cfg.group(),
            read_only_paths: cfg.read_only_paths.clone(),
            netns: None,
            firecracker_jailer: match &cfg.firecracker_jailer {
                Some(p) => Some(check_jailer(p)?),
                None => None,
            },
            alloc: Mutex::new(()),
        })
    }

    /// Firecracker's own jailer, when Firecracker VMMs start through it.
    pub fn firecracker_jailer(&self) -> Option<&Path> {
        self.firecracker_jailer.as_deref()
    }

    /// VMMs join the network namespace at `netns` (a path like
    /// `/run/netns/NAME`, where the daemon makes their TAPs).
    pub fn with_netns(mut self, netns: Option<PathBuf>) -> Jail {
        self.netns = netns;
        self
    }

    /// Where the per-VM roots are.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// The VMMs' group.
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// The root of `vm_id`'s jail on the host.
    pub fn dir(&self, vm_id: &str) -> PathBuf {
        self.base.join(vm_id)
    }

    /// Makes `vm_id`'s jail directory (or takes the one it has) and returns
    /// the uid its VMM runs as: the fixed `uid`, or one of `uid_range` not used
    /// by another jail directory (the directory's owner records it).
    fn claim(&self, vm_id: &str) -> Result<u32, JailError> {
        let dir = self.dir(vm_id);
        let io = |context: String| io_error(vm_id, context);
        let _held = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() && !m.file_type().is_symlink() => {
                if let Some(uid) = self.owner_in_range(m.uid()) {
                    return Ok(uid);
                }
            }
            Ok(_) => {
                return Err(JailError::Io {
                    vm_id: vm_id.into(),
                    context: format!("{} exists and is not a directory", dir.display()),
                    source: std::io::ErrorKind::AlreadyExists.into(),
                })
            }
            Err(_) => {
                std::fs::create_dir(&dir)
                    .map_err(io(format!("cannot create {}", dir.display())))?;
                // Private like every directory the daemon makes (the VMM
                // never uses it: its own tmpfs is mounted over it).
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io(format!("cannot chmod {}", dir.display())))?
            }
        }
        let uid = match self.ids {
            Ids::Fixed(uid) => uid,
            Ids::Range { start, count } => {
                let used: BTreeSet<u32> = std::fs::read_dir(&self.base)
                    .map_err(io(format!("cannot list {}", self.base.display())))?
                    .flatten()
                    .filter(|e| e.file_name() != OsStr::new(vm_id))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.uid())
                    .collect();
                (start..start + count)
                    .find(|u| !used.contains(u))
                    .ok_or(JailError::RangeFull { start, count })?
            }
        };
        std::os::unix::fs::chown(&dir, Some(uid), Some(self.gid))
            .map_err(io(format!("cannot chown {}", dir.display())))?;
        Ok(uid)
    }

    fn owner_in_range(&self, owner: u32) -> Option<u32> {
        match self.ids {
            Ids::Fixed(uid) => Some(uid),
            Ids::Range { start, count } => (start..start + count).contains(&owner).then_some(owner),
        }
    }

    /// The uid `vm_id`'s VMM runs (or ran) as, from its jail directory.
    pub fn uid_of(&self, vm_id: &str) -> Option<u32> {
        let m = std::fs::symlink_metadata(self.dir(vm_id)).ok()?;
        m.is_dir().then(|| self.owner_in_range(m.uid())).flatten()
    }

    /// Describes `vm_id`'s jail: `binary` runs in it with `paths` (at their
    /// host paths), its minimal `/dev` and a `/proc` of its own; `socket` is
    /// the control socket it binds (staged, see the module docs); `cwd` its
    /// working directory. Sets the ownership the VMM needs on `paths`. On
    /// error nothing is left behind.
    pub fn prepare(
        &self,
        vm_id: &str,
        binary: &Path,
        paths: &[(PathBuf, Access)],
        socket: Option<&Path>,
        cwd: Option<&Path>,
    ) -> Result<PreparedJail, JailError> {
        self.prepare_as(vm_id, Launcher::Direct { binary, cwd }, paths, socket)
    }

    /// Describes `vm_id`'s jail for a Firecracker started through
    /// Firecracker's own jailer ([`Jail::firecracker_jailer`], which must be
    /// set): the daemon's child mounts a tmpfs on the VM's jail directory
    /// (in its own mount namespace, as for [`Jail::prepare`]), binds `paths`
    /// at their host paths under the chroot the jailer will use
    /// (`<jail dir>/<firecracker's file name>/<id>/root`), the VM's session
    /// directory also at [`JAILER_SESSION`], and executes the jailer, which
    /// copies `firecracker` in, makes its `/dev` nodes, `pivot_root`s, drops
    /// to the jail uid and gid and executes Firecracker, PID 1 of the new
    /// PID namespace, in `/`. Arguments given to [`crate::process::SpawnSpec`]
    /// are Firecracker's (after the jailer's `--`).
    pub fn prepare_jailer(
        &self,
        vm_id: &str,
        firecracker: &Path,
        session_dir: &Path,
        paths: &[(PathBuf, Access)],
        socket: Option<&Path>,
    ) -> Result<PreparedJail, JailError> {
        let Some(jailer) = self.firecracker_jailer.as_deref() else {
            return Err(io_error(
                vm_id,
                "no firecracker_jailer is configured".into(),
            )(std::io::ErrorKind::NotFound.into()));
        };
        let launcher = Launcher::Jailer {
            jailer,
            firecracker,
            session_dir,
        };
        self.prepare_as(vm_id, launcher, paths, socket)
    }

    fn prepare_as(
        &self,
        vm_id: &str,
        launcher: Launcher<'_>,
        paths: &[(PathBuf, Access)],
        socket: Option<&Path>,
    ) -> Result<PreparedJail, JailError> {
        let uid = self.claim(vm_id).inspect_err(|_| self.remove(vm_id))?;
        let staged = socket.map(|s| staging_dir(s, vm_id));
        match self.prepare_claimed(vm_id, uid, launcher, paths, socket, staged.as_deref()) {
            Ok(p) => Ok(p),
            Err(e) => {
                self.remove(vm_id);
                Err(e)
            }
        }
    }

    fn prepare_claimed(
        &self,
        vm_id: &str,
        uid: u32,
        launcher: Launcher<'_>,
        paths: &[(PathBuf, Access)],
        socket: Option<&Path>,
        staged: Option<&Path>,
    ) -> Result<PreparedJail, JailError> {
        let io = |context: String| io_error(vm_id, context);
        let host_root = self.dir(vm_id);
        let canonical = |p: &Path| {
            std::fs::canonicalize(p).map_err(io(format!("cannot resolve {}", p.display())))
        };
        // Direct: the tree is the root itself; through the jailer: its chroot
        // inside it, made (with its parents) first.
        let (root, exec, jailer, scaffold) = match launcher {
            Launcher::Direct { binary, .. } => {
                (host_root.clone(), canonical(binary)?, None, Vec::new())
            }
            Launcher::Jailer {
                jailer,
                firecracker,
                session_dir,
            } => {
                let firecracker = canonical(firecracker)?;
                let size = std::fs::metadata(&firecracker)
                    .map_err(io(format!("cannot stat {}", firecracker.display())))?
                    .len();
                let name = firecracker.file_name().unwrap_or_default().to_owned();
                let id = crate::firecracker::instance_id(vm_id);
                let chroot = host_root.join(&name).join(&id).join("root");
                let argv = [
                    jailer.as_os_str(),
                    OsStr::new("--id"),
                    OsStr::new(&id),
                    OsStr::new("--exec-file"),
                    firecracker.as_os_str(),
                    OsStr::new("--uid"),
                    OsStr::new(&uid.to_string()),
                    OsStr::new("--gid"),
                    OsStr::new(&self.gid.to_string()),
                    OsStr::new("--chroot-base-dir"),
                    host_root.as_os_str(),
                    OsStr::new("--resource-limit"),
                    OsStr::new(&format!("no-file={RLIMIT_NOFILE}")),
                    OsStr::new("--"),
                ]
                .iter()
                .map(|a| cpath(Path::new(a)))
                .collect();
                let scaffold = vec![
                    host_root.join(&name),
                    host_root.join(&name).join(&id),
                    chroot.clone(),
                ];
                let run = JailerRun {
                    argv,
                    session_dir: session_dir.to_path_buf(),
                    // The jailer copies Firecracker into the tmpfs.
                    tmpfs_options: CString::new(format!(
                        "mode=0755,size={}k,nr_inodes=4096",
                        size / 1024 + 4096
                    ))
                    .expect("no NUL"),
                };
                (chroot, jailer.to_path_buf(), Some(run), scaffold)
            }
        };
        let mut tree = Tree::new(&root);
        tree.ops
            .extend(scaffold.iter().map(|d| Op::Mkdir(cpath(d))));
        for sys in SYSTEM_PATHS {
            let p = Path::new(sys);
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(p).map_err(io(format!("cannot read {sys}")))?;
                    tree.symlink(&target, p);
                }
                Ok(m) if m.is_dir() => tree.bind(p, true, Kind::System, true),
                _ => {}
            }
        }
        // The jailer (run before the chroot) copies Firecracker in itself.
        if jailer.is_none() && !tree.covered(&exec) {
            tree.bind(&exec, false, Kind::System, true);
        }
        for p in &self.read_only_paths {
            if let Ok(m) = std::fs::metadata(p) {
                if !tree.covered(p) {
                    tree.bind(p, m.is_dir(), Kind::System, true);
                }
            }
        }
        for f in SYSTEM_FILES {
            if Path::new(f).is_file() {
                tree.bind(Path::new(f), false, Kind::System, true);
            }
        }
        if jailer.is_none() {
            self.dev_and_proc(&mut tree);
        }
        if let (Some(socket), Some(staged)) = (socket, staged) {
            let _ = std::fs::remove_dir_all(staged);
            std::fs::create_dir(staged)
                .map_err(io(format!("cannot create {}", staged.display())))?;
            std::fs::set_permissions(staged, std::fs::Permissions::from_mode(0o700))
                .map_err(io(format!("cannot chmod {}", staged.display())))?;
            std::os::unix::fs::chown(staged, Some(uid), Some(self.gid))
                .map_err(io(format!("cannot chown {}", staged.display())))?;
            let dir = socket.parent().unwrap_or(Path::new("/"));
            tree.bind_at(staged, dir, true, false);
        }
        // Detached mounts of the files of inherited descriptors (jailer).
        let mut trees = Vec::new();
        for (path, access) in paths {
            let inherited = path.as_os_str().as_bytes().starts_with(b"/proc/self/fd/");
            if !inherited
                && NOT_FILES
                    .iter()
                    .any(|p| path.as_os_str().as_bytes().starts_with(p.as_bytes()))
            {
                continue;
            }
            let meta =
                std::fs::metadata(path).map_err(io(format!("cannot stat {}", path.display())))?;
            match access {
                Access::Owned => std::os::unix::fs::chown(path, Some(uid), Some(self.gid))
                    .map_err(io(format!("cannot chown {}", path.display())))?,
                Access::ReadOnly => self.grant(path, &meta, false).map_err(io(format!(
                    "cannot make {} readable to gid {}",
                    path.display(),
                    self.gid
                )))?,
                Access::SharedWritable => self.grant(path, &meta, true).map_err(io(format!(
                    "cannot make {} writable to gid {}",
                    path.display(),
                    self.gid
                )))?,
            }
            // A descriptor the VMM inherits (a direct disk the daemon opened)
            // names no path to bind: the jail's own /proc reaches it. Its
            // access was granted above through the descriptor (the daemon's
            // own `/proc/self/fd/N`, the same number), never a path a swap
            // could redirect. The jailer closes inherited descriptors and
            // gives no /proc: there the file the descriptor holds (not a
            // path) is bound at that same path instead.
            if inherited && jailer.is_some() {
                let clone = open_tree(path).map_err(io(format!(
                    "cannot clone a mount of the file of {}",
                    path.display()
                )))?;
                tree.attach(path, &clone, *access == Access::ReadOnly);
                trees.push(clone);
            } else if !inherited && !tree.covered(path) {
                tree.bind(path, meta.is_dir(), Kind::Data, *access == Access::ReadOnly);
            }
        }
        if let Some(run) = &jailer {
            tree.bind_at(&run.session_dir, Path::new(JAILER_SESSION), true, false);
        }
        let cstr = |p: &Path| cpath(p);
        let netns = match &self.netns {
            Some(p) => Some(
                std::fs::File::open(p)
                    .map(OwnedFd::from)
                    .map_err(io(format!("cannot open network namespace {}", p.display())))?,
            ),
            None => None,
        };
        let cwd = match launcher {
            Launcher::Direct { cwd, .. } => cwd.map(cstr),
            Launcher::Jailer { .. } => None,
        };
        Ok(PreparedJail {
            netns,
            tap: None,
            vm_id: vm_id.to_string(),
            root: cstr(&host_root),
            host_root,
            ops: tree.ops,
            exec: cstr(&exec),
            cwd,
            jailer,
            trees,
            uid,
            gid: self.gid,
            staged_socket: match (socket, staged) {
                (Some(s), Some(d)) => {
                    Some((d.join(s.file_name().unwrap_or_default()), s.to_path_buf()))
                }
                _ => None,
            },
            staging_dir: staged.map(Path::to_path_buf),
        })
    }

    /// A `/dev` of its own (a tmpfs that allows device nodes: the host's
    /// nodes may be root's only, `/dev/net/tun`, `/dev/kvm` are often 0600,
    /// and the jail uid must open them) and a `/proc` of its own. (The
    /// jailer makes its `/dev` itself, and gives none.)
    fn dev_and_proc(&self, tree: &mut Tree) {
        tree.mkdirs(Path::new("/dev"));
        tree.ops
            .push(Op::DevTmpfs(cpath(&tree.inside(Path::new("/dev")))));
        for d in DEVICES {
            use std::os::unix::fs::FileTypeExt;
            let Ok(m) = std::fs::metadata(d) else {
                continue;
            };
            if !m.file_type().is_char_device() {
                continue;
            }
            let p = Path::new(d);
            if let Some(parent) = p.parent() {
                tree.mkdirs(parent);
            }
            // /dev/kvm only to the jail group; the others to everyone, as usual.
            let (mode, gid) = if *d == "/dev/kvm" {
                (0o660, Some(self.gid))
            } else {
                (0o666, None)
            };
            tree.ops.push(Op::Mknod {
                path: cpath(&tree.inside(p)),
                mode,
                dev: m.rdev(),
                gid,
            });
        }
        tree.proc();
    }

    /// Gives the jail group read (and, `write`, write) access to `path`
    /// unless it has it already (or everyone may read it).
    fn grant(&self, path: &Path, meta: &std::fs::Metadata, write: bool) -> std::io::Result<()> {
        let mode = meta.mode() & 0o7777;
        let others = if write { 0o006 } else { 0o004 };
        let group = if write { 0o060 } else { 0o040 };
        if mode & others == others || (meta.gid() == self.gid && mode & group == group) {
            return Ok(());
        }
        std::os::unix::fs::chown(path, None, Some(self.gid))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | group))
    }

    /// Removes `vm_id`'s jail directory and socket staging directory (the
    /// tree in them was the VMM's own mount namespace's and went with it).
    /// Only to be called once its VMM is gone.
    pub fn remove(&self, vm_id: &str) {
        remove_jail_dir(&self.dir(vm_id));
    }

    /// Removes the jail directories (and control-socket staging directories
    /// in `socket_root`) whose VMM is gone: those for which `alive(vm_id)`
    /// says no. Returns what it removed.
    pub fn sweep(&self, socket_root: &Path, alive: impl Fn(&str) -> bool) -> Vec<String> {
        let mut removed = Vec::new();
        for e in std::fs::read_dir(&self.base)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !alive(&name) {
                let socket = socket_root.join(format!("{name}.sock"));
                JailCleanup::of(self, &name, &socket).run();
                removed.push(name);
            }
        }
        removed
    }
}

/// The paths a VMM launched for `spec` uses: its kernel and initrd and
/// read-only drives (read-only), its session directory and writable drives
/// (its own), the agent socket's directory when it is elsewhere.
pub fn launch_paths(spec: &LaunchSpec) -> Vec<(PathBuf, Access)> {
    let mut paths = vec![
        (spec.kernel.clone(), Access::ReadOnly),
        (spec.session_dir.clone(), Access::Owned),
    ];
    paths.extend(spec.initrd.iter().map(|p| (p.clone(), Access::ReadOnly)));
    for d in &spec.drives {
        match &d.fd {
            // A file the daemon opened for the VM (a direct disk): the user's,
            // so it is shared with the jail group rather than given away.
            Some(fd) => paths.push((
                crate::safe_open::fd_path(fd.raw()),
                if d.read_only {
                    Access::ReadOnly
                } else {
                    Access::SharedWritable
                },
            )),
            None => paths.push((
                d.path.clone(),
                if d.read_only {
                    Access::ReadOnly
                } else {
                    Access::Owned
                },
            )),
        }
    }
    if let Some(dir) = spec
        .agent_socket
        .as_deref()
        .and_then(Path::parent)
        .filter(|d| *d != spec.session_dir)
    {
        paths.push((dir.to_path_buf(), Access::Owned));
    }
    paths
}

/// A [`JailError::Io`] maker for `map_err`.
fn io_error(vm_id: &str, context: String) -> impl FnOnce(std::io::Error) -> JailError {
    let vm_id = vm_id.to_string();
    move |source| JailError::Io {
        vm_id,
        context,
        source,
    }
}

/// The daemon's effective uid (a jail needs 0).
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The staging directory of a control socket.
pub fn staging_dir(socket: &Path, vm_id: &str) -> PathBuf {
    agentenv_core::config::Config::jail_socket_staging(socket, vm_id)
}

fn remove_jail_dir(dir: &Path) {
    // Only an empty directory: should something be mounted there after all,
    // it is left alone rather than followed.
    let _ = std::fs::remove_dir(dir);
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The VMM's binary and libraries: read-only, executable.
    System,
    /// A device node: as on the host.
    Device,
    /// The VM's files: never executable, never set-uid or device nodes.
    Data,
}

/// One step of building the jail's tree (all paths inside the jail root).
#[derive(Debug)]
pub(crate) enum Op {
    /// `mkdir` (0755); an existing directory is fine.
    Mkdir(CString),
    /// Create an empty file to bind a file onto.
    Touch(CString),
    /// `symlink(target, at)`.
    Symlink(CString, CString),
    /// Bind `src` at `dst`, then remount with `flags`.
    Bind {
        src: CString,
        dst: CString,
        flags: libc::c_ulong,
    },
    /// Attach the detached mount `tree` (from `open_tree`, made by the
    /// daemon) at `dst`, then remount with `flags`.
    Attach {
        tree: std::os::fd::RawFd,
        dst: CString,
        flags: libc::c_ulong,
    },
    /// Mount a `proc` of the jail's PID namespace.
    Proc(CString),
    /// Mount the tmpfs of the jail's `/dev` (device nodes allowed).
    DevTmpfs(CString),
    /// A character device node (`mode`, and `gid` as its group when given).
    Mknod {
        path: CString,
        mode: u32,
        dev: u64,
        gid: Option<u32>,
    },
}

impl Op {
    /// For an error message.
    pub(crate) fn describe(&self) -> String {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Op::Mkdir(p) => format!("mkdir {}", s(p)),
            Op::Touch(p) => format!("create {}", s(p)),
            Op::Symlink(t, p) => format!("symlink {} -> {}", s(p), s(t)),
            Op::Bind { src, dst, .. } => format!("bind {} at {}", s(src), s(dst)),
            Op::Attach { dst, .. } => format!("attach a file's mount at {}", s(dst)),
            Op::Proc(p) => format!("mount proc at {}", s(p)),
            Op::DevTmpfs(p) => format!("mount a tmpfs at {}", s(p)),
            Op::Mknod { path, .. } => format!("make the device node {}", s(path)),
        }
    }
}

/// The tree being described.
struct Tree {
    root: PathBuf,
    made: BTreeSet<PathBuf>,
    /// Directories bound (their whole content is there already).
    dirs: Vec<PathBuf>,
    ops: Vec<Op>,
}

impl Tree {
    fn new(root: &Path) -> Tree {
        Tree {
            root: root.to_path_buf(),
            made: BTreeSet::new(),
            dirs: Vec::new(),
            ops: Vec::new(),
        }
    }

    fn inside(&self, host: &Path) -> PathBuf {
        self.root.join(host.strip_prefix("/").unwrap_or(host))
    }

    /// Whether `host` is already in the tree through a bound directory.
    fn covered(&self, host: &Path) -> bool {
        self.dirs.iter().any(|d| host.starts_with(d))
    }

    fn mkdirs(&mut self, host_dir: &Path) {
        let mut todo = Vec::new();
        let mut d = Some(host_dir);
        while let Some(p) = d {
            if p == Path::new("/") || self.made.contains(p) {
                break;
            }
            todo.push(p.to_path_buf());
            d = p.parent();
        }
        for p in todo.into_iter().rev() {
            self.ops.push(Op::Mkdir(cpath(&self.inside(&p))));
            self.made.insert(p);
        }
    }

    fn symlink(&mut self, target: &Path, at: &Path) {
        if let Some(parent) = at.parent() {
            self.mkdirs(parent);
        }
        self.ops
            .push(Op::Symlink(cpath(target), cpath(&self.inside(at))));
        self.made.insert(at.to_path_buf());
    }

    fn bind(&mut self, host: &Path, dir: bool, kind: Kind, read_only: bool) {
        let base = match kind {
            Kind::System | Kind::Device => 0,
            Kind::Data => libc::MS_NOEXEC,
        };
        let mut flags = libc::MS_NOSUID | base;
        if kind != Kind::Device {
            flags |= libc::MS_NODEV;
        }
        if read_only {
            flags |= libc::MS_RDONLY;
        }
        self.bind_with(host, host, dir, flags);
    }

    fn bind_at(&mut self, host: &Path, at: &Path, dir: bool, read_only: bool) {
        let mut flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if read_only {
            flags |= libc::MS_RDONLY;
        }
        self.bind_with(host, at, dir, flags);
    }

    fn bind_with(&mut self, host: &Path, at: &Path, dir: bool, flags: libc::c_ulong) {
        if !dir && self.made.contains(at) {
            // Bound already (the binary is also a `read_only_paths` entry, say).
            return;
        }
        if dir {
            self.mkdirs(at);
            self.dirs.push(at.to_path_buf());
        } else {
            if let Some(parent) = at.parent() {
                self.mkdirs(parent);
            }
            self.ops.push(Op::Touch(cpath(&self.inside(at))));
            self.made.insert(at.to_path_buf());
        }
        self.ops.push(Op::Bind {
            src: cpath(host),
            dst: cpath(&self.inside(at)),
            flags,
        });
    }

    /// Attaches `tree` (a detached mount of one file) at `at`.
    fn attach(&mut self, at: &Path, tree: &OwnedFd, read_only: bool) {
        use std::os::fd::AsRawFd;
        if let Some(parent) = at.parent() {
            self.mkdirs(parent);
        }
        self.ops.push(Op::Touch(cpath(&self.inside(at))));
        self.made.insert(at.to_path_buf());
        let mut flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if read_only {
            flags |= libc::MS_RDONLY;
        }
        self.ops.push(Op::Attach {
            tree: tree.as_raw_fd(),
            dst: cpath(&self.inside(at)),
            flags,
        });
    }

    fn proc(&mut self) {
        self.mkdirs(Path::new("/proc"));
        self.ops
            .push(Op::Proc(cpath(&self.inside(Path::new("/proc")))));
    }
}

/// A jail described and ready for [`crate::process::VmmProcess::spawn_in`].
#[derive(Debug)]
pub struct PreparedJail {
    vm_id: String,
    host_root: PathBuf,
    pub(crate) root: CString,
    pub(crate) ops: Vec<Op>,
    /// The binary to execute (its canonical path, the same in the jail).
    pub(crate) exec: CString,
    pub(crate) cwd: Option<CString>,
    /// Started through Firecracker's jailer: how.
    pub(crate) jailer: Option<JailerRun>,
    /// What [`Op::Attach`] attaches: held open (never read here) so that
    /// the child, which inherits them, can attach them; they live as long as
    /// this description (the VMM's), each pinning only the file its VMM
    /// uses anyway.
    #[allow(dead_code)]
    trees: Vec<OwnedFd>,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// The network namespace to join.
    pub(crate) netns: Option<OwnedFd>,
    /// The persistent TAP the VMM opens by name: made its uid's (and gid's)
    /// before it drops privileges, so it may attach.
    pub(crate) tap: Option<[u8; libc::IFNAMSIZ]>,
    /// (where the VMM binds it on the host, where it belongs)
    staged_socket: Option<(PathBuf, PathBuf)>,
    staging_dir: Option<PathBuf>,
}

impl PreparedJail {
    /// The VM.
    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }

    /// The VMM opens the persistent TAP `name`: it is made the jail uid's
    /// and gid's (`TUNSETOWNER`, `TUNSETGROUP`) in the VMM's network
    /// namespace before it starts. A name that is not a valid interface
    /// name is left alone (the VMM's own open then fails, naming it).
    pub fn with_tap(mut self, name: &str) -> PreparedJail {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return self;
        }
        let mut nul_terminated = [0u8; libc::IFNAMSIZ];
        nul_terminated[..name.len()].copy_from_slice(name.as_bytes());
        self.tap = Some(nul_terminated);
        self
    }

    /// The jail's root on the host.
    pub fn host_root(&self) -> &Path {
        &self.host_root
    }

    /// The uid the VMM runs as.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The gid the VMM runs as.
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// Where the VMM binds the control socket `socket`, when it is staged.
    pub fn staged(&self, socket: &Path) -> Option<&Path> {
        match &self.staged_socket {
            Some((staged, fin)) if fin == socket => Some(staged),
            _ => None,
        }
    }

    /// Moves a staged control socket to its host path. The (now empty)
    /// staging directory stays until the VMM is gone: its mount in the VMM's
    /// namespace holds it anyway (one inode of `socket_root` per jailed VM).
    pub fn publish(&self, staged: &Path, socket: &Path) -> std::io::Result<()> {
        std::fs::rename(staged, socket)
    }

    /// What to remove once the VMM is gone.
    pub fn cleanup(&self) -> JailCleanup {
        JailCleanup {
            root: self.host_root.clone(),
            staging: self.staging_dir.clone(),
        }
    }
}

/// The host directories of a jail, removed once its VMM is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailCleanup {
    /// The jail root.
    pub root: PathBuf,
    /// The control socket's staging directory.
    pub staging: Option<PathBuf>,
}

impl JailCleanup {
    /// The cleanup of `vm_id`'s jail in `jail`, for a VMM started by an
    /// earlier daemon.
    pub fn of(jail: &Jail, vm_id: &str, socket: &Path) -> JailCleanup {
        JailCleanup {
            root: jail.dir(vm_id),
            staging: Some(staging_dir(socket, vm_id)),
        }
    }

    /// Removes them (only to be called once the VMM is gone).
    pub fn run(&self) {
        if let Some(d) = &self.staging {
            let _ = std::fs::remove_dir_all(d);
        }
        remove_jail_dir(&self.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(uid: Option<u32>, range: [u32; 2]) -> JailConfig {
        JailConfig {
            uid,
            uid_range: range,
            ..JailConfig::default()
        }
    }

    #[test]
    fn per_vm_uids_come_from_the_range_and_are_recorded_by_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("jail");
        let jail = Jail::new(&cfg(None, [950_000, 2]), &base).unwrap();
        let a = jail.claim("a").unwrap();
        let b = jail.claim("b").unwrap();
        assert_eq!((a, b), (950_000, 950_001));
        // Claiming again keeps the recorded uid; a third VM finds none free.
        assert_eq!(jail.claim("a").unwrap(), a);
        assert_eq!(jail.uid_of("b"), Some(b));
        assert!(matches!(
            jail.claim("c"),
            Err(JailError::RangeFull {
                start: 950_000,
                count: 2
            })
        ));
        // The failed claim left its directory: it is removed by the caller
        // (prepare) on error; a removed VM frees its uid.
        jail.remove("c");
        jail.remove("a");
        assert_eq!(jail.claim("c").unwrap(), 950_000);
    }

    #[test]
    fn the_sweep_removes_only_jails_whose_vmm_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let sockets = dir.path().join("s");
        std::fs::create_dir(&sockets).unwrap();
        let jail = Jail::new(&cfg(Some(4244), [1, 1]), &dir.path().join("j")).unwrap();
        for vm in ["gone", "alive"] {
            jail.claim(vm).unwrap();
            std::fs::create_dir(staging_dir(&sockets.join(format!("{vm}.sock")), vm)).unwrap();
        }
        assert_eq!(
            jail.sweep(&sockets, |vm| vm == "alive"),
            vec!["gone".to_string()]
        );
        assert!(!jail.dir("gone").exists());
        assert!(!staging_dir(&sockets.join("gone.sock"), "gone").exists());
        assert!(jail.dir("alive").exists());
        assert!(staging_dir(&sockets.join("alive.sock"), "alive").exists());
    }

    #[test]
    fn a_fixed_uid_is_everyones() {
        let dir = tempfile::tempdir().unwrap();
        let jail = Jail::new(&cfg(Some(4242), [1, 1]), &dir.path().join("j")).unwrap();
        assert_eq!(jail.claim("x").unwrap(), 4242);
        assert_eq!(jail.claim("y").unwrap(), 4242);
        assert_eq!(jail.gid(), 4242);
    }

    #[test]
    fn an_unusable_base_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        for (base, why) in [
            (file.as_path(), "is not a directory"),
            (link.as_path(), "is a symlink"),
            (Path::new("relative"), "must be an absolute path"),
        ] {
            let e = Jail::new(&JailConfig::default(), base)
                .unwrap_err()
                .to_string();
            assert!(e.contains("jail.chroot_base") && e.contains(why), "{e}");
        }
    }

    #[test]
    fn the_tree_binds_each_path_once_at_its_host_path() {
        let dir = tempfile::tempdir().unwrap();
        let session = dir.path().join("s");
        std::fs::create_dir(&session).unwrap();
        let overlay = session.join("overlay.ext4");
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&overlay, b"").unwrap();
        std::fs::write(&kernel, b"").unwrap();
        std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o600)).unwrap();
        // A direct disk the daemon opened: the VMM reaches it by descriptor.
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, b"").unwrap();
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o600)).unwrap();
        let opened = std::fs::File::open(&disk).unwrap();
        let fd_path = crate::safe_open::fd_path(std::os::fd::AsRawFd::as_raw_fd(&opened));
        let jail = Jail::new(&cfg(Some(4243), [1, 1]), &dir.path().join("j")).unwrap();
        let socket = dir.path().join("sockets/x.sock");
        std::fs::create_dir(socket.parent().unwrap()).unwrap();
        let p = jail
            .prepare(
                "x",
                Path::new("/bin/sh"),
                &[
                    (kernel.clone(), Access::ReadOnly),
                    (session.clone(), Access::Owned),
                    (overlay.clone(), Access::Owned),
                    (fd_path.clone(), Access::SharedWritable),
                ],
                Some(&socket),
                None,
            )
            .unwrap();
        let binds: Vec<String> = p
            .ops
            .iter()
            .filter(|o| matches!(o, Op::Bind { .. }))
            .map(Op::describe)
            .collect();
        let root = jail.dir("x");
        let at = |h: &Path| format!("at {}", root.join(h.strip_prefix("/").unwrap()).display());
        // The overlay is inside the bound session directory: not bound again;
        // a descriptor path is never bound.
        assert_eq!(
            binds.iter().filter(|b| b.ends_with(&at(&session))).count(),
            1
        );
        assert!(!binds.iter().any(|b| b.contains("overlay")), "{binds:?}");
        assert!(!binds.iter().any(|b| b.contains("/proc/self")), "{binds:?}");
        assert!(binds.iter().any(|b| b.ends_with(&at(&kernel))));
        // /dev is the jail's own, with nodes made for it.
        let null = format!("make the device node {}", root.join("dev/null").display());
        assert!(p.ops.iter().any(|o| o.describe() == null));
        assert!(!binds.iter().any(|b| b.contains("/dev/")), "{binds:?}");
        // The staged socket directory is mounted where the socket's directory is.
        let staged = staging_dir(&socket, "x");
        assert!(binds
            .iter()
            .any(|b| b.starts_with(&format!("bind {}", staged.display()))
                && b.ends_with(&at(socket.parent().unwrap()))));
        assert_eq!(p.staged(&socket), Some(staged.join("x.sock").as_path()));
        // Ownership: the VM's files are its uid's, the kernel readable by the group.
        assert_eq!(std::fs::metadata(&overlay).unwrap().uid(), 4243);
        let k = std::fs::metadata(&kernel).unwrap();
        assert_eq!((k.gid(), k.mode() & 0o777), (4243, 0o640));
        assert_eq!(std::fs::metadata(&staged).unwrap().uid(), 4243);
        // The opened disk is shared with the jail group through its
        // descriptor, and stays its owner's.
        let m = std::fs::metadata(&disk).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (0, 4243, 0o660));
        drop(opened);
        p.cleanup().run();
        assert!(!root.exists() && !staged.exists());
    }

    #[test]
    fn through_the_jailer_the_tree_is_its_chroot_with_the_session_at_vm() {
        let dir = tempfile::tempdir().unwrap();
        let session = dir.path().join("s");
        std::fs::create_dir(&session).unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"").unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, b"").unwrap();
        let opened = std::fs::File::open(&disk).unwrap();
        let fd_path = crate::safe_open::fd_path(std::os::fd::AsRawFd::as_raw_fd(&opened));
        // Any executable file is a jailer to describe (it is not run here).
        let jailer_bin = dir.path().join("jailer");
        std::fs::write(&jailer_bin, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&jailer_bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let firecracker = dir.path().join("firecracker");
        std::fs::write(&firecracker, vec![0u8; 8192]).unwrap();
        let cfg = JailConfig {
            uid: Some(4245),
            firecracker_jailer: Some(jailer_bin.clone()),
            ..JailConfig::default()
        };
        let jail = Jail::new(&cfg, &dir.path().join("j")).unwrap();
        let socket = dir.path().join("sockets/vm.1.sock");
        std::fs::create_dir(socket.parent().unwrap()).unwrap();
        let p = jail
            .prepare_jailer(
                "vm.1",
                &firecracker,
                &session,
                &[
                    (kernel.clone(), Access::ReadOnly),
                    (session.clone(), Access::Owned),
                    (fd_path.clone(), Access::SharedWritable),
                ],
                Some(&socket),
            )
            .unwrap();
        let run = p.jailer.as_ref().unwrap();
        let argv: Vec<String> = run
            .argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let root = jail.dir("vm.1");
        assert_eq!(
            argv,
            [
                jailer_bin.to_str().unwrap(),
                "--id",
                "vm-1",
                "--exec-file",
                firecracker.to_str().unwrap(),
                "--uid",
                "4245",
                "--gid",
                "4245",
                "--chroot-base-dir",
                root.to_str().unwrap(),
                "--resource-limit",
                "no-file=4096",
                "--",
            ]
        );
        assert_eq!(p.exec.to_str().unwrap(), jailer_bin.to_str().unwrap());
        assert_eq!(p.cwd, None);
        // The tmpfs goes on the jail directory; the tree is the chroot in it.
        assert_eq!(p.root.to_str().unwrap(), root.to_str().unwrap());
        let chroot = root.join("firecracker/vm-1/root");
        let ops: Vec<String> = p.ops.iter().map(Op::describe).collect();
        assert_eq!(ops[2], format!("mkdir {}", chroot.display()), "{ops:?}");
        let at = |h: &Path| chroot.join(h.strip_prefix("/").unwrap());
        assert!(ops.contains(&format!(
            "bind {} at {}",
            kernel.display(),
            at(&kernel).display()
        )));
        assert!(ops.contains(&format!(
            "bind {} at {}",
            session.display(),
            chroot.join("vm").display()
        )));
        // The direct disk: the file its descriptor holds, attached at the
        // same path (the jailer closes descriptors and gives no /proc).
        assert!(ops.contains(&format!(
            "attach a file's mount at {}",
            at(&fd_path).display()
        )));
        // No /dev or /proc of the daemon's making: the jailer makes /dev.
        assert!(!ops
            .iter()
            .any(|o| o.contains("device node") || o.contains("mount proc")));
        drop(opened);
        p.cleanup().run();
        assert!(!root.exists());
    }

    #[test]
    fn an_unusable_jailer_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"").unwrap();
        for (path, why) in [
            (PathBuf::from("jailer"), "must be an absolute path"),
            (dir.path().join("missing"), "No such file"),
            (dir.path().to_path_buf(), "is not a regular file"),
            (plain, "is not executable"),
        ] {
            let cfg = JailConfig {
                firecracker_jailer: Some(path),
                ..JailConfig::default()
            };
            let e = Jail::new(&cfg, &dir.path().join("j"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("jail.firecracker_jailer") && e.contains(why),
                "{e}"
            );
        }
    }
}
