//! `process.Process`: commands in a sandbox, as envd runs them.
//!
//! A process started by `Start` belongs to the daemon, not to the request:
//! it sits in the sandbox's process table and one task drains its output
//! from the guest agent and fans it out to whoever is subscribed right now
//! (the `Start` stream, `Connect` streams). A client that goes away only
//! unsubscribes; the process runs on until it ends, is killed, reaches its
//! `Connect-Timeout-Ms` lifetime (then the stream ends `deadline_exceeded`)
//! or the sandbox goes ([`Table::forget`]: streams end `unavailable`).
//! Each subscriber has a bounded queue; one that falls behind is dropped
//! (its stream ends `resource_exhausted`), never the process, never memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentenv_core::agent::{Exec, ExecControl, ExecEvent};
use agentenv_proto::{ExitStatus, PtySize};
use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::connect::{self, Shape};
use super::{deadline_error, engine_error, run_stream, unary, Call, Step, Timers};
use crate::server::e2b::error::{Code, ConnectError};

/// Messages a subscriber may have queued before it counts as fallen behind.
const SUBSCRIBER_QUEUE: usize = 64;

/// Streams one process may feed at once (its `Start` and `Connect`s).
const MAX_SUBSCRIBERS: usize = 64;

/// Processes one sandbox may have at once.
const MAX_PROCESSES: usize = 1024;

/// `PATH` of every process (envd's).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a killed process's exit is waited for before its streams end anyway.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// The signals `SendSignal` takes (`process.Signal`).
const SIGNALS: &[(&str, i64)] = &[
    ("SIGNAL_UNSPECIFIED", 0),
    ("SIGNAL_SIGTERM", 15),
    ("SIGNAL_SIGKILL", 9),
];

/// The processes of every sandbox.
#[derive(Default)]
pub struct Table {
    sandboxes: Mutex<HashMap<String, HashMap<u32, Arc<Proc>>>>,
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<u32, Arc<Proc>>>> {
        self.sandboxes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The process `pid` (or tagged `tag`) of `sandbox`.
    fn find(&self, sandbox: &str, sel: &Selector) -> Option<Arc<Proc>> {
        let map = self.lock();
        let procs = map.get(sandbox)?;
        match sel {
            Selector::Pid(pid) => procs.get(pid).cloned(),
            Selector::Tag(tag) => procs
                .values()
                .find(|p| p.tag.as_deref() == Some(tag.as_str()))
                .cloned(),
        }
    }

    fn list(&self, sandbox: &str) -> Vec<Arc<Proc>> {
        let mut v: Vec<_> = self
            .lock()
            .get(sandbox)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by_key(|p| p.pid);
        v
    }

    fn remove(&self, sandbox: &str, proc: &Arc<Proc>) {
        let mut map = self.lock();
        if let Some(procs) = map.get_mut(sandbox) {
            if procs.get(&proc.pid).is_some_and(|p| Arc::ptr_eq(p, proc)) {
                procs.remove(&proc.pid);
            }
            if procs.is_empty() {
                map.remove(sandbox);
            }
        }
    }

    /// Ends every process stream of `sandbox` with `unavailable` and lets go
    /// of its processes (the sandbox was killed or paused).
    pub fn forget(&self, sandbox: &str) {
        let procs = self.lock().remove(sandbox).unwrap_or_default();
        for p in procs.into_values() {
            let _ = p.cmds.send(Cmd::Forget);
        }
    }
}

/// What a process's drain task is asked to do.
enum Cmd {
    /// SIGKILL to its process group.
    Kill(oneshot::Sender<Result<(), ConnectError>>),
    /// The sandbox is gone: end every stream with `unavailable`.
    Forget,
}

/// How a process's streams end.
#[derive(Clone)]
enum Terminal {
    /// The `end` event (a message), then a clean end of stream.
    End(Value),
    /// An end-stream error.
    Error(ConnectError),
}

/// What a subscriber receives.
enum Out {
    /// A message (data).
    Msg(Value),
    /// The last thing.
    Done(Terminal),
}

struct Sub {
    tx: mpsc::Sender<Out>,
    lagged: Arc<AtomicBool>,
}

/// One process of the table.
struct Proc {
    pid: u32,
    tag: Option<String>,
    /// `ProcessConfig` as `List` shows it.
    config: Value,
    pty: bool,
    subs: Mutex<Vec<Sub>>,
    cmds: mpsc::UnboundedSender<Cmd>,
    /// Input, signals and resizes, while the drain task pulls the output.
    control: ExecControl,
}

/// A subscription to a process's output.
struct Subscription {
    rx: mpsc::Receiver<Out>,
    lagged: Arc<AtomicBool>,
}

impl Proc {
    fn subs(&self) -> std::sync::MutexGuard<'_, Vec<Sub>> {
        self.subs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn subscribe(&self) -> Result<Subscription, ConnectError> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let lagged = Arc::new(AtomicBool::new(false));
        let mut subs = self.subs();
        subs.retain(|s| !s.tx.is_closed());
        if subs.len() >= MAX_SUBSCRIBERS {
            return Err(ConnectError::new(
                Code::ResourceExhausted,
                format!(
                    "process {} already feeds {MAX_SUBSCRIBERS} streams",
                    self.pid
                ),
            ));
        }
        subs.push(Sub {
            tx,
            lagged: lagged.clone(),
        });
        Ok(Subscription { rx, lagged })
    }

