//! The host side of the agent protocol (tokio).
//!
//! One [`AgentClient`] is one connection to one VM's agent. Requests are
//! multiplexed on it: each gets a stream id, a channel its frames are routed
//! to by a reader task, and a credit semaphore for the bytes it sends. Credit
//! for the guest's output is returned as the caller takes each chunk, so a slow
//! consumer slows only its own stream and the host never buffers more than a
//! window per stream.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::proto::{
    self, Done, ErrorMsg, ExecRequest, ExitStatus, FileInfo, Frame, GetFile, Hello, HelloOk, Kind,
    PutFile, Started, DATA_CHUNK, GRANT_BATCH, INITIAL_WINDOW, NONCE_LEN, PROTOCOL_VERSION,
};

/// How to reach an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket that carries the byte stream (QEMU's virtio-serial chardev,
    /// or an agent started with `--listen-unix`).
    Stream(PathBuf),
    /// Firecracker's hybrid vsock: the device's Unix socket and the guest port.
    HybridVsock {
        /// The vsock device's Unix socket.
        socket: PathBuf,
        /// The guest port the agent listens on.
        port: u32,
    },
}

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

/// Per-stream routing state.
struct Route {
    tx: mpsc::UnboundedSender<Frame>,
    /// Credit for the bytes this stream sends (`Data`).
    credit: Arc<Semaphore>,
}

struct Inner {
    /// Encoded frames for the writer task. Writing happens in that task only,
    /// so a caller that gives up can never leave half a frame on the wire.
    /// Unbounded, but bulk data is queued only within a stream's credit.
    out: mpsc::UnboundedSender<Vec<u8>>,
    routes: Mutex<HashMap<u32, Route>>,
    next_stream: AtomicU32,
    /// Set once the connection is gone, with the reason.
    closed: watch::Sender<Option<String>>,
    hello: HelloOk,
    dead: AtomicBool,
}

impl Inner {
    fn send(&self, f: &Frame) -> Result<(), AgentError> {
        self.send_encoded(f.encode())
    }

    fn send_encoded(&self, bytes: Vec<u8>) -> Result<(), AgentError> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(AgentError::Closed(self.reason()));
        }
        self.out
            .send(bytes)
            .map_err(|_| AgentError::Closed(self.reason()))
    }

    fn close(&self, why: String) {
        if self.dead.swap(true, Ordering::SeqCst) {
            return;
        }
        self.closed.send_replace(Some(why));
        // Dropping the senders ends every request's receiver.
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn reason(&self) -> String {
        self.closed
            .borrow()
            .clone()
            .unwrap_or_else(|| "closed".to_string())
    }
}

/// A connection to one VM's agent.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("agent", &self.inner.hello.agent)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// 16 random lower-case hex characters.
fn nonce() -> [u8; NONCE_LEN] {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let v = h.finish();
    let mut out = [0u8; NONCE_LEN];
    for (i, b) in out.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[((v >> (i * 4)) & 0xf) as usize];
    }
    out
}

/// How often an unanswered hello is sent again.
const HELLO_RESEND: Duration = Duration::from_millis(300);

/// Most bytes skipped while looking for the agent's `HelloOk`.
const MAX_RESYNC_BYTES: usize = 8 << 20;

impl AgentClient {
    /// Connects and performs the handshake, all within `timeout`.
    pub async fn connect(ep: &Endpoint, timeout: Duration) -> Result<AgentClient, AgentError> {
        let ms = timeout.as_millis() as u64;
        match tokio::time::timeout(timeout, Self::connect_inner(ep)).await {
            Ok(r) => r,
            Err(_) => Err(AgentError::Timeout(ms)),
        }
    }

    async fn connect_inner(ep: &Endpoint) -> Result<AgentClient, AgentError> {
        let (path, port) = match ep {
            Endpoint::Stream(p) => (p.as_path(), None),
            Endpoint::HybridVsock { socket, port } => (socket.as_path(), Some(*port)),
        };
        let mut sock = UnixStream::connect(path)
            .await
            .map_err(|e| AgentError::Connect(format!("{}: {e}", path.display())))?;
        if let Some(port) = port {
            vsock_handshake(&mut sock, path, port).await?;
        }
        Self::handshake(sock).await
    }

