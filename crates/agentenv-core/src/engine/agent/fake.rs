//! A fake guest agent for engine tests: an [`AgentConnector`] whose links
//! record every call and answer as the test tells them, with no sockets.
//!
//! Its guest is a file table (uploads write it, downloads read it, `fs`
//! works on it and its directories, watches see uploads), an `echo` that
//! writes its arguments to stdout and a `cat` that echoes what
//! [`ExecControl`] writes until stdin closes or a signal ends it; freeze and
//! thaw answer, fail or never answer ([`Answer`]); a link closes when the
//! test says ([`FakeAgents::close_links`]).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use agentenv_proto::{
    Done, EntryInfo, EntryKind, ErrorCode, ErrorMsg, ExecRequest, ExitStatus, FileInfo, FsEvent,
    FsEventOp, FsOp, FsRequest, FsResponse, GetFile, HelloOk, Identity, PtySize, PutFile,
    WatchRequest, FEATURES, PROTOCOL_VERSION,
};
use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

use crate::agent::{
    AgentConnector, AgentError, AgentLink, Download, DownloadStream, Exec, ExecControl, ExecEvent,
    ExecInput, ExecStream, Recycler, Upload, UploadSink, Watch, WatchStream,
};
use crate::backend::AgentChannel;

/// The name and version the fake agent reports.
pub(crate) const FAKE_AGENT: &str = "fake-agent 0.0.0";

/// A call the fake agent saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AgentCall {
    /// A connection (always answered).
    Connect(AgentChannel),
    Ping,
    Exec(Vec<String>),
    PutFile(String),
    GetFile(String),
    /// A file-system operation (its request).
    Fs(FsRequest),
    /// A watch started (its path).
    Watch(String),
    /// Bytes written to a command's stdin.
    Stdin(Vec<u8>),
    CloseStdin,
    Signal(i32),
    Resize(PtySize),
    Kill,
    Freeze,
    Thaw,
    /// A new identity (its host name).
    Identity(String),
    /// The host closed a link.
    Shutdown,
}

/// How the fake answers a freeze or a thaw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    Done,
    /// An `Io` error from the agent.
    Fail,
    /// No answer, ever (a wedged guest).
    Never,
}

/// The fake guest behind every link.
struct Guest {
    calls: Vec<AgentCall>,
    freeze: Answer,
    thaw: Answer,
    files: HashMap<String, Vec<u8>>,
    /// Directories (besides `/`), made by `make_dir`.
    dirs: BTreeSet<String>,
    /// Live watches: their directory and where their events go.
    watches: Vec<(String, mpsc::UnboundedSender<FsEvent>)>,
    /// Every link handed out, to close them.
    links: Vec<Arc<FakeLink>>,
}

/// The fake agents' connector; cheap to clone, all clones share one guest.
#[derive(Clone)]
pub(crate) struct FakeAgents(Arc<Mutex<Guest>>);

impl FakeAgents {
    /// Agents that answer every connection and every request.
    pub(crate) fn new() -> FakeAgents {
        FakeAgents(Arc::new(Mutex::new(Guest {
            calls: Vec::new(),
            freeze: Answer::Done,
            thaw: Answer::Done,
            files: HashMap::new(),
            dirs: BTreeSet::new(),
            watches: Vec::new(),
            links: Vec::new(),
        })))
    }

    fn guest(&self) -> MutexGuard<'_, Guest> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every call so far, in order.
    pub(crate) fn calls(&self) -> Vec<AgentCall> {
        self.guest().calls.clone()
    }

    /// How freezes and thaws are answered from now on.
    pub(crate) fn answer(&self, freeze: Answer, thaw: Answer) {
        let mut g = self.guest();
        g.freeze = freeze;
        g.thaw = thaw;
    }

    /// A file in the fake guest.
    pub(crate) fn file(&self, path: &str) -> Option<Vec<u8>> {
        self.guest().files.get(path).cloned()
    }

    /// Breaks every open link, with `why`.
    pub(crate) fn close_links(&self, why: &str) {
        let links = std::mem::take(&mut self.guest().links);
        for l in links {
            l.closed.send_replace(Some(why.to_string()));
        }
    }

    /// A link to the fake guest, as a connection hands it out.
    pub(crate) fn link(&self) -> Arc<FakeLink> {
        let link = Arc::new(FakeLink {
            guest: self.clone(),
            hello: HelloOk {
                version: PROTOCOL_VERSION,
                agent: FAKE_AGENT.to_string(),
                pid: 1,
                features: FEATURES.iter().map(|f| f.to_string()).collect(),
            },
            closed: watch::channel(None).0,
        });
        self.guest().links.push(link.clone());
        link
    }

