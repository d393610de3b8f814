//! What the E2B surface needs from the guest agent, through the real path:
//! the host client (`AgentClient`) against the real `agentenv-guest` running
//! on this host (`--listen-unix`, as root). Users, terminals, signals,
//! interactive stdin, file-system operations, watches, and transfers as a
//! user; and a watch whose events nobody reads stays bounded.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use agentenv_core::agent::{AgentError, AgentLink, Exec, ExecEvent, Watch};
use agentenv_core::backend::AgentChannel;
use agentenv_host::agent::AgentClient;
use agentenv_proto::{
    EntryKind, ErrorCode, ExecRequest, ExitStatus, FsEventOp, FsOp, FsRequest, GetFile, PtySize,
    PutFile, WatchRequest, FEATURES,
};
use agentenv_testkit::agent::HostAgent;

/// The agent on a socket in `dir`, and a connection to it.
async fn connect(dir: &Path) -> (HostAgent, AgentClient) {
    assert_root();
    let sock = dir.join("agent.sock");
    let agent = HostAgent::start(&sock);
    // The socket's file exists from bind(), a moment before listen().
    let t = Instant::now();
    loop {
        match AgentClient::connect(&AgentChannel::Stream(sock.clone()), Duration::from_secs(10))
            .await
        {
            Ok(client) => return (agent, client),
            Err(e) if t.elapsed() > Duration::from_secs(10) => panic!("the agent answers: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

fn assert_root() {
    // SAFETY: geteuid has no memory effects.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests run the agent as root (it switches to other users): run them as root"
    );
}

fn req(cmd: &[&str]) -> ExecRequest {
    ExecRequest {
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout_ms: Some(30_000),
        ..Default::default()
    }
}

fn sh(script: &str) -> ExecRequest {
    req(&["sh", "-c", script])
}

/// Output so far and the exit, within 20 s.
async fn finish(exec: &mut Exec) -> (String, String, ExitStatus) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let run = async {
        loop {
            match exec.next().await.expect("the command's events") {
                ExecEvent::Stdout(b) => out.extend(b),
                ExecEvent::Stderr(b) => err.extend(b),
                ExecEvent::Exit(st) => return st,
            }
        }
    };
    let st = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the command ended in time");
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        st,
    )
}

/// Reads stdout until it contains `want` (within 20 s); returns all of it.
async fn until(exec: &mut Exec, seen: &mut String, want: &str) {
    let run = async {
        while !seen.contains(want) {
            match exec.next().await.expect("the command's events") {
                ExecEvent::Stdout(b) | ExecEvent::Stderr(b) => {
                    seen.push_str(&String::from_utf8_lossy(&b))
                }
                ExecEvent::Exit(st) => panic!("exited ({st:?}) before {want:?} in {seen:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .unwrap_or_else(|_| panic!("no {want:?} in {seen:?}"));
}

fn remote(e: AgentError) -> agentenv_proto::ErrorMsg {
    match e {
        AgentError::Remote(m) => m,
        other => panic!("expected the agent's refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn commands_run_as_a_guest_user_with_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, client) = connect(dir.path()).await;
    assert_eq!(client.hello().features, FEATURES);

    let mut as_nobody = sh("id -u; id -g; echo $HOME $USER $LOGNAME; pwd");
    as_nobody.user = Some("nobody".into());
    let mut exec = client.exec(&as_nobody, None).await.unwrap();
    let (out, err, st) = finish(&mut exec).await;
    assert_eq!(st.exit_code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    let nobody = std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .map(|l| l.split(':').map(str::to_string).collect::<Vec<_>>())
        .expect("this host has a nobody");
    assert_eq!(lines[0], "65534");
    assert_eq!(lines[1], nobody[3]);
    assert_eq!(lines[2], format!("{} nobody nobody", nobody[5]));
    // nobody's home does not exist: the command runs in / instead.
    let expect_cwd = if Path::new(&nobody[5]).is_dir() {
        nobody[5].as_str()
    } else {
        "/"
    };
    assert_eq!(lines[3], expect_cwd);

    // Root by name: its home is the default directory; a relative cwd is
    // relative to it.
    let mut as_root = sh("id -u; pwd");
    as_root.user = Some("root".into());
    as_root.cwd = Some("../tmp".into());
    let (out, _, st) = finish(&mut client.exec(&as_root, None).await.unwrap()).await;
    assert_eq!((out.as_str(), st.exit_code), ("0\n/tmp\n", Some(0)));

    // Without a user, as before: root, and a relative cwd is refused.
    let mut relative = sh("true");
    relative.cwd = Some("tmp".into());
    let e = remote(client.exec(&relative, None).await.err().unwrap());
    assert_eq!(e.field.as_deref(), Some("cwd"), "{e:?}");

    let mut ghost = sh("true");
    ghost.user = Some("no-such-user-here".into());
    let e = remote(client.exec(&ghost, None).await.err().unwrap());
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::NotFound, Some("user"))
    );
    assert!(e.error.contains("no-such-user-here"), "{e:?}");
}

#[tokio::test]
async fn a_terminal_reports_its_size_and_follows_resizes() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, client) = connect(dir.path()).await;
    let mut r = sh(
        "stty size; tty; test -t 0 && test -t 1 && test -t 2 && echo all-ttys; \
         stat -c %u \"$(tty)\"",
    );
    r.pty = Some(PtySize { cols: 80, rows: 24 });
    r.user = Some("nobody".into());
    let (out, _, st) = finish(&mut client.exec(&r, None).await.unwrap()).await;
    assert_eq!(st.exit_code, Some(0), "{out}");
    let out = out.replace('\r', "");
    assert!(out.starts_with("24 80\n/dev/pts/"), "{out:?}");
    assert!(out.contains("all-ttys\n65534\n"), "{out:?}");

    // An interactive shell: what the host writes goes to the terminal.
    let mut shell = req(&["sh"]);
    shell.pty = Some(PtySize { cols: 80, rows: 24 });
    shell.env.insert("PS1".into(), "$ ".into());
    let mut exec = client.exec(&shell, None).await.unwrap();
    let control = exec.control();
    let mut seen = String::new();
    control.write_stdin(b"stty size\n").await.unwrap();
    until(&mut exec, &mut seen, "24 80").await;
    control
        .resize(PtySize {
            cols: 100,
            rows: 40,
        })
        .await
        .unwrap();
    control.write_stdin(b"stty size; exit 7\n").await.unwrap();
    let (out, _, st) = finish(&mut exec).await;
    assert!(out.contains("40 100"), "{seen}{out}");
    assert_eq!(st.exit_code, Some(7));
}

#[tokio::test]
async fn signals_reach_the_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, client) = connect(dir.path()).await;
    // SIGTERM can be caught: the command says so and exits 3.
    let mut exec = client
        .exec(
            &sh("trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.05; done"),
            None,
        )
        .await
        .unwrap();
    let mut seen = String::new();
    until(&mut exec, &mut seen, "ready").await;
    exec.control().signal(libc::SIGTERM).await.unwrap();
    let (out, _, st) = finish(&mut exec).await;
    assert!(out.contains("got-term"), "{out}");
    assert_eq!((st.exit_code, st.killed), (Some(3), false));

    // SIGKILL cannot: the exit names the signal.
    let mut exec = client
        .exec(&sh("trap '' TERM; echo ready; sleep 30"), None)
        .await
        .unwrap();
    let mut seen = String::new();
    until(&mut exec, &mut seen, "ready").await;
    let t = Instant::now();
    exec.control().signal(libc::SIGTERM).await.unwrap();
    exec.control().signal(libc::SIGKILL).await.unwrap();
    let (_, _, st) = finish(&mut exec).await;
    assert_eq!((st.exit_code, st.signal, st.killed), (None, Some(9), false));
    assert!(t.elapsed() < Duration::from_secs(10));

    // kill() is the host's kill: the exit says so.
    let mut exec = client.exec(&sh("sleep 30"), None).await.unwrap();
    exec.control().kill().await.unwrap();
    let (_, _, st) = finish(&mut exec).await;
    assert_eq!((st.signal, st.killed), (Some(9), true));

    // A signal number out of range is refused on the host.
    let exec = client.exec(&sh("sleep 30"), None).await.unwrap();
    let e = remote(exec.control().signal(0).await.unwrap_err());
    assert_eq!(e.field.as_deref(), Some("signal"));
}

#[tokio::test]
async fn stdin_stays_open_until_closed_and_writes_come_from_another_task() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, client) = connect(dir.path()).await;
    let mut cat = req(&["cat"]);
    cat.stdin = true;
    let mut exec = client.exec(&cat, None).await.unwrap();
    let control = exec.control();
    let mut seen = String::new();
    control.write_stdin(b"hello\n").await.unwrap();
    until(&mut exec, &mut seen, "hello\n").await;
    // From another task, while this one pulls events: 10 MiB, more than
    // the guest's window, so the writer waits for credit as cat drains.
    let writer = {
        let control = control.clone();
        tokio::spawn(async move {
            let block = vec![b'x'; 1024 * 1024];
            for _ in 0..10 {
                control.write_stdin(&block).await.unwrap();
            }
            control.write_stdin(b"\nbye\n").await.unwrap();
            control.close_stdin().await.unwrap();
        })
    };
    let (out, _, st) = finish(&mut exec).await;
    writer.await.unwrap();
    assert_eq!(st.exit_code, Some(0));
    assert_eq!(out.len(), 10 * 1024 * 1024 + 5);
    assert!(out.ends_with("\nbye\n"));
    // Once the command has ended, writing fails and the rest does nothing.
    let e = control.write_stdin(b"late").await.unwrap_err();
    assert!(matches!(e, AgentError::Closed(_)), "{e:?}");
    control.close_stdin().await.unwrap();
    control.signal(libc::SIGTERM).await.unwrap();
}

