//! The host side of the double's vsock device: Firecracker's "hybrid vsock"
//! for host-initiated connections (Firecracker's `docs/vsock.md`, and its
//! `vsock/unix/muxer.rs`).
//!
//! The host connects to the device's Unix socket (`uds_path`) and writes
//! `CONNECT <port>\n`. When a guest program listens on that vsock port,
//! Firecracker answers `OK <host side port>\n` (host side ports are handed out
//! from 2^30 up) and from then on the connection carries the bytes of the
//! guest's accepted socket. When nothing listens there the guest resets the
//! connection and Firecracker closes the Unix stream without a word; a line
//! that is not `connect <u32>` (case-insensitive, read up to its `\n` or 32
//! bytes) is closed the same way.
//!
//! Firecracker only serves the socket once the guest's vsock driver has
//! activated the device: before that, connections wait in the listen backlog.
//! The double has no guest, so it starts serving at `InstanceStart` (or a
//! snapshot load) and keeps serving while paused. Its "guest listeners" are
//! the `--vsock-agent PORT=UNIX_PATH` flags: a connection to guest port PORT
//! is bridged to a stream connection to UNIX_PATH (tests run the real
//! `agentenv-guest --listen-unix UNIX_PATH` there).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

/// Longest `CONNECT` line Firecracker reads (its buffer).
const MAX_CONNECT_LINE: usize = 32;

/// How long the double waits for the `CONNECT` line (Firecracker reads what
/// is there when the socket becomes readable; a slow writer there is cut off).
const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(5);

/// The first host side port Firecracker hands out (`1 << 30`).
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// The vsock device's host side: the guest listeners and the boot gate.
pub struct Mux {
    /// `--vsock-agent` flags: guest port → Unix socket of the listener.
    agents: Vec<(u32, PathBuf)>,
    /// Set once the "guest" runs (`InstanceStart` or a snapshot load).
    started: Mutex<bool>,
    started_cv: Condvar,
    ports: Mutex<Ports>,
}

/// Host side ports in use, allocated as Firecracker does.
struct Ports {
    last: u32,
    used: HashSet<u32>,
}

impl Mux {
    pub fn new(agents: Vec<(u32, PathBuf)>) -> Mux {
        Mux {
            agents,
            started: Mutex::new(false),
            started_cv: Condvar::new(),
            ports: Mutex::new(Ports {
                last: FIRST_LOCAL_PORT - 1,
                used: HashSet::new(),
            }),
        }
    }

    /// The guest runs: host-initiated connections are served from now on.
    pub fn start(&self) {
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.started_cv.notify_all();
    }

    fn wait_started(&self) {
        let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        while !*started {
            started = self
                .started_cv
                .wait(started)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Firecracker's allocation: the next free port in `[2^30, 2^31)`.
    fn allocate_port(&self) -> u32 {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            ports.last = ((ports.last.wrapping_add(1)) & !(1 << 31)) | (1 << 30);
            let candidate = ports.last;
            if ports.used.insert(candidate) {
                return candidate;
            }
        }
    }

    fn free_port(&self, port: u32) {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        ports.used.remove(&port);
    }

    fn agent(&self, port: u32) -> Option<&PathBuf> {
        self.agents.iter().find(|(p, _)| *p == port).map(|(_, a)| a)
    }
}

/// Parses a `--vsock-agent` value, `PORT=UNIX_PATH`.
pub fn parse_agent(spec: &str) -> Result<(u32, PathBuf), String> {
    let (port, path) = spec.split_once('=').ok_or_else(|| {
        format!("'--vsock-agent' expects PORT=UNIX_PATH (e.g. 10789=/tmp/agent.sock), got {spec:?}")
    })?;
    let port = port
        .parse()
        .map_err(|_| format!("'--vsock-agent' expects a port number before '=', got {port:?}"))?;
    if path.is_empty() {
        return Err(format!(
            "'--vsock-agent' expects a Unix socket path after '=', got {spec:?}"
        ));
    }
    Ok((port, PathBuf::from(path)))
}

/// Serves the device's Unix socket on a thread of its own.
pub fn serve(listener: UnixListener, mux: Arc<Mux>) {
    let spawned = thread::Builder::new()
        .name("fc_vsock".to_string())
        .spawn(move || {
            mux.wait_started();
            for conn in listener.incoming() {
                let Ok(stream) = conn else { continue };
                let mux = Arc::clone(&mux);
                super::spawn("fc_vsock_conn", move || host_connection(&mux, stream));
            }
        });
    if spawned.is_err() {
        super::log("Cannot start the vsock listener thread.");
    }
}

/// Reads the `CONNECT` line the way Firecracker does: byte by byte up to a
/// `\n` or [`MAX_CONNECT_LINE`] bytes (so bytes after the line stay in the
/// stream for the guest). `None` when the peer closed or was too slow.
fn read_connect_line(stream: &mut UnixStream) -> Option<Vec<u8>> {
    stream.set_read_timeout(Some(CONNECT_LINE_TIMEOUT)).ok()?;
    let mut line = Vec::with_capacity(MAX_CONNECT_LINE);
    let mut byte = [0u8; 1];
    while line.len() < MAX_CONNECT_LINE && line.last() != Some(&b'\n') {
        match stream.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
    stream.set_read_timeout(None).ok()?;
    Some(line)
}

/// The destination port of a `CONNECT` line: its first word is `connect` in
/// any case, its second a `u32`; more words are ignored (as in Firecracker).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("connect") {
        return None;
    }
    words.next()?.parse().ok()
}

