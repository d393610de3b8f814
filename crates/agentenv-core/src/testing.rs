//! Recording fakes of every seam the engine drives (youki's `Syscall` and
//! `TestHelperSyscall` are the model): the host's files, disk images,
//! processes and facts ([`FakeHost`]), the VMM backend ([`FakeVmm`]), host
//! networking ([`FakeNetwork`]) and the snapshot store ([`FakeSnapshots`]).
//!
//! Each keeps its world in memory, records every call that changes it, and
//! fails the calls a test names ([`Faults`]). The VMM fake starts its
//! "processes" in the host fake, so a VMM outlives an engine as it outlives a
//! daemon, and a test can check that nothing is left anywhere.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use agentenv_api::{BackendKind, SnapshotInfo, SnapshotKind, SnapshotStatus, SnapshotTier};
use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::watch;

use crate::backend::{
    AdoptSpec, AdoptedState, FullSnapshotFiles, LaunchSpec, ProcessIdentity, RestoreSpec,
    SavedMemory, Vmm, VmmError, VmmExit, VmmInstance,
};
use crate::failpoints::Failpoints;
use crate::host::{
    DiskImages, FileInfo, FileKind, Host, HostError, HostFacts, HostFiles, HostProcesses,
    OpenBeneathError, OpenedPath, StageShareError,
};
use crate::net::{HostNetwork, NetError, NetLease, NetPlan};
use crate::snapshot::{Cleanup, NewSnapshot, PendingSnapshot, SnapshotError, SnapshotStore};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The calls a test wants to fail, by name (a fake's method name).
#[derive(Debug, Default)]
pub struct Faults(Mutex<HashSet<&'static str>>);

impl Faults {
    /// Makes every later call named `name` fail.
    pub fn inject(&self, name: &'static str) {
        lock(&self.0).insert(name);
    }

    /// Lets every call succeed again.
    pub fn clear(&self) {
        lock(&self.0).clear();
    }

    fn hit(&self, name: &str) -> bool {
        lock(&self.0).contains(name)
    }
}

/// One entry of the fake file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory.
    Dir,
    /// A regular file: its bytes, and its length (a sparse image has a
    /// length and no bytes).
    File {
        /// The content.
        data: Vec<u8>,
        /// The length.
        len: u64,
    },
    /// A Unix socket.
    Socket,
    /// A symbolic link to an absolute path.
    Symlink(PathBuf),
}

impl Node {
    /// A sparse file of `len` bytes (an image with no content to look at).
    pub fn sparse(len: u64) -> Node {
        Node::File {
            data: Vec::new(),
            len,
        }
    }
}

/// A call that changed the fake host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostCall {
    /// [`HostFiles::create_dir`].
    CreateDir(PathBuf),
    /// [`HostFiles::remove_dir_all`].
    RemoveDirAll(PathBuf),
    /// [`HostFiles::remove_file`].
    RemoveFile(PathBuf),
    /// [`HostFiles::write_atomic`].
    WriteAtomic(PathBuf),
    /// [`HostFiles::sync_file`].
    SyncFile(PathBuf),
    /// [`HostFiles::rename`].
    Rename(PathBuf, PathBuf),
    /// [`DiskImages::create_ext4_disk`].
    CreateExt4Disk(PathBuf, u64),
    /// [`DiskImages::create_ext4_from_dir`].
    CreateExt4FromDir(PathBuf, PathBuf, u64),
    /// [`DiskImages::stage_share`]: the share, the copy, the cap.
    StageShare(PathBuf, PathBuf, u64),
    /// [`HostProcesses::kill_stale_process`], with the pids it killed.
    KillStale(Option<u32>, PathBuf, Vec<u32>),
}

#[derive(Debug, Default)]
struct HostWorld {
    nodes: BTreeMap<PathBuf, Node>,
    /// Live processes by pid, with their command lines.
    processes: BTreeMap<u32, String>,
    calls: Vec<HostCall>,
}

/// An in-memory host: a file tree, a process table and its memory size.
#[derive(Debug)]
pub struct FakeHost {
    world: Mutex<HostWorld>,
    memory_mib: u64,
    /// Calls to fail, by method name (`create_dir`, `write_atomic`, …).
    pub faults: Faults,
}

impl FakeHost {
    /// An empty host with `/` and `memory_mib` of memory.
    pub fn new(memory_mib: u64) -> Arc<FakeHost> {
        let mut world = HostWorld::default();
        world.nodes.insert(PathBuf::from("/"), Node::Dir);
        Arc::new(FakeHost {
            world: Mutex::new(world),
            memory_mib,
            faults: Faults::default(),
        })
    }

    /// The host as the engine takes it.
    pub fn seams(self: &Arc<Self>) -> Host {
        Host::from_one(self.clone())
    }

    /// Makes a directory and its parents.
    pub fn mkdir_p(&self, path: &Path) {
        let mut w = lock(&self.world);
        for a in path.ancestors() {
            w.nodes.entry(a.to_path_buf()).or_insert(Node::Dir);
        }
    }

    /// Puts a node (parents made as needed).
    pub fn put(&self, path: &Path, node: Node) {
        if let Some(parent) = path.parent() {
            self.mkdir_p(parent);
        }
        lock(&self.world).nodes.insert(path.to_path_buf(), node);
    }

    /// Puts a regular file (parents made as needed).
    pub fn put_file(&self, path: &Path, data: &[u8]) {
        let len = data.len() as u64;
        self.put(
            path,
            Node::File {
                data: data.to_vec(),
                len,
            },
        );
    }

    /// What a path holds.
    pub fn node(&self, path: &Path) -> Option<Node> {
        lock(&self.world).nodes.get(path).cloned()
    }

