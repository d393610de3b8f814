//! The guest agent channel as the engine sees it: an [`AgentConnector`] opens
//! a VM's [`AgentChannel`] and an [`AgentLink`] is one connection to its agent.
//!
//! The messages are the protocol's own (`agentenv-proto`); what flows back is
//! streams that the caller pulls ([`Exec`], [`Download`]) or pushes into
//! ([`Upload`]) at its own pace, so a slow consumer holds back the guest and
//! not memory on the host. The socket client behind these traits is
//! `agentenv-host`'s `agent` module; engine tests use a fake
//! (`engine::fake_agent`).

use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use agentenv_proto::{
    Done, ErrorMsg, ExecRequest, ExitStatus, FileInfo, FsEvent, FsRequest, FsResponse, GetFile,
    HelloOk, Identity, PtySize, PutFile, WatchRequest,
};
use async_trait::async_trait;

use crate::backend::AgentChannel;

/// Why talking to an agent failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// No connection could be made (nothing listens yet, the guest is booting…).
    #[error("cannot connect to the guest agent: {0}")]
    Connect(String),
    /// The connection broke or was closed.
    #[error("the guest agent connection was lost: {0}")]
    Closed(String),
    /// The agent refused the request.
    #[error("{}", .0.error)]
    Remote(ErrorMsg),
    /// The agent said something that breaks the protocol.
    #[error("guest agent protocol error: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("the guest agent did not answer within {0} ms")]
    Timeout(u64),
}

/// Opens connections to VMs' agents.
#[async_trait]
pub trait AgentConnector: Send + Sync + 'static {
    /// Connects to the agent behind `channel` and performs the handshake, all
    /// within `timeout`.
    async fn connect(
        &self,
        channel: &AgentChannel,
        timeout: Duration,
    ) -> Result<Arc<dyn AgentLink>, AgentError>;
}

/// One connection to one VM's agent. Requests are independent of each other
/// and may run at once.
#[async_trait]
pub trait AgentLink: Send + Sync + 'static {
    /// The agent's handshake answer (its version and pid).
    fn hello(&self) -> &HelloOk;

    /// True once the connection is gone.
    fn is_closed(&self) -> bool;

    /// Resolves when the connection is gone, with the reason.
    async fn closed(&self) -> String;

    /// Closes the connection; requests in flight fail.
    fn shutdown(&self);

    /// Liveness check.
    async fn ping(&self) -> Result<(), AgentError>;

    /// Starts a command. With `stdin`, its bytes are sent and stdin closed.
    /// Without, and with `req.stdin` set, stdin stays open for
    /// [`Exec::control`]'s [`ExecControl::write_stdin`] until
    /// [`ExecControl::close_stdin`].
    async fn exec(&self, req: &ExecRequest, stdin: Option<Vec<u8>>) -> Result<Exec, AgentError>;

    /// Starts an upload; write the content with [`Upload::write`], then
    /// [`Upload::finish`].
    async fn put_file(&self, put: &PutFile) -> Result<Upload, AgentError>;

    /// Starts a download; read it with [`Download::next_chunk`].
    async fn get_file(&self, get: &GetFile) -> Result<Download, AgentError>;

    /// One file-system operation (stat, list, make_dir, move, remove).
    async fn fs(&self, req: &FsRequest) -> Result<FsResponse, AgentError>;

    /// Starts watching a directory; read its events with [`Watch::next`].
    async fn watch(&self, req: &WatchRequest) -> Result<Watch, AgentError>;

    /// Freezes the guest's writable file systems.
    async fn freeze(&self) -> Result<Done, AgentError>;

    /// Thaws what [`AgentLink::freeze`] froze.
    async fn thaw(&self) -> Result<Done, AgentError>;

    /// Gives a VM restored from a memory snapshot its own identity: host
    /// name, network settings, fresh entropy and the host's time.
    async fn set_identity(&self, identity: &Identity) -> Result<Done, AgentError>;
}

/// What a running command produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes on stdout.
    Stdout(Vec<u8>),
    /// Bytes on stderr.
    Stderr(Vec<u8>),
    /// The command ended; nothing follows.
    Exit(ExitStatus),
}

