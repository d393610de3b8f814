//! `Exec`: one command in its own process group.
//!
//! Threads per command: the waiter (owns the `Child`: waits for the leader,
//! reaps it, sends `Exit`), one pump per output pipe, a stdin feeder when the
//! host sends stdin, and a timer when there is a timeout. The process group
//! is only signalled while the leader is unreaped, so its id cannot have been
//! reused.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use agentenv_proto::{ErrorCode, ErrorMsg, ExecRequest, ExitStatus, Kind, Started, DATA_CHUNK};

use super::out::{Inflight, OutStream};
use super::{io_error, lock, spawn, sys};

/// The environment every command starts from (the request's `env` goes on top).
pub const BASE_ENV: [(&str, &str); 3] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
];

/// How long output pipes may stay open after the leader exited (a background
/// process can hold them) before the pumps stop waiting for more.
const PIPE_GRACE: Duration = Duration::from_secs(1);

/// After [`PIPE_GRACE`], a pump still drains what is already in its pipe, up to this much.
const DRAIN_LIMIT: u64 = 4 * 1024 * 1024;

/// Why the process group gets SIGKILL.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    /// The host sent `Kill`.
    Killed,
    /// `timeout_ms` passed.
    TimedOut,
    /// The session ended.
    SessionEnd,
}

#[derive(Default)]
struct ProcState {
    reaped: bool,
    killed: bool,
    timed_out: bool,
}

#[derive(Default)]
struct Output {
    bytes: AtomicU64,
    truncated: AtomicBool,
}

/// A running command.
pub struct Exec {
    pid: u32,
    out: Arc<OutStream>,
    max_output: u64,
    proc_: Mutex<ProcState>,
    /// The leader has been reaped (wakes the timer).
    exited: Mutex<bool>,
    exited_cv: Condvar,
    /// Pumps still running.
    pumps: Mutex<u32>,
    pumps_cv: Condvar,
    stdout: Output,
    stderr: Output,
}

impl Exec {
    /// Kills the process group, unless the leader is already reaped.
    pub fn kill(&self, why: KillReason) {
        let mut st = lock(&self.proc_);
        if st.reaped {
            return;
        }
        let _ = sys::killpg(self.pid);
        match why {
            KillReason::Killed => st.killed = true,
            KillReason::TimedOut => st.timed_out = true,
            KillReason::SessionEnd => {}
        }
    }

    fn pump_done(&self) {
        *lock(&self.pumps) -= 1;
        self.pumps_cv.notify_all();
    }
}

/// What the stdin feeder receives.
pub enum StdinMsg {
    /// Bytes to write.
    Data(Vec<u8>),
    /// Close stdin.
    Eof,
}

/// The session's handle on a command.
#[derive(Clone)]
pub struct ExecHandle {
    /// The command.
    pub exec: Arc<Exec>,
    stdin: Option<(Sender<StdinMsg>, Arc<Inflight>)>,
}

impl ExecHandle {
    /// Passes a `Data`/`Eof` frame to the command's stdin. False if the host
    /// overran its window. Ignored when the command takes no stdin.
    pub fn stdin(&self, payload: Vec<u8>, eof: bool) -> bool {
        let Some((tx, inflight)) = &self.stdin else {
            return true;
        };
        if eof {
            let _ = tx.send(StdinMsg::Eof);
            return true;
        }
        if payload.is_empty() {
            return true;
        }
        if !inflight.receive(payload.len()) {
            return false;
        }
        let _ = tx.send(StdinMsg::Data(payload));
        true
    }
}

fn bad(field: &str, msg: impl Into<String>) -> ErrorMsg {
    ErrorMsg::new(ErrorCode::BadRequest, Some(field), msg)
}

fn check(req: &ExecRequest) -> Result<String, ErrorMsg> {
    if req.cmd.is_empty() || req.cmd[0].is_empty() {
        return Err(bad("cmd", "cmd is empty"));
    }
    if req.cmd.iter().any(|a| a.contains('\0')) {
        return Err(bad("cmd", "cmd contains a NUL byte"));
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(bad(
                "env",
                format!("bad environment variable name or value {k:?}"),
            ));
        }
    }
    let cwd = req.cwd.clone().unwrap_or_else(|| "/".to_string());
    if !cwd.starts_with('/') || cwd.contains('\0') {
        return Err(bad("cwd", format!("cwd {cwd:?} is not an absolute path")));
    }
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => Ok(cwd),
        Ok(_) => Err(bad("cwd", format!("cwd {cwd} is not a directory"))),
        Err(e) => Err(io_error("cwd", &format!("cwd {cwd}"), &e)),
    }
}

