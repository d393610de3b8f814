//! The real `agentenv-guest` binary, in test mode (`--listen-unix`), driven by
//! a small synchronous client over `proto::read_frame`/`write_frame`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentenv_proto::{
    self as proto, Done, ErrorCode, ErrorMsg, ExecRequest, ExitStatus, FileInfo, Frame, GetFile,
    Hello, HelloOk, Identity, IdentityNet, Kind, PutFile, Started, DATA_CHUNK, INITIAL_WINDOW,
    PROTOCOL_VERSION,
};

const NONCE: &str = "0123456789abcdef";

/// The agent, listening on a Unix socket in its own temporary directory.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Agent {
    fn start() -> Agent {
        Agent::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_agentenv-guest"))
            .arg("--listen-unix")
            .arg(&sock)
            .args(extra)
            .env("AGENTENV_TEST_LEAK", "leaked")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(
            line.starts_with("agentenv-guest 0.1.0: listening on unix socket"),
            "{line}"
        );
        std::thread::spawn(move || {
            for l in stderr.lines().map_while(Result::ok) {
                eprintln!("agent: {l}");
            }
        });
        Agent { child, dir, sock }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn raw(&self) -> Client {
        let w = UnixStream::connect(&self.sock).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client {
            r: BufReader::new(w.try_clone().unwrap()),
            w,
            next: 0,
            stash: HashMap::new(),
        }
    }

    fn client(&self) -> Client {
        let mut c = self.raw();
        c.hello();
        c
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
    next: u32,
    /// Frames read while waiting for another stream.
    stash: HashMap<u32, VecDeque<Frame>>,
}

#[derive(Debug)]
struct ExecOut {
    pid: u32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: ExitStatus,
}

fn exec_req(cmd: &[&str]) -> ExecRequest {
    ExecRequest {
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn sh(script: &str) -> ExecRequest {
    exec_req(&["sh", "-c", script])
}

impl Client {
    fn stream(&mut self) -> u32 {
        self.next += 1;
        self.next
    }

    fn send(&mut self, f: &Frame) {
        proto::write_frame(&mut self.w, f).unwrap();
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
    }

    fn window(&mut self, stream: u32, n: usize) {
        self.send(&Frame::window(Kind::Window, stream, n as u32));
    }

    /// The next frame on the connection; None at its end.
    fn read(&mut self) -> Option<Frame> {
        match proto::read_frame(&mut self.r) {
            Ok(f) => f,
            Err(proto::ProtoError::Io(e)) if e.kind() == ErrorKind::ConnectionReset => None,
            Err(e) => panic!("reading a frame: {e}"),
        }
    }

    /// The next frame on `stream`.
    fn recv(&mut self, stream: u32) -> Frame {
        if let Some(f) = self.stash.get_mut(&stream).and_then(VecDeque::pop_front) {
            return f;
        }
        loop {
            let f = self.read().expect("the agent closed the connection");
            if f.stream == stream {
                return f;
            }
            self.stash.entry(f.stream).or_default().push_back(f);
        }
    }

    /// Reads until nothing arrives for `quiet`; returns what came.
    fn drain(&mut self, quiet: Duration) -> Vec<Frame> {
        let mut got: Vec<Frame> = self.stash.drain().flat_map(|(_, v)| v).collect();
        self.w.set_read_timeout(Some(quiet)).unwrap();
        loop {
            match proto::read_frame(&mut self.r) {
                Ok(Some(f)) => got.push(f),
                Ok(None) => break,
                Err(proto::ProtoError::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    break
                }
                Err(e) => panic!("reading a frame: {e}"),
            }
        }
        self.w
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        got
    }

    fn hello(&mut self) -> HelloOk {
        self.send(&Frame::json(
            Kind::Hello,
            0,
            &Hello {
                version: PROTOCOL_VERSION,
                nonce: NONCE.into(),
            },
        ));
        let f = self.recv(0);
        assert_eq!(f.kind, Kind::HelloOk, "{f:?}");
        assert_eq!(&f.payload[..16], NONCE.as_bytes());
        serde_json::from_slice(&f.payload[16..]).unwrap()
    }

    fn request<T: serde::Serialize>(&mut self, kind: Kind, msg: &T) -> u32 {
        let s = self.stream();
        self.send(&Frame::json(kind, s, msg));
        s
    }

    /// Sends a request with an empty payload (`Ping`, `Freeze`, `Thaw`).
    fn bare(&mut self, kind: Kind) -> u32 {
        let s = self.stream();
        self.send(&Frame {
            kind,
            stream: s,
            payload: vec![],
        });
        s
    }

    fn expect_error(&mut self, stream: u32) -> ErrorMsg {
        let f = self.recv(stream);
        assert_eq!(f.kind, Kind::Error, "{f:?}");
        f.parse().unwrap()
    }

    /// Collects a command's frames, granting credit for all output.
    fn finish_exec(&mut self, stream: u32) -> Result<ExecOut, ErrorMsg> {
        let f = self.recv(stream);
        let pid = match f.kind {
            Kind::Started => f.parse::<Started>().unwrap().pid,
            Kind::Error => return Err(f.parse().unwrap()),
            k => panic!("unexpected {k:?}"),
        };
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            let f = self.recv(stream);
            match f.kind {
                Kind::Stdout => stdout.extend_from_slice(&f.payload),
                Kind::Stderr => stderr.extend_from_slice(&f.payload),
                Kind::Exit => {
                    return Ok(ExecOut {
                        pid,
                        stdout,
                        stderr,
                        exit: f.parse().unwrap(),
                    })
                }
                Kind::GuestWindow => continue,
                k => panic!("unexpected {k:?}"),
            }
            assert!(f.payload.len() <= DATA_CHUNK);
            self.window(stream, f.payload.len());
        }
    }

    fn exec(&mut self, req: &ExecRequest) -> Result<ExecOut, ErrorMsg> {
        let s = self.request(Kind::Exec, req);
        self.finish_exec(s)
    }

    fn run(&mut self, req: &ExecRequest) -> ExecOut {
        self.exec(req).unwrap()
    }

    /// Uploads `data`, sending only as much as the agent's window allows.
    fn put(&mut self, req: &PutFile, data: &[u8]) -> Result<Done, ErrorMsg> {
        let s = self.request(Kind::PutFile, req);
        let mut credit = INITIAL_WINDOW as usize;
        let mut rest = data;
        while !rest.is_empty() {
            if credit == 0 {
                let f = self.recv(s);
                match f.kind {
                    Kind::GuestWindow => credit += f.window_bytes().unwrap() as usize,
                    Kind::Error => return Err(f.parse().unwrap()),
                    k => panic!("unexpected {k:?}"),
                }
                continue;
            }
            let n = rest.len().min(credit).min(DATA_CHUNK);
            self.send(&Frame {
                kind: Kind::Data,
                stream: s,
                payload: rest[..n].to_vec(),
            });
            credit -= n;
            rest = &rest[n..];
        }
        self.send(&Frame {
            kind: Kind::Eof,
            stream: s,
            payload: vec![],
        });
        loop {
            let f = self.recv(s);
            match f.kind {
                Kind::GuestWindow => {}
                Kind::Done => return Ok(f.parse().unwrap()),
                Kind::Error => return Err(f.parse().unwrap()),
                k => panic!("unexpected {k:?}"),
            }
        }
    }

    fn get(&mut self, path: &str) -> Result<(FileInfo, Vec<u8>, Done), ErrorMsg> {
        let s = self.request(
            Kind::GetFile,
            &GetFile {
                path: path.into(),
                user: None,
            },
        );
        let f = self.recv(s);
        let info: FileInfo = match f.kind {
            Kind::FileInfo => f.parse().unwrap(),
            Kind::Error => return Err(f.parse().unwrap()),
            k => panic!("unexpected {k:?}"),
        };
        let mut data = Vec::with_capacity(info.size as usize);
        loop {
            let f = self.recv(s);
            match f.kind {
                Kind::FileData => {
                    data.extend_from_slice(&f.payload);
                    self.window(s, f.payload.len());
                }
                Kind::Done => return Ok((info, data, f.parse().unwrap())),
                k => panic!("unexpected {k:?}"),
            }
        }
    }
}

fn put_req(path: &Path) -> PutFile {
    PutFile {
        path: path.to_str().unwrap().into(),
        mode: None,
        make_parents: false,
        user: None,
    }
}

/// Deterministic pseudo-random bytes (xorshift64).
fn pattern(len: usize, mut x: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a over 8-byte words: a cheap checksum.
fn checksum(b: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x100_0000_01b3);
    }
    for &c in words.remainder() {
        h = (h ^ u64::from(c)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// True once `pid` no longer exists (the agent reaped it), within `limit`.
fn gone_within(pid: u32, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        // SAFETY: signal 0 only checks that the process exists.
        if unsafe { libc::kill(pid as i32, 0) } != 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn kill_group(pid: u32) {
    // SAFETY: killpg has no memory effects; pid is a test command's own group.
    unsafe { libc::killpg(pid as i32, libc::SIGKILL) };
}

#[test]
fn handshake_echoes_the_nonce_and_names_the_agent() {
    let agent = Agent::start();
    let mut c = agent.raw();
    let ok = c.hello();
    assert_eq!(ok.version, PROTOCOL_VERSION);
    assert_eq!(ok.agent, "agentenv-guest 0.1.0");
    assert_eq!(ok.pid, agent.child.id());
    // A second Hello starts over and is answered the same way.
    assert_eq!(c.hello(), ok);
}

#[test]
fn wrong_version_is_a_protocol_error_naming_both_versions() {
    let agent = Agent::start();
    let mut c = agent.raw();
    c.send(&Frame::json(
        Kind::Hello,
        0,
        &Hello {
            version: 99,
            nonce: NONCE.into(),
        },
    ));
    let e = c.expect_error(0);
    assert_eq!(e.code, ErrorCode::Protocol);
    assert!(
        e.error.contains("99") && e.error.contains('1'),
        "{}",
        e.error
    );
    assert_eq!(c.read(), None, "the connection is closed");
}

#[test]
fn requests_before_hello_are_refused_on_their_stream() {
    let agent = Agent::start();
    let mut c = agent.raw();
    let s = c.request(Kind::Exec, &exec_req(&["true"]));
    let e = c.expect_error(s);
    assert_eq!(
        (e.code, e.error.as_str()),
        (ErrorCode::Protocol, "no hello yet")
    );
    c.hello();
    let s = c.bare(Kind::Ping);
    assert_eq!(c.recv(s).kind, Kind::Done);
}

#[test]
fn exit_codes_signals_and_output_streams() {
    let agent = Agent::start();
    let mut c = agent.client();
    let ok = c.run(&exec_req(&["true"]));
    assert_eq!((ok.exit.exit_code, ok.exit.signal), (Some(0), None));
    assert!(ok.pid > 0);
    let three = c.run(&sh("exit 3"));
    assert_eq!(three.exit.exit_code, Some(3));
    let killed = c.run(&sh("kill -9 $$"));
    assert_eq!((killed.exit.exit_code, killed.exit.signal), (None, Some(9)));
    assert!(!killed.exit.killed && !killed.exit.timed_out);
    let out = c.run(&sh("echo out; echo err >&2; echo more"));
    assert_eq!(out.stdout, b"out\nmore\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!((out.exit.stdout_bytes, out.exit.stderr_bytes), (9, 4));
}

#[test]
fn commands_get_a_clean_environment_and_their_cwd() {
    let agent = Agent::start();
    let mut c = agent.client();
    let mut req = sh(r#"echo "$FOO|$HOME|$LANG|${AGENTENV_TEST_LEAK:-unset}|$PATH"; pwd"#);
    req.env = BTreeMap::from([("FOO".to_string(), "bar baz".to_string())]);
    req.cwd = Some(agent.dir.path().to_str().unwrap().into());
    let out = c.run(&req);
    let text = String::from_utf8(out.stdout).unwrap();
    let dir = fs::canonicalize(agent.dir.path()).unwrap();
    assert_eq!(
        text,
        format!(
            "bar baz|/root|C.UTF-8|unset|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n{}\n",
            dir.display()
        )
    );
    let root = c.run(&exec_req(&["pwd"]));
    assert_eq!(root.stdout, b"/\n");
}

#[test]
fn stdin_round_trips_within_the_agents_window() {
    let agent = Agent::start();
    let mut c = agent.client();
    let data = pattern(3 * 1024 * 1024 + 17, 7);
    let mut req = exec_req(&["cat"]);
    req.stdin = true;
    let s = c.request(Kind::Exec, &req);
    assert_eq!(c.recv(s).kind, Kind::Started);
    let (mut credit, mut sent, mut stdout) = (INITIAL_WINDOW as usize, 0, Vec::new());
    let mut eof_sent = false;
    let exit: ExitStatus = loop {
        if sent < data.len() && credit > 0 {
            let n = (data.len() - sent).min(credit).min(DATA_CHUNK);
            c.send(&Frame {
                kind: Kind::Data,
                stream: s,
                payload: data[sent..sent + n].to_vec(),
            });
            sent += n;
            credit -= n;
            continue;
        }
        if sent == data.len() && !eof_sent {
            c.send(&Frame {
                kind: Kind::Eof,
                stream: s,
                payload: vec![],
            });
            eof_sent = true;
        }
        let f = c.recv(s);
        match f.kind {
            Kind::GuestWindow => credit += f.window_bytes().unwrap() as usize,
            Kind::Stdout => {
                stdout.extend_from_slice(&f.payload);
                c.window(s, f.payload.len());
            }
            Kind::Exit => break f.parse().unwrap(),
            k => panic!("unexpected {k:?}"),
        }
    };
    assert_eq!(exit.exit_code, Some(0));
    assert_eq!(stdout.len(), data.len());
    assert_eq!(checksum(&stdout), checksum(&data));
}

#[test]
fn output_past_max_output_is_counted_and_dropped() {
    let agent = Agent::start();
    let mut c = agent.client();
    let mut req = sh("head -c 10485760 /dev/zero; echo tail >&2");
    req.max_output = Some(1024 * 1024);
    let out = c.run(&req);
    assert_eq!(out.stdout.len(), 1024 * 1024);
    assert_eq!(out.exit.stdout_bytes, 10 * 1024 * 1024);
    assert!(out.exit.stdout_truncated);
    assert_eq!(out.stderr, b"tail\n");
    assert!(!out.exit.stderr_truncated);
    assert_eq!(out.exit.exit_code, Some(0));
}

#[test]
fn a_timeout_kills_the_process_group() {
    let agent = Agent::start();
    let mut c = agent.client();
    let mut req = sh("sleep 30 & sleep 30");
    req.timeout_ms = Some(300);
    let t = Instant::now();
    let out = c.run(&req);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(out.exit.timed_out && !out.exit.killed);
    assert_eq!(out.exit.signal, Some(9));
    assert!(out.exit.duration_ms >= 300);
}

#[test]
fn kill_ends_a_command() {
    let agent = Agent::start();
    let mut c = agent.client();
    let s = c.request(Kind::Exec, &exec_req(&["sleep", "30"]));
    let f = c.recv(s);
    assert_eq!(f.kind, Kind::Started);
    let t = Instant::now();
    c.send(&Frame {
        kind: Kind::Kill,
        stream: s,
        payload: vec![],
    });
    let f = c.recv(s);
    assert_eq!(f.kind, Kind::Exit);
    let exit: ExitStatus = f.parse().unwrap();
    assert!(exit.killed && !exit.timed_out);
    assert_eq!(exit.signal, Some(9));
    assert!(t.elapsed() < Duration::from_secs(3));
    // Frames for a stream that ended are ignored.
    c.send(&Frame::window(Kind::Window, s, 10));
    c.send(&Frame {
        kind: Kind::Kill,
        stream: s,
        payload: vec![],
    });
    let p = c.bare(Kind::Ping);
    assert_eq!(c.recv(p).kind, Kind::Done);
}

#[test]
fn a_background_process_holding_the_pipes_does_not_hold_the_exit() {
    let agent = Agent::start();
    let mut c = agent.client();
    let t = Instant::now();
    let out = c.run(&sh("sleep 20 & echo hi"));
    kill_group(out.pid);
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(out.exit.exit_code, Some(0));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[test]
fn bad_requests_name_the_field() {
    let agent = Agent::start();
    let mut c = agent.client();
    let check = |c: &mut Client, req: ExecRequest, code: ErrorCode, field: &str| {
        let e = c.exec(&req).unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (code, Some(field)),
            "{}",
            e.error
        );
        e
    };
    let e = check(
        &mut c,
        exec_req(&["definitely-not-a-program-xyz"]),
        ErrorCode::NotFound,
        "cmd",
    );
    assert!(
        e.error.contains("definitely-not-a-program-xyz"),
        "{}",
        e.error
    );
    check(
        &mut c,
        exec_req(&["/no/such/program"]),
        ErrorCode::NotFound,
        "cmd",
    );
    check(&mut c, exec_req(&[]), ErrorCode::BadRequest, "cmd");
    let mut req = exec_req(&["true"]);
    req.cwd = Some("/no/such/dir".into());
    let e = check(&mut c, req.clone(), ErrorCode::NotFound, "cwd");
    assert!(e.error.contains("/no/such/dir"), "{}", e.error);
    fs::write(agent.path("file"), "x").unwrap();
    req.cwd = Some(agent.path("file").to_str().unwrap().into());
    check(&mut c, req.clone(), ErrorCode::BadRequest, "cwd");
    req.cwd = Some("relative".into());
    check(&mut c, req, ErrorCode::BadRequest, "cwd");
    // A payload that is not an ExecRequest.
    let s = c.stream();
    c.send(&Frame {
        kind: Kind::Exec,
        stream: s,
        payload: b"{\"cmd\": 5}".to_vec(),
    });
    assert_eq!(c.expect_error(s).code, ErrorCode::BadRequest);
}

#[test]
fn a_live_stream_id_cannot_be_reused() {
    let agent = Agent::start();
    let mut c = agent.client();
    let s = c.request(Kind::Exec, &exec_req(&["sleep", "30"]));
    assert_eq!(c.recv(s).kind, Kind::Started);
    c.send(&Frame::json(Kind::Exec, s, &exec_req(&["true"])));
    let e = c.expect_error(s);
    assert_eq!(e.code, ErrorCode::BadRequest);
    c.send(&Frame {
        kind: Kind::Kill,
        stream: s,
        payload: vec![],
    });
    assert_eq!(c.recv(s).kind, Kind::Exit);
}

/// Reads stream `s` (a `head` frame, then `data` frames) until the initial
/// window has come without any credit (each read waits up to 20 s), then
/// checks that nothing more comes while it is spent: no data, no end.
fn just_the_initial_window(c: &mut Client, s: u32, head: Kind, data: Kind) -> usize {
    let mut got = 0usize;
    while got < INITIAL_WINDOW as usize {
        let f = c.recv(s);
        match f.kind {
            k if k == head => {}
            k if k == data => got += f.payload.len(),
            k => panic!("unexpected {k:?} after {got} bytes"),
        }
    }
    assert_eq!(got, INITIAL_WINDOW as usize, "exactly the initial window");
    let more = c.drain(Duration::from_millis(300));
    assert!(
        more.is_empty(),
        "past the window: {:?}",
        more.iter()
            .map(|f| (f.kind, f.payload.len()))
            .collect::<Vec<_>>()
    );
    got
}

#[test]
fn output_stops_at_the_window_until_the_host_grants_more() {
    let agent = Agent::start();
    let mut c = agent.client();
    let total = 2 * INITIAL_WINDOW as usize + 12_345;
    let s = c.request(Kind::Exec, &sh(&format!("head -c {total} /dev/zero")));
    let mut got = just_the_initial_window(&mut c, s, Kind::Started, Kind::Stdout);
    let mut exit = None;
    c.window(s, total);
    while exit.is_none() {
        let f = c.recv(s);
        match f.kind {
            Kind::Stdout => got += f.payload.len(),
            Kind::Exit => exit = Some(f.parse::<ExitStatus>().unwrap()),
            k => panic!("unexpected {k:?}"),
        }
    }
    assert_eq!(got, total);
    assert_eq!(exit.unwrap().stdout_bytes, total as u64);
}

#[test]
fn malformed_frames_close_the_connection_but_not_the_agent() {
    let agent = Agent::start();
    let bad_frames: [&[u8]; 3] = [
        &[0, 0, 0, 2, 0x02, 0, 0, 0, 1],
        &[0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 1],
        &[0, 0, 0, 5, 0x7f, 0, 0, 0, 1],
    ];
    for (i, bytes) in bad_frames.iter().enumerate() {
        let mut c = if i == 0 { agent.raw() } else { agent.client() };
        c.send_raw(bytes);
        let e = c.expect_error(0);
        assert_eq!(e.code, ErrorCode::Protocol, "{}", e.error);
        assert_eq!(c.read(), None, "the connection is closed");
    }
    // A guest → host kind from the host, and a non-Hello frame on stream 0.
    for f in [
        Frame::json(Kind::Exit, 1, &ExitStatus::default()),
        Frame::json(Kind::Exec, 0, &exec_req(&["true"])),
    ] {
        let mut c = agent.client();
        c.send(&f);
        assert_eq!(c.expect_error(0).code, ErrorCode::Protocol);
        assert_eq!(c.read(), None);
    }
    let mut c = agent.client();
    assert_eq!(c.run(&exec_req(&["true"])).exit.exit_code, Some(0));
}

#[test]
fn data_beyond_the_window_is_a_protocol_error() {
    let agent = Agent::start();
    let mut c = agent.client();
    let mut req = exec_req(&["sleep", "30"]);
    req.stdin = true;
    let s = c.request(Kind::Exec, &req);
    let pid = c.recv(s).parse::<Started>().unwrap().pid;
    let chunk = proto::encode(Kind::Data, s, &[0; DATA_CHUNK]);
    for _ in 0..(2 * INITIAL_WINDOW as usize / DATA_CHUNK) {
        // The agent may close the connection before all of it is sent.
        if c.w.write_all(&chunk).is_err() {
            break;
        }
    }
    let e = c.expect_error(0);
    assert_eq!(e.code, ErrorCode::Protocol);
    assert!(e.error.contains("window"), "{}", e.error);
    assert!(
        gone_within(pid, Duration::from_secs(3)),
        "the command is killed"
    );
}

#[test]
fn many_sequential_and_concurrent_commands_on_one_connection() {
    let agent = Agent::start();
    let mut c = agent.client();
    for _ in 0..100 {
        assert_eq!(c.run(&exec_req(&["true"])).exit.exit_code, Some(0));
    }
    let t = Instant::now();
    let streams: Vec<(u32, usize)> = (0..20)
        .map(|i| {
            let mut req = sh("sleep 0.5; echo $N; echo e$N >&2");
            req.env.insert("N".into(), i.to_string());
            (c.request(Kind::Exec, &req), i)
        })
        .collect();
    for (s, i) in streams {
        let out = c.finish_exec(s).unwrap();
        assert_eq!(out.stdout, format!("{i}\n").as_bytes());
        assert_eq!(out.stderr, format!("e{i}\n").as_bytes());
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn the_end_of_a_session_kills_its_commands() {
    let agent = Agent::start();
    let mut c = agent.client();
    let s = c.request(Kind::Exec, &sh("sleep 30 & sleep 30"));
    let pid = c.recv(s).parse::<Started>().unwrap().pid;
    drop(c);
    assert!(
        gone_within(pid, Duration::from_secs(3)),
        "killed and reaped"
    );
    // A Hello mid-session does the same.
    let mut c = agent.client();
    let s = c.request(Kind::Exec, &exec_req(&["sleep", "30"]));
    let pid = c.recv(s).parse::<Started>().unwrap().pid;
    c.hello();
    assert!(gone_within(pid, Duration::from_secs(3)));
    assert_eq!(c.run(&exec_req(&["true"])).exit.exit_code, Some(0));
}

#[test]
fn a_64_mib_file_round_trips() {
    let agent = Agent::start();
    let mut c = agent.client();
    let data = pattern(64 * 1024 * 1024 + 3, 42);
    let path = agent.path("big.bin");
    let done = c.put(&put_req(&path), &data).unwrap();
    assert_eq!(done.bytes, data.len() as u64);
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), data.len() as u64);
    assert_eq!(meta.permissions().mode() & 0o7777, 0o644);
    let (info, back, done) = c.get(path.to_str().unwrap()).unwrap();
    assert_eq!((info.size, info.mode), (data.len() as u64, 0o644));
    assert_eq!(done.bytes, data.len() as u64);
    assert_eq!(checksum(&back), checksum(&data));
    assert_eq!(checksum(&fs::read(&path).unwrap()), checksum(&data));
    let names: Vec<_> = fs::read_dir(agent.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("agentenv-upload")),
        "{names:?}"
    );
}

#[test]
fn uploads_replace_files_with_the_given_mode_and_can_make_parents() {
    let agent = Agent::start();
    let mut c = agent.client();
    let nested = agent.path("a/b/c.txt");
    let e = c.put(&put_req(&nested), b"x").unwrap_err();
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::NotFound, Some("path"))
    );
    assert!(e.error.contains("a/b"), "{}", e.error);
    let mut req = put_req(&nested);
    req.make_parents = true;
    req.mode = Some(0o600);
    assert_eq!(c.put(&req, b"first").unwrap().bytes, 5);
    req.mode = Some(0o755);
    assert_eq!(c.put(&req, b"").unwrap().bytes, 0);
    assert_eq!(fs::read(&nested).unwrap(), b"");
    let mode = fs::metadata(&nested).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755);

    for (path, code) in [
        ("relative/path", ErrorCode::BadRequest),
        ("/", ErrorCode::BadRequest),
        (
            &format!("{}/", agent.dir.path().display()),
            ErrorCode::BadRequest,
        ),
        (agent.dir.path().to_str().unwrap(), ErrorCode::BadRequest),
        (&format!("{}/x", nested.display()), ErrorCode::BadRequest),
    ] {
        let e = c
            .put(
                &PutFile {
                    path: path.into(),
                    mode: None,
                    make_parents: false,
                    user: None,
                },
                b"x",
            )
            .unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (code, Some("path")),
            "{path}: {}",
            e.error
        );
    }
}

#[test]
fn a_cancelled_or_abandoned_upload_leaves_nothing() {
    let agent = Agent::start();
    let leftovers = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "agent.sock")
            .collect()
    };
    let mut c = agent.client();
    // Starts an upload of `name` and waits until its temporary file holds
    // data (credit comes back in batches, so the file is watched instead).
    let start_upload = |c: &mut Client, name: &str| {
        let s = c.request(Kind::PutFile, &put_req(&agent.path(name)));
        c.send(&Frame {
            kind: Kind::Data,
            stream: s,
            payload: vec![1; 1000],
        });
        let t = Instant::now();
        while leftovers(agent.dir.path()).is_empty() && t.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    };
    let s = start_upload(&mut c, "cancelled");
    assert_eq!(
        leftovers(agent.dir.path()),
        vec![format!(".cancelled.agentenv-upload-{s}")]
    );
    c.send(&Frame {
        kind: Kind::Kill,
        stream: s,
        payload: vec![],
    });
    let e = c.expect_error(s);
    assert!(e.error.contains("cancelled"), "{}", e.error);
    assert!(leftovers(agent.dir.path()).is_empty());

    start_upload(&mut c, "abandoned");
    drop(c);
    let t = Instant::now();
    while !leftovers(agent.dir.path()).is_empty() && t.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(leftovers(agent.dir.path()).is_empty());
}

