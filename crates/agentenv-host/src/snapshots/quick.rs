//! The quick check of a full snapshot's memory file: what a restore checks
//! instead of hashing the whole file (which would take longer than the
//! restore itself: ~0.4 s per GiB here).
//!
//! It records the file's size, the modification time of each tier's copy
//! (in nanoseconds) and SHA-256 over a sample: the first and last 1 MiB and
//! [`SAMPLE_PAGES`] 4 KiB pages at fixed offsets spread over the file. A
//! write through the file system or a shared mapping moves the mtime; a
//! truncation changes the size; damage inside the sample changes its hash.
//! It does not catch a change outside the sample whose writer put the mtime
//! back, nor media bit rot outside the sample: `persist` hashes every byte
//! (`sparse-sha256-4k-v1`) for that.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use agentenv_api::SnapshotTier;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Name of the quick check's definition, stored with it.
pub const QUICK_CHECK_ALGORITHM: &str = "sample-sha256-v1";
/// Bytes hashed at each end of the file.
pub const EDGE_BYTES: u64 = 64 << 10;
/// Pages hashed at fixed offsets between the ends.
pub const SAMPLE_PAGES: u32 = 64;
/// Size of a sampled page.
const PAGE: u64 = 4096;
/// Prefix that keeps the sample hash apart from any other SHA-256.
const DOMAIN: &[u8] = b"agentenv sample-sha256 v1\0";

/// The memory file's quick check (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuickCheck {
    /// [`QUICK_CHECK_ALGORITHM`].
    pub algorithm: String,
    /// Logical size of the file.
    pub size: u64,
    /// Pages sampled between the two ends.
    pub sample_pages: u32,
    /// SHA-256 over the sample (see [`sample_sha256`]).
    pub sample_sha256: String,
    /// Modification time of each tier's copy, nanoseconds since the epoch.
    pub mtime_ns: TierMtimes,
}

/// A modification time per tier (copies in two tiers differ).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierMtimes {
    /// The tmpfs copy's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmpfs: Option<i128>,
    /// The durable copy's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable: Option<i128>,
}

impl TierMtimes {
    /// The time recorded for a tier's copy.
    pub fn get(&self, tier: SnapshotTier) -> Option<i128> {
        match tier {
            SnapshotTier::Tmpfs => self.tmpfs,
            SnapshotTier::Durable => self.durable,
        }
    }

    /// Records a tier's copy's time.
    pub fn set(&mut self, tier: SnapshotTier, ns: Option<i128>) {
        match tier {
            SnapshotTier::Tmpfs => self.tmpfs = ns,
            SnapshotTier::Durable => self.durable = ns,
        }
    }
}

/// A file's modification time in nanoseconds since the epoch.
pub fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

/// The byte ranges the sample covers, in order: the first [`EDGE_BYTES`],
/// `pages` pages at `⌊k·(size/4096)/(pages+1)⌋·4096` for k = 1..=pages, the
/// last [`EDGE_BYTES`] (ranges may overlap in small files).
pub fn sample_ranges(size: u64, pages: u32) -> Vec<(u64, u64)> {
    let edge = size.min(EDGE_BYTES);
    let mut v = vec![(0, edge)];
    let total_pages = size / PAGE;
    for k in 1..=u64::from(pages) {
        let off = (total_pages * k / (u64::from(pages) + 1)) * PAGE;
        v.push((off, PAGE.min(size - off)));
    }
    v.push((size - edge, edge));
    v
}

