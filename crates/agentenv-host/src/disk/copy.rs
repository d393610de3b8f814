//! Sparse copies: a reflink (`FICLONE`) where the file system shares
//! extents, else the data extents only (`SEEK_DATA`/`SEEK_HOLE`) with
//! `copy_file_range`, else with `pread`/`pwrite` (which leaves all-zero
//! blocks as holes and can hash the data as it passes, see `buffers.rs`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::buffers::{feed_range, Buffers};
use super::checksum::{is_zero, sha256_of, SparseSha256, CHECKSUM_BLOCK};
use super::error::{is_no_space, is_read_only, raw_os_error, with_path};
use super::space::data_extents;

/// Longest single `copy_file_range` request.
const CFR_MAX: u64 = 1 << 30;

/// How a copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// `FICLONE`: the copy shares the source's extents; no data moved.
    Reflink,
    /// `copy_file_range` over each data extent (the kernel moves the data).
    CopyFileRange,
    /// `pread`/`pwrite` over each data extent; all-zero 4 KiB blocks are left
    /// as holes.
    ReadWrite,
}

impl CopyMethod {
    /// A short name for logs and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMethod::Reflink => "reflink",
            CopyMethod::CopyFileRange => "copy_file_range",
            CopyMethod::ReadWrite => "read/write",
        }
    }
}

/// What a copy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// How the data got there.
    pub method: CopyMethod,
    /// Logical length of the source and of the copy.
    pub logical_bytes: u64,
    /// Bytes in the source's data extents that were visited (0 for a reflink).
    pub data_bytes: u64,
    /// Bytes written to the copy (0 for a reflink; all-zero blocks skipped by
    /// the read/write copy are not counted).
    pub bytes_copied: u64,
    /// Number of data extents visited (0 for a reflink).
    pub extents: u64,
}

/// Which copy mechanisms [`copy_sparse_with`] may use. Tests and benchmarks
/// turn them off to measure or exercise one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOptions {
    /// Try `FICLONE` first.
    pub reflink: bool,
    /// Try `copy_file_range` for the data extents before `pread`/`pwrite`.
    pub copy_file_range: bool,
    /// Compute the snapshot checksum of the source. With `copy_file_range` it
    /// takes a second read of the data; with `pread`/`pwrite` it is computed
    /// on the bytes as they pass.
    pub checksum: bool,
    /// Hash on a second thread, overlapping the copy (only above a few MiB
    /// of data); else hash inline between reads and writes.
    pub hash_thread: bool,
}

impl CopyOptions {
    /// What [`copy_sparse`] does.
    pub const COPY: CopyOptions = CopyOptions {
        reflink: true,
        copy_file_range: true,
        checksum: false,
        hash_thread: true,
    };
    /// What [`copy_sparse_hashed`] does: clone, else read once, write and hash.
    pub const COPY_AND_HASH: CopyOptions = CopyOptions {
        reflink: true,
        copy_file_range: false,
        checksum: true,
        hash_thread: true,
    };
}

/// Copies `src` to the new file `dst` (which must not exist): a reflink clone
/// where the file system can share extents, else its data extents only with
/// `copy_file_range`, else with `pread`/`pwrite`. The copy has the source's
/// logical length. On error `dst` is removed.
pub fn copy_sparse(src: &Path, dst: &Path) -> io::Result<CopyStats> {
    copy_sparse_with(src, dst, CopyOptions::COPY).map(|(s, _)| s)
}

/// Like [`copy_sparse`], and returns the snapshot checksum of `src`. Without a
/// reflink the data is read once, written and hashed as it passes.
pub fn copy_sparse_hashed(src: &Path, dst: &Path) -> io::Result<(CopyStats, String)> {
    let (stats, sum) = copy_sparse_with(src, dst, CopyOptions::COPY_AND_HASH)?;
    Ok((stats, sum.unwrap_or_default()))
}