/// The events of a running command, as a link delivers them. Dropping it
/// before the exit kills the command.
#[async_trait]
pub trait ExecStream: Send {
    /// The next output chunk or the exit. Credit for output goes back to the
    /// guest as each chunk is taken.
    async fn next(&mut self) -> Result<ExecEvent, AgentError>;

    /// Kills the command's process group; its exit still follows.
    async fn kill(&mut self) -> Result<(), AgentError>;
}

/// What can be sent to a running command while its events are pulled
/// elsewhere, as a link implements it.
#[async_trait]
pub trait ExecInput: Send + Sync {
    /// Sends bytes to the command's stdin (or its terminal), waiting for the
    /// guest's credit.
    async fn write_stdin(&self, bytes: &[u8]) -> Result<(), AgentError>;

    /// Closes the command's stdin.
    async fn close_stdin(&self) -> Result<(), AgentError>;

    /// Sends `signal` to the command's process group.
    async fn signal(&self, signal: i32) -> Result<(), AgentError>;

    /// Resizes the command's terminal.
    async fn resize(&self, size: PtySize) -> Result<(), AgentError>;

    /// Kills the command's process group (SIGKILL; its exit says `killed`).
    async fn kill(&self) -> Result<(), AgentError>;
}

/// A handle on a running command's input and signals: cheap to clone, usable
/// from any task while another pulls [`Exec::next`]. Once the command has
/// ended (or its [`Exec`] was dropped), `write_stdin` fails and the others
/// do nothing.
#[derive(Clone)]
pub struct ExecControl(Arc<dyn ExecInput>);

impl ExecControl {
    /// A handle sending through `input`.
    pub fn new(input: Arc<dyn ExecInput>) -> ExecControl {
        ExecControl(input)
    }

    /// Sends bytes to the command's stdin (its terminal, with a pty),
    /// waiting for the guest's credit. Concurrent writes are not interleaved.
    pub async fn write_stdin(&self, bytes: &[u8]) -> Result<(), AgentError> {
        self.0.write_stdin(bytes).await
    }

    /// Closes the command's stdin (with a pty: nothing to close; ignored).
    pub async fn close_stdin(&self) -> Result<(), AgentError> {
        self.0.close_stdin().await
    }

    /// Sends `signal` (1..=64) to the command's process group.
    pub async fn signal(&self, signal: i32) -> Result<(), AgentError> {
        self.0.signal(signal).await
    }

    /// Resizes the command's terminal (commands started with a pty).
    pub async fn resize(&self, size: PtySize) -> Result<(), AgentError> {
        self.0.resize(size).await
    }

    /// Kills the command's process group; its [`ExecEvent::Exit`] still follows.
    pub async fn kill(&self) -> Result<(), AgentError> {
        self.0.kill().await
    }
}

impl std::fmt::Debug for ExecControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecControl").finish_non_exhaustive()
    }
}

/// A running command. Dropping it before the exit kills the command.
pub struct Exec {
    pid: u32,
    events: Box<dyn ExecStream>,
    control: ExecControl,
}

impl Exec {
    /// A command of pid `pid` whose events come from `events` and whose
    /// input goes through `control`.
    pub fn new(pid: u32, events: Box<dyn ExecStream>, control: ExecControl) -> Exec {
        Exec {
            pid,
            events,
            control,
        }
    }

    /// The command's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle on the command's stdin, signals and terminal, for other tasks.
    pub fn control(&self) -> ExecControl {
        self.control.clone()
    }

    /// The next output chunk or the exit.
    pub async fn next(&mut self) -> Result<ExecEvent, AgentError> {
        self.events.next().await
    }

    /// Kills the command's process group; its [`ExecEvent::Exit`] still follows.
    pub async fn kill(&mut self) -> Result<(), AgentError> {
        self.events.kill().await
    }
}

/// A directory watch's events, as a link delivers them. Dropping it stops
/// the watch.
#[async_trait]
pub trait WatchStream: Send {
    /// The next change. An error ends the watch (the directory went away,
    /// the guest fell behind and lost events, the connection broke).
    async fn next(&mut self) -> Result<FsEvent, AgentError>;
}

