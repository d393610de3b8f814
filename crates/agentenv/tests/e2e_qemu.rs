//! End to end with real guests: the daemon's HTTP API, the QEMU microvm backend
//! (TCG here), Debian's kernel and the minimal rootfs from `artifacts/`.
//! Skips with a reason when QEMU or the artifacts are missing; CI builds them.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use agentenv_core::config::Config;
use common::{finish, Daemon, TestDir};
use serde_json::{json, Value};

const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 agentenv.heartbeat=1";
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn console(vm: &Value) -> String {
    String::from_utf8_lossy(&std::fs::read(vm["console_log"].as_str().unwrap()).unwrap_or_default())
        .into_owned()
}

/// Waits until the console has a line containing `needle`; returns that line.
fn wait_line(vm: &Value, needle: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = console(vm);
        // Only whole lines: the guest may be half-way through writing the last one.
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        if let Some(l) = complete.lines().find(|l| l.contains(needle)) {
            return l.trim().to_string();
        }
        assert!(
            start.elapsed() < timeout,
            "no {needle:?} on the console after {timeout:?}; tail:\n{}",
            text.lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn heartbeats(vm: &Value) -> usize {
    console(vm)
        .lines()
        .filter(|l| l.contains("agentenv-heartbeat"))
        .count()
}

fn create(d: &Daemon, body: Value) -> Value {
    let (code, v) = d.call("POST", "/v1/vm", Some(body));
    assert_eq!(code, 201, "{v}");
    v
}

fn overlay(vm_id: &str) -> Value {
    json!({"vm_id": vm_id, "boot_args": BOOT_ARGS,
           "disk": {"kind": "overlay", "rootfs_id": "minimal.ext4"}})
}

/// Reads a file out of an ext4 image with debugfs (no mount needed).
fn debugfs_cat(image: &str, path: &str) -> String {
    let out = std::process::Command::new("debugfs")
        .args(["-R", &format!("cat {path}"), image])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn boot_pause_resume_shutdown_and_boot_again() {
    let art = need_artifacts!();
    let base = art.join("rootfs/minimal.ext4");
    let base_sum = sha256(&base);
    let mut dir = TestDir::new();
    let cfg = common::qemu_config(&dir, &art);
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());

    let t = Instant::now();
    let vm = create(&d, overlay("e1"));
    assert_eq!(vm["backend"], "qemu");
    assert_eq!(vm["state"], "running");
    let ready = wait_line(&vm, "AGENTENV_READY", BOOT_TIMEOUT);
    eprintln!("e1 ready after {:?}: {ready}", t.elapsed());
    assert!(ready.contains("vm_id=e1"), "{ready}");
    wait_line(&vm, "agentenv-heartbeat 3", Duration::from_secs(20));

    // Paused: the guest makes no progress.
    let (code, v) = d.call("POST", "/v1/vm/e1/pause", None);
    assert_eq!((code, v["state"].as_str()), (200, Some("paused")), "{v}");
    std::thread::sleep(Duration::from_millis(300));
    let n1 = heartbeats(&vm);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(heartbeats(&vm), n1, "heartbeats while paused");
    // Resumed: it goes on.
    let (code, v) = d.call("POST", "/v1/vm/e1/resume", None);
    assert_eq!((code, v["state"].as_str()), (200, Some("running")), "{v}");
    let start = Instant::now();
    while heartbeats(&vm) <= n1 + 2 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no heartbeats after resume"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Shutdown: the guest powers off and QEMU exits by itself.
    let (code, v) = d.call("POST", "/v1/vm/e1/shutdown", None);
    assert_eq!(code, 200, "{v}");
    common::assert_shut_down_by_request(&v);
    // What the guest wrote landed in its overlay; the base is untouched.
    let boots = debugfs_cat(
        vm["disk"]["writable_path"].as_str().unwrap(),
        "/upper/var/lib/agentenv/boots",
    );
    assert!(
        boots.contains("e1"),
        "boot record missing from the overlay: {boots:?}"
    );
    assert_eq!(sha256(&base), base_sum, "base image changed");

    // The same base boots again.
    let vm2 = create(&d, overlay("e2"));
    let ready = wait_line(&vm2, "AGENTENV_READY", BOOT_TIMEOUT);
    assert!(
        ready.contains("vm_id=e2") && ready.contains("boots=1"),
        "{ready}"
    );
    finish(d, dir);
    assert_eq!(sha256(&base), base_sum, "base image changed");
}

#[test]
fn a_kernel_panic_ends_in_failed_with_the_cause() {
    let art = need_artifacts!();
    let mut dir = TestDir::new();
    let cfg = common::qemu_config(&dir, &art);
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());
    let vm = create(
        &d,
        json!({"vm_id": "panics", "boot_args": "console=ttyS0 reboot=k panic=1 rdinit=/nonexistent",
               "disk": {"kind": "overlay", "rootfs_id": "minimal.ext4"}}),
    );
    let v = d.wait_state("panics", "failed", BOOT_TIMEOUT);
    let cause = v["exit"]["cause"].as_str().unwrap();
    assert!(
        cause.starts_with("guest kernel panic:"),
        "{cause}\n{}",
        console(&vm)
    );
    finish(d, dir);
}

#[test]
fn snapshot_carries_guest_data_into_a_new_vm_while_the_source_runs() {
    let art = need_artifacts!();
    let mut dir = TestDir::new();
    let cfg = common::qemu_config(&dir, &art);
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());
    let src = create(&d, overlay("src"));
    wait_line(&src, "AGENTENV_READY", BOOT_TIMEOUT);
    let before = heartbeats(&src);

    let (code, s) = d.call(
        "POST",
        "/v1/vm/src/snapshot",
        Some(json!({"snapshot_id": "snap1"})),
    );
    assert_eq!(code, 201, "{s}");
    // The source keeps running.
    let (_, v) = d.call("GET", "/v1/vm/src", None);
    assert_eq!(v["state"], "running");
    let start = Instant::now();
    while heartbeats(&src) <= before + 2 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "source stopped making progress"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The copy boots with the source's data: its boot log already holds the
    // source's boot, and the guest reports two boots.
    let copy = create(
        &d,
        json!({"vm_id": "copy", "boot_args": BOOT_ARGS,
               "disk": {"kind": "snapshot", "snapshot_id": "snap1"}}),
    );
    let ready = wait_line(&copy, "AGENTENV_READY", BOOT_TIMEOUT);
    assert!(
        ready.contains("vm_id=copy") && ready.contains("boots=2"),
        "{ready}"
    );
    wait_line(&copy, "agentenv: previous boot src", Duration::from_secs(5));
    assert_eq!(d.call("DELETE", "/v1/snapshots/snap1", None).0, 204);
    finish(d, dir);
}

