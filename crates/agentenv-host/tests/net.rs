//! `LinuxNetwork` against the real kernel, inside network namespaces these
//! tests create: `…-h` plays the host (TAPs, nft table, NAT) and `…-o` the
//! outside world, joined by a veth pair (198.18.0.2/24 in the host, the
//! default gateway 198.18.0.1/24 outside). Nothing here touches the root
//! namespace; every namespace is deleted by a drop guard, also on failure.
//!
//! Needs root, `ip` and `nft`; each test prints why and passes when they are
//! missing.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use agentenv_core::config::NetworkConfig;
use agentenv_core::net::{EgressPolicy, HostNetwork, NetLease, NetPlan};
use agentenv_host::net::{tap, LinuxNetwork, NetnsThread};

const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const METADATA_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const HOST_VETH: &str = "veth0";
/// Another interface of the host namespace, with 198.19.0.1/24 (not NAT's).
const OTHER_IF: &str = "other0";
const PORT: u16 = 9999;
/// How long a packet that should arrive may take.
const ARRIVES: Duration = Duration::from_secs(3);
/// How long to watch for a packet that must not arrive.
const NEVER: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------- fixture --

/// A network namespace this test created; deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A thread inside the namespace, to open sockets and TAP queues there.
    fn thread(&self) -> NetnsThread {
        NetnsThread::spawn(Some(&self.path())).expect("join test namespace")
    }

    /// `ip -n NAME args…`, which must succeed; returns stdout.
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec NAME program args…`; returns stdout.
    fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    fn nft(&self, args: &[&str]) -> String {
        self.exec("nft", args)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "cannot delete namespace {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cannot delete namespace {}: {e}", self.name),
        }
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The two namespaces. Field order is drop order: both are deleted after
/// everything declared later in a test (networks, threads, sockets).
struct Fixture {
    host: Netns,
    outside: Netns,
}

fn unique() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{:x}{:04x}{}",
        std::process::id(),
        nanos & 0xffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Builds the fixture, or says why it cannot and returns `None`.
fn fixture() -> Option<Fixture> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        agentenv_testkit::skip::skip("needs root");
        return None;
    }
    for (tool, arg) in [("ip", "-V"), ("nft", "--version")] {
        if !runs(tool, &[arg]) {
            agentenv_testkit::skip::skip(&format!("`{tool}` is missing"));
            return None;
        }
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        agentenv_testkit::skip::skip("/dev/net/tun is missing");
        return None;
    }
    let id = unique();
    let mut made = Vec::new();
    for side in ["h", "o"] {
        let name = format!("agentenv-t-{id}-{side}");
        let out = Command::new("ip").args(["netns", "add", &name]).output();
        match out {
            Ok(o) if o.status.success() => made.push(Netns { name }),
            Ok(o) => {
                agentenv_testkit::skip::skip(&format!(
                    "cannot create a network namespace: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
                return None;
            }
            Err(e) => {
                agentenv_testkit::skip::skip(&format!("cannot create a network namespace: {e}"));
                return None;
            }
        }
    }
    let outside = made.pop().expect("two namespaces");
    let host = made.pop().expect("two namespaces");
    let f = Fixture { host, outside };
    let (h, o) = (&f.host, &f.outside);
    // Quieter IPv6 (no duplicate address detection) so snapshots are stable.
    for ns in [h, o] {
        ns.exec("sysctl", &["-qw", "net.ipv6.conf.default.accept_dad=0"]);
        ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.accept_dad=0"]);
    }
    // The veth is created inside the host namespace, its peer moved straight
    // into the outside one: the root namespace never sees either.
    h.ip(&[
        "link", "add", HOST_VETH, "type", "veth", "peer", "name", "veth1", "netns", &o.name,
    ]);
    o.ip(&["addr", "add", "198.18.0.1/24", "dev", "veth1"]);
    o.ip(&["addr", "add", "169.254.169.254/32", "dev", "veth1"]);
    o.ip(&["link", "set", "veth1", "up"]);
    o.ip(&["link", "set", "lo", "up"]);
    // Unsolicited traffic towards guests has a route; the firewall must stop it.
    o.ip(&["route", "add", "172.20.0.0/16", "via", "198.18.0.2"]);
    h.ip(&["addr", "add", "198.18.0.2/24", "dev", HOST_VETH]);
    h.ip(&["link", "set", HOST_VETH, "up"]);
    h.ip(&["link", "set", "lo", "up"]);
    h.ip(&["route", "add", "default", "via", "198.18.0.1"]);
    // A third way out that is not the NAT interface: guests must not use it.
    // (A veth pair with both ends in the host namespace; IPv6 off so nothing
    // else is ever sent on it.)
    h.ip(&[
        "link", "add", OTHER_IF, "type", "veth", "peer", "name", "other1",
    ]);
    for dev in [OTHER_IF, "other1"] {
        h.exec(
            "sysctl",
            &["-qw", &format!("net.ipv6.conf.{dev}.disable_ipv6=1")],
        );
        h.ip(&["link", "set", dev, "up"]);
    }
    h.ip(&["addr", "add", "198.19.0.1/24", "dev", OTHER_IF]);
    // The veth's carrier comes up asynchronously; wait so snapshots are stable.
    let deadline = Instant::now() + Duration::from_secs(5);
    for dev in [HOST_VETH, OTHER_IF] {
        while json(&h.ip(&["-j", "link", "show", "dev", dev]))[0]["operstate"] != "UP" {
            assert!(Instant::now() < deadline, "{dev} never came up");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Some(f)
}

fn cfg(netmask: &str) -> NetworkConfig {
    NetworkConfig {
        enable: true,
        netmask: netmask.into(),
        ..NetworkConfig::default()
    }
}

fn plan(netmask: &str) -> NetPlan {
    NetPlan::new(&cfg(netmask))
}

/// A started network in the fixture's host namespace with `init` done.
async fn network(f: &Fixture, netmask: &str, keep: &[NetLease]) -> LinuxNetwork {
    let net = LinuxNetwork::new(&cfg(netmask), Some(f.host.path())).expect("new");
    net.init(&plan(netmask), keep).await.expect("init");
    net
}

// ------------------------------------------------------------ inspection --

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad json ({e}): {text}"))
}

/// `(ifname, address)` pairs of an agentenv set, sorted.
fn set_elements(f: &Fixture, set: &str) -> Vec<(String, Ipv4Addr)> {
    let v = json(&f.host.nft(&["-j", "list", "set", "inet", "agentenv", set]));
    let mut out = Vec::new();
    for item in v["nftables"].as_array().expect("nftables array") {
        let Some(elems) = item["set"]["elem"].as_array() else {
            continue;
        };
        for e in elems {
            let pair = e["concat"].as_array().expect("concatenated element");
            out.push((
                pair[0].as_str().expect("ifname").to_string(),
                pair[1].as_str().expect("address").parse().expect("ipv4"),
            ));
        }
    }
    out.sort();
    out
}

fn expected(leases: &[&NetLease], gateway: bool) -> Vec<(String, Ipv4Addr)> {
    let mut v: Vec<_> = leases
        .iter()
        .map(|l| {
            let ip = if gateway { l.host_ip } else { l.guest_ip };
            (l.tap_name.clone(), ip)
        })
        .collect();
    v.sort();
    v
}

/// How many rules agentenv's table has.
fn rule_count(f: &Fixture) -> usize {
    let v = json(&f.host.nft(&["-j", "list", "table", "inet", "agentenv"]));
    v["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter(|i| i.get("rule").is_some())
        .count()
}

/// `ip -j addr show dev NAME`: (flags, ipv4 addresses as `a.b.c.d/len`), or
/// `None` when there is no such link.
fn link_state(f: &Fixture, name: &str) -> Option<(Vec<String>, Vec<String>)> {
    let v = json(&f.host.ip(&["-j", "addr"]));
    let link = v
        .as_array()
        .expect("array")
        .iter()
        .find(|l| l["ifname"] == name)?;
    let flags = link["flags"]
        .as_array()
        .expect("flags")
        .iter()
        .map(|x| x.as_str().expect("flag").to_string())
        .collect();
    let addrs = link["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().expect("local"), a["prefixlen"]))
        .collect();
    Some((flags, addrs))
}

/// Packets the link has transmitted.
fn tx_packets(f: &Fixture, name: &str) -> u64 {
    let v = json(&f.host.ip(&["-j", "-s", "link", "show", "dev", name]));
    v[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .expect("tx packets")
}

fn link_mac(f: &Fixture, name: &str) -> [u8; 6] {
    let v = json(&f.host.ip(&["-j", "link", "show", "dev", name]));
    parse_mac(v[0]["address"].as_str().expect("address"))
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (m, part) in mac.iter_mut().zip(s.split(':')) {
        *m = u8::from_str_radix(part, 16).expect("hex");
    }
    mac
}

/// Everything a leak could show up in, in the host namespace.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    links: String,
    addrs: String,
    routes: String,
    routes6: String,
    ruleset: String,
}

fn snapshot(f: &Fixture) -> Snapshot {
    Snapshot {
        links: f.host.ip(&["-j", "link"]),
        addrs: f.host.ip(&["-j", "addr"]),
        routes: f.host.ip(&["-j", "route", "show", "table", "all"]),
        routes6: f.host.ip(&["-j", "-6", "route", "show", "table", "all"]),
        ruleset: f.host.nft(&["list", "ruleset"]),
    }
}

// --------------------------------------------------------------- packets --

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut h = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0x12,
        0x34,
        0x40, // don't fragment
        0,
        64,
        proto,
        0,
        0,
    ];
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let len = (8 + data.len()) as u16;
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]); // no checksum (allowed for IPv4)
    u.extend_from_slice(data);
    ipv4_packet(src, dst, 17, &u)
}

fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(b"agentenv ping");
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4_packet(src, dst, 1, &m)
}

/// An IPv4 packet read from a frame.
struct Ip<'a> {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    payload: &'a [u8],
}

fn parse_ipv4(frame: &[u8]) -> Option<Ip<'_>> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let p = &frame[14..];
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    Some(Ip {
        src: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        dst: Ipv4Addr::new(p[16], p[17], p[18], p[19]),
        proto: p[9],
        payload: p.get(ihl..total)?,
    })
}

/// `(sport, dport, data)` of a UDP frame.
fn parse_udp(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u16, u16, Vec<u8>)> {
    let ip = parse_ipv4(frame)?;
    if ip.proto != 17 || ip.payload.len() < 8 {
        return None;
    }
    let u = ip.payload;
    Some((
        ip.src,
        ip.dst,
        u16::from_be_bytes([u[0], u[1]]),
        u16::from_be_bytes([u[2], u[3]]),
        u[8..].to_vec(),
    ))
}

/// The target address of an ARP request frame.
fn arp_request_target(frame: &[u8]) -> Option<Ipv4Addr> {
    if frame.len() < 42 || frame[12..14] != [0x08, 0x06] || frame[20..22] != [0, 1] {
        return None;
    }
    Some(Ipv4Addr::new(frame[38], frame[39], frame[40], frame[41]))
}

/// A guest as the host sees it: the other end of a TAP, opened like a VMM
/// opens it, speaking hand-built Ethernet frames and answering ARP.
struct Guest {
    tap: File,
    mac: [u8; 6],
    gw_mac: [u8; 6],
    ip: Ipv4Addr,
    gw: Ipv4Addr,
}

impl Guest {
    fn attach(f: &Fixture, ns: &NetnsThread, lease: &NetLease) -> Guest {
        let name = lease.tap_name.clone();
        let tap = ns
            .run_blocking(move || tap::open_queue(&name, false))
            .expect("worker")
            .unwrap_or_else(|e| panic!("open queue of {}: {e}", lease.tap_name));
        Guest {
            tap,
            mac: parse_mac(&lease.guest_mac),
            gw_mac: link_mac(f, &lease.tap_name),
            ip: lease.guest_ip,
            gw: lease.host_ip,
        }
    }

    fn send_ip(&mut self, packet: &[u8]) {
        let mut frame = Vec::with_capacity(14 + packet.len());
        frame.extend_from_slice(&self.gw_mac);
        frame.extend_from_slice(&self.mac);
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(packet);
        self.tap.write_all(&frame).expect("write frame to tap");
    }

    fn send_udp(&mut self, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, data: &[u8]) {
        self.send_ip(&udp_packet(src, dst, sport, PORT, data));
    }

    fn answer_arp(&mut self, request: &[u8]) {
        let mut r = Vec::with_capacity(42);
        r.extend_from_slice(&request[6..12]); // to the asker
        r.extend_from_slice(&self.mac);
        r.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
        r.extend_from_slice(&self.mac);
        r.extend_from_slice(&self.ip.octets());
        r.extend_from_slice(&request[22..28]); // asker's MAC and IP
        r.extend_from_slice(&request[28..32]);
        self.tap.write_all(&r).expect("write arp reply");
    }

    /// Reads frames for up to `timeout` until one satisfies `want`, answering
    /// ARP requests for the guest's address along the way (after showing
    /// them to `want`).
    fn wait_for(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !readable(&self.tap, left) {
                return None;
            }
            let n = self.tap.read(&mut buf).expect("read tap");
            let frame = &buf[..n];
            if want(frame) {
                return Some(frame.to_vec());
            }
            if arp_request_target(frame) == Some(self.ip) {
                let frame = frame.to_vec();
                self.answer_arp(&frame);
            }
        }
    }
}

fn readable(file: &File, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfd` is one valid pollfd for an fd `file` keeps open, and the
    // count passed is 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    rc > 0
}

