//! The host-path policy: which paths on the host a request may name (direct
//! disks, shares), and how they are checked. Paths from users enter the
//! engine here and nowhere else; a later safe open (no symlinks, beneath its
//! root, the open file passed on) belongs here too.

use std::path::PathBuf;

use crate::error::EngineError;
use crate::host::{FileKind, HostFiles};

/// A direct disk (or a share's directory) must be an absolute, `..`-free,
/// symlink-free path under one of `direct_disk_roots`; a disk must be a
/// regular file with one hard link, a share a directory.
pub(super) fn check_host_path(
    files: &dyn HostFiles,
    roots: &[PathBuf],
    field: &str,
    raw: &str,
    want_dir: bool,
) -> Result<PathBuf, EngineError> {
    let f = field;
    if raw.contains('\0') {
        return Err(EngineError::bad(f, format!("{f} must not contain NUL")));
    }
    let path = PathBuf::from(raw);
    if !path.is_absolute() {
        return Err(EngineError::bad(
            f,
            format!("{f} {raw:?} must be an absolute path"),
        ));
    }
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(EngineError::bad(
            f,
            format!("{f} {raw:?} must not contain `..`"),
        ));
    }
    if roots.is_empty() {
        return Err(EngineError::Forbidden {
            field: f.into(),
            message: format!("{f}: host paths are disabled: no direct_disk_roots are configured"),
        });
    }
    let info = files
        .inspect(&path)
        .map_err(|_| EngineError::not_found(f, format!("{f} {raw:?} does not exist")))?;
    let kind_err = |what: &str| EngineError::bad(f, format!("{f} {raw:?} is {what}"));
    match (info.kind, want_dir) {
        (FileKind::File, false) | (FileKind::Dir, true) => {}
        (FileKind::Symlink, _) => return Err(kind_err("a symlink")),
        (FileKind::Dir, false) => return Err(kind_err("a directory")),
        (FileKind::File, true) => return Err(kind_err("a file, not a directory")),
        (FileKind::Device, _) => return Err(kind_err("a device")),
        (FileKind::Special, _) => return Err(kind_err("a FIFO or socket")),
    }
    if !want_dir && info.nlink > 1 {
        return Err(kind_err("a file with more than one hard link"));
    }
    let canonical = files
        .canonicalize(&path)
        .map_err(|e| EngineError::bad(f, format!("{f} {raw:?}: {e}")))?;
    if canonical != path {
        return Err(kind_err("reached through a symlink"));
    }
    let allowed = roots.iter().any(|root| {
        files
            .canonicalize(root)
            .is_ok_and(|r| canonical.starts_with(&r) && canonical != r)
    });
    if !allowed {
        return Err(EngineError::Forbidden {
            field: f.into(),
            message: format!("{f} {raw:?} is not under any of direct_disk_roots"),
        });
    }
    Ok(canonical)
}