fn fs(user: Option<&str>, op: FsOp) -> FsRequest {
    FsRequest {
        user: user.map(str::to_string),
        op,
    }
}

#[tokio::test]
async fn file_system_operations_answer_as_envd_does() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, client) = connect(dir.path()).await;
    let root = dir.path().join("work");
    let r = root.display().to_string();

    // make_dir creates parents, as the user; a second time: already exists.
    let made = client
        .fs(&fs(
            Some("nobody"),
            FsOp::MakeDir {
                path: format!("{r}/a/b"),
            },
        ))
        .await
        .unwrap()
        .entry
        .unwrap();
    assert_eq!(
        (made.kind, made.owner.as_str()),
        (EntryKind::Directory, "nobody")
    );
    assert_eq!(
        (made.mode, made.permissions.as_str()),
        (0o755, "drwxr-xr-x")
    );
    assert_eq!(std::fs::metadata(&root).unwrap().uid(), 65534);
    let e = remote(
        client
            .fs(&fs(None, FsOp::MakeDir { path: r.clone() }))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::AlreadyExists, Some("path"))
    );

    std::fs::write(root.join("a/f.txt"), b"twelve bytes").unwrap();
    std::fs::write(dir.path().join("target"), b"").unwrap();
    let target = dir.path().join("target").display().to_string();
    std::os::unix::fs::symlink(&target, root.join("link")).unwrap();
    let stat = |p: String| fs(None, FsOp::Stat { path: p });
    let f = client
        .fs(&stat(format!("{r}/a/f.txt")))
        .await
        .unwrap()
        .entry
        .unwrap();
    assert_eq!(
        (f.name.as_str(), f.kind, f.size),
        ("f.txt", EntryKind::File, 12)
    );
    assert_eq!((f.owner.as_str(), f.group.as_str()), ("root", "root"));
    let mtime = std::fs::metadata(root.join("a/f.txt")).unwrap();
    assert_eq!(
        f.modified_unix_ns,
        i128::from(mtime.mtime()) * 1_000_000_000 + i128::from(mtime.mtime_nsec())
    );
    let l = client
        .fs(&stat(format!("{r}/link")))
        .await
        .unwrap()
        .entry
        .unwrap();
    assert_eq!(l.kind, EntryKind::Symlink);
    assert_eq!(l.symlink_target.as_deref(), Some(target.as_str()));
    let e = remote(client.fs(&stat(format!("{r}/nope"))).await.unwrap_err());
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::NotFound, Some("path"))
    );
    // A relative path is the user's home's: root's is /root, so ../ leads out.
    let rel = format!("..{r}/a/f.txt");
    let f2 = client
        .fs(&fs(Some("root"), FsOp::Stat { path: rel }))
        .await
        .unwrap()
        .entry
        .unwrap();
    assert_eq!(f2.path, format!("{r}/a/f.txt"));
    let e = remote(
        client
            .fs(&fs(None, FsOp::Stat { path: "rel".into() }))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::BadRequest, Some("path"))
    );

    // Listing: depth 1, then 2; of a file: refused; of nothing: not found.
    let list = |depth| {
        fs(
            None,
            FsOp::List {
                path: r.clone(),
                depth,
            },
        )
    };
    let names = |es: Vec<agentenv_proto::EntryInfo>| {
        es.into_iter()
            .map(|e| e.path[r.len() + 1..].to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(client.fs(&list(1)).await.unwrap().entries),
        ["a", "link"]
    );
    assert_eq!(
        names(client.fs(&list(2)).await.unwrap().entries),
        ["a", "link", "a/b", "a/f.txt"]
    );
    let e = remote(
        client
            .fs(&fs(
                None,
                FsOp::List {
                    path: format!("{r}/a/f.txt"),
                    depth: 1,
                },
            ))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, ErrorCode::BadRequest);

    // A listing bigger than a frame comes in several, all of it.
    for i in 0..3000 {
        std::fs::write(root.join(format!("a/b/file-with-a-long-name-{i:05}")), b"").unwrap();
    }
    let big = client
        .fs(&fs(
            None,
            FsOp::List {
                path: format!("{r}/a/b"),
                depth: 1,
            },
        ))
        .await
        .unwrap();
    assert_eq!(big.entries.len(), 3000);
    assert!(big.entries[2999].name.ends_with("02999"));

    // Move: into a new directory; a missing source is not found.
    let moved = client
        .fs(&fs(
            None,
            FsOp::Move {
                source: format!("{r}/a/f.txt"),
                destination: format!("{r}/c/d/g.txt"),
            },
        ))
        .await
        .unwrap()
        .entry
        .unwrap();
    assert_eq!((moved.path, moved.size), (format!("{r}/c/d/g.txt"), 12));
    let e = remote(
        client
            .fs(&fs(
                None,
                FsOp::Move {
                    source: format!("{r}/a/f.txt"),
                    destination: format!("{r}/x"),
                },
            ))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::NotFound, Some("source"))
    );

    // Remove: recursive; a missing path succeeds.
    let rm = |p: String| fs(None, FsOp::Remove { path: p });
    client.fs(&rm(format!("{r}/a"))).await.unwrap();
    assert!(!root.join("a").exists());
    client.fs(&rm(format!("{r}/a"))).await.unwrap();
    // A symlink goes, its target stays.
    client.fs(&rm(format!("{r}/link"))).await.unwrap();
    assert!(root.join("link").symlink_metadata().is_err());
    assert!(Path::new(&target).exists());
}

