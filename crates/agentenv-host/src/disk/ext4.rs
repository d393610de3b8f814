//! The raw ext4 superblock rewrite that gives a cloned image its own
//! file-system UUID: the primary superblock and each backup get the new UUID
//! and, with `metadata_csum`, a recomputed CRC32C. Nothing else of the image
//! is touched, so this is only correct when the metadata checksums do not
//! depend on the UUID (`metadata_csum_seed`), which is checked first.
//!
//! [`rewrite_uuid`] works on any [`Ext4Image`] (a [`File`], or bytes in
//! memory for the property test and the `ext4_superblock` fuzz target);
//! [`set_ext4_uuid`] is the same on a file by path. Every offset read from
//! the image is checked before use: a malformed image gives an error, never a
//! panic, and the work is bounded by the image's size.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::templates::TemplateError;

// ext4 superblock fields (offsets within the 1024-byte superblock).
const SB_OFFSET: u64 = 1024;
const SB_SIZE: usize = 1024;
const SB_BLOCKS_COUNT_LO: usize = 0x04;
const SB_FIRST_DATA_BLOCK: usize = 0x14;
const SB_LOG_BLOCK_SIZE: usize = 0x18;
const SB_BLOCKS_PER_GROUP: usize = 0x20;
const SB_MAGIC: usize = 0x38;
const SB_BLOCK_GROUP_NR: usize = 0x5a;
const SB_FEATURE_COMPAT: usize = 0x5c;
const SB_FEATURE_INCOMPAT: usize = 0x60;
const SB_FEATURE_RO_COMPAT: usize = 0x64;
const SB_UUID: usize = 0x68;
const SB_BLOCKS_COUNT_HI: usize = 0x150;
const SB_CHECKSUM: usize = 0x3fc;
const EXT4_MAGIC: u16 = 0xef53;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

/// Largest `s_log_block_size`: 1024 << 6 = 64 KiB blocks.
const MAX_LOG_BLOCK_SIZE: u32 = 6;

/// Why the superblocks of an image could not be given a new UUID.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// The primary superblock has no ext4 magic.
    #[error("no ext4 superblock")]
    NotExt4,
    /// `metadata_csum` is on without `metadata_csum_seed`: every metadata
    /// checksum depends on the UUID, so rewriting the superblocks alone
    /// would corrupt the file system.
    #[error("metadata_csum without metadata_csum_seed")]
    UuidBoundChecksums,
    /// `sparse_super2` keeps its backups elsewhere; not supported.
    #[error("sparse_super2 is not supported")]
    SparseSuper2,
    /// Block size, blocks per group or block count make no file system (no
    /// block group at all included).
    #[error("implausible geometry")]
    Geometry,
    /// The primary superblock could not be read.
    #[error("cannot read the superblock: {0}")]
    ReadPrimary(#[source] io::Error),
    /// Superblock copy `group` (0 is the primary) could not be read.
    #[error("cannot read superblock {group}: {source}")]
    Read {
        /// Its block group.
        group: u64,
        /// The I/O error.
        source: io::Error,
    },
    /// Superblock copy `group` could not be written.
    #[error("cannot write superblock {group}: {source}")]
    Write {
        /// Its block group.
        group: u64,
        /// The I/O error.
        source: io::Error,
    },
}

impl Ext4Error {
    /// True when the image was refused before anything was written.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Ext4Error::NotExt4
                | Ext4Error::UuidBoundChecksums
                | Ext4Error::SparseSuper2
                | Ext4Error::Geometry
                | Ext4Error::ReadPrimary(_)
        )
    }
}

