//! agentenv's nftables table, as the text loaded with `nft -f -`.
//!
//! Everything lives in `table inet agentenv`; no other table is read or
//! written. The rules are fixed for the daemon's lifetime and name no VM:
//! per-VM state is set elements (its TAP's exact name, its addresses, its
//! egress policy), so admitting or removing a VM is O(1) whatever the number
//! of VMs. Rules match TAPs only through the `taps` set of exact names, never
//! a name pattern: a link agentenv did not create is never matched.

use std::fmt::Write;
use std::net::Ipv4Addr;

use agentenv_core::net::NetLease;

/// The table's family.
pub const FAMILY: &str = "inet";
/// The table's name.
pub const TABLE: &str = "agentenv";
/// The exact names of agentenv's TAPs.
pub const TAPS: &str = "taps";
/// `(TAP, guest address)` pairs: the only source address each TAP may use.
pub const GUESTS: &str = "guests";
/// `(TAP, gateway address)` pairs: the host address a TAP's guest may ping.
pub const GATEWAYS: &str = "gateways";
/// Guest addresses with `internet = false`: only their `allow` entries open.
pub const OFFLINE: &str = "offline";
/// `(guest address, destination network)`: `allow` entries without a port.
pub const ALLOW_NETS: &str = "allow_nets";
/// `(guest address, destination network, protocol, port)`: `allow` entries
/// with a port (one element for TCP, one for UDP).
pub const ALLOW_PORTS: &str = "allow_ports";
/// The non-public destinations `deny_private` closes.
pub const PRIVATE: &str = "private";
/// Every per-VM set, in the order elements are written.
pub const VM_SETS: [&str; 6] = [TAPS, GUESTS, GATEWAYS, OFFLINE, ALLOW_NETS, ALLOW_PORTS];
/// The cloud metadata address, never reachable from a guest.
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// What `[network] deny_private` closes (IPv4; guests get no IPv6 at all):
/// "this network", RFC 1918, CGNAT, loopback, link-local (with the metadata
/// address), IETF protocol assignments, multicast, and the reserved
/// 240/4 with the limited broadcast address.
pub const PRIVATE_NETS: [(Ipv4Addr, u8); 10] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 0, 0, 0), 24),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    (Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// What the fixed rules depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    /// Where all guest addresses come from.
    pub supernet: (Ipv4Addr, u8),
    /// The interface NAT leaves through (the only way out for guests).
    pub host_interface: String,
    /// Close [`PRIVATE_NETS`] to guests (except what their `allow` opens).
    pub deny_private: bool,
}

/// True for interface names that are valid and need no quoting care in nft:
/// 1–15 bytes of `[A-Za-z0-9_.-]` (no `*`, quote or backslash).
pub fn is_plain_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The script that (re)creates the table atomically with the elements of
/// `keep`: adding the table first makes the delete succeed on a first start,
/// and nft applies the whole script as one transaction.
pub fn table_script(spec: &TableSpec, keep: &[NetLease]) -> String {
    let TableSpec {
        supernet: (net, len),
        host_interface: hostif,
        deny_private,
    } = spec;
    let mut s = String::new();
    let _ = writeln!(s, "table {FAMILY} {TABLE}");
    let _ = writeln!(s, "delete table {FAMILY} {TABLE}");
    let _ = writeln!(s, "table {FAMILY} {TABLE} {{");
    let per_vm: Vec<(&str, String)> = keep.iter().flat_map(elements).collect();
    for set in VM_SETS {
        let elems: Vec<&str> = per_vm
            .iter()
            .filter(|(s, _)| *s == set)
            .map(|(_, e)| e.as_str())
            .collect();
        set_block(&mut s, set, &elems);
    }
    let private: Vec<String> = PRIVATE_NETS
        .iter()
        .map(|(a, l)| format!("{a}/{l}"))
        .collect();
    set_block(
        &mut s,
        PRIVATE,
        &private.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let deny = if *deny_private {
        format!("\t\tip daddr @{PRIVATE} drop\n")
    } else {
        String::new()
    };
    let _ = write!(
        s,
        "\
\tchain prerouting {{
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tiifname @{TAPS} jump from_guest
\t}}
\tchain from_guest {{
\t\tmeta nfproto != ipv4 drop
\t\tiifname . ip saddr != @{GUESTS} drop
\t\tip daddr {METADATA} drop
\t}}
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname @{TAPS} jump guest_to_host
\t}}
\tchain guest_to_host {{
\t\tct state established,related accept
\t\ticmp type echo-request iifname . ip daddr @{GATEWAYS} accept
\t\tdrop
\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname @{TAPS} jump egress
\t\toifname @{TAPS} jump ingress
\t}}
\tchain egress {{
\t\toifname != \"{hostif}\" drop
\t\tip saddr . ip daddr @{ALLOW_NETS} accept
\t\tmeta l4proto {{ tcp, udp }} ip saddr . ip daddr . meta l4proto . th dport @{ALLOW_PORTS} accept
\t\tip saddr @{OFFLINE} drop
{deny}\t\taccept
\t}}
\tchain ingress {{
\t\tiifname \"{hostif}\" ct state established,related accept
\t\tdrop
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname \"{hostif}\" ip saddr {net}/{len} masquerade
\t}}
}}
"
    );
    s
}