    /// A regular file's content.
    pub fn file(&self, path: &Path) -> Option<Vec<u8>> {
        match self.node(path) {
            Some(Node::File { data, .. }) => Some(data),
            _ => None,
        }
    }

    /// The calls that changed the host, in order.
    pub fn calls(&self) -> Vec<HostCall> {
        lock(&self.world).calls.clone()
    }

    /// Starts a process (the VMM fake starts its VMMs here).
    pub fn spawn_process(&self, pid: u32, cmdline: String) {
        lock(&self.world).processes.insert(pid, cmdline);
    }

    /// Ends a process; returns whether it was alive.
    pub fn end_process(&self, pid: u32) -> bool {
        lock(&self.world).processes.remove(&pid).is_some()
    }

    /// Live processes, by pid.
    pub fn processes(&self) -> Vec<u32> {
        lock(&self.world).processes.keys().copied().collect()
    }

    fn record(&self, call: HostCall) {
        lock(&self.world).calls.push(call);
    }

    fn fault(&self, name: &'static str, path: &Path) -> Result<(), HostError> {
        if self.faults.hit(name) {
            return Err(HostError {
                context: format!("{name} {}", path.display()),
                message: "injected failure".into(),
                no_space: false,
            });
        }
        Ok(())
    }

    /// Makes a new node whose parent must be a directory and which must not exist.
    fn create(&self, path: &Path, node: Node, what: &str) -> Result<(), HostError> {
        let mut w = lock(&self.world);
        let err = |message: &str| HostError {
            context: format!("cannot {what} {}", path.display()),
            message: message.into(),
            no_space: false,
        };
        if w.nodes.contains_key(path) {
            return Err(err("File exists"));
        }
        match path.parent().and_then(|p| w.nodes.get(p)) {
            Some(Node::Dir) => {}
            _ => return Err(err("No such file or directory")),
        }
        w.nodes.insert(path.to_path_buf(), node);
        Ok(())
    }

    /// The control sockets a fake command line names: the word after each
    /// `--api-sock` (as the real host reads whole arguments, never substrings).
    fn control_sockets(cmdline: &str) -> Vec<PathBuf> {
        let words: Vec<&str> = cmdline.split_whitespace().collect();
        words
            .windows(2)
            .filter(|w| w[0] == "--api-sock")
            .map(|w| PathBuf::from(w[1]))
            .collect()
    }
}

fn not_found() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::NotFound)
}

impl HostFiles for FakeHost {
    fn fingerprint(&self, path: &Path) -> Result<String, HostError> {
        match self.node(path) {
            Some(Node::File { data, len }) => Ok(format!("fake:{len}:{}", data.len())),
            _ => Err(HostError::io(
                format!("cannot fingerprint {}", path.display()),
                not_found(),
            )),
        }
    }

    fn inspect(&self, path: &Path) -> std::io::Result<FileInfo> {
        // Like `lstat`: symlinks on the way are followed, a final one is not.
        let real = match (path.parent(), path.file_name()) {
            (Some(dir), Some(name)) => self.canonicalize(dir)?.join(name),
            _ => path.to_path_buf(),
        };
        let (kind, len) = match self.node(&real).ok_or_else(not_found)? {
            Node::Dir => (FileKind::Dir, 4096),
            Node::File { len, .. } => (FileKind::File, len),
            Node::Socket => (FileKind::Special, 0),
            Node::Symlink(_) => (FileKind::Symlink, 0),
        };
        Ok(FileInfo {
            kind,
            len,
            nlink: 1,
            writable: true,
        })
    }

    fn canonicalize(&self, path: &Path) -> std::io::Result<PathBuf> {
        // The names still to walk, last first; a symlink puts its target's back.
        fn names_rev(p: &Path) -> Vec<OsString> {
            p.components()
                .filter_map(|c| match c {
                    Component::Normal(n) => Some(n.to_os_string()),
                    Component::ParentDir => Some("..".into()),
                    _ => None,
                })
                .rev()
                .collect()
        }
        let mut out = PathBuf::from("/");
        let mut rest = names_rev(path);
        let mut hops = 0;
        while let Some(name) = rest.pop() {
            if name == ".." {
                out.pop();
                continue;
            }
            let next = out.join(&name);
            match self.node(&next).ok_or_else(not_found)? {
                Node::Symlink(target) => {
                    hops += 1;
                    if hops > 40 {
                        return Err(std::io::Error::other("too many levels of symbolic links"));
                    }
                    out = PathBuf::from("/");
                    rest.extend(names_rev(&target));
                }
                _ => out = next,
            }
        }
        Ok(out)
    }

    fn create_dir(&self, path: &Path) -> Result<(), HostError> {
        self.record(HostCall::CreateDir(path.into()));
        self.fault("create_dir", path)?;
        self.create(path, Node::Dir, "create")
    }