/// A UDP socket bound to `0.0.0.0:9999` in the outside namespace.
fn outside_listener(f: &Fixture) -> UdpSocket {
    outside_udp(f, PORT, ARRIVES)
}

/// A UDP socket bound to `0.0.0.0:port` in the outside namespace.
fn outside_udp(f: &Fixture, port: u16, timeout: Duration) -> UdpSocket {
    let s = f
        .outside
        .thread()
        .run_blocking(move || UdpSocket::bind(("0.0.0.0", port)))
        .expect("worker")
        .expect("bind in outside namespace");
    s.set_read_timeout(Some(timeout)).expect("timeout");
    s
}

fn recv(s: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf).ok()?;
    Some((buf[..n].to_vec(), from))
}

// ----------------------------------------------------------------- tests --

#[tokio::test]
async fn setup_makes_up_taps_with_host_addresses_and_set_elements() {
    let Some(f) = fixture() else { return };
    let root_forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let net = network(&f, "255.255.255.0", &[]).await;
    assert_eq!(
        f.host
            .exec("cat", &["/proc/sys/net/ipv4/ip_forward"])
            .trim(),
        "1",
        "init enables forwarding in its namespace"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        root_forwarding,
        "and leaves the root namespace alone"
    );
    assert_eq!(
        net.default_route_interface().unwrap().as_deref(),
        Some(HOST_VETH)
    );
    let p = plan("255.255.255.0");
    let (l1, l2) = (p.lease(1).unwrap(), p.lease(2).unwrap());
    net.setup(&l1).await.unwrap();
    net.setup(&l2).await.unwrap();
    for l in [&l1, &l2] {
        let (flags, addrs) = link_state(&f, &l.tap_name).expect("tap exists");
        assert!(
            flags.iter().any(|x| x == "UP"),
            "{} flags {flags:?}",
            l.tap_name
        );
        assert_eq!(addrs, vec![format!("{}/{}", l.host_ip, l.prefix_len)]);
    }
    assert_eq!(set_elements(&f, "guests"), expected(&[&l1, &l2], false));
    assert_eq!(set_elements(&f, "gateways"), expected(&[&l1, &l2], true));
    let ruleset = f.host.nft(&["list", "ruleset"]);
    assert!(
        ruleset.contains("oifname \"veth0\" ip saddr 172.20.0.0/16 masquerade"),
        "{ruleset}"
    );
    assert_eq!(
        ruleset.matches("table ").count(),
        1,
        "only agentenv's table: {ruleset}"
    );
}

