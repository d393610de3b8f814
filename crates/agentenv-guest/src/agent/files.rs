//! `PutFile` and `GetFile`: file transfers, each on its own thread, for root
//! or as a guest user (a relative path from its home; an upload and the
//! parents it makes belong to the user).
//!
//! An upload is written to `.<name>.agentenv-upload-<stream>` beside its
//! destination and renamed over it after `Eof` (fsync, chmod, rename, fsync
//! the directory); a cancelled or abandoned upload removes its temporary file.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use agentenv_proto::{Done, ErrorCode, ErrorMsg, FileInfo, GetFile, Kind, PutFile, DATA_CHUNK};

use super::fsops::make_dirs;
use super::out::{Inflight, OutStream};
use super::session::cancelled;
use super::users::{self, User};
use super::{io_error, spawn};

/// Mode of an uploaded file when the request names none.
const DEFAULT_MODE: u32 = 0o644;

fn bad(field: &str, msg: impl Into<String>) -> ErrorMsg {
    ErrorMsg::new(ErrorCode::BadRequest, Some(field), msg)
}

/// Checks a request's path and makes it absolute: relative to `user`'s
/// home, or absolute when there is no user; without NUL bytes.
fn check_path(path: &str, user: Option<&str>) -> Result<(PathBuf, Option<User>), ErrorMsg> {
    if user.is_none() && !path.starts_with('/') {
        return Err(bad("path", format!("path {path:?} is not absolute")));
    }
    let user = users::acting(user)?;
    Ok((users::resolve("path", path, user.as_ref())?, user))
}

enum PutMsg {
    Data(Vec<u8>),
    Eof,
    /// The host cancelled: remove the temporary file, answer `Error`.
    Kill,
    /// The session ended: remove the temporary file, answer nothing.
    Abort,
}

/// The session's handle on an upload.
#[derive(Clone)]
pub struct PutHandle {
    tx: Sender<PutMsg>,
    inflight: Arc<Inflight>,
    /// Set on `Kill`/abort so bytes still queued are not written.
    stop: Arc<AtomicBool>,
}

impl PutHandle {
    /// Passes a `Data`/`Eof` frame on. False if the host overran its window.
    pub fn data(&self, payload: Vec<u8>, eof: bool) -> bool {
        if eof {
            let _ = self.tx.send(PutMsg::Eof);
            return true;
        }
        if payload.is_empty() {
            return true;
        }
        if !self.inflight.receive(payload.len()) {
            return false;
        }
        let _ = self.tx.send(PutMsg::Data(payload));
        true
    }

    /// `Kill`: cancels the upload.
    pub fn kill(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.tx.send(PutMsg::Kill);
    }

    /// The session ended.
    pub fn abort(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.tx.send(PutMsg::Abort);
    }
}

/// Validates a `PutFile` and starts the upload thread, which prepares the
/// directory and the temporary file (off the session's reader thread: on a
/// frozen file system that would block until the thaw the reader must read).
pub fn start_put(req: PutFile, out: Arc<OutStream>) -> Result<PutHandle, ErrorMsg> {
    let (path, user) = check_path(&req.path, req.user.as_deref())?;
    if req.path.ends_with('/') {
        return Err(bad("path", format!("path {} ends with '/'", req.path)));
    }
    let mode = req.mode.unwrap_or(DEFAULT_MODE);
    if mode > 0o7777 {
        return Err(bad(
            "mode",
            format!("mode {mode:o} is not a permission mode"),
        ));
    }
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(bad(
            "path",
            format!("path {} does not name a file", req.path),
        ));
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".agentenv-upload-{}", out.stream()));
    let (tx, rx) = mpsc::channel();
    let handle = PutHandle {
        tx,
        inflight: Arc::new(Inflight::default()),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let upload = Upload {
        tmp: parent.join(tmp_name),
        dest: path.clone(),
        owner: user.map(|u| (u.uid, u.gid)),
        make_parents: req.make_parents,
        mode,
        out,
        inflight: handle.inflight.clone(),
        stop: handle.stop.clone(),
    };
    spawn("put", move || upload.run(&rx)).map_err(|e| io_error("path", "start a thread", &e))?;
    Ok(handle)
}

struct Upload {
    tmp: PathBuf,
    dest: PathBuf,
    /// Who the file (and the parents it makes) belongs to; None: root.
    owner: Option<(u32, u32)>,
    make_parents: bool,
    mode: u32,
    out: Arc<OutStream>,
    inflight: Arc<Inflight>,
    stop: Arc<AtomicBool>,
}

