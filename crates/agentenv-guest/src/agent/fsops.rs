//! `Fs`: stat, list, make_dir, move and remove, for root or on a guest
//! user's behalf (relative paths from its home; what is created is its own).
//!
//! The agent runs them as root: a caller with the VM's agent can run any
//! command as root anyway, so acting "as a user" is about paths and
//! ownership, not a permission boundary. A listing is streamed to the host
//! in `FsEntries` frames within the stream's credit as the walk goes, so
//! neither side holds more than a chunk of it beyond the window.

use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use agentenv_proto::{
    EntryInfo, EntryKind, ErrorCode, ErrorMsg, FsOp, FsRequest, FsResponse, Kind, MAX_LIST_ENTRIES,
};

use super::out::OutStream;
use super::users::{self, Accounts, User};
use super::{io_error, spawn};

/// A listing goes out in frames of about this many bytes of JSON.
const ENTRIES_CHUNK: usize = 64 * 1024;

fn bad(field: &str, msg: impl Into<String>) -> ErrorMsg {
    ErrorMsg::new(ErrorCode::BadRequest, Some(field), msg)
}

/// Starts an `Fs` request on its own thread (a frozen file system blocks it,
/// not the session), which ends the stream with `FsResult` or `Error`.
pub fn start(req: FsRequest, out: std::sync::Arc<OutStream>) -> Result<(), ErrorMsg> {
    let user = users::acting(req.user.as_deref())?;
    let o = out.clone();
    spawn("fs", move || {
        let accounts = Accounts::guest();
        match run(&req.op, user.as_ref(), &accounts, &o) {
            Ok(Some(res)) => o.finish(Kind::FsResult, &res),
            Ok(None) => false,
            Err(e) => o.fail(&e),
        };
    })
    .map_err(|e| io_error("op", "start a thread", &e))
}

