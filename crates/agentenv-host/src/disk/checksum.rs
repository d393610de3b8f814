//! The snapshot checksum, `sparse-sha256-4k-v1`: SHA-256 over a file's
//! non-zero 4 KiB blocks, computed from its data extents only.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::error::with_path;
use super::space::data_extents;
use super::IO_BUF;
/// Block size of the snapshot checksum: the page size, and the block size of
/// ext4, XFS and tmpfs.
pub const CHECKSUM_BLOCK: usize = 4096;

/// Name of the checksum definition, stored beside each checksum.
pub const CHECKSUM_ALGORITHM: &str = "sparse-sha256-4k-v1";

/// Prefix that keeps this digest apart from a plain SHA-256 of any file.
pub(super) const CHECKSUM_DOMAIN: &[u8] = b"agentenv sparse-sha256-4k v1\0";

/// The snapshot checksum, computed from data extents only.
///
/// Definition (`sparse-sha256-4k-v1`): cut the file's logical content into
/// 4 KiB blocks at offsets `0, 4096, …`; the last block is padded with
/// zeroes. The digest is SHA-256 over
///
/// ```text
/// "agentenv sparse-sha256-4k v1\0"
/// for each block k that is not all zero, in increasing k:  u64le(k) ‖ block
/// "size" ‖ u64le(logical size)
/// ```
///
/// Holes read as zeroes, so they are skipped without being read; a data
/// block that holds only zeroes is skipped too. The digest therefore depends
/// on the content alone, not on where a file system happens to keep holes
/// (a reflink, a `copy_file_range` copy, a read/write copy that punched zero
/// blocks and a full copy all hash the same).
///
/// Feed it the data extents in increasing offset order with
/// [`update`](Self::update) and close it with [`finish`](Self::finish).
pub struct SparseSha256 {
    hasher: Sha256,
    /// Block being assembled from pieces that do not cover it whole.
    pending: Option<u64>,
    buf: Box<[u8; CHECKSUM_BLOCK]>,
    /// End of the last byte fed, to check the order.
    next: u64,
}

impl Default for SparseSha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for SparseSha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseSha256")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

pub(super) fn is_zero(block: &[u8]) -> bool {
    let words = block.chunks_exact(8);
    let tail = words.remainder();
    words
        .map(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
        .all(|w| w == 0)
        && tail.iter().all(|&b| b == 0)
}

fn hash_block(hasher: &mut Sha256, index: u64, block: &[u8]) {
    if !is_zero(block) {
        hasher.update(index.to_le_bytes());
        hasher.update(block);
    }
}

impl SparseSha256 {
    /// An empty digest.
    pub fn new() -> SparseSha256 {
        let mut hasher = Sha256::new();
        hasher.update(CHECKSUM_DOMAIN);
        SparseSha256 {
            hasher,
            pending: None,
            buf: Box::new([0; CHECKSUM_BLOCK]),
            next: 0,
        }
    }

    fn flush(&mut self) {
        if let Some(k) = self.pending.take() {
            hash_block(&mut self.hasher, k, &self.buf[..]);
        }
    }

    /// Feeds `data`, which sits at `offset` in the file. Calls must come in
    /// increasing, non-overlapping offset order; bytes never fed are zeroes.
    pub fn update(&mut self, offset: u64, mut data: &[u8]) {
        assert!(
            offset >= self.next,
            "sparse checksum fed out of order: {offset} < {}",
            self.next
        );
        let bs = CHECKSUM_BLOCK as u64;
        let mut off = offset;
        while !data.is_empty() {
            let k = off / bs;
            let within = (off % bs) as usize;
            let n = (CHECKSUM_BLOCK - within).min(data.len());
            if n == CHECKSUM_BLOCK {
                self.flush();
                hash_block(&mut self.hasher, k, &data[..n]);
            } else {
                if self.pending != Some(k) {
                    self.flush();
                    self.buf.fill(0);
                    self.pending = Some(k);
                }
                self.buf[within..within + n].copy_from_slice(&data[..n]);
            }
            off += n as u64;
            data = &data[n..];
        }
        self.next = off;
    }

    /// The digest of a file of `logical_size` bytes, as lower-case hex.
    pub fn finish(mut self, logical_size: u64) -> String {
        self.flush();
        self.hasher.update(b"size");
        self.hasher.update(logical_size.to_le_bytes());
        hex(&self.hasher.finalize())
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Feeds `[start, end)` of `file` to `h`, one buffer at a time.
fn hash_range(
    file: &File,
    start: u64,
    end: u64,
    buf: &mut [u8],
    h: &mut SparseSha256,
) -> io::Result<()> {
    let mut off = start;
    while off < end {
        let n = ((end - off) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], off)?;
        h.update(off, &buf[..n]);
        off += n as u64;
    }
    Ok(())
}

pub(super) fn sha256_of(file: &File, size: u64) -> io::Result<(String, u64)> {
    let mut h = SparseSha256::new();
    let mut buf = vec![0u8; IO_BUF];
    let mut read = 0;
    for (s, e) in data_extents(file, size)? {
        hash_range(file, s, e, &mut buf, &mut h)?;
        read += e - s;
    }
    Ok((h.finish(size), read))
}

/// The snapshot checksum ([`SparseSha256`]) of a file; reads only its data
/// extents.
pub fn sparse_sha256(path: &Path) -> io::Result<String> {
    let ctx = |e| with_path(format!("cannot checksum {}", path.display()), e);
    let f = File::open(path).map_err(ctx)?;
    let size = f.metadata().map_err(ctx)?.len();
    sha256_of(&f, size).map(|(s, _)| s).map_err(ctx)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::disk::test_files::{pattern, reference_sum, sparse_file};

    #[test]
    fn checksum_matches_its_definition() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        sparse_file(&p);
        assert_eq!(sparse_sha256(&p).unwrap(), reference_sum(&p));
    }

    #[test]
    fn checksum_ignores_hole_layout_but_not_content_or_size() {
        let dir = tempfile::tempdir().unwrap();
        let holes = dir.path().join("holes");
        let zeros = dir.path().join("zeros");
        let f = File::create(&holes).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(b"abc", 70_000).unwrap();
        let mut full = vec![0u8; 1 << 20];
        full[70_000..70_003].copy_from_slice(b"abc");
        std::fs::write(&zeros, &full).unwrap();
        let a = sparse_sha256(&holes).unwrap();
        assert_eq!(a, sparse_sha256(&zeros).unwrap());
        full[5] = 1;
        std::fs::write(&zeros, &full).unwrap();
        assert_ne!(a, sparse_sha256(&zeros).unwrap());
        f.set_len((1 << 20) + 1).unwrap();
        assert_ne!(a, sparse_sha256(&holes).unwrap());
    }

    #[test]
    fn hasher_assembles_unaligned_pieces() {
        let data = pattern(3 * CHECKSUM_BLOCK + 10, 7);
        let mut whole = SparseSha256::new();
        whole.update(100, &data);
        let mut pieces = SparseSha256::new();
        for (i, c) in data.chunks(1000).enumerate() {
            pieces.update(100 + (i * 1000) as u64, c);
        }
        assert_eq!(whole.finish(1 << 20), pieces.finish(1 << 20));
    }
}