/// Where an ext4 image lives: positioned reads and writes of whole ranges.
pub trait Ext4Image {
    /// Fills `buf` from `offset`; a range past the end is an
    /// [`io::ErrorKind::UnexpectedEof`] error.
    fn load(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn store(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
}

impl Ext4Image for File {
    fn load(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn store(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }
}

/// An image in memory, of fixed length: a range past the end is an error
/// both ways (the image never grows).
impl Ext4Image for [u8] {
    fn load(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let range = slice_range(self.len(), offset, buf.len())?;
        buf.copy_from_slice(&self[range]);
        Ok(())
    }

    fn store(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let range = slice_range(self.len(), offset, buf.len())?;
        self[range].copy_from_slice(buf);
        Ok(())
    }
}

fn slice_range(len: usize, offset: u64, n: usize) -> io::Result<std::ops::Range<usize>> {
    usize::try_from(offset)
        .ok()
        .and_then(|start| Some(start..start.checked_add(n)?))
        .filter(|r| r.end <= len)
        .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// CRC-32C (Castagnoli), reflected, without the final inversion: what the
/// kernel's `crc32c()` returns and ext4 stores.
fn crc32c_raw(mut crc: u32, data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// The block groups below `groups` that hold a superblock copy, in
/// increasing order: all of them, or with `sparse_super` groups 0, 1 and the
/// powers of 3, 5 and 7. Lazy, so a huge group count costs nothing until the
/// image runs out.
fn backup_groups(groups: u64, sparse: bool) -> Box<dyn Iterator<Item = u64>> {
    if !sparse {
        return Box::new(0..groups);
    }
    let mut v = vec![0, 1];
    for p in [3u64, 5, 7] {
        let mut x = p;
        while x < groups {
            v.push(x);
            match x.checked_mul(p) {
                Some(n) => x = n,
                None => break,
            }
        }
    }
    v.retain(|&g| g < groups);
    v.sort_unstable();
    v.dedup();
    Box::new(v.into_iter())
}

/// The geometry read from a primary superblock, checked.
struct Geometry {
    block_size: u64,
    first_data_block: u64,
    per_group: u64,
    groups: u64,
    sparse: bool,
    csum: bool,
}

impl Geometry {
    /// Refuses what [`rewrite_uuid`] must not touch; see [`Ext4Error`].
    fn of(sb: &[u8; SB_SIZE]) -> Result<Geometry, Ext4Error> {
        if le16(sb, SB_MAGIC) != EXT4_MAGIC {
            return Err(Ext4Error::NotExt4);
        }
        let compat = le32(sb, SB_FEATURE_COMPAT);
        let incompat = le32(sb, SB_FEATURE_INCOMPAT);
        let ro_compat = le32(sb, SB_FEATURE_RO_COMPAT);
        let csum = ro_compat & RO_COMPAT_METADATA_CSUM != 0;
        if csum && incompat & INCOMPAT_CSUM_SEED == 0 {
            return Err(Ext4Error::UuidBoundChecksums);
        }
        if compat & COMPAT_SPARSE_SUPER2 != 0 {
            return Err(Ext4Error::SparseSuper2);
        }
        let log = le32(sb, SB_LOG_BLOCK_SIZE);
        let per_group = le32(sb, SB_BLOCKS_PER_GROUP) as u64;
        if per_group == 0 || log > MAX_LOG_BLOCK_SIZE {
            return Err(Ext4Error::Geometry);
        }
        let block_size = 1024u64 << log;
        let first_data_block = le32(sb, SB_FIRST_DATA_BLOCK) as u64;
        let mut blocks = le32(sb, SB_BLOCKS_COUNT_LO) as u64;
        if incompat & INCOMPAT_64BIT != 0 {
            blocks |= (le32(sb, SB_BLOCKS_COUNT_HI) as u64) << 32;
        }
        let groups = blocks
            .checked_sub(first_data_block)
            .filter(|&data_blocks| data_blocks > 0)
            .ok_or(Ext4Error::Geometry)?
            .div_ceil(per_group);
        Ok(Geometry {
            block_size,
            first_data_block,
            per_group,
            groups,
            sparse: ro_compat & RO_COMPAT_SPARSE_SUPER != 0,
            csum,
        })
    }

    /// Byte offset of group `g`'s superblock copy.
    fn superblock_at(&self, g: u64) -> Result<u64, Ext4Error> {
        if g == 0 {
            return Ok(SB_OFFSET);
        }
        g.checked_mul(self.per_group)
            .and_then(|b| b.checked_add(self.first_data_block))
            .and_then(|b| b.checked_mul(self.block_size))
            .ok_or(Ext4Error::Geometry)
    }
}

/// Writes `uuid` into every superblock of the ext4 `image` (the primary and
/// its backups), recomputing each superblock checksum; returns how many
/// superblocks were rewritten. A group where no backup is found (no magic, or
/// another group's number) is skipped, as mkfs leaves none in a group cut
/// short. Refuses, before writing anything, an image whose metadata checksums
/// depend on the UUID (`metadata_csum` without `metadata_csum_seed`), that
/// uses `sparse_super2`, or whose geometry is implausible.
pub fn rewrite_uuid<I: Ext4Image + ?Sized>(
    image: &mut I,
    uuid: [u8; 16],
) -> Result<u64, Ext4Error> {
    let mut sb = [0u8; SB_SIZE];
    image
        .load(SB_OFFSET, &mut sb)
        .map_err(Ext4Error::ReadPrimary)?;
    let geo = Geometry::of(&sb)?;
    let mut rewritten = 0;
    for g in backup_groups(geo.groups, geo.sparse) {
        let at = geo.superblock_at(g)?;
        let mut copy = [0u8; SB_SIZE];
        image
            .load(at, &mut copy)
            .map_err(|source| Ext4Error::Read { group: g, source })?;
        if le16(&copy, SB_MAGIC) != EXT4_MAGIC
            || (g > 0 && le16(&copy, SB_BLOCK_GROUP_NR) as u64 != g)
        {
            // mkfs leaves no backup here (e.g. a group cut short); skip it.
            continue;
        }
        copy[SB_UUID..SB_UUID + 16].copy_from_slice(&uuid);
        if geo.csum {
            let c = crc32c_raw(!0, &copy[..SB_CHECKSUM]);
            copy[SB_CHECKSUM..].copy_from_slice(&c.to_le_bytes());
        }
        image
            .store(at, &copy)
            .map_err(|source| Ext4Error::Write { group: g, source })?;
        rewritten += 1;
    }
    Ok(rewritten)
}

/// [`rewrite_uuid`] on the ext4 image file at `path`; errors name the path.
pub fn set_ext4_uuid(path: &Path, uuid: [u8; 16]) -> Result<(), TemplateError> {
    let io_err = |context: String, source| TemplateError::Io { context, source };
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err(format!("cannot open {}", path.display()), e))?;
    let p = path.display();
    rewrite_uuid(&mut f, uuid).map(drop).map_err(|e| match e {
        Ext4Error::ReadPrimary(e) => io_err(format!("cannot read the superblock of {p}"), e),
        Ext4Error::Read { group, source } => {
            io_err(format!("cannot read superblock {group} of {p}"), source)
        }
        Ext4Error::Write { group, source } => {
            io_err(format!("cannot write superblock {group} of {p}"), source)
        }
        refused => TemplateError::Uuid {
            path: path.to_path_buf(),
            why: refused.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::test_files::have;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // CRC-32C("123456789") = 0xe3069283 with the final inversion.
        assert_eq!(!crc32c_raw(!0, b"123456789"), 0xe306_9283);
    }

    #[test]
    fn backup_groups_follow_sparse_super() {
        let got: Vec<u64> = backup_groups(130, true).collect();
        assert_eq!(got, [0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125]);
        assert_eq!(backup_groups(4, false).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(backup_groups(1, true).collect::<Vec<_>>(), [0]);
        // A huge group count is no work until the image runs out.
        assert_eq!(backup_groups(u64::MAX, true).count(), 2 + 40 + 27 + 22);
    }

    #[test]
    fn uuid_change_refuses_uuid_bound_checksums() {
        if !have("mkfs.ext4") {
            agentenv_testkit::skip::skip("mkfs.ext4 not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.ext4");
        File::create(&p).unwrap().set_len(64 << 20).unwrap();
        let st = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "metadata_csum,^metadata_csum_seed"])
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
        let e = set_ext4_uuid(&p, [1; 16]).unwrap_err();
        assert!(e.to_string().contains("metadata_csum_seed"), "{e}");
        let e = set_ext4_uuid(&dir.path().join("none"), [1; 16]).unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
    }

    /// SplitMix64: a seeded generator, so a failure replays.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }

        fn fill(&mut self, buf: &mut [u8]) {
            for chunk in buf.chunks_mut(8) {
                let n = chunk.len();
                chunk.copy_from_slice(&self.next().to_le_bytes()[..n]);
            }
        }
    }

    fn put16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// True when `g` holds a superblock copy by the definition of
    /// `sparse_super`: 0, 1, or a power of 3, 5 or 7.
    fn is_backup(g: u64, sparse: bool) -> bool {
        let power_of = |p: u64| {
            let mut x = p;
            while x < g {
                x *= p;
            }
            x == g
        };
        !sparse || g <= 1 || power_of(3) || power_of(5) || power_of(7)
    }

    /// A synthetic image of random bytes with the geometry in its primary
    /// superblock, and the superblock copies that `rewrite_uuid` must
    /// rewrite: backups in most backup groups, missing or numbered for
    /// another group in a few, and decoys with a valid-looking copy in groups
    /// that hold none. Returns the image and the offsets of the copies.
    fn synthetic_image(rng: &mut Rng) -> (Vec<u8>, Vec<usize>, bool) {
        let log = rng.below(3) as u32;
        let bs = 1024usize << log;
        let first = usize::from(log == 0);
        let per_group = 1 + rng.below(8) as usize;
        let groups = 1 + rng.below(50) as usize;
        let blocks = first + (groups - 1) * per_group + 1 + rng.below(per_group as u64) as usize;
        let sparse = rng.chance(70);
        let csum = rng.chance(60);
        let bit64 = rng.chance(50);
        let mut image = vec![0u8; blocks * bs];
        rng.fill(&mut image);
        let mut sb = [0u8; SB_SIZE];
        rng.fill(&mut sb);
        put16(&mut sb, SB_MAGIC, EXT4_MAGIC);
        put32(&mut sb, SB_LOG_BLOCK_SIZE, log);
        put32(&mut sb, SB_FIRST_DATA_BLOCK, first as u32);
        put32(&mut sb, SB_BLOCKS_PER_GROUP, per_group as u32);
        put32(&mut sb, SB_BLOCKS_COUNT_LO, blocks as u32);
        if bit64 {
            put32(&mut sb, SB_BLOCKS_COUNT_HI, 0);
        }
        let mut incompat = le32(&sb, SB_FEATURE_INCOMPAT) & !(INCOMPAT_64BIT | INCOMPAT_CSUM_SEED);
        if bit64 {
            incompat |= INCOMPAT_64BIT;
        }
        let mut ro =
            le32(&sb, SB_FEATURE_RO_COMPAT) & !(RO_COMPAT_SPARSE_SUPER | RO_COMPAT_METADATA_CSUM);
        if sparse {
            ro |= RO_COMPAT_SPARSE_SUPER;
        }
        if csum {
            ro |= RO_COMPAT_METADATA_CSUM;
            incompat |= INCOMPAT_CSUM_SEED;
        }
        put32(&mut sb, SB_FEATURE_INCOMPAT, incompat);
        put32(&mut sb, SB_FEATURE_RO_COMPAT, ro);
        let compat = le32(&sb, SB_FEATURE_COMPAT) & !COMPAT_SPARSE_SUPER2;
        put32(&mut sb, SB_FEATURE_COMPAT, compat);
        image[1024..2048].copy_from_slice(&sb);
        let mut copies = vec![1024];
        for g in 1..groups {
            let at = (g * per_group + first) * bs;
            let copy = &mut image[at..at + SB_SIZE];
            match (is_backup(g as u64, sparse), rng.below(10)) {
                // A backup, or a decoy in a group that holds none.
                (_, 0..=7) => {
                    put16(copy, SB_MAGIC, EXT4_MAGIC);
                    put16(copy, SB_BLOCK_GROUP_NR, g as u16);
                    if is_backup(g as u64, sparse) {
                        copies.push(at);
                    }
                }
                // Another group's number: not a copy of this group.
                (_, 8) => {
                    put16(copy, SB_MAGIC, EXT4_MAGIC);
                    put16(copy, SB_BLOCK_GROUP_NR, g as u16 + 1);
                }
                _ => put16(copy, SB_MAGIC, !EXT4_MAGIC),
            }
        }
        (image, copies, csum)
    }

    /// What the image must look like after the rewrite: the UUID in every
    /// copy, its checksum recomputed by a bitwise CRC-32C.
    fn expected(image: &[u8], copies: &[usize], csum: bool, uuid: [u8; 16]) -> Vec<u8> {
        let mut out = image.to_vec();
        for &at in copies {
            out[at + SB_UUID..at + SB_UUID + 16].copy_from_slice(&uuid);
            if csum {
                let mut c = !0u32;
                for &b in &out[at..at + SB_CHECKSUM] {
                    c ^= b as u32;
                    for _ in 0..8 {
                        c = if c & 1 != 0 {
                            (c >> 1) ^ 0x82f6_3b78
                        } else {
                            c >> 1
                        };
                    }
                }
                out[at + SB_CHECKSUM..at + SB_SIZE].copy_from_slice(&c.to_le_bytes());
            }
        }
        out
    }

    #[test]
    fn rewrite_touches_exactly_the_superblock_copies() {
        let mut rng = Rng(0x5eed_0e74);
        for case in 0..1500 {
            let (image, copies, csum) = synthetic_image(&mut rng);
            let mut uuid = [0u8; 16];
            rng.fill(&mut uuid);
            let mut got = image.clone();
            let n = rewrite_uuid(got.as_mut_slice(), uuid)
                .unwrap_or_else(|e| panic!("case {case}: {e}"));
            assert_eq!(n, copies.len() as u64, "case {case}");
            assert!(
                got == expected(&image, &copies, csum, uuid),
                "case {case}: bytes other than the copies' UUID and checksum changed"
            );
            // Again with the same UUID: nothing changes.
            let again = got.clone();
            rewrite_uuid(got.as_mut_slice(), uuid).unwrap();
            assert!(got == again, "case {case}: not idempotent");
        }
    }

    #[test]
    fn refused_images_are_left_untouched() {
        let mut rng = Rng(0x0bad_5eed);
        for case in 0..600 {
            let (mut image, _, _) = synthetic_image(&mut rng);
            let sb = &mut image[1024..2048];
            let want = match case % 6 {
                0 => {
                    put16(sb, SB_MAGIC, 0xef54);
                    "no ext4 superblock"
                }
                1 => {
                    let ro = le32(sb, SB_FEATURE_RO_COMPAT) | RO_COMPAT_METADATA_CSUM;
                    put32(sb, SB_FEATURE_RO_COMPAT, ro);
                    let inc = le32(sb, SB_FEATURE_INCOMPAT) & !INCOMPAT_CSUM_SEED;
                    put32(sb, SB_FEATURE_INCOMPAT, inc);
                    "metadata_csum without metadata_csum_seed"
                }
                2 => {
                    let c = le32(sb, SB_FEATURE_COMPAT) | COMPAT_SPARSE_SUPER2;
                    put32(sb, SB_FEATURE_COMPAT, c);
                    "sparse_super2 is not supported"
                }
                3 => {
                    put32(sb, SB_LOG_BLOCK_SIZE, 7 + rng.next() as u32 % 100);
                    "implausible geometry"
                }
                4 => {
                    put32(sb, SB_BLOCKS_PER_GROUP, 0);
                    "implausible geometry"
                }
                _ => {
                    let blocks = le32(sb, SB_BLOCKS_COUNT_LO);
                    let inc = le32(sb, SB_FEATURE_INCOMPAT) & !INCOMPAT_64BIT;
                    put32(sb, SB_FEATURE_INCOMPAT, inc);
                    // No block after the first data block, or fewer blocks.
                    put32(sb, SB_FIRST_DATA_BLOCK, blocks + (case / 6 % 2) as u32);
                    "implausible geometry"
                }
            };
            let before = image.clone();
            let e = rewrite_uuid(image.as_mut_slice(), [7; 16]).unwrap_err();
            assert!(e.is_refusal(), "case {case}: {e}");
            assert_eq!(e.to_string(), want, "case {case}");
            assert!(image == before, "case {case}: a refused image changed");
        }
        // Too short to hold a superblock.
        let e = rewrite_uuid(&mut [0u8; 2000][..], [7; 16]).unwrap_err();
        assert!(matches!(e, Ext4Error::ReadPrimary(_)), "{e}");
    }

    #[test]
    fn truncated_images_fail_at_the_first_missing_copy() {
        let mut rng = Rng(0x7a11);
        for case in 0..300 {
            let (image, copies, _) = synthetic_image(&mut rng);
            let Some(&last) = copies.last().filter(|&&c| c > 1024) else {
                continue;
            };
            let mut short = image[..last + 100].to_vec();
            let e = rewrite_uuid(short.as_mut_slice(), [3; 16]).unwrap_err();
            assert!(
                matches!(e, Ext4Error::Read { ref source, .. }
                    if source.kind() == io::ErrorKind::UnexpectedEof),
                "case {case}: {e}"
            );
            assert_eq!(short.len(), last + 100, "case {case}: the image grew");
        }
    }

    #[test]
    fn file_and_memory_images_are_rewritten_alike() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(42);
        for case in 0..20 {
            let (image, _, _) = synthetic_image(&mut rng);
            let p = dir.path().join(format!("{case}.img"));
            std::fs::write(&p, &image).unwrap();
            let uuid = [case as u8; 16];
            set_ext4_uuid(&p, uuid).unwrap();
            let mut mem = image.clone();
            rewrite_uuid(mem.as_mut_slice(), uuid).unwrap();
            assert!(std::fs::read(&p).unwrap() == mem, "case {case}");
        }
        // A refusal names the path.
        let p = dir.path().join("bad.img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let e = set_ext4_uuid(&p, [1; 16]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cannot set the UUID of {}: no ext4 superblock", p.display())
        );
    }
}