#[tokio::test]
async fn real_packets_obey_the_firewall() {
    let Some(f) = fixture() else { return };
    let net = network(&f, "255.255.255.0", &[]).await;
    let p = plan("255.255.255.0");
    let (l1, l2) = (p.lease(1).unwrap(), p.lease(2).unwrap());
    net.setup(&l1).await.unwrap();
    net.setup(&l2).await.unwrap();
    let in_host = f.host.thread();
    let mut g1 = Guest::attach(&f, &in_host, &l1);
    let mut g2 = Guest::attach(&f, &in_host, &l2);
    let listener = outside_listener(&f);

    // (b) NAT: guest 1 → outside arrives from the host's outside address, and
    // the reply comes back to guest 1 (established).
    g1.send_udp(g1.ip, OUTSIDE_IP, 40001, b"hello");
    let (data, from) = recv(&listener).expect("guest 1 reaches the outside");
    assert_eq!(data, b"hello");
    assert_eq!(
        from.ip(),
        std::net::IpAddr::V4(HOST_IP),
        "source rewritten by NAT"
    );
    listener.send_to(b"reply", from).unwrap();
    let (gip, oip) = (g1.ip, OUTSIDE_IP);
    let reply = g1.wait_for(ARRIVES, |fr| {
        parse_udp(fr).is_some_and(|(s, d, _, dp, data)| {
            s == oip && d == gip && dp == 40001 && data == b"reply"
        })
    });
    assert!(reply.is_some(), "the reply reaches guest 1");

    // Guest 2 reaches the outside too (both TAPs admitted).
    g2.send_udp(g2.ip, OUTSIDE_IP, 40002, b"from2");
    assert_eq!(
        recv(&listener).expect("guest 2 reaches the outside").0,
        b"from2"
    );

    // Each negative case is followed by a sentinel on the same path; the
    // sentinel must be the next thing the outside sees.
    let dropped: [(&str, Ipv4Addr, Ipv4Addr); 3] = [
        // (c) spoofed source: guest 2's address from tap 1, and one off-plan.
        ("spoofed-neighbour", l2.guest_ip, OUTSIDE_IP),
        ("spoofed-foreign", Ipv4Addr::new(10, 9, 9, 9), OUTSIDE_IP),
        // (d) the metadata address (the outside namespace has it, so it would
        // arrive if forwarded).
        ("metadata", g1.ip, METADATA_IP),
    ];
    for (what, src, dst) in dropped {
        g1.send_udp(src, dst, 40003, what.as_bytes());
        g1.send_udp(g1.ip, OUTSIDE_IP, 40003, b"sentinel");
        let (data, _) = recv(&listener).expect("sentinel arrives");
        assert_eq!(data, b"sentinel", "{what} must be dropped");
    }

    // (a) guest 1 → guest 2 is not delivered to tap 2.
    g1.send_udp(g1.ip, l2.guest_ip, 40004, b"to-guest-2");
    g1.send_udp(g1.ip, OUTSIDE_IP, 40004, b"sentinel");
    assert_eq!(recv(&listener).expect("sentinel arrives").0, b"sentinel");
    let g2ip = g2.ip;
    let leaked = g2.wait_for(NEVER, |fr| {
        arp_request_target(fr) == Some(g2ip)
            || parse_udp(fr).is_some_and(|(.., data)| data == b"to-guest-2")
    });
    assert!(leaked.is_none(), "guest 1 reached guest 2: {leaked:?}");

    // Nor does anything from a guest leave by an interface other than NAT's.
    let sent_before = tx_packets(&f, OTHER_IF);
    g1.send_udp(g1.ip, Ipv4Addr::new(198, 19, 0, 9), 40004, b"elsewhere");
    g1.send_udp(g1.ip, OUTSIDE_IP, 40004, b"sentinel");
    assert_eq!(recv(&listener).expect("sentinel arrives").0, b"sentinel");
    assert_eq!(
        tx_packets(&f, OTHER_IF),
        sent_before,
        "forwarded to {OTHER_IF}"
    );

    // Unsolicited traffic from the outside to a guest is not forwarded.
    listener
        .send_to(b"unsolicited", (l1.guest_ip, 40009))
        .unwrap();
    let leaked = g1.wait_for(NEVER, |fr| {
        parse_udp(fr).is_some_and(|(.., data)| data == b"unsolicited")
    });
    assert!(leaked.is_none(), "unsolicited inbound reached guest 1");

    // (e) ICMP echo to the own gateway is answered.
    g1.send_ip(&icmp_echo(g1.ip, g1.gw, 0x4242));
    let (gw, me) = (g1.gw, g1.ip);
    let pong = g1.wait_for(ARRIVES, |fr| {
        parse_ipv4(fr).is_some_and(|ip| {
            ip.proto == 1 && ip.src == gw && ip.dst == me && ip.payload.first() == Some(&0)
        })
    });
    assert!(pong.is_some(), "the gateway answers ping");

    // Everything else to the host is dropped silently: ping to another TAP's
    // gateway, ping to the host's outside address, UDP to the gateway (no
    // port-unreachable comes back either).
    g1.send_ip(&icmp_echo(g1.ip, l2.host_ip, 0x4343));
    g1.send_ip(&icmp_echo(g1.ip, HOST_IP, 0x4444));
    g1.send_ip(&udp_packet(g1.ip, g1.gw, 40005, 53, b"dns?"));
    let answered = g1.wait_for(NEVER, |fr| {
        parse_ipv4(fr).is_some_and(|ip| ip.proto == 1 && ip.dst == me)
    });
    assert!(
        answered.is_none(),
        "the host answered a guest: {answered:?}"
    );
}

