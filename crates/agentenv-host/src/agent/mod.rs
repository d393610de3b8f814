//! The host side of the agent protocol (tokio over Unix sockets): the engine's
//! [`AgentConnector`] and [`AgentLink`].
//!
//! One [`AgentClient`] is one connection to one VM's agent. Requests are
//! multiplexed on it: each gets a stream id, a channel its frames are routed
//! to by a reader task, and a credit semaphore for the bytes it sends. Credit
//! for the guest's output is returned as the caller takes each chunk, so a slow
//! consumer slows only its own stream and the host never buffers more than a
//! window per stream.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch, Semaphore};

use agentenv_core::agent::{
    AgentConnector, AgentError, AgentLink, ChunkPool, Download, DownloadStream, Exec, ExecEvent,
    ExecStream, Recycler, Upload, UploadSink,
};
use agentenv_core::backend::AgentChannel;
use agentenv_proto::{
    self as proto, Done, ErrorMsg, ExecRequest, FileInfo, Frame, GetFile, Hello, HelloOk, Kind,
    PutFile, Started, DATA_CHUNK, GRANT_BATCH, HEADER_LEN, INITIAL_WINDOW, NONCE_LEN,
    PROTOCOL_VERSION,
};

/// Connects to agents over their VM's [`AgentChannel`] (the engine's
/// [`AgentConnector`] in the daemon).
#[derive(Debug, Default, Clone, Copy)]
pub struct SocketConnector;

#[async_trait::async_trait]
impl AgentConnector for SocketConnector {
    async fn connect(
        &self,
        channel: &AgentChannel,
        timeout: Duration,
    ) -> Result<Arc<dyn AgentLink>, AgentError> {
        Ok(Arc::new(AgentClient::connect(channel, timeout).await?))
    }
}

/// Per-stream routing state.
struct Route {
    tx: mpsc::UnboundedSender<Frame>,
    /// Credit for the bytes this stream sends (`Data`).
    credit: Arc<Semaphore>,
    /// Where the stream's large payloads are read into (a download's).
    pool: Option<Arc<BufPool>>,
}

/// The most buffers a [`BufPool`] keeps: a window's worth of full frames
/// (what a stream can have in flight) and a few more. A pool only keeps what
/// its transfer had in use at once, so a fast consumer keeps a few; a slow
/// one, whose window fills again and again, reuses the same buffers instead
/// of allocating a fresh window each time (from another thread's arena).
const POOL_KEEP: usize = INITIAL_WINDOW as usize / DATA_CHUNK + 8;

/// A frame (header and a full bulk payload): what an upload's buffers hold.
const DATA_FRAME: usize = HEADER_LEN + DATA_CHUNK;

/// A payload at least this large that is not all in the read buffer yet is
/// read straight into its own buffer instead of through the read buffer.
const DIRECT_READ_MIN: usize = 16 * 1024;

/// Frame-sized buffers one transfer reuses, so that moving a large file
/// neither allocates nor pages in fresh memory for every frame. It keeps at
/// most [`POOL_KEEP`] of them, and goes with the transfer.
#[derive(Default)]
struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    /// An empty buffer with room for at least `cap` bytes.
    fn take(&self, cap: usize) -> Vec<u8> {
        let got = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match got {
            Some(mut v) => {
                v.reserve(cap);
                v
            }
            None => Vec::with_capacity(cap),
        }
    }

    fn give(&self, mut v: Vec<u8>) {
        // Only buffers of a frame's size are worth keeping.
        if !(DATA_CHUNK..=2 * DATA_FRAME).contains(&v.capacity()) {
            return;
        }
        v.clear();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < POOL_KEEP {
            free.push(v);
        }
    }
}

impl ChunkPool for BufPool {
    fn give(&self, chunk: Vec<u8>) {
        BufPool::give(self, chunk);
    }
}

/// Wire bytes for the writer task; buffers of a pool go back to it once written.
struct Outgoing {
    bytes: Vec<u8>,
    pool: Option<Arc<BufPool>>,
}

