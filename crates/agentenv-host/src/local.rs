//! [`LocalHost`]: the engine's host seam on the real machine.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentenv_core::backend::ProcessIdentity;
use agentenv_core::host::{
    DiskImages, FileInfo, FileKind, HostError, HostFacts, HostFiles, HostProcesses,
    OpenBeneathError, OpenedPath, StageShareError,
};
use async_trait::async_trait;

use crate::disk::Ext4Templates;
use crate::process::{control_sockets, has_control_socket, proc_argv, proc_start_time};
use crate::runner;

/// The real host.
///
/// `LocalHost::default()` makes each overlay with `mkfs.ext4`;
/// [`LocalHost::with_templates`] clones a per-size empty ext4 template instead
/// (see [`crate::disk::Ext4Templates`]).
#[derive(Debug, Default, Clone)]
pub struct LocalHost {
    templates: Option<Arc<Ext4Templates>>,
}

impl LocalHost {
    /// A host that runs `mkfs.ext4` for every new overlay.
    pub fn new() -> LocalHost {
        LocalHost::default()
    }

    /// A host that makes new overlays by cloning ext4 templates kept in
    /// `dir` (e.g. `snapshots_root/templates`).
    pub fn with_templates(dir: impl Into<PathBuf>) -> LocalHost {
        LocalHost {
            templates: Some(Arc::new(Ext4Templates::new(dir))),
        }
    }

    /// The templates, when this host uses them.
    pub fn templates(&self) -> Option<&Ext4Templates> {
        self.templates.as_deref()
    }
}

/// How long `mkfs.ext4` may take.
const MKFS_TIMEOUT: Duration = Duration::from_secs(120);

impl HostFacts for LocalHost {
    fn memory_total_mib(&self) -> u64 {
        memory_total_mib().unwrap_or(u64::MAX)
    }

    fn entropy(&self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            // SAFETY: the pointer and length describe the unfilled tail of `buf`.
            let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), len - filled, 0) };
            if n > 0 {
                filled += n as usize;
            } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                panic!("getrandom failed: {}", std::io::Error::last_os_error());
            }
        }
        buf
    }
}

impl HostFiles for LocalHost {
    fn fingerprint(&self, path: &Path) -> Result<String, HostError> {
        file_fingerprint(path)
            .map_err(|e| HostError::io(format!("cannot fingerprint {}", path.display()), e))
    }

