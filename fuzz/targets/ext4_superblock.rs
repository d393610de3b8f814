// The body of the `ext4_superblock` fuzz target: arbitrary bytes, taken as an
// ext4 image in memory, into the raw superblock rewrite that gives each
// overlay clone its own UUID (agentenv_host::disk::rewrite_uuid). Shared,
// through include!(), by the cargo-fuzz target
// (fuzz/fuzz_targets/ext4_superblock.rs) and the ordinary test that runs it
// over PRNG-made images (crates/agentenv/tests/fuzz_targets.rs), so it uses
// only crates both have and has no inner attributes.
//
// Properties:
// - no panic and bounded work on any image (offsets and counts come from
//   the image and are checked);
// - the image keeps its length;
// - every byte that changes is in the UUID or the checksum field of a
//   1024-byte superblock that now carries ext4's magic and the new UUID;
// - a refused image (not ext4, UUID-bound checksums, sparse_super2,
//   implausible geometry, too short) is left untouched;
// - on success the primary superblock carries the new UUID and, with
//   metadata_csum, a CRC-32C (computed here bit by bit) that matches; no
//   more bytes changed than the UUIDs and checksums of the superblocks
//   reported rewritten; a second run reports the same count and changes
//   nothing.

use agentenv_host::disk::{rewrite_uuid, Ext4Error};

const SB_OFFSET: usize = 1024;
const SB_SIZE: usize = 1024;
const MAGIC_AT: usize = 0x38;
const UUID_AT: usize = 0x68;
const CHECKSUM_AT: usize = 0x3fc;
const RO_COMPAT_AT: usize = 0x64;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

/// Runs every property on one input.
pub fn ext4_superblock(data: &[u8]) {
    // The UUID comes from the input's first bytes, which lie before the
    // primary superblock, so the fuzzer can make it equal the old one or not.
    let mut uuid = [0x5a; 16];
    for (u, b) in uuid.iter_mut().zip(data) {
        *u ^= b;
    }
    let mut image = data.to_vec();
    let result = rewrite_uuid(image.as_mut_slice(), uuid);
    assert_eq!(image.len(), data.len(), "the image changed length");
    let changed = changed_bytes(data, &image, &uuid);
    match result {
        Err(e) => {
            if e.is_refusal() {
                assert_eq!(changed, 0, "refused ({e}) but {changed} bytes changed");
            }
            if let Ext4Error::ReadPrimary(_) = e {
                assert!(data.len() < SB_OFFSET + SB_SIZE, "{e} on {} bytes", data.len());
            }
        }
        Ok(n) => {
            assert!(n >= 1, "the primary superblock was not counted");
            // 16 bytes of UUID and 4 of checksum in each rewritten superblock.
            assert!(changed as u64 <= 20 * n, "{changed} bytes changed, {n} rewritten");
            let primary = &image[SB_OFFSET..SB_OFFSET + SB_SIZE];
            assert_eq!(&primary[UUID_AT..UUID_AT + 16], &uuid[..]);
            if le32(primary, RO_COMPAT_AT) & RO_COMPAT_METADATA_CSUM != 0 {
                assert_eq!(
                    crc32c_bitwise(&primary[..CHECKSUM_AT]),
                    le32(primary, CHECKSUM_AT),
                    "the primary superblock's checksum is wrong"
                );
            }
            let once = image.clone();
            let again = rewrite_uuid(image.as_mut_slice(), uuid);
            assert!(
                matches!(again, Ok(m) if m == n),
                "second run: {again:?}, first: Ok({n})"
            );
            assert!(image == once, "a second run changed the image");
        }
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// CRC-32C without the final inversion, one bit at a time (the library uses
/// a table; this is the independent check).
fn crc32c_bitwise(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = (c >> 1) ^ (0x82f6_3b78 & (c & 1).wrapping_neg());
        }
    }
    c
}

/// How many bytes differ between `before` and `after`; panics on a changed
/// byte that is not in the UUID or the checksum field of a superblock that
/// carries the magic and `uuid`.
fn changed_bytes(before: &[u8], after: &[u8], uuid: &[u8; 16]) -> usize {
    let is_rewritten = |start: usize| {
        start + SB_SIZE <= after.len()
            && after[start + MAGIC_AT..start + MAGIC_AT + 2] == [0x53, 0xef]
            && after[start + UUID_AT..start + UUID_AT + 16] == uuid[..]
    };
    let changed: Vec<usize> = (0..before.len()).filter(|&p| before[p] != after[p]).collect();
    for &p in &changed {
        let ok = (UUID_AT..UUID_AT + 16)
            .chain(CHECKSUM_AT..SB_SIZE)
            .filter(|&o| o <= p)
            .any(|o| is_rewritten(p - o));
        assert!(ok, "byte {p} changed outside a superblock's UUID or checksum");
    }
    changed.len()
}
