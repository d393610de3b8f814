//! File-system access as a guest user: the kernel's own permission checks,
//! for one thread.
//!
//! A request made with a `user` (`Fs`, `PutFile`, `GetFile`, `Watch`) does
//! its file-system work on a thread of its own whose file-system user id,
//! group id and supplementary groups are the user's ([`AsUser`]); the
//! kernel then checks every open, stat, mkdir, rename, unlink and
//! `inotify_add_watch` as it would for the user, and what the thread creates
//! belongs to the user. The calls are the raw system calls
//! (`setfsuid`/`setfsgid`/`setgroups`), which change only the calling thread
//! (libc's wrappers broadcast set-id changes to every thread of the process).
//!
//! Such a thread serves that one request and nothing else: the session's
//! reader and writer threads and the exec threads never switch (a short
//! piece of work a session needs done as a user runs on a thread of its
//! own, [`run_as`]), and a switched thread starts no other threads (a new
//! thread would inherit its credentials).

use std::io;

use agentenv_proto::{ErrorCode, ErrorMsg};

use super::sys;
use super::users::User;

/// The user a request's file-system work acts as, when that needs a switch:
/// None for no user and for root (uid 0), which keep the agent's own
/// credentials.
pub fn switching(user: Option<&User>) -> Option<&User> {
    user.filter(|u| u.uid != 0)
}

/// The calling thread acting as a user; dropping it gives the thread back
/// the credentials it had.
#[derive(Debug)]
pub struct AsUser {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

impl AsUser {
    /// Switches the calling thread's file-system credentials to `user`'s:
    /// supplementary groups, fsgid, then fsuid, each checked.
    pub fn enter(user: &User) -> io::Result<AsUser> {
        let saved = AsUser {
            uid: sys::thread_fsuid(),
            gid: sys::thread_fsgid(),
            groups: sys::thread_groups()?,
        };
        let mut groups = user.groups.clone();
        if groups.is_empty() {
            groups.push(user.gid);
        }
        sys::set_thread_groups(&groups)?;
        // From here on `saved`'s drop puts everything back on failure.
        sys::set_thread_fsgid(user.gid);
        if sys::thread_fsgid() != user.gid {
            return Err(refused("fsgid", user.gid));
        }
        sys::set_thread_fsuid(user.uid);
        if sys::thread_fsuid() != user.uid {
            return Err(refused("fsuid", user.uid));
        }
        Ok(saved)
    }
}

fn refused(what: &str, id: u32) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("the kernel did not set this thread's {what} to {id}"),
    )
}

impl Drop for AsUser {
    fn drop(&mut self) {
        sys::set_thread_fsuid(self.uid);
        sys::set_thread_fsgid(self.gid);
        let groups = sys::set_thread_groups(&self.groups);
        if sys::thread_fsuid() != self.uid || sys::thread_fsgid() != self.gid || groups.is_err() {
            // Cannot happen for a root agent; the thread serves only the
            // request that switched it and ends with it.
            eprintln!(
                "agentenv-guest: a thread could not restore its file-system credentials \
                 ({}:{}); it ends with its request",
                self.uid, self.gid
            );
        }
    }
}

/// Switches the calling thread to `user` (see [`switching`]; nothing for
/// root or no user). Call it only on a thread that serves this one request.
pub fn enter(user: Option<&User>) -> Result<Option<AsUser>, ErrorMsg> {
    let Some(u) = switching(user) else {
        return Ok(None);
    };
    AsUser::enter(u).map(Some).map_err(|e| {
        ErrorMsg::new(
            ErrorCode::Io,
            Some("user"),
            format!("cannot act as user {}: {e}", u.name),
        )
    })
}

