//! The host side of the agent protocol (tokio over Unix sockets): the engine's
//! [`AgentConnector`] and [`AgentLink`].
//!
//! One [`AgentClient`] is one connection to one VM's agent. Requests are
//! multiplexed on it: each gets a stream id, a channel its frames are routed
//! to by a reader task, and a credit semaphore for the bytes it sends. Credit
//! for the guest's output is returned as the caller takes each chunk, so a slow
//! consumer slows only its own stream and the host never buffers more than a
//! window per stream.

mod handshake;
mod pool;
mod streams;
mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentenv_core::agent::{
    AgentConnector, AgentError, AgentLink, Download, Exec, ExecControl, Recycler, Upload, Watch,
};
use agentenv_core::backend::AgentChannel;
use agentenv_proto::{
    self as proto, Done, ExecRequest, FileInfo, Frame, FsRequest, FsResponse, GetFile, Hello,
    HelloOk, Identity, Kind, PutFile, Started, WatchRequest, INITIAL_WINDOW, NONCE_LEN,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch, Semaphore};

use handshake::{leading_error, nonce, vsock_handshake, HelloResend, MAX_RESYNC_BYTES};
use pool::BufPool;
use streams::{
    fs_answer, parse, send_data, DownloadFrames, ExecFrames, ExecSender, Request, UploadFrames,
    WatchFrames,
};
use wire::{read_loop, write_loop};

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
    /// Bulk bytes (`Stdout`, `Stderr`, `FileData`) the guest may still send:
    /// the credit the host granted and the guest has not spent. Going past
    /// it closes the connection.
    guest_credit: Arc<AtomicI64>,
    /// Frames other than bulk data and credit received so far.
    control_frames: u32,
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
        // Dropping the senders ends every request's receiver; closing the
        // credit wakes every writer waiting for it.
        let routes = std::mem::take(&mut *self.routes.lock().unwrap_or_else(|p| p.into_inner()));
        for r in routes.values() {
            r.credit.close();
        }
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
        let mut resend = HelloResend::new();
        let mut next_hello = tokio::time::Instant::now() + resend.wait();
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
            // hello is repeated until answered (each answer carries the nonce;
            // the agent answers every copy, the first answer found wins). The
            // deadline is kept across reads: bytes that are not the answer
            // do not postpone the next hello.
            let n = tokio::select! {
                r = rd.read(&mut chunk) => r
                    .map_err(|e| AgentError::Connect(format!("reading hello answer: {e}")))?,
                _ = tokio::time::sleep_until(next_hello) => {
                    wr.write_all(&hello.encode())
                        .await
                        .map_err(|e| AgentError::Connect(format!("sending hello: {e}")))?;
                    next_hello = tokio::time::Instant::now() + resend.wait();
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
        let guest_credit = Arc::new(AtomicI64::new(i64::from(INITIAL_WINDOW)));
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
                    guest_credit: guest_credit.clone(),
                    control_frames: 0,
                },
            );
        Ok(Request {
            inner: self.inner.clone(),
            id,
            rx,
            credit,
            guest_credit,
            finished: false,
            ungranted: 0,
        })
    }
}

#[async_trait::async_trait]
impl AgentLink for AgentClient {
    /// Gives a restored VM its new identity; `Done` once the agent applied all of it.
    async fn set_identity(&self, identity: &Identity) -> Result<Done, AgentError> {
        let mut r = self.open()?;
        r.send_json(Kind::Identity, identity)?;
        r.expect_done().await
    }

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

