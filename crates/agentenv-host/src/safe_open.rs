//! Host paths from requests, opened once and safely: beneath their root,
//! refusing a symlink at any component (`openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS`, or an `openat(O_NOFOLLOW)` walk where the kernel has
//! no `openat2`), and a share's tree copied through descriptors only.
//!
//! A name is resolved exactly once, by [`open_beneath`]; everything after
//! works on the open file. Reopening it through `/proc/self/fd/N` (a VMM
//! given that path, or a copy here) reaches the same inode whatever has
//! been renamed or swapped for a symlink since.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use agentenv_core::host::{
    FileInfo, FileKind, HostError, OpenBeneathError, OpenedPath, SharedFd, StageShareError,
};

/// Deepest directory nesting a share copy follows (each level holds one
/// descriptor while it is copied).
pub const MAX_SHARE_DEPTH: usize = 64;

/// Blocks counted for each entry of a share (its inode and directory entry).
const ENTRY_BYTES: u64 = 4096;

/// The path by which this process (or a child that inherited the
/// descriptor at the same number) reopens `fd`'s file.
pub fn fd_path(fd: RawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}

fn cstr(p: &OsStr) -> std::io::Result<CString> {
    CString::new(p.as_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// `openat(dir, name, flags)`.
fn openat(dir: RawFd, name: &OsStr, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let name = cstr(name)?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call;
    // the returned descriptor, when not -1, is new and owned by nobody else.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat2(dir, rel, O_PATH, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
/// RESOLVE_NO_MAGICLINKS)`; `None` when the kernel has no `openat2`.
fn openat2_beneath(dir: RawFd, rel: &Path) -> Option<std::io::Result<OwnedFd>> {
    let name = match cstr(rel.as_os_str()) {
        Ok(n) => n,
        Err(e) => return Some(Err(e)),
    };
    // SAFETY: open_how is plain data; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `name` and `how` are valid for the call and `how`'s size is
    // passed with it; the result is a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSYS) {
            return None;
        }
        return Some(Err(e));
    }
    // SAFETY: `fd` was just returned by openat2 and is owned by nobody else.
    Some(Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
}

/// The walk `openat2` stands for: one `openat(O_PATH | O_NOFOLLOW)` per
/// component, each a directory and no symlink (the last may be anything
/// but a symlink).
fn walk_beneath(dir: RawFd, rel: &Path) -> std::io::Result<OwnedFd> {
    let names: Vec<&OsStr> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Ok(n)),
            Component::CurDir => None,
            _ => Some(Err(std::io::Error::from_raw_os_error(libc::EXDEV))),
        })
        .collect::<std::io::Result<_>>()?;
    let mut cur: Option<OwnedFd> = None;
    for (i, name) in names.iter().enumerate() {
        let at = cur.as_ref().map_or(dir, |f| f.as_raw_fd());
        let fd = openat(at, name, libc::O_PATH | libc::O_NOFOLLOW)?;
        let st = fstat(&fd)?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFLNK => return Err(std::io::Error::from_raw_os_error(libc::ELOOP)),
            libc::S_IFDIR => {}
            _ if i + 1 < names.len() => {
                return Err(std::io::Error::from_raw_os_error(libc::ENOTDIR))
            }
            _ => {}
        }
        cur = Some(fd);
    }
    match cur {
        Some(fd) => Ok(fd),
        None => openat(dir, OsStr::new("."), libc::O_PATH),
    }
}

fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: stat is plain data, filled in by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor and `st` a valid stat buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

fn kind_of(mode: libc::mode_t) -> FileKind {
    match mode & libc::S_IFMT {
        libc::S_IFREG => FileKind::File,
        libc::S_IFDIR => FileKind::Dir,
        libc::S_IFLNK => FileKind::Symlink,
        libc::S_IFBLK | libc::S_IFCHR => FileKind::Device,
        _ => FileKind::Special,
    }
}

/// Reopens the file behind the `O_PATH` descriptor `fd` with `flags`: the
/// same inode, whatever its name is now.
fn reopen(fd: &OwnedFd, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let path = fd_path(fd.as_raw_fd());
    openat(libc::AT_FDCWD, path.as_os_str(), flags | libc::O_NOCTTY)
}