/// Carries out one operation. `Ok(None)`: the stream ended while a listing
/// was being sent.
pub fn run(
    op: &FsOp,
    user: Option<&User>,
    accounts: &Accounts,
    out: &OutStream,
) -> Result<Option<FsResponse>, ErrorMsg> {
    let one = |entry: EntryInfo| {
        Ok(Some(FsResponse {
            entry: Some(entry),
            entries: Vec::new(),
        }))
    };
    match op {
        FsOp::Stat { path } => {
            let p = users::resolve("path", path, user)?;
            one(entry_of(&p, accounts).map_err(|e| io_error("path", &shown(&p), &e))?)
        }
        FsOp::List { path, depth } => {
            let p = users::resolve("path", path, user)?;
            let sent = list(&p, *depth, accounts, out)?;
            Ok(sent.then(FsResponse::default))
        }
        FsOp::MakeDir { path } => {
            let p = users::resolve("path", path, user)?;
            make_dir(&p, user)?;
            one(entry_of(&p, accounts).map_err(|e| io_error("path", &shown(&p), &e))?)
        }
        FsOp::Move {
            source,
            destination,
        } => {
            let src = users::resolve("source", source, user)?;
            let dst = users::resolve("destination", destination, user)?;
            move_path(&src, &dst, user)?;
            one(entry_of(&dst, accounts).map_err(|e| io_error("destination", &shown(&dst), &e))?)
        }
        FsOp::Remove { path } => {
            let p = users::resolve("path", path, user)?;
            remove(&p)?;
            Ok(Some(FsResponse::default()))
        }
    }
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

/// `ls -l`'s type and permission column for `mode` (`st_mode`).
pub fn permissions(mode: u32) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFREG => '-',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        _ => '?',
    };
    let mut s = String::with_capacity(10);
    s.push(kind);
    // (read, write, execute bits, the special bit over this triplet, its letter)
    let triplets = [
        (0o400, 0o200, 0o100, libc::S_ISUID, 's'),
        (0o040, 0o020, 0o010, libc::S_ISGID, 's'),
        (0o004, 0o002, 0o001, libc::S_ISVTX, 't'),
    ];
    for (r, w, x, special, letter) in triplets {
        s.push(if mode & r != 0 { 'r' } else { '-' });
        s.push(if mode & w != 0 { 'w' } else { '-' });
        s.push(match (mode & x != 0, mode & special != 0) {
            (true, true) => letter,
            (false, true) => letter.to_ascii_uppercase(),
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// Describes `path` itself (`lstat`: a symlink, not its target).
pub fn entry_of(path: &Path, accounts: &Accounts) -> io::Result<EntryInfo> {
    let meta = fs::symlink_metadata(path)?;
    Ok(entry_from(path, &meta, accounts))
}

fn entry_from(path: &Path, meta: &Metadata, accounts: &Accounts) -> EntryInfo {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_dir() {
        EntryKind::Directory
    } else if ft.is_file() {
        EntryKind::File
    } else {
        EntryKind::Other
    };
    let symlink_target = (kind == EntryKind::Symlink)
        .then(|| fs::read_link(path).ok())
        .flatten()
        .map(|t| {
            let abs = path.parent().unwrap_or(Path::new("/")).join(t);
            users::normalize(&abs).display().to_string()
        });
    EntryInfo {
        name: path
            .file_name()
            .map_or_else(|| "/".to_string(), |n| n.to_string_lossy().into_owned()),
        path: path.display().to_string(),
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o777,
        permissions: permissions(meta.mode()),
        owner: accounts.user_name(meta.uid()),
        group: accounts.group_name(meta.gid()),
        modified_unix_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        symlink_target,
    }
}

/// Gathers entries into `FsEntries` frames of about [`ENTRIES_CHUNK`] bytes.
struct Chunks<'a> {
    out: &'a OutStream,
    json: Vec<u8>,
    count: usize,
}

impl Chunks<'_> {
    /// Adds one entry; false once the stream has ended.
    fn push(&mut self, e: &EntryInfo) -> bool {
        self.json
            .push(if self.json.is_empty() { b'[' } else { b',' });
        serde_json::to_writer(&mut self.json, e).expect("json serialises");
        self.count += 1;
        self.json.len() < ENTRIES_CHUNK || self.flush()
    }

    fn flush(&mut self) -> bool {
        if self.json.is_empty() {
            return true;
        }
        self.json.push(b']');
        let sent = self.out.send_credited(Kind::FsEntries, &self.json);
        self.json.clear();
        sent
    }
}

/// Streams the entries of `dir` and its sub-directories down to `depth`
/// levels; false once the stream has ended.
fn list(dir: &Path, depth: u32, accounts: &Accounts, out: &OutStream) -> Result<bool, ErrorMsg> {
    if depth == 0 {
        return Err(bad("depth", "depth must be at least 1"));
    }
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(bad(
                "path",
                format!("path {} is not a directory", dir.display()),
            ))
        }
        Err(e) => return Err(io_error("path", &shown(dir), &e)),
    }
    let mut chunks = Chunks {
        out,
        json: Vec::new(),
        count: 0,
    };
    // Each directory's entries sorted by name, then its sub-directories'.
    let mut stack: Vec<(PathBuf, u32)> = vec![(dir.to_path_buf(), 1)];
    while let Some((d, level)) = stack.pop() {
        let read = match fs::read_dir(&d) {
            Ok(r) => r,
            Err(e) if d == dir => return Err(io_error("path", &shown(dir), &e)),
            // A sub-directory that went away or is unreadable: skipped.
            Err(_) => continue,
        };
        let mut names: Vec<PathBuf> = read.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        let mut subdirs = Vec::new();
        for p in names {
            let Ok(meta) = fs::symlink_metadata(&p) else {
                continue;
            };
            if chunks.count >= MAX_LIST_ENTRIES {
                return Err(bad(
                    "depth",
                    format!(
                        "{} holds more than {MAX_LIST_ENTRIES} entries at depth {depth}; \
                         list with a smaller depth",
                        dir.display()
                    ),
                ));
            }
            if !chunks.push(&entry_from(&p, &meta, accounts)) {
                return Ok(false);
            }
            if meta.is_dir() && level < depth {
                subdirs.push(p);
            }
        }
        stack.extend(subdirs.into_iter().rev().map(|p| (p, level + 1)));
    }
    Ok(chunks.flush())
}

/// The owner a user's new files and directories get.
fn owner(user: Option<&User>) -> Option<(u32, u32)> {
    user.map(|u| (u.uid, u.gid))
}