    fn inspect(&self, path: &Path) -> std::io::Result<FileInfo> {
        let m = std::fs::symlink_metadata(path)?;
        let ft = m.file_type();
        let kind = if ft.is_symlink() {
            FileKind::Symlink
        } else if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_file() {
            FileKind::File
        } else if ft.is_block_device() || ft.is_char_device() {
            FileKind::Device
        } else {
            FileKind::Special
        };
        Ok(FileInfo {
            kind,
            len: m.len(),
            nlink: m.nlink(),
            writable: nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).is_ok(),
        })
    }

    fn canonicalize(&self, path: &Path) -> std::io::Result<PathBuf> {
        std::fs::canonicalize(path)
    }

    fn create_dir(&self, path: &Path) -> Result<(), HostError> {
        crate::private::create_dir(path)
            .map_err(|e| HostError::io(format!("cannot create {}", path.display()), e))
    }

    fn remove_dir_all(&self, path: &Path) -> Result<(), HostError> {
        match std::fs::remove_dir_all(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(HostError::io(
                format!("cannot remove {}", path.display()),
                e,
            )),
            _ => Ok(()),
        }
    }

    fn remove_file(&self, path: &Path) -> Result<(), HostError> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(HostError::io(
                format!("cannot remove {}", path.display()),
                e,
            )),
            _ => Ok(()),
        }
    }

    fn probe_new_entry(&self, dir: &Path) -> Result<(), HostError> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let probe = dir.join(format!(".probe-{}-{n}", std::process::id()));
        crate::private::file_options()
            .write(true)
            .create_new(true)
            .open(&probe)
            .map_err(|e| {
                HostError::io(format!("cannot make a new entry in {}", dir.display()), e)
            })?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }

    fn dir_usage(&self, dir: &Path) -> Result<u64, HostError> {
        let mut total = 0u64;
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let rd = std::fs::read_dir(&d)
                .map_err(|e| HostError::io(format!("cannot list {}", d.display()), e))?;
            for e in rd {
                let e = e.map_err(|e| HostError::io(format!("cannot list {}", d.display()), e))?;
                let m = std::fs::symlink_metadata(e.path()).map_err(|err| {
                    HostError::io(format!("cannot stat {}", e.path().display()), err)
                })?;
                if m.is_dir() {
                    stack.push(e.path());
                }
                // Directories and inodes cost blocks too; count a block each.
                total += m.len().max(4096);
            }
        }
        Ok(total)
    }

    fn sync_file(&self, path: &Path) -> Result<(), HostError> {
        std::fs::File::open(path)
            .and_then(|f| f.sync_data())
            .map_err(|e| HostError::io(format!("cannot flush {}", path.display()), e))
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<(), HostError> {
        write_atomic(path, data)
            .map_err(|e| HostError::io(format!("cannot write {}", path.display()), e))
    }

    fn read(&self, path: &Path) -> Result<Vec<u8>, HostError> {
        std::fs::read(path).map_err(|e| HostError::io(format!("cannot read {}", path.display()), e))
    }

    fn list_dir(&self, path: &Path) -> Result<Vec<String>, HostError> {
        let rd = match std::fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(HostError::io(format!("cannot list {}", path.display()), e)),
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(names)
    }

    fn read_tail(&self, path: &Path, max: u64) -> String {
        crate::process::read_tail(path, max)
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<(), HostError> {
        std::fs::rename(from, to).map_err(|e| {
            HostError::io(
                format!("cannot rename {} to {}", from.display(), to.display()),
                e,
            )
        })
    }

    fn open_beneath(&self, root: &Path, rel: &Path) -> Result<OpenedPath, OpenBeneathError> {
        crate::safe_open::open_beneath(root, rel)
    }
}

#[async_trait]
impl DiskImages for LocalHost {
    async fn create_ext4_disk(&self, path: &Path, size_bytes: u64) -> Result<(), HostError> {
        let ctx = || format!("cannot create disk {}", path.display());
        if let Some(t) = &self.templates {
            match t.create_disk(path, size_bytes).await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_no_space() || path.exists() => {
                    return Err(HostError {
                        context: ctx(),
                        no_space: e.is_no_space(),
                        message: e.to_string(),
                    })
                }
                Err(e) => tracing::warn!("ext4 template unusable, running mkfs.ext4: {e}"),
            }
        }
        mkfs_ext4(path, size_bytes, None, ctx()).await
    }

    async fn create_ext4_from_dir(
        &self,
        dir: &Path,
        image: &Path,
        size_bytes: u64,
    ) -> Result<(), HostError> {
        let ctx = format!("cannot build {} from {}", image.display(), dir.display());
        mkfs_ext4(image, size_bytes, Some(dir), ctx).await
    }

    async fn stage_share(
        &self,
        dir: &OpenedPath,
        dest: &Path,
        max_bytes: u64,
    ) -> Result<u64, StageShareError> {
        let (dir, dest) = (dir.clone(), dest.to_path_buf());
        tokio::task::spawn_blocking(move || crate::safe_open::stage_share(&dir, &dest, max_bytes))
            .await
            .map_err(|e| {
                StageShareError::Host(HostError {
                    context: "share copy".into(),
                    message: e.to_string(),
                    no_space: false,
                })
            })?
    }
}

impl HostProcesses for LocalHost {
    fn kill_stale_process(&self, pid: Option<u32>, control_socket: &Path) -> bool {
        let pids: Vec<u32> = match pid {
            Some(p) if has_control_socket(p, control_socket) => vec![p],
            Some(_) => vec![],
            // No pid recorded: look for the VMM by its control socket.
            None => vmm_processes()
                .into_iter()
                .filter(|(_, s)| s == control_socket)
                .map(|(p, _)| p)
                .collect(),
        };
        let mut killed = false;
        for p in pids {
            let pid = nix::unistd::Pid::from_raw(p as i32);
            killed |= nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL)
                .or_else(|_| nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL))
                .is_ok();
        }
        killed
    }

    fn kill_recorded_process(&self, id: ProcessIdentity, control_socket: &Path) -> bool {
        proc_start_time(id.pid) == Some(id.start_time)
            && self.kill_stale_process(Some(id.pid), control_socket)
    }

    fn vmm_processes_in(&self, dir: &Path) -> Vec<(u32, PathBuf)> {
        vmm_processes()
            .into_iter()
            .filter(|(_, s)| s.parent() == Some(dir))
            .collect()
    }
}