#[tokio::test]
async fn teardown_and_crash_reclaim_leave_no_trace() {
    let Some(f) = fixture() else { return };
    let before_init = snapshot(&f);
    let p = plan("255.255.255.0");
    let (l1, l2) = (p.lease(1).unwrap(), p.lease(2).unwrap());

    // Teardown puts everything back as it was after init.
    let net = network(&f, "255.255.255.0", &[]).await;
    let baseline = snapshot(&f);
    assert_eq!(baseline.links, before_init.links);
    assert_eq!(baseline.addrs, before_init.addrs);
    assert_eq!(baseline.routes, before_init.routes);
    assert_eq!(baseline.routes6, before_init.routes6);
    assert_eq!(
        before_init.ruleset, "",
        "the fixture starts with no ruleset"
    );
    assert!(
        baseline.ruleset.starts_with("table inet agentenv {"),
        "{}",
        baseline.ruleset
    );
    net.setup(&l1).await.unwrap();
    net.setup(&l2).await.unwrap();
    {
        // Traffic creates neighbours, IPv6 link-locals and conntrack entries.
        let in_host = f.host.thread();
        let mut g1 = Guest::attach(&f, &in_host, &l1);
        g1.send_ip(&icmp_echo(g1.ip, g1.gw, 1));
        let me = g1.ip;
        g1.wait_for(ARRIVES, |fr| {
            parse_ipv4(fr).is_some_and(|ip| ip.dst == me && ip.proto == 1)
        })
        .expect("pong");
    }
    assert_ne!(snapshot(&f), baseline);
    net.teardown(&l1).await.unwrap();
    net.teardown(&l2).await.unwrap();
    assert_eq!(
        snapshot(&f),
        baseline,
        "teardown leaves exactly the empty table"
    );
    assert!(set_elements(&f, "guests").is_empty());

    // A crash (no teardown) is reclaimed by the next init.
    net.setup(&l1).await.unwrap();
    net.setup(&l2).await.unwrap();
    drop(net);
    let net = network(&f, "255.255.255.0", &[]).await;
    assert_eq!(
        snapshot(&f),
        baseline,
        "init reclaims every tap and element"
    );

    // Reclaim keeps what `keep` owns, and only that.
    net.setup(&l1).await.unwrap();
    net.setup(&l2).await.unwrap();
    drop(net);
    let net = network(&f, "255.255.255.0", std::slice::from_ref(&l1)).await;
    assert!(link_state(&f, &l2.tap_name).is_none(), "tap 2 reclaimed");
    let (_, addrs) = link_state(&f, &l1.tap_name).expect("tap 1 kept");
    assert_eq!(addrs, vec![format!("{}/24", l1.host_ip)]);
    assert_eq!(set_elements(&f, "guests"), expected(&[&l1], false));
    assert_eq!(set_elements(&f, "gateways"), expected(&[&l1], true));
    net.teardown(&l1).await.unwrap();
    assert_eq!(snapshot(&f), baseline);
}