/// [`copy_sparse`] with the mechanisms chosen by `opts`; returns the checksum
/// when `opts.checksum` is set.
pub fn copy_sparse_with(
    src: &Path,
    dst: &Path,
    opts: CopyOptions,
) -> io::Result<(CopyStats, Option<String>)> {
    let input =
        File::open(src).map_err(|e| with_path(format!("cannot open {}", src.display()), e))?;
    copy_sparse_from(&input, src, dst, opts)
}

/// [`copy_sparse_with`] from a file already open (`src` names it in errors).
/// Lets a caller open the source under a lock and copy it after the lock is
/// released, even if the path is unlinked meanwhile.
pub fn copy_sparse_from(
    input: &File,
    src: &Path,
    dst: &Path,
    opts: CopyOptions,
) -> io::Result<(CopyStats, Option<String>)> {
    let meta = input
        .metadata()
        .map_err(|e| with_path(format!("cannot stat {}", src.display()), e))?;
    if !meta.is_file() {
        return Err(with_path(
            format!("cannot copy {}", src.display()),
            io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    let output = crate::private::file_options()
        .write(true)
        .read(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| with_path(format!("cannot create {}", dst.display()), e))?;
    let result = copy_open(input, &output, meta.len(), opts, src, dst);
    if result.is_err() {
        drop(output);
        let _ = std::fs::remove_file(dst);
    }
    result
}

/// Copies `src` over `dst`, a file of the same length made and allocated
/// beforehand ([`preallocate`]): only the source's data extents are
/// written, into pages that already exist, and the source's holes are then
/// punched into `dst` so that it takes no more room than a sparse copy.
/// This is the copy a full snapshot makes of a stopped guest's RAM: the page
/// allocations happen before the guest stops, not while it waits.
pub fn copy_sparse_over(src: &Path, dst: &Path) -> io::Result<CopyStats> {
    let input =
        File::open(src).map_err(|e| with_path(format!("cannot open {}", src.display()), e))?;
    let size = input
        .metadata()
        .map_err(|e| with_path(format!("cannot stat {}", src.display()), e))?
        .len();
    let output = OpenOptions::new()
        .write(true)
        .read(true)
        .open(dst)
        .map_err(|e| with_path(format!("cannot open {}", dst.display()), e))?;
    let opts = CopyOptions {
        reflink: false,
        ..CopyOptions::COPY
    };
    let (stats, _) = copy_open(&input, &output, size, opts, src, dst)?;
    let extents = data_extents(&input, size)
        .map_err(|e| with_path(format!("cannot read {}", src.display()), e))?;
    let mut pos = 0;
    for (start, end) in extents.into_iter().chain([(size, size)]) {
        if start > pos {
            punch_hole(&output, pos, start - pos)
                .map_err(|e| with_path(format!("cannot punch a hole in {}", dst.display()), e))?;
        }
        pos = end;
    }
    Ok(stats)
}

/// Makes `path` a new file of `len` bytes, all allocated (so a later copy
/// into it allocates nothing).
pub fn preallocate(path: &Path, len: u64) -> io::Result<()> {
    let f = crate::private::file_options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| with_path(format!("cannot create {}", path.display()), e))?;
    let done = nix::fcntl::fallocate(
        f.as_raw_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        len as i64,
    )
    .map_err(io::Error::from);
    if let Err(e) = done {
        drop(f);
        let _ = std::fs::remove_file(path);
        return Err(with_path(format!("cannot allocate {}", path.display()), e));
    }
    Ok(())
}

fn punch_hole(f: &File, off: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::FallocateFlags;
    nix::fcntl::fallocate(
        f.as_raw_fd(),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off as i64,
        len as i64,
    )
    .map_err(io::Error::from)
}

fn copy_open(
    input: &File,
    output: &File,
    size: u64,
    opts: CopyOptions,
    src: &Path,
    dst: &Path,
) -> io::Result<(CopyStats, Option<String>)> {
    let src_ctx = |e| with_path(format!("cannot read {}", src.display()), e);
    let dst_ctx = |e| with_path(format!("cannot write {}", dst.display()), e);
    if opts.reflink && try_reflink(input, output).map_err(dst_ctx)? {
        let sum = if opts.checksum {
            Some(sha256_of(input, size).map_err(src_ctx)?.0)
        } else {
            None
        };
        let stats = CopyStats {
            method: CopyMethod::Reflink,
            logical_bytes: size,
            data_bytes: 0,
            bytes_copied: 0,
            extents: 0,
        };
        return Ok((stats, sum));
    }
    output.set_len(size).map_err(dst_ctx)?;
    let extents = data_extents(input, size).map_err(src_ctx)?;
    let mut stats = CopyStats {
        method: CopyMethod::ReadWrite,
        logical_bytes: size,
        data_bytes: extents.iter().map(|(s, e)| e - s).sum(),
        bytes_copied: 0,
        extents: extents.len() as u64,
    };
    let mut use_cfr = opts.copy_file_range;
    let mut bufs: Option<Buffers> = None;
    let mut left = stats.data_bytes;
    for &(start, end) in &extents {
        let mut off = start;
        if use_cfr {
            match cfr_range(input, output, start, end) {
                Ok(()) => {
                    stats.bytes_copied += end - start;
                    stats.method = CopyMethod::CopyFileRange;
                    left -= end - start;
                    continue;
                }
                Err((done, e)) if cfr_unsupported(&e) => {
                    stats.bytes_copied += done - start;
                    off = done;
                    use_cfr = false;
                }
                Err((_, e)) => return Err(cfr_error(e, src, dst)),
            }
        }
        let b = bufs.get_or_insert_with(|| Buffers::new(opts.checksum, opts.hash_thread, left));
        // What a partial copy_file_range moved is hashed before going on.
        if opts.checksum && off > start {
            feed_range(input, start, off, b).map_err(src_ctx)?;
        }
        stats.bytes_copied += rw_range(input, output, off, end, b, src, dst)?;
        left -= end - start;
    }
    let sum = match (opts.checksum, bufs) {
        (false, _) => None,
        // Every extent went through pread/pwrite and was hashed on the way.
        (true, Some(b)) if stats.method == CopyMethod::ReadWrite => {
            Some(b.finish(size).map_err(src_ctx)?)
        }
        (true, None) if stats.method == CopyMethod::ReadWrite => {
            Some(SparseSha256::new().finish(size))
        }
        // copy_file_range moved data the hasher never saw: read it again.
        (true, _) => Some(sha256_of(input, size).map_err(src_ctx)?.0),
    };
    Ok((stats, sum))
}
/// Names the file a failed `copy_file_range` is about: the output when it
/// is full or read-only, both otherwise.
fn cfr_error(e: io::Error, src: &Path, dst: &Path) -> io::Error {
    if is_no_space(&e) || is_read_only(&e) || matches!(raw_os_error(&e), Some(libc::EFBIG)) {
        with_path(format!("cannot write {}", dst.display()), e)
    } else {
        with_path(
            format!("cannot copy {} to {}", src.display(), dst.display()),
            e,
        )
    }
}

/// `FICLONE`: true when `output` now shares all of `input`'s extents, false
/// when the file system cannot do it here.
fn try_reflink(input: &File, output: &File) -> io::Result<bool> {
    // SAFETY: both descriptors are open for the duration of the call; FICLONE
    // takes the source descriptor by value and touches no user memory.
    let rc = unsafe { libc::ioctl(output.as_raw_fd(), libc::FICLONE, input.as_raw_fd()) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(
            libc::EOPNOTSUPP
            | libc::ENOTTY
            | libc::EXDEV
            | libc::EINVAL
            | libc::ENOSYS
            | libc::EPERM
            | libc::EBADF,
        ) => Ok(false),
        _ => Err(e),
    }
}

/// True for the `copy_file_range` errors that mean "not here": fall back to
/// read/write.
fn cfr_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EXDEV
                | libc::ENOSYS
                | libc::EOPNOTSUPP
                | libc::EINVAL
                | libc::EBADF
                | libc::EPERM
        )
    )
}

