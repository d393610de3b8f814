//! VMM processes: spawning in their own process group with their output going
//! straight to a bounded console log file, exit notification as soon as the
//! kernel reports it, killing the group, and re-adopting a VMM that an earlier
//! daemon started.
//!
//! VMMs must outlive the daemon (upgrades restart it), so nothing of theirs may
//! depend on the daemon process: their stdout/stderr is the log file itself (no
//! pipe that would break). The file is kept bounded while the VMM keeps its
//! `O_APPEND` descriptor by cutting blocks off its front
//! (`FALLOC_FL_COLLAPSE_RANGE`), or by copy-and-truncate where the file system
//! cannot do that.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentenv_core::backend::{AdoptSpec, ProcessIdentity, VmmError, VmmExit};

use crate::cgroup::{join_in_child, CgroupJoin};
use crate::jail::{JailCleanup, PreparedJail};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;

/// How often a console log's size is checked.
const LOG_CHECK: Duration = Duration::from_millis(500);

/// How to start one VMM process.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// The binary.
    pub binary: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Where stdout and stderr go.
    pub console_log: PathBuf,
    /// Rotation size of `console_log`.
    pub console_log_max_bytes: u64,
    /// Descriptors the process inherits at their numbers (the files the
    /// daemon opened for it, such as a direct disk). Close-on-exec is cleared
    /// in the child only: the daemon's other children never see them.
    pub inherit_fds: Vec<agentenv_core::host::SharedFd>,
    /// `cgroup.procs` files the process joins before it executes (its VM's
    /// cgroup, see [`crate::cgroup`]); empty: it stays in the daemon's.
    pub cgroup_procs: Vec<PathBuf>,
    /// The jail to start it in (see [`crate::jail`]); `None`: as the
    /// daemon's own child, unconfined.
    pub jail: Option<Arc<PreparedJail>>,
}

/// A VMM process: our child, or one adopted from an earlier daemon.
#[derive(Debug)]
pub struct VmmProcess {
    pid: u32,
    start_time: u64,
    exit_rx: watch::Receiver<Option<VmmExit>>,
    /// For an adopted or jailed process: a pidfd, so signals can never reach a reused pid.
    pidfd: Option<Arc<OwnedFd>>,
    /// A jailed process's jail: its staged control socket.
    jail: Option<Arc<PreparedJail>>,
    /// The jail directories to remove once the process is gone.
    cleanup: Option<JailCleanup>,
}

impl VmmProcess {
    /// Starts the process in a new process group with stdin closed and its
    /// output appended to the console log.
    pub fn spawn(spec: &SpawnSpec) -> Result<VmmProcess, VmmError> {
        VmmProcess::spawn_in(spec, None)
    }