    /// Starts a command. With `stdin`, its bytes are sent and stdin closed;
    /// without, and with `req.stdin`, stdin stays open for [`Exec::control`].
    async fn exec(&self, req: &ExecRequest, stdin: Option<Vec<u8>>) -> Result<Exec, AgentError> {
        let mut req = req.clone();
        req.stdin = req.stdin || stdin.is_some();
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
        let control = ExecControl::new(Arc::new(ExecSender {
            inner: r.inner.clone(),
            id: r.id,
            credit: r.credit.clone(),
            writing: tokio::sync::Mutex::new(()),
        }));
        Ok(Exec::new(
            started.pid,
            Box::new(ExecFrames { req: r }),
            control,
        ))
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
    async fn get_file(&self, get: &GetFile) -> Result<Download, AgentError> {
        let pool = Arc::<BufPool>::default();
        let mut r = self.open_with(Some(pool.clone()))?;
        r.send_json(Kind::GetFile, get)?;
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

    /// One file-system operation; a listing's entries arrive in credited
    /// `FsEntries` frames before the `FsResult`.
    async fn fs(&self, req: &FsRequest) -> Result<FsResponse, AgentError> {
        let mut r = self.open()?;
        r.send_json(Kind::Fs, req)?;
        fs_answer(&mut r).await
    }

    /// Starts a watch: the agent answers `FsResult` (the directory's entry)
    /// once its watches are in place, then `FsEvent`s.
    async fn watch(&self, req: &WatchRequest) -> Result<Watch, AgentError> {
        let mut r = self.open()?;
        r.send_json(Kind::Watch, req)?;
        let f = r.next().await?;
        if f.kind != Kind::FsResult {
            return Err(r.unexpected(f));
        }
        Ok(Watch::new(Box::new(WatchFrames { req: r })))
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

#[cfg(test)]
mod tests {
    use super::*;
    use agentenv_proto::{ErrorCode, ErrorMsg, IdentityNet};
    use std::time::Instant;

    /// Reads the next whole frame from `sock` into/out of `buf`.
    pub(super) async fn next_frame(sock: &mut UnixStream, buf: &mut Vec<u8>) -> Frame {
        loop {
            if let Some(f) = proto::take_frame(buf).unwrap() {
                return f;
            }
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the host closed the connection");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub(super) fn hello_ok(hello: &Frame) -> Frame {
        let ok = HelloOk {
            version: PROTOCOL_VERSION,
            agent: "fake".into(),
            pid: 1,
            features: Vec::new(),
        };
        proto::hello_ok_frame(&hello.parse().unwrap(), &ok)
    }

    fn identity() -> Identity {
        Identity {
            hostname: "clone-3".into(),
            net: Some(IdentityNet {
                address: "172.16.0.14".into(),
                prefix_len: 30,
                gateway: "172.16.0.13".into(),
                mac: "06:00:ac:10:00:0e".into(),
            }),
            entropy_hex: "11".repeat(32),
            unix_time_ns: 1_765_000_000_000_000_000,
        }
    }

    #[tokio::test]
    async fn lost_hellos_are_repeated_within_milliseconds_and_identity_is_sent() {
        let (host, mut agent) = UnixStream::pair().unwrap();
        let fake = tokio::spawn(async move {
            let mut buf = Vec::new();
            // The first three hellos are lost, as on a port not open yet.
            for _ in 0..3 {
                assert_eq!(next_frame(&mut agent, &mut buf).await.kind, Kind::Hello);
            }
            let h = next_frame(&mut agent, &mut buf).await;
            agent.write_all(&hello_ok(&h).encode()).await.unwrap();
            // The first Identity is applied, the second refused.
            let f = next_frame(&mut agent, &mut buf).await;
            assert_eq!(f.kind, Kind::Identity);
            assert_eq!(f.parse::<Identity>().unwrap(), identity());
            let done = Frame::json(Kind::Done, f.stream, &Done::default());
            agent.write_all(&done.encode()).await.unwrap();
            let f = next_frame(&mut agent, &mut buf).await;
            assert_eq!(f.kind, Kind::Identity);
            let err = ErrorMsg::new(ErrorCode::Io, Some("net"), "ip link set: no eth0");
            let err = Frame::json(Kind::Error, f.stream, &err);
            agent.write_all(&err.encode()).await.unwrap();
            agent
        });
        let t = Instant::now();
        let client = AgentClient::handshake(host).await.unwrap();
        let took = t.elapsed();
        // Waits of 5 + 10 + 20 ms; the old fixed 300 ms resend took 900 ms.
        assert!(took < Duration::from_millis(400), "handshake took {took:?}");
        assert_eq!(client.hello().agent, "fake");
        assert_eq!(
            client.set_identity(&identity()).await.unwrap(),
            Done::default()
        );
        match client.set_identity(&identity()).await {
            Err(AgentError::Remote(m)) => assert_eq!(m.field.as_deref(), Some("net"), "{m:?}"),
            other => panic!("expected the agent's error, got {other:?}"),
        }
        drop(fake.await.unwrap());
    }
}

/// A hostile guest's agent: floods, oversized frames, forged credit. The host
/// cuts it off, and its memory stays bounded.
#[cfg(test)]
mod hostile_tests {
    use super::tests::{hello_ok, next_frame};
    use super::*;
    use agentenv_proto::{ExecRequest, GRANT_BATCH, HEADER_LEN, MAX_PAYLOAD};

    /// The test process's resident set, in KiB.
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// A connected host and the fake agent's end, with a stream opened by an
    /// exec the fake answered with `Started` (its id).
    async fn connected() -> (AgentClient, UnixStream, Exec, u32) {
        let (host, mut agent) = UnixStream::pair().unwrap();
        let fake = tokio::spawn(async move {
            let mut buf = Vec::new();
            let h = next_frame(&mut agent, &mut buf).await;
            agent.write_all(&hello_ok(&h).encode()).await.unwrap();
            // The exec request, answered.
            let exec = loop {
                let f = next_frame(&mut agent, &mut buf).await;
                if f.kind == Kind::Exec {
                    break f;
                }
            };
            let started = Frame::json(Kind::Started, exec.stream, &Started { pid: 7 });
            agent.write_all(&started.encode()).await.unwrap();
            (agent, exec.stream)
        });
        let client = AgentClient::handshake(host).await.unwrap();
        let c = client.clone();
        let req: ExecRequest = serde_json::from_str(r#"{"cmd":["yes"]}"#).unwrap();
        let exec = tokio::spawn(async move { c.exec(&req, None).await.unwrap() });
        let (agent, stream) = fake.await.unwrap();
        (client, agent, exec.await.unwrap(), stream)
    }

    /// Writes `total` bytes of `Stdout` frames, stopping when the host hangs
    /// up; returns how many were written.
    async fn flood(agent: &mut UnixStream, stream: u32, total: u64) -> u64 {
        let frame = proto::encode(Kind::Stdout, stream, &vec![b'y'; MAX_PAYLOAD]);
        let mut sent = 0u64;
        while sent < total {
            if agent.write_all(&frame).await.is_err() {
                break;
            }
            sent += MAX_PAYLOAD as u64;
        }
        sent
    }

    async fn closed_within(client: &AgentClient, secs: u64) -> String {
        tokio::time::timeout(Duration::from_secs(secs), client.closed())
            .await
            .expect("the host did not cut the agent off")
    }

    #[tokio::test]
    async fn a_guest_flooding_past_its_window_is_cut_off_and_memory_stays_bounded() {
        let (client, mut agent, exec, stream) = connected().await;
        let before = rss_kib();
        // Nobody reads the command's output, so no credit comes back: an
        // honest agent stops at 4 MiB; this one tries to send 1 GiB.
        let sent = flood(&mut agent, stream, 1 << 30).await;
        let why = closed_within(&client, 10).await;
        let grown = rss_kib().saturating_sub(before);
        assert!(why.contains("flow control"), "{why}");
        assert!(why.contains("credit left"), "{why}");
        assert!(
            sent < 1 << 30,
            "the host kept reading {sent} bytes past the window"
        );
        assert!(grown < 32 * 1024, "rss grew {grown} KiB during the flood");
        drop(exec);
    }

    #[tokio::test]
    async fn output_within_the_credit_the_host_returns_is_not_cut_off() {
        let (client, mut agent, mut exec, stream) = connected().await;
        // 3 windows' worth, sent only as credit allows: the host's grants
        // (one per 256 KiB consumed) let it through.
        let total = 3 * INITIAL_WINDOW as usize;
        let reader = tokio::spawn(async move {
            let mut got = 0;
            while got < total {
                match exec.next().await.unwrap() {
                    agentenv_core::agent::ExecEvent::Stdout(b) => got += b.len(),
                    other => panic!("unexpected {other:?}"),
                }
            }
            (exec, got)
        });
        let mut credit = INITIAL_WINDOW as usize;
        let mut sent = 0;
        let mut buf = Vec::new();
        while sent < total {
            while credit < GRANT_BATCH as usize {
                let f = next_frame(&mut agent, &mut buf).await;
                if f.kind == Kind::Window {
                    credit += f.window_bytes().unwrap() as usize;
                }
            }
            let n = GRANT_BATCH as usize;
            agent
                .write_all(&proto::encode(Kind::Stdout, stream, &vec![b'y'; n]))
                .await
                .unwrap();
            credit -= n;
            sent += n;
        }
        let (_exec, got) = reader.await.unwrap();
        assert_eq!(got, total);
        assert!(!client.is_closed(), "{}", client.inner.reason());
    }

    #[tokio::test]
    async fn an_oversized_frame_header_is_refused_before_any_allocation() {
        let (client, mut agent, _exec, stream) = connected().await;
        let before = rss_kib();
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        h[4] = Kind::Stdout as u8;
        h[5..].copy_from_slice(&stream.to_be_bytes());
        agent.write_all(&h).await.unwrap();
        let why = closed_within(&client, 5).await;
        assert!(why.contains("protocol error"), "{why}");
        let grown = rss_kib().saturating_sub(before);
        assert!(grown < 8 * 1024, "rss grew {grown} KiB");
    }

    #[tokio::test]
    async fn a_flood_of_control_frames_or_forged_credit_is_cut_off() {
        let (client, mut agent, _exec, stream) = connected().await;
        let started = Frame::json(Kind::Started, stream, &Started { pid: 7 }).encode();
        for _ in 0..100_000 {
            if agent.write_all(&started).await.is_err() {
                break;
            }
        }
        let why = closed_within(&client, 5).await;
        assert!(why.contains("control frames"), "{why}");

        let (client, mut agent, _exec, stream) = connected().await;
        let grant = Frame::window(Kind::GuestWindow, stream, u32::MAX).encode();
        for _ in 0..1000 {
            if agent.write_all(&grant).await.is_err() {
                break;
            }
        }
        let why = closed_within(&client, 5).await;
        assert!(why.contains("more credit"), "{why}");
    }
}
