//! Disk files: sparse-aware copies, the snapshot checksum, and ext4 overlay
//! templates.
//!
//! - [`copy_sparse`] clones a file with `FICLONE` where the file system shares
//!   extents (XFS, btrfs), and otherwise copies only its data extents
//!   (`SEEK_DATA`/`SEEK_HOLE`), with `copy_file_range` or, when the kernel
//!   refuses that (e.g. across file-system types), `pread`/`pwrite`. Holes are
//!   never read or written; the copy gets the source's logical length.
//! - [`copy_sparse_hashed`] does the same and computes the [snapshot
//!   checksum](SparseSha256) of the source while copying, so the data is read
//!   once.
//! - [`Ext4Templates`] keeps one empty ext4 image per size and clones it for
//!   each new overlay, so a fresh overlay costs a copy of a few MiB of
//!   metadata instead of a `mkfs.ext4` run.
//!
//! Every error that carries a path keeps the OS error underneath:
//! [`is_no_space`] finds `ENOSPC`/`EDQUOT` through the added context.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::unistd::Whence;
use sha2::{Digest, Sha256};

use crate::runner;

/// Size of the buffer of the read/write copy and of the hashing reads.
const IO_BUF: usize = 1 << 20;

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

/// A path added to an OS error; [`raw_os_error`] sees through it.
#[derive(Debug)]
struct PathError {
    what: String,
    source: io::Error,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

impl std::error::Error for PathError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Wraps `source` with `what` (which names the path), keeping its kind and,
/// for [`raw_os_error`], its OS error number.
fn with_path(what: impl Into<String>, source: io::Error) -> io::Error {
    io::Error::new(
        source.kind(),
        PathError {
            what: what.into(),
            source,
        },
    )
}

fn errno_to_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// The OS error number under an error from this module, through the context
/// that names the path.
pub fn raw_os_error(e: &io::Error) -> Option<i32> {
    if let Some(n) = e.raw_os_error() {
        return Some(n);
    }
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<PathError>())
        .and_then(|p| raw_os_error(&p.source))
}

/// True when the error is `ENOSPC` or `EDQUOT`: the target file system is full.
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(raw_os_error(e), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// True when the error is `EROFS`, `EACCES` or `EPERM`: the target cannot be
/// written at all.
pub fn is_read_only(e: &io::Error) -> bool {
    matches!(
        raw_os_error(e),
        Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)
    )
}

/// Bytes allocated to a file (`st_blocks * 512`): its data, not its holes.
pub fn allocated_bytes(path: &Path) -> io::Result<u64> {
    let m = std::fs::metadata(path)
        .map_err(|e| with_path(format!("cannot stat {}", path.display()), e))?;
    Ok(m.blocks() * 512)
}

/// Bytes an unprivileged writer may still use on the file system holding
/// `path` (`f_bavail * f_frsize`).
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path)
        .map_err(|e| with_path(format!("cannot statvfs {}", path.display()), errno_to_io(e)))?;
    Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// The data extents of `file` below `size`, as `(start, end)` byte ranges in
/// increasing order, from `SEEK_DATA`/`SEEK_HOLE`. A file system without
/// hole reporting shows the whole file as one extent.
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match nix::unistd::lseek64(fd, pos as i64, Whence::SeekData) {
            Ok(o) => o as u64,
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL) if pos == 0 => {
                out.push((0, size));
                break;
            }
            Err(e) => return Err(errno_to_io(e)),
        };
        if start >= size {
            break;
        }
        let end = match nix::unistd::lseek64(fd, start as i64, Whence::SeekHole) {
            Ok(o) => (o as u64).min(size),
            Err(Errno::ENXIO) => size,
            Err(e) => return Err(errno_to_io(e)),
        };
        if end <= start {
            break;
        }
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

/// Sum of the lengths of a file's data extents.
pub fn data_bytes(path: &Path) -> io::Result<u64> {
    let f =
        File::open(path).map_err(|e| with_path(format!("cannot open {}", path.display()), e))?;
    let size = f.metadata()?.len();
    let ext = data_extents(&f, size)
        .map_err(|e| with_path(format!("cannot map extents of {}", path.display()), e))?;
    Ok(ext.iter().map(|(s, e)| e - s).sum())
}

/// Block size of the snapshot checksum: the page size, and the block size of
/// ext4, XFS and tmpfs.
pub const CHECKSUM_BLOCK: usize = 4096;