/// A `qemu_binary` that runs QEMU inside the network namespace holding the TAPs.
#[test]
fn guests_reach_their_gateway_and_the_outside_but_not_each_other() {
    let art = need_artifacts!();
    if let Some(why) = agentenv_testkit::netns::unavailable() {
        agentenv_testkit::skip::skip(&why);
        return;
    }
    let ns = agentenv_testkit::netns::NetnsPair::new("e2e").unwrap();
    let mut dir = TestDir::new();
    let cfg = common::qemu_config(&dir, &art);
    let d = common::start_networked(cfg, &mut dir, &ns);
    let before = ns.state();

    // a: eth0 from the command line; its gateway and the outside answer.
    let a = create(
        &d,
        json!({"vm_id": "a", "boot_args": format!("{BOOT_ARGS} agentenv.check=ping:172.20.1.1,ping:198.18.0.1"),
               "disk": {"kind": "overlay", "rootfs_id": "minimal.ext4"}}),
    );
    assert_eq!(a["guest_ip"], "172.20.1.2");
    wait_line(&a, "AGENTENV_READY", BOOT_TIMEOUT);
    let text = console(&a);
    assert!(
        text.contains("agentenv-check ping 172.20.1.1 ok"),
        "gateway:\n{text}"
    );
    assert!(
        text.contains("agentenv-check ping 198.18.0.1 ok"),
        "outside via NAT:\n{text}"
    );

    // b, while a runs: a is unreachable, b's own gateway answers.
    let b = create(
        &d,
        json!({"vm_id": "b", "boot_args": format!("{BOOT_ARGS} agentenv.check=ping:172.20.1.2,ping:172.20.1.1,ping:172.20.2.1"),
               "disk": {"kind": "overlay", "rootfs_id": "minimal.ext4"}}),
    );
    assert_eq!(b["guest_ip"], "172.20.2.2");
    wait_line(&b, "AGENTENV_READY", BOOT_TIMEOUT);
    let text = console(&b);
    assert!(
        text.contains("agentenv-check ping 172.20.2.1 ok"),
        "own gateway:\n{text}"
    );
    assert!(
        text.contains("agentenv-check ping 172.20.1.2 fail"),
        "other guest:\n{text}"
    );
    assert!(
        text.contains("agentenv-check ping 172.20.1.1 fail"),
        "other gateway:\n{text}"
    );

    finish(d, dir);
    assert_eq!(ns.state(), before, "namespace not back to its baseline");
}

