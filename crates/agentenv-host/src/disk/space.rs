//! Where a file's data is and how much room it and its file system take:
//! `SEEK_DATA`/`SEEK_HOLE` extents, allocated bytes, free bytes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::Whence;

use super::error::{errno_to_io, with_path};

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
