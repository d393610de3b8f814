//! `Exec`: one command in its own process group, as root or as a guest user,
//! on pipes or on a pseudo-terminal.
//!
//! Threads per command: the waiter (owns the `Child`: waits for the leader,
//! reaps it, sends `Exit`), one pump per output pipe (one for the terminal),
//! a stdin feeder when the host sends stdin (always with a terminal), and a
//! timer when there is a timeout. The process group is only signalled while
//! the leader is unreaped, so its id cannot have been reused.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use agentenv_proto::{
    ErrorCode, ErrorMsg, ExecRequest, ExitStatus, Kind, PtySize, Started, DATA_CHUNK,
};

use super::out::{Inflight, OutStream};
use super::users::{self, User};
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
    /// The terminal's master side, when the command has one (for `Resize`).
    pty: Option<OwnedFd>,
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

    /// Sends `signal` to the process group, unless the leader is already
    /// reaped. Signals outside 1..=64 are ignored.
    pub fn signal(&self, signal: i32) {
        let st = lock(&self.proc_);
        if st.reaped || !(1..=64).contains(&signal) {
            return;
        }
        let _ = sys::signal_group(self.pid, signal);
    }

    /// Resizes the command's terminal; nothing without one.
    pub fn resize(&self, size: PtySize) {
        if let Some(m) = &self.pty {
            let _ = sys::set_winsize(m.as_fd(), size.cols.max(1), size.rows.max(1));
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

/// Where the command's input goes: its stdin pipe (closed at `Eof`) or its
/// terminal (kept open: the pump reads the same terminal).
enum Input {
    Pipe(File),
    Terminal(File),
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

/// Checks a request; returns its working directory.
fn check(req: &ExecRequest, user: Option<&User>) -> Result<PathBuf, ErrorMsg> {
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
    if let Some(size) = req.pty {
        if size.cols == 0 || size.rows == 0 {
            return Err(bad("pty", "a terminal needs at least 1 column and 1 row"));
        }
    }
    let cwd = match (&req.cwd, user) {
        (Some(c), _) => {
            if user.is_none() && !c.starts_with('/') {
                return Err(bad("cwd", format!("cwd {c:?} is not an absolute path")));
            }
            users::resolve("cwd", c, user)?
        }
        // A user's home that does not exist (`nobody`'s /nonexistent) is no
        // reason to refuse a command that named no directory.
        (None, Some(u)) if Path::new(&u.home).is_dir() => PathBuf::from(&u.home),
        (None, _) => PathBuf::from("/"),
    };
    let shown = cwd.display();
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => Ok(cwd),
        Ok(_) => Err(bad("cwd", format!("cwd {shown} is not a directory"))),
        Err(e) => Err(io_error("cwd", &format!("cwd {shown}"), &e)),
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
    let user = users::acting(req.user.as_deref())?;
    let cwd = check(&req, user.as_ref())?;
    let mut cmd = Command::new(&req.cmd[0]);
    cmd.args(&req.cmd[1..])
        .env_clear()
        .envs(BASE_ENV)
        .current_dir(&cwd);
    let mut setup = sys::ChildSetup::default();
    if let Some(u) = &user {
        cmd.env("HOME", &u.home)
            .env("USER", &u.name)
            .env("LOGNAME", &u.name)
            .env("SHELL", &u.shell);
        setup.user = Some((u.groups.clone(), u.gid, u.uid));
    }
    cmd.envs(&req.env);
    // With a terminal: a new session (so also a new process group) whose
    // controlling terminal is the pty on stdin, stdout and stderr.
    let pty = match req.pty {
        Some(size) => {
            let (master, slave) = sys::openpty(size.cols, size.rows)
                .map_err(|e| io_error("pty", "open a pseudo-terminal", &e))?;
            // The user's own terminal, as login makes it (a program that
            // reopens it by name may then).
            if let Some(u) = &user {
                std::os::unix::fs::fchown(&slave, Some(u.uid), None)
                    .map_err(|e| io_error("pty", "chown the terminal", &e))?;
            }
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .map(Stdio::from)
                    .map_err(|e| io_error("pty", "duplicate the terminal", &e))
            };
            cmd.stdin(dup(&slave)?)
                .stdout(dup(&slave)?)
                .stderr(Stdio::from(slave));
            setup.terminal = true;
            Some(master)
        }
        None => {
            cmd.process_group(0)
                .stdin(if req.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
    };
    if setup.terminal || setup.user.is_some() {
        // SAFETY: `apply` makes only system calls (setsid, ioctl, setgroups,
        // setgid, setuid) on data prepared before the fork; it allocates
        // nothing and takes no lock, as a pre_exec hook must.
        unsafe {
            cmd.pre_exec(move || setup.apply());
        }
    }
    let started_at = Instant::now();
    let mut child = cmd.spawn().map_err(|e| spawn_error(&req.cmd[0], &e))?;
    // The parent's copies of the terminal's slave side go now, so the pump
    // sees the end once the command's processes have closed theirs.
    drop(cmd);
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
        pty: pty.as_ref().and_then(|m| m.try_clone().ok()),
    });
    let (pipes, input) = match pty {
        // The terminal is read as stdout; what the host sends goes to it.
        Some(master) => {
            let input = master
                .try_clone()
                .ok()
                .map(|m| Input::Terminal(File::from(m)));
            if input.is_none() {
                exec.kill(KillReason::SessionEnd);
            }
            ([Some(master), None], input)
        }
        None => (
            [
                child.stdout.take().map(OwnedFd::from),
                child.stderr.take().map(OwnedFd::from),
            ],
            child
                .stdin
                .take()
                .map(|p| Input::Pipe(File::from(OwnedFd::from(p)))),
        ),
    };

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
        if i == 1 && exec.pty.is_some() {
            // One pump reads the terminal.
            exec.pump_done();
            continue;
        }
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
    let stdin = match input {
        Some(input) => {
            let (tx, rx) = mpsc::channel();
            let inflight = Arc::new(Inflight::default());
            let (out2, inflight2) = (exec.out.clone(), inflight.clone());
            if spawn("exec-stdin", move || {
                feed_stdin(input, &rx, &out2, &inflight2)
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
/// command closed its stdin the rest is dropped (and still granted). `Eof`
/// closes a stdin pipe; a terminal stays open (its reader needs it; a
/// program reading the terminal sees the end when the host sends `^D`).
fn feed_stdin(input: Input, rx: &Receiver<StdinMsg>, out: &OutStream, inflight: &Inflight) {
    let (mut sink, is_pipe) = match input {
        Input::Pipe(f) => (Some(f), true),
        Input::Terminal(f) => (Some(f), false),
    };
    while let Ok(msg) = rx.recv() {
        match msg {
            StdinMsg::Data(b) => {
                if let Some(p) = sink.as_mut() {
                    if p.write_all(&b).is_err() {
                        sink = None;
                    }
                }
                inflight.consumed(out, b.len());
            }
            StdinMsg::Eof if is_pipe => sink = None,
            StdinMsg::Eof => {}
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