    /// Runs the protocol handshake over an already connected byte stream.
    pub async fn handshake<S>(sock: S) -> Result<AgentClient, AgentError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(sock);
        let nonce = nonce();
        let hello = Frame::json(
            Kind::Hello,
            0,
            &Hello {
                version: PROTOCOL_VERSION,
                nonce: String::from_utf8_lossy(&nonce).into_owned(),
            },
        );
        wr.write_all(&hello.encode())
            .await
            .map_err(|e| AgentError::Connect(format!("sending hello: {e}")))?;
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        let hello_ok = loop {
            if let Some(at) = proto::find_hello_ok(&buf, &nonce) {
                buf.drain(..at);
                match proto::take_frame(&mut buf) {
                    Ok(Some(f)) => break f,
                    Ok(None) => {}
                    Err(e) => return Err(AgentError::Protocol(e.to_string())),
                }
            } else if let Some(msg) = leading_error(&buf)? {
                // An error on stream 0 before our HelloOk: the agent refused the hello.
                if msg.error.contains("version") {
                    return Err(AgentError::Remote(msg));
                }
            }
            if buf.len() > MAX_RESYNC_BYTES {
                return Err(AgentError::Protocol(format!(
                    "no hello answer in the first {MAX_RESYNC_BYTES} bytes"
                )));
            }
            // A serial port drops what arrives before the guest opens it, so the
            // hello is repeated until answered (each answer carries the nonce).
            let n = tokio::select! {
                r = rd.read(&mut chunk) => r
                    .map_err(|e| AgentError::Connect(format!("reading hello answer: {e}")))?,
                _ = tokio::time::sleep(HELLO_RESEND) => {
                    wr.write_all(&hello.encode())
                        .await
                        .map_err(|e| AgentError::Connect(format!("sending hello: {e}")))?;
                    continue;
                }
            };
            if n == 0 {
                return Err(AgentError::Connect(
                    "the connection closed before the agent answered".into(),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let hello: HelloOk =
            serde_json::from_slice(&hello_ok.payload[NONCE_LEN.min(hello_ok.payload.len())..])
                .map_err(|e| AgentError::Protocol(format!("bad hello answer: {e}")))?;
        if hello.version != PROTOCOL_VERSION {
            return Err(AgentError::Protocol(format!(
                "the agent speaks protocol {} and this host {PROTOCOL_VERSION}",
                hello.version
            )));
        }
        let (closed, _) = watch::channel(None);
        let (out, out_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            out,
            routes: Mutex::new(HashMap::new()),
            next_stream: AtomicU32::new(1),
            closed,
            hello,
            dead: AtomicBool::new(false),
        });
        tokio::spawn(write_loop(
            Arc::downgrade(&inner),
            wr,
            out_rx,
            inner.closed.subscribe(),
        ));
        tokio::spawn(read_loop(
            Arc::downgrade(&inner),
            rd,
            buf,
            inner.closed.subscribe(),
        ));
        Ok(AgentClient { inner })
    }

    /// The agent's handshake answer (its version and pid).
    pub fn hello(&self) -> &HelloOk {
        &self.inner.hello
    }

    /// True once the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.borrow().is_some()
    }

    /// Resolves when the connection is gone, with the reason.
    pub async fn closed(&self) -> String {
        let mut rx = self.inner.closed.subscribe();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                return "closed".into();
            }
        }
    }

    /// Closes the connection; requests in flight fail.
    pub fn shutdown(&self) {
        self.inner.close("closed by the host".into());
    }

    fn open(&self) -> Result<Request, AgentError> {
        if self.is_closed() {
            return Err(AgentError::Closed(self.inner.reason()));
        }
        let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(INITIAL_WINDOW as usize));
        self.inner
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                Route {
                    tx,
                    credit: credit.clone(),
                },
            );
        Ok(Request {
            inner: self.inner.clone(),
            id,
            rx,
            credit,
            finished: false,
            ungranted: 0,
        })
    }

    /// Liveness check.
    pub async fn ping(&self) -> Result<(), AgentError> {
        let mut r = self.open()?;
        r.send(Kind::Ping, Vec::new())?;
        r.expect_done().await.map(|_| ())
    }

    /// Starts a command. With `stdin`, its bytes are sent and stdin closed.
    pub async fn exec(
        &self,
        req: &ExecRequest,
        stdin: Option<Vec<u8>>,
    ) -> Result<Exec, AgentError> {
        let mut req = req.clone();
        req.stdin = stdin.is_some();
        let mut r = self.open()?;
        r.send_json(Kind::Exec, &req)?;
        let f = r.next().await?;
        let started: Started = match f.kind {
            Kind::Started => parse(&f)?,
            _ => return Err(r.unexpected(f)),
        };
        if let Some(bytes) = stdin {
            // Written in the background: the command may read stdin only
            // after producing output the caller must drain first.
            let inner = r.inner.clone();
            let (id, credit) = (r.id, r.credit.clone());
            tokio::spawn(async move {
                let _ = send_data(&inner, id, &credit, &bytes).await;
                let _ = inner.send(&Frame {
                    kind: Kind::Eof,
                    stream: id,
                    payload: Vec::new(),
                });
            });
        }
        Ok(Exec {
            req: r,
            pid: started.pid,
        })
    }

    /// Starts an upload; write the content with [`Upload::write`], then [`Upload::finish`].
    pub async fn put_file(&self, put: &PutFile) -> Result<Upload, AgentError> {
        let r = self.open()?;
        r.send_json(Kind::PutFile, put)?;
        Ok(Upload {
            req: r,
            pending: Vec::new(),
        })
    }

    /// Starts a download; read it with [`Download::next_chunk`].
    pub async fn get_file(&self, path: &str) -> Result<Download, AgentError> {
        let mut r = self.open()?;
        r.send_json(
            Kind::GetFile,
            &GetFile {
                path: path.to_string(),
            },
        )?;
        let f = r.next().await?;
        let info: FileInfo = match f.kind {
            Kind::FileInfo => parse(&f)?,
            _ => return Err(r.unexpected(f)),
        };
        Ok(Download {
            req: r,
            info,
            done: None,
        })
    }

    /// Freezes the guest's writable file systems.
    pub async fn freeze(&self) -> Result<Done, AgentError> {
        let mut r = self.open()?;
        r.send(Kind::Freeze, Vec::new())?;
        r.expect_done().await
    }

    /// Thaws what [`AgentClient::freeze`] froze.
    pub async fn thaw(&self) -> Result<Done, AgentError> {
        let mut r = self.open()?;
        r.send(Kind::Thaw, Vec::new())?;
        r.expect_done().await
    }
}