impl Upload {
    fn run(self, rx: &Receiver<PutMsg>) {
        let mut file = match self.prepare() {
            Ok(f) => f,
            Err(e) => {
                self.out.fail(&e);
                return;
            }
        };
        let mut bytes = 0u64;
        loop {
            match rx.recv().unwrap_or(PutMsg::Abort) {
                PutMsg::Data(b) => {
                    if !self.stop.load(Ordering::SeqCst) {
                        if let Err(e) = file.write_all(&b) {
                            let _ = fs::remove_file(&self.tmp);
                            let what = format!("write {}", self.tmp.display());
                            self.out.fail(&io_error("path", &what, &e));
                            return;
                        }
                        bytes += b.len() as u64;
                    }
                    self.inflight.consumed(&self.out, b.len());
                }
                PutMsg::Eof => {
                    match self.commit(&file) {
                        Ok(()) => {
                            self.out.finish(
                                Kind::Done,
                                &Done {
                                    bytes,
                                    ..Done::default()
                                },
                            );
                        }
                        Err(e) => {
                            let _ = fs::remove_file(&self.tmp);
                            self.out.fail(&e);
                        }
                    }
                    return;
                }
                PutMsg::Kill => {
                    let _ = fs::remove_file(&self.tmp);
                    self.out.fail(&cancelled());
                    return;
                }
                PutMsg::Abort => {
                    let _ = fs::remove_file(&self.tmp);
                    self.out.close();
                    return;
                }
            }
        }
    }

    /// Checks the destination, makes its parents if asked, creates the temporary file.
    fn prepare(&self) -> Result<File, ErrorMsg> {
        let dest = self.dest.display();
        let parent = self.dest.parent().unwrap_or(Path::new("/"));
        if fs::metadata(&self.dest).is_ok_and(|m| m.is_dir()) {
            return Err(bad("path", format!("path {dest} is a directory")));
        }
        if self.make_parents {
            make_dirs(parent, self.owner).map_err(|e| {
                let what = format!("create directory {}", parent.display());
                io_error("path", &what, &e)
            })?;
        }
        match fs::metadata(parent) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(bad(
                    "path",
                    format!("parent {} of {dest} is not a directory", parent.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ErrorMsg::new(
                    ErrorCode::NotFound,
                    Some("path"),
                    format!(
                        "parent directory {} of {dest} does not exist",
                        parent.display()
                    ),
                ))
            }
            Err(e) => return Err(io_error("path", &parent.display().to_string(), &e)),
        }
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.tmp)
            .map_err(|e| io_error("path", &format!("create {}", self.tmp.display()), &e))
    }

    fn commit(&self, file: &File) -> Result<(), ErrorMsg> {
        let tmp = self.tmp.display();
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::fchown(file, Some(uid), Some(gid))
                .map_err(|e| io_error("path", &format!("chown {tmp}"), &e))?;
        }
        // After the chown, which clears set-id bits.
        file.set_permissions(Permissions::from_mode(self.mode))
            .map_err(|e| io_error("path", &format!("chmod {tmp}"), &e))?;
        file.sync_all()
            .map_err(|e| io_error("path", &format!("fsync {tmp}"), &e))?;
        fs::rename(&self.tmp, &self.dest).map_err(|e| {
            io_error(
                "path",
                &format!("rename {tmp} to {}", self.dest.display()),
                &e,
            )
        })?;
        if let Some(dir) = self.dest.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// Validates a `GetFile`, opens the file and starts the sender thread.
pub fn start_get(req: GetFile, out: Arc<OutStream>) -> Result<(), ErrorMsg> {
    let (path, _) = check_path(&req.path, req.user.as_deref())?;
    let shown = path.display().to_string();
    let not_regular = || bad("path", format!("path {shown} is not a regular file"));
    // stat first: opening a FIFO or a device can block or have side effects.
    let meta = fs::metadata(&path).map_err(|e| io_error("path", &shown, &e))?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| io_error("path", &format!("open {shown}"), &e))?;
    let meta = file
        .metadata()
        .map_err(|e| io_error("path", &format!("stat {shown}"), &e))?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    let info = FileInfo {
        size: meta.len(),
        mode: meta.mode() & 0o7777,
    };
    spawn("get", move || download(file, &shown, info, &out))
        .map_err(|e| io_error("path", "start a thread", &e))
}

fn download(mut file: File, path: &str, info: FileInfo, out: &OutStream) {
    if !out.send_json(Kind::FileInfo, &info) {
        return;
    }
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut bytes = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                out.fail(&io_error("path", &format!("read {path}"), &e));
                return;
            }
        };
        if !out.send_data(Kind::FileData, &buf[..n]) {
            return;
        }
        bytes += n as u64;
    }
    out.finish(
        Kind::Done,
        &Done {
            bytes,
            ..Done::default()
        },
    );
}
