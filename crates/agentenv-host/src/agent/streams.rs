//! One request stream, and the exec, upload and download streams the engine's
//! seam hands out on top of it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use agentenv_core::agent::{
    AgentError, DownloadStream, ExecEvent, ExecInput, ExecStream, UploadSink, WatchStream,
};
use agentenv_proto::{
    self as proto, Done, EntryInfo, Frame, FsEvent, FsResponse, Kind, PtySize, SignalMsg,
    DATA_CHUNK, GRANT_BATCH, HEADER_LEN,
};
use tokio::sync::{mpsc, Semaphore};

use super::pool::{BufPool, DATA_FRAME};
use super::{Inner, Outgoing};

pub(super) fn parse<T: for<'de> serde::Deserialize<'de>>(f: &Frame) -> Result<T, AgentError> {
    f.parse().map_err(|e| AgentError::Protocol(e.to_string()))
}

/// Sends `bytes` as `Data` frames within the stream's credit.
pub(super) async fn send_data(
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
pub(super) struct Request {
    pub(super) inner: Arc<Inner>,
    pub(super) id: u32,
    pub(super) rx: mpsc::UnboundedReceiver<Frame>,
    pub(super) credit: Arc<Semaphore>,
    /// The credit the guest holds for its bulk bytes (the reader task spends
    /// it; [`Request::grant`] returns it before telling the guest).
    pub(super) guest_credit: Arc<AtomicI64>,
    /// The agent ended the stream (no `Kill` needed on drop).
    pub(super) finished: bool,
    /// Bytes consumed but not yet credited back.
    pub(super) ungranted: usize,
}

impl Request {
    pub(super) fn send(&self, kind: Kind, payload: Vec<u8>) -> Result<(), AgentError> {
        self.inner.send(&Frame {
            kind,
            stream: self.id,
            payload,
        })
    }

    pub(super) fn send_json<T: serde::Serialize>(
        &self,
        kind: Kind,
        msg: &T,
    ) -> Result<(), AgentError> {
        self.inner.send(&Frame::json(kind, self.id, msg))
    }

    /// The next frame; an `Error` frame becomes `Err(Remote)`.
    pub(super) async fn next(&mut self) -> Result<Frame, AgentError> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Frame, AgentError>> {
        Poll::Ready(match ready!(self.rx.poll_recv(cx)) {
            Some(f) if f.kind == Kind::Error => {
                self.end();
                parse(&f).and_then(|m| Err(AgentError::Remote(m)))
            }
            Some(f) => {
                if matches!(f.kind, Kind::Exit | Kind::Done) {
                    self.end();
                }
                Ok(f)
            }
            None => {
                self.end();
                Err(AgentError::Closed(self.inner.reason()))
            }
        })
    }

    /// The agent ended the stream: no `Kill` on drop, and a writer waiting
    /// for credit (stdin of a command that exited) gives up.
    fn end(&mut self) {
        self.finished = true;
        self.credit.close();
    }

    pub(super) async fn expect_done(&mut self) -> Result<Done, AgentError> {
        let f = self.next().await?;
        match f.kind {
            Kind::Done => parse(&f),
            _ => Err(self.unexpected(f)),
        }
    }

    pub(super) fn unexpected(&mut self, f: Frame) -> AgentError {
        AgentError::Protocol(format!("unexpected {:?} on stream {}", f.kind, self.id))
    }

    /// Counts `n` consumed bytes; returns credit once a batch has gathered.
    fn grant(&mut self, n: usize) {
        self.ungranted += n;
        if self.ungranted >= GRANT_BATCH as usize {
            let give = std::mem::take(&mut self.ungranted);
            // Counted before the guest hears of it, so bytes sent on the
            // new credit never arrive ahead of it.
            self.guest_credit.fetch_add(give as i64, Ordering::SeqCst);
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
        self.credit.close();
        if !self.finished && !self.inner.dead.load(Ordering::SeqCst) {
            // The caller gave up (client disconnect, timeout): stop the work in the guest.
            let _ = self.send(Kind::Kill, Vec::new());
        }
    }
}

/// A running command's frames.
pub(super) struct ExecFrames {
    pub(super) req: Request,
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

/// What the host sends to a running command from any task: stdin within
/// the stream's credit, `Eof`, `Signal`, `Resize`, `Kill`.
pub(super) struct ExecSender {
    pub(super) inner: Arc<super::Inner>,
    pub(super) id: u32,
    pub(super) credit: Arc<Semaphore>,
    /// Held by one `write_stdin` at a time, so concurrent writes do not interleave.
    pub(super) writing: tokio::sync::Mutex<()>,
}

impl ExecSender {
    fn send(&self, kind: Kind, payload: Vec<u8>) -> Result<(), AgentError> {
        self.inner.send(&Frame {
            kind,
            stream: self.id,
            payload,
        })
    }
}

#[async_trait::async_trait]
impl ExecInput for ExecSender {
    async fn write_stdin(&self, bytes: &[u8]) -> Result<(), AgentError> {
        let _one = self.writing.lock().await;
        if self.credit.is_closed() {
            return Err(AgentError::Closed(format!(
                "stream {}: the command has ended",
                self.id
            )));
        }
        send_data(&self.inner, self.id, &self.credit, bytes)
            .await
            .map_err(|e| match e {
                AgentError::Closed(_) if !self.inner.dead.load(Ordering::SeqCst) => {
                    AgentError::Closed(format!("stream {}: the command has ended", self.id))
                }
                e => e,
            })
    }

    async fn close_stdin(&self) -> Result<(), AgentError> {
        // After the stdin bytes already queued.
        let _one = self.writing.lock().await;
        self.send(Kind::Eof, Vec::new())
    }

    async fn signal(&self, signal: i32) -> Result<(), AgentError> {
        if !(1..=64).contains(&signal) {
            return Err(AgentError::Remote(proto::ErrorMsg::new(
                proto::ErrorCode::BadRequest,
                Some("signal"),
                format!("signal {signal} is not a signal number (1..=64)"),
            )));
        }
        self.send(
            Kind::Signal,
            serde_json::to_vec(&SignalMsg { signal }).expect("json serialises"),
        )
    }

    async fn resize(&self, size: PtySize) -> Result<(), AgentError> {
        self.send(
            Kind::Resize,
            serde_json::to_vec(&size).expect("json serialises"),
        )
    }

    async fn kill(&self) -> Result<(), AgentError> {
        self.send(Kind::Kill, Vec::new())
    }
}

/// Most entries one listing may bring back; a guest sending more is cut off.
pub(super) const MAX_LIST_ENTRIES: usize = 100_000;

/// Reads an `Fs` answer: `FsEntries` frames (credited bulk), then `FsResult`.
pub(super) async fn fs_answer(req: &mut Request) -> Result<FsResponse, AgentError> {
    let mut entries: Vec<EntryInfo> = Vec::new();
    loop {
        let f = req.next().await?;
        match f.kind {
            Kind::FsEntries => {
                req.grant(f.payload.len());
                let part: Vec<EntryInfo> = parse(&f)?;
                if entries.len() + part.len() > MAX_LIST_ENTRIES {
                    return Err(AgentError::Protocol(format!(
                        "stream {}: a listing of more than {MAX_LIST_ENTRIES} entries",
                        req.id
                    )));
                }
                entries.extend(part);
            }
            Kind::FsResult => {
                let mut res: FsResponse = parse(&f)?;
                req.end();
                if !entries.is_empty() {
                    entries.append(&mut res.entries);
                    res.entries = entries;
                }
                return Ok(res);
            }
            _ => return Err(req.unexpected(f)),
        }
    }
}

/// A directory watch's frames: `FsEvent`s (credited bulk) until an `Error`.
pub(super) struct WatchFrames {
    pub(super) req: Request,
}

#[async_trait::async_trait]
impl WatchStream for WatchFrames {
    async fn next(&mut self) -> Result<FsEvent, AgentError> {
        let f = self.req.next().await?;
        match f.kind {
            Kind::FsEvent => {
                self.req.grant(f.payload.len());
                parse(&f)
            }
            Kind::Done => Err(AgentError::Closed(format!(
                "stream {}: the watch ended",
                self.req.id
            ))),
            _ => Err(self.req.unexpected(f)),
        }
    }
}

/// An upload's frames.
pub(super) struct UploadFrames {
    pub(super) req: Request,
    /// The next `Data` frame: room for its header, then the bytes gathered
    /// so far (empty when none is started). Small writes are gathered into
    /// full frames; a frame goes out once it holds [`DATA_CHUNK`] bytes.
    pub(super) frame: Vec<u8>,
    /// The frames' buffers, back from the writer task once written.
    pub(super) pool: Arc<BufPool>,
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
pub(super) struct DownloadFrames {
    pub(super) req: Request,
    pub(super) done: Option<Done>,
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