/// A directory watch. Dropping it stops the watch in the guest.
pub struct Watch(Box<dyn WatchStream>);

impl Watch {
    /// A watch whose events come from `events`.
    pub fn new(events: Box<dyn WatchStream>) -> Watch {
        Watch(events)
    }

    /// The next change, waiting for it. Credit for events goes back to the
    /// guest as each is taken, so an unread watch holds back the guest, not
    /// memory on the host.
    pub async fn next(&mut self) -> Result<FsEvent, AgentError> {
        self.0.next().await
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

/// Where an upload's bytes go, as a link takes them. Dropping it before
/// [`UploadSink::finish`] aborts the upload and the guest removes the partial
/// file.
#[async_trait]
pub trait UploadSink: Send {
    /// Sends the next bytes of the file (waits for credit).
    async fn write(&mut self, bytes: &[u8]) -> Result<(), AgentError>;

    /// Ends the upload and waits until the file is in place.
    async fn finish(&mut self) -> Result<Done, AgentError>;
}

/// An upload in progress. Dropping it before [`Upload::finish`] aborts it and
/// the guest removes the partial file.
pub struct Upload(Box<dyn UploadSink>);

impl Upload {
    /// An upload into `sink`.
    pub fn new(sink: Box<dyn UploadSink>) -> Upload {
        Upload(sink)
    }

    /// Sends the next bytes of the file (waits for credit).
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), AgentError> {
        self.0.write(bytes).await
    }

    /// Ends the upload and waits until the file is in place.
    pub async fn finish(mut self) -> Result<Done, AgentError> {
        self.0.finish().await
    }
}

/// A file's chunks, as a link delivers them. Dropping it early aborts the
/// download.
pub trait DownloadStream: Send {
    /// The next chunk of the file, `None` at its end. Credit goes back to the
    /// guest as chunks are taken.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Vec<u8>>, AgentError>>;
}

/// A download in progress. Dropping it early aborts it.
pub struct Download {
    /// The file's size and mode when the agent opened it.
    pub info: FileInfo,
    chunks: Box<dyn DownloadStream>,
    recycler: Recycler,
}

impl Download {
    /// A download of a file described by `info`, whose chunks come from
    /// `chunks` and may be handed back to `recycler`.
    pub fn new(info: FileInfo, chunks: Box<dyn DownloadStream>, recycler: Recycler) -> Download {
        Download {
            info,
            chunks,
            recycler,
        }
    }

    /// The next chunk of the file, or `None` at its end.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, AgentError> {
        poll_fn(|cx| self.poll_chunk(cx)).await
    }

    /// [`Download::next_chunk`] as a poll, for a caller that is itself polled
    /// (a response body).
    pub fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Vec<u8>>, AgentError>> {
        self.chunks.poll_chunk(cx)
    }

    /// Where chunks can be handed back once used, to be read into again.
    pub fn recycler(&self) -> Recycler {
        self.recycler.clone()
    }
}

/// Buffers a download reads into, taking back the chunks it returned.
pub trait ChunkPool: Send + Sync {
    /// Takes back a chunk (it may keep it to read into again, or drop it).
    fn give(&self, chunk: Vec<u8>);
}

/// Where a download's chunks go once the caller is done with them: handing
/// them back (optional) lets the download reuse them instead of allocating.
#[derive(Clone)]
pub struct Recycler(Option<Arc<dyn ChunkPool>>);

impl Recycler {
    /// Chunks go back to `pool`.
    pub fn new(pool: Arc<dyn ChunkPool>) -> Recycler {
        Recycler(Some(pool))
    }

    /// Chunks are dropped (a download that does not reuse buffers).
    pub fn discard() -> Recycler {
        Recycler(None)
    }

    /// Takes back a chunk that [`Download::next_chunk`] returned.
    pub fn give(&self, chunk: Vec<u8>) {
        if let Some(pool) = &self.0 {
            pool.give(chunk);
        }
    }
}

impl std::fmt::Debug for Recycler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recycler").finish_non_exhaustive()
    }
}