    /// Hands `msg` to every subscriber that has room; drops those that do
    /// not (and those that went away).
    fn fan_out(&self, msg: Value) {
        self.subs()
            .retain(|s| match s.tx.try_send(Out::Msg(msg.clone())) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.lagged.store(true, Ordering::SeqCst);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
    }

    /// Ends every subscription with `t`.
    fn finish(&self, t: Terminal) {
        for s in self.subs().drain(..) {
            if s.tx.try_send(Out::Done(t.clone())).is_err() {
                s.lagged.store(true, Ordering::SeqCst);
            }
        }
    }

    fn info(&self) -> Value {
        let mut v = json!({ "config": self.config, "pid": self.pid });
        if let Some(t) = &self.tag {
            v["tag"] = json!(t);
        }
        v
    }
}

/// `ProcessSelector`: `{"pid":N}` or `{"tag":"t"}`.
enum Selector {
    Pid(u32),
    Tag(String),
}

fn selector(msg: &Value) -> Result<Selector, ConnectError> {
    let Some(sel) = connect::message(msg, "process")? else {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            "process: the process selector (pid or tag) is missing",
        ));
    };
    if connect::field(sel, "pid").is_some() {
        return Ok(Selector::Pid(
            connect::uint(sel, "pid", u32::MAX as u64)? as u32
        ));
    }
    match connect::opt_string(sel, "tag")? {
        Some(t) => Ok(Selector::Tag(t)),
        None => Err(ConnectError::new(
            Code::InvalidArgument,
            "process: give pid or tag",
        )),
    }
}

fn not_found(sel: &Selector) -> ConnectError {
    let what = match sel {
        Selector::Pid(p) => format!("process with pid {p}"),
        Selector::Tag(t) => format!("process with tag {t:?}"),
    };
    ConnectError::new(Code::NotFound, format!("{what} not found"))
}

/// Serves `process.Process/<method>`.
pub async fn serve(call: Call, method: &str, headers: HeaderMap, body: Body) -> Response {
    match method {
        "Start" => stream(headers, body, |h, msg| start(call, h, msg)).await,
        "Connect" => stream(headers, body, |h, msg| connect_to(call, h, msg)).await,
        "StreamInput" => stream_input(call, headers, body).await,
        "List" => unary(&headers, body, |_| async move { Ok(list(&call)) }).await,
        "SendInput" => unary(&headers, body, |m| send_input(call, m)).await,
        "SendSignal" => unary(&headers, body, |m| send_signal(call, m)).await,
        "CloseStdin" => unary(&headers, body, |m| close_stdin(call, m)).await,
        "Update" => unary(&headers, body, |m| update(call, m)).await,
        _ => axum::response::IntoResponse::into_response(ConnectError::new(
            Code::Unimplemented,
            format!("process.Process/{method} is not served"),
        )),
    }
}

/// A server-streaming method: checks the content type, reads the one
/// request envelope, and answers with the stream `f` feeds.
async fn stream<F, Fut>(headers: HeaderMap, body: Body, f: F) -> Response
where
    F: FnOnce(HeaderMap, Value) -> Fut,
    Fut: std::future::Future<Output = Result<Response, ConnectError>>,
{
    if let Err(e) = connect::check_content_type(&headers, Shape::ServerStream) {
        return connect::unsupported_media(e);
    }
    let msg = match connect::read_one_envelope(body).await {
        Ok(m) => m,
        Err(e) => return connect::stream_error(e),
    };
    match f(headers, msg).await {
        Ok(resp) => resp,
        Err(e) => connect::stream_error(e),
    }
}