#[test]
fn a_guest_sees_its_host_shares() {
    let art = need_artifacts!();
    let mut dir = TestDir::new();
    let share = dir.path().join("disks/data");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("hello.txt"), b"hello from the host").unwrap();
    let mut cfg = common::qemu_config(&dir, &art);
    cfg.direct_disk_roots = vec![dir.path().join("disks")];
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());
    let vm = create(
        &d,
        json!({"vm_id": "sh", "boot_args": format!("{BOOT_ARGS} agentenv.check=file:/mnt/data/hello.txt,file:/mnt/data/missing"),
               "disk": {"kind": "overlay", "rootfs_id": "minimal.ext4"},
               "shares": [{"host_path": share, "guest_path": "/mnt/data"}]}),
    );
    wait_line(&vm, "AGENTENV_READY", BOOT_TIMEOUT);
    let text = console(&vm);
    assert!(
        text.contains("agentenv-check file /mnt/data/hello.txt ok hello from the host"),
        "{text}"
    );
    assert!(
        text.contains("agentenv-check file /mnt/data/missing fail"),
        "{text}"
    );
    finish(d, dir);
}

/// Skips (with the reason) when the base image predates the guest agent.
fn image_has_agent(art: &Path) -> bool {
    let out = std::process::Command::new("debugfs")
        .args(["-R", "stat /usr/sbin/agentenv-guest"])
        .arg(art.join("rootfs/minimal.ext4"))
        .output()
        .unwrap();
    let ok = String::from_utf8_lossy(&out.stdout).contains("Inode:");
    if !ok {
        agentenv_testkit::skip::skip("rootfs/minimal.ext4 has no /usr/sbin/agentenv-guest (rebuild it with scripts/build-artifacts.sh)");
    }
    ok
}

fn exec(d: &Daemon, vm: &str, body: Value) -> Value {
    let (code, v) = d.call("POST", &format!("/v1/vm/{vm}/exec"), Some(body.clone()));
    assert_eq!(code, 200, "{body}: {v}");
    v
}

fn create_ready(d: &Daemon, mut body: Value) -> Value {
    body["wait_ready"] = json!(true);
    body["wait_ready_timeout_s"] = json!(BOOT_TIMEOUT.as_secs());
    let v = create(d, body);
    assert_eq!(v["ready"], true, "{v}");
    v
}