/// `copy_file_range` over `[start, end)`; on error, the offset reached and
/// the error.
fn cfr_range(input: &File, output: &File, start: u64, end: u64) -> Result<(), (u64, io::Error)> {
    let mut off_in = start as i64;
    let mut off_out = start as i64;
    while (off_in as u64) < end {
        let len = (end - off_in as u64).min(CFR_MAX) as usize;
        // SAFETY: both descriptors are open; the offset pointers point to
        // live local i64s that the kernel updates; flags must be 0.
        let n = unsafe {
            libc::copy_file_range(
                input.as_raw_fd(),
                &mut off_in,
                output.as_raw_fd(),
                &mut off_out,
                len,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err((off_in as u64, e));
        }
        if n == 0 {
            // The source shrank under us.
            return Err((
                off_in as u64,
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "source shrank during the copy",
                ),
            ));
        }
    }
    Ok(())
}

/// `pread`/`pwrite` over `[start, end)`, leaving all-zero 4 KiB blocks as
/// holes; each buffer goes to the checksum after it is written. Returns the
/// bytes written.
fn rw_range(
    input: &File,
    output: &File,
    start: u64,
    end: u64,
    bufs: &mut Buffers,
    src: &Path,
    dst: &Path,
) -> io::Result<u64> {
    let mut written = 0;
    let mut off = start;
    while off < end {
        let mut buf = bufs.take();
        let n = ((end - off) as usize).min(buf.len());
        let r = input
            .read_exact_at(&mut buf[..n], off)
            .map_err(|e| with_path(format!("cannot read {}", src.display()), e))
            .and_then(|()| {
                write_nonzero(output, off, &buf[..n])
                    .map_err(|e| with_path(format!("cannot write {}", dst.display()), e))
            });
        bufs.done(off, buf, n);
        written += r?;
        off += n as u64;
    }
    Ok(written)
}