    /// [`VmmProcess::spawn`] with the working directory `cwd` (the daemon's
    /// own when `None`): relative paths the VMM is given resolve there.
    pub fn spawn_in(spec: &SpawnSpec, cwd: Option<&Path>) -> Result<VmmProcess, VmmError> {
        if let Some(jail) = &spec.jail {
            return crate::jail::spawn::spawn_jailed(spec, jail.clone());
        }
        let open_log = || open_console_log(&spec.console_log);
        let (out, err) = (open_log()?, open_log()?);
        let mut cmd = tokio::process::Command::new(&spec.binary);
        cmd.args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .kill_on_drop(false);
        // SAFETY: umask is async-signal-safe and touches no memory; it runs
        // in the child between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(crate::private::VMM_UMASK as libc::mode_t);
                Ok(())
            });
        }
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        let fds: Vec<std::os::fd::RawFd> = spec.inherit_fds.iter().map(|f| f.raw()).collect();
        if !fds.is_empty() {
            // SAFETY: the closure runs in the child between fork and exec and
            // only calls fcntl, which is async-signal-safe, on descriptors
            // that `spec` keeps open in the parent until spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    for fd in &fds {
                        if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        // Opened before the fork: the child only writes to them.
        let join = CgroupJoin::open(&spec.cgroup_procs).map_err(|source| VmmError::Io {
            context: "cannot open the vm's cgroup".into(),
            source,
        })?;
        if !join.is_empty() {
            let fds = join.raw_fds();
            // SAFETY: the closure runs in the forked child before exec and
            // only calls `join_in_child`, which is async-signal-safe (write(2)
            // on descriptors opened above, still open in the child); `fds`
            // was allocated before the fork.
            unsafe {
                cmd.pre_exec(move || join_in_child(&fds));
            }
        }
        let mut child = cmd.spawn().map_err(|source| match join.is_empty() {
            true => VmmError::Spawn {
                binary: spec.binary.clone(),
                source,
            },
            false => VmmError::Io {
                context: format!(
                    "cannot start {} in its cgroup ({})",
                    spec.binary.display(),
                    spec.cgroup_procs
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                source,
            },
        })?;
        drop(join);
        let pid = child.id().expect("a freshly spawned child has a pid");
        // Not reaped yet, so /proc/<pid> is this process.
        let start_time = proc_start_time(pid).unwrap_or(0);
        let (tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await;
            let exit = match status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    VmmExit {
                        code: s.code(),
                        signal: s.signal(),
                    }
                }
                Err(_) => VmmExit {
                    code: None,
                    signal: None,
                },
            };
            let _ = tx.send(Some(exit));
        });
        tokio::spawn(keep_bounded(
            spec.console_log.clone(),
            spec.console_log_max_bytes,
            exit_rx.clone(),
        ));
        Ok(VmmProcess {
            pid,
            start_time,
            exit_rx,
            pidfd: None,
            jail: None,
            cleanup: None,
        })
    }

    /// A jailed child (see [`crate::jail::spawn`]): watched and reaped
    /// through its pidfd.
    pub(crate) fn from_jailed_child(
        pid: u32,
        pidfd: OwnedFd,
        jail: Arc<PreparedJail>,
        console_log: &Path,
        console_log_max_bytes: u64,
    ) -> VmmProcess {
        let start_time = proc_start_time(pid).unwrap_or(0);
        let pidfd = Arc::new(pidfd);
        let cleanup = jail.cleanup();
        let exit_rx = watch_pidfd(pidfd.clone(), true, Some(cleanup.clone()));
        tokio::spawn(keep_bounded(
            console_log.to_path_buf(),
            console_log_max_bytes,
            exit_rx.clone(),
        ));
        VmmProcess {
            pid,
            start_time,
            exit_rx,
            pidfd: Some(pidfd),
            jail: Some(jail),
            cleanup: Some(cleanup),
        }
    }

    /// Removes `cleanup` (a jail's directories) once this process is gone:
    /// for a jailed VMM started by an earlier daemon.
    pub fn with_jail_cleanup(mut self, cleanup: JailCleanup) -> VmmProcess {
        let mut exit = self.exit_rx.clone();
        let run = cleanup.clone();
        tokio::spawn(async move {
            while exit.borrow_and_update().is_none() {
                if exit.changed().await.is_err() {
                    break;
                }
            }
            run.run();
        });
        self.cleanup = Some(cleanup);
        self
    }

    /// The jail this process was started in (by this daemon).
    pub fn jail(&self) -> Option<&PreparedJail> {
        self.jail.as_deref()
    }

    /// Takes over a VMM started by an earlier daemon: `id` must still name the
    /// same process (its start time matches) and its arguments must name
    /// `marker` as its control socket ([`control_sockets`]). Its exit is then noticed through a pidfd;
    /// the exit status is unknown (it is not our child), so it reads as `None`.
    pub fn adopt(
        id: ProcessIdentity,
        marker: &Path,
        console_log: &Path,
        console_log_max_bytes: u64,
    ) -> Result<VmmProcess, VmmError> {
        let gone = |why: String| VmmError::Io {
            context: format!("vmm pid {}", id.pid),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, why),
        };
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
        // no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, id.pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(gone(format!(
                "is gone ({})",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
        let pidfd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        // With the pidfd held, checking /proc/<pid> checks the process it names.
        match proc_start_time(id.pid) {
            Some(t) if t == id.start_time => {}
            Some(_) => return Err(gone("is another process now (start time differs)".into())),
            None => return Err(gone("is gone".into())),
        }
        if proc_state(id.pid) == Some('Z') {
            return Err(gone("is gone (exited, not reaped yet)".into()));
        }
        if !has_control_socket(id.pid, marker) {
            return Err(gone(format!(
                "does not name {} as its control socket in its arguments",
                marker.display()
            )));
        }
        let exit_rx = watch_pidfd(pidfd.clone(), false, None);
        tokio::spawn(keep_bounded(
            console_log.to_path_buf(),
            console_log_max_bytes,
            exit_rx.clone(),
        ));
        Ok(VmmProcess {
            pid: id.pid,
            start_time: id.start_time,
            exit_rx,
            pidfd: Some(pidfd),
            jail: None,
            cleanup: None,
        })
    }

    /// [`VmmProcess::adopt`] for a VMM described by an [`AdoptSpec`].
    pub fn adopt_vmm(spec: &AdoptSpec) -> Result<VmmProcess, VmmError> {
        VmmProcess::adopt(
            spec.process,
            &spec.control_socket,
            &spec.console_log,
            spec.console_log_max_bytes,
        )
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What identifies this process across daemon restarts.
    pub fn identity(&self) -> ProcessIdentity {
        ProcessIdentity {
            pid: self.pid,
            start_time: self.start_time,
        }
    }

    /// Becomes `Some` once the process has exited (and, for a child, been reaped).
    pub fn exit_watch(&self) -> watch::Receiver<Option<VmmExit>> {
        self.exit_rx.clone()
    }

    /// The exit, if the process is already gone.
    pub fn exited(&self) -> Option<VmmExit> {
        *self.exit_rx.borrow()
    }

    /// Kills the whole process group with SIGKILL and waits until the process is gone.
    pub async fn kill(&self) -> VmmExit {
        if let Some(e) = self.exited() {
            return e;
        }
        match &self.pidfd {
            // A child not reaped yet (the watch is still empty) keeps its group
            // id reserved, so the group cannot be someone else's.
            None => {
                let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            }
            Some(fd) => {
                // The group goes first while its leader (named by the pidfd) is
                // alive, then the leader through the pidfd itself.
                if pidfd_alive(fd) {
                    let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
                }
                // SAFETY: pidfd_send_signal takes a valid pidfd, a signal number,
                // a null siginfo and zero flags.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    );
                }
            }
        }
        let mut rx = self.exit_rx.clone();
        let exit = loop {
            if let Some(e) = *rx.borrow_and_update() {
                break e;
            }
            if rx.changed().await.is_err() {
                break rx.borrow().unwrap_or(VmmExit {
                    code: None,
                    signal: Some(libc::SIGKILL),
                });
            }
        };
        // SIGKILL is asynchronous: the rest of the group (helpers the VMM
        // started) may take a moment to die. Wait until the group is empty, so
        // that "killed" means gone, for at most half a second.
        let group = Pid::from_raw(self.pid as i32);
        let deadline = Instant::now() + Duration::from_millis(500);
        while killpg(group, None).is_ok() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(c) = &self.cleanup {
            c.run();
        }
        exit
    }
}

