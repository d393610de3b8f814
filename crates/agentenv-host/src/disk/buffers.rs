//! The read/write copy's buffers and the checksum fed from them: off,
//! inline, or on a second thread that hashes one buffer while the next one
//! is copied.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::checksum::SparseSha256;
use super::IO_BUF;

/// Data below which the checksum is computed inline rather than on a second
/// thread (a thread costs tens of microseconds to start).
pub(super) const HASH_THREAD_MIN: u64 = 8 << 20;

/// Buffers handed to a hashing thread and not yet back, at most.
const HASH_THREAD_DEPTH: usize = 3;

/// The read/write copy's buffers and its checksum: off, inline, or on a
/// second thread that hashes one buffer while the next is copied (the data
/// is read once either way).
pub(super) struct Buffers {
    free: Vec<Vec<u8>>,
    hash: Hashing,
}

enum Hashing {
    Off,
    Inline(SparseSha256),
    Thread(HashThread),
}

struct HashThread {
    tx: Option<std::sync::mpsc::SyncSender<(u64, Vec<u8>, usize)>>,
    back: std::sync::mpsc::Receiver<Vec<u8>>,
    in_flight: usize,
    worker: Option<std::thread::JoinHandle<SparseSha256>>,
}

impl HashThread {
    fn spawn() -> HashThread {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>, usize)>(HASH_THREAD_DEPTH);
        let (back_tx, back) = std::sync::mpsc::channel();
        let worker = std::thread::Builder::new()
            .name("sparse-sha256".into())
            .spawn(move || {
                let mut h = SparseSha256::new();
                for (off, buf, len) in rx {
                    h.update(off, &buf[..len]);
                    let _ = back_tx.send(buf);
                }
                h
            });
        match worker {
            Ok(w) => HashThread {
                tx: Some(tx),
                back,
                in_flight: 0,
                worker: Some(w),
            },
            // No thread: the caller hashes inline instead.
            Err(_) => HashThread {
                tx: None,
                back,
                in_flight: 0,
                worker: None,
            },
        }
    }

    fn finish(&mut self) -> io::Result<SparseSha256> {
        self.tx = None;
        let worker = self
            .worker
            .take()
            .ok_or_else(|| io::Error::other("no hashing thread"))?;
        worker
            .join()
            .map_err(|_| io::Error::other("the hashing thread panicked"))
    }
}

impl Drop for HashThread {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Buffers {
    pub(super) fn new(checksum: bool, thread: bool, data_bytes: u64) -> Buffers {
        let hash = if !checksum {
            Hashing::Off
        } else if thread && data_bytes >= HASH_THREAD_MIN {
            let t = HashThread::spawn();
            if t.worker.is_some() {
                Hashing::Thread(t)
            } else {
                Hashing::Inline(SparseSha256::new())
            }
        } else {
            Hashing::Inline(SparseSha256::new())
        };
        Buffers {
            free: Vec::new(),
            hash,
        }
    }

    /// A buffer to read into: a free one, one the hashing thread is done
    /// with, or a new one.
    pub(super) fn take(&mut self) -> Vec<u8> {
        if let Some(b) = self.free.pop() {
            return b;
        }
        if let Hashing::Thread(t) = &mut self.hash {
            if t.in_flight >= HASH_THREAD_DEPTH {
                if let Ok(b) = t.back.recv() {
                    t.in_flight -= 1;
                    return b;
                }
            }
        }
        vec![0u8; IO_BUF]
    }

    /// Hands back a buffer whose first `len` bytes are the file at `off`.
    pub(super) fn done(&mut self, off: u64, buf: Vec<u8>, len: usize) {
        match &mut self.hash {
            Hashing::Off => self.free.push(buf),
            Hashing::Inline(h) => {
                h.update(off, &buf[..len]);
                self.free.push(buf);
            }
            Hashing::Thread(t) => {
                while let Ok(b) = t.back.try_recv() {
                    t.in_flight -= 1;
                    self.free.push(b);
                }
                // If the thread is gone, finish() reports it.
                if let Some(tx) = &t.tx {
                    if tx.send((off, buf, len)).is_ok() {
                        t.in_flight += 1;
                    }
                }
            }
        }
    }

    /// The checksum of everything handed back.
    pub(super) fn finish(self, size: u64) -> io::Result<String> {
        match self.hash {
            Hashing::Off => Err(io::Error::other("no checksum was asked for")),
            Hashing::Inline(h) => Ok(h.finish(size)),
            Hashing::Thread(mut t) => Ok(t.finish()?.finish(size)),
        }
    }
}

/// Reads `[start, end)` into the buffers without writing (to hash it).
pub(super) fn feed_range(input: &File, start: u64, end: u64, bufs: &mut Buffers) -> io::Result<()> {
    let mut off = start;
    while off < end {
        let mut buf = bufs.take();
        let n = ((end - off) as usize).min(buf.len());
        let r = input.read_exact_at(&mut buf[..n], off);
        bufs.done(off, buf, n);
        r?;
        off += n as u64;
    }
    Ok(())
}