#[tokio::test]
async fn a_watch_reports_changes_by_relative_name_until_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, client) = connect(dir.path()).await;
    let root = dir.path().join("watched");
    std::fs::create_dir(&root).unwrap();
    let mut watch = watch_of(&client, &root, true).await;
    std::fs::write(root.join("a.txt"), b"x").unwrap();
    let e = next(&mut watch).await;
    assert_eq!((e.name.as_str(), e.op), ("a.txt", FsEventOp::Create));
    assert_eq!(next(&mut watch).await.op, FsEventOp::Write);
    std::fs::create_dir(root.join("sub")).unwrap();
    let e = next(&mut watch).await;
    assert_eq!((e.name.as_str(), e.op), ("sub", FsEventOp::Create));
    // The new directory is watched too.
    std::fs::write(root.join("sub/b.txt"), b"").unwrap();
    let e = next(&mut watch).await;
    assert_eq!((e.name.as_str(), e.op), ("sub/b.txt", FsEventOp::Create));
    std::fs::rename(root.join("a.txt"), root.join("c.txt")).unwrap();
    let e = next(&mut watch).await;
    assert_eq!((e.name.as_str(), e.op), ("a.txt", FsEventOp::Rename));
    let e = next(&mut watch).await;
    assert_eq!((e.name.as_str(), e.op), ("c.txt", FsEventOp::Create));
    std::fs::set_permissions(
        root.join("c.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let e = next(&mut watch).await;
    assert_eq!((e.name.as_str(), e.op), ("c.txt", FsEventOp::Chmod));
    std::fs::remove_file(root.join("c.txt")).unwrap();
    let e = next(&mut watch).await;
    assert_eq!((e.name.as_str(), e.op), ("c.txt", FsEventOp::Remove));
    // A tree made faster than the agent adds its watches: still every part.
    std::fs::create_dir_all(root.join("deep/er/est")).unwrap();
    std::fs::write(root.join("deep/er/est/f"), b"").unwrap();
    let mut created = std::collections::BTreeSet::new();
    while !created.contains("deep/er/est/f") {
        let e = next(&mut watch).await;
        if e.op == FsEventOp::Create {
            created.insert(e.name);
        }
    }
    for d in ["deep", "deep/er", "deep/er/est"] {
        assert!(created.contains(d), "{created:?}");
    }
    drop(watch);

    // The watched directory going away ends the watch with an error.
    let mut watch = watch_of(&client, &root.join("sub"), false).await;
    std::fs::remove_dir_all(root.join("sub")).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Err(e) = watch.next().await {
                return e;
            }
        }
    })
    .await
    .expect("the watch ended");
    assert_eq!(remote(err).code, ErrorCode::NotFound);

    // A directory reached through a symlink is watched too.
    std::os::unix::fs::symlink(&root, dir.path().join("alias")).unwrap();
    let mut watch = watch_of(&client, &dir.path().join("alias"), false).await;
    std::fs::write(root.join("via-alias"), b"").unwrap();
    assert_eq!(next(&mut watch).await.name, "via-alias");
    drop(watch);

    // Missing or not a directory: refused at once.
    let e = remote(
        client
            .watch(&WatchRequest {
                path: root.join("nope").display().to_string(),
                recursive: false,
                user: None,
            })
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::NotFound, Some("path"))
    );
    // The connection is still fine.
    client.ping().await.unwrap();
}