#[test]
fn downloads_refuse_what_is_not_a_regular_file() {
    let agent = Agent::start();
    let mut c = agent.client();
    let fifo = agent.path("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for (path, code) in [
        (
            agent.dir.path().to_str().unwrap().to_string(),
            ErrorCode::BadRequest,
        ),
        (fifo.to_str().unwrap().to_string(), ErrorCode::BadRequest),
        ("/dev/null".to_string(), ErrorCode::BadRequest),
        (
            agent.path("missing").to_str().unwrap().to_string(),
            ErrorCode::NotFound,
        ),
        ("relative".to_string(), ErrorCode::BadRequest),
    ] {
        let e = c.get(&path).unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (code, Some("path")),
            "{path}: {}",
            e.error
        );
        if code == ErrorCode::BadRequest && path.starts_with('/') {
            assert!(
                e.error.contains("not a regular file") && e.error.contains(&path),
                "{}",
                e.error
            );
        }
    }
    fs::write(agent.path("small"), "hello").unwrap();
    let (info, data, done) = c.get(agent.path("small").to_str().unwrap()).unwrap();
    assert_eq!(
        (info.size, data.as_slice(), done.bytes),
        (5, &b"hello"[..], 5)
    );
}

#[test]
fn a_download_waits_for_credit_and_can_be_cancelled() {
    let agent = Agent::start();
    let mut c = agent.client();
    let path = agent.path("over-a-window");
    fs::write(&path, pattern(INITIAL_WINDOW as usize + 2 * 1024 * 1024, 1)).unwrap();
    let s = c.request(
        Kind::GetFile,
        &GetFile {
            path: path.to_str().unwrap().into(),
            user: None,
        },
    );
    just_the_initial_window(&mut c, s, Kind::FileInfo, Kind::FileData);
    c.send(&Frame {
        kind: Kind::Kill,
        stream: s,
        payload: vec![],
    });
    let e = c.expect_error(s);
    assert!(e.error.contains("cancelled"), "{}", e.error);
}