/// Watches the process a pidfd names: the receiver becomes `Some` once it
/// has exited. `reap`: it is our child, reaped here (`waitid(P_PIDFD)`) for
/// its exit status; otherwise the status is unknown. `cleanup` runs after.
fn watch_pidfd(
    pidfd: Arc<OwnedFd>,
    reap: bool,
    cleanup: Option<JailCleanup>,
) -> watch::Receiver<Option<VmmExit>> {
    let (tx, exit_rx) = watch::channel(None);
    tokio::spawn(async move {
        // A pidfd becomes readable when its process exits.
        // SAFETY: the `SharedFd` owns a clone of the `Arc<OwnedFd>`, so the
        // descriptor stays open and the same for the AsyncFd's whole life.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                SharedFd(pidfd.clone()),
                tokio::io::Interest::READABLE,
            )
        };
        if let Ok(afd) = registered {
            let _ = afd.readable().await;
        } else {
            // Cannot register (should not happen): poll instead.
            while pidfd_alive(&pidfd) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let exit = if reap {
            reap_pidfd(&pidfd)
        } else {
            VmmExit {
                code: None,
                signal: None,
            }
        };
        if let Some(c) = cleanup {
            c.run();
        }
        let _ = tx.send(Some(exit));
    });
    exit_rx
}