/// Name of the checksum definition, stored beside each checksum.
pub const CHECKSUM_ALGORITHM: &str = "sparse-sha256-4k-v1";

/// Prefix that keeps this digest apart from a plain SHA-256 of any file.
const CHECKSUM_DOMAIN: &[u8] = b"agentenv sparse-sha256-4k v1\0";

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

fn is_zero(block: &[u8]) -> bool {
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

fn hex(bytes: &[u8]) -> String {
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

fn sha256_of(file: &File, size: u64) -> io::Result<(String, u64)> {
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
    let output = OpenOptions::new()
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

/// Data below which the checksum is computed inline rather than on a second
/// thread (a thread costs tens of microseconds to start).
const HASH_THREAD_MIN: u64 = 8 << 20;

/// Buffers handed to a hashing thread and not yet back, at most.
const HASH_THREAD_DEPTH: usize = 3;

/// The read/write copy's buffers and its checksum: off, inline, or on a
/// second thread that hashes one buffer while the next is copied (the data
/// is read once either way).
struct Buffers {
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
    fn new(checksum: bool, thread: bool, data_bytes: u64) -> Buffers {
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
    fn take(&mut self) -> Vec<u8> {
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
    fn done(&mut self, off: u64, buf: Vec<u8>, len: usize) {
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
    fn finish(self, size: u64) -> io::Result<String> {
        match self.hash {
            Hashing::Off => Err(io::Error::other("no checksum was asked for")),
            Hashing::Inline(h) => Ok(h.finish(size)),
            Hashing::Thread(mut t) => Ok(t.finish()?.finish(size)),
        }
    }
}

/// Reads `[start, end)` into the buffers without writing (to hash it).
fn feed_range(input: &File, start: u64, end: u64, bufs: &mut Buffers) -> io::Result<()> {
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

/// Flushes a file's data and size to stable storage.
pub fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| with_path(format!("cannot flush {}", path.display()), e))
}

/// Flushes a directory's entries to stable storage.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| with_path(format!("cannot flush directory {}", path.display()), e))
}

// ---------------------------------------------------------------------------
// ext4 templates

/// How long building a template may take.
const MKFS_TIMEOUT: Duration = Duration::from_secs(120);

/// Version of the template recipe; part of the file name, so a new recipe
/// builds new templates instead of reusing old ones.
const TEMPLATE_RECIPE: &str = "v2";

/// How far a template's file system can grow online using its reserved
/// group-descriptor blocks, as a multiple of its size. mkfs's default
/// (1024×) reserves ~4 MiB of descriptor blocks that every clone would copy;
/// 16× reserves ~0.1 MiB. Growing further still works online: the kernel
/// switches the file system to `meta_bg`.
const TEMPLATE_RESIZE_FACTOR: u64 = 16;

/// `mkfs.ext4` arguments of a template of `size_bytes`. `metadata_csum_seed`
/// makes the metadata checksums independent of the UUID, so each clone can
/// get its own UUID by rewriting the superblocks only ([`set_ext4_uuid`]).
fn template_mkfs_args(size_bytes: u64) -> Vec<String> {
    let mut ext = "lazy_itable_init=1,lazy_journal_init=1,nodiscard".to_string();
    // In 4 KiB blocks (a smaller block size only means more headroom); the
    // resize inode addresses at most 2^32 blocks.
    let resize = size_bytes / 4096 * TEMPLATE_RESIZE_FACTOR;
    if resize > size_bytes / 4096 && resize < 1 << 32 {
        ext.push_str(&format!(",resize={resize}"));
    }
    ["-q", "-F", "-E", &ext, "-O", "metadata_csum_seed"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Why an ext4 template or a disk cloned from one could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// `mkfs.ext4` failed on the template.
    #[error("cannot build ext4 template {path}: {source}")]
    Mkfs {
        /// The template being built.
        path: PathBuf,
        /// The runner's error, with mkfs's stderr.
        source: runner::RunError,
    },
    /// A file operation failed; the message names the path.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// The template is not an ext4 image this code can give a new UUID.
    #[error("cannot set the UUID of {path}: {why}")]
    Uuid {
        /// The image.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
}

impl TemplateError {
    /// True when a file system was full.
    pub fn is_no_space(&self) -> bool {
        match self {
            TemplateError::Io { source, .. } => is_no_space(source),
            TemplateError::Mkfs { source, .. } => source.to_string().contains("No space left"),
            TemplateError::Uuid { .. } => false,
        }
    }
}

fn tio(context: String) -> impl FnOnce(io::Error) -> TemplateError {
    move |source| TemplateError::Io { context, source }
}

/// Empty ext4 images, one per size, cloned with [`copy_sparse`] to make new
/// overlays; each clone gets a fresh random file-system UUID.
#[derive(Debug)]
pub struct Ext4Templates {
    dir: PathBuf,
    /// Serialises template builds within this process; across processes the
    /// build-then-rename makes a race harmless.
    building: tokio::sync::Mutex<()>,
}

impl Ext4Templates {
    /// Templates kept in `dir` (created on first use).
    pub fn new(dir: impl Into<PathBuf>) -> Ext4Templates {
        Ext4Templates {
            dir: dir.into(),
            building: tokio::sync::Mutex::new(()),
        }
    }

    /// The directory holding the templates.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the template of `size_bytes` lives.
    pub fn path_for(&self, size_bytes: u64) -> PathBuf {
        self.dir
            .join(format!("ext4-{TEMPLATE_RECIPE}-{size_bytes}.img"))
    }

    fn is_ready(path: &Path, size_bytes: u64) -> bool {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == size_bytes)
    }

    /// The template of `size_bytes`, built first if there is none: `mkfs.ext4`
    /// on a sparse file under a temporary name, fsync, rename, fsync the
    /// directory.
    pub async fn ensure(&self, size_bytes: u64) -> Result<PathBuf, TemplateError> {
        let path = self.path_for(size_bytes);
        if Self::is_ready(&path, size_bytes) {
            return Ok(path);
        }
        let _guard = self.building.lock().await;
        if Self::is_ready(&path, size_bytes) {
            return Ok(path);
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(tio(format!("cannot create {}", self.dir.display())))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = self.dir.join(format!(
            ".tmp-ext4-{TEMPLATE_RECIPE}-{size_bytes}-{}-{nanos}",
            std::process::id()
        ));
        let result = build_template(&tmp, &path, size_bytes, &self.dir).await;
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        } else {
            tracing::info!("built ext4 template {}", path.display());
        }
        result.map(|()| path)
    }

    /// Makes `path` (which must not exist) an empty ext4 disk of `size_bytes`
    /// by cloning the template, then gives it a new random UUID.
    pub async fn create_disk(
        &self,
        path: &Path,
        size_bytes: u64,
    ) -> Result<CopyStats, TemplateError> {
        let template = self.ensure(size_bytes).await?;
        let dst = path.to_path_buf();
        let result = tokio::task::spawn_blocking(move || -> Result<CopyStats, TemplateError> {
            let stats = copy_sparse(&template, &dst).map_err(|source| TemplateError::Io {
                context: format!("cannot clone {}", template.display()),
                source,
            })?;
            let uuid = random_uuid().map_err(tio("cannot read /dev/urandom".to_string()))?;
            if let Err(e) = set_ext4_uuid(&dst, uuid) {
                let _ = std::fs::remove_file(&dst);
                return Err(e);
            }
            Ok(stats)
        })
        .await
        .map_err(|e| TemplateError::Io {
            context: format!("cannot create disk {}", path.display()),
            source: io::Error::other(e.to_string()),
        })?;
        result
    }
}

async fn build_template(
    tmp: &Path,
    path: &Path,
    size_bytes: u64,
    dir: &Path,
) -> Result<(), TemplateError> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(tio(format!("cannot create {}", tmp.display())))?;
    f.set_len(size_bytes)
        .map_err(tio(format!("cannot size {}", tmp.display())))?;
    drop(f);
    let mut args: Vec<std::ffi::OsString> = template_mkfs_args(size_bytes)
        .into_iter()
        .map(Into::into)
        .collect();
    args.push(tmp.as_os_str().to_owned());
    runner::run("mkfs.ext4", args, MKFS_TIMEOUT)
        .await
        .map_err(|source| TemplateError::Mkfs {
            path: path.to_path_buf(),
            source,
        })?;
    sync_file(tmp).map_err(tio(format!("cannot flush {}", tmp.display())))?;
    std::fs::rename(tmp, path).map_err(tio(format!(
        "cannot rename {} to {}",
        tmp.display(),
        path.display()
    )))?;
    sync_dir(dir).map_err(tio(format!("cannot flush {}", dir.display())))
}

/// A random version-4 UUID.
pub fn random_uuid() -> io::Result<[u8; 16]> {
    let mut u = [0u8; 16];
    File::open("/dev/urandom")?.read_exact_at(&mut u, 0)?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

// ext4 superblock fields (offsets within the 1024-byte superblock).
const SB_OFFSET: u64 = 1024;
const SB_SIZE: usize = 1024;
const SB_FIRST_DATA_BLOCK: usize = 0x14;
const SB_LOG_BLOCK_SIZE: usize = 0x18;
const SB_BLOCKS_PER_GROUP: usize = 0x20;
const SB_MAGIC: usize = 0x38;
const SB_BLOCK_GROUP_NR: usize = 0x5a;
const SB_FEATURE_INCOMPAT: usize = 0x60;
const SB_FEATURE_RO_COMPAT: usize = 0x64;
const SB_UUID: usize = 0x68;
const SB_CHECKSUM: usize = 0x3fc;
const SB_BLOCKS_COUNT_LO: usize = 0x04;
const SB_BLOCKS_COUNT_HI: usize = 0x150;
const EXT4_MAGIC: u16 = 0xef53;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const SB_FEATURE_COMPAT: usize = 0x5c;

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

fn is_backup_group(g: u64, sparse: bool) -> bool {
    if !sparse || g <= 1 {
        return true;
    }
    [3u64, 5, 7].iter().any(|&p| {
        let mut x = p;
        while x < g {
            x *= p;
        }
        x == g
    })
}

/// Writes `uuid` into every superblock of the ext4 image at `path` (the
/// primary and its backups), recomputing each superblock checksum. Refuses
/// an image whose metadata checksums depend on the UUID (`metadata_csum`
/// without `metadata_csum_seed`) or that uses `sparse_super2`.
pub fn set_ext4_uuid(path: &Path, uuid: [u8; 16]) -> Result<(), TemplateError> {
    let uerr = |why: String| TemplateError::Uuid {
        path: path.to_path_buf(),
        why,
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(tio(format!("cannot open {}", path.display())))?;
    let mut sb = [0u8; SB_SIZE];
    f.read_exact_at(&mut sb, SB_OFFSET).map_err(tio(format!(
        "cannot read the superblock of {}",
        path.display()
    )))?;
    if le16(&sb, SB_MAGIC) != EXT4_MAGIC {
        return Err(uerr("no ext4 superblock".into()));
    }
    let compat = le32(&sb, SB_FEATURE_COMPAT);
    let incompat = le32(&sb, SB_FEATURE_INCOMPAT);
    let ro_compat = le32(&sb, SB_FEATURE_RO_COMPAT);
    let csum = ro_compat & RO_COMPAT_METADATA_CSUM != 0;
    if csum && incompat & INCOMPAT_CSUM_SEED == 0 {
        return Err(uerr("metadata_csum without metadata_csum_seed".into()));
    }
    if compat & COMPAT_SPARSE_SUPER2 != 0 {
        return Err(uerr("sparse_super2 is not supported".into()));
    }
    let block_size = 1024u64 << le32(&sb, SB_LOG_BLOCK_SIZE);
    let first_data_block = le32(&sb, SB_FIRST_DATA_BLOCK) as u64;
    let per_group = le32(&sb, SB_BLOCKS_PER_GROUP) as u64;
    let mut blocks = le32(&sb, SB_BLOCKS_COUNT_LO) as u64;
    if incompat & INCOMPAT_64BIT != 0 {
        blocks |= (le32(&sb, SB_BLOCKS_COUNT_HI) as u64) << 32;
    }
    if per_group == 0 || block_size > 65536 {
        return Err(uerr("implausible geometry".into()));
    }
    let groups = (blocks - first_data_block).div_ceil(per_group);
    let sparse = ro_compat & RO_COMPAT_SPARSE_SUPER != 0;
    for g in 0..groups {
        if !is_backup_group(g, sparse) {
            continue;
        }
        let at = if g == 0 {
            SB_OFFSET
        } else {
            (g * per_group + first_data_block) * block_size
        };
        let mut copy = [0u8; SB_SIZE];
        f.read_exact_at(&mut copy, at).map_err(tio(format!(
            "cannot read superblock {g} of {}",
            path.display()
        )))?;
        if le16(&copy, SB_MAGIC) != EXT4_MAGIC
            || (g > 0 && le16(&copy, SB_BLOCK_GROUP_NR) as u64 != g)
        {
            // mkfs leaves no backup here (e.g. a group cut short); skip it.
            continue;
        }
        copy[SB_UUID..SB_UUID + 16].copy_from_slice(&uuid);
        if csum {
            let c = crc32c_raw(!0, &copy[..SB_CHECKSUM]);
            copy[SB_CHECKSUM..].copy_from_slice(&c.to_le_bytes());
        }
        f.write_all_at(&copy, at).map_err(tio(format!(
            "cannot write superblock {g} of {}",
            path.display()
        )))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum by its definition: read everything, hash non-zero blocks.
    fn reference_sum(path: &Path) -> String {
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

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    /// A 64 MiB sparse file with data at a few offsets (some unaligned), an
    /// explicit zero block, and a tail that is not a whole block.
    fn sparse_file(path: &Path) -> u64 {
        let f = File::create(path).unwrap();
        let size = (64 << 20) + 123;
        f.set_len(size).unwrap();
        f.write_all_at(&pattern(3 << 20, 1), 1 << 20).unwrap();
        f.write_all_at(&pattern(5000, 2), (20 << 20) + 17).unwrap();
        f.write_all_at(&[0u8; 8192], 30 << 20).unwrap();
        f.write_all_at(&pattern(100, 3), size - 100).unwrap();
        size
    }

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

    #[test]
    fn no_space_is_seen_through_the_context() {
        let e = with_path(
            "cannot write /x",
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(is_no_space(&e));
        assert!(e.to_string().starts_with("cannot write /x: "), "{e}");
        assert!(!is_no_space(&io::Error::from_raw_os_error(libc::EIO)));
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // CRC-32C("123456789") = 0xe3069283 with the final inversion.
        assert_eq!(!crc32c_raw(!0, b"123456789"), 0xe306_9283);
    }

    #[test]
    fn backup_groups_follow_sparse_super() {
        let got: Vec<u64> = (0..130).filter(|&g| is_backup_group(g, true)).collect();
        assert_eq!(got, [0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125]);
    }

    fn have(tool: &str) -> bool {
        std::process::Command::new(tool).arg("-V").output().is_ok()
    }

    fn dumpe2fs_field(path: &Path, field: &str) -> String {
        let out = std::process::Command::new("dumpe2fs")
            .arg("-h")
            .arg(path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .find(|l| l.starts_with(field))
            .map(|l| l[field.len()..].trim().to_string())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn template_clones_are_valid_ext4_with_their_own_uuid() {
        if !have("mkfs.ext4") || !have("e2fsck") || !have("dumpe2fs") {
            eprintln!("skipping: e2fsprogs (mkfs.ext4, e2fsck, dumpe2fs) not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let t = Ext4Templates::new(dir.path().join("templates"));
        let size = 4u64 << 30;
        let a = dir.path().join("a.ext4");
        let b = dir.path().join("b.ext4");
        let (ra, rb) = tokio::join!(t.create_disk(&a, size), t.create_disk(&b, size));
        ra.unwrap();
        rb.unwrap();
        // One template, no temp files left.
        let names: Vec<_> = std::fs::read_dir(t.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [format!("ext4-{TEMPLATE_RECIPE}-{size}.img")]);
        let template = t.path_for(size);
        let ua = dumpe2fs_field(&a, "Filesystem UUID:");
        let ub = dumpe2fs_field(&b, "Filesystem UUID:");
        let ut = dumpe2fs_field(&template, "Filesystem UUID:");
        assert_eq!(ua.len(), 36, "{ua}");
        assert!(ua != ub && ua != ut && ub != ut, "{ua} {ub} {ut}");
        for p in [&a, &b] {
            let m = std::fs::metadata(p).unwrap();
            assert_eq!(m.len(), size);
            assert!(
                m.blocks() * 512 < 2 << 20,
                "clone allocates {}",
                m.blocks() * 512
            );
            let out = std::process::Command::new("e2fsck")
                .args(["-f", "-n"])
                .arg(p)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "e2fsck {}: {}{}",
                p.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // A clone refuses to overwrite.
        assert!(t.create_disk(&a, size).await.is_err());
    }

    #[test]
    fn uuid_change_refuses_uuid_bound_checksums() {
        if !have("mkfs.ext4") {
            eprintln!("skipping: mkfs.ext4 not installed");
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
}
