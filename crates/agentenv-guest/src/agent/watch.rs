//! `Watch`: a directory's changes, from inotify, as `FsEvent` frames.
//!
//! One thread per watch reads its inotify instance and sends each event
//! within the stream's credit. While the host does not take events, the
//! thread waits for credit and reads nothing: the events queue in the
//! kernel (bounded by `fs.inotify.max_queued_events`), and when that
//! queue overflows the watch ends with an error saying events were lost. So
//! a watch holds a fixed read buffer and one path per watched directory
//! ([`MAX_WATCHED_DIRS`] at most), never a queue that grows.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use agentenv_proto::{
    Done, ErrorCode, ErrorMsg, FsEvent, FsEventOp, FsResponse, Kind, WatchRequest,
};

use super::fsops::entry_of;
use super::out::OutStream;
use super::users::{self, Accounts};
use super::{io_error, lock, spawn, sys};

/// Most directories one recursive watch follows.
pub const MAX_WATCHED_DIRS: usize = 65_536;

/// What a watched directory reports.
const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

/// Bytes of `struct inotify_event` before its name.
const EVENT_HEADER: usize = 16;

/// The session's handle on a watch.
#[derive(Clone)]
pub struct WatchHandle {
    out: Arc<OutStream>,
    /// Dropping the write end wakes the watch thread, which then stops.
    wake: Arc<Mutex<Option<OwnedFd>>>,
}

impl WatchHandle {
    /// `Kill`: the watch ends with `Done`.
    pub fn kill(&self) {
        self.out.finish(Kind::Done, &Done::default());
        lock(&self.wake).take();
    }

    /// The session ended: the thread stops, nothing more is sent.
    pub fn abort(&self) {
        self.out.close();
        lock(&self.wake).take();
    }
}

/// The watched directories: inotify descriptor → path relative to the root
/// of the watch (empty for the root).
struct Dirs {
    fd: OwnedFd,
    root: PathBuf,
    recursive: bool,
    by_wd: HashMap<i32, PathBuf>,
}