/// Reaps the exited child a pidfd names and returns how it ended.
fn reap_pidfd(pidfd: &OwnedFd) -> VmmExit {
    // SAFETY: siginfo_t is plain data; all-zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid with P_PIDFD takes the descriptor as its id and writes
    // one siginfo_t into `info`, which lives across the call.
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED,
        )
    };
    if r != 0 {
        return VmmExit {
            code: None,
            signal: None,
        };
    }
    // SAFETY: waitid filled `info` for a child that exited (WEXITED), so its
    // status field is set.
    let status = unsafe { info.si_status() };
    match info.si_code {
        libc::CLD_EXITED => VmmExit {
            code: Some(status),
            signal: None,
        },
        _ => VmmExit {
            code: None,
            signal: Some(status),
        },
    }
}

/// Opens (creates) a console log for appending.
pub(crate) fn open_console_log(path: &Path) -> Result<std::fs::File, VmmError> {
    crate::private::file_options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| VmmError::Io {
            context: format!("cannot open console log {}", path.display()),
            source,
        })
}

/// A shared pidfd, registrable with tokio.
struct SharedFd(Arc<OwnedFd>);

impl AsRawFd for SharedFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// True while the process a pidfd names has not exited.
fn pidfd_alive(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 0
}

/// A process's state letter (`R`, `S`, `Z`, …; field 3 of /proc/<pid>/stat).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// A process's start time (clock ticks after boot, field 22 of /proc/<pid>/stat).
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A process's arguments (`/proc/<pid>/cmdline` split at its NULs), or `None`
/// when it is gone.
pub fn proc_argv(pid: u32) -> Option<Vec<Vec<u8>>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut argv: Vec<Vec<u8>> = raw.split(|&b| b == 0).map(<[u8]>::to_vec).collect();
    if raw.last() == Some(&0) {
        argv.pop();
    }
    Some(argv)
}

/// The control sockets a VMM's arguments name, as the drivers pass them:
/// Firecracker's `--api-sock PATH` (or `--api-sock=PATH`) and QEMU's
/// `-qmp unix:PATH[,opts]` (a `,,` in PATH is an escaped comma). Whole
/// argument elements are compared, never substrings of the command line: a
/// process that only mentions a socket path somewhere (an operator's
/// `socat UNIX-CONNECT:/run/x.sock`, a VMM whose socket path merely starts
/// with another's) names no control socket here.
pub fn control_sockets(argv: &[Vec<u8>]) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let path = |b: &[u8]| PathBuf::from(std::ffi::OsStr::from_bytes(b));
    let mut out = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        let a = argv[i].as_slice();
        let next = argv.get(i + 1).map(Vec::as_slice);
        if let Some(v) = a.strip_prefix(b"--api-sock=") {
            out.push(path(v));
        } else if a == b"--api-sock" {
            if let Some(v) = next {
                out.push(path(v));
                i += 1;
            }
        } else if a == b"-qmp" || a == b"--qmp" {
            if let Some(v) = next.and_then(|v| v.strip_prefix(b"unix:")) {
                out.push(path(&qemu_first_option(v)));
            }
            i += 1;
        }
        i += 1;
    }
    out
}

/// The first comma-separated part of a QEMU option value, with `,,` read as
/// one comma.
fn qemu_first_option(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b',' {
            if v.get(i + 1) == Some(&b',') {
                out.push(b',');
                i += 2;
                continue;
            }
            break;
        }
        out.push(v[i]);
        i += 1;
    }
    out
}

/// True when live process `pid`'s arguments name `socket` as its control
/// socket ([`control_sockets`]).
pub fn has_control_socket(pid: u32, socket: &Path) -> bool {
    proc_argv(pid).is_some_and(|argv| control_sockets(&argv).iter().any(|s| s == socket))
}