struct Inner {
    /// Encoded frames for the writer task. Writing happens in that task only,
    /// so a caller that gives up can never leave half a frame on the wire.
    /// Unbounded, but bulk data is queued only within a stream's credit.
    out: mpsc::UnboundedSender<Outgoing>,
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
        self.send_out(Outgoing { bytes, pool: None })
    }

    fn send_out(&self, out: Outgoing) -> Result<(), AgentError> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(AgentError::Closed(self.reason()));
        }
        self.out
            .send(out)
            .map_err(|_| AgentError::Closed(self.reason()))
    }

    /// A buffer for an `n`-byte payload of `stream`: from the stream's pool
    /// when it has one.
    fn payload_buf(&self, stream: u32, n: usize) -> Vec<u8> {
        let pool = self
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&stream)
            .and_then(|r| r.pool.clone());
        match pool {
            Some(p) => p.take(n),
            None => Vec::with_capacity(n),
        }
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
    pub async fn connect(
        channel: &AgentChannel,
        timeout: Duration,
    ) -> Result<AgentClient, AgentError> {
        let ms = timeout.as_millis() as u64;
        match tokio::time::timeout(timeout, Self::connect_inner(channel)).await {
            Ok(r) => r,
            Err(_) => Err(AgentError::Timeout(ms)),
        }
    }

    async fn connect_inner(channel: &AgentChannel) -> Result<AgentClient, AgentError> {
        let (path, port) = match channel {
            AgentChannel::Stream(p) => (p.as_path(), None),
            AgentChannel::HybridVsock { socket, port } => (socket.as_path(), Some(*port)),
        };
        let mut sock = UnixStream::connect(path)
            .await
            .map_err(|e| AgentError::Connect(format!("{}: {e}", path.display())))?;
        if let Some(port) = port {
            vsock_handshake(&mut sock, path, port).await?;
        }
        // Halves that need no lock between them (`tokio::io::split` takes
        // one around every read and write, so the reader task would wait
        // while the writer task's write runs).
        let (rd, wr) = sock.into_split();
        Self::handshake_halves(rd, wr).await
    }

    /// Runs the protocol handshake over an already connected byte stream.
    pub async fn handshake<S>(sock: S) -> Result<AgentClient, AgentError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (rd, wr) = tokio::io::split(sock);
        Self::handshake_halves(rd, wr).await
    }

    async fn handshake_halves<R, W>(mut rd: R, mut wr: W) -> Result<AgentClient, AgentError>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
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

    fn open(&self) -> Result<Request, AgentError> {
        self.open_with(None)
    }

    /// Opens a stream whose large payloads are read into `pool`'s buffers.
    fn open_with(&self, pool: Option<Arc<BufPool>>) -> Result<Request, AgentError> {
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
                    pool,
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
}

#[async_trait::async_trait]
impl AgentLink for AgentClient {
    /// The agent's handshake answer (its version and pid).
    fn hello(&self) -> &HelloOk {
        &self.inner.hello
    }

    /// True once the connection is gone.
    fn is_closed(&self) -> bool {
        self.inner.closed.borrow().is_some()
    }

