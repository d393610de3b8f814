//! Files and directories the daemon makes are private: directories 0700,
//! files 0600, whatever the process umask (tests run the engine in-process,
//! under the test runner's umask). A jail may later hand a file to a VMM's
//! own uid (chown); the modes stay these.

use std::fs::{DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Mode of every directory the daemon makes.
pub const DIR_MODE: u32 = 0o700;

/// Mode of every file the daemon makes.
pub const FILE_MODE: u32 = 0o600;

/// Umask of a VMM process: what it makes (control and agent sockets,
/// snapshot state and memory files) is 0600. A VMM makes sockets and files,
/// never directories.
pub const VMM_UMASK: u32 = 0o177;

/// Open options that create a file with mode [`FILE_MODE`].
pub fn file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Creates one directory with mode [`DIR_MODE`].
pub fn create_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(DIR_MODE).create(path)
}

/// Creates a directory and its missing parents, each with mode [`DIR_MODE`].
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new()
        .mode(DIR_MODE)
        .recursive(true)
        .create(path)
}

/// Writes `data` to `path` (created 0600, or truncated).
pub fn write(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?
        .write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn modes_hold_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o002));
        let d = dir.path().join("a/b");
        create_dir_all(&d).unwrap();
        let f = d.join("f");
        write(&f, b"x").unwrap();
        let one = dir.path().join("one");
        create_dir(&one).unwrap();
        nix::sys::stat::umask(old);
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&one), 0o700);
        assert_eq!(mode(&f), 0o600);
    }
}