fn spawn_error(program: &str, e: &io::Error) -> ErrorMsg {
    let code = match e.kind() {
        io::ErrorKind::NotFound => ErrorCode::NotFound,
        io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        _ => ErrorCode::Io,
    };
    let msg = if code == ErrorCode::NotFound && !program.contains('/') {
        format!("program {program} not found in PATH")
    } else {
        format!("program {program}: {e}")
    };
    ErrorMsg::new(code, Some("cmd"), msg)
}

/// Starts a command: sends `Started`, then runs it on its own threads, which
/// end the stream with `Exit`.
pub fn start(req: ExecRequest, out: Arc<OutStream>) -> Result<ExecHandle, ErrorMsg> {
    let cwd = check(&req)?;
    let mut cmd = Command::new(&req.cmd[0]);
    cmd.args(&req.cmd[1..])
        .env_clear()
        .envs(BASE_ENV)
        .envs(&req.env)
        .current_dir(Path::new(&cwd))
        .process_group(0)
        .stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started_at = Instant::now();
    let mut child = cmd.spawn().map_err(|e| spawn_error(&req.cmd[0], &e))?;
    let pid = child.id();
    out.send_json(Kind::Started, &Started { pid });

    let exec = Arc::new(Exec {
        pid,
        out,
        max_output: req.max_output.unwrap_or(u64::MAX),
        proc_: Mutex::new(ProcState::default()),
        exited: Mutex::new(false),
        exited_cv: Condvar::new(),
        pumps: Mutex::new(2),
        pumps_cv: Condvar::new(),
        stdout: Output::default(),
        stderr: Output::default(),
    });
    let pipes = [
        child.stdout.take().map(OwnedFd::from),
        child.stderr.take().map(OwnedFd::from),
    ];
    let stdin = child.stdin.take();

    // A failure from here on (no thread for a pump, no wake pipe) kills the
    // command; the waiter still reaps it and reports how it ended.
    let (wake_r, wake_w) = match sys::pipe() {
        Ok((r, w)) => (Some(Arc::new(r)), Some(w)),
        Err(_) => {
            exec.kill(KillReason::SessionEnd);
            (None, None)
        }
    };
    {
        let exec2 = exec.clone();
        let run = move || wait_leader(&exec2, child, wake_w, started_at);
        if let Err(e) = spawn("exec-wait", run) {
            // No waiter (the closure and its `Child` are gone): kill and reap here.
            exec.kill(KillReason::SessionEnd);
            sys::reap(pid);
            return Err(io_error("cmd", "start a thread", &e));
        }
    }
    for (i, pipe) in pipes.into_iter().enumerate() {
        let kind = if i == 0 { Kind::Stdout } else { Kind::Stderr };
        let started = match (pipe, wake_r.clone()) {
            (Some(fd), Some(wake)) => {
                let exec2 = exec.clone();
                spawn("exec-pump", move || pump(&exec2, fd, &wake, kind)).is_ok()
            }
            _ => false,
        };
        if !started {
            exec.kill(KillReason::SessionEnd);
            exec.pump_done();
        }
    }
    if let Some(ms) = req.timeout_ms {
        let exec2 = exec.clone();
        if spawn("exec-timer", move || {
            timer(&exec2, Duration::from_millis(ms))
        })
        .is_err()
        {
            exec.kill(KillReason::TimedOut);
        }
    }
    let stdin = match stdin {
        Some(pipe) => {
            let (tx, rx) = mpsc::channel();
            let inflight = Arc::new(Inflight::default());
            let (out2, inflight2) = (exec.out.clone(), inflight.clone());
            if spawn("exec-stdin", move || {
                feed_stdin(pipe, &rx, &out2, &inflight2)
            })
            .is_err()
            {
                exec.kill(KillReason::SessionEnd);
            }
            Some((tx, inflight))
        }
        None => None,
    };
    Ok(ExecHandle { exec, stdin })
}