/// The message of an `Error` frame on stream 0 at the start of `buf`, once
/// whole (read in place: the buffer may hold megabytes of resync bytes).
fn leading_error(buf: &[u8]) -> Result<Option<ErrorMsg>, AgentError> {
    let Some(h) = buf.get(..proto::HEADER_LEN) else {
        return Ok(None);
    };
    let h: [u8; proto::HEADER_LEN] = h.try_into().expect("length checked");
    let Ok((kind, stream, n)) = proto::parse_header(&h) else {
        return Ok(None);
    };
    if kind != Kind::Error || stream != 0 {
        return Ok(None);
    }
    let Some(payload) = buf.get(proto::HEADER_LEN..proto::HEADER_LEN + n) else {
        return Ok(None);
    };
    serde_json::from_slice(payload)
        .map(Some)
        .map_err(|e| AgentError::Protocol(format!("bad Error message: {e}")))
}

async fn vsock_handshake(sock: &mut UnixStream, path: &Path, port: u32) -> Result<(), AgentError> {
    sock.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| AgentError::Connect(format!("{}: {e}", path.display())))?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = sock
            .read(&mut b)
            .await
            .map_err(|e| AgentError::Connect(format!("{}: {e}", path.display())))?;
        if n == 0 {
            return Err(AgentError::Connect(format!(
                "{}: nothing listens on guest vsock port {port} yet",
                path.display()
            )));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 64 {
            return Err(AgentError::Protocol("vsock handshake line too long".into()));
        }
    }
    let line = String::from_utf8_lossy(&line);
    if !line.starts_with("OK ") {
        return Err(AgentError::Connect(format!(
            "{}: vsock CONNECT {port} answered {line:?}",
            path.display()
        )));
    }
    Ok(())
}

async fn write_loop<W: AsyncWrite + Unpin>(
    inner: std::sync::Weak<Inner>,
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    mut closed: watch::Receiver<Option<String>>,
) {
    loop {
        let bytes = tokio::select! {
            b = rx.recv() => match b {
                Some(b) => b,
                None => break,
            },
            c = closed.changed() => {
                if c.is_err() || closed.borrow().is_some() {
                    break;
                }
                continue;
            }
        };
        if let Err(e) = wr.write_all(&bytes).await {
            if let Some(i) = inner.upgrade() {
                i.close(format!("write failed: {e}"));
            }
            break;
        }
    }
    let _ = wr.shutdown().await;
}