/// Live processes (not this one, not zombies) that name a control socket in
/// their arguments ([`control_sockets`]), with each socket they name.
fn vmm_processes() -> Vec<(u32, PathBuf)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| p != std::process::id() && !is_zombie(p))
        .flat_map(|p| {
            let argv = proc_argv(p).unwrap_or_default();
            control_sockets(&argv).into_iter().map(move |s| (p, s))
        })
        .collect()
}

/// True for a zombie (it waits for its reaper and holds nothing).
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        == Some(true)
}

/// True when process `pid`'s command line contains `marker`'s bytes.
fn mentions(pid: u32, marker: &Path) -> bool {
    let m = marker.as_os_str().as_encoded_bytes();
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| !m.is_empty() && c.windows(m.len()).any(|w| w == m))
}

/// Live processes (not this one, not zombies) whose command line contains
/// `marker` (for tests and diagnostics: the daemon itself recognises VMMs by
/// their control socket only, see [`control_sockets`]).
pub fn processes_mentioning(marker: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|&p| p != std::process::id() && mentions(p, marker) && !is_zombie(p))
                .collect()
        })
        .unwrap_or_default()
}

/// Creates `image` (which must not exist) as a sparse file of `size_bytes` and
/// makes an ext4 file system in it, filled from `from_dir` when given. On
/// failure the image is removed.
async fn mkfs_ext4(
    image: &Path,
    size_bytes: u64,
    from_dir: Option<&Path>,
    ctx: String,
) -> Result<(), HostError> {
    let f = crate::private::file_options()
        .write(true)
        .create_new(true)
        .open(image)
        .map_err(|e| HostError::io(ctx.clone(), e))?;
    let sized = f.set_len(size_bytes);
    drop(f);
    if let Err(e) = sized {
        let _ = std::fs::remove_file(image);
        return Err(HostError::io(ctx, e));
    }
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "-q".as_ref(),
        "-F".as_ref(),
        "-E".as_ref(),
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard".as_ref(),
    ];
    if let Some(dir) = from_dir {
        args.extend(["-d".as_ref(), dir.as_os_str()]);
    }
    args.push(image.as_os_str());
    runner::run("mkfs.ext4", args, MKFS_TIMEOUT)
        .await
        .map_err(|e| {
            let _ = std::fs::remove_file(image);
            let msg = e.to_string();
            HostError {
                context: ctx,
                no_space: msg.contains("No space left") || msg.contains("Could not allocate"),
                message: msg,
            }
        })?;
    Ok(())
}

/// Temp file in the same directory, fsync, rename over the target, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = crate::private::file_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `MemTotal` from `/proc/meminfo`, in MiB.
pub fn memory_total_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// How much of each end of a file [`file_fingerprint`] reads.
const FINGERPRINT_EDGE: u64 = 64 * 1024;