#[test]
fn freeze_and_thaw_with_nothing_to_freeze() {
    let agent = Agent::start_with(&["--freeze-only-under", "/nonexistent-agentenv-test"]);
    let mut c = agent.client();
    for kind in [Kind::Freeze, Kind::Thaw, Kind::Thaw] {
        let s = c.bare(kind);
        let f = c.recv(s);
        assert_eq!(f.kind, Kind::Done, "{f:?}");
        assert_eq!(f.parse::<Done>().unwrap(), Done::default());
    }
}

#[test]
fn an_agent_on_a_unix_socket_never_freezes_the_host() {
    let agent = Agent::start_with(&[]);
    let mut c = agent.client();
    let s = c.bare(Kind::Freeze);
    let e = c.expect_error(s);
    assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}");
    assert!(e.error.contains("freeze is disabled"), "{}", e.error);
    // Thaw stays harmless.
    let s = c.bare(Kind::Thaw);
    assert_eq!(c.recv(s).kind, Kind::Done);
}

fn identity() -> Identity {
    Identity {
        hostname: "clone-1".into(),
        net: Some(IdentityNet {
            address: "172.16.0.10".into(),
            prefix_len: 30,
            gateway: "172.16.0.9".into(),
            mac: "06:00:ac:10:00:0a".into(),
        }),
        entropy_hex: "5a".repeat(32),
        unix_time_ns: 1_765_000_000_000_000_000,
    }
}

fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").unwrap()
}

#[test]
fn an_agent_on_a_unix_socket_never_changes_the_hosts_identity() {
    let before = host_name();
    let agent = Agent::start_with(&["--freeze-only-under", "/nonexistent-agentenv-test"]);
    let mut c = agent.client();
    let s = c.request(Kind::Identity, &identity());
    let e = c.expect_error(s);
    assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}");
    assert!(e.error.contains("identity is disabled"), "{}", e.error);
    assert_eq!(host_name(), before);
    // The session goes on.
    let s = c.bare(Kind::Ping);
    assert_eq!(c.recv(s).kind, Kind::Done);
}

#[test]
fn a_bad_identity_is_refused_naming_the_field() {
    let agent = Agent::start();
    let mut c = agent.client();
    let mut cases: Vec<(&str, Identity)> = Vec::new();
    let mut i = identity();
    i.hostname = "bad host".into();
    cases.push(("hostname", i));
    let mut i = identity();
    i.net.as_mut().unwrap().address = "10.0.0.300".into();
    cases.push(("net.address", i));
    let mut i = identity();
    i.net.as_mut().unwrap().prefix_len = 40;
    cases.push(("net.prefix_len", i));
    let mut i = identity();
    i.net.as_mut().unwrap().gateway = "".into();
    cases.push(("net.gateway", i));
    let mut i = identity();
    i.net.as_mut().unwrap().mac = "06:00:ac:10:00".into();
    cases.push(("net.mac", i));
    let mut i = identity();
    i.entropy_hex = "00".repeat(16);
    cases.push(("entropy_hex", i));
    for (field, id) in cases {
        let s = c.request(Kind::Identity, &id);
        let e = c.expect_error(s);
        assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}");
        assert_eq!(e.field.as_deref(), Some(field), "{e:?}");
    }
    // Not even JSON of the right shape.
    let s = c.request(Kind::Identity, &serde_json::json!({"hostname": 5}));
    assert_eq!(c.expect_error(s).code, ErrorCode::BadRequest);
}