#[tokio::test]
async fn repeated_teardown_existing_taps_and_rollback() {
    let Some(f) = fixture() else { return };
    let net = LinuxNetwork::new(&cfg("255.255.255.0"), Some(f.host.path())).unwrap();
    let p = plan("255.255.255.0");
    let (l1, l2, l3) = (
        p.lease(1).unwrap(),
        p.lease(2).unwrap(),
        p.lease(3).unwrap(),
    );
    let e = net.setup(&l1).await.unwrap_err();
    assert!(e.to_string().contains("not initialised"), "{e}");
    assert!(link_state(&f, &l1.tap_name).is_none());
    net.init(&p, &[]).await.unwrap();
    let baseline = snapshot(&f);

    // Teardown of something never set up, and twice, is fine.
    net.teardown(&l1).await.unwrap();
    net.setup(&l1).await.unwrap();
    net.teardown(&l1).await.unwrap();
    net.teardown(&l1).await.unwrap();
    assert_eq!(snapshot(&f), baseline);

    // Setting up a lease whose TAP exists fails and leaves that TAP alone.
    net.setup(&l2).await.unwrap();
    let e = net.setup(&l2).await.unwrap_err();
    assert!(e.to_string().contains("agtap2 already exists"), "{e}");
    let (_, addrs) = link_state(&f, &l2.tap_name).expect("tap 2 still there");
    assert_eq!(addrs, vec![format!("{}/24", l2.host_ip)]);
    assert_eq!(set_elements(&f, "guests"), expected(&[&l2], false));
    net.teardown(&l2).await.unwrap();

    // A failure after the TAP exists (here: the table was removed behind the
    // daemon's back) rolls the TAP back; the error names the rule.
    let before = snapshot(&f);
    f.host.nft(&["delete", "table", "inet", "agentenv"]);
    let e = net.setup(&l3).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("agtap3") && msg.contains("agentenv"), "{msg}");
    assert!(
        msg.contains("No such file or directory"),
        "the kernel's message: {msg}"
    );
    assert!(link_state(&f, &l3.tap_name).is_none(), "rolled back");
    assert_eq!(snapshot(&f).links, before.links);
    net.init(&p, &[]).await.unwrap();
    assert_eq!(snapshot(&f), baseline);
}