async fn watch_of(client: &AgentClient, dir: &Path, recursive: bool) -> Watch {
    client
        .watch(&WatchRequest {
            path: dir.display().to_string(),
            recursive,
            user: None,
        })
        .await
        .unwrap()
}

async fn next(w: &mut Watch) -> agentenv_proto::FsEvent {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("an event in time")
        .expect("an event")
}

/// The agent's resident set, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn an_unread_watch_does_not_grow_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, client) = connect(dir.path()).await;
    let root = dir.path().join("busy");
    std::fs::create_dir(&root).unwrap();
    let mut watch = watch_of(&client, &root, false).await;
    let before = rss_kib(agent.pid());
    // Far more events than the window holds (each ~250 bytes of JSON: 4 MiB
    // is ~16k of them) and than the kernel queues (max_queued_events,
    // 16384 by default), all distinct (the kernel merges repeats), and
    // nobody reads them.
    let total = 40_000;
    let long = "n".repeat(200);
    for i in 0..total {
        std::fs::File::create(root.join(format!("{long}-{i:05}"))).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = rss_kib(agent.pid()).saturating_sub(before);
    assert!(grown < 16 * 1024, "the agent grew {grown} KiB");
    // Reading now: the events within the window, those the kernel kept,
    // then an error saying the rest were lost.
    let mut events = 0u64;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
            Ok(Ok(e)) => {
                assert!(e.name.starts_with(&long), "{e:?}");
                events += 1;
            }
            Ok(Err(e)) => break Some(e),
            Err(_) => break None,
        }
    };
    let queued: u64 = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if queued + 20_000 < total {
        let m = remote(end.expect("the watch ended with an error"));
        assert!(m.error.contains("events were lost"), "{m:?}");
        assert!(events > 10_000 && events < total, "{events} events");
    } else {
        // A kernel that queues it all: every event came.
        assert_eq!(events, total, "{end:?}");
    }
}