    fn remove_dir_all(&self, path: &Path) -> Result<(), HostError> {
        self.record(HostCall::RemoveDirAll(path.into()));
        self.fault("remove_dir_all", path)?;
        lock(&self.world).nodes.retain(|p, _| !p.starts_with(path));
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> Result<(), HostError> {
        self.record(HostCall::RemoveFile(path.into()));
        self.fault("remove_file", path)?;
        let mut w = lock(&self.world);
        if w.nodes.get(path) == Some(&Node::Dir) {
            return Err(HostError {
                context: format!("cannot remove {}", path.display()),
                message: "Is a directory".into(),
                no_space: false,
            });
        }
        w.nodes.remove(path);
        Ok(())
    }

    fn probe_new_entry(&self, dir: &Path) -> Result<(), HostError> {
        self.fault("probe_new_entry", dir)?;
        match self.node(dir) {
            Some(Node::Dir) => Ok(()),
            _ => Err(HostError {
                context: format!("cannot make a new entry in {}", dir.display()),
                message: "No such file or directory".into(),
                no_space: false,
            }),
        }
    }

    fn dir_usage(&self, dir: &Path) -> Result<u64, HostError> {
        let w = lock(&self.world);
        Ok(w.nodes
            .iter()
            .filter(|(p, _)| p.starts_with(dir) && *p != dir)
            .map(|(_, n)| match n {
                Node::File { len, .. } => (*len).max(4096),
                _ => 4096,
            })
            .sum())
    }

    fn sync_file(&self, path: &Path) -> Result<(), HostError> {
        self.record(HostCall::SyncFile(path.into()));
        self.fault("sync_file", path)?;
        match self.node(path) {
            Some(Node::File { .. }) => Ok(()),
            _ => Err(HostError::io(
                format!("cannot flush {}", path.display()),
                not_found(),
            )),
        }
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<(), HostError> {
        self.record(HostCall::WriteAtomic(path.into()));
        self.fault("write_atomic", path)?;
        let _ = lock(&self.world).nodes.remove(path);
        self.create(
            path,
            Node::File {
                data: data.to_vec(),
                len: data.len() as u64,
            },
            "write",
        )
    }

    fn read(&self, path: &Path) -> Result<Vec<u8>, HostError> {
        self.file(path)
            .ok_or_else(|| HostError::io(format!("cannot read {}", path.display()), not_found()))
    }

    fn list_dir(&self, path: &Path) -> Result<Vec<String>, HostError> {
        let w = lock(&self.world);
        Ok(w.nodes
            .keys()
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
            .collect())
    }

    fn read_tail(&self, path: &Path, max: u64) -> String {
        let data = self.file(path).unwrap_or_default();
        let from = data.len().saturating_sub(max as usize);
        String::from_utf8_lossy(&data[from..]).into_owned()
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<(), HostError> {
        self.record(HostCall::Rename(from.into(), to.into()));
        self.fault("rename", from)?;
        let mut w = lock(&self.world);
        if !w.nodes.contains_key(from) {
            return Err(HostError::io(
                format!("cannot rename {} to {}", from.display(), to.display()),
                not_found(),
            ));
        }
        let moved: Vec<(PathBuf, Node)> = w
            .nodes
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, n)| (p.clone(), n.clone()))
            .collect();
        w.nodes.retain(|p, _| !p.starts_with(from));
        for (p, n) in moved {
            let rel = p.strip_prefix(from).expect("below from");
            w.nodes.insert(to.join(rel), n);
        }
        Ok(())
    }

    fn open_beneath(&self, root: &Path, rel: &Path) -> Result<OpenedPath, OpenBeneathError> {
        let path = root.join(rel);
        let w = lock(&self.world);
        // Every component below the root, the last one too, must be no symlink.
        let mut at = root.to_path_buf();
        for c in rel.components() {
            at.push(c);
            match w.nodes.get(&at) {
                None => return Err(OpenBeneathError::NotFound(path)),
                Some(Node::Symlink(_)) => return Err(OpenBeneathError::Symlink(path)),
                Some(_) => {}
            }
        }
        let (kind, len) = match w.nodes.get(&path) {
            Some(Node::Dir) => (FileKind::Dir, 4096),
            Some(Node::File { len, .. }) => (FileKind::File, *len),
            _ => (FileKind::Special, 0),
        };
        // A fake inode: the node's place in the (ordered) tree.
        let ino = w.nodes.keys().position(|p| *p == path).unwrap_or(0) as u64 + 1;
        Ok(OpenedPath {
            path,
            fd: None,
            dev: 1,
            ino,
            info: FileInfo {
                kind,
                len,
                nlink: 1,
                writable: true,
            },
            reopen: None,
        })
    }
}

#[async_trait]
impl DiskImages for FakeHost {
    async fn create_ext4_disk(&self, path: &Path, size_bytes: u64) -> Result<(), HostError> {
        self.record(HostCall::CreateExt4Disk(path.into(), size_bytes));
        self.fault("create_ext4_disk", path)?;
        self.create(path, Node::sparse(size_bytes), "create disk")
    }

    async fn create_ext4_from_dir(
        &self,
        dir: &Path,
        image: &Path,
        size_bytes: u64,
    ) -> Result<(), HostError> {
        self.record(HostCall::CreateExt4FromDir(
            dir.into(),
            image.into(),
            size_bytes,
        ));
        self.fault("create_ext4_from_dir", image)?;
        self.create(image, Node::sparse(size_bytes), "build")
    }

    async fn stage_share(
        &self,
        dir: &OpenedPath,
        dest: &Path,
        max_bytes: u64,
    ) -> Result<u64, StageShareError> {
        self.record(HostCall::StageShare(
            dir.path.clone(),
            dest.into(),
            max_bytes,
        ));
        self.fault("stage_share", dest)?;
        let used = self.dir_usage(&dir.path)?;
        if used > max_bytes {
            return Err(StageShareError::TooBig {
                path: dir.path.clone(),
                limit_mib: max_bytes >> 20,
            });
        }
        self.create(dest, Node::Dir, "stage")?;
        let copied: Vec<(PathBuf, Node)> = lock(&self.world)
            .nodes
            .iter()
            .filter(|(p, _)| p.starts_with(&dir.path) && **p != dir.path)
            .map(|(p, n)| {
                (
                    dest.join(p.strip_prefix(&dir.path).expect("below")),
                    n.clone(),
                )
            })
            .collect();
        lock(&self.world).nodes.extend(copied);
        Ok(used)
    }
}

impl HostProcesses for FakeHost {
    fn kill_stale_process(&self, pid: Option<u32>, marker: &Path) -> bool {
        let mut w = lock(&self.world);
        let victims: Vec<u32> = w
            .processes
            .iter()
            .filter(|(p, cmd)| {
                pid.is_none_or(|want| want == **p)
                    && Self::control_sockets(cmd).iter().any(|s| s == marker)
            })
            .map(|(p, _)| *p)
            .collect();
        for p in &victims {
            w.processes.remove(p);
        }
        w.calls
            .push(HostCall::KillStale(pid, marker.into(), victims.clone()));
        !victims.is_empty()
    }

