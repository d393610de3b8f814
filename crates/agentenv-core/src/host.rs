//! The host seams: every file-system, disk-image, process and machine fact
//! the engine needs, one narrow trait each, bundled in [`Host`].
//!
//! `agentenv_host::LocalHost` implements them on the real machine.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use crate::backend::ProcessIdentity;

/// What kind of file a path names (without following a final symlink).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A block or character device.
    Device,
    /// A FIFO or socket.
    Special,
}

/// `lstat` facts about a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    /// What it is.
    pub kind: FileKind,
    /// Size in bytes.
    pub len: u64,
    /// Hard link count.
    pub nlink: u64,
    /// Whether the current user may write it.
    pub writable: bool,
}

/// An open file descriptor, shared by whoever passes it on (to a VMM, to a
/// copy); equal only to itself.
#[derive(Debug, Clone)]
pub struct SharedFd(pub Arc<OwnedFd>);

impl PartialEq for SharedFd {
    fn eq(&self, other: &SharedFd) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedFd {}

impl SharedFd {
    /// Its descriptor number (in this process, and in a child that
    /// inherits it).
    pub fn raw(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.0.as_raw_fd()
    }
}

/// A host file or directory from a request (a direct disk, a share), opened
/// once beneath its root without following a symlink at any component. The
/// open file is what travels on; the path is only for messages and records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedPath {
    /// The path it was opened by.
    pub path: PathBuf,
    /// The open file (read-write for a file, read-only for a directory);
    /// `None` from a fake host.
    pub fd: Option<SharedFd>,
    /// Device of the open file.
    pub dev: u64,
    /// Inode of the open file: with `dev`, what identifies it.
    pub ino: u64,
    /// `fstat` facts of the open file.
    pub info: FileInfo,
    /// A path by which this process reaches the open file itself (not
    /// whatever is at `path` now), for a later read such as a snapshot's
    /// copy of a direct disk; `None` from a fake host.
    pub reopen: Option<PathBuf>,
}

/// Why [`HostFiles::open_beneath`] refused a path.
#[derive(Debug, thiserror::Error)]
pub enum OpenBeneathError {
    /// A component of the path is a symlink (or a magic link).
    #[error("{0} is reached through a symlink")]
    Symlink(PathBuf),
    /// Nothing is there.
    #[error("{0} does not exist")]
    NotFound(PathBuf),
    /// Any other failure.
    #[error("cannot open {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// Why [`DiskImages::stage_share`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StageShareError {
    /// The directory holds more than the cap (counted while copying, so
    /// growth during the copy is caught).
    #[error("{path} holds more than {limit_mib} MiB (max_share_mib)")]
    TooBig {
        /// The share's host directory.
        path: PathBuf,
        /// The cap.
        limit_mib: u64,
    },
    /// The tree nests deeper than the copy follows.
    #[error("{path} nests directories deeper than {depth} levels")]
    TooDeep {
        /// The share's host directory.
        path: PathBuf,
        /// The deepest level copied.
        depth: usize,
    },
    /// Reading the share or writing the copy failed.
    #[error(transparent)]
    Host(#[from] HostError),
}

/// A host operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {message}")]
pub struct HostError {
    /// What was being done, with the path.
    pub context: String,
    /// The OS error or the command's stderr.
    pub message: String,
    /// Set when the failure is a full disk.
    pub no_space: bool,
}

impl HostError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, e: std::io::Error) -> HostError {
        HostError {
            context: context.into(),
            no_space: e.raw_os_error() == Some(28),
            message: e.to_string(),
        }
    }
}

/// The host as the engine sees it: four narrow seams, each with a real
/// implementation (`agentenv_host::LocalHost` implements all four) and a
/// recording fake (`crate::testing`).
#[derive(Clone)]
pub struct Host {
    /// Files and directories.
    pub files: Arc<dyn HostFiles>,
    /// ext4 images for overlays and shares.
    pub images: Arc<dyn DiskImages>,
    /// Processes left by an earlier daemon.
    pub processes: Arc<dyn HostProcesses>,
    /// Facts about the machine.
    pub facts: Arc<dyn HostFacts>,
    /// Cgroups for the VMs' resource limits; `None`: VMMs are not confined
    /// (`[cgroup] enable = false`).
    pub cgroups: Option<Arc<dyn crate::limits::HostCgroups>>,
}

impl Host {
    /// All four seams from one implementation of them.
    pub fn from_one<T>(host: Arc<T>) -> Host
    where
        T: HostFiles + DiskImages + HostProcesses + HostFacts,
    {
        Host {
            files: host.clone(),
            images: host.clone(),
            processes: host.clone(),
            facts: host,
            cgroups: None,
        }
    }
}

