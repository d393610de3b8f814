//! Hostile input over real HTTP: ids, paths, bodies and numbers that try to
//! escape the roots, hang the daemon, crash its parser or confuse its checks.
//! Every case must get a clear 4xx JSON error (naming the field whenever the
//! input has one), leave nothing behind, and the daemon must go on serving.
//!
//! Requests are sent byte for byte over raw TCP (`Daemon::raw`), so paths such
//! as `/v1/vm/%2e%2e` reach the daemon unnormalised, and every request is
//! bounded by a 10 s timeout. Each test prints how many cases it tried
//! ("bad-input cases: N"; run with `--nocapture` to see it).

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{finish, Daemon, TestDir};
use serde_json::{json, Value};

/// What an error body must say about the field.
#[derive(Clone, Copy)]
enum Want<'a> {
    /// `field` is exactly this.
    Field(&'a str),
    /// `field` starts with this (`shares[0]…`).
    FieldPrefix(&'a str),
    /// The input has no field to blame (a syntax error, a body too large, an
    /// unknown route): the message must then say what is wrong.
    Message(&'a str),
}

/// Counts the cases a test tries and checks each answer.
struct Cases {
    n: usize,
}

impl Cases {
    fn new() -> Cases {
        Cases { n: 0 }
    }

    /// Checks one answer: the status, a non-empty JSON `error`, the field.
    fn check(&mut self, ctx: &str, got: (u16, &Value), code: u16, want: Want) {
        self.n += 1;
        let (status, v) = got;
        let ctx = short(ctx);
        let shown = short(&v.to_string());
        assert_eq!(status, code, "{ctx} → {shown}");
        let err = v["error"].as_str().unwrap_or("");
        assert!(!err.is_empty(), "{ctx}: no error message: {shown}");
        match want {
            Want::Field(f) => assert_eq!(v["field"], f, "{ctx} → {shown}"),
            Want::FieldPrefix(f) => assert!(
                v["field"].as_str().is_some_and(|x| x.starts_with(f)),
                "{ctx}: field should start with {f}: {shown}"
            ),
            Want::Message(m) => assert!(err.contains(m), "{ctx}: {m:?} not in {shown}"),
        }
    }

    /// Prints the count.
    fn done(self, test: &str) {
        println!("bad-input cases: {} ({test})", self.n);
    }
}

/// At most 200 characters of `s`, for messages about 10 KB inputs.
fn short(s: &str) -> String {
    if s.chars().count() <= 200 {
        s.to_string()
    } else {
        format!(
            "{}… ({} bytes)",
            s.chars().take(200).collect::<String>(),
            s.len()
        )
    }
}

/// POSTs a JSON body; the answer must come within the raw client's 10 s.
fn post(d: &Daemon, path: &str, body: &Value) -> (u16, Value) {
    let a = d.raw(
        "POST",
        path,
        Some("application/json"),
        &serde_json::to_vec(body).unwrap(),
    );
    (a.status, a.body)
}

/// POSTs raw bytes as JSON.
fn post_bytes(d: &Daemon, path: &str, body: &[u8]) -> (u16, Value) {
    let a = d.raw("POST", path, Some("application/json"), body);
    (a.status, a.body)
}

/// Percent-encodes every byte that is not unreserved (RFC 3986).
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Ids that must never become a path component.
fn hostile_ids() -> Vec<String> {
    let mut v: Vec<String> = [
        "..",
        ".",
        "a/b",
        "/abs",
        "a\0b",
        "\0",
        "١٢٣",
        "１２",
        "é",
        "vmé",
        "ｖｍ",
        "Ωmega",
        "\u{202e}vm",
        "\u{feff}vm",
        "-rf",
        "-",
        " a",
        "a ",
        "a b",
        "\t",
        "a\nb",
        "",
        "../etc/passwd",
        "a/../b",
        "~root",
        "*",
        "a\\b",
        ".hidden",
        "_x",
        "a:b",
        "%2e%2e",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("x".repeat(64));
    v.push("x".repeat(10 * 1024));
    v
}

fn overlay(vm_id: &str) -> Value {
    json!({"vm_id": vm_id, "disk": {"kind": "overlay", "rootfs_id": "base.ext4"}})
}

#[test]
fn hostile_ids_in_bodies_are_400_naming_the_field() {
    let (d, dir) = Daemon::start();
    let mut c = Cases::new();
    d.create_ok("keep");
    for id in hostile_ids() {
        let mut b = overlay(&id);
        c.check(
            &format!("vm_id {id:?}"),
            post(&d, "/v1/vm", &b).pair(),
            400,
            Want::Field("vm_id"),
        );
        b = overlay("ok");
        b["disk"]["rootfs_id"] = json!(id);
        c.check(
            &format!("rootfs_id {id:?}"),
            post(&d, "/v1/vm", &b).pair(),
            400,
            Want::Field("disk.rootfs_id"),
        );
        b = json!({"vm_id": "ok", "disk": {"kind": "snapshot", "snapshot_id": id}});
        c.check(
            &format!("disk.snapshot_id {id:?}"),
            post(&d, "/v1/vm", &b).pair(),
            400,
            Want::Field("disk.snapshot_id"),
        );
        for f in ["kernel", "initrd"] {
            b = overlay("ok");
            b[f] = json!(id);
            c.check(
                &format!("{f} {id:?}"),
                post(&d, "/v1/vm", &b).pair(),
                400,
                Want::Field(f),
            );
        }
        let b = json!({"snapshot_id": id});
        c.check(
            &format!("snapshot_id {id:?}"),
            post(&d, "/v1/vm/keep/snapshot", &b).pair(),
            400,
            Want::Field("snapshot_id"),
        );
    }
    assert_eq!(d.engine.list().len(), 1, "only `keep` exists");
    let (_, v) = d.call("GET", "/v1/vm/keep", None);
    assert_eq!(
        v["state"], "running",
        "the snapshot attempts left it running: {v}"
    );
    let (_, snaps) = d.call("GET", "/v1/snapshots", None);
    assert_eq!(snaps["snapshots"], json!([]));
    d.assert_healthy();
    d.create_ok("after");
    c.done("ids in bodies");
    finish(d, dir);
}

#[test]
fn hostile_ids_in_url_paths_are_400_naming_the_field() {
    let (d, dir) = Daemon::start();
    let mut c = Cases::new();
    d.create_ok("keep");
    // Raw path segments: encoded forms of the hostile ids, and tricks that
    // only exist in URLs (encoded dots and slashes, bad escapes).
    let mut segments: Vec<String> = hostile_ids()
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| pct(s))
        .collect();
    segments.extend(
        [
            "..",
            ".",
            "%2e%2e",
            "%2E%2E",
            ".%2e",
            "%2e",
            "..%2f..",
            "..%2F..%2Fetc%2Fpasswd",
            "a%2Fb",
            "%2Fabs",
            "a%00b",
            "%00",
            "%",
            "%zz",
            "%2",
            "%E2%80%AE",
            "a%20",
            "%7Eroot",
            // Invalid UTF-8 once decoded: axum's `Path` extractor refuses these
            // before any handler runs, and its plain-text answer is rewritten
            // into the JSON error body naming the parameter.
            "%FF",
            "a%C3",
            "%C0%AE",
            "%ED%A0%80",
        ]
        .map(String::from),
    );
    let vm_routes: [(&str, &str, &[u8]); 9] = [
        ("GET", "", b""),
        ("DELETE", "", b""),
        ("POST", "/pause", b""),
        ("POST", "/resume", b""),
        ("POST", "/shutdown", b""),
        ("POST", "/snapshot", b""),
        ("POST", "/exec", br#"{"cmd":["true"]}"#),
        ("GET", "/files?path=/etc/hostname", b""),
        ("PUT", "/files?path=/tmp/x", b"data"),
    ];
    let snap_routes: [(&str, &str); 3] = [("GET", ""), ("DELETE", ""), ("POST", "/persist")];
    for seg in &segments {
        for (m, tail, body) in vm_routes {
            let p = format!("/v1/vm/{seg}{tail}");
            // An upload's body is the file (issue 14: octet-stream only).
            let ct = if m == "PUT" {
                "application/octet-stream"
            } else {
                "application/json"
            };
            let a = d.raw(m, &p, Some(ct), body);
            c.check(
                &format!("{m} {p}"),
                (a.status, &a.body),
                400,
                Want::Field("vm_id"),
            );
        }
        for (m, tail) in snap_routes {
            let p = format!("/v1/snapshots/{seg}{tail}");
            let a = d.raw(m, &p, None, b"");
            c.check(
                &format!("{m} {p}"),
                (a.status, &a.body),
                400,
                Want::Field("snapshot_id"),
            );
        }
    }
    // Paths that match no route (an empty last segment, extra segments, `..`
    // between segments), and two that match one with a bad id: an empty
    // middle segment, and `keep%2Fpause`, one segment decoded to `keep/pause`.
    for (p, code, want) in [
        ("/v1/vm/", 404, Want::Message("no route")),
        (
            "/v1/vm/keep/../../v1/health",
            404,
            Want::Message("no route"),
        ),
        ("/v1/vm/keep/pause/x", 404, Want::Message("no route")),
        ("/v1/snapshots/", 404, Want::Message("no route")),
        ("/v1/../etc/passwd", 404, Want::Message("no route")),
        ("/v1/vm//pause", 400, Want::Field("vm_id")),
        ("/v1/vm/keep%2Fpause", 400, Want::Field("vm_id")),
    ] {
        let m = if p.ends_with("%2Fpause") {
            "GET"
        } else {
            "POST"
        };
        let a = d.raw(m, p, None, b"");
        c.check(p, (a.status, &a.body), code, want);
    }
    let (_, v) = d.call("GET", "/v1/vm/keep", None);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(d.engine.list().len(), 1);
    d.assert_healthy();
    c.done("ids in URL paths");
    finish(d, dir);
}

/// A Unix socket file at `p` (its listener closed).
fn socket_file(p: &Path) {
    drop(std::os::unix::net::UnixListener::bind(p).unwrap());
}

fn fifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::S_IRWXU).unwrap();
}

#[test]
fn rootfs_kernel_and_initrd_must_be_regular_files_under_their_roots() {
    let mut dir = TestDir::new();
    let d0 = dir.path().to_path_buf();
    std::fs::write(d0.join("outside.img"), b"outside the roots").unwrap();
    for (root, name) in [
        ("rootfs", "x.ext4"),
        ("kernels", "vmlinux-x"),
        ("initramfs", "x.img"),
    ] {
        let r = d0.join(root);
        std::os::unix::fs::symlink(d0.join("outside.img"), r.join(format!("escape-{name}")))
            .unwrap();
        std::os::unix::fs::symlink("../outside.img", r.join(format!("rel-{name}"))).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", r.join(format!("passwd-{name}"))).unwrap();
        std::os::unix::fs::symlink("/dev/zero", r.join(format!("zero-{name}"))).unwrap();
        std::os::unix::fs::symlink(r.join("nowhere"), r.join(format!("dangling-{name}"))).unwrap();
        std::os::unix::fs::symlink(&r, r.join(format!("loop-{name}"))).unwrap();
        fifo(&r.join(format!("fifo-{name}")));
        std::fs::create_dir(r.join(format!("dir-{name}"))).unwrap();
        socket_file(&r.join(format!("sock-{name}")));
    }
    // Even a link to a good file inside the root is refused: a link can be
    // repointed between the check and the use.
    std::os::unix::fs::symlink("base.ext4", d0.join("rootfs/inside-x.ext4")).unwrap();
    std::os::unix::fs::symlink("vmlinux", d0.join("kernels/inside-vmlinux-x")).unwrap();
    dir.baseline = Some(common::baseline(&d0));
    let d = Daemon::start_with(dir.config(), &d0);
    let mut c = Cases::new();
    let kinds = [
        "escape", "rel", "passwd", "zero", "dangling", "loop", "fifo", "dir", "sock",
    ];
    for (field, name) in [
        ("disk.rootfs_id", "x.ext4"),
        ("kernel", "vmlinux-x"),
        ("initrd", "x.img"),
    ] {
        for k in kinds.iter().chain(["inside"].iter()) {
            let id = format!("{k}-{name}");
            if *k == "inside" && field == "initrd" {
                continue;
            }
            let mut b = overlay("v");
            match field {
                "disk.rootfs_id" => b["disk"]["rootfs_id"] = json!(id),
                f => b[f] = json!(id),
            }
            let started = Instant::now();
            let got = post(&d, "/v1/vm", &b);
            c.check(
                &format!("{field} {id}"),
                (got.0, &got.1),
                400,
                Want::Field(field),
            );
            assert!(
                got.1["error"]
                    .as_str()
                    .unwrap()
                    .contains("not a regular file"),
                "{field} {id}: {}",
                got.1
            );
            // A FIFO is never opened: the answer is immediate.
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{field} {id} took {:?}",
                started.elapsed()
            );
        }
    }
    assert!(d.engine.is_empty());
    d.assert_healthy();
    d.create_ok("after");
    c.done("files under the roots");
    finish(d, dir);
}