/// One `set NAME { type …; [flags interval;] [elements = { … }] }` block.
fn set_block(s: &mut String, set: &str, elems: &[&str]) {
    let (ty, interval) = match set {
        TAPS => ("ifname", false),
        GUESTS | GATEWAYS => ("ifname . ipv4_addr", false),
        OFFLINE => ("ipv4_addr", false),
        ALLOW_NETS => ("ipv4_addr . ipv4_addr", true),
        ALLOW_PORTS => ("ipv4_addr . ipv4_addr . inet_proto . inet_service", true),
        _ => ("ipv4_addr", true),
    };
    let _ = writeln!(s, "\tset {set} {{");
    let _ = writeln!(s, "\t\ttype {ty}");
    if interval {
        let _ = writeln!(s, "\t\tflags interval");
    }
    if !elems.is_empty() {
        let _ = writeln!(s, "\t\telements = {{ {} }}", elems.join(", "));
    }
    let _ = writeln!(s, "\t}}");
}

/// A lease's set elements, as `(set, element)`: its TAP, guest and gateway
/// addresses, and its egress policy keyed by the guest address (which the
/// anti-spoofing rule ties to its TAP). The policy's entries never overlap
/// (they are normalised when parsed), as interval sets require.
pub fn elements(lease: &NetLease) -> Vec<(&'static str, String)> {
    let tap = &lease.tap_name;
    let guest = lease.guest_ip;
    let mut v = vec![
        (TAPS, format!("\"{tap}\"")),
        (GUESTS, format!("\"{tap}\" . {guest}")),
        (GATEWAYS, format!("\"{tap}\" . {}", lease.host_ip)),
    ];
    if !lease.egress.internet {
        v.push((OFFLINE, guest.to_string()));
    }
    for r in &lease.egress.allow {
        let dst = format!("{}/{}", r.net, r.prefix_len);
        match r.port {
            None => v.push((ALLOW_NETS, format!("{guest} . {dst}"))),
            Some(port) => {
                for proto in ["tcp", "udp"] {
                    v.push((ALLOW_PORTS, format!("{guest} . {dst} . {proto} . {port}")));
                }
            }
        }
    }
    v
}

/// The script that admits a lease: all its set elements, in one transaction.
pub fn admit_script(lease: &NetLease) -> String {
    let mut s = String::new();
    for (set, e) in elements(lease) {
        let _ = writeln!(s, "add element {FAMILY} {TABLE} {set} {{ {e} }}");
    }
    s
}

/// The script that removes a lease's elements, succeeding when they are
/// already gone: each is added (a no-op when present) then deleted, in one
/// transaction. (`destroy element` would say this directly but needs nft 1.0.8
/// and Linux 6.3.)
pub fn evict_script(lease: &NetLease) -> String {
    let mut s = String::new();
    for (set, e) in elements(lease) {
        let _ = writeln!(s, "add element {FAMILY} {TABLE} {set} {{ {e} }}");
        let _ = writeln!(s, "delete element {FAMILY} {TABLE} {set} {{ {e} }}");
    }
    s
}

#[cfg(test)]
mod tests {
    use agentenv_core::config::NetworkConfig;
    use agentenv_core::net::{EgressPolicy, NetPlan};

    use super::*;

    fn spec() -> TableSpec {
        TableSpec {
            supernet: (Ipv4Addr::new(172, 20, 0, 0), 16),
            host_interface: "eth0".into(),
            deny_private: true,
        }
    }

    fn lease(n: u32) -> NetLease {
        NetPlan::new(&NetworkConfig::default()).lease(n).unwrap()
    }

    #[test]
    fn table_script_recreates_only_agentenvs_table() {
        let s = table_script(&spec(), &[]);
        let mut lines = s.lines();
        assert_eq!(lines.next(), Some("table inet agentenv"));
        assert_eq!(lines.next(), Some("delete table inet agentenv"));
        assert_eq!(lines.next(), Some("table inet agentenv {"));
        assert!(!s.contains("flush"), "{s}");
        assert_eq!(
            s.matches("elements").count(),
            1,
            "only the fixed private set has an elements line: {s}"
        );
        assert_eq!(s.matches("table ").count(), 3, "{s}");
        // Guests leave only through NAT's interface; TAPs are matched by
        // exact name from a set, never by a pattern (issue 13).
        assert!(s.contains("oifname != \"eth0\" drop"), "{s}");
        assert!(!s.contains('*'), "no wildcard: {s}");
        assert!(s.contains("iifname @taps jump from_guest"), "{s}");
        assert!(
            s.contains("oifname \"eth0\" ip saddr 172.20.0.0/16 masquerade"),
            "{s}"
        );
        assert!(s.contains("ip daddr 169.254.169.254 drop"), "{s}");
    }