#[tokio::test]
async fn transfers_as_a_user_resolve_from_home_and_belong_to_the_user() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, client) = connect(dir.path()).await;
    let path = dir.path().join("up/deeper/file.txt");
    let mut up = client
        .put_file(&PutFile {
            path: path.display().to_string(),
            mode: Some(0o640),
            make_parents: true,
            user: Some("nobody".into()),
        })
        .await
        .unwrap();
    up.write(b"as nobody").await.unwrap();
    assert_eq!(up.finish().await.unwrap().bytes, 9);
    for p in [
        path.as_path(),
        path.parent().unwrap(),
        &dir.path().join("up"),
    ] {
        let m = std::fs::metadata(p).unwrap();
        assert_eq!(m.uid(), 65534, "{}", p.display());
    }
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);
    // The temporary directory itself was there already: still root's.
    assert_eq!(std::fs::metadata(dir.path()).unwrap().uid(), 0);

    // A relative path is the user's home's (root: /root).
    let mut dl = client
        .get_file(&GetFile {
            path: format!("..{}", path.display()),
            user: Some("root".into()),
        })
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(c) = dl.next_chunk().await.unwrap() {
        got.extend(c);
    }
    assert_eq!(got, b"as nobody");

    let e = remote(
        client
            .get_file(&GetFile {
                path: "relative".into(),
                user: None,
            })
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(e.field.as_deref(), Some("path"));
    let e = remote(
        client
            .get_file(&GetFile {
                path: path.display().to_string(),
                user: Some("no-such-user-here".into()),
            })
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::NotFound, Some("user"))
    );
}

