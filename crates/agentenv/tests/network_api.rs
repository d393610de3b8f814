//! Automatic networking through the daemon, with the real kernel, inside a
//! network namespace this test makes (never the machine's own): TAPs and
//! addresses appear as reported, go away on delete, are reclaimed after a
//! crash, and the subnet space runs out with 507. Needs root.

mod common;

use std::time::Duration;

use agentenv_core::config::OnShutdown;
use agentenv_testkit::netns::{unavailable, NetnsPair};
use common::{finish, overlay_req, Daemon, TestDir};
use serde_json::json;

fn skip() -> bool {
    if let Some(why) = unavailable() {
        agentenv_testkit::skip::skip(&why);
        return true;
    }
    false
}

fn net_config(dir: &TestDir, netmask: &str) -> agentenv_core::config::Config {
    let mut cfg = dir.config();
    cfg.network.enable = true;
    cfg.network.netmask = netmask.into();
    cfg
}

#[test]
fn taps_and_addresses_follow_the_vms() {
    if skip() {
        return;
    }
    let ns = NetnsPair::new("api").unwrap();
    let mut dir = TestDir::new();
    let cfg = net_config(&dir, "255.255.255.0");
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_in(cfg.clone(), dir.path(), Some(ns.host_path()));
    // The baseline of the namespace: agentenv's table exists, empty.
    let before = ns.state();
    assert!(before.contains("table inet agentenv"), "{before}");

    let v1 = d.create_ok("n1");
    assert_eq!(v1["tap_name"], "agtap1");
    assert_eq!(v1["host_ip"], "172.20.1.1");
    assert_eq!(v1["guest_ip"], "172.20.1.2");
    assert_eq!(v1["guest_mac"], "06:00:ac:14:01:02");
    assert!(v1["boot_args"]
        .as_str()
        .unwrap()
        .ends_with("agentenv.ip=172.20.1.2/24 agentenv.gw=172.20.1.1"));
    // A caller's `network` is ignored in this mode, and the response says so.
    let mut body = overlay_req("n2");
    body["network"] = json!({"tap_name": "mine0", "guest_mac": "06:00:00:00:00:09"});
    let (code, v2) = d.call("POST", "/v1/vm", Some(body));
    assert_eq!(code, 201, "{v2}");
    assert_eq!(v2["tap_name"], "agtap2");
    assert!(
        v2["warnings"][0].as_str().unwrap().contains("ignored"),
        "{v2}"
    );

    let addrs = ns.ip(&["-o", "addr", "show"]).unwrap();
    assert!(
        addrs.contains("agtap1") && addrs.contains("172.20.1.1/24"),
        "{addrs}"
    );
    assert!(
        addrs.contains("agtap2") && addrs.contains("172.20.2.1/24"),
        "{addrs}"
    );
    let links = ns.ip(&["-o", "link", "show", "agtap1"]).unwrap();
    assert!(links.contains("UP"), "{links}");
    let rules = ns
        .exec(&["nft", "list", "table", "inet", "agentenv"])
        .unwrap();
    assert!(rules.contains("\"agtap1\" . 172.20.1.2"), "{rules}");

    // Shutdown frees the network; the lowest index is reused.
    assert_eq!(d.call("POST", "/v1/vm/n1/shutdown", None).0, 200);
    assert!(ns.ip(&["link", "show", "agtap1"]).is_err(), "agtap1 left");
    let v3 = d.create_ok("n3");
    assert_eq!(v3["tap_name"], "agtap1");

    // A crash: the daemon goes away leaving VMMs and TAPs; the next start
    // reclaims what no live VM owns.
    let mut cfg_leave = cfg.clone();
    cfg_leave.on_shutdown = OnShutdown::Leave;
    d.stop();
    let d = Daemon::start_in(cfg_leave, dir.path(), Some(ns.host_path()));
    assert!(
        ns.ip(&["link", "show", "agtap2"]).is_err(),
        "stale TAP not reclaimed"
    );
    assert_eq!(ns.state(), before, "namespace differs after reclaim");
    // Whatever VMMs the first daemon left running were stopped at reclaim too.
    std::thread::sleep(Duration::from_millis(100));
    finish(d, dir);
    assert_eq!(ns.state(), before);
}

#[test]
fn subnet_exhaustion_is_507_and_frees_nothing_wrongly() {
    if skip() {
        return;
    }
    let ns = NetnsPair::new("full").unwrap();
    let mut dir = TestDir::new();
    let mut cfg = net_config(&dir, "255.255.255.0");
    // 255 VMs of 1 MiB: the subnet space is under test, not the VMM, so the
    // double even with AGENTENV_TEST_FIRECRACKER (a real Firecracker cannot
    // load a kernel into 1 MiB).
    cfg.memory_mib_per_slot = 1;
    cfg.firecracker_binary = agentenv_testkit::paths::fc_double();
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_in(cfg, dir.path(), Some(ns.host_path()));
    let before = ns.state();
    for i in 1..=255 {
        d.create_ok(&format!("v{i}"));
    }
    let (code, v) = d.create("one-too-many");
    assert_eq!(code, 507, "{v}");
    assert!(v["error"].as_str().unwrap().contains("all 255"), "{v}");
    assert!(ns.ip(&["link", "show", "agtap256"]).is_err());
    finish(d, dir);
    assert_eq!(ns.state(), before);
}