    /// Resolves when the connection is gone, with the reason.
    async fn closed(&self) -> String {
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
    fn shutdown(&self) {
        self.inner.close("closed by the host".into());
    }

    /// Liveness check.
    async fn ping(&self) -> Result<(), AgentError> {
        let mut r = self.open()?;
        r.send(Kind::Ping, Vec::new())?;
        r.expect_done().await.map(|_| ())
    }

    /// Starts a command. With `stdin`, its bytes are sent and stdin closed.
    async fn exec(&self, req: &ExecRequest, stdin: Option<Vec<u8>>) -> Result<Exec, AgentError> {
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
        Ok(Exec::new(started.pid, Box::new(ExecFrames { req: r })))
    }

    /// Starts an upload; write the content with [`Upload::write`], then [`Upload::finish`].
    async fn put_file(&self, put: &PutFile) -> Result<Upload, AgentError> {
        let r = self.open()?;
        r.send_json(Kind::PutFile, put)?;
        Ok(Upload::new(Box::new(UploadFrames {
            req: r,
            frame: Vec::new(),
            pool: Arc::default(),
        })))
    }

    /// Starts a download; read it with [`Download::next_chunk`].
    async fn get_file(&self, path: &str) -> Result<Download, AgentError> {
        let pool = Arc::<BufPool>::default();
        let mut r = self.open_with(Some(pool.clone()))?;
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
        let recycler = Recycler::new(pool);
        Ok(Download::new(
            info,
            Box::new(DownloadFrames { req: r, done: None }),
            recycler,
        ))
    }

    /// Freezes the guest's writable file systems.
    async fn freeze(&self) -> Result<Done, AgentError> {
        let mut r = self.open()?;
        r.send(Kind::Freeze, Vec::new())?;
        r.expect_done().await
    }

    /// Thaws what [`AgentClient::freeze`] froze.
    async fn thaw(&self) -> Result<Done, AgentError> {
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
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    mut closed: watch::Receiver<Option<String>>,
) {
    loop {
        let out = tokio::select! {
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
        if let Err(e) = wr.write_all(&out.bytes).await {
            if let Some(i) = inner.upgrade() {
                i.close(format!("write failed: {e}"));
            }
            break;
        }
        if let Some(pool) = out.pool {
            pool.give(out.bytes);
        }
    }
    let _ = wr.shutdown().await;
}

/// Reads at most `limit` bytes into `buf`; `None` once the connection is
/// closed (by this side) while waiting.
async fn read_some<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
    closed: &mut watch::Receiver<Option<String>>,
) -> Option<std::io::Result<usize>> {
    loop {
        let mut limited = (&mut *rd).take(limit as u64);
        tokio::select! {
            r = limited.read_buf(buf) => return Some(r),
            c = closed.changed() => {
                if c.is_err() || closed.borrow().is_some() {
                    return None;
                }
            }
        }
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    inner: std::sync::Weak<Inner>,
    mut rd: R,
    mut buf: Vec<u8>,
    mut closed: watch::Receiver<Option<String>>,
) {
    const READ_SIZE: usize = 256 * 1024;
    // Set once a payload was read straight into its own buffer: the next read
    // takes only the next header, so that a large payload after it can be too.
    let mut header_only = false;
    loop {
        // Every whole frame in the buffer, then one move of the partial tail.
        let mut pos = 0;
        // A large frame whose payload is only partly here: (kind, stream,
        // length, the bytes so far).
        let mut partial = None;
        while buf.len() - pos >= HEADER_LEN {
            let h: [u8; HEADER_LEN] = buf[pos..pos + HEADER_LEN]
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
            let end = pos + HEADER_LEN + n;
            if buf.len() < end && n < DIRECT_READ_MIN {
                break;
            }
            let Some(i) = inner.upgrade() else { return };
            let mut payload = if n >= DIRECT_READ_MIN {
                i.payload_buf(stream, n)
            } else {
                Vec::with_capacity(n)
            };
            payload.extend_from_slice(&buf[pos + HEADER_LEN..end.min(buf.len())]);
            if buf.len() < end {
                pos = buf.len();
                partial = Some((kind, stream, n, payload));
                break;
            }
            pos = end;
            dispatch(
                &i,
                Frame {
                    kind,
                    stream,
                    payload,
                },
            );
        }
        buf.drain(..pos);
        let read = match partial {
            Some((kind, stream, n, mut payload)) => {
                // The rest of the payload goes straight into its buffer (not
                // past it: the reads are limited to what the frame lacks).
                let read = loop {
                    let want = n - payload.len();
                    let Some(r) = read_some(&mut rd, &mut payload, want, &mut closed).await else {
                        return;
                    };
                    match r {
                        Ok(m) if m > 0 && payload.len() < n => {}
                        r => break r,
                    }
                };
                if let Ok(1..) = read {
                    let Some(i) = inner.upgrade() else { return };
                    dispatch(
                        &i,
                        Frame {
                            kind,
                            stream,
                            payload,
                        },
                    );
                    header_only = true;
                    continue;
                }
                read
            }
            None => {
                let header = std::mem::take(&mut header_only) && buf.len() < HEADER_LEN;
                let want = if header {
                    HEADER_LEN - buf.len()
                } else {
                    READ_SIZE
                };
                buf.reserve(want);
                let Some(r) = read_some(&mut rd, &mut buf, want, &mut closed).await else {
                    return;
                };
                r
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
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Frame, AgentError>> {
        Poll::Ready(match ready!(self.rx.poll_recv(cx)) {
            Some(f) if f.kind == Kind::Error => {
                self.finished = true;
                parse(&f).and_then(|m| Err(AgentError::Remote(m)))
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
        })
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

/// A running command's frames.
struct ExecFrames {
    req: Request,
}

#[async_trait::async_trait]
impl ExecStream for ExecFrames {
    async fn next(&mut self) -> Result<ExecEvent, AgentError> {
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

    async fn kill(&mut self) -> Result<(), AgentError> {
        self.req.send(Kind::Kill, Vec::new())
    }
}

/// An upload's frames.
struct UploadFrames {
    req: Request,
    /// The next `Data` frame: room for its header, then the bytes gathered
    /// so far (empty when none is started). Small writes are gathered into
    /// full frames; a frame goes out once it holds [`DATA_CHUNK`] bytes.
    frame: Vec<u8>,
    /// The frames' buffers, back from the writer task once written.
    pool: Arc<BufPool>,
}

impl UploadFrames {
    /// Sends the gathered frame once its credit is there.
    async fn send_frame(&mut self) -> Result<(), AgentError> {
        let n = self.frame.len() - HEADER_LEN;
        let credit = self.req.credit.clone();
        tokio::select! {
            permit = credit.acquire_many(n as u32) => permit
                .map_err(|_| AgentError::Closed(self.req.inner.reason()))?
                .forget(),
            f = self.req.next() => return Err(match f {
                Ok(f) => self.req.unexpected(f),
                Err(e) => e,
            }),
        }
        let mut bytes = std::mem::take(&mut self.frame);
        bytes[..HEADER_LEN].copy_from_slice(&proto::header(Kind::Data, self.req.id, n));
        self.req.inner.send_out(Outgoing {
            bytes,
            pool: Some(self.pool.clone()),
        })
    }
}

#[async_trait::async_trait]
impl UploadSink for UploadFrames {
    async fn write(&mut self, mut bytes: &[u8]) -> Result<(), AgentError> {
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
        while !bytes.is_empty() {
            if self.frame.is_empty() {
                self.frame = self.pool.take(DATA_FRAME);
                self.frame.extend_from_slice(&[0; HEADER_LEN]);
            }
            let n = (DATA_FRAME - self.frame.len()).min(bytes.len());
            self.frame.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.frame.len() == DATA_FRAME {
                self.send_frame().await?;
            }
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<Done, AgentError> {
        if self.frame.len() > HEADER_LEN {
            self.send_frame().await?;
        }
        self.req.send(Kind::Eof, Vec::new())?;
        self.req.expect_done().await
    }
}

/// A download's frames (its chunks are read into the stream's pool).
struct DownloadFrames {
    req: Request,
    done: Option<Done>,
}

impl DownloadStream for DownloadFrames {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Vec<u8>>, AgentError>> {
        if self.done.is_some() {
            return Poll::Ready(Ok(None));
        }
        let f = match ready!(self.req.poll_next(cx)) {
            Ok(f) => f,
            Err(e) => return Poll::Ready(Err(e)),
        };
        Poll::Ready(match f.kind {
            Kind::FileData => {
                self.req.grant(f.payload.len());
                Ok(Some(f.payload))
            }
            Kind::Done => parse(&f).map(|d| {
                self.done = Some(d);
                None
            }),
            _ => Err(self.req.unexpected(f)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_keep_a_few_frame_sized_buffers() {
        let pool = BufPool::default();
        for _ in 0..POOL_KEEP + 3 {
            pool.give(Vec::with_capacity(DATA_FRAME));
        }
        pool.give(vec![0; 16]);
        pool.give(Vec::with_capacity(16 * DATA_FRAME));
        assert_eq!(pool.free.lock().unwrap().len(), POOL_KEEP);
        let v = pool.take(DATA_FRAME);
        assert!(v.is_empty() && v.capacity() >= DATA_FRAME);
        assert_eq!(pool.free.lock().unwrap().len(), POOL_KEEP - 1);
    }
}