/// Runs `f` as `user` on a thread of its own (which ends with `f`, and its
/// credentials with it) and returns what it returns; without a user or as
/// root, on the calling thread. For a session's thread, which must never
/// switch itself.
pub fn run_as<T: Send>(
    user: Option<&User>,
    f: impl FnOnce() -> Result<T, ErrorMsg> + Send,
) -> Result<T, ErrorMsg> {
    if switching(user).is_none() {
        return f();
    }
    std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("as-user".to_string())
            .stack_size(256 * 1024)
            .spawn_scoped(s, || {
                let _as = enter(user)?;
                f()
            })
            .map_err(|e| super::io_error("user", "start a thread", &e))?;
        worker.join().unwrap_or_else(|_| {
            Err(ErrorMsg::new(
                ErrorCode::Io,
                Some("user"),
                "a file-system worker thread panicked",
            ))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn nobody() -> User {
        User {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
            groups: vec![65534, 4242],
            home: "/".into(),
            shell: "/bin/false".into(),
        }
    }

    /// These tests switch threads to nobody: they need root, and say so.
    fn assert_root() {
        // SAFETY: geteuid has no memory effects.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "these tests act as nobody on root's files: run the guest crate's tests as root"
        );
    }

    /// This thread's `Uid:`, `Gid:`, `Groups:` and `CapEff:` lines, as the
    /// kernel sees them.
    fn status() -> (String, String, String, String) {
        let s = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let line = |key: &str| {
            s.lines()
                .find(|l| l.starts_with(key))
                .map(|l| {
                    l[key.len()..]
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default()
        };
        (line("Uid:"), line("Gid:"), line("Groups:"), line("CapEff:"))
    }

    #[test]
    fn a_switched_thread_keeps_its_credentials_to_itself() {
        assert_root();
        let before = status();
        assert_eq!(before.0, "0 0 0 0", "{before:?}");
        let (switched_tx, switched_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        // A thread that switches and holds nobody's credentials...
        let worker = std::thread::spawn(move || {
            let guard = AsUser::enter(&nobody()).unwrap();
            switched_tx.send(status()).unwrap();
            done_rx.recv().unwrap();
            drop(guard);
            status()
        });
        let inside = switched_rx.recv().unwrap();
        // (real, effective, saved, fs): only the fs ids change.
        assert_eq!(inside.0, "0 0 0 65534", "{inside:?}");
        assert_eq!(inside.1, "0 0 0 65534", "{inside:?}");
        assert_eq!(inside.2, "4242 65534", "{inside:?}");
        // The kernel took the file capabilities (CAP_DAC_OVERRIDE is bit 1)
        // from the switched thread only.
        const CAP_DAC_OVERRIDE: u64 = 1 << 1;
        let caps = |hex: &str| u64::from_str_radix(hex, 16).unwrap();
        assert_ne!(caps(&before.3) & CAP_DAC_OVERRIDE, 0, "{before:?}");
        assert_eq!(caps(&inside.3) & CAP_DAC_OVERRIDE, 0, "{inside:?}");
        // ...while this thread and a new one keep root's.
        assert_eq!(status(), before);
        let other = std::thread::spawn(status).join().unwrap();
        assert_eq!(other, before);
        done_tx.send(()).unwrap();
        // Dropping the guard gives the thread root's back.
        assert_eq!(worker.join().unwrap(), before);
    }

    #[test]
    fn run_as_works_on_its_own_thread_and_checks_as_the_user() {
        assert_root();
        let before = status();
        let t = tempfile::tempdir().unwrap();
        let secret = t.path().join("secret");
        std::fs::write(&secret, b"root only").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let u = nobody();
        let (seen, read) = run_as(Some(&u), || {
            let read =
                std::fs::read(&secret).map_err(|e| super::super::io_error("path", "read", &e));
            Ok((status(), read))
        })
        .unwrap();
        assert_eq!(seen.0, "0 0 0 65534");
        assert_eq!(read.unwrap_err().code, ErrorCode::PermissionDenied);
        // The caller never switched.
        assert_eq!(status(), before);
        // Root and no user: the calling thread, its own credentials.
        let root = User {
            uid: 0,
            gid: 0,
            groups: vec![0],
            name: "root".into(),
            ..u
        };
        for user in [None, Some(&root)] {
            let (seen, data) =
                run_as(user, || Ok((status(), std::fs::read(&secret).unwrap()))).unwrap();
            assert_eq!((seen, data.as_slice()), (before.clone(), &b"root only"[..]));
        }
    }

    mod requests {
        //! Every kind of request made as `nobody` on a tree of root's: the
        //! kernel's answer, as the protocol's error naming the path.
        use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
        use std::path::Path;
        use std::sync::{mpsc, Arc};
        use std::time::Duration;

        use agentenv_proto::{
            ErrorCode, ErrorMsg, Frame, FsOp, FsResponse, GetFile, Kind, PutFile, WatchRequest,
        };

        use crate::agent::out::{OutMsg, OutStream, Outbox};
        use crate::agent::users::{self, Accounts};
        use crate::agent::{creds, files, fsops, watch};

        fn out() -> (Arc<OutStream>, mpsc::Receiver<OutMsg>) {
            let (tx, rx) = mpsc::channel();
            (OutStream::new(Outbox::new(tx, 0), 1, None), rx)
        }

        /// The frames up to and including the one that ends the stream.
        fn until_end(rx: &mpsc::Receiver<OutMsg>) -> Vec<Frame> {
            let mut frames = Vec::new();
            loop {
                let msg = rx
                    .recv_timeout(Duration::from_secs(10))
                    .expect("the request ends within 10 s");
                let OutMsg::Frame { bytes, .. } = msg else {
                    continue;
                };
                let f = agentenv_proto::read_frame(&mut &bytes[..])
                    .unwrap()
                    .unwrap();
                let end = matches!(f.kind, Kind::Done | Kind::Error);
                frames.push(f);
                if end {
                    return frames;
                }
            }
        }

        fn fs_op(user: &str, op: FsOp) -> Result<FsResponse, ErrorMsg> {
            let u = users::acting(Some(user)).unwrap();
            let a = Accounts::guest();
            let (o, _rx) = out();
            creds::run_as(u.as_ref(), || {
                fsops::run(&op, u.as_ref(), &a, &o).map(|r| r.expect("not ended"))
            })
        }

        fn get(user: Option<&str>, path: &Path) -> Result<Vec<u8>, ErrorMsg> {
            let (o, rx) = out();
            let req = GetFile {
                path: path.display().to_string(),
                user: user.map(str::to_string),
            };
            files::start_get(req, o)?;
            let frames = until_end(&rx);
            let last = frames.last().unwrap();
            if last.kind == Kind::Error {
                return Err(last.parse().unwrap());
            }
            Ok(frames
                .iter()
                .filter(|f| f.kind == Kind::FileData)
                .flat_map(|f| f.payload.clone())
                .collect())
        }

        fn put(user: &str, path: &Path, data: &[u8]) -> Result<(), ErrorMsg> {
            let (o, rx) = out();
            let req = PutFile {
                path: path.display().to_string(),
                mode: Some(0o640),
                make_parents: true,
                user: Some(user.to_string()),
            };
            let h = files::start_put(req, o)?;
            assert!(h.data(data.to_vec(), false));
            assert!(h.data(Vec::new(), true));
            let last = until_end(&rx).pop().unwrap();
            match last.kind {
                Kind::Done => Ok(()),
                _ => Err(last.parse().unwrap()),
            }
        }

        fn watch_of(user: &str, path: &Path) -> Result<(), ErrorMsg> {
            let (o, _rx) = out();
            let req = WatchRequest {
                path: path.display().to_string(),
                recursive: true,
                user: Some(user.to_string()),
            };
            watch::start(req, o).map(|h| h.abort())
        }

        #[track_caller]
        fn denied<T: std::fmt::Debug>(r: Result<T, ErrorMsg>, path: &Path) {
            let e = r.expect_err("nobody is refused");
            assert_eq!(e.code, ErrorCode::PermissionDenied, "{e:?}");
            assert!(
                e.error.contains(&path.display().to_string()),
                "the error names {}: {e:?}",
                path.display()
            );
        }

        #[test]
        fn nobody_gets_the_kernels_answers_and_owns_what_it_makes() {
            super::assert_root();
            assert!(
                users::acting(Some("nobody")).is_ok(),
                "this test needs a user nobody in /etc/passwd"
            );
            let t = tempfile::tempdir().unwrap();
            let p = |rel: &str| t.path().join(rel);
            std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            // locked/: root's, 0700, with a secret; shared/: root's, 0755,
            // with a 0600 file; mine/: nobody's.
            std::fs::create_dir_all(p("locked/sub")).unwrap();
            std::fs::set_permissions(p("locked"), std::fs::Permissions::from_mode(0o700)).unwrap();
            std::fs::write(p("locked/secret"), b"secret").unwrap();
            std::fs::create_dir(p("shared")).unwrap();
            std::fs::write(p("shared/root-only"), b"root only").unwrap();
            std::fs::set_permissions(
                p("shared/root-only"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            std::fs::create_dir(p("mine")).unwrap();
            chown(p("mine"), Some(65534), Some(65534)).unwrap();

            // Reads.
            denied(
                get(Some("nobody"), &p("locked/secret")),
                &p("locked/secret"),
            );
            denied(
                get(Some("nobody"), &p("shared/root-only")),
                &p("shared/root-only"),
            );
            // Writes, and the parents an upload would make.
            denied(
                put("nobody", &p("shared/new.txt"), b"x"),
                &p("shared/new.txt"),
            );
            denied(put("nobody", &p("locked/a/b.txt"), b"x"), &p("locked"));
            assert!(!p("shared/new.txt").exists());
            assert_eq!(std::fs::read_dir(p("shared")).unwrap().count(), 1);
            // Fs operations.
            let op = |op: FsOp| fs_op("nobody", op);
            let s = |rel: &str| p(rel).display().to_string();
            denied(
                op(FsOp::MakeDir {
                    path: s("shared/d"),
                }),
                &p("shared/d"),
            );
            denied(
                op(FsOp::MakeDir {
                    path: s("locked/d"),
                }),
                &p("locked/d"),
            );
            denied(
                op(FsOp::List {
                    path: s("locked"),
                    depth: 1,
                }),
                &p("locked"),
            );
            denied(
                op(FsOp::Stat {
                    path: s("locked/secret"),
                }),
                &p("locked/secret"),
            );
            denied(
                op(FsOp::Remove {
                    path: s("shared/root-only"),
                }),
                &p("shared/root-only"),
            );
            denied(
                op(FsOp::Move {
                    source: s("shared/root-only"),
                    destination: s("mine/stolen"),
                }),
                &p("shared/root-only"),
            );
            assert!(p("shared/root-only").exists() && !p("shared/d").exists());
            // Watches.
            denied(watch_of("nobody", &p("locked")), &p("locked"));

            // Root (no user, or root named): as before.
            assert_eq!(get(None, &p("locked/secret")).unwrap(), b"secret");
            assert_eq!(get(Some("root"), &p("locked/secret")).unwrap(), b"secret");
            fs_op(
                "root",
                FsOp::List {
                    path: s("locked"),
                    depth: 1,
                },
            )
            .unwrap();

            // In its own directory nobody may do all of it, and owns what it makes.
            put("nobody", &p("mine/up/deep/f.txt"), b"mine").unwrap();
            for rel in ["mine/up", "mine/up/deep", "mine/up/deep/f.txt"] {
                let m = std::fs::metadata(p(rel)).unwrap();
                assert_eq!((m.uid(), m.gid()), (65534, 65534), "{rel}");
            }
            assert_eq!(
                std::fs::metadata(p("mine/up/deep/f.txt")).unwrap().mode() & 0o777,
                0o640
            );
            assert_eq!(
                get(Some("nobody"), &p("mine/up/deep/f.txt")).unwrap(),
                b"mine"
            );
            let made = op(FsOp::MakeDir {
                path: s("mine/d/e"),
            })
            .unwrap()
            .entry
            .unwrap();
            assert_eq!(made.owner, "nobody");
            assert_eq!(std::fs::metadata(p("mine/d")).unwrap().uid(), 65534);
            op(FsOp::List {
                path: s("mine"),
                depth: 3,
            })
            .unwrap();
            op(FsOp::Stat {
                path: s("mine/up/deep/f.txt"),
            })
            .unwrap();
            op(FsOp::Move {
                source: s("mine/up/deep/f.txt"),
                destination: s("mine/g.txt"),
            })
            .unwrap();
            watch_of("nobody", &p("mine")).unwrap();
            op(FsOp::Remove { path: s("mine/up") }).unwrap();
            assert!(!p("mine/up").exists() && p("mine/g.txt").exists());
        }
    }
}