/// One host-initiated connection: the handshake, then the bridge.
fn host_connection(mux: &Mux, mut host: UnixStream) {
    let Some(line) = read_connect_line(&mut host) else {
        return;
    };
    let Some(port) = parse_connect(&line) else {
        super::log(&format!(
            "vsock: error adding local-init connection: InvalidPortRequest ({:?})",
            String::from_utf8_lossy(&line)
        ));
        return;
    };
    // Nothing listens on that port in the guest: it resets the connection and
    // the host's stream is closed without an answer.
    let Some(guest) = mux
        .agent(port)
        .and_then(|path| UnixStream::connect(path).ok())
    else {
        return;
    };
    let local_port = mux.allocate_port();
    if host
        .write_all(format!("OK {local_port}\n").as_bytes())
        .is_ok()
    {
        bridge(host, guest);
    }
    mux.free_port(local_port);
}

/// Copies bytes both ways until both directions have ended; the end of one
/// direction is passed on as a write shutdown.
fn bridge(host: UnixStream, guest: UnixStream) {
    let (Ok(host_w), Ok(guest_w)) = (host.try_clone(), guest.try_clone()) else {
        return;
    };
    let to_guest = thread::Builder::new()
        .name("fc_vsock_tx".to_string())
        .spawn(move || pump(host, guest_w));
    pump(guest, host_w);
    if let Ok(handle) = to_guest {
        let _ = handle.join();
    }
}

fn pump(mut from: UnixStream, mut to: UnixStream) {
    // Large reads, like Firecracker's vsock muxer (std::io::copy would move
    // 8 KiB at a time and make the double, not the daemon, the bottleneck).
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse_like_firecracker() {
        assert_eq!(parse_connect(b"CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect(b"connect 10789\n"), Some(10789));
        assert_eq!(parse_connect(b"Connect 1 extra words\n"), Some(1));
        assert_eq!(parse_connect(b"CONNECT\n"), None);
        assert_eq!(parse_connect(b"CONNECT x\n"), None);
        assert_eq!(parse_connect(b"CONNECT -1\n"), None);
        assert_eq!(parse_connect(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(parse_connect(b"\xff\xfe 1\n"), None);
    }

    #[test]
    fn agents_parse() {
        assert_eq!(
            parse_agent("10789=/tmp/a.sock").unwrap(),
            (10789, PathBuf::from("/tmp/a.sock"))
        );
        assert!(parse_agent("10789").is_err());
        assert!(parse_agent("x=/tmp/a").is_err());
        assert!(parse_agent("1=").is_err());
    }

    #[test]
    fn host_ports_start_at_2_pow_30_and_are_reused_when_free() {
        let mux = Mux::new(Vec::new());
        assert_eq!(mux.allocate_port(), 1 << 30);
        assert_eq!(mux.allocate_port(), (1 << 30) + 1);
        mux.free_port(1 << 30);
        assert_eq!(mux.allocate_port(), (1 << 30) + 2);
        // Wrapping stays in [2^30, 2^31).
        mux.ports.lock().unwrap().last = u32::MAX >> 1;
        assert_eq!(mux.allocate_port(), 1 << 30);
    }
}