#[test]
fn the_guest_agent_runs_commands_moves_files_and_freezes_for_snapshots() {
    let art = need_artifacts!();
    if !image_has_agent(&art) {
        return;
    }
    let mut dir = TestDir::new();
    let mut cfg = common::qemu_config(&dir, &art);
    cfg.agent.max_output_bytes = 1 << 20;
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());

    let t = Instant::now();
    let vm = create_ready(&d, overlay("a1"));
    eprintln!("a1 ready (agent answers) after {:?}", t.elapsed());
    assert!(vm["agent"]["version"]
        .as_str()
        .unwrap()
        .starts_with("agentenv-guest "));

    // Exit codes, separate streams, stdin, environment, working directory.
    let r = exec(
        &d,
        "a1",
        json!({"cmd": ["sh", "-c", "echo out; echo err >&2; exit 42"]}),
    );
    assert_eq!(
        (
            r["exit_code"].as_i64(),
            r["stdout"].as_str(),
            r["stderr"].as_str()
        ),
        (Some(42), Some("out\n"), Some("err\n")),
        "{r}"
    );
    let r = exec(&d, "a1", json!({"cmd": ["cat"], "stdin": "from the host"}));
    assert_eq!(r["stdout"], "from the host", "{r}");
    let r = exec(
        &d,
        "a1",
        json!({"cmd": ["sh", "-c", "echo $X; pwd"], "env": {"X": "y"}, "cwd": "/tmp"}),
    );
    assert_eq!(r["stdout"], "y\n/tmp\n", "{r}");

    // 10 MiB of output, capped at 1 MiB as configured.
    let r = exec(
        &d,
        "a1",
        json!({"cmd": ["sh", "-c", "yes 0123456789abcdef | head -c 10485760"]}),
    );
    assert_eq!(r["stdout"].as_str().unwrap().len(), 1 << 20);
    assert_eq!(
        (r["truncated"].as_bool(), r["stdout_bytes"].as_u64()),
        (Some(true), Some(10 << 20))
    );

    // A timeout kills the command's process group.
    let t = Instant::now();
    let r = exec(
        &d,
        "a1",
        json!({"cmd": ["sh", "-c", "sleep 60 & sleep 60"], "timeout_s": 1}),
    );
    assert_eq!(
        (r["timed_out"].as_bool(), r["signal"].as_i64()),
        (Some(true), Some(9)),
        "{r}"
    );
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    let r = exec(
        &d,
        "a1",
        json!({"cmd": ["sh", "-c",
            "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' <$f; echo; done 2>/dev/null \
             | grep -c '^slee[p] 60' || true"]}),
    );
    assert_eq!(
        r["stdout"].as_str().unwrap().trim(),
        "0",
        "the group survived: {r}"
    );
    assert_eq!(r["stderr"], "", "{r}");

    // A 64 MiB binary file, up and down, with the guest's own checksum.
    let data = common::noise(64 << 20, 0x9e37_79b9_7f4a_7c15);
    let local = dir.path().join("big.bin");
    std::fs::write(&local, &data).unwrap();
    let c = d.client();
    let t = Instant::now();
    let no_opts = agentenv_client::UploadOptions::default();
    let file = std::fs::File::open(&local).unwrap();
    let len = file.metadata().unwrap().len();
    let w = c
        .upload("a1", "/root/big.bin", &no_opts, file, Some(len))
        .unwrap();
    eprintln!("64 MiB upload: {:?}", t.elapsed());
    assert_eq!(w.bytes, 64u64 << 20);
    let r = exec(&d, "a1", json!({"cmd": ["sha256sum", "/root/big.bin"]}));
    assert_eq!(
        r["stdout"].as_str().unwrap().split_whitespace().next(),
        Some(sha256(&local).as_str()),
        "{r}"
    );
    let t = Instant::now();
    let mut back = Vec::with_capacity(64 << 20);
    std::io::Read::read_to_end(&mut c.download("a1", "/root/big.bin").unwrap(), &mut back).unwrap();
    eprintln!("64 MiB download: {:?}", t.elapsed());
    assert!(back == data, "downloaded bytes differ");
    std::fs::remove_file(&local).unwrap();
    exec(&d, "a1", json!({"cmd": ["rm", "/root/big.bin"]}));

    // The agent keeps up: 100 sequential and 20 concurrent commands.
    common::sequential_and_concurrent_execs(&d, "a1", 20, 1.0);

    // A snapshot freezes the guest's file systems: data written a moment
    // before (still in the guest's page cache) is in the copy.
    exec(
        &d,
        "a1",
        json!({"cmd": ["sh", "-c", "echo frozen-in > /root/marker"]}),
    );
    let (code, snap) = d.call(
        "POST",
        "/v1/vm/a1/snapshot",
        Some(json!({"snapshot_id": "a1-snap"})),
    );
    assert_eq!(code, 201, "{snap}");
    assert_eq!(snap["fs_frozen"], true, "{snap}");
    // The source is thawed: it still writes.
    let r = exec(
        &d,
        "a1",
        json!({"cmd": ["sh", "-c", "echo after > /root/after && sync && cat /root/after"]}),
    );
    assert_eq!(r["stdout"], "after\n", "{r}");
    let (code, v) = d.call("DELETE", "/v1/vm/a1", None);
    assert_eq!(code, 204, "{v}");
    create_ready(
        &d,
        json!({"vm_id": "a2", "boot_args": BOOT_ARGS,
               "disk": {"kind": "snapshot", "snapshot_id": "a1-snap"}}),
    );
    let r = exec(&d, "a2", json!({"cmd": ["cat", "/root/marker"]}));
    assert_eq!(r["stdout"], "frozen-in\n", "{r}");
    let (code, _) = d.call("DELETE", "/v1/snapshots/a1-snap", None);
    assert_eq!(code, 204);
    finish(d, dir);
}