#[test]
fn direct_disks_and_shares_cannot_escape_direct_disk_roots() {
    let mut dir = TestDir::new();
    let d0 = dir.path().to_path_buf();
    let disks = d0.join("disks");
    std::fs::File::create(disks.join("ok.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::fs::create_dir(disks.join("share")).unwrap();
    std::fs::write(disks.join("share/f"), b"x").unwrap();
    std::fs::create_dir(d0.join("outside-dir")).unwrap();
    std::fs::write(d0.join("outside-dir/x.img"), b"outside").unwrap();
    std::fs::write(d0.join("outside.img"), b"outside").unwrap();
    std::fs::write(d0.join("outside2.img"), b"outside").unwrap();
    let sym = |target: &Path, name: &str| {
        std::os::unix::fs::symlink(target, disks.join(name)).unwrap();
    };
    sym(&d0.join("rootfs/base.ext4"), "escape.img");
    sym(Path::new("../outside.img"), "rel-escape.img");
    sym(&d0.join("outside-dir"), "escape-dir");
    sym(&disks.join("ok.img"), "inside-link.img");
    sym(&disks.join("share"), "inside-link-dir");
    sym(Path::new("/dev/null"), "null.img");
    sym(Path::new("/"), "root-link");
    fifo(&disks.join("fifo.img"));
    socket_file(&disks.join("sock.img"));
    std::fs::create_dir(disks.join("dir.img")).unwrap();
    std::fs::hard_link(d0.join("outside.img"), disks.join("hard.img")).unwrap();
    let mut cfg = dir.config();
    cfg.direct_disk_roots = vec![disks.clone()];
    dir.baseline = Some(common::baseline(&d0));
    let d = Daemon::start_with(cfg, &d0);
    let mut c = Cases::new();
    let p = |rel: &str| format!("{}/{rel}", disks.display());
    let long = format!("/{}", "a/".repeat(5000));
    let long_name = p(&"n".repeat(300));
    let proc_root = format!("/proc/self/root{}", p("ok.img"));

    // (path, status, word in the message) for a disk…
    let disk_cases: Vec<(String, u16, &str)> = vec![
        (p("escape.img"), 400, "symlink"),
        (p("rel-escape.img"), 400, "symlink"),
        (p("inside-link.img"), 400, "symlink"),
        (p("escape-dir/x.img"), 400, "through a symlink"),
        (p("root-link/etc/passwd"), 400, "through a symlink"),
        (proc_root.clone(), 400, "through a symlink"),
        ("/proc/self/fd/0".into(), 400, "symlink"),
        (p("null.img"), 400, "symlink"),
        ("/dev/null".into(), 400, "device"),
        ("/dev/zero".into(), 400, "device"),
        (p("fifo.img"), 400, "FIFO"),
        (p("sock.img"), 400, "socket"),
        (p("dir.img"), 400, "directory"),
        (disks.display().to_string(), 400, "directory"),
        ("/".into(), 400, "directory"),
        (p("hard.img"), 400, "hard link"),
        (p("../rootfs/base.ext4"), 400, ".."),
        (p("share/../ok.img"), 400, ".."),
        ("/..".into(), 400, ".."),
        ("ok.img".into(), 400, "absolute"),
        ("./ok.img".into(), 400, "absolute"),
        ("disks/ok.img".into(), 400, "absolute"),
        ("~/ok.img".into(), 400, "absolute"),
        ("".into(), 400, "absolute"),
        (format!("{}\0", p("ok.img")), 400, "NUL"),
        (format!("{}\0/../../etc/passwd", p("ok.img")), 400, "NUL"),
        ("\0".into(), 400, "NUL"),
        (p("missing.img"), 404, "does not exist"),
        (format!("{}/", p("ok.img")), 404, "does not exist"),
        (format!("{}\n", p("ok.img")), 404, "does not exist"),
        (long.clone(), 404, "does not exist"),
        (long_name.clone(), 404, "does not exist"),
        ("/etc/passwd".into(), 403, "direct_disk_roots"),
        (
            d0.join("outside2.img").display().to_string(),
            403,
            "direct_disk_roots",
        ),
    ];
    for (path, code, word) in &disk_cases {
        let b = json!({"vm_id": "v", "disk": {"kind": "direct", "path": path}});
        let got = post(&d, "/v1/vm", &b);
        c.check(
            &format!("disk.path {path:?}"),
            (got.0, &got.1),
            *code,
            Want::Field("disk.path"),
        );
        let err = got.1["error"].as_str().unwrap();
        assert!(
            err.contains(word),
            "disk.path {}: {word:?} not in {err}",
            short(path)
        );
    }
    // …and for a share's host directory.
    let share_cases: Vec<(String, u16, &str)> = vec![
        (p("escape-dir"), 400, "symlink"),
        (p("inside-link-dir"), 400, "symlink"),
        (p("root-link"), 400, "symlink"),
        (p("escape-dir/."), 400, "symlink"),
        (
            format!("/proc/self/root{}", p("share")),
            400,
            "through a symlink",
        ),
        ("/proc/self/cwd".into(), 400, "symlink"),
        (p("null.img"), 400, "symlink"),
        ("/dev/null".into(), 400, "device"),
        (p("fifo.img"), 400, "FIFO"),
        (p("sock.img"), 400, "socket"),
        (p("ok.img"), 400, "not a directory"),
        (p("share/../../outside-dir"), 400, ".."),
        ("share".into(), 400, "absolute"),
        ("".into(), 400, "absolute"),
        (format!("{}\0", p("share")), 400, "NUL"),
        (p("missing"), 404, "does not exist"),
        (long.clone(), 404, "does not exist"),
        ("/".into(), 403, "direct_disk_roots"),
        (disks.display().to_string(), 403, "direct_disk_roots"),
        (
            d0.join("outside-dir").display().to_string(),
            403,
            "direct_disk_roots",
        ),
    ];
    for (path, code, word) in &share_cases {
        let mut b = overlay("v");
        b["shares"] = json!([{"host_path": path, "guest_path": "/mnt/x"}]);
        let got = post(&d, "/v1/vm", &b);
        c.check(
            &format!("shares[0].host_path {path:?}"),
            (got.0, &got.1),
            *code,
            Want::Field("shares[0].host_path"),
        );
        let err = got.1["error"].as_str().unwrap();
        assert!(
            err.contains(word),
            "host_path {}: {word:?} not in {err}",
            short(path)
        );
    }
    // Guest mount points.
    let share = p("share");
    for g in [
        "mnt",
        "",
        "/",
        "//",
        "/mnt/../etc",
        "/mnt/./x",
        "/..",
        "/mnt\0/x",
        "/mnt x",
        "/mnt\n",
        "/mnté",
        "/mnt/١",
        "/mnt;rm",
        "/mnt:x",
        "/mnt,x",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("/{}", "m".repeat(300))])
    {
        let mut b = overlay("v");
        b["shares"] = json!([{"host_path": share, "guest_path": g}]);
        let got = post(&d, "/v1/vm", &b);
        c.check(
            &format!("guest_path {g:?}"),
            (got.0, &got.1),
            400,
            Want::Field("shares[0].guest_path"),
        );
    }
    // Too many shares.
    let mut b = overlay("v");
    b["shares"] = json!(vec![json!({"host_path": share, "guest_path": "/m"}); 9]);
    let got = post(&d, "/v1/vm", &b);
    c.check("9 shares", (got.0, &got.1), 400, Want::Field("shares"));

    assert!(d.engine.is_empty());
    // The good paths work, and the user's files are untouched.
    let b = json!({"vm_id": "good", "disk": {"kind": "direct", "path": p("ok.img")},
        "shares": [{"host_path": share, "guest_path": "/mnt/share"}]});
    let (code, v) = post(&d, "/v1/vm", &b);
    assert_eq!(code, 201, "{v}");
    assert_eq!(std::fs::read(d0.join("outside.img")).unwrap(), b"outside");
    assert_eq!(
        std::fs::read(d0.join("outside-dir/x.img")).unwrap(),
        b"outside"
    );
    d.assert_healthy();
    c.done("host paths");
    finish(d, dir);
}

#[test]
fn guest_paths_and_exec_requests_are_checked_before_the_agent() {
    let (d, dir) = Daemon::start();
    let mut c = Cases::new();
    d.create_ok("g");
    let long = format!("/{}", "a".repeat(5000));
    // exec: checked before the agent is asked (it is not even ready here).
    let exec_cases: Vec<(Value, &str)> = vec![
        (json!({"cmd": ["true"], "cwd": "rel"}), "cwd"),
        (json!({"cmd": ["true"], "cwd": ""}), "cwd"),
        (json!({"cmd": ["true"], "cwd": "./x"}), "cwd"),
        (json!({"cmd": ["true"], "cwd": "~"}), "cwd"),
        (json!({"cmd": ["true"], "cwd": "/tmp\u{0}/x"}), "cwd"),
        (json!({"cmd": ["true"], "cwd": long}), "cwd"),
        (json!({"cmd": []}), "cmd"),
        (json!({"cmd": [""]}), "cmd"),
        (json!({"cmd": ["ls\u{0}"]}), "cmd[0]"),
        (json!({"cmd": ["ls", "-l", "a\u{0}b"]}), "cmd[2]"),
        (json!({"cmd": "ls"}), "cmd"),
        (json!({"cmd": [1]}), "cmd[0]"),
        (json!({"cmd": ["true"], "env": {"": "x"}}), "env."),
        (json!({"cmd": ["true"], "env": {"A=B": "x"}}), "env.A=B"),
        (
            json!({"cmd": ["true"], "env": {"A\u{0}": "x"}}),
            "env.A\u{0}",
        ),
        (json!({"cmd": ["true"], "env": {"A": "x\u{0}y"}}), "env.A"),
        (json!({"cmd": ["true"], "env": {"A": 1}}), "env.A"),
        (json!({"cmd": ["true"], "env": ["A=1"]}), "env"),
        (
            json!({"cmd": ["true"], "stdin": "x", "stdin_base64": "eA=="}),
            "stdin_base64",
        ),
        (
            json!({"cmd": ["true"], "stdin_base64": "!!!"}),
            "stdin_base64",
        ),
        (
            json!({"cmd": ["true"], "stdin_base64": "eA=\u{0}"}),
            "stdin_base64",
        ),
        (json!({"cmd": ["true"], "stream": "yes"}), "stream"),
        (json!({"cmd": ["true"], "user": "root"}), "user"),
    ];
    for (body, field) in &exec_cases {
        let got = post(&d, "/v1/vm/g/exec", body);
        c.check(
            &format!("exec {body}"),
            (got.0, &got.1),
            400,
            Want::Field(field),
        );
    }
    // files: the query names the guest path.
    let q = |s: &str| format!("/v1/vm/g/files?{s}");
    let long_q = format!("path=%2F{}", "a".repeat(5000));
    let file_cases: Vec<(&str, String, &str)> = vec![
        ("GET", q("path=rel"), "path"),
        ("GET", q("path="), "path"),
        ("GET", q("path=%00"), "path"),
        ("GET", q("path=%2Fetc%00passwd"), "path"),
        ("GET", q("path=.%2Fx"), "path"),
        ("GET", q(&long_q), "path"),
        ("GET", q(""), "path"),
        ("GET", q("mode=644"), "path"),
        ("GET", q("path=%2Fx&mode=644"), "mode"),
        ("GET", q("path=%2Fx&make_parents=true"), "make_parents"),
        ("PUT", q("path=rel"), "path"),
        ("PUT", q("path="), "path"),
        ("PUT", q("path=%2Fa%00b"), "path"),
        ("PUT", q(&long_q), "path"),
        ("PUT", q("path=%2Ftmp%2F"), "path"),
        ("PUT", q("path=%2Fx&mode=999"), "mode"),
        ("PUT", q("path=%2Fx&mode=0x1"), "mode"),
        ("PUT", q("path=%2Fx&mode=-1"), "mode"),
        ("PUT", q("path=%2Fx&mode="), "mode"),
        ("PUT", q("path=%2Fx&mode=77777"), "mode"),
        ("PUT", q("path=%2Fx&mode=99999999999999999999"), "mode"),
        ("PUT", q("path=%2Fx&make_parents=maybe"), "make_parents"),
        ("PUT", q("path=%2Fx&path=%2Fy"), "path"),
    ];
    for (m, path, field) in &file_cases {
        let a = d.raw(m, path, Some("application/octet-stream"), b"data");
        c.check(
            &format!("{m} {}", short(path)),
            (a.status, &a.body),
            400,
            Want::Field(field),
        );
    }
    let (_, v) = d.call("GET", "/v1/vm/g", None);
    assert_eq!(v["state"], "running", "{v}");
    d.assert_healthy();
    c.done("guest paths and exec");
    finish(d, dir);
}

/// `n` bytes of `[`: JSON nested `n` deep.
fn nested(prefix: &str, n: usize) -> Vec<u8> {
    let mut b = prefix.as_bytes().to_vec();
    b.extend(std::iter::repeat_n(b'[', n));
    b
}

#[test]
fn hostile_bodies_are_refused_cleanly() {
    let (d, dir) = Daemon::start();
    let mut c = Cases::new();
    d.create_ok("g");
    let max = agentenv_api::MAX_BODY_BYTES;

    // Size: one byte over the limit, far over it, and over it without a length.
    let good = serde_json::to_vec(&overlay("edge")).unwrap();
    let mut over = good.clone();
    over.resize(max + 1, b' ');
    c.check(
        "64 KiB + 1",
        post_bytes(&d, "/v1/vm", &over).pair(),
        413,
        Want::Message("65536"),
    );
    let huge = vec![b' '; 10 << 20];
    c.check(
        "10 MiB",
        post_bytes(&d, "/v1/vm", &huge).pair(),
        413,
        Want::Message("65536"),
    );
    for (route, body) in [("/v1/vm/g/exec", &over), ("/v1/vm/g/snapshot", &huge)] {
        c.check(
            route,
            post_bytes(&d, route, body).pair(),
            413,
            Want::Message("65536"),
        );
    }
    let mut chunked = b"POST /v1/vm HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
        Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    for _ in 0..64 {
        chunked.extend_from_slice(b"4000\r\n");
        chunked.extend(std::iter::repeat_n(b' ', 0x4000));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let a = common::raw_http(&d.base, chunked, Duration::from_secs(10));
    c.check(
        "1 MiB chunked",
        (a.status, &a.body),
        413,
        Want::Message("65536"),
    );
    // Exactly at the limit is fine.
    let mut at = good.clone();
    at.resize(max, b' ');
    let (code, v) = post_bytes(&d, "/v1/vm", &at);
    assert_eq!(code, 201, "a body of exactly 64 KiB: {v}");

    // Malformed JSON.
    let malformed: Vec<&[u8]> = vec![
        b"{",
        b"}",
        b"[",
        b"nul",
        b"{\"vm_id\":}",
        b"{\"vm_id\":\"a\",}",
        b"{\"vm_id\":\"a\",\"disk\":{\"kind\":\"overlay\",\"rootfs_id\":\"base.ext4\"}} x",
        b"{\"vm_id\":\"a\",\"disk\":{\"kind\":\"overlay\",\"rootfs_id\":\"base.ext4\"}}{}",
        b"\xef\xbb\xbf{\"vm_id\":\"a\"}",
        b"{'vm_id':'a'}",
        b"/* c */ {}",
        b"{\"vm_id\": NaN}",
        b"{\"vm_id\":\"\\ud800\"}",
        b"{\"vm_id\":\"\\u12\"}",
        b"{\"vm_id\":\"\\x41\"}",
        b"{\"vm_id\":\"\xff\xfe\"}",
        b"{\"vm_id\":\"a\nb\"}",
        b"{\"vm_id\":\"a\x00b\"}",
        b"{\"vm_id\":\"a\"",
        b"{\"slots\": 01}",
        b"{\"slots\": 1.}",
        b"{\"slots\": +1}",
        b"{\"slots\": 0x10}",
        b"{vm_id:\"a\"}",
        b"\x00",
        b"\xff\xfe{\x00}\x00",
    ];
    for body in &malformed {
        let got = post_bytes(&d, "/v1/vm", body);
        c.check(
            &format!("body {:?}", String::from_utf8_lossy(body)),
            (got.0, &got.1),
            400,
            Want::Message("JSON"),
        );
        // No made-up field: serde's `?` for a position it cannot name is dropped.
        assert!(
            !got.1["field"].as_str().is_some_and(|f| f.contains('?')),
            "{}",
            got.1
        );
    }
    // Truncated bodies blame the object they stop in, or nothing.
    for (body, field) in [
        (&b"{"[..], Value::Null),
        (b"{\"vm_id\":\"a\"", Value::Null),
        (b"{\"vm_id\":\"a\",\"disk\":{", json!("disk")),
        (b"{\"vm_id\":\"a\",\"shares\":[{", json!("shares[0]")),
    ] {
        let got = post_bytes(&d, "/v1/vm", body);
        let ctx = format!("truncated {:?}", String::from_utf8_lossy(body));
        c.check(&ctx, (got.0, &got.1), 400, Want::Message("EOF"));
        assert_eq!(got.1["field"], field, "{ctx}: {}", got.1);
    }
    // Empty bodies.
    for (route, body) in [
        ("/v1/vm", &b""[..]),
        ("/v1/vm", b"  \r\n\t "),
        ("/v1/vm/g/exec", b""),
    ] {
        c.check(
            &format!("empty {route}"),
            post_bytes(&d, route, body).pair(),
            400,
            Want::Message("empty"),
        );
    }
    // Wrong types, at every level.
    let ov = json!({"kind": "overlay", "rootfs_id": "base.ext4"});
    let wrong: Vec<(Value, Want)> = vec![
        (json!({"vm_id": 5, "disk": ov}), Want::Field("vm_id")),
        (json!({"vm_id": [], "disk": ov}), Want::Field("vm_id")),
        (json!({"vm_id": {}, "disk": ov}), Want::Field("vm_id")),
        (json!({"vm_id": null, "disk": ov}), Want::Field("vm_id")),
        (json!({"vm_id": true, "disk": ov}), Want::Field("vm_id")),
        (
            json!({"vm_id": "a", "disk": "overlay"}),
            Want::Field("disk"),
        ),
        (json!({"vm_id": "a", "disk": []}), Want::Field("disk")),
        (json!({"vm_id": "a", "disk": null}), Want::Field("disk")),
        (json!({"vm_id": "a", "disk": {}}), Want::Message("kind")),
        (
            json!({"vm_id": "a", "disk": {"kind": 1}}),
            Want::FieldPrefix("disk"),
        ),
        (
            json!({"vm_id": "a", "disk": {"kind": "overlay"}}),
            Want::Message("rootfs_id"),
        ),
        // Inside the tagged `disk` enum serde loses the path; the JSON layer
        // finds the key at fault.
        (
            json!({"vm_id": "a", "disk": {"kind": "overlay", "rootfs_id": 1}}),
            Want::Field("disk.rootfs_id"),
        ),
        (
            json!({"vm_id": "a", "disk": {"kind": "direct", "path": ["/x"]}}),
            Want::Field("disk.path"),
        ),
        (
            json!({"vm_id": "a", "disk": ov, "kernel": 1}),
            Want::Field("kernel"),
        ),
        (
            json!({"vm_id": "a", "disk": ov, "boot_args": ["a"]}),
            Want::Field("boot_args"),
        ),
        (
            json!({"vm_id": "a", "disk": ov, "shares": {}}),
            Want::Field("shares"),
        ),
        (
            json!({"vm_id": "a", "disk": ov, "shares": ["x"]}),
            Want::Field("shares[0]"),
        ),
        (
            json!({"vm_id": "a", "disk": ov, "shares": [{"host_path": "/x", "guest_path": "/y", "read_only": "no"}]}),
            Want::Field("shares[0].read_only"),
        ),
        (
            json!({"vm_id": "a", "disk": ov, "wait_ready": "yes"}),
            Want::Field("wait_ready"),
        ),
        (
            json!({"vm_id": "a", "disk": ov, "network": "tap0"}),
            Want::Field("network"),
        ),
        (json!([]), Want::Message("not an array")),
        (
            json!(["a", null, {"kind": "overlay", "rootfs_id": "base.ext4"}]),
            Want::Message("not an array"),
        ),
        (json!("vm"), Want::Message("invalid")),
        (json!(5), Want::Message("invalid")),
        (json!(null), Want::Message("invalid")),
    ];
    for (body, want) in wrong {
        let got = post(&d, "/v1/vm", &body);
        c.check(&format!("body {body}"), (got.0, &got.1), 400, want);
    }
    // Unknown and duplicate fields.
    let unknown: Vec<(&str, Value, Want)> = vec![
        (
            "/v1/vm",
            json!({"vm_id": "a", "disk": ov, "memory": 1}),
            Want::Field("memory"),
        ),
        (
            "/v1/vm",
            json!({"VM_ID": "a", "disk": ov}),
            Want::Field("VM_ID"),
        ),
        (
            "/v1/vm",
            json!({"vm-id": "a", "disk": ov}),
            Want::Field("vm-id"),
        ),
        (
            "/v1/vm",
            json!({"": "a", "vm_id": "a", "disk": ov}),
            Want::Message("unknown field"),
        ),
        (
            "/v1/vm",
            json!({"vm_id": "a", "disk": {"kind": "overlay", "rootfs_id": "base.ext4", "x": 1}}),
            Want::FieldPrefix("disk"),
        ),
        (
            "/v1/vm",
            json!({"vm_id": "a", "disk": ov, "shares": [{"host_path": "/x", "guest_path": "/y", "uid": 0}]}),
            Want::FieldPrefix("shares[0]"),
        ),
        (
            "/v1/vm",
            json!({"vm_id": "a", "disk": ov, "network": {"tap_name": "t", "guest_mac": "06:00:00:00:00:01", "mtu": 9000}}),
            Want::FieldPrefix("network"),
        ),
        (
            "/v1/vm/g/exec",
            json!({"cmd": ["true"], "uid": 0}),
            Want::Field("uid"),
        ),
        (
            "/v1/vm/g/snapshot",
            json!({"snapshot_id": "s", "tier": "tmpfs"}),
            Want::Field("tier"),
        ),
        (
            "/v1/snapshots/none/persist",
            json!({"keep": true}),
            Want::Field("keep"),
        ),
    ];
    for (route, body, want) in unknown {
        let got = post(&d, route, &body);
        c.check(&format!("{route} {body}"), (got.0, &got.1), 400, want);
    }
    let dup = br#"{"vm_id":"a","vm_id":"b","disk":{"kind":"overlay","rootfs_id":"base.ext4"}}"#;
    c.check(
        "duplicate vm_id",
        post_bytes(&d, "/v1/vm", dup).pair(),
        400,
        Want::Message("duplicate field"),
    );

    // Deep nesting: no stack overflow, a clean 400 (or 413 past 64 KiB).
    for (route, prefix) in [
        ("/v1/vm", ""),
        ("/v1/vm", "{\"vm_id\":\"a\",\"disk\":"),
        ("/v1/vm", "{\"vm_id\":\"a\",\"shares\":"),
        ("/v1/vm", "{\"x\":"),
        ("/v1/vm/g/exec", "{\"cmd\":"),
        ("/v1/vm/g/exec", "{\"env\":"),
        ("/v1/vm/g/snapshot", ""),
        ("/v1/snapshots/none/persist", "{\"keep_tmpfs\":"),
    ] {
        let body = nested(prefix, 60_000);
        let got = post_bytes(&d, route, &body);
        c.check(
            &format!("{route} {prefix}[×60000"),
            (got.0, &got.1),
            400,
            Want::Message(""),
        );
    }
    let mut objs = b"{\"vm_id\":\"a\",\"disk\":".to_vec();
    for _ in 0..8000 {
        objs.extend_from_slice(b"{\"a\":");
    }
    c.check(
        "{\"a\": ×8000",
        post_bytes(&d, "/v1/vm", &objs).pair(),
        400,
        Want::Message(""),
    );
    c.check(
        "[×100000",
        post_bytes(&d, "/v1/vm", &nested("", 100_000)).pair(),
        413,
        Want::Message("65536"),
    );

    // Content types other than JSON are 415 before the body is read: a
    // browser sends those cross-site without asking first (issue 14). The
    // valid body shows that the type alone decides.
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/octet-stream"),
        None,
    ] {
        let body = serde_json::to_vec(&overlay("ct")).unwrap();
        let a = d.raw("POST", "/v1/vm", ct, &body);
        c.check(
            &format!("{ct:?} body"),
            (a.status, &a.body),
            415,
            Want::Field("Content-Type"),
        );
    }
    assert_eq!(
        d.call("GET", "/v1/vm/ct", None).0,
        404,
        "nothing was created"
    );
    // A JSON type with a parameter is JSON: the body is parsed and refused
    // the usual way.
    {
        let ct = Some("application/json; charset=utf-16");
        let a = d.raw("POST", "/v1/vm", ct, b"vm_id=a&disk=overlay");
        c.check(
            &format!("{ct:?} form body"),
            (a.status, &a.body),
            400,
            Want::Message("JSON"),
        );
        let body = serde_json::to_vec(&overlay("../x")).unwrap();
        let a = d.raw("POST", "/v1/vm", ct, &body);
        c.check(
            &format!("{ct:?} bad id"),
            (a.status, &a.body),
            400,
            Want::Field("vm_id"),
        );
        let utf16: Vec<u8> = "{\"vm_id\":\"a\"}"
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect();
        let a = d.raw("POST", "/v1/vm", ct, &utf16);
        c.check(
            &format!("{ct:?} UTF-16"),
            (a.status, &a.body),
            400,
            Want::Message("JSON"),
        );
    }
    // Methods and routes that do not exist.
    for (m, p, code, word) in [
        ("PUT", "/v1/vm", 405, "not allowed"),
        ("PATCH", "/v1/vm/g", 405, "not allowed"),
        ("BREW", "/v1/vm", 405, "not allowed"),
        ("GET", "/v1/vm/g/pause", 405, "not allowed"),
        ("POST", "/v2/vm", 404, "no route"),
    ] {
        let a = d.raw(m, p, Some("application/json"), b"{}");
        c.check(
            &format!("{m} {p}"),
            (a.status, &a.body),
            code,
            Want::Message(word),
        );
    }

    assert_eq!(d.engine.list().len(), 2, "only g and edge exist");
    let (_, v) = d.call("GET", "/v1/vm/g", None);
    assert_eq!(v["state"], "running", "{v}");
    d.assert_healthy();
    c.done("bodies");
    finish(d, dir);
}

#[test]
fn hostile_numbers_are_400_naming_the_field() {
    let (d, dir) = Daemon::start();
    let mut c = Cases::new();
    d.create_ok("g");
    let ov = r#"{"kind":"overlay","rootfs_id":"base.ext4"}"#;
    let too_big = [
        "4294967296",
        "18446744073709551615",
        "18446744073709551616",
        "340282366920938463463374607431768211456",
        "1e400",
        "-1e400",
    ];
    // Raw number text, so that 2^64, 1e400 and -0 reach the parser as written.
    let mut cases: Vec<(String, String, Want)> = Vec::new();
    for n in [
        "0", "-0", "33", "-1", "1.5", "1.0", "1e2", "\"1\"", "true", "[]", "{}",
    ]
    .iter()
    .chain(too_big.iter())
    {
        cases.push((
            "/v1/vm".into(),
            format!(r#"{{"vm_id":"n","slots":{n},"disk":{ov}}}"#),
            Want::Field("slots"),
        ));
    }
    // Sizes the engine range-checks and values that are not a u64 at all
    // (which fail inside serde's internally tagged `disk` enum, whose path
    // the JSON layer recovers) are both blamed on `disk.disk_size_gib`.
    let disk_size = |n: &str| {
        format!(
            r#"{{"vm_id":"n","disk":{{"kind":"overlay","rootfs_id":"base.ext4","disk_size_gib":{n}}}}}"#
        )
    };
    for n in [
        "0",
        "16385",
        "9223372036854775808",
        "18446744073709551615",
        "1e400",
    ] {
        cases.push((
            "/v1/vm".into(),
            disk_size(n),
            Want::Field("disk.disk_size_gib"),
        ));
    }
    for n in ["-0", "-1", "1.5", "\"1\"", "false", "18446744073709551616"] {
        cases.push((
            "/v1/vm".into(),
            disk_size(n),
            Want::Field("disk.disk_size_gib"),
        ));
    }
    for n in ["0", "-1", "3601", "1.5", "\"5\""]
        .iter()
        .chain(too_big.iter())
    {
        cases.push((
            "/v1/vm".into(),
            format!(r#"{{"vm_id":"n","wait_ready":true,"wait_ready_timeout_s":{n},"disk":{ov}}}"#),
            Want::Field("wait_ready_timeout_s"),
        ));
    }
    for n in [
        "-1",
        "0",
        "-0.0",
        "86400.5",
        "1e9",
        "1e400",
        "-1e400",
        "1e-400",
        "\"NaN\"",
        "\"inf\"",
        "\"-Infinity\"",
        "\"1\"",
        "true",
        "[]",
    ] {
        cases.push((
            "/v1/vm/g/exec".into(),
            format!(r#"{{"cmd":["true"],"timeout_s":{n}}}"#),
            Want::Field("timeout_s"),
        ));
    }
    for n in ["\"yes\"", "1", "[]"] {
        cases.push((
            "/v1/snapshots/none/persist".into(),
            format!(r#"{{"keep_tmpfs":{n}}}"#),
            Want::Field("keep_tmpfs"),
        ));
    }
    for (route, body, want) in cases {
        let got = post_bytes(&d, &route, body.as_bytes());
        c.check(&format!("{route} {body}"), (got.0, &got.1), 400, want);
    }
    assert_eq!(d.engine.list().len(), 1);
    d.assert_healthy();
    d.create_ok("after");
    c.done("numbers");
    finish(d, dir);
}

/// `(code, body)` as the pair `Cases::check` takes.
trait Pair {
    fn pair(&self) -> (u16, &Value);
}

impl Pair for (u16, Value) {
    fn pair(&self) -> (u16, &Value) {
        (self.0, &self.1)
    }
}

/// Sends `head`, then `piece` every 100 ms for as long as the connection
/// takes it, and reads the answer; panics when none comes within 30 s.
fn trickle(d: &Daemon, head: String, piece: &'static [u8]) -> (u16, Value, Duration) {
    let (a, took) = common::raw_exchange(&d.base, Duration::from_secs(30), move |mut w, stop| {
        use std::io::Write;
        if w.write_all(&common::with_auth(head.into_bytes())).is_err() {
            return;
        }
        while !stop.load(Ordering::SeqCst) && w.write_all(piece).is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    (a.status, a.body, took)
}

#[test]
fn bodies_trickled_forever_end_in_408_with_the_default_timeout() {
    let default_ms = agentenv_core::config::Config::default().body_timeout_ms;
    assert!(
        default_ms <= 30_000,
        "body_timeout_ms defaults to {default_ms}"
    );
    let (d, dir) = Daemon::start();
    d.create_ok("g");
    let head = |path: &str, framing: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n{framing}\r\n\r\n")
    };
    let sized = "Content-Length: 1000";
    let chunked = "Transfer-Encoding: chunked";
    let cases: Vec<(String, &'static [u8])> = vec![
        (head("/v1/vm", sized), b" "),
        (head("/v1/vm", chunked), b"1\r\n \r\n"),
        (head("/v1/vm/g/exec", sized), b" "),
        (head("/v1/vm/g/snapshot", sized), b" "),
        (head("/v1/vm/g/snapshot", chunked), b"1\r\n \r\n"),
        (head("/v1/snapshots/none/persist", sized), b" "),
    ];
    let d = Arc::new(d);
    let handles: Vec<_> = cases
        .into_iter()
        .map(|(h, piece)| {
            let d = d.clone();
            std::thread::spawn(move || {
                let first = h.lines().next().unwrap().to_string();
                let framing = if h.contains("chunked") {
                    "chunked"
                } else {
                    "sized"
                };
                (format!("{first} ({framing})"), trickle(&d, h, piece))
            })
        })
        .collect();
    let mut c = Cases::new();
    for h in handles {
        let (ctx, (code, v, took)) = h.join().unwrap();
        c.check(&ctx, (code, &v), 408, Want::Message("body_timeout_ms"));
        assert!(
            took >= Duration::from_millis(default_ms) && took < Duration::from_secs(30),
            "{ctx}: answered after {took:?}"
        );
    }
    let d = Arc::into_inner(d).unwrap();
    // Nothing was made, the VM was not touched, the permits came back.
    let (_, v) = d.call("GET", "/v1/vm/g", None);
    assert_eq!(v["state"], "running", "{v}");
    let (_, snaps) = d.call("GET", "/v1/snapshots", None);
    assert_eq!(snaps["snapshots"], json!([]));
    d.create_ok("after");
    d.assert_healthy();
    c.done("bodies trickled forever");
    finish(d, dir);
}
