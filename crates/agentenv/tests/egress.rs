//! Egress policy per VM through the daemon (docs/security.md, "Egress"):
//! `network.allow` / `network.internet` are checked, recorded, shown, enforced
//! as set elements in agentenv's nftables table, kept across a restart and
//! removed with the VM. Real guests (QEMU, TCG) prove the policy on real
//! connections. Everything runs in network namespaces these tests create,
//! never the machine's own. Needs root; the guest test needs the artifacts.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentenv_host::net::NetnsThread;
use agentenv_testkit::netns::{unavailable, NetnsPair};
use common::{finish, overlay_req, Daemon, TestDir};
use serde_json::{json, Value};

fn skip() -> bool {
    if let Some(why) = unavailable() {
        eprintln!("skipping: {why}");
        return true;
    }
    false
}

fn net_config(dir: &TestDir) -> agentenv_core::config::Config {
    let mut cfg = dir.config();
    cfg.network.enable = true;
    cfg
}

/// A daemon (over the Firecracker double) whose networking lives in a new
/// namespace pair, with the namespace's baseline state.
struct NetDaemon {
    ns: NetnsPair,
    dir: TestDir,
    d: Daemon,
    before: String,
}

fn start_net(tag: &str, tweak: impl FnOnce(&mut agentenv_core::config::Config)) -> NetDaemon {
    let ns = NetnsPair::new(tag).unwrap();
    let mut dir = TestDir::new();
    let mut cfg = net_config(&dir);
    tweak(&mut cfg);
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_in(cfg, dir.path(), Some(ns.host_path()));
    let before = ns.state();
    NetDaemon { ns, dir, d, before }
}

fn with_network(vm_id: &str, network: Value) -> Value {
    let mut body = overlay_req(vm_id);
    body["network"] = network;
    body
}

/// The elements of one of agentenv's sets, as nft prints them.
fn set_text(ns: &NetnsPair, set: &str) -> String {
    ns.exec(&["nft", "list", "set", "inet", "agentenv", set])
        .unwrap()
}

#[test]
fn egress_policy_is_recorded_shown_enforced_as_elements_and_survives_a_restart() {
    if skip() {
        return;
    }
    // VMs outlive the daemon, so the second one re-adopts them.
    let leave = |c: &mut agentenv_core::config::Config| {
        c.on_shutdown = agentenv_core::config::OnShutdown::Leave
    };
    let NetDaemon { ns, dir, d, before } = start_net("egress", leave);
    let cfg = d.cfg.clone();

    let (code, a) = d.call(
        "POST",
        "/v1/vm",
        Some(with_network(
            "a",
            json!({"allow": ["10.1.2.0/24:443", "10.9.0.0/16", "10.9.1.0/24", "192.0.2.7"],
                   "internet": false}),
        )),
    );
    assert_eq!(code, 201, "{a}");
    // Normalised: the /24 inside the /16 goes, a bare address is a /32.
    let want = json!({"internet": false, "deny_private": true,
                      "allow": ["10.1.2.0/24:443", "10.9.0.0/16", "192.0.2.7/32"]});
    assert_eq!(a["egress"], want, "{a}");
    assert!(a["warnings"].as_array().is_none(), "no warning: {a}");
    let b = d.create_ok("b");
    assert_eq!(
        b["egress"],
        json!({"internet": true, "deny_private": true, "allow": []})
    );
    assert_eq!(d.call("GET", "/v1/vm/a", None).1["egress"], want);

    let (ga, gb) = ("172.20.1.2", "172.20.2.2");
    let offline = set_text(&ns, "offline");
    assert!(offline.contains(ga) && !offline.contains(gb), "{offline}");
    let ports = set_text(&ns, "allow_ports");
    for proto in ["tcp", "udp"] {
        assert!(
            ports.contains(&format!("{ga} . 10.1.2.0/24 . {proto} . 443")),
            "{ports}"
        );
    }
    let nets = set_text(&ns, "allow_nets");
    assert!(nets.contains(&format!("{ga} . 10.9.0.0/16")), "{nets}");
    assert!(nets.contains(&format!("{ga} . 192.0.2.7")), "{nets}");
    assert!(!nets.contains("10.9.1.0"), "{nets}");
    let taps = set_text(&ns, "taps");
    assert!(
        taps.contains("\"agtap1\"") && taps.contains("\"agtap2\""),
        "{taps}"
    );

    // A fork's clones keep their source's policy (a fork never widens it).
    let (code, f) = d.call("POST", "/v1/vm/a/fork", Some(json!({"count": 1})));
    assert_eq!(code, 201, "{f}");
    let clone = &f["vms"][0];
    assert_eq!(clone["egress"], want, "{clone}");
    let gc = clone["guest_ip"].as_str().unwrap().to_string();
    assert!(set_text(&ns, "offline").contains(&gc), "{clone}");
    let cid = clone["vm_id"].as_str().unwrap().to_string();
    assert_eq!(d.call("DELETE", &format!("/v1/vm/{cid}"), None).0, 204);
    assert!(!set_text(&ns, "offline").contains(&gc));

    // A restart (VMs left running) restores the policy from the records.
    d.stop();
    let d = Daemon::start_in(cfg.clone(), dir.path(), Some(ns.host_path()));
    let a = d.call("GET", "/v1/vm/a", None).1;
    assert_eq!(a["state"], "running", "re-adopted: {a}");
    assert_eq!(a["egress"], want);
    assert_eq!(set_text(&ns, "offline"), offline);
    assert_eq!(set_text(&ns, "allow_ports"), ports);
    assert_eq!(set_text(&ns, "allow_nets"), nets);

    // deny_private is the daemon's: a restart without it shows and applies
    // that to every VM, their own policies unchanged.
    let rule = "ip daddr @private drop";
    assert!(ns
        .exec(&["nft", "list", "chain", "inet", "agentenv", "egress"])
        .unwrap()
        .contains(rule));
    d.stop();
    let mut open = cfg.clone();
    open.network.deny_private = false;
    let d = Daemon::start_in(open, dir.path(), Some(ns.host_path()));
    let a = d.call("GET", "/v1/vm/a", None).1;
    assert_eq!(a["egress"]["deny_private"], false, "{a}");
    assert_eq!(a["egress"]["allow"], want["allow"], "{a}");
    let chain = ns
        .exec(&["nft", "list", "chain", "inet", "agentenv", "egress"])
        .unwrap();
    assert!(!chain.contains(rule), "{chain}");
    assert_eq!(set_text(&ns, "offline"), offline);

    // Delete takes the VM's elements with it, and only its own.
    assert_eq!(d.call("DELETE", "/v1/vm/a", None).0, 204);
    assert!(!set_text(&ns, "offline").contains(ga));
    assert!(!set_text(&ns, "allow_ports").contains(ga));
    assert!(!set_text(&ns, "allow_nets").contains(ga));
    let taps = set_text(&ns, "taps");
    assert!(
        !taps.contains("\"agtap1\"") && taps.contains("\"agtap2\""),
        "{taps}"
    );
    finish(d, dir);
    // The baseline of a daemon started with deny_private = false.
    let before = before.replace(&format!("{rule}\n"), "");
    assert_eq!(ns.state(), before, "namespace differs after delete");
}