    fn vmm_processes_in(&self, dir: &Path) -> Vec<(u32, PathBuf)> {
        lock(&self.world)
            .processes
            .iter()
            .flat_map(|(p, cmd)| {
                Self::control_sockets(cmd)
                    .into_iter()
                    .filter(|s| s.parent() == Some(dir))
                    .map(move |s| (*p, s))
            })
            .collect()
    }
}

impl HostFacts for FakeHost {
    fn memory_total_mib(&self) -> u64 {
        self.memory_mib
    }

    fn entropy(&self, len: usize) -> Vec<u8> {
        // Different on every call, like the real thing.
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let seed = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (0..len as u64)
            .map(|i| (seed.wrapping_mul(31).wrapping_add(i) % 251) as u8)
            .collect()
    }
}

/// A call to the fake VMM backend or one of its instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmCall {
    /// [`Vmm::launch`] of a VM.
    Launch(String),
    /// [`Vmm::adopt`] of a VM's process.
    Adopt(String, u32),
    /// [`VmmInstance::pause`].
    Pause(u32),
    /// [`VmmInstance::resume`].
    Resume(u32),
    /// [`VmmInstance::request_shutdown`].
    RequestShutdown(u32),
    /// [`VmmInstance::kill`].
    Kill(u32),
    /// [`Vmm::restore`] of a VM from a state file.
    Restore(String, PathBuf),
    /// [`VmmInstance::save_full`].
    SaveFull(u32),
}

#[derive(Debug)]
struct FakeProcess {
    identity: ProcessIdentity,
    control_socket: PathBuf,
    guest: AdoptedState,
    exit: watch::Sender<Option<VmmExit>>,
}

#[derive(Debug)]
struct VmmWorld {
    next_pid: u32,
    live: BTreeMap<u32, FakeProcess>,
    calls: Vec<VmmCall>,
}

#[derive(Debug)]
struct VmmShared {
    host: Arc<FakeHost>,
    world: Mutex<VmmWorld>,
    faults: Faults,
    /// What [`Vmm::version`] answers (an upgrade changes it).
    version: Mutex<String>,
}

impl VmmShared {
    fn record(&self, call: VmmCall) {
        lock(&self.world).calls.push(call);
    }

    /// The process ends: gone from the host, its watchers told.
    fn end(&self, pid: u32, exit: VmmExit) -> bool {
        let p = lock(&self.world).live.remove(&pid);
        self.host.end_process(pid);
        match p {
            Some(p) => {
                p.exit.send_replace(Some(exit));
                true
            }
            None => false,
        }
    }
}

/// A VMM backend whose VMMs are entries in a table (and processes in the
/// [`FakeHost`]), whose guests boot at once and do what they are told.
#[derive(Debug)]
pub struct FakeVmm {
    shared: Arc<VmmShared>,
}

impl FakeVmm {
    /// A backend starting its VMMs on `host`.
    pub fn new(host: Arc<FakeHost>) -> Arc<FakeVmm> {
        Arc::new(FakeVmm {
            shared: Arc::new(VmmShared {
                host,
                world: Mutex::new(VmmWorld {
                    next_pid: 1000,
                    live: BTreeMap::new(),
                    calls: Vec::new(),
                }),
                faults: Faults::default(),
                version: Mutex::new("fake 1.0".into()),
            }),
        })
    }

    /// The VMM is upgraded: [`Vmm::version`] answers `v` from now on.
    pub fn set_version(&self, v: &str) {
        *lock(&self.shared.version) = v.into();
    }

    /// Calls to fail: `launch`, `adopt`, `pause`, `resume`, `request_shutdown`.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// The calls so far, in order.
    pub fn calls(&self) -> Vec<VmmCall> {
        lock(&self.shared.world).calls.clone()
    }

    /// The live VMM processes. A VMM killed through the host's process
    /// table ([`HostProcesses::kill_stale_process`]) is dead here too.
    pub fn live(&self) -> Vec<u32> {
        let alive = self.shared.host.processes();
        lock(&self.shared.world)
            .live
            .keys()
            .copied()
            .filter(|p| alive.contains(p))
            .collect()
    }

    /// Sets what a live VMM's guest does, as if told by an earlier daemon.
    pub fn set_guest(&self, pid: u32, to: AdoptedState) {
        if let Some(p) = lock(&self.shared.world).live.get_mut(&pid) {
            p.guest = to;
        }
    }

    /// What a live VMM's guest does.
    pub fn guest(&self, pid: u32) -> Option<AdoptedState> {
        lock(&self.shared.world).live.get(&pid).map(|p| p.guest)
    }

    /// A VMM dies on its own (crash, OOM kill, or while no daemon ran).
    pub fn crash(&self, pid: u32) -> bool {
        self.shared.end(
            pid,
            VmmExit {
                code: None,
                signal: Some(9),
            },
        )
    }