/// The file-system operations the engine uses. All paths are absolute and
/// were built through [`crate::ids::checked_join`] or validated by the engine
/// (see `engine::host_paths`).
pub trait HostFiles: Send + Sync + 'static {
    /// A fingerprint of a file's content that is cheap to take (`fp1:` and
    /// the SHA-256 of its size, modification time and first and last
    /// 64 KiB): what a snapshot records of the base image, kernel and
    /// initramfs it depends on, so a VM is never made from it on other ones.
    fn fingerprint(&self, path: &Path) -> Result<String, HostError>;

    /// `lstat` of a path.
    fn inspect(&self, path: &Path) -> std::io::Result<FileInfo>;

    /// The path with every symlink and `..` resolved.
    fn canonicalize(&self, path: &Path) -> std::io::Result<PathBuf>;

    /// Creates a session directory; fails if it already exists.
    fn create_dir(&self, path: &Path) -> Result<(), HostError>;

    /// Removes a directory tree; succeeds if it is already gone.
    fn remove_dir_all(&self, path: &Path) -> Result<(), HostError>;

    /// Removes a file; succeeds if it is already gone.
    fn remove_file(&self, path: &Path) -> Result<(), HostError>;

    /// Checks that a new entry (a VMM's socket) can be made in `dir`, by
    /// making and removing an empty file there: a full inode table is found
    /// before a VMM starts and fails on it.
    fn probe_new_entry(&self, dir: &Path) -> Result<(), HostError>;

    /// Bytes used by the regular files below `dir` (symlinks not followed).
    fn dir_usage(&self, dir: &Path) -> Result<u64, HostError>;

    /// Flushes a file's data to stable storage.
    fn sync_file(&self, path: &Path) -> Result<(), HostError>;

    /// Writes a file atomically: temp file, fsync, rename, fsync the directory.
    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<(), HostError>;

    /// Reads a whole file.
    fn read(&self, path: &Path) -> Result<Vec<u8>, HostError>;

    /// The entries (names) of a directory; empty when it does not exist.
    fn list_dir(&self, path: &Path) -> Result<Vec<String>, HostError>;

    /// The last `max` bytes of a file, lossily decoded; empty if unreadable.
    fn read_tail(&self, path: &Path, max: u64) -> String;

    /// Renames a file or directory (same file system).
    fn rename(&self, from: &Path, to: &Path) -> Result<(), HostError>;

    /// Opens `rel` (relative, without `..`) beneath the directory `root`,
    /// refusing a symlink at any component (`openat2` with
    /// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, or an equivalent walk). A
    /// regular file is opened read-write, a directory read-only; anything
    /// else is returned without being opened for I/O (the caller refuses it).
    fn open_beneath(&self, root: &Path, rel: &Path) -> Result<OpenedPath, OpenBeneathError>;
}

/// Builds the ext4 images a VM boots with.
#[async_trait]
pub trait DiskImages: Send + Sync + 'static {
    /// Creates a sparse file of `size_bytes` holding an empty ext4 file system.
    async fn create_ext4_disk(&self, path: &Path, size_bytes: u64) -> Result<(), HostError>;

    /// Builds an ext4 image of `size_bytes` at `image` holding a copy of `dir`.
    async fn create_ext4_from_dir(
        &self,
        dir: &Path,
        image: &Path,
        size_bytes: u64,
    ) -> Result<(), HostError>;

    /// Copies the opened directory `dir` into the new private directory
    /// `dest` through its descriptor, never following a symlink (symlinks
    /// are copied as symlinks; devices, FIFOs and sockets are left out), and
    /// stops once more than `max_bytes` were counted. Returns the bytes
    /// counted (file sizes, and a block per entry).
    async fn stage_share(
        &self,
        dir: &OpenedPath,
        dest: &Path,
        max_bytes: u64,
    ) -> Result<u64, StageShareError>;
}

/// The host's processes, for cleaning up VMMs an earlier daemon left.
///
/// A VMM is recognised by its *control socket*, read from its arguments as
/// the drivers pass it (Firecracker's `--api-sock PATH`, QEMU's
/// `-qmp unix:PATH,…`) and compared as a whole path: never by a substring of
/// its command line, so VM `a` never matches the VMM of VM `a.sock.b`, and a
/// process that merely mentions a socket path (an operator's `socat`) is no
/// VMM at all.
pub trait HostProcesses: Send + Sync + 'static {
    /// Kills the process group of `pid` if that process is still alive and its
    /// control socket is exactly `control_socket` (so an unrelated process that
    /// reused the pid is never touched); with no pid, of every process whose
    /// control socket is exactly `control_socket`. Returns whether something
    /// was killed.
    fn kill_stale_process(&self, pid: Option<u32>, control_socket: &Path) -> bool;

    /// Like [`kill_stale_process`](HostProcesses::kill_stale_process) for a
    /// recorded process: it must also still have the recorded start time.
    fn kill_recorded_process(&self, id: ProcessIdentity, control_socket: &Path) -> bool {
        self.kill_stale_process(Some(id.pid), control_socket)
    }

    /// Live VMM processes (not this one, not zombies) whose control socket lies
    /// directly in `dir`, with that socket.
    fn vmm_processes_in(&self, dir: &Path) -> Vec<(u32, PathBuf)>;
}

/// Facts about the machine.
pub trait HostFacts: Send + Sync + 'static {
    /// Total memory of the host in MiB.
    fn memory_total_mib(&self) -> u64;

    /// `len` bytes from the host's random number generator (`getrandom`):
    /// the fresh entropy a VM restored from a memory snapshot is given.
    fn entropy(&self, len: usize) -> Vec<u8>;
}