#[tokio::test]
async fn host_interface_comes_from_the_default_route_or_config() {
    let Some(f) = fixture() else { return };
    f.host.ip(&["route", "del", "default"]);
    let net = LinuxNetwork::new(&cfg("255.255.255.0"), Some(f.host.path())).unwrap();
    assert_eq!(net.default_route_interface().unwrap(), None);
    let e = net.init(&plan("255.255.255.0"), &[]).await.unwrap_err();
    assert!(e.to_string().contains("no IPv4 default route"), "{e}");
    assert_eq!(f.host.nft(&["list", "ruleset"]), "", "nothing loaded");

    let with_hostif = NetworkConfig {
        host_interface: Some(HOST_VETH.into()),
        ..cfg("255.255.255.0")
    };
    let net = LinuxNetwork::new(&with_hostif, Some(f.host.path())).unwrap();
    net.init(&plan("255.255.255.0"), &[]).await.unwrap();
    let rules = f.host.nft(&["list", "table", "inet", "agentenv"]);
    assert!(
        rules.contains("oifname \"veth0\" ip saddr 172.20.0.0/16 masquerade"),
        "{rules}"
    );

    f.host.ip(&[
        "route",
        "add",
        "default",
        "via",
        "198.18.0.1",
        "metric",
        "10",
    ]);
    assert_eq!(
        net.default_route_interface().unwrap().as_deref(),
        Some(HOST_VETH)
    );
}

/// Per-VM work is set elements only: VM 1,001 adds no rule.
#[tokio::test]
async fn vm_one_thousand_and_one_adds_elements_not_rules() {
    let Some(f) = fixture() else { return };
    let mask = "255.255.255.252";
    let net = network(&f, mask, &[]).await;
    let p = plan(mask);
    let rules_empty = rule_count(&f);
    let started = Instant::now();
    for n in 1..=1000 {
        net.setup(&p.lease(n).unwrap()).await.unwrap();
    }
    let per_vm = started.elapsed() / 1000;
    let rules_1000 = rule_count(&f);
    assert_eq!(set_elements(&f, "guests").len(), 1000);
    let l = p.lease(1001).unwrap();
    net.setup(&l).await.unwrap();
    assert_eq!(rule_count(&f), rules_1000);
    assert_eq!(rules_1000, rules_empty);
    let guests = set_elements(&f, "guests");
    assert_eq!(guests.len(), 1001);
    assert!(guests.contains(&(l.tap_name.clone(), l.guest_ip)));
    assert_eq!(set_elements(&f, "gateways").len(), 1001);
    println!("1,000 setups: {per_vm:?} per VM; {rules_empty} rules throughout");
}

/// After a crash with 1,000 VMs, the next `init` reclaims them all. Slow
/// (the kernel takes ~20 ms per link deletion here): runs only with
/// `AGENTENV_SLOW_TESTS=1`.
#[tokio::test]
async fn init_reclaims_a_thousand_stale_taps() {
    if std::env::var_os("AGENTENV_SLOW_TESTS").is_none() {
        agentenv_testkit::skip::skip_optional("set AGENTENV_SLOW_TESTS=1 to run");
        return;
    }
    let Some(f) = fixture() else { return };
    let mask = "255.255.255.252";
    let net = network(&f, mask, &[]).await;
    let baseline = snapshot(&f);
    let p = plan(mask);
    for n in 1..=1000 {
        net.setup(&p.lease(n).unwrap()).await.unwrap();
    }
    drop(net);
    let started = Instant::now();
    let _net = network(&f, mask, &[]).await;
    println!("init reclaimed 1,000 taps in {:?}", started.elapsed());
    assert_eq!(snapshot(&f), baseline);
}

// ----------------------------------------------------------------- egress --

/// A "public" test host (TEST-NET-2, standing for the internet) and a
/// "private" one (RFC 1918), both in the outside namespace, behind NAT.
const PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const PRIVATE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);
/// Another private host, in a network one guest's `allow` opens whole.
const PRIVATE_NET_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 10);
/// A second port on the outside hosts, which `allow` does not open.
const OTHER_PORT: u16 = 9998;

/// UDP listeners on `PORT` and `OTHER_PORT` (all addresses) outside.
struct Listeners {
    port: UdpSocket,
    other: UdpSocket,
}