/// `Start`: runs a command and streams its events.
async fn start(call: Call, headers: HeaderMap, msg: Value) -> Result<Response, ConnectError> {
    let lifetime = connect::timeout_of(&headers)?;
    let process = connect::message(&msg, "process")?.ok_or_else(|| {
        ConnectError::new(
            Code::InvalidArgument,
            "process: the process config is missing",
        )
    })?;
    let cmd = connect::string(process, "cmd")?;
    if cmd.is_empty() {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            "process.cmd: the command is empty",
        ));
    }
    let args = connect::strings(process, "args")?;
    let envs = connect::string_map(process, "envs")?;
    let cwd = connect::opt_string(process, "cwd")?;
    let tag = connect::opt_string(&msg, "tag")?;
    // envd: a missing `stdin` means true.
    let stdin = connect::opt_bool(&msg, "stdin")?.unwrap_or(true);
    let pty = match connect::message(&msg, "pty")? {
        None => None,
        Some(p) => Some(pty_size(p)?),
    };
    let table = &call.state.envd.processes;
    if table.list(call.sandbox_id()).len() >= MAX_PROCESSES {
        return Err(ConnectError::new(
            Code::ResourceExhausted,
            format!("sandbox already runs {MAX_PROCESSES} processes"),
        ));
    }
    if let Some(t) = &tag {
        if table
            .find(call.sandbox_id(), &Selector::Tag(t.clone()))
            .is_some()
        {
            return Err(ConnectError::new(
                Code::AlreadyExists,
                format!("tag: a process tagged {t:?} is running"),
            ));
        }
    }

    // Process env: PATH, HOME/USER/LOGNAME (the agent's, for the user),
    // then the sandbox's envVars, then the request's envs.
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), PATH.to_string());
    env.extend(call.record.env_vars.clone());
    env.extend(envs.clone());
    let spec = Spawn {
        argv: std::iter::once(cmd.clone()).chain(args.clone()).collect(),
        env,
        cwd: cwd.clone(),
        user: call.user.clone(),
        stdin,
        pty,
        lifetime,
    };
    let exec = spawn(&call, &spec).await?;
    let pid = exec.pid();
    let mut config = json!({ "cmd": cmd, "args": args, "envs": envs });
    if let Some(c) = &cwd {
        config["cwd"] = json!(c);
    }
    let (cmds_tx, cmds_rx) = mpsc::unbounded_channel();
    let proc = Arc::new(Proc {
        pid,
        tag,
        config,
        pty: pty.is_some(),
        subs: Mutex::new(Vec::new()),
        cmds: cmds_tx,
        control: exec.control(),
    });
    // Subscribed before the first output is pulled: nothing is lost.
    let sub = proc.subscribe()?;
    {
        let mut map = table.lock();
        map.entry(call.sandbox_id().to_string())
            .or_default()
            .insert(pid, proc.clone());
    }
    let deadline = lifetime.map(|d| Instant::now() + d);
    let state = call.state.clone();
    let sandbox = call.sandbox_id().to_string();
    tokio::spawn(async move {
        let (terminal, killers) = drain(&proc, exec, cmds_rx, deadline).await;
        // Gone from the table before anyone hears of the end: a kill that
        // returned, or an end event, means List and SendSignal no longer
        // find it.
        state.envd.processes.remove(&sandbox, &proc);
        proc.finish(terminal);
        for k in killers {
            let _ = k.send(Ok(()));
        }
    });
    let timers = Timers {
        keepalive: connect::keepalive_of(&headers),
        // The process's own deadline ends its streams.
        deadline: None,
    };
    Ok(pump(pid, sub, timers))
}

fn pty_size(p: &Value) -> Result<PtySize, ConnectError> {
    let size = connect::message(p, "size")?.ok_or_else(|| {
        ConnectError::new(
            Code::InvalidArgument,
            "pty.size: the terminal size is missing",
        )
    })?;
    let cols = connect::uint(size, "cols", u16::MAX as u64)? as u16;
    let rows = connect::uint(size, "rows", u16::MAX as u64)? as u16;
    if cols == 0 || rows == 0 {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            "pty.size: cols and rows must be at least 1",
        ));
    }
    Ok(PtySize { cols, rows })
}

/// What to run.
struct Spawn {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    user: String,
    stdin: bool,
    pty: Option<PtySize>,
    lifetime: Option<Duration>,
}