/// The agent's threads.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

#[tokio::test]
async fn a_closed_connection_leaves_no_watch_terminal_or_command_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, client) = connect(dir.path()).await;
    let idle = threads(agent.pid());
    let root = dir.path().join("w");
    std::fs::create_dir(&root).unwrap();

    // At most 32 watches on one connection.
    let mut watches = Vec::new();
    for _ in 0..32 {
        watches.push(watch_of(&client, &root, true).await);
    }
    let e = remote(
        client
            .watch(&WatchRequest {
                path: root.display().to_string(),
                recursive: false,
                user: None,
            })
            .await
            .unwrap_err(),
    );
    assert!(e.error.contains("32 watches"), "{e:?}");
    // Dropping one makes room again.
    watches.pop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    watches.push(watch_of(&client, &root, true).await);

    // A shell on a terminal and a cat waiting for stdin, as a user.
    let mut shell = req(&["sh", "-c", "echo $$; exec sleep 300"]);
    shell.pty = Some(PtySize { cols: 80, rows: 24 });
    shell.user = Some("nobody".into());
    let mut term = client.exec(&shell, None).await.unwrap();
    let mut seen = String::new();
    until(&mut term, &mut seen, "\n").await;
    let mut cat = req(&["cat"]);
    cat.stdin = true;
    let cat = client.exec(&cat, None).await.unwrap();
    let pids = [term.pid(), cat.pid()];
    // Writing to a command started without stdin is refused at once.
    let no_stdin = client.exec(&sh("sleep 300"), None).await.unwrap();
    let e = remote(no_stdin.control().write_stdin(b"x").await.unwrap_err());
    assert_eq!(e.field.as_deref(), Some("stdin"));
    assert!(threads(agent.pid()) > idle);

    // The host goes away: the agent ends all of it.
    client.shutdown();
    drop((watches, term, cat, no_stdin, client));
    let t = Instant::now();
    while threads(agent.pid()) > idle
        || pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} threads (idle: {idle}), processes {:?}",
            threads(agent.pid()),
            pids.iter()
                .filter(|p| Path::new(&format!("/proc/{p}")).exists())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
