//! Byte streams to the host: vsock and Unix connections (one session each,
//! dropped on a protocol error) and the virtio-serial port (one long-lived
//! stream whose sessions end when the host disconnects, resynchronised on the
//! next `Hello` after a protocol error).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use agentenv_proto::{self as proto, ProtoError, HEADER_LEN, MAX_PAYLOAD, SERIAL_PORT_NAME};

use super::out::{write_loop, Outbox};
use super::session::Session;
use super::{spawn, spawn_session, sys, Config};

/// How long a closing session waits for its writer to flush before the
/// connection is shut down anyway.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// A connection that carries one session.
pub trait Conn: Read + Write + Send + Sized + 'static {
    /// Another handle on the same connection.
    fn try_clone(&self) -> io::Result<Self>;
    /// Shuts both directions down (wakes blocked readers and writers).
    fn shutdown(&self);
}

impl Conn for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
}

/// An accepted `AF_VSOCK` connection.
pub struct Vsock(File);

impl Read for Vsock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Vsock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Conn for Vsock {
    fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Vsock)
    }
    fn shutdown(&self) {
        sys::shutdown(self.0.as_fd());
    }
}

/// Serves one session on `conn` until the host closes it or breaks the
/// protocol (answered with an `Error` on stream 0, then the connection closes).
pub fn serve_socket<C: Conn>(conn: C, cfg: Arc<Config>) {
    let (Ok(w), Ok(ctl), Ok(shut)) = (conn.try_clone(), conn.try_clone(), conn.try_clone()) else {
        return;
    };
    let (tx, rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let writer = move || {
        write_loop(w, rx, &AtomicU64::new(0), move || shut.shutdown());
        let _ = done_tx.send(());
    };
    if spawn("conn-write", writer).is_err() {
        return;
    }
    let closer = Outbox::new(tx.clone(), 0);
    let mut session = Session::new(Outbox::new(tx, 0), None, cfg);
    let mut r = BufReader::with_capacity(HEADER_LEN + MAX_PAYLOAD, conn);
    loop {
        match proto::read_frame(&mut r) {
            Ok(Some(f)) => {
                if let Err(m) = session.frame(f) {
                    session.protocol_error(&m);
                    break;
                }
            }
            Ok(None) | Err(ProtoError::Io(_)) | Err(ProtoError::Truncated) => break,
            Err(e) => {
                session.protocol_error(&e.to_string());
                break;
            }
        }
    }
    session.end();
    closer.close();
    let _ = done_rx.recv_timeout(FLUSH_WAIT);
    ctl.shutdown();
}

/// The bytes a `Hello` frame has after its length: kind 0x01, stream 0, `{"version"`.
const HELLO_MARK: &[u8] = b"\x01\x00\x00\x00\x00{\"version\"";

/// Where the next plausible `Hello` frame starts in `buf`, for resynchronising
/// the serial stream.
pub fn find_hello(buf: &[u8]) -> Option<usize> {
    let mut from = 4;
    while from + HELLO_MARK.len() <= buf.len() {
        let at = buf[from..]
            .windows(HELLO_MARK.len())
            .position(|w| w == HELLO_MARK)?
            + from;
        let start = at - 4;
        let len = u32::from_be_bytes([buf[start], buf[start + 1], buf[start + 2], buf[start + 3]]);
        // `len` covers kind, stream and at least `{"version"`.
        if (HELLO_MARK.len() as u32..=5 + MAX_PAYLOAD as u32).contains(&len) {
            return Some(start);
        }
        from = at + 1;
    }
    None
}

/// Serves the serial stream `r`/`w` until reading fails (the port went away).
/// `read` returning 0 means the host is not connected: the session ends (once)
/// and the agent retries every `idle`.
pub fn serve_serial<R: Read, W: Write + Send + 'static>(
    mut r: R,
    w: W,
    cfg: Arc<Config>,
    idle: Duration,
) -> io::Error {
    let gen = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let gen2 = gen.clone();
    let writer = move || {
        write_loop(w, rx, &gen2, || {});
        let _ = done_tx.send(());
    };
    if let Err(e) = spawn("serial-write", writer) {
        return e;
    }
    let closer = Outbox::new(tx.clone(), 0);
    let mut session = Session::new(Outbox::new(tx, 0), Some(gen), cfg);
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut resync = false;
    let mut connected = false;
    let err = loop {
        let n = match r.read(&mut chunk) {
            Ok(0) => {
                if connected {
                    session.disconnected();
                    buf.clear();
                    resync = false;
                    connected = false;
                }
                std::thread::sleep(idle);
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break e,
        };
        connected = true;
        buf.extend_from_slice(&chunk[..n]);
        loop {
            if resync {
                match find_hello(&buf) {
                    Some(at) => {
                        buf.drain(..at);
                        resync = false;
                    }
                    None => {
                        // Keep a tail that may be the start of a Hello.
                        let keep = 4 + HELLO_MARK.len() - 1;
                        if buf.len() > keep {
                            buf.drain(..buf.len() - keep);
                        }
                        break;
                    }
                }
            }
            match proto::take_frame(&mut buf) {
                Ok(Some(f)) => {
                    if let Err(m) = session.frame(f) {
                        session.protocol_error(&m);
                        resync = true;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    session.protocol_error(&e.to_string());
                    resync = true;
                }
            }
        }
    };
    session.end();
    closer.close();
    let _ = done_rx.recv_timeout(FLUSH_WAIT);
    err
}

/// The device of the virtio-serial port named [`SERIAL_PORT_NAME`], if there is one.
pub fn find_serial_port() -> Option<PathBuf> {
    let dir = fs::read_dir("/sys/class/virtio-ports").ok()?;
    for e in dir.flatten() {
        let name = fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim_end() == SERIAL_PORT_NAME {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

/// Serves the serial port `dev` forever, reopening it when it fails.
pub fn run_serial(dev: &Path, cfg: &Arc<Config>) {
    let mut last_error = String::new();
    loop {
        let served = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .and_then(|f| Ok((f.try_clone()?, f)))
            .map(|(w, r)| serve_serial(r, w, cfg.clone(), Duration::from_millis(50)));
        let e = match served {
            Ok(e) => format!("{}: {e}", dev.display()),
            Err(e) => format!("open {}: {e}", dev.display()),
        };
        if e != last_error {
            eprintln!("agentenv-guest: {e}");
            last_error = e;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Accepts vsock connections forever, one session thread each.
pub fn run_vsock(listener: &OwnedFd, cfg: &Arc<Config>) {
    loop {
        match sys::accept(listener.as_fd()) {
            Ok(fd) => {
                let (conn, cfg) = (Vsock(File::from(fd)), cfg.clone());
                if let Err(e) = spawn_session(move || serve_socket(conn, cfg)) {
                    eprintln!("agentenv-guest: vsock connection: cannot start a thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("agentenv-guest: vsock accept: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Accepts Unix connections forever, one session thread each.
pub fn run_unix(listener: &UnixListener, cfg: &Arc<Config>) {
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                let cfg = cfg.clone();
                if let Err(e) = spawn_session(move || serve_socket(conn, cfg)) {
                    eprintln!("agentenv-guest: unix connection: cannot start a thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("agentenv-guest: unix accept: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentenv_proto::{ErrorCode, ErrorMsg, ExecRequest, Frame, Hello, Kind, Started};
    use std::collections::VecDeque;
    use std::sync::Mutex;

    enum Step {
        Bytes(Vec<u8>),
        /// `read` returns 0: the host is not connected.
        Disconnect,
        /// Let the writer catch up: wait until it has written `n` frames in
        /// all (frames queued for an older generation are dropped once a
        /// `Hello` or a disconnect starts a new one).
        WaitFrames(usize),
        /// Let the writer catch up: wait until it has written a frame of
        /// this kind on this stream.
        WaitFor(Kind, u32),
    }

    /// A serial port that replays a script, then fails. It sees what the
    /// agent wrote to `sink`, for [`Step::WaitFrames`].
    struct Script {
        steps: VecDeque<Step>,
        sink: Sink,
    }

    /// How long [`Step::WaitFrames`] waits for the writer.
    const WRITER_DEADLINE: Duration = Duration::from_secs(10);

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            loop {
                match self.steps.pop_front() {
                    Some(Step::Bytes(mut b)) => {
                        let n = b.len().min(buf.len());
                        buf[..n].copy_from_slice(&b[..n]);
                        if n < b.len() {
                            self.steps.push_front(Step::Bytes(b.split_off(n)));
                        }
                        return Ok(n);
                    }
                    Some(Step::Disconnect) => return Ok(0),
                    Some(Step::WaitFrames(n)) => {
                        self.sink
                            .wait(&format!("{n} frames"), |written| written.len() >= n);
                    }
                    Some(Step::WaitFor(kind, stream)) => {
                        self.sink.wait(&format!("{kind:?} on {stream}"), |written| {
                            written.iter().any(|f| f.kind == kind && f.stream == stream)
                        });
                    }
                    None => return Err(io::Error::other("end of script")),
                }
            }
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Sink {
        /// Waits until what the agent wrote satisfies `done`.
        fn wait(&self, what: &str, done: impl Fn(&[Frame]) -> bool) {
            let t = std::time::Instant::now();
            loop {
                let written = self.frames();
                if done(&written) {
                    return;
                }
                assert!(
                    t.elapsed() < WRITER_DEADLINE,
                    "waiting for {what}, the agent wrote {:?}",
                    kinds(&written)
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }

        /// The whole frames written so far.
        fn frames(&self) -> Vec<Frame> {
            let mut bytes = self.0.lock().unwrap().clone();
            let mut frames = Vec::new();
            while let Some(f) = proto::take_frame(&mut bytes).unwrap() {
                frames.push(f);
            }
            frames
        }
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn hello(nonce: &str) -> Vec<u8> {
        let h = Hello {
            version: 1,
            nonce: nonce.into(),
        };
        Frame::json(Kind::Hello, 0, &h).encode()
    }

    fn bare(kind: Kind, stream: u32) -> Vec<u8> {
        proto::encode(kind, stream, &[])
    }

    /// Runs the script; returns the frames the agent wrote.
    fn serve(steps: Vec<Step>) -> Vec<Frame> {
        let sink = Sink::default();
        let script = Script {
            steps: steps.into(),
            sink: sink.clone(),
        };
        let e = serve_serial(
            script,
            sink.clone(),
            Arc::new(Config::default()),
            Duration::from_millis(1),
        );
        assert_eq!(e.to_string(), "end of script");
        let mut bytes = sink.0.lock().unwrap().clone();
        let mut frames = Vec::new();
        while let Some(f) = proto::take_frame(&mut bytes).unwrap() {
            frames.push(f);
        }
        assert!(bytes.is_empty());
        frames
    }

    fn kinds(frames: &[Frame]) -> Vec<(Kind, u32)> {
        frames.iter().map(|f| (f.kind, f.stream)).collect()
    }

    #[test]
    fn hello_is_found_after_any_garbage() {
        let h = hello("0123456789abcdef");
        let mut buf = b"\x00\x00\x00\x07\x01\x00\x00\x00\x00{}junk".to_vec();
        let at = buf.len();
        buf.extend_from_slice(&h);
        assert_eq!(find_hello(&buf), Some(at));
        assert_eq!(find_hello(&h), Some(0));
        assert_eq!(find_hello(&h[..12]), None);
        // Too short a length for a Hello payload is no Hello.
        let mut short = h.clone();
        short[..4].copy_from_slice(&6u32.to_be_bytes());
        assert_eq!(find_hello(&short), None);
    }

    #[test]
    fn serial_resyncs_on_the_next_hello_after_a_protocol_error() {
        let mut garbage = vec![0, 0, 0, 1, 0x02, 0, 0, 0, 1];
        garbage.extend_from_slice(b"more garbage");
        garbage.extend_from_slice(&bare(Kind::Ping, 2));
        let mut tail = hello("bbbbbbbbbbbbbbbb");
        tail.extend_from_slice(&bare(Kind::Ping, 3));
        let frames = serve(vec![
            Step::Bytes(hello("aaaaaaaaaaaaaaaa")),
            Step::Bytes(bare(Kind::Ping, 1)),
            // HelloOk, Done.
            Step::WaitFrames(2),
            // Split inside the garbage and inside the Hello.
            Step::Bytes(garbage[..5].to_vec()),
            Step::Bytes(garbage[5..].to_vec()),
            Step::Bytes(tail[..7].to_vec()),
            // The Error, before the Hello starts a new generation.
            Step::WaitFrames(3),
            Step::Bytes(tail[7..].to_vec()),
            // HelloOk, Done.
            Step::WaitFrames(5),
        ]);
        assert_eq!(
            kinds(&frames),
            vec![
                (Kind::HelloOk, 0),
                (Kind::Done, 1),
                (Kind::Error, 0),
                (Kind::HelloOk, 0),
                (Kind::Done, 3)
            ]
        );
        assert_eq!(&frames[0].payload[..16], b"aaaaaaaaaaaaaaaa");
        assert_eq!(
            frames[2].parse::<ErrorMsg>().unwrap().code,
            ErrorCode::Protocol
        );
        assert_eq!(&frames[3].payload[..16], b"bbbbbbbbbbbbbbbb");
    }

    #[test]
    fn a_burst_of_repeated_hellos_after_a_lost_start_gets_answers_and_a_working_session() {
        // What a host that repeats its hello every few milliseconds sends to
        // a guest that missed the start of the first copy: a cut hello, then
        // many whole ones, one cut in two reads, then a request.
        let one = hello("cccccccccccccccc");
        let mut burst = one[3..].to_vec();
        for _ in 0..50 {
            burst.extend_from_slice(&one);
        }
        let mid = burst.len() - one.len() / 2;
        let frames = serve(vec![
            Step::Bytes(burst[..mid].to_vec()),
            Step::Bytes(burst[mid..].to_vec()),
            Step::Bytes(bare(Kind::Ping, 1)),
            Step::WaitFor(Kind::Done, 1),
        ]);
        // Answers to older copies may be dropped (each copy starts a new
        // generation), but the last copy's answer and the request's get out.
        let k = kinds(&frames);
        assert_eq!(&k[k.len() - 2..], &[(Kind::HelloOk, 0), (Kind::Done, 1)]);
        assert!(
            k.iter()
                .all(|f| matches!(f, (Kind::HelloOk | Kind::Error, 0) | (Kind::Done, 1))),
            "{k:?}"
        );
        for f in frames.iter().filter(|f| f.kind == Kind::HelloOk) {
            assert_eq!(&f.payload[..16], b"cccccccccccccccc");
        }
    }

    #[test]
    fn serial_disconnect_ends_the_session() {
        let exec = ExecRequest {
            cmd: vec!["sleep".into(), "30".into()],
            ..Default::default()
        };
        let frames = serve(vec![
            Step::Bytes(hello("aaaaaaaaaaaaaaaa")),
            Step::Bytes(Frame::json(Kind::Exec, 1, &exec).encode()),
            // HelloOk, Started, before the disconnect starts a new generation.
            Step::WaitFrames(2),
            Step::Disconnect,
            Step::Disconnect,
            // Half a frame, then the host goes away: the rest is forgotten.
            Step::Bytes(bare(Kind::Ping, 5)[..4].to_vec()),
            Step::Disconnect,
            Step::Bytes(hello("bbbbbbbbbbbbbbbb")),
            Step::Bytes(bare(Kind::Ping, 2)),
            // HelloOk, Done.
            Step::WaitFrames(4),
        ]);
        assert_eq!(
            kinds(&frames),
            vec![
                (Kind::HelloOk, 0),
                (Kind::Started, 1),
                (Kind::HelloOk, 0),
                (Kind::Done, 2)
            ]
        );
        let pid = frames[1].parse::<Started>().unwrap().pid as libc::pid_t;
        let t = std::time::Instant::now();
        // SAFETY: signal 0 only checks whether the process still exists (unreaped).
        while unsafe { libc::kill(pid, 0) } == 0 {
            assert!(t.elapsed() < WRITER_DEADLINE, "the command was not killed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
