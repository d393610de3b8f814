//! Errors that name a path and keep the OS error underneath, and the tests
//! that see through the added context ([`is_no_space`], [`is_read_only`]).

use std::io;

use nix::errno::Errno;

/// A path added to an OS error; [`raw_os_error`] sees through it.
#[derive(Debug)]
pub(super) struct PathError {
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
pub(super) fn with_path(what: impl Into<String>, source: io::Error) -> io::Error {
    io::Error::new(
        source.kind(),
        PathError {
            what: what.into(),
            source,
        },
    )
}

pub(super) fn errno_to_io(e: Errno) -> io::Error {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
