//! VMM processes: spawning in their own process group, a bounded console log,
//! exit notification as soon as the kernel reports it, and killing the group.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use agentenv_core::backend::{VmmError, VmmExit};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

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
}

/// A spawned VMM process, reaped by a background task.
#[derive(Debug)]
pub struct VmmProcess {
    pid: u32,
    exit_rx: watch::Receiver<Option<VmmExit>>,
}

impl VmmProcess {
    /// Starts the process in a new process group with stdin closed and its output
    /// captured into the bounded console log.
    pub fn spawn(spec: &SpawnSpec) -> Result<VmmProcess, VmmError> {
        let log =
            BoundedLog::open(&spec.console_log, spec.console_log_max_bytes).map_err(|source| {
                VmmError::Io {
                    context: format!("cannot open console log {}", spec.console_log.display()),
                    source,
                }
            })?;
        // stdout and stderr share one pipe, so the log keeps their order and each
        // VM costs one reader task and one buffer.
        let io_err = |context: &str, source| VmmError::Io {
            context: format!("{context} for {}", spec.binary.display()),
            source,
        };
        let (writer, reader) =
            tokio::net::unix::pipe::pipe().map_err(|e| io_err("cannot make the output pipe", e))?;
        let writer = writer
            .into_blocking_fd()
            .map_err(|e| io_err("cannot make the output pipe", e))?;
        let writer2 = writer
            .try_clone()
            .map_err(|e| io_err("cannot make the output pipe", e))?;
        let mut cmd = tokio::process::Command::new(&spec.binary);
        cmd.args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(writer))
            .stderr(Stdio::from(writer2))
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|source| VmmError::Spawn {
            binary: spec.binary.clone(),
            source,
        })?;
        // Our copies of the write end go with `cmd`, so the reader sees EOF once
        // the process (and anything it left holding the pipe) is gone.
        drop(cmd);
        let pid = child.id().expect("a freshly spawned child has a pid");
        let out_task = tokio::spawn(copy_into(reader, log));
        let (tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await;
            // Let the reader drain what the process wrote before it died, but do not
            // wait forever on a pipe some leftover grandchild still holds.
            let _ = tokio::time::timeout(Duration::from_millis(500), out_task).await;
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
        Ok(VmmProcess { pid, exit_rx })
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Becomes `Some` once the process has exited and been reaped.
    pub fn exit_watch(&self) -> watch::Receiver<Option<VmmExit>> {
        self.exit_rx.clone()
    }

    /// The exit, if the process is already gone.
    pub fn exited(&self) -> Option<VmmExit> {
        *self.exit_rx.borrow()
    }

    /// Kills the whole process group with SIGKILL and waits until the process is reaped.
    pub async fn kill(&self) -> VmmExit {
        if let Some(e) = self.exited() {
            return e;
        }
        // The group leader is not reaped yet (the watch is still empty), so the
        // group id cannot have been reused.
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        let mut rx = self.exit_rx.clone();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                return rx.borrow().unwrap_or(VmmExit {
                    code: None,
                    signal: Some(libc::SIGKILL),
                });
            }
        }
    }
}

async fn copy_into<R: tokio::io::AsyncRead + Unpin>(mut r: R, mut log: BoundedLog) {
    // Small: one of these lives per VM for the VM's whole life.
    let mut buf = [0u8; 2048];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => log.write(&buf[..n]),
        }
    }
}

/// An append-only log file rotated to `NAME.1` when it reaches its limit, so at
/// most about twice the limit is ever kept on disk.
#[derive(Debug)]
pub struct BoundedLog {
    path: PathBuf,
    file: Option<std::fs::File>,
    size: u64,
    max: u64,
}

impl BoundedLog {
    /// Opens (appending) or creates the log.
    pub fn open(path: &Path, max: u64) -> std::io::Result<BoundedLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(BoundedLog {
            path: path.to_path_buf(),
            file: Some(file),
            size,
            max,
        })
    }

    /// Appends, rotating first when the write would pass the limit. Write errors
    /// (a full disk) drop the output rather than stall the VMM.
    pub fn write(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.size >= self.max {
                self.rotate();
            }
            let room = (self.max - self.size.min(self.max)).max(1) as usize;
            let n = room.min(data.len());
            if let Some(f) = self.file.as_mut() {
                if f.write_all(&data[..n]).is_err() {
                    return;
                }
            } else {
                return;
            }
            self.size += n as u64;
            data = &data[n..];
        }
    }

    fn rotate(&mut self) {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        let _ = std::fs::rename(&self.path, &old);
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .ok();
        self.size = 0;
    }
}

/// The last `max` bytes of a file, lossily decoded (empty when it cannot be read).
pub fn read_tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Waits until `socket` exists, failing early when the process exits first.
pub async fn wait_for_socket(
    socket: &Path,
    process: &VmmProcess,
    console_log: &Path,
    timeout: Duration,
) -> Result<(), VmmError> {
    let start = Instant::now();
    loop {
        if socket.exists() {
            return Ok(());
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

    #[test]
    fn bounded_log_rotates_and_keeps_at_most_twice_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let mut log = BoundedLog::open(&p, 4096).unwrap();
        for i in 0..1000 {
            log.write(format!("line {i:05}\n").as_bytes());
        }
        let cur = std::fs::metadata(&p).unwrap().len();
        let old = std::fs::metadata(dir.path().join("console.log.1"))
            .unwrap()
            .len();
        assert!(cur <= 4096 && old <= 4096, "{cur} {old}");
        assert!(read_tail(&p, 100).ends_with("line 00999\n"));
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
