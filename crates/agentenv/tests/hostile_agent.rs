//! A hostile guest agent against the whole daemon (over the Firecracker
//! double's vsock bridge): it ignores flow control and floods a download's
//! stream while the HTTP client reads nothing. The daemon cuts the agent off
//! and its memory (this test process's RSS: the daemon runs in it) stays
//! bounded.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentenv_proto::{self as proto, FileInfo, Frame, Hello, HelloOk, Kind, MAX_PAYLOAD};
use common::{finish, Daemon, TestDir};
use serde_json::json;

/// What the fake agent saw: connections, and bulk bytes it wrote on them.
#[derive(Default)]
struct Seen {
    connections: AtomicU64,
    sent: AtomicU64,
    /// Floods that ended because the host hung up.
    cut_off: AtomicU64,
}

/// Serves one connection: answers hellos and pings, and floods every
/// download with `FileData` regardless of credit (up to `flood` bytes).
fn serve(mut s: UnixStream, seen: &Seen, flood: u64) {
    let chunk = vec![b'z'; MAX_PAYLOAD];
    loop {
        let f = match proto::read_frame(&mut s) {
            Ok(Some(f)) => f,
            _ => return,
        };
        let answer = match f.kind {
            Kind::Hello => {
                let ok = HelloOk {
                    version: proto::PROTOCOL_VERSION,
                    agent: "hostile".into(),
                    pid: 1,
                    features: Vec::new(),
                };
                proto::hello_ok_frame(&f.parse::<Hello>().unwrap(), &ok)
            }
            Kind::Ping => Frame::json(Kind::Done, f.stream, &proto::Done::default()),
            Kind::GetFile => {
                let info = FileInfo {
                    size: flood,
                    mode: 0o644,
                };
                let info = Frame::json(Kind::FileInfo, f.stream, &info);
                if s.write_all(&info.encode()).is_err() {
                    return;
                }
                let frame = proto::encode(Kind::FileData, f.stream, &chunk);
                let mut sent = 0;
                while sent < flood {
                    if s.write_all(&frame).is_err() {
                        seen.cut_off.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    sent += chunk.len() as u64;
                    seen.sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                }
                return;
            }
            _ => continue,
        };
        if s.write_all(&answer.encode()).is_err() {
            return;
        }
    }
}

fn fake_agent(sock: &Path, seen: Arc<Seen>, flood: u64) {
    let l = UnixListener::bind(sock).unwrap();
    // The jailed double connects as the jail's uid.
    std::fs::set_permissions(sock, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            seen.connections.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            std::thread::spawn(move || serve(s, &seen, flood));
        }
    });
}

#[test]
fn a_guest_flooding_past_its_window_is_cut_off_and_the_daemon_stays_small() {
    let mut dir = TestDir::new();
    // In a directory of its own, which the jailed double sees (as in
    // `common::start_with_agent`).
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir(&agent_dir).unwrap();
    let sock = agent_dir.join("agent-host.sock");
    let spec = format!("{}={}", proto::VSOCK_PORT, sock.display());
    let wrapper = dir.wrapper("fc-agent", &["--vsock-agent", &spec]);
    let seen = Arc::new(Seen::default());
    let flood: u64 = 1 << 30;
    fake_agent(&sock, seen.clone(), flood);
    dir.baseline = Some(common::baseline(dir.path()).allow(&sock));
    let mut cfg = dir.config();
    cfg.jail.read_only_paths.push(agent_dir);
    cfg.firecracker_binary = wrapper;
    let d = Daemon::start_with(cfg, dir.path());
    let mut body = common::overlay_req("flood");
    body["wait_ready"] = json!(true);
    let (code, v) = d.call("POST", "/v1/vm", Some(body));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["ready"], true, "{v}");

    let (rss_before, _) = common::rss_kib_and_fds();
    // A download whose client reads the head and then nothing: no credit
    // goes back to the guest, which sends on regardless.
    let addr = d.base.trim_start_matches("http://").to_string();
    let mut client = std::net::TcpStream::connect(&addr).unwrap();
    client
        .write_all(&common::with_auth(
            b"GET /v1/vm/flood/files?path=/big HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        ))
        .unwrap();
    let mut head = [0u8; 512];
    let n = client.read(&mut head).unwrap();
    assert!(
        String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head[..n])
    );
    let start = Instant::now();
    while seen.cut_off.load(Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the flood was not cut off; {} bytes sent",
            seen.sent.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (rss_after, _) = common::rss_kib_and_fds();
    let sent = seen.sent.load(Ordering::SeqCst);
    let grown = rss_after.saturating_sub(rss_before);
    println!("flood: {sent} bytes sent before the cut, rss grew {grown} KiB");
    assert!(sent < 256 << 20, "{sent} bytes went through before the cut");
    assert!(grown < 32 * 1024, "rss grew {grown} KiB");
    drop(client);

    // The daemon reconnects to the agent and goes on serving.
    let start = Instant::now();
    loop {
        let (_, v) = d.call("GET", "/v1/vm/flood", None);
        if v["ready"] == true && seen.connections.load(Ordering::SeqCst) >= 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not ready again: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d.assert_healthy();
    finish(d, dir);
}