/// SHA-256 over `DOMAIN`, then for each range of [`sample_ranges`]
/// `u64le(offset) ‖ u64le(length) ‖ bytes`, then `u64le(size)`. Holes read
/// as zeroes.
pub fn sample_sha256(file: &File, size: u64, pages: u32) -> io::Result<String> {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    let mut buf = vec![0u8; EDGE_BYTES as usize];
    for (off, len) in sample_ranges(size, pages) {
        let b = &mut buf[..len as usize];
        file.read_exact_at(b, off)?;
        h.update(off.to_le_bytes());
        h.update(len.to_le_bytes());
        h.update(&*b);
    }
    h.update(size.to_le_bytes());
    Ok(hex(&h.finalize()))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Plain SHA-256 of a whole file (the state file's checksum).
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let ctx =
        |e: io::Error| io::Error::new(e.kind(), format!("cannot checksum {}: {e}", path.display()));
    let f = File::open(path).map_err(ctx)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = f.read_at(&mut buf, off).map_err(ctx)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(hex(&h.finalize()))
}

impl QuickCheck {
    /// The quick check of `path`, the copy in `tier`.
    pub fn of(path: &Path, tier: SnapshotTier) -> io::Result<QuickCheck> {
        let ctx = |e: io::Error| {
            io::Error::new(e.kind(), format!("cannot sample {}: {e}", path.display()))
        };
        let f = File::open(path).map_err(ctx)?;
        let meta = f.metadata().map_err(ctx)?;
        let mut mtimes = TierMtimes::default();
        mtimes.set(tier, Some(mtime_ns(&meta)));
        Ok(QuickCheck {
            algorithm: QUICK_CHECK_ALGORITHM.into(),
            size: meta.len(),
            sample_pages: SAMPLE_PAGES,
            sample_sha256: sample_sha256(&f, meta.len(), SAMPLE_PAGES).map_err(ctx)?,
            mtime_ns: mtimes,
        })
    }

    /// Checks the copy in `tier`, opened as `file`: `Ok(Err(why))` when it
    /// does not match, `Err` when it cannot be read.
    pub fn verify(
        &self,
        file: &File,
        path: &Path,
        tier: SnapshotTier,
    ) -> io::Result<Result<(), String>> {
        let meta = file.metadata()?;
        if meta.len() != self.size {
            return Ok(Err(format!(
                "{} has {} bytes, recorded {}",
                path.display(),
                meta.len(),
                self.size
            )));
        }
        match self.mtime_ns.get(tier) {
            Some(t) if t != mtime_ns(&meta) => {
                return Ok(Err(format!(
                    "{} was modified after the snapshot (mtime {} ns, recorded {t} ns)",
                    path.display(),
                    mtime_ns(&meta)
                )))
            }
            Some(_) => {}
            None => tracing::warn!(
                "{}: no modification time recorded for this copy; checking the sample only",
                path.display()
            ),
        }
        let got = sample_sha256(file, self.size, self.sample_pages)?;
        if got != self.sample_sha256 {
            return Ok(Err(format!(
                "{} has sample sha256 {got}, recorded {}",
                path.display(),
                self.sample_sha256
            )));
        }
        Ok(Ok(()))
    }

    /// Refuses a record made by another definition.
    pub fn check_definition(&self) -> Result<(), String> {
        if self.algorithm != QUICK_CHECK_ALGORITHM {
            return Err(format!(
                "quick check {:?} is not {QUICK_CHECK_ALGORITHM:?}",
                self.algorithm
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_ranges_stay_inside_the_file() {
        for size in [0u64, 1, 4095, 4096, 10_000, 3 << 20, (1 << 30) + 123] {
            let r = sample_ranges(size, SAMPLE_PAGES);
            assert_eq!(r.len(), SAMPLE_PAGES as usize + 2);
            for (off, len) in r {
                assert!(off + len <= size, "{size}: {off}+{len}");
            }
        }
        let r = sample_ranges(1 << 30, 3);
        assert_eq!(r[1], (256 << 20, 4096));
        assert_eq!(r[3], (768 << 20, 4096));
        assert_eq!(r[4], ((1 << 30) - EDGE_BYTES, EDGE_BYTES));
    }

    #[test]
    fn sample_sees_the_edges_and_the_pages_but_not_between() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.set_len(64 << 20).unwrap();
        let base = sample_sha256(&f, 64 << 20, SAMPLE_PAGES).unwrap();
        let sampled_page = sample_ranges(64 << 20, SAMPLE_PAGES)[5].0;
        f.write_all_at(b"x", sampled_page + 7).unwrap();
        assert_ne!(base, sample_sha256(&f, 64 << 20, SAMPLE_PAGES).unwrap());
        f.write_all_at(&[0], sampled_page + 7).unwrap();
        assert_eq!(base, sample_sha256(&f, 64 << 20, SAMPLE_PAGES).unwrap());
        // Between two sampled pages: not seen (the mtime is what catches it).
        f.write_all_at(b"x", sampled_page + 3 * PAGE).unwrap();
        assert_eq!(base, sample_sha256(&f, 64 << 20, SAMPLE_PAGES).unwrap());
        f.write_all_at(b"x", (64 << 20) - 1).unwrap();
        assert_ne!(base, sample_sha256(&f, 64 << 20, SAMPLE_PAGES).unwrap());
    }
}