    fn record(&self, call: AgentCall) {
        self.guest().calls.push(call);
    }
}

#[async_trait]
impl AgentConnector for FakeAgents {
    async fn connect(
        &self,
        channel: &AgentChannel,
        _timeout: Duration,
    ) -> Result<Arc<dyn AgentLink>, AgentError> {
        self.record(AgentCall::Connect(channel.clone()));
        Ok(self.link())
    }
}

/// One connection to the fake guest.
pub(crate) struct FakeLink {
    guest: FakeAgents,
    hello: HelloOk,
    closed: watch::Sender<Option<String>>,
}

impl FakeLink {
    fn check_open(&self) -> Result<(), AgentError> {
        match &*self.closed.borrow() {
            Some(why) => Err(AgentError::Closed(why.clone())),
            None => Ok(()),
        }
    }

    async fn answer(&self, call: AgentCall, how: Answer) -> Result<Done, AgentError> {
        self.check_open()?;
        self.guest.record(call);
        match how {
            Answer::Done => Ok(Done::default()),
            Answer::Fail => Err(remote(ErrorCode::Io, None, "fsfreeze: not supported")),
            Answer::Never => std::future::pending().await,
        }
    }
}

fn remote(code: ErrorCode, field: Option<&str>, error: &str) -> AgentError {
    AgentError::Remote(ErrorMsg::new(code, field, error))
}

#[async_trait]
impl AgentLink for FakeLink {
    fn hello(&self) -> &HelloOk {
        &self.hello
    }

    fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }

    async fn closed(&self) -> String {
        let mut rx = self.closed.subscribe();
        let why = match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "closed".into(),
        };
        why
    }

    fn shutdown(&self) {
        if !self.is_closed() {
            self.guest.record(AgentCall::Shutdown);
            self.closed
                .send_replace(Some("closed by the host".to_string()));
        }
    }

    async fn set_identity(&self, identity: &Identity) -> Result<Done, AgentError> {
        self.answer(AgentCall::Identity(identity.hostname.clone()), Answer::Done)
            .await
    }

    async fn ping(&self) -> Result<(), AgentError> {
        self.answer(AgentCall::Ping, Answer::Done).await.map(|_| ())
    }

    async fn exec(&self, req: &ExecRequest, stdin: Option<Vec<u8>>) -> Result<Exec, AgentError> {
        self.check_open()?;
        self.guest.record(AgentCall::Exec(req.cmd.clone()));
        let (tx, rx) = mpsc::unbounded_channel();
        let control = ExecControl::new(Arc::new(FakeInput {
            guest: self.guest.clone(),
            events: tx.clone(),
        }));
        match req.cmd.first().map(String::as_str) {
            Some("echo") => {
                let mut out = req.cmd[1..].join(" ").into_bytes();
                out.push(b'\n');
                out.extend(stdin.unwrap_or_default());
                let status = ExitStatus {
                    exit_code: Some(0),
                    stdout_bytes: out.len() as u64,
                    ..ExitStatus::default()
                };
                let _ = tx.send(ExecEvent::Stdout(out));
                let _ = tx.send(ExecEvent::Exit(status));
            }
            Some("cat") if req.stdin && stdin.is_none() => {}
            _ => {
                return Err(remote(
                    ErrorCode::NotFound,
                    Some("cmd"),
                    "the fake guest runs only echo, and cat with an open stdin",
                ))
            }
        }
        Ok(Exec::new(2, Box::new(FakeExec(rx)), control))
    }

    async fn put_file(&self, put: &PutFile) -> Result<Upload, AgentError> {
        self.check_open()?;
        self.guest.record(AgentCall::PutFile(put.path.clone()));
        Ok(Upload::new(Box::new(FakeUpload {
            guest: self.guest.clone(),
            path: home_path(&put.path, put.user.as_deref()),
            bytes: Vec::new(),
        })))
    }

    async fn get_file(&self, get: &GetFile) -> Result<Download, AgentError> {
        self.check_open()?;
        self.guest.record(AgentCall::GetFile(get.path.clone()));
        let data = self
            .guest
            .file(&home_path(&get.path, get.user.as_deref()))
            .ok_or_else(|| remote(ErrorCode::NotFound, Some("path"), "no such file"))?;
        let info = FileInfo {
            size: data.len() as u64,
            mode: 0o644,
        };
        let chunks = data.chunks(4).map(<[u8]>::to_vec).collect();
        Ok(Download::new(
            info,
            Box::new(FakeDownload(chunks)),
            Recycler::discard(),
        ))
    }

    async fn fs(&self, req: &FsRequest) -> Result<FsResponse, AgentError> {
        self.check_open()?;
        self.guest.record(AgentCall::Fs(req.clone()));
        let user = req.user.as_deref();
        let mut g = self.guest.guest();
        let missing = |field: &str, p: &str| {
            remote(
                ErrorCode::NotFound,
                Some(field),
                &format!("{p}: no such file or directory"),
            )
        };
        match &req.op {
            FsOp::Stat { path } => {
                let p = home_path(path, user);
                let entry = g.entry(&p, user).ok_or_else(|| missing("path", &p))?;
                Ok(FsResponse {
                    entry: Some(entry),
                    entries: Vec::new(),
                })
            }
            FsOp::List { path, depth } => {
                let p = home_path(path, user);
                if p != "/" && !g.dirs.contains(&p) {
                    return Err(missing("path", &p));
                }
                let base = p.trim_end_matches('/').to_string();
                let levels = |q: &str| q[base.len()..].matches('/').count() as u32;
                let mut names: Vec<String> = g.files.keys().chain(g.dirs.iter()).cloned().collect();
                names.sort();
                let entries = names
                    .iter()
                    .filter(|q| q.starts_with(&format!("{base}/")) && levels(q) <= *depth)
                    .filter_map(|q| g.entry(q, user))
                    .collect();
                Ok(FsResponse {
                    entry: None,
                    entries,
                })
            }
            FsOp::MakeDir { path } => {
                let p = home_path(path, user);
                if g.dirs.contains(&p) || g.files.contains_key(&p) {
                    return Err(remote(
                        ErrorCode::AlreadyExists,
                        Some("path"),
                        &format!("{p} exists already"),
                    ));
                }
                g.dirs.insert(p.clone());
                Ok(FsResponse {
                    entry: g.entry(&p, user),
                    entries: Vec::new(),
                })
            }
            FsOp::Move {
                source,
                destination,
            } => {
                let (src, dst) = (home_path(source, user), home_path(destination, user));
                let data = g
                    .files
                    .remove(&src)
                    .ok_or_else(|| missing("source", &src))?;
                g.files.insert(dst.clone(), data);
                Ok(FsResponse {
                    entry: g.entry(&dst, user),
                    entries: Vec::new(),
                })
            }
            FsOp::Remove { path } => {
                let p = home_path(path, user);
                g.files.remove(&p);
                g.dirs.remove(&p);
                Ok(FsResponse::default())
            }
        }
    }

    async fn watch(&self, req: &WatchRequest) -> Result<Watch, AgentError> {
        self.check_open()?;
        self.guest.record(AgentCall::Watch(req.path.clone()));
        let dir = home_path(&req.path, req.user.as_deref());
        let mut g = self.guest.guest();
        if dir != "/" && !g.dirs.contains(&dir) {
            return Err(remote(
                ErrorCode::NotFound,
                Some("path"),
                "no such directory",
            ));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        g.watches.push((dir, tx));
        Ok(Watch::new(Box::new(FakeWatch(rx))))
    }

    async fn freeze(&self) -> Result<Done, AgentError> {
        let how = self.guest.guest().freeze;
        self.answer(AgentCall::Freeze, how).await
    }

    async fn thaw(&self) -> Result<Done, AgentError> {
        let how = self.guest.guest().thaw;
        self.answer(AgentCall::Thaw, how).await
    }
}

/// `path` as the fake guest resolves it: relative to `/home/USER` (or `/root`).
fn home_path(path: &str, user: Option<&str>) -> String {
    if path.starts_with('/') {
        return path.to_string();
    }
    match user {
        Some("root") | None => format!("/root/{path}"),
        Some(u) => format!("/home/{u}/{path}"),
    }
}