/// Waits for the leader, reaps it, lets the pumps finish, sends `Exit`.
fn wait_leader(exec: &Exec, mut child: Child, wake_w: Option<OwnedFd>, started_at: Instant) {
    let _ = sys::wait_exited(exec.pid);
    lock(&exec.proc_).reaped = true;
    let status = child.wait();
    let duration = started_at.elapsed();
    *lock(&exec.exited) = true;
    exec.exited_cv.notify_all();

    // Output may still be in the pipes, or a background process may hold
    // them open: wait for EOF a little, then have the pumps drain and stop.
    {
        let n = lock(&exec.pumps);
        let (n, _) = exec
            .pumps_cv
            .wait_timeout_while(n, PIPE_GRACE, |n| *n > 0)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        drop(n);
        drop(wake_w);
        let n = lock(&exec.pumps);
        let _n = exec
            .pumps_cv
            .wait_while(n, |n| *n > 0)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }

    let st = lock(&exec.proc_);
    let (exit_code, signal) = match status {
        Ok(s) => (s.code(), s.signal()),
        Err(_) => (None, None),
    };
    let msg = ExitStatus {
        exit_code,
        signal,
        timed_out: st.timed_out,
        killed: st.killed,
        duration_ms: duration.as_millis() as u64,
        stdout_bytes: exec.stdout.bytes.load(Ordering::SeqCst),
        stderr_bytes: exec.stderr.bytes.load(Ordering::SeqCst),
        stdout_truncated: exec.stdout.truncated.load(Ordering::SeqCst),
        stderr_truncated: exec.stderr.truncated.load(Ordering::SeqCst),
    };
    drop(st);
    exec.out.finish(Kind::Exit, &msg);
}

/// Copies one output pipe to the host within credit, up to `max_output`.
/// When `wake` becomes readable (its write end closed: the grace after the
/// leader's exit is over) it drains what the pipe holds and stops.
fn pump(exec: &Exec, fd: OwnedFd, wake: &OwnedFd, kind: Kind) {
    let output = if kind == Kind::Stdout {
        &exec.stdout
    } else {
        &exec.stderr
    };
    let mut pipe = File::from(fd);
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut sent = 0u64;
    let mut draining = false;
    let mut drained = 0u64;
    loop {
        let ready = if draining {
            sys::poll2(pipe.as_fd(), None, 0)
        } else {
            sys::poll2(pipe.as_fd(), Some(wake.as_fd()), -1)
        };
        match ready {
            Ok(r) if r.a => {}
            Ok(r) if r.b => {
                draining = true;
                continue;
            }
            Ok(_) if draining => break,
            Ok(_) => continue,
            Err(_) => break,
        }
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        output.bytes.fetch_add(n as u64, Ordering::SeqCst);
        let room = exec.max_output.saturating_sub(sent);
        let k = (n as u64).min(room) as usize;
        if k < n {
            output.truncated.store(true, Ordering::SeqCst);
        }
        sent += k as u64;
        if k > 0 && !exec.out.send_data(kind, &buf[..k]) {
            break;
        }
        if draining {
            drained += n as u64;
            if drained >= DRAIN_LIMIT {
                break;
            }
        }
    }
    exec.pump_done();
}

/// Writes the host's stdin bytes; grants them back once written. After the
/// command closed its stdin the rest is dropped (and still granted).
fn feed_stdin(pipe: ChildStdin, rx: &Receiver<StdinMsg>, out: &OutStream, inflight: &Inflight) {
    let mut pipe = Some(pipe);
    while let Ok(msg) = rx.recv() {
        match msg {
            StdinMsg::Data(b) => {
                if let Some(p) = pipe.as_mut() {
                    if p.write_all(&b).is_err() {
                        pipe = None;
                    }
                }
                inflight.consumed(out, b.len());
            }
            StdinMsg::Eof => pipe = None,
        }
    }
}

fn timer(exec: &Exec, after: Duration) {
    let exited = lock(&exec.exited);
    let (exited, _) = exec
        .exited_cv
        .wait_timeout_while(exited, after, |e| !*e)
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !*exited {
        drop(exited);
        exec.kill(KillReason::TimedOut);
    }
}