impl Dirs {
    /// Watches `rel` (below the root) and, when recursive, every directory
    /// under it. With `announce` (a directory that appeared during the
    /// watch), what is already inside it is reported as created: it was,
    /// after the watch began, but before its directory was watched. False
    /// once the stream has ended.
    fn add_tree(&mut self, rel: PathBuf, announce: Option<&OutStream>) -> Result<bool, ErrorMsg> {
        let mut todo = vec![rel];
        while let Some(rel) = todo.pop() {
            if self.by_wd.len() >= MAX_WATCHED_DIRS {
                return Err(ErrorMsg::new(
                    ErrorCode::BadRequest,
                    Some("path"),
                    format!(
                        "{} holds more than {MAX_WATCHED_DIRS} directories to watch",
                        self.root.display()
                    ),
                ));
            }
            let abs = self.root.join(&rel);
            // The watched directory may be reached through a symlink; the
            // directories under it are followed only as directories.
            let mask = if rel.as_os_str().is_empty() {
                MASK
            } else {
                MASK | libc::IN_DONT_FOLLOW
            };
            let wd = match sys::inotify_add(self.fd.as_fd(), &abs, mask) {
                Ok(wd) => wd,
                // A sub-directory that went (or turned into a file) meanwhile.
                Err(_) if !rel.as_os_str().is_empty() => continue,
                Err(e) => return Err(io_error("path", &format!("watch {}", abs.display()), &e)),
            };
            self.by_wd.insert(wd, rel.clone());
            if !self.recursive {
                continue;
            }
            let Ok(rd) = std::fs::read_dir(&abs) else {
                continue;
            };
            let mut names: Vec<_> = rd.flatten().collect();
            names.sort_by_key(|e| e.file_name());
            for e in names.iter().rev() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(rel.join(e.file_name()));
                }
            }
            if let Some(out) = announce {
                for e in &names {
                    if !send(out, &rel.join(e.file_name()), FsEventOp::Create) {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }
}

/// Sends one event within the stream's credit; false once it has ended.
fn send(out: &OutStream, rel: &Path, op: FsEventOp) -> bool {
    let ev = FsEvent {
        name: rel.to_string_lossy().into_owned(),
        op,
    };
    let json = serde_json::to_vec(&ev).expect("json serialises");
    out.send_credited(Kind::FsEvent, &json)
}

/// Validates a `Watch`, sets its watches up, answers `FsResult` with the
/// directory's entry and starts the thread that sends its events.
pub fn start(req: WatchRequest, out: Arc<OutStream>) -> Result<WatchHandle, ErrorMsg> {
    let user = users::acting(req.user.as_deref())?;
    let root = users::resolve("path", &req.path, user.as_ref())?;
    match std::fs::metadata(&root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(ErrorMsg::new(
                ErrorCode::BadRequest,
                Some("path"),
                format!("path {} is not a directory", root.display()),
            ))
        }
        Err(e) => return Err(io_error("path", &root.display().to_string(), &e)),
    }
    let fd = sys::inotify_init().map_err(|e| io_error("path", "inotify_init", &e))?;
    let mut dirs = Dirs {
        fd,
        root: root.clone(),
        recursive: req.recursive,
        by_wd: HashMap::new(),
    };
    dirs.add_tree(PathBuf::new(), None)?;
    let entry = entry_of(&root, &Accounts::guest())
        .map_err(|e| io_error("path", &root.display().to_string(), &e))?;
    let (wake_r, wake_w) = sys::pipe().map_err(|e| io_error("path", "pipe", &e))?;
    out.send_json(
        Kind::FsResult,
        &FsResponse {
            entry: Some(entry),
            entries: Vec::new(),
        },
    );
    let out2 = out.clone();
    spawn("watch", move || {
        if let Err(e) = run(&mut dirs, &wake_r, &out2) {
            out2.fail(&e);
        }
    })
    .map_err(|e| io_error("path", "start a thread", &e))?;
    Ok(WatchHandle {
        out,
        wake: Arc::new(Mutex::new(Some(wake_w))),
    })
}

/// Reads events until the host stops the watch (`Ok`) or the watch fails.
fn run(dirs: &mut Dirs, wake: &OwnedFd, out: &OutStream) -> Result<(), ErrorMsg> {
    let mut inotify = File::from(
        dirs.fd
            .try_clone()
            .map_err(|e| io_error("path", "dup", &e))?,
    );
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let ready = sys::poll2(inotify.as_fd(), Some(wake.as_fd()), -1)
            .map_err(|e| io_error("path", "poll", &e))?;
        if ready.b {
            return Ok(());
        }
        if !ready.a {
            continue;
        }
        let n = match inotify.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(io_error("path", "read inotify events", &e)),
        };
        let mut at = 0;
        while at + EVENT_HEADER <= n {
            let word =
                |i: usize| u32::from_ne_bytes(buf[at + i..at + i + 4].try_into().expect("4 bytes"));
            let (wd, mask, len) = (word(0) as i32, word(4), word(12) as usize);
            let name_bytes = &buf[(at + EVENT_HEADER).min(n)..(at + EVENT_HEADER + len).min(n)];
            let name_end = name_bytes
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(name_bytes.len());
            let name = String::from_utf8_lossy(&name_bytes[..name_end]).into_owned();
            at += EVENT_HEADER + len;
            if !event(dirs, wd, mask, &name, out)? {
                return Ok(());
            }
        }
    }
}

/// Handles one inotify event; false once the stream has ended.
fn event(
    dirs: &mut Dirs,
    wd: i32,
    mask: u32,
    name: &str,
    out: &OutStream,
) -> Result<bool, ErrorMsg> {
    if mask & libc::IN_Q_OVERFLOW != 0 {
        return Err(ErrorMsg::new(
            ErrorCode::Io,
            Some("path"),
            format!(
                "watch of {} fell behind: the kernel's event queue overflowed and events were lost",
                dirs.root.display()
            ),
        ));
    }
    let Some(rel) = dirs.by_wd.get(&wd).cloned() else {
        return Ok(true);
    };
    let is_root = rel.as_os_str().is_empty();
    if mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED) != 0 {
        if is_root {
            return Err(ErrorMsg::new(
                ErrorCode::NotFound,
                Some("path"),
                format!("the watched directory {} went away", dirs.root.display()),
            ));
        }
        if mask & libc::IN_IGNORED != 0 {
            dirs.by_wd.remove(&wd);
        }
        return Ok(true);
    }
    if name.is_empty() {
        return Ok(true);
    }
    let path = rel.join(name);
    let op = if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
        FsEventOp::Create
    } else if mask & libc::IN_MODIFY != 0 {
        FsEventOp::Write
    } else if mask & libc::IN_DELETE != 0 {
        FsEventOp::Remove
    } else if mask & libc::IN_MOVED_FROM != 0 {
        FsEventOp::Rename
    } else if mask & libc::IN_ATTRIB != 0 {
        FsEventOp::Chmod
    } else {
        return Ok(true);
    };
    if !send(out, &path, op) {
        return Ok(false);
    }
    if op == FsEventOp::Create && dirs.recursive && mask & libc::IN_ISDIR != 0 {
        return dirs.add_tree(path, Some(out));
    }
    Ok(true)
}