/// A loop-mounted ext4 in a temporary directory; thawed and unmounted on drop.
struct LoopMount {
    dir: tempfile::TempDir,
}

impl LoopMount {
    fn new() -> Option<LoopMount> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).ok()?;
        fs::File::create(&img).ok()?.set_len(16 << 20).ok()?;
        let ok = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
        if !ok(Command::new("mkfs.ext4").arg("-q").arg(&img))
            || !ok(Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(&img)
                .arg(&mnt))
        {
            return None;
        }
        Some(LoopMount { dir })
    }

    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(self.mnt()).output();
        let _ = Command::new("umount").arg(self.mnt()).output();
    }
}

#[test]
fn freeze_blocks_writes_until_thaw_or_the_session_ends() {
    let Some(m) = LoopMount::new() else {
        agentenv_testkit::skip::skip("needs root, mkfs.ext4 and a loop mount");
        return;
    };
    let mnt = m.mnt();
    let agent = Agent::start_with(&["--freeze-only-under", m.dir.path().to_str().unwrap()]);
    let write = |name: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("echo x > {}/{name} && sync", mnt.display()))
            .spawn()
            .unwrap()
    };
    let mut c = agent.client();
    let s = c.bare(Kind::Freeze);
    let done: Done = c.recv(s).parse().unwrap();
    assert_eq!(done.mounts, vec![mnt.to_str().unwrap().to_string()]);
    let mut w = write("a");
    // An upload into the frozen file system waits too, without blocking the session.
    let put = c.request(Kind::PutFile, &put_req(&mnt.join("up")));
    c.send(&Frame {
        kind: Kind::Eof,
        stream: put,
        payload: vec![],
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        w.try_wait().unwrap().is_none(),
        "the write waits while frozen"
    );
    let s = c.bare(Kind::Thaw);
    let done: Done = c.recv(s).parse().unwrap();
    assert_eq!(done.mounts, vec![mnt.to_str().unwrap().to_string()]);
    assert!(w.wait().unwrap().success());
    assert_eq!(c.recv(put).kind, Kind::Done);
    assert!(mnt.join("up").exists());

    let s = c.bare(Kind::Freeze);
    assert_eq!(c.recv(s).kind, Kind::Done);
    let mut w = write("b");
    std::thread::sleep(Duration::from_millis(200));
    assert!(w.try_wait().unwrap().is_none());
    drop(c);
    assert!(w.wait().unwrap().success(), "thawed when the session ended");
}

#[test]
fn command_line() {
    let bin = env!("CARGO_BIN_EXE_agentenv-guest");
    let v = Command::new(bin).arg("--version").output().unwrap();
    assert!(v.status.success());
    assert_eq!(
        String::from_utf8(v.stdout).unwrap(),
        "agentenv-guest 0.1.0\n"
    );
    let h = Command::new(bin).arg("--help").output().unwrap();
    assert!(String::from_utf8(h.stdout)
        .unwrap()
        .contains("--listen-unix"));
    for args in [
        &["--bogus"][..],
        &["--listen-unix"],
        &["--freeze-only-under", "/x"],
    ] {
        let o = Command::new(bin).args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8(o.stderr)
            .unwrap()
            .starts_with("agentenv-guest: "));
    }
}