#[test]
fn bad_egress_requests_are_400_naming_the_entry_and_leave_nothing() {
    if skip() {
        return;
    }
    let NetDaemon { ns, dir, d, before } = start_net("egbad", |_| {});
    let many: Vec<String> = (0..65).map(|i| format!("10.0.{i}.0/24")).collect();
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"allow": ["10.1.2.0/24:443", "10.1.2.3/24"]}),
            "network.allow[1]",
            "host bits",
        ),
        (
            json!({"allow": ["10.1.2.0/33"]}),
            "network.allow[0]",
            "prefix length",
        ),
        (
            json!({"allow": ["10.1.2.0/24:0"]}),
            "network.allow[0]",
            "port",
        ),
        (
            json!({"allow": ["8.8.8.8:65536"]}),
            "network.allow[0]",
            "port",
        ),
        (json!({"allow": ["fc00::/7"]}), "network.allow[0]", "IPv4"),
        (
            json!({"allow": ["example.com:443"]}),
            "network.allow[0]",
            "IPv4",
        ),
        (json!({"allow": many}), "network.allow", "at most 64"),
        (
            json!({"tap_name": "tap0", "internet": false}),
            "network",
            "together",
        ),
    ];
    for (network, field, says) in cases {
        let (code, v) = d.call("POST", "/v1/vm", Some(with_network("bad", network.clone())));
        assert_eq!(code, 400, "{network} → {v}");
        assert_eq!(v["field"], field, "{network} → {v}");
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(field) && msg.contains(says), "{network} → {v}");
    }
    // Wrong types are refused by the schema.
    for network in [json!({"allow": "10.0.0.0/8"}), json!({"internet": "no"})] {
        let (code, v) = d.call("POST", "/v1/vm", Some(with_network("bad", network.clone())));
        assert_eq!(code, 400, "{network} → {v}");
    }
    assert_eq!(d.call("GET", "/v1/vm", None).1["vms"], json!([]));
    assert_eq!(ns.state(), before, "a refused create left something");
    finish(d, dir);
    assert_eq!(ns.state(), before);
}

