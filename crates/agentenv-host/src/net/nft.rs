//! agentenv's nftables table, as the text loaded with `nft -f -`.
//!
//! Everything lives in `table inet agentenv`; no other table is read or
//! written. The rules are fixed for the daemon's lifetime and name no VM:
//! per-VM state is two set elements, so admitting or removing a VM is O(1)
//! whatever the number of VMs.

use std::fmt::Write;
use std::net::Ipv4Addr;

use agentenv_core::net::NetLease;

/// The table's family.
pub const FAMILY: &str = "inet";
/// The table's name.
pub const TABLE: &str = "agentenv";
/// `(TAP, guest address)` pairs: the only source address each TAP may use.
pub const GUESTS: &str = "guests";
/// `(TAP, gateway address)` pairs: the host address a TAP's guest may ping.
pub const GATEWAYS: &str = "gateways";
/// The cloud metadata address, never reachable from a guest.
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// What the fixed rules depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    /// TAPs are `{tap_prefix}N`; rules match them with `"{tap_prefix}*"`.
    pub tap_prefix: String,
    /// Where all guest addresses come from.
    pub supernet: (Ipv4Addr, u8),
    /// The interface NAT leaves through.
    pub host_interface: String,
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
        tap_prefix,
        supernet: (net, len),
        host_interface: hostif,
    } = spec;
    let taps = format!("\"{tap_prefix}*\"");
    let mut s = String::new();
    let _ = writeln!(s, "table {FAMILY} {TABLE}");
    let _ = writeln!(s, "delete table {FAMILY} {TABLE}");
    let _ = writeln!(s, "table {FAMILY} {TABLE} {{");
    for (set, addr) in [
        (
            GUESTS,
            (|l: &NetLease| l.guest_ip) as fn(&NetLease) -> Ipv4Addr,
        ),
        (GATEWAYS, |l: &NetLease| l.host_ip),
    ] {
        let _ = writeln!(s, "\tset {set} {{");
        let _ = writeln!(s, "\t\ttype ifname . ipv4_addr");
        if !keep.is_empty() {
            let elems: Vec<String> = keep.iter().map(|l| element(&l.tap_name, addr(l))).collect();
            let _ = writeln!(s, "\t\telements = {{ {} }}", elems.join(", "));
        }
        let _ = writeln!(s, "\t}}");
    }
    let _ = write!(
        s,
        "\
\tchain prerouting {{
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tiifname {taps} jump from_guest
\t}}
\tchain from_guest {{
\t\tmeta nfproto != ipv4 drop
\t\tiifname . ip saddr != @{GUESTS} drop
\t\tip daddr {METADATA} drop
\t}}
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname {taps} jump guest_to_host
\t}}
\tchain guest_to_host {{
\t\tct state established,related accept
\t\ticmp type echo-request iifname . ip daddr @{GATEWAYS} accept
\t\tdrop
\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname {taps} oifname \"{hostif}\" accept
\t\tiifname {taps} drop
\t\toifname {taps} iifname \"{hostif}\" ct state established,related accept
\t\toifname {taps} drop
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

/// The script that admits a lease: its two set elements.
pub fn admit_script(lease: &NetLease) -> String {
    format!(
        "add element {FAMILY} {TABLE} {GUESTS} {{ {} }}\n\
         add element {FAMILY} {TABLE} {GATEWAYS} {{ {} }}\n",
        element(&lease.tap_name, lease.guest_ip),
        element(&lease.tap_name, lease.host_ip),
    )
}

/// The script that removes a lease's elements, succeeding when they are
/// already gone: each is added (a no-op when present) then deleted, in one
/// transaction. (`destroy element` would say this directly but needs nft 1.0.8
/// and Linux 6.3.)
pub fn evict_script(lease: &NetLease) -> String {
    let mut s = String::new();
    for (set, addr) in [(GUESTS, lease.guest_ip), (GATEWAYS, lease.host_ip)] {
        let e = element(&lease.tap_name, addr);
        let _ = writeln!(s, "add element {FAMILY} {TABLE} {set} {{ {e} }}");
        let _ = writeln!(s, "delete element {FAMILY} {TABLE} {set} {{ {e} }}");
    }
    s
}

fn element(tap: &str, addr: Ipv4Addr) -> String {
    format!("\"{tap}\" . {addr}")
}

#[cfg(test)]
mod tests {
    use agentenv_core::config::NetworkConfig;
    use agentenv_core::net::NetPlan;

    use super::*;

    fn spec() -> TableSpec {
        TableSpec {
            tap_prefix: "agtap".into(),
            supernet: (Ipv4Addr::new(172, 20, 0, 0), 16),
            host_interface: "eth0".into(),
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
        assert!(
            !s.contains("elements"),
            "an empty set has no elements line: {s}"
        );
        assert_eq!(s.matches("table ").count(), 3, "{s}");
        assert!(
            s.contains("iifname \"agtap*\" oifname \"eth0\" accept"),
            "{s}"
        );
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
    fn element_scripts_touch_only_the_two_sets() {
        let l = lease(3);
        assert_eq!(
            admit_script(&l),
            "add element inet agentenv guests { \"agtap3\" . 172.20.3.2 }\n\
             add element inet agentenv gateways { \"agtap3\" . 172.20.3.1 }\n"
        );
        let e = evict_script(&l);
        assert_eq!(e.lines().count(), 4);
        assert_eq!(e.matches("delete element").count(), 2);
        assert!(e.lines().all(|l| l.contains("inet agentenv")), "{e}");
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
