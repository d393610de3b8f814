//! The connection's two tasks: the writer, which alone writes to the socket,
//! and the reader, which routes each frame to its request.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use agentenv_proto::{self as proto, ErrorMsg, Frame, Kind, HEADER_LEN};

use std::sync::atomic::Ordering;

use agentenv_proto::INITIAL_WINDOW;

use super::{Inner, Outgoing, Route};

/// Most frames other than bulk data and credit one request's stream may
/// carry (a request gets at most a `Started`/`FileInfo` and an ending frame).
const MAX_CONTROL_FRAMES: u32 = 16;

/// Most credit the host can hold for its own `Data` on a stream: a guest
/// returns only what the host sent, so an honest one never takes the host
/// past its initial window; twice that leaves room for rounding.
const MAX_HOST_CREDIT: usize = 2 * INITIAL_WINDOW as usize;

/// A payload at least this large that is not all in the read buffer yet is
/// read straight into its own buffer instead of through the read buffer.
const DIRECT_READ_MIN: usize = 16 * 1024;

pub(super) async fn write_loop<W: AsyncWrite + Unpin>(
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

pub(super) async fn read_loop<R: AsyncRead + Unpin>(
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
        // A large frame whose payload is only partly here: its length, and
        // the frame with the bytes so far.
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
                partial = Some((
                    n,
                    Frame {
                        kind,
                        stream,
                        payload,
                    },
                ));
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
            Some((n, mut frame)) => {
                // The rest of the payload goes straight into its buffer (not
                // past it: the reads are limited to what the frame lacks).
                let read = loop {
                    let want = n - frame.payload.len();
                    let Some(r) = read_some(&mut rd, &mut frame.payload, want, &mut closed).await
                    else {
                        return;
                    };
                    match r {
                        Ok(m) if m > 0 && frame.payload.len() < n => {}
                        r => break r,
                    }
                };
                if let Ok(1..) = read {
                    let Some(i) = inner.upgrade() else { return };
                    dispatch(&i, frame);
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
    let violation = {
        let mut routes = inner.routes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(route) = routes.get_mut(&frame.stream) else {
            return; // a request the host has given up on
        };
        match admit(route, &frame) {
            Ok(true) => {
                let _ = route.tx.send(frame);
                None
            }
            Ok(false) => None,
            Err(why) => Some(why),
        }
    };
    if let Some(why) = violation {
        // The lock is released: closing takes it to drop every route.
        inner.close(format!("the agent broke flow control: {why}"));
    }
}

/// Whether `frame` may be queued on `route` (`Ok(false)`: it was a credit
/// grant, applied here). `Err` when the guest broke the protocol's limits: it
/// sent bulk bytes past the credit the host granted, more control frames
/// than a request has, or more credit than the host can have spent. Every
/// queued frame is thereby counted, so a stream's queue holds at most its
/// window of bulk bytes and [`MAX_CONTROL_FRAMES`] small frames.
fn admit(route: &mut Route, frame: &Frame) -> Result<bool, String> {
    let stream = frame.stream;
    match frame.kind {
        Kind::GuestWindow => {
            let n = frame.window_bytes().map_err(|e| e.to_string())? as usize;
            if route.credit.available_permits().saturating_add(n) > MAX_HOST_CREDIT {
                return Err(format!(
                    "stream {stream}: a window of {n} bytes gives more credit than the host's data in flight"
                ));
            }
            route.credit.add_permits(n);
            Ok(false)
        }
        Kind::Stdout | Kind::Stderr | Kind::FileData | Kind::FsEvent | Kind::FsEntries => {
            let n = frame.payload.len() as i64;
            let left = route.guest_credit.fetch_sub(n, Ordering::SeqCst);
            if left < n {
                return Err(format!(
                    "stream {stream}: a {n}-byte {:?} frame with {} bytes of credit left",
                    frame.kind,
                    left.max(0)
                ));
            }
            Ok(true)
        }
        kind => {
            route.control_frames += 1;
            if route.control_frames > MAX_CONTROL_FRAMES {
                return Err(format!(
                    "stream {stream}: more than {MAX_CONTROL_FRAMES} control frames (last {kind:?})"
                ));
            }
            Ok(true)
        }
    }
}