    #[test]
    fn rules_name_no_vm() {
        let none = table_script(&spec(), &[]);
        let many = table_script(&spec(), &(1..=50).map(lease).collect::<Vec<_>>());
        let rules = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| !l.contains("elements ="))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(rules(&none), rules(&many));
        assert!(many.contains("\"agtap50\" . 172.20.50.2"), "{many}");
        assert!(many.contains("\"agtap50\" . 172.20.50.1"), "{many}");
    }

    #[test]
    fn element_scripts_touch_only_the_vm_sets() {
        let l = lease(3);
        assert_eq!(
            admit_script(&l),
            "add element inet agentenv taps { \"agtap3\" }\n\
             add element inet agentenv guests { \"agtap3\" . 172.20.3.2 }\n\
             add element inet agentenv gateways { \"agtap3\" . 172.20.3.1 }\n"
        );
        let e = evict_script(&l);
        assert_eq!(e.lines().count(), 6);
        assert_eq!(e.matches("delete element").count(), 3);
        assert!(e.lines().all(|l| l.contains("inet agentenv")), "{e}");
    }

    fn with_policy(n: u32, allow: &[&str], internet: bool) -> NetLease {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        NetLease {
            egress: EgressPolicy::parse(&allow, Some(internet)).unwrap(),
            ..lease(n)
        }
    }

    #[test]
    fn egress_policies_are_elements_keyed_by_the_guest() {
        let l = with_policy(4, &["10.1.2.0/24:443", "10.9.0.0/16", "10.9.1.0/24"], false);
        let els = elements(&l);
        let of = |set: &str| -> Vec<&str> {
            els.iter()
                .filter(|(s, _)| *s == set)
                .map(|(_, e)| e.as_str())
                .collect()
        };
        assert_eq!(of(TAPS), ["\"agtap4\""]);
        assert_eq!(of(OFFLINE), ["172.20.4.2"]);
        // 10.9.1.0/24 is covered by 10.9.0.0/16: one element, no overlap.
        assert_eq!(of(ALLOW_NETS), ["172.20.4.2 . 10.9.0.0/16"]);
        assert_eq!(
            of(ALLOW_PORTS),
            [
                "172.20.4.2 . 10.1.2.0/24 . tcp . 443",
                "172.20.4.2 . 10.1.2.0/24 . udp . 443"
            ]
        );
        // The default policy adds nothing beyond the TAP's own three.
        assert_eq!(elements(&lease(4)).len(), 3);
        let admit = admit_script(&l);
        assert_eq!(admit.lines().count(), 7, "{admit}");
        let evict = evict_script(&l);
        assert_eq!(evict.matches("delete element").count(), 7, "{evict}");
        // A restart restores the policy with the table.
        let table = table_script(&spec(), std::slice::from_ref(&l));
        assert!(
            table.contains("elements = { 172.20.4.2 . 10.1.2.0/24 . tcp . 443, 172.20.4.2 . 10.1.2.0/24 . udp . 443 }"),
            "{table}"
        );
        assert!(table.contains("elements = { 172.20.4.2 }"), "{table}");
    }

    #[test]
    fn deny_private_is_one_fixed_rule_after_the_allows() {
        let on = table_script(&spec(), &[]);
        let rule = "ip daddr @private drop";
        assert_eq!(on.matches(rule).count(), 1, "{on}");
        let allow = on.find("@allow_ports accept").unwrap();
        let offline = on.find("ip saddr @offline drop").unwrap();
        let deny = on.find(rule).unwrap();
        let leave = on.find("oifname != \"eth0\" drop").unwrap();
        assert!(leave < allow && allow < offline && offline < deny, "{on}");
        for net in [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "169.254.0.0/16",
            "224.0.0.0/4",
            "240.0.0.0/4",
            "0.0.0.0/8",
            "127.0.0.0/8",
        ] {
            assert!(on.contains(net), "{net}: {on}");
        }
        // The test networks stand for the public internet.
        assert!(
            !on.contains("198.18.") && !on.contains("198.51.100."),
            "{on}"
        );
        let off = table_script(
            &TableSpec {
                deny_private: false,
                ..spec()
            },
            &[],
        );
        assert!(!off.contains(rule), "{off}");
        assert!(off.contains("ip saddr @offline drop"), "{off}");
    }

    #[test]
    fn plain_ifnames() {
        for ok in ["eth0", "agtap16383", "br-lan.10", "a_b"] {
            assert!(is_plain_ifname(ok), "{ok}");
        }
        for bad in [
            "",
            "eth*",
            "a\"b",
            "a b",
            "sixteen-chars-xx",
            ".",
            "..",
            "a\\b",
            "tap;x",
        ] {
            assert!(!is_plain_ifname(bad), "{bad}");
        }
    }
}
