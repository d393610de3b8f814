//! A fake guest agent for engine tests: an [`AgentConnector`] whose links
//! record every call and answer as the test tells them, with no sockets.
//!
//! Its guest is a file table (uploads write it, downloads read it) and an
//! `echo` that writes its arguments to stdout; freeze and thaw answer, fail or
//! never answer ([`Answer`]); a link closes when the test says
//! ([`FakeAgents::close_links`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use agentenv_proto::{
    Done, ErrorCode, ErrorMsg, ExecRequest, ExitStatus, FileInfo, HelloOk, Identity, PutFile,
    PROTOCOL_VERSION,
};
use async_trait::async_trait;
use tokio::sync::watch;

use crate::agent::{
    AgentConnector, AgentError, AgentLink, Download, DownloadStream, Exec, ExecEvent, ExecStream,
    Recycler, Upload, UploadSink,
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
        if req.cmd.first().map(String::as_str) != Some("echo") {
            return Err(remote(
                ErrorCode::NotFound,
                Some("cmd"),
                "the fake guest runs only echo",
            ));
        }
        let mut out = req.cmd[1..].join(" ").into_bytes();
        out.push(b'\n');
        out.extend(stdin.unwrap_or_default());
        let status = ExitStatus {
            exit_code: Some(0),
            stdout_bytes: out.len() as u64,
            ..ExitStatus::default()
        };
        let events = VecDeque::from([ExecEvent::Stdout(out), ExecEvent::Exit(status)]);
        Ok(Exec::new(2, Box::new(FakeExec(events))))
    }

    async fn put_file(&self, put: &PutFile) -> Result<Upload, AgentError> {
        self.check_open()?;
        self.guest.record(AgentCall::PutFile(put.path.clone()));
        Ok(Upload::new(Box::new(FakeUpload {
            guest: self.guest.clone(),
            path: put.path.clone(),
            bytes: Vec::new(),
        })))
    }

    async fn get_file(&self, path: &str) -> Result<Download, AgentError> {
        self.check_open()?;
        self.guest.record(AgentCall::GetFile(path.to_string()));
        let data = self
            .guest
            .file(path)
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

    async fn freeze(&self) -> Result<Done, AgentError> {
        let how = self.guest.guest().freeze;
        self.answer(AgentCall::Freeze, how).await
    }

    async fn thaw(&self) -> Result<Done, AgentError> {
        let how = self.guest.guest().thaw;
        self.answer(AgentCall::Thaw, how).await
    }
}

/// An exec's events, all ready at once.
struct FakeExec(VecDeque<ExecEvent>);

#[async_trait]
impl ExecStream for FakeExec {
    async fn next(&mut self) -> Result<ExecEvent, AgentError> {
        self.0
            .pop_front()
            .ok_or_else(|| AgentError::Protocol("the command already ended".into()))
    }

    async fn kill(&mut self) -> Result<(), AgentError> {
        Ok(())
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
        self.guest.guest().files.insert(self.path.clone(), bytes);
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