/// How long past its lifetime the agent kills a process by itself, should
/// the daemon's kill not reach it.
const AGENT_BACKSTOP: Duration = Duration::from_secs(5);

/// Starts `spec` in the sandbox's VM, as its user.
async fn spawn(call: &Call, spec: &Spawn) -> Result<Exec, ConnectError> {
    let req = agentenv_proto::ExecRequest {
        cmd: spec.argv.clone(),
        env: spec.env.clone(),
        cwd: spec.cwd.clone(),
        // A pty takes its input through the master, like stdin.
        stdin: spec.stdin || spec.pty.is_some(),
        // The lifetime is the drain task's to enforce; the agent's own
        // timeout only backs it up. Without one the process runs until it
        // ends or is killed, as in envd.
        timeout_ms: spec
            .lifetime
            .map(|d| (d + AGENT_BACKSTOP).as_millis().min(u64::MAX as u128) as u64),
        max_output: None,
        user: Some(spec.user.clone()),
        pty: spec.pty,
    };
    call.state
        .engine
        .agent_exec(call.sandbox_id(), &req, None)
        .await
        .map_err(engine_error)
}

/// Pulls a process's events until it ends, fanning them out; carries out
/// kills; enforces its lifetime. Returns how its streams end and the kills
/// waiting for the end.
async fn drain(
    proc: &Proc,
    mut exec: Exec,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    deadline: Option<Instant>,
) -> (Terminal, Vec<oneshot::Sender<Result<(), ConnectError>>>) {
    let mut killers = Vec::new();
    let mut expired = false;
    let mut killed_at: Option<Instant> = None;
    let data_kind = if proc.pty { "pty" } else { "stdout" };
    let terminal = loop {
        let grace = async {
            match killed_at {
                Some(t) => tokio::time::sleep_until(t + KILL_GRACE).await,
                None => std::future::pending().await,
            }
        };
        let lifetime = async {
            match deadline {
                Some(d) if !expired => tokio::time::sleep_until(d).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = exec.next() => match ev {
                Ok(ExecEvent::Stdout(b)) => proc.fan_out(data(data_kind, &b)),
                Ok(ExecEvent::Stderr(b)) => proc.fan_out(data("stderr", &b)),
                Ok(ExecEvent::Exit(st)) => {
                    break if expired || st.timed_out {
                        Terminal::Error(deadline_error())
                    } else {
                        Terminal::End(end_event(&st))
                    };
                }
                Err(e) => break Terminal::Error(ConnectError::new(
                    Code::Unavailable,
                    format!("the connection to the sandbox's agent ended: {e}"),
                )),
            },
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Kill(done)) => {
                    match exec.kill().await {
                        // Answered once the process has ended.
                        Ok(()) => killers.push(done),
                        Err(e) => {
                            let _ = done.send(Err(ConnectError::new(
                                Code::Unavailable,
                                format!("killing the process failed: {e}"),
                            )));
                        }
                    }
                    killed_at.get_or_insert_with(Instant::now);
                }
                // Dropping `exec` kills the command (if the VM still runs).
                Some(Cmd::Forget) | None => break Terminal::Error(ConnectError::new(
                    Code::Unavailable,
                    "the sandbox was stopped while the process ran",
                )),
            },
            () = lifetime => {
                expired = true;
                let _ = exec.kill().await;
                killed_at.get_or_insert_with(Instant::now);
            }
            () = grace => break Terminal::Error(ConnectError::new(
                Code::Unavailable,
                "the process did not report its end after it was killed",
            )),
        }
    };
    (terminal, killers)
}

/// `{"event":{"data":{kind: base64}}}`.
fn data(kind: &str, bytes: &[u8]) -> Value {
    json!({ "event": { "data": { kind: agentenv_api::base64::encode(bytes) } } })
}

/// The `end` event of a process that ended, as envd (Go's `ProcessState`)
/// words it.
fn end_event(st: &ExitStatus) -> Value {
    let (code, exited, status) = match (st.exit_code, st.signal) {
        (Some(c), _) => (c, true, format!("exit status {c}")),
        (None, Some(sig)) => (-1, false, format!("signal: {}", signal_name(sig))),
        (None, None) => (-1, false, "signal: killed".to_string()),
    };
    let mut end = json!({ "exitCode": code, "exited": exited, "status": status });
    if code != 0 {
        end["error"] = json!(status);
    }
    json!({ "event": { "end": end } })
}