async fn read_loop<R: AsyncRead + Unpin>(
    inner: std::sync::Weak<Inner>,
    mut rd: R,
    mut buf: Vec<u8>,
    mut closed: watch::Receiver<Option<String>>,
) {
    const READ_SIZE: usize = 256 * 1024;
    loop {
        // Every whole frame in the buffer, then one move of the partial tail.
        let mut pos = 0;
        while buf.len() - pos >= proto::HEADER_LEN {
            let h: [u8; proto::HEADER_LEN] = buf[pos..pos + proto::HEADER_LEN]
                .try_into()
                .expect("length checked");
            let (kind, stream, n) = match proto::parse_header(&h) {
                Ok(x) => x,
                Err(e) => {
                    if let Some(i) = inner.upgrade() {
                        i.close(format!("protocol error from the agent: {e}"));
                    }
                    return;
                }
            };
            let end = pos + proto::HEADER_LEN + n;
            if buf.len() < end {
                break;
            }
            let frame = Frame {
                kind,
                stream,
                payload: buf[pos + proto::HEADER_LEN..end].to_vec(),
            };
            pos = end;
            let Some(i) = inner.upgrade() else { return };
            dispatch(&i, frame);
        }
        buf.drain(..pos);
        buf.reserve(READ_SIZE);
        let read = tokio::select! {
            r = rd.read_buf(&mut buf) => r,
            c = closed.changed() => {
                if c.is_err() || closed.borrow().is_some() {
                    return;
                }
                continue;
            }
        };
        let why = match read {
            Ok(0) => "the agent closed the connection".to_string(),
            Ok(_) => continue,
            Err(e) => format!("read failed: {e}"),
        };
        if let Some(i) = inner.upgrade() {
            i.close(why);
        }
        return;
    }
}

fn dispatch(inner: &Inner, frame: Frame) {
    if frame.stream == 0 {
        let why = match frame.kind {
            // The answer to a repeated hello.
            Kind::HelloOk => return,
            Kind::Error => frame
                .parse::<ErrorMsg>()
                .map(|m| m.error)
                .unwrap_or_else(|e| e.to_string()),
            k => format!("unexpected {k:?} on stream 0"),
        };
        inner.close(format!("the agent reported a protocol error: {why}"));
        return;
    }
    let routes = inner.routes.lock().unwrap_or_else(|p| p.into_inner());
    let Some(route) = routes.get(&frame.stream) else {
        return; // a request the host has given up on
    };
    if frame.kind == Kind::GuestWindow {
        if let Ok(n) = frame.window_bytes() {
            route.credit.add_permits(n as usize);
        }
        return;
    }
    let _ = route.tx.send(frame);
}

fn parse<T: for<'de> serde::Deserialize<'de>>(f: &Frame) -> Result<T, AgentError> {
    f.parse().map_err(|e| AgentError::Protocol(e.to_string()))
}

/// Sends `bytes` as `Data` frames within the stream's credit.
async fn send_data(
    inner: &Inner,
    id: u32,
    credit: &Semaphore,
    bytes: &[u8],
) -> Result<(), AgentError> {
    for piece in bytes.chunks(DATA_CHUNK) {
        let permit = credit
            .acquire_many(piece.len() as u32)
            .await
            .map_err(|_| AgentError::Closed(inner.reason()))?;
        permit.forget();
        inner.send_encoded(proto::encode(Kind::Data, id, piece))?;
    }
    Ok(())
}

/// One request stream.
struct Request {
    inner: Arc<Inner>,
    id: u32,
    rx: mpsc::UnboundedReceiver<Frame>,
    credit: Arc<Semaphore>,
    /// The agent ended the stream (no `Kill` needed on drop).
    finished: bool,
    /// Bytes consumed but not yet credited back.
    ungranted: usize,
}

impl Request {
    fn send(&self, kind: Kind, payload: Vec<u8>) -> Result<(), AgentError> {
        self.inner.send(&Frame {
            kind,
            stream: self.id,
            payload,
        })
    }

    fn send_json<T: serde::Serialize>(&self, kind: Kind, msg: &T) -> Result<(), AgentError> {
        self.inner.send(&Frame::json(kind, self.id, msg))
    }

    /// The next frame; an `Error` frame becomes `Err(Remote)`.
    async fn next(&mut self) -> Result<Frame, AgentError> {
        match self.rx.recv().await {
            Some(f) if f.kind == Kind::Error => {
                self.finished = true;
                Err(AgentError::Remote(parse(&f)?))
            }
            Some(f) => {
                if matches!(f.kind, Kind::Exit | Kind::Done) {
                    self.finished = true;
                }
                Ok(f)
            }
            None => {
                self.finished = true;
                Err(AgentError::Closed(self.inner.reason()))
            }
        }
    }

    async fn expect_done(&mut self) -> Result<Done, AgentError> {
        let f = self.next().await?;
        match f.kind {
            Kind::Done => parse(&f),
            _ => Err(self.unexpected(f)),
        }
    }

