//! The guest → host direction: one writer thread per session drains a channel
//! of encoded frames ([`Outbox`]); each request sends through an [`OutStream`],
//! which spends the host's credit for bulk bytes and guarantees that nothing
//! follows the request's final frame.

use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, Weak};

use agentenv_proto::{self as proto, ErrorMsg, Frame, Kind, DATA_CHUNK, INITIAL_WINDOW};
use serde::Serialize;

use super::lock;
use super::session::Registry;

/// What the writer thread receives.
pub enum OutMsg {
    /// An encoded frame of session generation `gen`.
    Frame {
        /// The generation it belongs to; older than the current one → dropped.
        gen: u64,
        /// Its wire bytes.
        bytes: Vec<u8>,
    },
    /// Write everything queued before, then stop.
    Close,
}

/// A handle on a session's writer, stamped with the generation it sends for.
#[derive(Clone)]
pub struct Outbox {
    tx: Sender<OutMsg>,
    gen: u64,
}

impl Outbox {
    /// An outbox sending into `tx` as generation `gen`.
    pub fn new(tx: Sender<OutMsg>, gen: u64) -> Outbox {
        Outbox { tx, gen }
    }

    /// The same writer, for generation `gen`.
    pub fn with_gen(&self, gen: u64) -> Outbox {
        Outbox {
            tx: self.tx.clone(),
            gen,
        }
    }

    /// Queues one frame. A writer that is gone (connection closed) drops it.
    pub fn send(&self, kind: Kind, stream: u32, payload: &[u8]) {
        let bytes = proto::encode(kind, stream, payload);
        let _ = self.tx.send(OutMsg::Frame {
            gen: self.gen,
            bytes,
        });
    }

    /// Queues one frame with a JSON payload.
    pub fn json<T: Serialize>(&self, kind: Kind, stream: u32, msg: &T) {
        self.send(kind, stream, &Frame::json(kind, stream, msg).payload);
    }

    /// Queues an `Error` frame.
    pub fn error(&self, stream: u32, e: &ErrorMsg) {
        self.json(Kind::Error, stream, e);
    }

    /// Asks the writer to flush and stop.
    pub fn close(&self) {
        let _ = self.tx.send(OutMsg::Close);
    }
}

/// The writer thread's loop: writes frames of the current generation (`cur_gen`),
/// coalescing whatever is queued into one flush. After a write error it calls
/// `broken` once and discards the rest. Returns on [`OutMsg::Close`] or when
/// every sender is gone.
pub fn write_loop<W: Write>(
    w: W,
    rx: Receiver<OutMsg>,
    cur_gen: &AtomicU64,
    broken: impl FnOnce(),
) {
    let mut w = BufWriter::with_capacity(DATA_CHUNK + proto::HEADER_LEN, w);
    let mut broken = Some(broken);
    let mut ok = true;
    while let Ok(mut msg) = rx.recv() {
        loop {
            match msg {
                OutMsg::Close => {
                    if ok {
                        let _ = w.flush();
                    }
                    return;
                }
                OutMsg::Frame { gen, bytes } => {
                    if ok && gen >= cur_gen.load(Ordering::SeqCst) && w.write_all(&bytes).is_err() {
                        ok = false;
                    }
                }
            }
            match rx.try_recv() {
                Ok(m) => msg = m,
                Err(_) => break,
            }
        }
        if ok && w.flush().is_err() {
            ok = false;
        }
        if !ok {
            if let Some(f) = broken.take() {
                f();
            }
        }
    }
}

struct OutState {
    /// Bytes the host lets us send on this stream.
    credit: u64,
    /// The final frame went out (or the session ended): send nothing more.
    ended: bool,
}

/// One request's way out: control frames, credited bulk data, one final frame.
pub struct OutStream {
    outbox: Outbox,
    stream: u32,
    /// Where the request is registered (and its entry id), to unregister it
    /// before its final frame goes out.
    reg: Option<(Weak<Registry>, u64)>,
    st: Mutex<OutState>,
    cv: Condvar,
}

impl OutStream {
    /// A stream with the initial credit. `reg`: the registry entry to remove when it ends.
    pub fn new(outbox: Outbox, stream: u32, reg: Option<(Weak<Registry>, u64)>) -> Arc<OutStream> {
        Arc::new(OutStream {
            outbox,
            stream,
            reg,
            st: Mutex::new(OutState {
                credit: u64::from(INITIAL_WINDOW),
                ended: false,
            }),
            cv: Condvar::new(),
        })
    }

    /// The request's stream id.
    pub fn stream(&self) -> u32 {
        self.stream
    }