/// Go's names of signals (`syscall.Signal.String`).
fn signal_name(sig: i32) -> String {
    match sig {
        1 => "hangup".into(),
        2 => "interrupt".into(),
        3 => "quit".into(),
        4 => "illegal instruction".into(),
        5 => "trace/breakpoint trap".into(),
        6 => "aborted".into(),
        7 => "bus error".into(),
        8 => "floating point exception".into(),
        9 => "killed".into(),
        10 => "user defined signal 1".into(),
        11 => "segmentation fault".into(),
        12 => "user defined signal 2".into(),
        13 => "broken pipe".into(),
        14 => "alarm clock".into(),
        15 => "terminated".into(),
        n => format!("signal {n}"),
    }
}

/// The stream of one subscription: `start{pid}` first, then the process's
/// messages, keepalives when idle, and its end.
fn pump(pid: u32, sub: Subscription, timers: Timers) -> Response {
    let (tx, resp) = connect::stream_response();
    tokio::spawn(async move {
        if tx
            .send(&json!({ "event": { "start": { "pid": pid } } }))
            .await
            .is_err()
        {
            return;
        }
        let keepalive = json!({ "event": { "keepalive": {} } });
        // The client going away drops `sub`, which unsubscribes.
        run_stream(tx, timers, keepalive, sub, |sub| Box::pin(sub.next())).await;
    });
    resp
}

impl Subscription {
    /// The next thing for the stream (cancel-safe).
    async fn next(&mut self) -> Step {
        match self.rx.recv().await {
            Some(Out::Msg(m)) => Step::Msgs(vec![m]),
            Some(Out::Done(Terminal::End(end))) => Step::End(Some(end), None),
            Some(Out::Done(Terminal::Error(e))) => Step::End(None, Some(e)),
            None => Step::End(
                None,
                Some(if self.lagged.load(Ordering::SeqCst) {
                    ConnectError::new(
                        Code::ResourceExhausted,
                        "the client fell behind the process's output; reattach with Connect",
                    )
                } else {
                    ConnectError::new(Code::Unavailable, "the process's output ended")
                }),
            ),
        }
    }
}

/// `Connect`: re-attaches to a running process.
async fn connect_to(call: Call, headers: HeaderMap, msg: Value) -> Result<Response, ConnectError> {
    let sel = selector(&msg)?;
    let deadline = connect::timeout_of(&headers)?.map(|d| Instant::now() + d);
    let proc = call
        .state
        .envd
        .processes
        .find(call.sandbox_id(), &sel)
        .ok_or_else(|| not_found(&sel))?;
    let sub = proc.subscribe()?;
    let timers = Timers {
        keepalive: connect::keepalive_of(&headers),
        deadline,
    };
    Ok(pump(proc.pid, sub, timers))
}

fn list(call: &Call) -> Value {
    let procs: Vec<Value> = call
        .state
        .envd
        .processes
        .list(call.sandbox_id())
        .iter()
        .map(|p| p.info())
        .collect();
    json!({ "processes": procs })
}

fn find(call: &Call, msg: &Value) -> Result<Arc<Proc>, ConnectError> {
    let sel = selector(msg)?;
    call.state
        .envd
        .processes
        .find(call.sandbox_id(), &sel)
        .ok_or_else(|| not_found(&sel))
}

async fn kill(proc: &Proc) -> Result<(), ConnectError> {
    let (tx, rx) = oneshot::channel();
    proc.cmds
        .send(Cmd::Kill(tx))
        .map_err(|_| ConnectError::new(Code::NotFound, format!("process {} ended", proc.pid)))?;
    rx.await
        .map_err(|_| ConnectError::new(Code::NotFound, format!("process {} ended", proc.pid)))?
}

async fn send_signal(call: Call, msg: Value) -> Result<Value, ConnectError> {
    let sig = connect::enumeration(&msg, "signal", SIGNALS)?;
    if !(1..=64).contains(&sig) {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            format!("signal: {sig} is not a signal"),
        ));
    }
    let proc = find(&call, &msg)?;
    if sig == 9 {
        kill(&proc).await?;
    } else {
        proc.control
            .signal(sig as i32)
            .await
            .map_err(|e| control_error(&proc, e))?;
    }
    Ok(json!({}))
}

/// The error of a control operation on a process (it may have just ended).
fn control_error(proc: &Proc, e: agentenv_core::agent::AgentError) -> ConnectError {
    match e {
        agentenv_core::agent::AgentError::Remote(_) => engine_error(e.into()),
        e => ConnectError::new(
            Code::NotFound,
            format!("process {} is not running: {e}", proc.pid),
        ),
    }
}