/// Keeps a console log under about `max` bytes while its VMM runs (see
/// [`rotate_if_over`]).
async fn keep_bounded(path: PathBuf, max: u64, mut exit: watch::Receiver<Option<VmmExit>>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOG_CHECK) => {}
            r = exit.changed() => {
                if r.is_err() || exit.borrow().is_some() {
                    let _ = rotate_if_over(&path, max);
                    return;
                }
            }
        }
        let _ = rotate_if_over(&path, max);
    }
}

/// How [`rotate_if_over`] made room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// The file was within its limit.
    NotNeeded,
    /// Whole blocks were cut off the front of the file
    /// (`FALLOC_FL_COLLAPSE_RANGE`). The kernel serializes this with the
    /// VMM's appends, so no output is lost.
    Collapsed,
    /// The file system cannot collapse a range (tmpfs, for one): the file was
    /// copied and truncated. Output the VMM writes between the copy and the
    /// truncation is lost; the window is two system calls wide.
    CopyTruncated,
}

/// Keeps `path` under about `max` bytes while a VMM appends to it, moving the
/// last `max` bytes of what is cut to `path.1`.
pub fn rotate_if_over(path: &Path, max: u64) -> Rotation {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    else {
        return Rotation::NotNeeded;
    };
    let Ok(meta) = file.metadata() else {
        return Rotation::NotNeeded;
    };
    let len = meta.len();
    if len <= max {
        return Rotation::NotNeeded;
    }
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    // A collapse must be whole blocks and end before the end of the file.
    let block = meta.blksize().max(512);
    let cut = (len - 1) / block * block;
    if cut > 0 {
        // Bytes before `cut` never change again (the VMM only appends), so
        // they can be copied out before they are cut.
        let from = cut.saturating_sub(max);
        let mut kept = vec![0; (cut - from) as usize];
        if file.read_exact_at(&mut kept, from).is_ok() {
            // SAFETY: fallocate on a descriptor we own, with plain integers.
            let r = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_COLLAPSE_RANGE,
                    0,
                    cut as libc::off_t,
                )
            };
            if r == 0 {
                let _ = crate::private::write(Path::new(&old), &kept);
                return Rotation::Collapsed;
            }
        }
    }
    // Copy what is there now and truncate at once, so the window in which an
    // append is lost is as short as it can be.
    let tail = read_tail_bytes(path, max);
    let _ = file.set_len(0);
    let _ = crate::private::write(Path::new(&old), &tail);
    Rotation::CopyTruncated
}

fn read_tail_bytes(path: &Path, max: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    buf
}

/// The last `max` bytes of a file, lossily decoded (empty when it cannot be read).
pub fn read_tail(path: &Path, max: u64) -> String {
    String::from_utf8_lossy(&read_tail_bytes(path, max)).into_owned()
}

