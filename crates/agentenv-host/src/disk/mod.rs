//! Disk files: sparse-aware copies, the snapshot checksum, and ext4 overlay
//! templates. One concern per file:
//!
//! - [`copy`]: [`copy_sparse`] clones a file with `FICLONE` where the file
//!   system shares extents (XFS, btrfs), and otherwise copies only its data
//!   extents (`SEEK_DATA`/`SEEK_HOLE`), with `copy_file_range` or, when the
//!   kernel refuses that (e.g. across file-system types), `pread`/`pwrite`.
//!   Holes are never read or written; the copy gets the source's logical
//!   length. [`copy_sparse_hashed`] does the same and computes the [snapshot
//!   checksum](SparseSha256) of the source while copying, so the data is
//!   read once (the buffers and the hashing thread are in `buffers`).
//! - [`checksum`]: the snapshot checksum, `sparse-sha256-4k-v1`
//!   ([`SparseSha256`], [`sparse_sha256`]).
//! - [`space`]: data extents, allocated and free bytes.
//! - [`templates`]: [`Ext4Templates`] keeps one empty ext4 image per size and
//!   clones it for each new overlay, so a fresh overlay costs a copy of a few
//!   MiB of metadata instead of a `mkfs.ext4` run.
//! - [`ext4`]: the raw superblock rewrite that gives each clone its own UUID
//!   ([`set_ext4_uuid`]), on a file or on bytes in memory.
//! - [`error`]: every error that carries a path keeps the OS error
//!   underneath: [`is_no_space`] finds `ENOSPC`/`EDQUOT` through the added
//!   context.
//!
//! Everything public is re-exported here, so callers write
//! `agentenv_host::disk::copy_sparse` whatever file it lives in.

use std::fs::File;
use std::io;
use std::path::Path;

mod buffers;
pub mod checksum;
pub mod copy;
pub mod error;
pub mod ext4;
pub mod space;
pub mod templates;
#[cfg(test)]
mod test_files;

pub use checksum::{sparse_sha256, SparseSha256, CHECKSUM_ALGORITHM, CHECKSUM_BLOCK};
pub use copy::{
    copy_sparse, copy_sparse_from, copy_sparse_hashed, copy_sparse_over, copy_sparse_with,
    preallocate, CopyMethod, CopyOptions, CopyStats,
};
pub use error::{is_no_space, is_read_only, raw_os_error};
pub use ext4::{rewrite_uuid, set_ext4_uuid, Ext4Error, Ext4Image};
pub use space::{allocated_bytes, data_bytes, data_extents, free_bytes};
pub use templates::{random_uuid, Ext4Templates, TemplateError};

use error::with_path;

/// Size of the buffer of the read/write copy and of the hashing reads.
const IO_BUF: usize = 1 << 20;

/// Flushes a file's data and size to stable storage.
pub fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| with_path(format!("cannot flush {}", path.display()), e))
}

/// Renames `from` to `to` (a file or a directory) inside the directory
/// `parent`, then flushes `parent`, so the new name survives a crash.
pub fn rename_durably(from: &Path, to: &Path, parent: &Path) -> io::Result<()> {
    std::fs::rename(from, to).map_err(|e| {
        with_path(
            format!("cannot rename {} to {}", from.display(), to.display()),
            e,
        )
    })?;
    sync_dir(parent)
}

/// Flushes a directory's entries to stable storage.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| with_path(format!("cannot flush directory {}", path.display()), e))
}