/// Opens `rel` beneath `root` (see [`agentenv_core::host::HostFiles::open_beneath`]).
pub fn open_beneath(root: &Path, rel: &Path) -> Result<OpenedPath, OpenBeneathError> {
    let path = root.join(rel);
    let io = |e: std::io::Error| match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::EXDEV) => OpenBeneathError::Symlink(path.clone()),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ENAMETOOLONG) => {
            OpenBeneathError::NotFound(path.clone())
        }
        _ => OpenBeneathError::Io(path.clone(), e),
    };
    // The root is the administrator's (config), so it may itself be reached
    // through a symlink; nothing below it may.
    let root_fd = openat(
        libc::AT_FDCWD,
        root.as_os_str(),
        libc::O_PATH | libc::O_DIRECTORY,
    )
    .map_err(io)?;
    let fd = match openat2_beneath(root_fd.as_raw_fd(), rel) {
        Some(r) => r,
        None => walk_beneath(root_fd.as_raw_fd(), rel),
    }
    .map_err(io)?;
    let st = fstat(&fd).map_err(io)?;
    let kind = kind_of(st.st_mode);
    let fd = match kind {
        FileKind::File => reopen(&fd, libc::O_RDWR).map_err(io)?,
        FileKind::Dir => reopen(&fd, libc::O_RDONLY | libc::O_DIRECTORY).map_err(io)?,
        FileKind::Symlink => return Err(OpenBeneathError::Symlink(path)),
        // Refused by the caller; never opened for I/O (no device is touched).
        FileKind::Device | FileKind::Special => fd,
    };
    Ok(OpenedPath {
        path,
        reopen: Some(fd_path(fd.as_raw_fd())),
        fd: Some(SharedFd(Arc::new(fd))),
        dev: st.st_dev,
        ino: st.st_ino,
        info: FileInfo {
            kind,
            len: st.st_size as u64,
            nlink: st.st_nlink,
            writable: kind == FileKind::File,
        },
    })
}

/// What a share copy may still take.
struct Budget {
    left: u64,
    limit: u64,
    share: PathBuf,
}

impl Budget {
    fn take(&mut self, n: u64) -> Result<(), StageShareError> {
        match self.left.checked_sub(n) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err(StageShareError::TooBig {
                path: self.share.clone(),
                limit_mib: self.limit >> 20,
            }),
        }
    }
}

fn host_err(what: &str, p: &Path, e: std::io::Error) -> StageShareError {
    StageShareError::Host(HostError::io(format!("{what} {}", p.display()), e))
}

/// Copies the directory open as `dir` into the new directory `dest` (see
/// [`agentenv_core::host::DiskImages::stage_share`]). Returns the bytes
/// counted.
pub fn stage_share(dir: &OpenedPath, dest: &Path, max_bytes: u64) -> Result<u64, StageShareError> {
    let fd = dir.fd.as_ref().ok_or_else(|| {
        host_err(
            "no open descriptor for",
            &dir.path,
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        )
    })?;
    let mut budget = Budget {
        left: max_bytes,
        limit: max_bytes,
        share: dir.path.clone(),
    };
    copy_dir(&fd.0, &dir.path, dest, &mut budget, 0)?;
    Ok(max_bytes - budget.left)
}

/// Copies the entries of the directory open as `src` (named `shown` in
/// errors) into `dest`, which it makes.
fn copy_dir(
    src: &OwnedFd,
    shown: &Path,
    dest: &Path,
    budget: &mut Budget,
    depth: usize,
) -> Result<(), StageShareError> {
    let st = fstat(src).map_err(|e| host_err("cannot stat", shown, e))?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dest)
        .map_err(|e| host_err("cannot create", dest, e))?;
    // The entries, read through the open directory (never by its name).
    let listing = std::fs::read_dir(fd_path(src.as_raw_fd()))
        .map_err(|e| host_err("cannot list", shown, e))?;
    let mut names: Vec<OsString> = Vec::new();
    for e in listing {
        let e = e.map_err(|e| host_err("cannot list", shown, e))?;
        budget.take(ENTRY_BYTES)?;
        names.push(e.file_name());
    }
    for name in names {
        let from = shown.join(&name);
        let to = dest.join(&name);
        let fd = match openat(src.as_raw_fd(), &name, libc::O_PATH | libc::O_NOFOLLOW) {
            Ok(fd) => fd,
            // Gone since the listing.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(host_err("cannot open", &from, e)),
        };
        let est = fstat(&fd).map_err(|e| host_err("cannot stat", &from, e))?;
        match kind_of(est.st_mode) {
            FileKind::Dir => {
                if depth + 1 >= MAX_SHARE_DEPTH {
                    return Err(StageShareError::TooDeep {
                        path: budget.share.clone(),
                        depth: MAX_SHARE_DEPTH,
                    });
                }
                let d = reopen(&fd, libc::O_RDONLY | libc::O_DIRECTORY)
                    .map_err(|e| host_err("cannot open", &from, e))?;
                copy_dir(&d, &from, &to, budget, depth + 1)?;
            }
            FileKind::File => {
                let f =
                    reopen(&fd, libc::O_RDONLY).map_err(|e| host_err("cannot open", &from, e))?;
                copy_file(File::from(f), &from, &to, &est, budget)?;
            }
            FileKind::Symlink => {
                // Copied as a link: the guest resolves it in its own tree.
                let target = std::fs::read_link(fd_path(fd.as_raw_fd()))
                    .map_err(|e| host_err("cannot read link", &from, e))?;
                budget.take(target.as_os_str().len() as u64)?;
                std::os::unix::fs::symlink(&target, &to)
                    .map_err(|e| host_err("cannot create", &to, e))?;
            }
            // Devices, FIFOs and sockets are not copied into a guest.
            FileKind::Device | FileKind::Special => {}
        }
    }
    set_owner_and_mode(dest, &st).map_err(|e| host_err("cannot set owner of", dest, e))
}