fn listeners(f: &Fixture) -> Listeners {
    Listeners {
        port: outside_listener(f),
        other: outside_udp(f, OTHER_PORT, Duration::from_millis(100)),
    }
}

/// Whether a UDP datagram from `g` to `dst:port` is forwarded. A sentinel to
/// `open` (a destination `g` may reach, on `PORT`) follows it on the same
/// path: once the sentinel is in, the datagram would be too.
fn delivered(g: &mut Guest, l: &Listeners, dst: Ipv4Addr, port: u16, open: Ipv4Addr) -> bool {
    let tag = format!("to {dst}:{port} #{}", unique());
    g.send_ip(&udp_packet(g.ip, dst, 40100, port, tag.as_bytes()));
    g.send_ip(&udp_packet(g.ip, open, 40100, PORT, b"sentinel"));
    let mut seen = false;
    loop {
        let (data, _) = recv(&l.port).expect("the sentinel arrives");
        if data == tag.as_bytes() {
            seen = true;
        } else if data == b"sentinel" {
            break;
        }
    }
    if port == OTHER_PORT {
        while let Some((data, _)) = recv(&l.other) {
            seen |= data == tag.as_bytes();
        }
    }
    seen
}

fn with_policy(mut l: NetLease, allow: &[&str], internet: bool) -> NetLease {
    let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
    l.egress = EgressPolicy::parse(&allow, Some(internet)).unwrap();
    l.vm_id = format!("vm{}", l.index);
    l
}

/// Elements of one of agentenv's sets, as nft prints them.
fn set_text(f: &Fixture, set: &str) -> String {
    f.host.nft(&["list", "set", "inet", "agentenv", set])
}

#[tokio::test]
async fn egress_reaches_public_hosts_not_private_ones_and_allow_opens_exactly_its_entries() {
    let Some(f) = fixture() else { return };
    for ip in [PUBLIC_IP, PRIVATE_IP, PRIVATE_NET_IP] {
        f.outside
            .ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    }
    let net = network(&f, "255.255.255.0", &[]).await;
    let baseline = snapshot(&f);
    let p = plan("255.255.255.0");
    let allow = ["10.77.0.10/32:9999"];
    let plain = with_policy(p.lease(1).unwrap(), &[], true);
    let allowed = with_policy(p.lease(2).unwrap(), &[allow[0], "10.88.0.0/16"], true);
    let offline = with_policy(p.lease(3).unwrap(), &allow, false);
    for l in [&plain, &allowed, &offline] {
        net.setup(l).await.unwrap();
    }
    let in_host = f.host.thread();
    let l = listeners(&f);

    // The default policy: public hosts yes, private ones no (any port).
    let mut g = Guest::attach(&f, &in_host, &plain);
    assert!(delivered(&mut g, &l, PUBLIC_IP, PORT, OUTSIDE_IP), "public");
    assert!(delivered(&mut g, &l, PUBLIC_IP, OTHER_PORT, OUTSIDE_IP));
    assert!(
        !delivered(&mut g, &l, PRIVATE_IP, PORT, OUTSIDE_IP),
        "private"
    );
    assert!(!delivered(&mut g, &l, PRIVATE_IP, OTHER_PORT, OUTSIDE_IP));
    assert!(!delivered(&mut g, &l, PRIVATE_NET_IP, PORT, OUTSIDE_IP));
    for closed in [
        Ipv4Addr::new(192, 168, 1, 1),
        Ipv4Addr::new(172, 16, 0, 1),
        Ipv4Addr::new(100, 64, 0, 1),
        Ipv4Addr::new(169, 254, 1, 1),
        Ipv4Addr::new(224, 0, 0, 251),
        Ipv4Addr::new(255, 255, 255, 255),
    ] {
        f.outside
            .ip(&["addr", "add", &format!("{closed}/32"), "dev", "lo"]);
        let reached = delivered(&mut g, &l, closed, PORT, OUTSIDE_IP);
        f.outside
            .ip(&["addr", "del", &format!("{closed}/32"), "dev", "lo"]);
        assert!(!reached, "{closed} is not public");
    }

    // allow opens exactly 10.77.0.10:9999, not its other port; the internet
    // stays open.
    let mut g = Guest::attach(&f, &in_host, &allowed);
    assert!(
        delivered(&mut g, &l, PRIVATE_IP, PORT, OUTSIDE_IP),
        "allowed"
    );
    assert!(!delivered(&mut g, &l, PRIVATE_IP, OTHER_PORT, OUTSIDE_IP));
    assert!(delivered(&mut g, &l, PUBLIC_IP, OTHER_PORT, OUTSIDE_IP));
    // A network without a port: every port of it.
    assert!(delivered(&mut g, &l, PRIVATE_NET_IP, PORT, OUTSIDE_IP));
    assert!(delivered(
        &mut g,
        &l,
        PRIVATE_NET_IP,
        OTHER_PORT,
        OUTSIDE_IP
    ));

    // internet = false: only the allowed entry, no public host.
    let mut g = Guest::attach(&f, &in_host, &offline);
    assert!(
        delivered(&mut g, &l, PRIVATE_IP, PORT, PRIVATE_IP),
        "allowed"
    );
    assert!(
        !delivered(&mut g, &l, PUBLIC_IP, PORT, PRIVATE_IP),
        "public"
    );
    assert!(!delivered(&mut g, &l, OUTSIDE_IP, PORT, PRIVATE_IP));
    assert!(!delivered(&mut g, &l, PRIVATE_IP, OTHER_PORT, PRIVATE_IP));
    // A guest that forges another guest's address gets nothing of its policy.
    g.send_ip(&udp_packet(
        allowed.guest_ip,
        PUBLIC_IP,
        40100,
        PORT,
        b"forged",
    ));
    assert!(delivered(&mut g, &l, PRIVATE_IP, PORT, PRIVATE_IP));

    // The policy is elements of the guest, and leaves with it.
    assert!(set_text(&f, "offline").contains("172.20.3.2"));
    assert!(set_text(&f, "allow_ports").contains("172.20.2.2 . 10.77.0.10 . tcp . 9999"));
    drop(l);
    for l in [&plain, &allowed, &offline] {
        net.teardown(l).await.unwrap();
    }
    for set in ["offline", "allow_ports", "allow_nets", "taps"] {
        assert!(!set_text(&f, set).contains("elements"), "{set} not empty");
    }
    assert_eq!(snapshot(&f), baseline);

    // A restart restores the recorded policies with the table.
    net.setup(&offline).await.unwrap();
    drop(net);
    let _net = network(&f, "255.255.255.0", std::slice::from_ref(&offline)).await;
    let mut g = Guest::attach(&f, &in_host, &offline);
    let l = listeners(&f);
    assert!(delivered(&mut g, &l, PRIVATE_IP, PORT, PRIVATE_IP));
    assert!(!delivered(&mut g, &l, PUBLIC_IP, PORT, PRIVATE_IP));
}