/// Waits until `socket` exists, failing early when the process exits first.
pub async fn wait_for_socket(
    socket: &Path,
    process: &VmmProcess,
    console_log: &Path,
    timeout: Duration,
) -> Result<(), VmmError> {
    let start = Instant::now();
    let staged = process
        .jail()
        .and_then(|j| j.staged(socket).map(|s| (j, s)));
    loop {
        match staged {
            Some((jail, at)) if at.exists() => {
                return jail.publish(at, socket).map_err(|source| VmmError::Io {
                    context: format!("cannot move {} to {}", at.display(), socket.display()),
                    source,
                });
            }
            None if socket.exists() => return Ok(()),
            _ => {}
        }
        if let Some(exit) = process.exited() {
            return Err(VmmError::ExitedEarly {
                exit,
                detail: last_lines(console_log),
            });
        }
        if start.elapsed() >= timeout {
            return Err(VmmError::SocketTimeout {
                path: socket.to_path_buf(),
                timeout_ms: timeout.as_millis() as u64,
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The last few lines of a console log, for error messages.
pub fn last_lines(console_log: &Path) -> String {
    let tail = read_tail(console_log, 2048);
    let lines: Vec<&str> = tail.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(5);
    let text = lines[start..].join(" | ");
    if text.is_empty() {
        "no output".into()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether files in `dir` can have a range collapsed (ext4 and xfs can, tmpfs cannot).
    fn collapse_supported(dir: &Path) -> bool {
        let probe = dir.join("probe");
        std::fs::write(&probe, vec![b'x'; 3 * 4096 + 1]).unwrap();
        let r = rotate_if_over(&probe, 4096);
        let _ = std::fs::remove_file(&probe);
        let mut old = probe.into_os_string();
        old.push(".1");
        let _ = std::fs::remove_file(old);
        r == Rotation::Collapsed
    }

    /// The numbers of the whole `line N` lines in `text`, skipping a cut line at either end.
    fn line_numbers(text: &str) -> Vec<u64> {
        let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
        if lines.last().is_some_and(|l| !l.ends_with('\n')) {
            lines.pop();
        }
        lines
            .iter()
            .filter_map(|l| l.strip_prefix("line ")?.trim_end().parse().ok())
            .collect()
    }

    #[tokio::test]
    async fn only_the_child_given_a_descriptor_inherits_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("disk"), b"the opened file").unwrap();
        let f = std::fs::File::open(dir.path().join("disk")).unwrap();
        let fd = agentenv_core::host::SharedFd(Arc::new(OwnedFd::from(f)));
        // Renamed after the open: the child still reaches the file by its fd.
        std::fs::rename(dir.path().join("disk"), dir.path().join("moved")).unwrap();
        let n = fd.raw();
        let run = |log: &str, inherit: Vec<agentenv_core::host::SharedFd>| {
            VmmProcess::spawn(&SpawnSpec {
                binary: "/bin/sh".into(),
                args: vec![
                    "-c".into(),
                    format!("cat /proc/self/fd/{n} 2>/dev/null || echo no fd {n}").into(),
                ],
                console_log: dir.path().join(log),
                console_log_max_bytes: 4096,
                inherit_fds: inherit,
                cgroup_procs: Vec::new(),
                jail: None,
            })
            .unwrap()
        };
        for (log, inherit, want) in [
            ("given.log", vec![fd.clone()], "the opened file".to_string()),
            ("other.log", Vec::new(), format!("no fd {n}")),
        ] {
            let p = run(log, inherit);
            while p.exited().is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let out = std::fs::read_to_string(dir.path().join(log)).unwrap();
            assert_eq!(out.trim(), want, "{log}");
        }
    }

    #[tokio::test]
    async fn the_console_log_stays_bounded_while_the_vmm_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let proc = VmmProcess::spawn(&SpawnSpec {
            binary: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "i=0; while [ $i -lt 3000 ]; do echo line $i; i=$((i+1)); \
                 [ $((i % 500)) = 0 ] && sleep 0.6; done"
                    .into(),
            ],
            console_log: p.clone(),
            console_log_max_bytes: 4096,
            inherit_fds: Vec::new(),
            cgroup_procs: Vec::new(),
            jail: None,
        })
        .unwrap();
        let mut biggest = 0;
        while proc.exited().is_none() {
            biggest = biggest.max(std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let old = std::fs::metadata(dir.path().join("console.log.1"))
            .unwrap()
            .len();
        // 3000 lines are about 28 KiB, written in bursts of about 5 KiB 0.6 s
        // apart; rotation (every 0.5 s) keeps the file near the limit, even
        // when it runs late and a few bursts come in between.
        assert!(biggest < 20 * 1024, "console log reached {biggest} bytes");
        assert!(old <= 4096, "{old}");
        if collapse_supported(dir.path()) {
            // Nothing is lost, so the last line is the end of the log.
            let both = read_tail(&dir.path().join("console.log.1"), 4096) + &read_tail(&p, 4096);
            assert!(both.ends_with("line 2999\n"), "{both:?}");
        } else {
            agentenv_testkit::skip::skip(&format!(
                "the last-line check: {} cannot collapse ranges, so rotation is \
                 copy-and-truncate, which may drop a line written during it",
                dir.path().display()
            ));
        }
    }

    #[test]
    fn rotation_under_a_busy_writer_keeps_every_line() {
        let dir = tempfile::tempdir().unwrap();
        if !collapse_supported(dir.path()) {
            agentenv_testkit::skip::skip(&format!(
                "{} cannot collapse ranges",
                dir.path().display()
            ));
            return;
        }
        let p = dir.path().join("console.log");
        let old = dir.path().join("console.log.1");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap();
        // The writer goes on until the rotator has cut the file often enough.
        let enough = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = enough.clone();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let mut file = file;
            let mut i = 0u64;
            while i < 10_000 || !stop.load(std::sync::atomic::Ordering::Relaxed) {
                file.write_all(format!("line {i}\n").as_bytes()).unwrap();
                i += 1;
            }
            i
        });
        let start = Instant::now();
        let mut rotations = 0;
        loop {
            let done = writer.is_finished();
            if rotate_if_over(&p, 8192) == Rotation::Collapsed {
                rotations += 1;
                // What was cut ends where the file now starts: join them and
                // every number must follow the one before.
                let joined =
                    std::fs::read_to_string(&old).unwrap() + &std::fs::read_to_string(&p).unwrap();
                let numbers = line_numbers(&joined);
                assert!(numbers.len() > 100, "{joined:?}");
                for w in numbers.windows(2) {
                    assert_eq!(w[0] + 1, w[1], "a line was lost at rotation {rotations}");
                }
            }
            if rotations >= 20 || start.elapsed() > Duration::from_secs(30) {
                enough.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if done {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let lines = writer.join().unwrap();
        assert!(rotations >= 20, "only {rotations} rotations");
        let tail = std::fs::read_to_string(&old).unwrap() + &std::fs::read_to_string(&p).unwrap();
        assert!(tail.ends_with(&format!("line {}\n", lines - 1)));
        assert!(std::fs::metadata(&p).unwrap().len() <= 8192 + 4096);
    }

    #[test]
    fn rotation_falls_back_to_copy_and_truncate_on_tmpfs() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            agentenv_testkit::skip::skip("no /dev/shm");
            return;
        }
        let dir = tempfile::tempdir_in(shm).unwrap();
        let p = dir.path().join("console.log");
        let text: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, &text).unwrap();
        let expected = if collapse_supported(dir.path()) {
            Rotation::Collapsed
        } else {
            Rotation::CopyTruncated
        };
        assert_eq!(rotate_if_over(&p, 4096), expected);
        let kept = std::fs::read_to_string(dir.path().join("console.log.1")).unwrap()
            + &std::fs::read_to_string(&p).unwrap();
        assert!(kept.ends_with("line 1999\n"));
        assert!(kept.len() <= 4096 + 4096);
        assert_eq!(rotate_if_over(&p, 4096), Rotation::NotNeeded);
    }

    #[tokio::test]
    async fn an_adopted_process_is_watched_and_killed_through_its_pidfd() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker.sock");
        // A process that is not our child: started by a shell that exits at once.
        std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "setsid sh -c 'sleep 1000; :' --api-sock {} >/dev/null 2>&1 </dev/null &",
                marker.display()
            ))
            .status()
            .unwrap();
        // Find it by its marker, once it runs as `sh … --api-sock MARKER` (a
        // fork of the outer shell names the marker too, inside one argument,
        // until it executes).
        let mut pid = None;
        for _ in 0..250 {
            pid = crate::local::processes_mentioning(&marker)
                .into_iter()
                .find(|&p| {
                    proc_argv(p).is_some_and(|argv| control_sockets(&argv).contains(&marker))
                });
            if pid.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = pid.expect("the orphan runs");
        let start_time = proc_start_time(pid).unwrap();
        let log = dir.path().join("c.log");
        let wrong = ProcessIdentity {
            pid,
            start_time: start_time + 1,
        };
        assert!(VmmProcess::adopt(wrong, &marker, &log, 1 << 20).is_err());
        assert!(VmmProcess::adopt(
            ProcessIdentity { pid, start_time },
            Path::new("/elsewhere"),
            &log,
            1 << 20
        )
        .is_err());
        let p =
            VmmProcess::adopt(ProcessIdentity { pid, start_time }, &marker, &log, 1 << 20).unwrap();
        assert_eq!(p.identity(), ProcessIdentity { pid, start_time });
        assert!(p.exited().is_none());
        let t = Instant::now();
        let exit = p.kill().await;
        assert_eq!(
            exit,
            VmmExit {
                code: None,
                signal: None
            }
        );
        // The kill waits up to 500 ms for the group to be gone.
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        // Dead (at most a zombie waiting for its reaper).
        assert!(crate::local::processes_mentioning(&marker).is_empty());
    }

    #[test]
    fn control_sockets_are_whole_arguments_of_the_vmm_options() {
        let argv =
            |a: &[&str]| -> Vec<Vec<u8>> { a.iter().map(|s| s.as_bytes().to_vec()).collect() };
        let fc = argv(&["firecracker", "--api-sock", "/s/a.sock", "--id", "a"]);
        assert_eq!(control_sockets(&fc), [PathBuf::from("/s/a.sock")]);
        let fc_eq = argv(&["firecracker", "--api-sock=/s/a.sock"]);
        assert_eq!(control_sockets(&fc_eq), [PathBuf::from("/s/a.sock")]);
        let qemu = argv(&["qemu", "-qmp", "unix:/s/a,,b.sock,server=on,wait=off"]);
        assert_eq!(control_sockets(&qemu), [PathBuf::from("/s/a,b.sock")]);
        // VM `a.sock.b`'s VMM does not name VM `a`'s socket.
        let other = argv(&["firecracker", "--api-sock", "/s/a.sock.b.sock"]);
        assert_eq!(control_sockets(&other), [PathBuf::from("/s/a.sock.b.sock")]);
        // An operator's socat on the socket names no control socket.
        let socat = argv(&["socat", "UNIX-CONNECT:/s/a.sock", "-"]);
        assert!(control_sockets(&socat).is_empty());
        let mention = argv(&["sh", "-c", "echo --api-sock /s/a.sock", "/s/a.sock"]);
        assert!(control_sockets(&mention).is_empty());
        // A trailing option without its value names nothing.
        assert!(control_sockets(&argv(&["firecracker", "--api-sock"])).is_empty());
    }

    #[tokio::test]
    async fn exit_is_reported_and_output_captured() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.log");
        let p = VmmProcess::spawn(&SpawnSpec {
            binary: "/bin/sh".into(),
            args: vec!["-c".into(), "echo hello; echo oops >&2; exit 3".into()],
            console_log: log.clone(),
            console_log_max_bytes: 1 << 20,
            inherit_fds: Vec::new(),
            cgroup_procs: Vec::new(),
            jail: None,
        })
        .unwrap();
        let exit = agentenv_core::backend::wait_exit(p.exit_watch(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(exit.code, Some(3));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("hello") && text.contains("oops"), "{text}");
    }

    /// Pids of non-zombie processes in a process group, from /proc.
    fn live_group_members(pgid: i32) -> Vec<i32> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the parenthesised command: state, ppid, pgrp, …
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f[0] != "Z" && f[2].parse::<i32>() == Ok(pgid) {
                out.push(pid);
            }
        }
        out
    }

    #[tokio::test]
    async fn kill_takes_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let p = VmmProcess::spawn(&SpawnSpec {
            binary: "/bin/sh".into(),
            args: vec!["-c".into(), "sleep 100 & sleep 100; wait".into()],
            console_log: dir.path().join("c.log"),
            console_log_max_bytes: 1 << 20,
            inherit_fds: Vec::new(),
            cgroup_procs: Vec::new(),
            jail: None,
        })
        .unwrap();
        let pgid = p.pid() as i32;
        let exit = p.kill().await;
        assert_eq!(exit.signal, Some(libc::SIGKILL));
        // Nothing is left running in the group (zombies awaiting their reaper do not count).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(live_group_members(pgid), Vec::<i32>::new());
    }
}