    fn start(&self, spec: &LaunchSpec) -> Result<Box<dyn VmmInstance>, VmmError> {
        let pid = {
            let mut w = lock(&self.shared.world);
            let pid = w.next_pid;
            w.next_pid += 1;
            w.live.insert(
                pid,
                FakeProcess {
                    identity: ProcessIdentity {
                        pid,
                        start_time: u64::from(pid) * 10,
                    },
                    control_socket: spec.control_socket.clone(),
                    guest: AdoptedState::Running,
                    exit: watch::channel(None).0,
                },
            );
            pid
        };
        let host = &self.shared.host;
        host.spawn_process(
            pid,
            format!("firecracker --api-sock {}", spec.control_socket.display()),
        );
        host.put(&spec.control_socket, Node::Socket);
        Ok(self.instance(pid).expect("just launched"))
    }

    fn instance(&self, pid: u32) -> Option<Box<dyn VmmInstance>> {
        let w = lock(&self.shared.world);
        let p = w.live.get(&pid)?;
        Some(Box::new(FakeInstance {
            shared: self.shared.clone(),
            identity: p.identity,
            exit: p.exit.subscribe(),
        }))
    }
}

#[async_trait]
impl Vmm for FakeVmm {
    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    async fn version(&self) -> Result<String, VmmError> {
        Ok(lock(&self.shared.version).clone())
    }

    async fn restore(&self, spec: &RestoreSpec) -> Result<Box<dyn VmmInstance>, VmmError> {
        self.shared.record(VmmCall::Restore(
            spec.launch.vm_id.clone(),
            spec.state.clone(),
        ));
        if self.shared.faults.hit("restore") {
            return Err(VmmError::Refused {
                request: "restore".into(),
                status: 400,
                message: "injected restore failure".into(),
            });
        }
        self.start(&spec.launch)
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn VmmInstance>, VmmError> {
        self.shared.record(VmmCall::Launch(spec.vm_id.clone()));
        if self.shared.faults.hit("launch") {
            return Err(VmmError::ExitedEarly {
                exit: VmmExit {
                    code: Some(1),
                    signal: None,
                },
                detail: "injected launch failure".into(),
            });
        }
        self.start(spec)
    }

    async fn adopt(
        &self,
        spec: &AdoptSpec,
    ) -> Result<(Box<dyn VmmInstance>, AdoptedState), VmmError> {
        let pid = spec.process.pid;
        self.shared.record(VmmCall::Adopt(spec.vm_id.clone(), pid));
        let state = {
            let w = lock(&self.shared.world);
            let alive = self.shared.host.processes().contains(&pid);
            match w.live.get(&pid) {
                Some(p)
                    if alive
                        && p.identity == spec.process
                        && p.control_socket == spec.control_socket
                        && !self.shared.faults.hit("adopt") =>
                {
                    p.guest
                }
                _ => return Err(VmmError::NotRunning),
            }
        };
        Ok((self.instance(pid).expect("live"), state))
    }
}

/// One VMM of a [`FakeVmm`].
struct FakeInstance {
    shared: Arc<VmmShared>,
    identity: ProcessIdentity,
    exit: watch::Receiver<Option<VmmExit>>,
}

impl FakeInstance {
    fn set_guest(&self, call: VmmCall, name: &str, to: AdoptedState) -> Result<(), VmmError> {
        self.shared.record(call);
        if self.shared.faults.hit(name) {
            return Err(VmmError::Refused {
                request: name.into(),
                status: 400,
                message: "injected failure".into(),
            });
        }
        match lock(&self.shared.world).live.get_mut(&self.identity.pid) {
            Some(p) => {
                p.guest = to;
                Ok(())
            }
            None => Err(VmmError::NotRunning),
        }
    }
}

#[async_trait]
impl VmmInstance for FakeInstance {
    fn pid(&self) -> Option<u32> {
        Some(self.identity.pid)
    }

    async fn guest_state(&self) -> Result<AdoptedState, VmmError> {
        lock(&self.shared.world)
            .live
            .get(&self.identity.pid)
            .map(|p| p.guest)
            .ok_or(VmmError::NotRunning)
    }

    fn identity(&self) -> Option<ProcessIdentity> {
        Some(self.identity)
    }

    async fn save_full(&self, files: &FullSnapshotFiles) -> Result<SavedMemory, VmmError> {
        let pid = self.identity.pid;
        self.shared.record(VmmCall::SaveFull(pid));
        if self.shared.faults.hit("save_full") {
            return Err(VmmError::Refused {
                request: "save_full".into(),
                status: 400,
                message: "injected failure".into(),
            });
        }
        self.shared.host.put(&files.state, Node::sparse(4096));
        self.shared.host.put(&files.memory, Node::sparse(1 << 20));
        Ok(SavedMemory::Written)
    }

    async fn pause(&self) -> Result<(), VmmError> {
        let pid = self.identity.pid;
        self.set_guest(VmmCall::Pause(pid), "pause", AdoptedState::Paused)
    }

    async fn resume(&self) -> Result<(), VmmError> {
        let pid = self.identity.pid;
        self.set_guest(VmmCall::Resume(pid), "resume", AdoptedState::Running)
    }

    async fn request_shutdown(&self) -> Result<(), VmmError> {
        let pid = self.identity.pid;
        self.shared.record(VmmCall::RequestShutdown(pid));
        if self.shared.faults.hit("request_shutdown") {
            return Err(VmmError::NotRunning);
        }
        // The guest powers off at once.
        self.shared.end(
            pid,
            VmmExit {
                code: Some(0),
                signal: None,
            },
        );
        Ok(())
    }

    async fn kill(&self) -> Result<VmmExit, VmmError> {
        let pid = self.identity.pid;
        self.shared.record(VmmCall::Kill(pid));
        let exit = VmmExit {
            code: None,
            signal: Some(9),
        };
        self.shared.end(pid, exit);
        Ok((*self.exit.borrow()).unwrap_or(exit))
    }