    fn unexpected(&mut self, f: Frame) -> AgentError {
        AgentError::Protocol(format!("unexpected {:?} on stream {}", f.kind, self.id))
    }

    /// Counts `n` consumed bytes; returns credit once a batch has gathered.
    fn grant(&mut self, n: usize) {
        self.ungranted += n;
        if self.ungranted >= GRANT_BATCH as usize {
            let give = std::mem::take(&mut self.ungranted);
            let _ = self
                .inner
                .send(&Frame::window(Kind::Window, self.id, give as u32));
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        self.inner
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        if !self.finished && !self.inner.dead.load(Ordering::SeqCst) {
            // The caller gave up (client disconnect, timeout): stop the work in the guest.
            let _ = self.send(Kind::Kill, Vec::new());
        }
    }
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

/// A running command. Dropping it before the exit kills the command.
pub struct Exec {
    req: Request,
    pid: u32,
}

impl Exec {
    /// The command's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next output chunk or the exit. Credit for output is returned as
    /// each chunk is taken.
    pub async fn next(&mut self) -> Result<ExecEvent, AgentError> {
        let f = self.req.next().await?;
        match f.kind {
            Kind::Stdout => {
                self.req.grant(f.payload.len());
                Ok(ExecEvent::Stdout(f.payload))
            }
            Kind::Stderr => {
                self.req.grant(f.payload.len());
                Ok(ExecEvent::Stderr(f.payload))
            }
            Kind::Exit => Ok(ExecEvent::Exit(parse(&f)?)),
            _ => Err(self.req.unexpected(f)),
        }
    }

    /// Kills the command's process group; its `Exit` still follows.
    pub async fn kill(&mut self) -> Result<(), AgentError> {
        self.req.send(Kind::Kill, Vec::new())
    }
}

/// An upload in progress. Dropping it before [`Upload::finish`] aborts it and
/// the guest removes the partial file.
pub struct Upload {
    req: Request,
    /// Bytes not yet sent: small writes are gathered into full frames.
    pending: Vec<u8>,
}

impl Upload {
    /// Sends the next bytes of the file (waits for credit).
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), AgentError> {
        // An early error (bad path) arrives while the host is still sending.
        if let Ok(f) = self.req.rx.try_recv() {
            return Err(match f.kind {
                Kind::Error => {
                    self.req.finished = true;
                    AgentError::Remote(parse(&f)?)
                }
                _ => self.req.unexpected(f),
            });
        }
        // Whole frames go out; a tail shorter than a frame waits for more.
        if self.pending.is_empty() {
            let full = bytes.len() / DATA_CHUNK * DATA_CHUNK;
            self.send_now(&bytes[..full]).await?;
            self.pending.extend_from_slice(&bytes[full..]);
            return Ok(());
        }
        self.pending.extend_from_slice(bytes);
        let full = self.pending.len() / DATA_CHUNK * DATA_CHUNK;
        let rest = self.pending.split_off(full);
        let now = std::mem::replace(&mut self.pending, rest);
        self.send_now(&now).await
    }

    async fn send_now(&mut self, bytes: &[u8]) -> Result<(), AgentError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let (inner, id, credit) = (self.req.inner.clone(), self.req.id, self.req.credit.clone());
        tokio::select! {
            r = send_data(&inner, id, &credit, bytes) => r,
            f = self.req.next() => Err(match f {
                Ok(f) => self.req.unexpected(f),
                Err(e) => e,
            }),
        }
    }

    /// Ends the upload and waits until the file is in place.
    pub async fn finish(mut self) -> Result<Done, AgentError> {
        let tail = std::mem::take(&mut self.pending);
        self.send_now(&tail).await?;
        self.req.send(Kind::Eof, Vec::new())?;
        self.req.expect_done().await
    }
}

/// A download in progress. Dropping it early aborts it.
pub struct Download {
    req: Request,
    /// The file's size and mode when the agent opened it.
    pub info: FileInfo,
    done: Option<Done>,
}

impl Download {
    /// The next chunk of the file, or `None` at its end.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, AgentError> {
        if self.done.is_some() {
            return Ok(None);
        }
        let f = self.req.next().await?;
        match f.kind {
            Kind::FileData => {
                self.req.grant(f.payload.len());
                Ok(Some(f.payload))
            }
            Kind::Done => {
                self.done = Some(parse(&f)?);
                Ok(None)
            }
            _ => Err(self.req.unexpected(f)),
        }
    }
}