/// A QEMU daemon whose VMs outlive it (`on_shutdown = leave`), as after a crash.
fn daemon_that_leaves_its_vms(art: &Path) -> (Daemon, TestDir, Config) {
    let mut dir = TestDir::new();
    let mut cfg = common::qemu_config(&dir, art);
    cfg.on_shutdown = agentenv_core::config::OnShutdown::Leave;
    dir.baseline = Some(common::baseline(dir.path()));
    (Daemon::start_with(cfg.clone(), dir.path()), dir, cfg)
}

/// Waits until a re-adopted VM's agent answers the new daemon; how long it took.
fn wait_ready_again(d: &Daemon, vm: &str) -> Duration {
    let start = Instant::now();
    while d.call("GET", &format!("/v1/vm/{vm}"), None).1["ready"] != true {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "agent not ready again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

#[test]
fn a_restarted_daemon_re_adopts_a_qemu_guest_and_its_agent() {
    let art = need_artifacts!();
    if !image_has_agent(&art) {
        return;
    }
    let (d, dir, cfg) = daemon_that_leaves_its_vms(&art);
    let vm = create_ready(&d, overlay("r1"));
    let pid = vm["pid"].as_u64().unwrap();
    exec(
        &d,
        "r1",
        json!({"cmd": ["sh", "-c", "echo before > /root/state"]}),
    );
    // The daemon goes away; QEMU and the guest go on.
    d.stop();
    std::thread::sleep(Duration::from_millis(300));
    let d = Daemon::start_with(cfg, dir.path());
    let (_, v) = d.call("GET", "/v1/vm/r1", None);
    assert_eq!(
        (v["state"].as_str(), v["pid"].as_u64()),
        (Some("running"), Some(pid)),
        "{v}"
    );
    // The agent answers the new daemon over the same virtio-serial port.
    let took = wait_ready_again(&d, "r1");
    eprintln!("agent ready again {took:?} after the restart");
    let r = exec(&d, "r1", json!({"cmd": ["cat", "/root/state"]}));
    assert_eq!(r["stdout"], "before\n", "{r}");
    // QMP works: pause, resume; and the guest still powers off on request.
    assert_eq!(d.call("POST", "/v1/vm/r1/pause", None).1["state"], "paused");
    assert_eq!(
        d.call("POST", "/v1/vm/r1/resume", None).1["state"],
        "running"
    );
    let (code, v) = d.call("POST", "/v1/vm/r1/shutdown", None);
    assert_eq!((code, v["state"].as_str()), (200, Some("stopped")), "{v}");
    finish(d, dir);
}

#[test]
fn a_crash_mid_snapshot_leaves_the_guest_running_and_thawed() {
    let art = need_artifacts!();
    if !image_has_agent(&art) {
        return;
    }
    let (d, dir, cfg) = daemon_that_leaves_its_vms(&art);
    let pid = create_ready(&d, overlay("c1"))["pid"].as_u64();
    // The daemon dies with the guest's file systems frozen and the VM paused.
    d.engine.failpoints.arm_hang("snapshot.paused");
    common::fire(
        &d,
        "POST",
        "/v1/vm/c1/snapshot".into(),
        json!({"snapshot_id": "c1-snap"}),
        Duration::from_secs(60),
    );
    common::wait_hung(&d, "snapshot.paused");
    d.crash();

    let d = Daemon::start_with(cfg, dir.path());
    let (_, v) = d.call("GET", "/v1/vm/c1", None);
    assert_eq!(
        (v["state"].as_str(), v["pid"].as_u64()),
        (Some("running"), pid),
        "{v}"
    );
    assert_eq!(d.call("GET", "/v1/snapshots/c1-snap", None).0, 404);
    wait_ready_again(&d, "c1");
    // The new session thawed what the old one froze: a write and a sync
    // finish at once, not when the 10 s auto-thaw comes.
    let r = exec(
        &d,
        "c1",
        json!({"cmd": ["sh", "-c", "echo after > /root/after && sync && cat /root/after"],
               "timeout_s": 5}),
    );
    assert_eq!(
        (r["exit_code"].as_i64(), r["stdout"].as_str()),
        (Some(0), Some("after\n")),
        "{r}"
    );
    eprintln!("write after the restart took {} ms", r["duration_ms"]);
    finish(d, dir);
}