/// Creates `dir`'s missing ancestors and `dir` (mode 0755), each owned by
/// `owner` when given. An existing directory on the way is fine.
pub fn make_dirs(dir: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut p = dir;
    loop {
        match fs::symlink_metadata(p) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(p);
                match p.parent() {
                    Some(parent) => p = parent,
                    None => break,
                }
            }
            Err(e) => return Err(e),
        }
    }
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => {
                if let Some((uid, gid)) = owner {
                    lchown(d, Some(uid), Some(gid))?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn make_dir(p: &Path, user: Option<&User>) -> Result<(), ErrorMsg> {
    match fs::metadata(p) {
        Ok(m) if m.is_dir() => {
            return Err(ErrorMsg::new(
                ErrorCode::AlreadyExists,
                Some("path"),
                format!("directory {} exists already", p.display()),
            ))
        }
        Ok(_) => {
            return Err(ErrorMsg::new(
                ErrorCode::AlreadyExists,
                Some("path"),
                format!("{} exists already and is not a directory", p.display()),
            ))
        }
        Err(_) => {}
    }
    make_dirs(p, owner(user))
        .map_err(|e| io_error("path", &format!("create directory {}", p.display()), &e))
}

fn move_path(src: &Path, dst: &Path, user: Option<&User>) -> Result<(), ErrorMsg> {
    fs::symlink_metadata(src).map_err(|e| io_error("source", &shown(src), &e))?;
    if src == Path::new("/") || dst.starts_with(src) && dst != src {
        return Err(bad(
            "destination",
            format!(
                "cannot move {} into itself ({})",
                src.display(),
                dst.display()
            ),
        ));
    }
    if let Some(parent) = dst.parent() {
        make_dirs(parent, owner(user)).map_err(|e| {
            io_error(
                "destination",
                &format!("create directory {}", parent.display()),
                &e,
            )
        })?;
    }
    let what = || format!("move {} to {}", src.display(), dst.display());
    match fs::rename(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            // Another file system: copy (modes, owners, links kept), then remove.
            if let Err(e) = copy_tree(src, dst) {
                let _ = remove_tree(dst);
                return Err(io_error("destination", &what(), &e));
            }
            remove_tree(src).map_err(|e| io_error("source", &what(), &e))
        }
        Err(e) => Err(io_error("destination", &what(), &e)),
    }
}

/// Copies `src` to `dst` (which must not exist, or be a file to replace),
/// keeping modes, owners and symlinks.
fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dst)?;
    } else if ft.is_dir() {
        fs::create_dir(dst)?;
        for e in fs::read_dir(src)? {
            let e = e?;
            copy_tree(&e.path(), &dst.join(e.file_name()))?;
        }
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    } else if ft.is_file() {
        fs::copy(src, dst)?;
    } else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{} is not a file, directory or symlink", src.display()),
        ));
    }
    lchown(dst, Some(meta.uid()), Some(meta.gid()))
}

/// Removes a path: a directory with everything in it, a symlink itself.
fn remove_tree(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) => Err(e),
    }
}