#[test]
fn a_create_that_fails_at_any_step_leaves_no_policy_element() {
    if skip() {
        return;
    }
    let NetDaemon { ns, dir, d, before } = start_net("egrb", |_| {});
    let body = with_network(
        "rb",
        json!({"allow": ["10.1.2.0/24:443", "10.9.0.0/16"], "internet": false}),
    );
    let points: Vec<&str> = agentenv_core::engine::FAILPOINTS
        .iter()
        .copied()
        .filter(|f| f.starts_with("create."))
        .collect();
    assert!(points.contains(&"create.network"), "{points:?}");
    for fp in points {
        d.engine.failpoints.arm(fp);
        let (code, v) = d.call("POST", "/v1/vm", Some(body.clone()));
        d.engine.failpoints.clear();
        assert_eq!(code, 500, "{fp}: {v}");
        assert_eq!(ns.state(), before, "{fp} left a TAP or an element");
    }
    let (code, v) = d.call("POST", "/v1/vm", Some(body));
    assert_eq!(code, 201, "{v}");
    finish(d, dir);
    assert_eq!(ns.state(), before);
}

/// Issue 13: the seed's `tap_prefix = "tap"` next to other programs' `tap0`
/// and `tapfoo` (and a `tap9` named like ours): the daemon's start, its VMs
/// and a restart after a crash never remove or match them.
#[test]
fn the_daemon_never_touches_taps_it_did_not_create() {
    if skip() {
        return;
    }
    let ns = NetnsPair::new("tap13").unwrap();
    let foreign = ["tap0", "tapfoo", "tap9"];
    for name in foreign {
        ns.ip(&["tuntap", "add", "dev", name, "mode", "tap"])
            .unwrap();
    }
    let mut dir = TestDir::new();
    let mut cfg = net_config(&dir);
    cfg.network.tap_prefix = "tap".into();
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_in(cfg.clone(), dir.path(), Some(ns.host_path()));
    let before = ns.state();
    for name in foreign {
        assert!(
            before.contains(&format!(": {name}:")),
            "{name} gone: {before}"
        );
    }
    let v = d.create_ok("v1");
    assert_eq!(v["tap_name"], "tap1", "{v}");
    let ruleset = ns.exec(&["nft", "list", "ruleset"]).unwrap();
    assert!(!ruleset.contains('*'), "a wildcard: {ruleset}");
    for name in foreign {
        assert!(
            !ruleset.contains(&format!("\"{name}\"")),
            "{name}: {ruleset}"
        );
    }
    // A crash leaves the VM and tap1; the next start re-adopts both and
    // touches nothing else.
    d.crash();
    let d = Daemon::start_in(cfg, dir.path(), Some(ns.host_path()));
    let after = ns.state();
    for name in foreign {
        assert!(
            after.contains(&format!(": {name}:")),
            "{name} removed: {after}"
        );
    }
    assert_eq!(d.call("GET", "/v1/vm/v1", None).1["state"], "running");
    let tap1 = ns.ip(&["-d", "link", "show", "tap1"]).unwrap();
    assert!(tap1.contains("alias agentenv:v1"), "{tap1}");
    for name in foreign {
        let link = ns.ip(&["-d", "link", "show", name]).unwrap();
        assert!(!link.contains("alias"), "{link}");
    }
    finish(d, dir);
    assert_eq!(ns.state(), before);
}

#[test]
fn egress_fields_need_automatic_networking() {
    let (d, dir) = Daemon::start();
    for (network, field) in [
        (json!({"allow": ["10.0.0.0/8"]}), "network.allow"),
        (json!({"internet": false}), "network.internet"),
        (
            json!({"tap_name": "tap7", "guest_mac": "06:00:00:00:00:07", "allow": ["10.0.0.0/8"]}),
            "network.allow",
        ),
        (json!({"guest_mac": "06:00:00:00:00:07"}), "network"),
        (json!({}), "network.tap_name"),
    ] {
        let (code, v) = d.call("POST", "/v1/vm", Some(with_network("n", network.clone())));
        assert_eq!(code, 400, "{network} → {v}");
        assert_eq!(v["field"], field, "{network} → {v}");
    }
    assert_eq!(d.call("GET", "/v1/vm", None).1["vms"], json!([]));
    finish(d, dir);
}

// ------------------------------------------------------------ real guests --

/// A "public" host (TEST-NET-2 stands for the internet here) and a
/// "private" one (RFC 1918), both in the outside namespace, behind NAT.
const PUBLIC_IP: &str = "198.51.100.10";
const PRIVATE_IP: &str = "10.77.0.10";
const OPEN_PORT: u16 = 8080;
const OTHER_PORT: u16 = 8081;
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// TCP listeners in the outside namespace on both ports, on all its
/// addresses; what each connection sends is recorded as `port:line`.
struct Outside {
    got: Arc<Mutex<Vec<String>>>,
}