    /// Sends a frame that does not end the stream. False once it has ended.
    pub fn send(&self, kind: Kind, payload: &[u8]) -> bool {
        let st = lock(&self.st);
        if st.ended {
            return false;
        }
        self.outbox.send(kind, self.stream, payload);
        true
    }

    /// Sends a JSON frame that does not end the stream.
    pub fn send_json<T: Serialize>(&self, kind: Kind, msg: &T) -> bool {
        self.send(kind, &Frame::json(kind, self.stream, msg).payload)
    }

    /// Sends bulk bytes in chunks of at most [`DATA_CHUNK`], waiting for
    /// credit. False (and nothing more sent) once the stream has ended.
    pub fn send_data(&self, kind: Kind, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            let Some(mut st) = self.credit_for(1) else {
                return false;
            };
            let n = data.len().min(DATA_CHUNK).min(st.credit as usize);
            // Sent while holding the lock, so it cannot follow the final frame.
            self.outbox.send(kind, self.stream, &data[..n]);
            st.credit -= n as u64;
            data = &data[n..];
        }
        true
    }

    /// Sends one frame whose whole payload spends credit (a message that
    /// cannot be split: `FsEvent`, `FsEntries`), waiting until there is
    /// enough. False (and nothing sent) once the stream has ended.
    pub fn send_credited(&self, kind: Kind, payload: &[u8]) -> bool {
        let n = payload.len() as u64;
        let Some(mut st) = self.credit_for(n) else {
            return false;
        };
        self.outbox.send(kind, self.stream, payload);
        st.credit -= n;
        true
    }

    /// Waits until the stream has at least `n` bytes of credit; the state,
    /// locked (what is sent under it cannot follow the final frame), or None
    /// once the stream has ended.
    fn credit_for(&self, n: u64) -> Option<std::sync::MutexGuard<'_, OutState>> {
        let mut st = lock(&self.st);
        while st.credit < n && !st.ended {
            st = self
                .cv
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        (!st.ended).then_some(st)
    }

    /// Adds credit (a `Window` frame from the host).
    pub fn grant(&self, bytes: u32) {
        let mut st = lock(&self.st);
        st.credit = st.credit.saturating_add(u64::from(bytes));
        self.cv.notify_all();
    }

    /// Sends the final frame (`Exit`, `Done` or `Error`) unless the stream
    /// already ended; unregisters the request first. True if it was sent.
    pub fn finish<T: Serialize>(&self, kind: Kind, msg: &T) -> bool {
        self.unregister();
        let mut st = lock(&self.st);
        if st.ended {
            return false;
        }
        st.ended = true;
        self.outbox.json(kind, self.stream, msg);
        self.cv.notify_all();
        true
    }

    /// Ends the stream with an `Error`.
    pub fn fail(&self, e: &ErrorMsg) -> bool {
        self.finish(Kind::Error, e)
    }

    /// Ends the stream without a frame (the session is gone); wakes senders.
    pub fn close(&self) {
        let mut st = lock(&self.st);
        st.ended = true;
        self.cv.notify_all();
    }

    fn unregister(&self) {
        if let Some((reg, id)) = &self.reg {
            if let Some(reg) = reg.upgrade() {
                let mut map = lock(&reg);
                if map.get(&self.stream).is_some_and(|e| e.id == *id) {
                    map.remove(&self.stream);
                }
            }
        }
    }
}

/// Host → guest bulk bytes received on a stream but not yet consumed, and
/// consumed bytes not yet credited back with `GuestWindow` (sent in batches of
/// at least `GRANT_BATCH`).
#[derive(Default)]
pub struct Inflight {
    unconsumed: AtomicU64,
    ungranted: AtomicU64,
}

impl Inflight {
    /// Counts `n` received bytes; false if that exceeds the host's window.
    pub fn receive(&self, n: usize) -> bool {
        let n = n as u64;
        self.unconsumed.fetch_add(n, Ordering::SeqCst) + n <= u64::from(INITIAL_WINDOW)
    }

    /// Counts `n` consumed bytes and grants them back to the host once a
    /// batch has gathered.
    pub fn consumed(&self, out: &OutStream, n: usize) {
        if n == 0 {
            return;
        }
        self.unconsumed.fetch_sub(n as u64, Ordering::SeqCst);
        let pending = self.ungranted.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
        if pending >= u64::from(proto::GRANT_BATCH) {
            let give = self.ungranted.swap(0, Ordering::SeqCst);
            if give > 0 {
                out.send(Kind::GuestWindow, &(give as u32).to_be_bytes());
            }
        }
    }
}