fn remove(p: &Path) -> Result<(), ErrorMsg> {
    if p == Path::new("/") {
        return Err(bad("path", "refusing to remove /"));
    }
    match remove_tree(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("path", &format!("remove {}", p.display()), &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::out::{OutMsg, Outbox};
    use agentenv_proto::Frame;
    use std::sync::mpsc;

    fn accounts() -> Accounts {
        Accounts::parse(
            "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/nonexistent:/bin/false\n",
            "root:x:0:\nnogroup:x:65534:\n",
        )
    }

    /// An out stream whose frames land in the returned receiver.
    fn out() -> (std::sync::Arc<OutStream>, mpsc::Receiver<OutMsg>) {
        let (tx, rx) = mpsc::channel();
        (OutStream::new(Outbox::new(tx, 0), 1, None), rx)
    }

    fn frames(rx: &mpsc::Receiver<OutMsg>) -> Vec<Frame> {
        rx.try_iter()
            .filter_map(|m| match m {
                OutMsg::Frame { bytes, .. } => agentenv_proto::read_frame(&mut &bytes[..]).unwrap(),
                OutMsg::Close => None,
            })
            .collect()
    }

    #[test]
    fn permission_strings_match_ls() {
        assert_eq!(permissions(libc::S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(permissions(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(permissions(libc::S_IFLNK | 0o777), "lrwxrwxrwx");
        assert_eq!(permissions(libc::S_IFDIR | 0o1777), "drwxrwxrwt");
        assert_eq!(permissions(libc::S_IFREG | 0o4644), "-rwSr--r--");
        assert_eq!(permissions(libc::S_IFREG | 0o2755), "-rwxr-sr-x");
    }

    #[test]
    fn stat_make_dir_move_and_remove_on_a_tempdir() {
        let t = tempfile::tempdir().unwrap();
        let a = accounts();
        let (o, _rx) = out();
        let root = t.path().display().to_string();
        let run = |op: FsOp| run(&op, None, &a, &o);

        let made = run(FsOp::MakeDir {
            path: format!("{root}/a/b/c"),
        })
        .unwrap()
        .unwrap()
        .entry
        .unwrap();
        assert_eq!((made.name.as_str(), made.kind), ("c", EntryKind::Directory));
        assert_eq!(made.path, format!("{root}/a/b/c"));
        assert!(made.permissions.starts_with('d'), "{made:?}");
        let again = run(FsOp::MakeDir {
            path: format!("{root}/a/b"),
        })
        .unwrap_err();
        assert_eq!(again.code, ErrorCode::AlreadyExists);

        fs::write(t.path().join("a/f.txt"), b"hello").unwrap();
        std::os::unix::fs::symlink("b/c", t.path().join("a/link")).unwrap();
        let st = |p: &str| {
            run(FsOp::Stat {
                path: format!("{root}/{p}"),
            })
            .map(|r| r.unwrap().entry.unwrap())
        };
        let f = st("a/f.txt").unwrap();
        assert_eq!((f.kind, f.size), (EntryKind::File, 5));
        assert_eq!(f.owner, a.user_name(fs::metadata(t.path()).unwrap().uid()));
        assert!(f.modified_unix_ns > 1_600_000_000_000_000_000, "{f:?}");
        let l = st("a/link").unwrap();
        assert_eq!(l.kind, EntryKind::Symlink);
        assert_eq!(l.symlink_target, Some(format!("{root}/a/b/c")));
        let e = st("nope").unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (ErrorCode::NotFound, Some("path"))
        );

        let moved = run(FsOp::Move {
            source: format!("{root}/a/f.txt"),
            destination: format!("{root}/new/dir/g.txt"),
        })
        .unwrap()
        .unwrap()
        .entry
        .unwrap();
        assert_eq!((moved.name.as_str(), moved.size), ("g.txt", 5));
        assert!(!t.path().join("a/f.txt").exists());
        let e = run(FsOp::Move {
            source: format!("{root}/missing"),
            destination: format!("{root}/x"),
        })
        .unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (ErrorCode::NotFound, Some("source"))
        );
        let e = run(FsOp::Move {
            source: format!("{root}/a"),
            destination: format!("{root}/a/b/inside"),
        })
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("destination"));

        // Recursive; a missing path is success; a symlink goes, not its target.
        run(FsOp::Remove {
            path: format!("{root}/a/link"),
        })
        .unwrap();
        assert!(t.path().join("a/b/c").is_dir());
        run(FsOp::Remove {
            path: format!("{root}/a"),
        })
        .unwrap();
        assert!(!t.path().join("a").exists());
        run(FsOp::Remove {
            path: format!("{root}/a"),
        })
        .unwrap();
        assert_eq!(
            run(FsOp::Remove { path: "/".into() }).unwrap_err().code,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn a_cross_device_copy_keeps_the_tree() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("d")).unwrap();
        fs::write(src.join("d/f"), b"data").unwrap();
        fs::set_permissions(src.join("d/f"), fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("d/f", src.join("l")).unwrap();
        copy_tree(&src, &t.path().join("dst")).unwrap();
        let dst = t.path().join("dst");
        assert_eq!(fs::read(dst.join("d/f")).unwrap(), b"data");
        assert_eq!(fs::metadata(dst.join("d/f")).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::read_link(dst.join("l")).unwrap(), Path::new("d/f"));
        remove_tree(&src).unwrap();
        assert!(!src.exists());
    }

    #[test]
    fn listings_go_out_in_credited_chunks_down_to_their_depth() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("d1/d2/d3")).unwrap();
        fs::write(t.path().join("top.txt"), b"").unwrap();
        fs::write(t.path().join("d1/d2/deep.txt"), b"").unwrap();
        let a = accounts();
        let list = |depth: u32| {
            let (o, rx) = out();
            let op = FsOp::List {
                path: t.path().display().to_string(),
                depth,
            };
            let res = run(&op, None, &a, &o).unwrap().unwrap();
            assert!(res.entries.is_empty());
            let mut names = Vec::new();
            for f in frames(&rx) {
                assert_eq!(f.kind, Kind::FsEntries);
                let part: Vec<EntryInfo> = f.parse().unwrap();
                let base = t.path().display().to_string();
                names.extend(
                    part.into_iter()
                        .map(|e| e.path[base.len() + 1..].to_string()),
                );
            }
            names
        };
        assert_eq!(list(1), ["d1", "top.txt"]);
        // A directory's entries, then those of its sub-directories.
        assert_eq!(list(2), ["d1", "top.txt", "d1/d2"]);
        assert_eq!(
            list(9),
            ["d1", "top.txt", "d1/d2", "d1/d2/d3", "d1/d2/deep.txt"]
        );
        let (o, _rx) = out();
        let file = t.path().join("top.txt").display().to_string();
        let e = run(
            &FsOp::List {
                path: file,
                depth: 1,
            },
            None,
            &a,
            &o,
        )
        .unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (ErrorCode::BadRequest, Some("path"))
        );
    }

    #[test]
    fn what_a_user_makes_is_the_users() {
        if !nix_is_root() {
            eprintln!("SKIPPED what_a_user_makes_is_the_users: needs root to chown");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let a = accounts();
        let nobody = a.user("nobody").unwrap();
        let (o, _rx) = out();
        let p = format!("{}/x/y", t.path().display());
        let e = run(&FsOp::MakeDir { path: p }, Some(&nobody), &a, &o)
            .unwrap()
            .unwrap()
            .entry
            .unwrap();
        assert_eq!((e.owner.as_str(), e.group.as_str()), ("nobody", "nogroup"));
        let parent = fs::metadata(t.path().join("x")).unwrap();
        assert_eq!((parent.uid(), parent.gid()), (65534, 65534));
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no memory effects.
        unsafe { libc::geteuid() == 0 }
    }
}