impl Outside {
    fn start(ns: &NetnsPair) -> Outside {
        for ip in [PUBLIC_IP, PRIVATE_IP] {
            let out = std::process::Command::new("ip")
                .args([
                    "-n",
                    &ns.outside,
                    "addr",
                    "add",
                    &format!("{ip}/32"),
                    "dev",
                    "lo",
                ])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        let path = PathBuf::from("/run/netns").join(&ns.outside);
        let thread = NetnsThread::spawn(Some(&path)).expect("join the outside namespace");
        let got = Arc::new(Mutex::new(Vec::new()));
        for port in [OPEN_PORT, OTHER_PORT] {
            let listener = thread
                .run_blocking(move || TcpListener::bind(("0.0.0.0", port)))
                .expect("worker")
                .expect("bind in the outside namespace");
            let got = got.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { continue };
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut text = String::new();
                    let _ = conn.read_to_string(&mut text);
                    got.lock().unwrap().push(format!("{port}:{}", text.trim()));
                }
            });
        }
        Outside { got }
    }

    fn received(&self, tag: &str) -> bool {
        self.got.lock().unwrap().iter().any(|l| l.ends_with(tag))
    }
}

fn exec_sh(d: &Daemon, vm: &str, script: &str) -> Value {
    let (code, v) = d.call(
        "POST",
        &format!("/v1/vm/{vm}/exec"),
        Some(json!({"cmd": ["sh", "-c", script], "timeout_s": 30})),
    );
    assert_eq!(code, 200, "exec in {vm}: {v}");
    v
}

/// Whether a TCP connection from the guest to `ip:port` gets through: the
/// guest sends a unique line with busybox `nc`, and the outside host must
/// receive it (a dropped SYN times out after 3 s).
fn connects(d: &Daemon, out: &Outside, vm: &str, ip: &str, port: u16) -> bool {
    let tag = format!("{vm}->{ip}:{port}");
    let r = exec_sh(d, vm, &format!("echo '{tag}' | nc -w 3 {ip} {port}"));
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if out.received(&tag) {
            assert_eq!(r["exit_code"], 0, "{tag}: {r}");
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ne!(r["exit_code"], 0, "nc says {tag} connected: {r}");
    false
}

fn wait_ready(d: &Daemon, vm: &str) -> Value {
    let start = Instant::now();
    loop {
        let (_, v) = d.call("GET", &format!("/v1/vm/{vm}"), None);
        if v["ready"] == true {
            return v;
        }
        assert!(v["state"] == "running", "{vm}: {v}");
        assert!(start.elapsed() < BOOT_TIMEOUT, "{vm} not ready: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn real_guests_reach_public_hosts_not_private_ones_and_allow_opens_exactly_its_port() {
    let art = need_artifacts!();
    if skip() {
        return;
    }
    let ns = NetnsPair::new("egq").unwrap();
    let out = Outside::start(&ns);
    let mut dir = TestDir::new();
    let cfg = common::qemu_config(&dir, &art);
    let d = common::start_networked(cfg, &mut dir, &ns);
    let before = ns.state();
    let vm = |id: &str, network: Option<Value>| {
        let mut body =
            json!({"vm_id": id, "disk": {"kind": "overlay", "rootfs_id": "minimal.ext4"}});
        if let Some(n) = network {
            body["network"] = n;
        }
        let (code, v) = d.call("POST", "/v1/vm", Some(body));
        assert_eq!(code, 201, "{v}");
        v
    };
    // Both boot at once.
    vm("open", None);
    let allow = format!("{PRIVATE_IP}/32:{OPEN_PORT}");
    let shut = vm("shut", Some(json!({"allow": [allow], "internet": false})));
    wait_ready(&d, "open");
    wait_ready(&d, "shut");

    // The default: the public host on any port, not the private one.
    assert!(connects(&d, &out, "open", PUBLIC_IP, OPEN_PORT), "public");
    assert!(connects(&d, &out, "open", PUBLIC_IP, OTHER_PORT), "public");
    assert!(
        !connects(&d, &out, "open", PRIVATE_IP, OPEN_PORT),
        "private"
    );

    // internet = false with one allow entry: exactly that port of that host.
    assert!(connects(&d, &out, "shut", PRIVATE_IP, OPEN_PORT), "allowed");
    assert!(
        !connects(&d, &out, "shut", PRIVATE_IP, OTHER_PORT),
        "other port"
    );
    assert!(
        !connects(&d, &out, "shut", PUBLIC_IP, OPEN_PORT),
        "no internet"
    );

    // The policy's elements go with the VM.
    let ip = shut["guest_ip"].as_str().unwrap().to_string();
    assert!(set_text(&ns, "offline").contains(&ip));
    assert_eq!(d.call("DELETE", "/v1/vm/shut", None).0, 204);
    assert!(!set_text(&ns, "offline").contains(&ip));
    assert!(!set_text(&ns, "allow_ports").contains(&ip));
    finish(d, dir);
    assert_eq!(ns.state(), before, "namespace not back to its baseline");
}
