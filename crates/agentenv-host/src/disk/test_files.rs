//! Files and reference values shared by the tests of the disk modules.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::checksum::{hex, CHECKSUM_BLOCK, CHECKSUM_DOMAIN};

/// The checksum by its definition: read everything, hash non-zero blocks.
pub fn reference_sum(path: &Path) -> String {
    let data = std::fs::read(path).unwrap();
    let mut h = Sha256::new();
    h.update(CHECKSUM_DOMAIN);
    for (k, block) in data.chunks(CHECKSUM_BLOCK).enumerate() {
        let mut b = block.to_vec();
        b.resize(CHECKSUM_BLOCK, 0);
        if b.iter().any(|&x| x != 0) {
            h.update((k as u64).to_le_bytes());
            h.update(&b);
        }
    }
    h.update(b"size");
    h.update((data.len() as u64).to_le_bytes());
    hex(&h.finalize())
}

pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// A 64 MiB sparse file with data at a few offsets (some unaligned), an
/// explicit zero block, and a tail that is not a whole block.
pub fn sparse_file(path: &Path) -> u64 {
    let f = File::create(path).unwrap();
    let size = (64 << 20) + 123;
    f.set_len(size).unwrap();
    f.write_all_at(&pattern(3 << 20, 1), 1 << 20).unwrap();
    f.write_all_at(&pattern(5000, 2), (20 << 20) + 17).unwrap();
    f.write_all_at(&[0u8; 8192], 30 << 20).unwrap();
    f.write_all_at(&pattern(100, 3), size - 100).unwrap();
    size
}

/// True when `tool` can be run.
pub fn have(tool: &str) -> bool {
    std::process::Command::new(tool).arg("-V").output().is_ok()
}