impl Guest {
    /// The entry at `path`, owned by `user`.
    fn entry(&self, path: &str, user: Option<&str>) -> Option<EntryInfo> {
        let (kind, size, mode) = if let Some(data) = self.files.get(path) {
            (EntryKind::File, data.len() as u64, 0o644)
        } else if self.dirs.contains(path) || path == "/" {
            (EntryKind::Directory, 4096, 0o755)
        } else {
            return None;
        };
        let owner = user.unwrap_or("root").to_string();
        Some(EntryInfo {
            name: path.rsplit('/').next().unwrap_or_default().to_string(),
            path: path.to_string(),
            kind,
            size,
            mode,
            permissions: if kind == EntryKind::File {
                "-rw-r--r--"
            } else {
                "drwxr-xr-x"
            }
            .into(),
            owner: owner.clone(),
            group: owner,
            modified_unix_ns: 0,
            symlink_target: None,
        })
    }
}

/// An exec's events, as the fake command produces them.
struct FakeExec(mpsc::UnboundedReceiver<ExecEvent>);

#[async_trait]
impl ExecStream for FakeExec {
    async fn next(&mut self) -> Result<ExecEvent, AgentError> {
        self.0
            .recv()
            .await
            .ok_or_else(|| AgentError::Protocol("the command already ended".into()))
    }

    async fn kill(&mut self) -> Result<(), AgentError> {
        Ok(())
    }
}

/// The fake `cat`'s input: stdin comes back as stdout; closing stdin ends it
/// with 0, a signal or a kill with that signal.
struct FakeInput {
    guest: FakeAgents,
    events: mpsc::UnboundedSender<ExecEvent>,
}

impl FakeInput {
    fn end(&self, status: ExitStatus) {
        let _ = self.events.send(ExecEvent::Exit(status));
    }
}

#[async_trait]
impl ExecInput for FakeInput {
    async fn write_stdin(&self, bytes: &[u8]) -> Result<(), AgentError> {
        self.guest.record(AgentCall::Stdin(bytes.to_vec()));
        self.events
            .send(ExecEvent::Stdout(bytes.to_vec()))
            .map_err(|_| AgentError::Closed("the command ended".into()))
    }

    async fn close_stdin(&self) -> Result<(), AgentError> {
        self.guest.record(AgentCall::CloseStdin);
        self.end(ExitStatus {
            exit_code: Some(0),
            ..ExitStatus::default()
        });
        Ok(())
    }

    async fn signal(&self, signal: i32) -> Result<(), AgentError> {
        self.guest.record(AgentCall::Signal(signal));
        self.end(ExitStatus {
            signal: Some(signal),
            ..ExitStatus::default()
        });
        Ok(())
    }

    async fn resize(&self, size: PtySize) -> Result<(), AgentError> {
        self.guest.record(AgentCall::Resize(size));
        Ok(())
    }

    async fn kill(&self) -> Result<(), AgentError> {
        self.guest.record(AgentCall::Kill);
        self.end(ExitStatus {
            signal: Some(9),
            killed: true,
            ..ExitStatus::default()
        });
        Ok(())
    }
}

/// A watch's events: uploads finished under its directory.
struct FakeWatch(mpsc::UnboundedReceiver<FsEvent>);

#[async_trait]
impl WatchStream for FakeWatch {
    async fn next(&mut self) -> Result<FsEvent, AgentError> {
        self.0
            .recv()
            .await
            .ok_or_else(|| AgentError::Closed("the watch ended".into()))
    }
}

/// An upload into the fake guest's file table, in place once finished.
struct FakeUpload {
    guest: FakeAgents,
    path: String,
    bytes: Vec<u8>,
}

#[async_trait]
impl UploadSink for FakeUpload {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), AgentError> {
        self.bytes.extend_from_slice(bytes);
        Ok(())
    }

    async fn finish(&mut self) -> Result<Done, AgentError> {
        let bytes = std::mem::take(&mut self.bytes);
        let done = Done {
            bytes: bytes.len() as u64,
            mounts: Vec::new(),
        };
        let mut g = self.guest.guest();
        let created = !g.files.contains_key(&self.path);
        g.files.insert(self.path.clone(), bytes);
        for (dir, tx) in &g.watches {
            if let Some(name) = self.path.strip_prefix(&format!("{dir}/")) {
                let op = if created {
                    FsEventOp::Create
                } else {
                    FsEventOp::Write
                };
                let _ = tx.send(FsEvent {
                    name: name.to_string(),
                    op,
                });
            }
        }
        Ok(done)
    }
}

/// A download's chunks, all ready at once.
struct FakeDownload(VecDeque<Vec<u8>>);

impl DownloadStream for FakeDownload {
    fn poll_chunk(&mut self, _cx: &mut Context<'_>) -> Poll<Result<Option<Vec<u8>>, AgentError>> {
        Poll::Ready(Ok(self.0.pop_front()))
    }
}