    fn exit_watch(&self) -> watch::Receiver<Option<VmmExit>> {
        self.exit.clone()
    }
}

/// A call to the fake network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetCall {
    /// [`HostNetwork::init`], with the TAPs kept.
    Init(Vec<String>),
    /// [`HostNetwork::setup`] of a TAP.
    Setup(String),
    /// [`HostNetwork::teardown`] of a TAP.
    Teardown(String),
}

/// Host networking as a set of TAPs that exist.
#[derive(Debug, Default)]
pub struct FakeNetwork {
    taps: Mutex<BTreeMap<String, NetLease>>,
    calls: Mutex<Vec<NetCall>>,
    /// Calls to fail: `init`, `setup`, `teardown`.
    pub faults: Faults,
}

impl FakeNetwork {
    /// No TAPs.
    pub fn new() -> Arc<FakeNetwork> {
        Arc::new(FakeNetwork::default())
    }

    /// The TAPs that exist.
    pub fn taps(&self) -> Vec<String> {
        lock(&self.taps).keys().cloned().collect()
    }

    /// The calls so far, in order.
    pub fn calls(&self) -> Vec<NetCall> {
        lock(&self.calls).clone()
    }

    fn fault(&self, name: &'static str, what: &str) -> Result<(), NetError> {
        if self.faults.hit(name) {
            return Err(NetError {
                context: format!("{name} {what}"),
                message: "injected failure".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl HostNetwork for FakeNetwork {
    async fn init(&self, _plan: &NetPlan, keep: &[NetLease]) -> Result<(), NetError> {
        let kept: Vec<String> = keep.iter().map(|l| l.tap_name.clone()).collect();
        lock(&self.calls).push(NetCall::Init(kept.clone()));
        self.fault("init", "firewall table")?;
        lock(&self.taps).retain(|t, _| kept.contains(t));
        Ok(())
    }

    async fn setup(&self, lease: &NetLease) -> Result<(), NetError> {
        lock(&self.calls).push(NetCall::Setup(lease.tap_name.clone()));
        self.fault("setup", &lease.tap_name)?;
        lock(&self.taps).insert(lease.tap_name.clone(), lease.clone());
        Ok(())
    }

    async fn teardown(&self, lease: &NetLease) -> Result<(), NetError> {
        lock(&self.calls).push(NetCall::Teardown(lease.tap_name.clone()));
        self.fault("teardown", &lease.tap_name)?;
        lock(&self.taps).remove(&lease.tap_name);
        Ok(())
    }
}

/// A call to the fake snapshot store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotCall {
    /// [`SnapshotStore::init`].
    Init,
    /// [`SnapshotStore::create`] of an id from a disk.
    Create(String, PathBuf),
    /// [`SnapshotStore::persist`].
    Persist(String),
    /// [`SnapshotStore::restore`] of an id to a path.
    Restore(String, PathBuf),
    /// [`SnapshotStore::delete`].
    Delete(String),
    /// [`SnapshotStore::begin`].
    Begin(String),
    /// [`SnapshotStore::copy_disk`].
    CopyDisk(String),
    /// [`SnapshotStore::copy_memory`] from a file.
    CopyMemory(String, PathBuf),
    /// [`SnapshotStore::seal`].
    Seal(String),
    /// [`SnapshotStore::abort`].
    Abort(String),
    /// [`SnapshotStore::open_full`] to a disk path.
    OpenFull(String, PathBuf),
}

/// Snapshots as a table; restored disks are made in the [`FakeHost`].
#[derive(Debug)]
pub struct FakeSnapshots {
    host: Arc<FakeHost>,
    snaps: Mutex<BTreeMap<String, SnapshotInfo>>,
    calls: Mutex<Vec<SnapshotCall>>,
    failpoints: Mutex<Option<Arc<Failpoints>>>,
    /// Calls to fail: `create`, `persist`, `restore`, `delete`.
    pub faults: Faults,
}

impl FakeSnapshots {
    /// An empty store whose disks live on `host`.
    pub fn new(host: Arc<FakeHost>) -> Arc<FakeSnapshots> {
        Arc::new(FakeSnapshots {
            host,
            snaps: Mutex::new(BTreeMap::new()),
            calls: Mutex::new(Vec::new()),
            failpoints: Mutex::new(None),
            faults: Faults::default(),
        })
    }

    /// The calls so far, in order.
    pub fn calls(&self) -> Vec<SnapshotCall> {
        lock(&self.calls).clone()
    }

    /// The ids of the snapshots kept.
    pub fn ids(&self) -> Vec<String> {
        lock(&self.snaps).keys().cloned().collect()
    }

    fn fault(&self, name: &'static str, id: &str) -> Result<(), SnapshotError> {
        if self.faults.hit(name) {
            return Err(SnapshotError::Io {
                context: format!("{name} snapshot {id}"),
                source: std::io::Error::other("injected failure"),
            });
        }
        Ok(())
    }

    /// A snapshot's disk copied to `dest`, which must not exist.
    fn disk_copy(&self, snapshot_id: &str, dest: &Path) -> Result<SnapshotInfo, SnapshotError> {
        let s = self.get(snapshot_id)?;
        if self.host.node(dest).is_some() {
            return Err(SnapshotError::Io {
                context: format!("cannot create {}", dest.display()),
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        self.host.put(dest, Node::sparse(s.logical_bytes));
        Ok(s)
    }

    fn source_len(&self, source: &Path) -> Result<u64, SnapshotError> {
        match self.host.node(source) {
            Some(Node::File { len, .. }) => Ok(len),
            _ => Err(SnapshotError::Io {
                context: format!("cannot read {}", source.display()),
                source: not_found(),
            }),
        }
    }

    fn point(&self, name: &'static str) -> Result<(), SnapshotError> {
        match &*lock(&self.failpoints) {
            Some(fp) if fp.hit(name) => Err(SnapshotError::Injected(name)),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl SnapshotStore for FakeSnapshots {
    async fn init(&self) -> Result<Cleanup, SnapshotError> {
        lock(&self.calls).push(SnapshotCall::Init);
        Ok(Cleanup::default())
    }

    async fn begin(&self, new: NewSnapshot) -> Result<PendingSnapshot, SnapshotError> {
        let id = new.snapshot_id.clone();
        lock(&self.calls).push(SnapshotCall::Begin(id.clone()));
        self.fault("begin", &id)?;
        if lock(&self.snaps).contains_key(&id) {
            return Err(SnapshotError::Exists(id));
        }
        let dir = PathBuf::from(format!("/tmpfs/.partial-{id}"));
        self.host.put(&dir, Node::Dir);
        Ok(PendingSnapshot {
            tier: SnapshotTier::Tmpfs,
            disk: dir.join("disk.ext4"),
            files: FullSnapshotFiles {
                state: dir.join("state"),
                memory: dir.join("memory"),
            },
            dir,
            new,
            memory_in_state: false,
        })
    }

    async fn copy_disk(&self, pending: &PendingSnapshot) -> Result<(), SnapshotError> {
        let id = &pending.new.snapshot_id;
        lock(&self.calls).push(SnapshotCall::CopyDisk(id.clone()));
        self.fault("copy_disk", id)?;
        let len = self.source_len(&pending.new.source)?;
        self.point("snapshot_store.copied")?;
        self.host.put(&pending.disk, Node::sparse(len));
        Ok(())
    }

    async fn copy_memory(
        &self,
        pending: &PendingSnapshot,
        source: &Path,
    ) -> Result<(), SnapshotError> {
        let id = &pending.new.snapshot_id;
        lock(&self.calls).push(SnapshotCall::CopyMemory(id.clone(), source.into()));
        self.fault("copy_memory", id)?;
        let len = self.source_len(source)?;
        self.host.put(&pending.files.memory, Node::sparse(len));
        Ok(())
    }

    async fn seal(&self, pending: PendingSnapshot) -> Result<SnapshotInfo, SnapshotError> {
        let id = pending.new.snapshot_id.clone();
        lock(&self.calls).push(SnapshotCall::Seal(id.clone()));
        let sealed = self.fault("seal", &id).and_then(|()| {
            self.point("snapshot_store.recorded")?;
            self.source_len(&pending.disk)
        });
        let len = match sealed {
            Ok(len) => len,
            Err(e) => {
                let _ = self.host.remove_dir_all(&pending.dir);
                return Err(e);
            }
        };
        let _ = self.host.remove_dir_all(&pending.dir);
        let new = pending.new;
        let mut full = new.full;
        if let Some(f) = full.as_mut() {
            f.state_bytes = 4096;
            f.memory_bytes = if pending.memory_in_state { 0 } else { 1 << 20 };
        }
        let info = SnapshotInfo {
            snapshot_id: id.clone(),
            vm_id: new.vm_id,
            rootfs_id: new.rootfs_id,
            backend: new.backend,
            tier: SnapshotTier::Tmpfs,
            status: SnapshotStatus::Ready,
            tmpfs_path: Some(format!("/tmpfs/{id}")),
            durable_path: None,
            logical_bytes: len,
            allocated_bytes: 0,
            sha256: "0".repeat(64),
            created_at: Utc::now(),
            persisted_at: None,
            fs_frozen: new.fs_frozen,
            kind: if full.is_some() {
                SnapshotKind::Full
            } else {
                SnapshotKind::Disk
            },
            rootfs_fingerprint: new.rootfs_fingerprint,
            full,
            mapped_by: Vec::new(),
            owner: new.owner,
        };
        lock(&self.snaps).insert(id, info.clone());
        Ok(info)
    }

    async fn abort(&self, pending: PendingSnapshot) {
        lock(&self.calls).push(SnapshotCall::Abort(pending.new.snapshot_id.clone()));
        let _ = self.host.remove_dir_all(&pending.dir);
    }

    async fn open_full(
        &self,
        snapshot_id: &str,
        disk_dest: &Path,
    ) -> Result<crate::snapshot::FullSnapshotFiles, SnapshotError> {
        lock(&self.calls).push(SnapshotCall::OpenFull(snapshot_id.into(), disk_dest.into()));
        self.fault("open_full", snapshot_id)?;
        let info = self.disk_copy(snapshot_id, disk_dest)?;
        let dir = PathBuf::from(format!("/tmpfs/{snapshot_id}"));
        let in_state = info.full.as_ref().is_some_and(|f| f.memory_bytes == 0);
        Ok(crate::snapshot::FullSnapshotFiles {
            state: dir.join("state"),
            memory: (!in_state).then(|| dir.join("memory")),
            info,
        })
    }

    async fn create(&self, new: NewSnapshot) -> Result<SnapshotInfo, SnapshotError> {
        let id = new.snapshot_id.clone();
        lock(&self.calls).push(SnapshotCall::Create(id.clone(), new.source.clone()));
        self.fault("create", &id)?;
        if lock(&self.snaps).contains_key(&id) {
            return Err(SnapshotError::Exists(id));
        }
        let len = match self.host.node(&new.source) {
            Some(Node::File { len, .. }) => len,
            _ => {
                return Err(SnapshotError::Io {
                    context: format!("cannot read {}", new.source.display()),
                    source: not_found(),
                })
            }
        };
        self.point("snapshot_store.copied")?;
        self.point("snapshot_store.recorded")?;
        let info = SnapshotInfo {
            snapshot_id: id.clone(),
            vm_id: new.vm_id,
            rootfs_id: new.rootfs_id,
            backend: new.backend,
            tier: SnapshotTier::Tmpfs,
            status: SnapshotStatus::Ready,
            tmpfs_path: Some(format!("/tmpfs/{id}.ext4")),
            durable_path: None,
            logical_bytes: len,
            allocated_bytes: 0,
            sha256: "0".repeat(64),
            created_at: Utc::now(),
            persisted_at: None,
            fs_frozen: new.fs_frozen,
            kind: SnapshotKind::Disk,
            rootfs_fingerprint: new.rootfs_fingerprint,
            full: None,
            mapped_by: Vec::new(),
            owner: new.owner,
        };
        lock(&self.snaps).insert(id, info.clone());
        Ok(info)
    }

    fn list(&self) -> Vec<SnapshotInfo> {
        lock(&self.snaps).values().cloned().collect()
    }

    fn get(&self, snapshot_id: &str) -> Result<SnapshotInfo, SnapshotError> {
        lock(&self.snaps)
            .get(snapshot_id)
            .cloned()
            .ok_or_else(|| SnapshotError::NotFound(snapshot_id.into()))
    }

    async fn persist(
        &self,
        snapshot_id: &str,
        keep_tmpfs: bool,
    ) -> Result<SnapshotInfo, SnapshotError> {
        lock(&self.calls).push(SnapshotCall::Persist(snapshot_id.into()));
        self.fault("persist", snapshot_id)?;
        self.point("persist.copied")?;
        let mut snaps = lock(&self.snaps);
        let s = snaps
            .get_mut(snapshot_id)
            .ok_or_else(|| SnapshotError::NotFound(snapshot_id.into()))?;
        if s.tier == SnapshotTier::Tmpfs {
            s.tier = SnapshotTier::Durable;
            s.durable_path = Some(format!("/durable/{snapshot_id}.ext4"));
            s.persisted_at = Some(Utc::now());
            if !keep_tmpfs {
                s.tmpfs_path = None;
            }
        }
        Ok(s.clone())
    }

    async fn restore(&self, snapshot_id: &str, dest: &Path) -> Result<SnapshotInfo, SnapshotError> {
        lock(&self.calls).push(SnapshotCall::Restore(snapshot_id.into(), dest.into()));
        self.fault("restore", snapshot_id)?;
        self.disk_copy(snapshot_id, dest)
    }

    async fn delete(&self, snapshot_id: &str) -> Result<(), SnapshotError> {
        lock(&self.calls).push(SnapshotCall::Delete(snapshot_id.into()));
        self.fault("delete", snapshot_id)?;
        lock(&self.snaps)
            .remove(snapshot_id)
            .map(|_| ())
            .ok_or_else(|| SnapshotError::NotFound(snapshot_id.into()))
    }

    fn set_failpoints(&self, failpoints: Arc<Failpoints>) {
        *lock(&self.failpoints) = Some(failpoints);
    }
}

/// A recorded [`HostCgroups`](crate::limits::HostCgroups) call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupCall {
    /// `prepare(vm_id, limits)`.
    Prepare(String, crate::limits::VmLimits),
    /// `remove(vm_id)`.
    Remove(String),
}

/// Cgroups as a set of names: `prepare` fails when `prepare` is injected,
/// `oom_killed` answers true for the VMs in `oom`.
#[derive(Debug, Default)]
pub struct FakeCgroups {
    /// The cgroups that exist.
    pub live: Mutex<std::collections::BTreeSet<String>>,
    /// The VMs whose VMM the OOM killer ended.
    pub oom: Mutex<HashSet<String>>,
    /// The calls so far.
    pub calls: Mutex<Vec<CgroupCall>>,
    /// Failures to inject: `prepare`, `remove`.
    pub faults: Faults,
}

impl FakeCgroups {
    /// The cgroups that exist, sorted.
    pub fn names(&self) -> Vec<String> {
        lock(&self.live).iter().cloned().collect()
    }
}

impl crate::limits::HostCgroups for FakeCgroups {
    fn prepare(
        &self,
        vm_id: &str,
        limits: &crate::limits::VmLimits,
        _running: Option<u32>,
    ) -> Result<crate::limits::CgroupPlacement, HostError> {
        lock(&self.calls).push(CgroupCall::Prepare(vm_id.into(), *limits));
        if self.faults.hit("prepare") {
            return Err(HostError {
                context: format!("/cg/agentenv/{vm_id}/memory.limit_in_bytes"),
                message: "injected failure".into(),
                no_space: false,
            });
        }
        lock(&self.live).insert(vm_id.into());
        let dir = format!("/cg/agentenv/{vm_id}");
        Ok(crate::limits::CgroupPlacement {
            procs: vec![PathBuf::from(&dir).join("cgroup.procs")],
            info: agentenv_api::VmLimitsInfo {
                cgroup_version: 2,
                cgroup_paths: vec![dir],
                cpu_quota_us: limits.cpu_quota_us,
                cpu_period_us: limits.cpu_period_us,
                memory_bytes: limits.memory_bytes,
                pids_max: limits.pids_max,
                io_weight: Some(limits.io_weight),
                unsupported: Vec::new(),
            },
        })
    }

    fn remove(&self, vm_id: &str) -> Result<(), HostError> {
        lock(&self.calls).push(CgroupCall::Remove(vm_id.into()));
        if self.faults.hit("remove") {
            return Err(HostError {
                context: format!("cannot remove cgroup /cg/agentenv/{vm_id}"),
                message: "injected failure".into(),
                no_space: false,
            });
        }
        lock(&self.live).remove(vm_id);
        Ok(())
    }

    fn oom_killed(&self, vm_id: &str) -> bool {
        lock(&self.oom).contains(vm_id)
    }

    fn list(&self) -> Vec<String> {
        self.names()
    }
}