fn copy_file(
    mut src: File,
    shown: &Path,
    to: &Path,
    st: &libc::stat,
    budget: &mut Budget,
) -> Result<(), StageShareError> {
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .map_err(|e| host_err("cannot create", to, e))?;
    // Counted as it is read: a file growing during the copy is caught.
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(host_err("cannot read", shown, e)),
        };
        budget.take(n as u64)?;
        std::io::Write::write_all(&mut out, &buf[..n])
            .map_err(|e| host_err("cannot write", to, e))?;
    }
    let mtime = std::time::UNIX_EPOCH
        + std::time::Duration::new(st.st_mtime.max(0) as u64, st.st_mtime_nsec as u32);
    let _ = out.set_modified(mtime);
    drop(out);
    set_owner_and_mode(to, st).map_err(|e| host_err("cannot set owner of", to, e))
}

/// Gives a copy (in the daemon's private staging directory) the owner and
/// mode of its original, as `mkfs.ext4 -d` then records them.
fn set_owner_and_mode(p: &Path, st: &libc::stat) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(p)?;
    if meta.uid() != st.st_uid || meta.gid() != st.st_gid {
        std::os::unix::fs::lchown(p, Some(st.st_uid), Some(st.st_gid))?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(st.st_mode & 0o7777))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(dir: &Path, rel: &str) -> Result<OpenedPath, OpenBeneathError> {
        open_beneath(dir, Path::new(rel))
    }

    #[test]
    fn symlinks_at_any_component_are_refused_and_plain_paths_open() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/disk.img"), b"inside").unwrap();
        std::fs::write(t.path().join("outside.img"), b"outside").unwrap();
        std::os::unix::fs::symlink(t.path(), root.join("first")).unwrap();
        std::os::unix::fs::symlink(t.path(), root.join("a/middle")).unwrap();
        std::os::unix::fs::symlink(t.path().join("outside.img"), root.join("a/b/last.img"))
            .unwrap();
        let o = opened(&root, "a/b/disk.img").unwrap();
        assert_eq!(o.info.kind, FileKind::File);
        let mut s = String::new();
        File::open(fd_path(o.fd.unwrap().0.as_raw_fd()))
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "inside");
        for rel in ["first/outside.img", "a/middle/outside.img", "a/b/last.img"] {
            match opened(&root, rel) {
                Err(OpenBeneathError::Symlink(_)) => {}
                other => panic!("{rel}: {other:?}"),
            }
        }
        assert!(matches!(
            opened(&root, "a/missing"),
            Err(OpenBeneathError::NotFound(_))
        ));
        assert!(matches!(
            opened(&root, "a/b/disk.img/x"),
            Err(OpenBeneathError::NotFound(_))
        ));
        // The walk refuses the same, for kernels without openat2.
        let rfd = openat(libc::AT_FDCWD, root.as_os_str(), libc::O_PATH).unwrap();
        assert!(walk_beneath(rfd.as_raw_fd(), Path::new("a/b/disk.img")).is_ok());
        for rel in ["first/outside.img", "a/middle/outside.img", "a/b/last.img"] {
            let e = walk_beneath(rfd.as_raw_fd(), Path::new(rel)).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{rel}");
        }
    }

    #[test]
    fn a_share_is_copied_through_descriptors_within_its_cap() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("share/sub")).unwrap();
        std::fs::write(root.join("share/sub/f"), b"hello").unwrap();
        std::fs::write(t.path().join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink(t.path().join("secret"), root.join("share/link")).unwrap();
        let o = opened(&root, "share").unwrap();
        let dest = t.path().join("stage");
        let used = stage_share(&o, &dest, 1 << 20).unwrap();
        assert!(used >= 5 + 3 * ENTRY_BYTES, "{used}");
        assert_eq!(std::fs::read(dest.join("sub/f")).unwrap(), b"hello");
        // The link is a link in the copy, not the file it points at.
        assert!(std::fs::symlink_metadata(dest.join("link"))
            .unwrap()
            .file_type()
            .is_symlink());
        // Over the cap: refused, counted while copying.
        std::fs::write(root.join("share/big"), vec![0u8; 64 * 1024]).unwrap();
        let e = stage_share(&o, &t.path().join("stage2"), 32 * 1024).unwrap_err();
        assert!(matches!(e, StageShareError::TooBig { .. }), "{e}");
    }
}