/// `fp1:` + SHA-256 of a file's size, modification time (ns) and its first
/// and last 64 KiB: it changes when the file is rewritten, replaced, cut or
/// grown, and costs two small reads whatever the file's size.
pub fn file_fingerprint(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let m = f.metadata()?;
    let len = m.len();
    let mtime_ns = (m.mtime() as i128) * 1_000_000_000 + m.mtime_nsec() as i128;
    let mut h = Sha256::new();
    h.update(b"agentenv fingerprint v1\0");
    h.update(len.to_le_bytes());
    h.update(mtime_ns.to_le_bytes());
    let mut buf = vec![0u8; FINGERPRINT_EDGE.min(len) as usize];
    f.read_exact_at(&mut buf, 0)?;
    h.update(&buf);
    let tail = len.saturating_sub(FINGERPRINT_EDGE).max(buf.len() as u64);
    let mut buf = vec![0u8; (len - tail) as usize];
    f.read_exact_at(&mut buf, tail)?;
    h.update(&buf);
    let d = h.finalize();
    Ok(format!(
        "fp1:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A detached `sh` whose arguments are `args` (it sleeps until killed).
    fn sleeper(args: &str) -> u32 {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "setsid sh -c 'sleep 1000; :' {args} >/dev/null 2>&1 </dev/null & echo $!"
            ))
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits until the sleeper `pid` runs with its arguments and its
    /// `sleep` child has exec'ed: between its fork and exec that child still
    /// carries the shell's arguments, and would be found as a second process
    /// with them.
    fn wait_argv(pid: u32) {
        for _ in 0..500 {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            let sleeping = children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .any(|c| {
                    proc_argv(c)
                        .is_some_and(|a| a.first().is_some_and(|a0| a0.as_slice() == b"sleep"))
                });
            if proc_argv(pid).is_some_and(|a| a.len() > 3) && sleeping {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("process {pid} did not start");
    }

    #[test]
    fn stale_vmm_cleanup_matches_whole_control_socket_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        // VM `a.sock.b`'s VMM, and an operator's socat on VM `a`'s socket.
        let other_vm = sleeper(&format!("--api-sock {d}/a.sock.b.sock"));
        let socat = sleeper(&format!("UNIX-CONNECT:{d}/a.sock -"));
        wait_argv(other_vm);
        wait_argv(socat);
        let host = LocalHost::new();
        let a = dir.path().join("a.sock");
        assert!(!host.kill_stale_process(None, &a), "nothing is VM a's vmm");
        assert!(!host.kill_stale_process(Some(socat), &a));
        assert!(!host.kill_stale_process(Some(other_vm), &a));
        let found = host.vmm_processes_in(dir.path());
        assert_eq!(found, vec![(other_vm, dir.path().join("a.sock.b.sock"))]);
        // A wrong start time protects a recorded pid.
        let t = proc_start_time(other_vm).unwrap();
        let sock_b = dir.path().join("a.sock.b.sock");
        let wrong = ProcessIdentity {
            pid: other_vm,
            start_time: t + 1,
        };
        assert!(!host.kill_recorded_process(wrong, &sock_b));
        assert!(std::path::Path::new(&format!("/proc/{socat}")).exists());
        assert!(has_control_socket(other_vm, &sock_b));
        let right = ProcessIdentity {
            pid: other_vm,
            start_time: t,
        };
        assert!(host.kill_recorded_process(right, &sock_b));
        // The operator's process is no VMM: only an explicit kill ends it.
        assert!(!is_zombie(socat) && proc_argv(socat).is_some());
        nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(socat as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn inspect_tells_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let l = dir.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        let h = LocalHost::default();
        assert_eq!(h.inspect(&f).unwrap().kind, FileKind::File);
        assert_eq!(h.inspect(&l).unwrap().kind, FileKind::Symlink);
        assert_eq!(h.inspect(dir.path()).unwrap().kind, FileKind::Dir);
        assert_eq!(
            h.inspect(Path::new("/dev/null")).unwrap().kind,
            FileKind::Device
        );
        std::fs::hard_link(&f, dir.path().join("h")).unwrap();
        assert_eq!(h.inspect(&f).unwrap().nlink, 2);
    }

    #[test]
    fn meminfo_is_read() {
        assert!(memory_total_mib().unwrap() > 0);
    }

    #[tokio::test]
    async fn ext4_disk_is_sparse() {
        if which("mkfs.ext4").is_none() {
            agentenv_testkit::skip::skip("mkfs.ext4 not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.ext4");
        LocalHost::default()
            .create_ext4_disk(&p, 4 << 30)
            .await
            .unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 4 << 30);
        assert!(
            m.blocks() * 512 < 256 << 20,
            "allocated {}",
            m.blocks() * 512
        );
        // A second create of the same path refuses to overwrite.
        assert!(LocalHost::default()
            .create_ext4_disk(&p, 1 << 30)
            .await
            .is_err());
    }

    fn which(p: &str) -> Option<PathBuf> {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(p))
                .find(|c| c.exists())
        })
    }
}
