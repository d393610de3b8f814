//! Frame-sized buffers a transfer reuses.

use std::sync::Mutex;

use agentenv_core::agent::ChunkPool;
use agentenv_proto::{DATA_CHUNK, HEADER_LEN, INITIAL_WINDOW};

/// The most buffers a [`BufPool`] keeps: a window's worth of full frames
/// (what a stream can have in flight) and a few more. A pool only keeps what
/// its transfer had in use at once, so a fast consumer keeps a few; a slow
/// one, whose window fills again and again, reuses the same buffers instead
/// of allocating a fresh window each time (from another thread's arena).
const POOL_KEEP: usize = INITIAL_WINDOW as usize / DATA_CHUNK + 8;

/// A frame (header and a full bulk payload): what an upload's buffers hold.
pub(super) const DATA_FRAME: usize = HEADER_LEN + DATA_CHUNK;

/// Frame-sized buffers one transfer reuses, so that moving a large file
/// neither allocates nor pages in fresh memory for every frame. It keeps at
/// most [`POOL_KEEP`] of them, and goes with the transfer.
#[derive(Default)]
pub(super) struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    /// An empty buffer with room for at least `cap` bytes.
    pub(super) fn take(&self, cap: usize) -> Vec<u8> {
        let got = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match got {
            Some(mut v) => {
                v.reserve(cap);
                v
            }
            None => Vec::with_capacity(cap),
        }
    }

    pub(super) fn give(&self, mut v: Vec<u8>) {
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