#[tokio::test]
async fn deny_private_off_opens_private_hosts() {
    let Some(f) = fixture() else { return };
    f.outside
        .ip(&["addr", "add", &format!("{PRIVATE_IP}/32"), "dev", "lo"]);
    let cfg = NetworkConfig {
        deny_private: false,
        ..cfg("255.255.255.0")
    };
    let net = LinuxNetwork::new(&cfg, Some(f.host.path())).unwrap();
    net.init(&NetPlan::new(&cfg), &[]).await.unwrap();
    let lease = NetPlan::new(&cfg).lease(1).unwrap();
    net.setup(&lease).await.unwrap();
    let in_host = f.host.thread();
    let l = listeners(&f);
    let mut g = Guest::attach(&f, &in_host, &lease);
    assert!(delivered(&mut g, &l, PRIVATE_IP, PORT, OUTSIDE_IP));
}

/// Issue 13: with `tap_prefix = "tap"`, other programs' `tap0`, `tapfoo`
/// and even a `tap7` (named like ours) are never matched, changed or
/// removed; only links agentenv marked are reclaimed.
#[tokio::test]
async fn links_agentenv_did_not_create_are_never_touched() {
    let Some(f) = fixture() else { return };
    let foreign = ["tap0", "tapfoo", "tap7"];
    for name in foreign {
        f.host.ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
    }
    let cfg = NetworkConfig {
        tap_prefix: "tap".into(),
        ..cfg("255.255.255.0")
    };
    let p = NetPlan::new(&cfg);
    let foreign_state = |f: &Fixture| -> Vec<String> {
        foreign
            .iter()
            .map(|n| f.host.ip(&["-o", "addr", "show", "dev", n]))
            .collect()
    };
    let before = foreign_state(&f);
    let net = LinuxNetwork::new(&cfg, Some(f.host.path())).unwrap();
    net.init(&p, &[]).await.unwrap();
    let (l1, l2) = (p.lease(1).unwrap(), p.lease(2).unwrap());
    net.setup(&l1).await.unwrap();
    net.setup(&l2).await.unwrap();
    // Ours are marked; the rules name TAPs only through the exact-name set.
    let alias = f.host.ip(&["-d", "link", "show", "tap1"]);
    assert!(alias.contains("alias agentenv:"), "{alias}");
    let ruleset = f.host.nft(&["list", "ruleset"]);
    assert!(!ruleset.contains('*'), "a wildcard: {ruleset}");
    for name in foreign {
        assert!(
            !ruleset.contains(&format!("\"{name}\"")),
            "{name} is in the ruleset: {ruleset}"
        );
    }
    let taps = set_text(&f, "taps");
    assert!(
        taps.contains("\"tap1\"") && taps.contains("\"tap2\""),
        "{taps}"
    );
    // A lease whose name another program holds fails, and leaves it alone.
    let e = net.setup(&p.lease(7).unwrap()).await.unwrap_err();
    assert!(e.to_string().contains("tap7 already exists"), "{e}");

    // A crash, then a start that keeps nothing: ours go, theirs stay as
    // they were.
    drop(net);
    let _net = {
        let net = LinuxNetwork::new(&cfg, Some(f.host.path())).unwrap();
        net.init(&p, &[]).await.unwrap();
        net
    };
    for l in [&l1, &l2] {
        assert!(link_state(&f, &l.tap_name).is_none(), "{} left", l.tap_name);
    }
    assert_eq!(foreign_state(&f), before);
    assert!(!f.host.nft(&["list", "ruleset"]).contains("tap0"));
}