/// Writes the runs of `data` (which sits at `off`) that are not all-zero
/// 4 KiB blocks; returns the bytes written.
fn write_nonzero(output: &File, off: u64, data: &[u8]) -> io::Result<u64> {
    let bs = CHECKSUM_BLOCK as u64;
    let n = data.len();
    let mut written = 0;
    let mut run: Option<usize> = None;
    let mut i = 0usize;
    while i < n {
        let abs = off + i as u64;
        let piece = ((bs - abs % bs) as usize).min(n - i);
        let zero = is_zero(&data[i..i + piece]);
        match (zero, run) {
            (false, None) => run = Some(i),
            (true, Some(r)) => {
                output.write_all_at(&data[r..i], off + r as u64)?;
                written += (i - r) as u64;
                run = None;
            }
            _ => {}
        }
        i += piece;
    }
    if let Some(r) = run {
        output.write_all_at(&data[r..n], off + r as u64)?;
        written += (n - r) as u64;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::buffers::HASH_THREAD_MIN;
    use crate::disk::checksum::sparse_sha256;
    use crate::disk::space::allocated_bytes;
    use crate::disk::test_files::{pattern, reference_sum, sparse_file};

    fn check_copy(opts: CopyOptions, expect: CopyMethod) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        let size = sparse_file(&src);
        let (stats, sum) = copy_sparse_with(&src, &dst, opts).unwrap();
        if stats.method == CopyMethod::Reflink {
            eprintln!(
                "note: {} reflinks; the extent paths are not exercised",
                dir.path().display()
            );
        } else {
            assert_eq!(stats.method, expect);
        }
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), size);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let alloc = allocated_bytes(&dst).unwrap();
        assert!(alloc < 5 << 20, "copy allocated {alloc} bytes");
        if opts.checksum {
            assert_eq!(sum.unwrap(), reference_sum(&src));
        } else {
            assert!(sum.is_none());
        }
        // The copy refuses to overwrite.
        let e = copy_sparse_with(&src, &dst, opts).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert!(e.to_string().contains("dst"), "{e}");
    }

    #[test]
    fn copies_data_extents_with_copy_file_range() {
        check_copy(
            CopyOptions {
                reflink: false,
                copy_file_range: true,
                checksum: true,
                hash_thread: true,
            },
            CopyMethod::CopyFileRange,
        );
    }

    #[test]
    fn copies_data_extents_with_read_write() {
        check_copy(
            CopyOptions {
                reflink: false,
                copy_file_range: false,
                checksum: true,
                hash_thread: false,
            },
            CopyMethod::ReadWrite,
        );
        check_copy(
            CopyOptions {
                reflink: false,
                copy_file_range: false,
                checksum: false,
                hash_thread: false,
            },
            CopyMethod::ReadWrite,
        );
    }

    #[test]
    fn a_copy_over_a_preallocated_file_keeps_only_the_data_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(32 << 20).unwrap();
        f.write_all_at(&pattern(3 << 20, 7), 4 << 20).unwrap();
        f.write_all_at(&pattern(1 << 20, 8), 30 << 20).unwrap();
        let dst = dir.path().join("dst");
        preallocate(&dst, 32 << 20).unwrap();
        assert!(
            allocated_bytes(&dst).unwrap() >= 32 << 20,
            "all allocated first"
        );
        // Stale bytes where the source has holes must not survive.
        OpenOptions::new()
            .write(true)
            .open(&dst)
            .unwrap()
            .write_all_at(b"stale", 20 << 20)
            .unwrap();
        copy_sparse_over(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let alloc = allocated_bytes(&dst).unwrap();
        assert!(
            alloc <= 5 << 20,
            "holes punched back: {alloc} bytes allocated"
        );
        // A new file that exists already is refused, and a missing one named.
        assert_eq!(
            preallocate(&dst, 1).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        let e = copy_sparse_over(&src, &dir.path().join("nope")).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn checksum_on_the_hashing_thread_matches_its_definition() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&pattern(9 << 20, 4), 1 << 20).unwrap();
        f.write_all_at(&pattern(5 << 20, 5), (40 << 20) + 512)
            .unwrap();
        f.write_all_at(&vec![0u8; 2 << 20], 50 << 20).unwrap();
        let (stats, sum) = copy_sparse_hashed(&src, &dir.path().join("dst")).unwrap();
        assert!(stats.data_bytes >= HASH_THREAD_MIN);
        if stats.method != CopyMethod::Reflink {
            assert_eq!(stats.method, CopyMethod::ReadWrite);
        }
        assert_eq!(sum, reference_sum(&src));
        assert_eq!(sum, sparse_sha256(&dir.path().join("dst")).unwrap());
    }

    #[test]
    fn read_write_copy_leaves_zero_blocks_as_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        let mut data = vec![0u8; 8 << 20];
        data[5 << 20] = 9;
        std::fs::write(&src, &data).unwrap();
        let opts = CopyOptions {
            reflink: false,
            copy_file_range: false,
            checksum: true,
            hash_thread: true,
        };
        let (stats, sum) = copy_sparse_with(&src, &dst, opts).unwrap();
        assert_eq!(stats.bytes_copied, CHECKSUM_BLOCK as u64);
        assert!(allocated_bytes(&dst).unwrap() <= 64 << 10);
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        assert_eq!(sum.unwrap(), sparse_sha256(&dst).unwrap());
    }

    #[test]
    fn missing_source_names_the_path_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("dst");
        let e = copy_sparse(&dir.path().join("nope"), &dst).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        assert_eq!(raw_os_error(&e), Some(libc::ENOENT));
        assert!(!dst.exists());
    }
}