/// `ProcessInput`: `{"stdin": b64}` or `{"pty": b64}`.
fn input_bytes(input: Option<&Value>) -> Result<Vec<u8>, ConnectError> {
    let Some(input) = input else {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            "input: the input is missing",
        ));
    };
    if connect::field(input, "pty").is_some() {
        connect::bytes(input, "pty")
    } else {
        connect::bytes(input, "stdin")
    }
}

async fn write_input(proc: &Proc, bytes: &[u8]) -> Result<(), ConnectError> {
    if bytes.is_empty() {
        return Ok(());
    }
    proc.control
        .write_stdin(bytes)
        .await
        .map_err(|e| control_error(proc, e))
}

async fn send_input(call: Call, msg: Value) -> Result<Value, ConnectError> {
    let bytes = input_bytes(connect::message(&msg, "input")?)?;
    let proc = find(&call, &msg)?;
    write_input(&proc, &bytes).await?;
    Ok(json!({}))
}

async fn close_stdin(call: Call, msg: Value) -> Result<Value, ConnectError> {
    let proc = find(&call, &msg)?;
    proc.control
        .close_stdin()
        .await
        .map_err(|e| control_error(&proc, e))?;
    Ok(json!({}))
}

async fn update(call: Call, msg: Value) -> Result<Value, ConnectError> {
    let size = match connect::message(&msg, "pty")? {
        Some(p) => pty_size(p)?,
        None => {
            return Err(ConnectError::new(
                Code::InvalidArgument,
                "pty: the new terminal size is missing",
            ))
        }
    };
    let proc = find(&call, &msg)?;
    if !proc.pty {
        return Err(ConnectError::new(
            Code::FailedPrecondition,
            format!("pty: process {} has no terminal", proc.pid),
        ));
    }
    proc.control
        .resize(size)
        .await
        .map_err(|e| control_error(&proc, e))?;
    Ok(json!({}))
}

/// `StreamInput`: a client stream of input for one process: `start`
/// first, then `data` (and `keepalive`) messages; answered once the client
/// ends its stream.
async fn stream_input(call: Call, headers: HeaderMap, body: Body) -> Response {
    if let Err(e) = connect::check_content_type(&headers, Shape::ClientStream) {
        return connect::unsupported_media(e);
    }
    let mut reader = connect::EnvelopeReader::new(body);
    let run = async {
        let first = reader.next().await?.ok_or_else(|| {
            ConnectError::new(Code::InvalidArgument, "the stream has no start message")
        })?;
        let start = connect::message(&first, "start")?.ok_or_else(|| {
            ConnectError::new(
                Code::InvalidArgument,
                "the first StreamInput message must be start{process}",
            )
        })?;
        let proc = find(&call, start)?;
        while let Some(msg) = reader.next().await? {
            if let Some(data) = connect::message(&msg, "data")? {
                let bytes = input_bytes(connect::message(data, "input")?)?;
                write_input(&proc, &bytes).await?;
            } else if connect::field(&msg, "keepalive").is_none() {
                return Err(ConnectError::new(
                    Code::InvalidArgument,
                    "a StreamInput message is data{input} or keepalive{}",
                ));
            }
        }
        Ok::<(), ConnectError>(())
    };
    let r = match connect::timeout_of(&headers) {
        Ok(None) => run.await,
        Ok(Some(d)) => tokio::time::timeout(d, run)
            .await
            .unwrap_or_else(|_| Err(deadline_error())),
        Err(e) => Err(e),
    };
    match r {
        Ok(()) => {
            let mut body = connect::envelope_bytes(&json!({}));
            body.extend_from_slice(&connect::end_envelope(None));
            connect::stream_body(body)
        }
        Err(e) => connect::stream_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_events_read_as_envds() {
        let ok = end_event(&ExitStatus {
            exit_code: Some(0),
            ..Default::default()
        });
        assert_eq!(
            ok,
            json!({"event":{"end":{"exitCode":0,"exited":true,"status":"exit status 0"}}})
        );
        let three = end_event(&ExitStatus {
            exit_code: Some(3),
            ..Default::default()
        });
        assert_eq!(three["event"]["end"]["error"], "exit status 3");
        let killed = end_event(&ExitStatus {
            signal: Some(9),
            ..Default::default()
        });
        assert_eq!(
            killed,
            json!({"event":{"end":{"exitCode":-1,"exited":false,"status":"signal: killed",
                "error":"signal: killed"}}})
        );
    }
}
