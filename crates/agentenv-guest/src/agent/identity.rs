//! `Identity`: a VM restored from a memory snapshot learns who it now is. Its
//! memory is its source's, so it still has the source's host name, address,
//! MAC, random-number state and clock until this runs.
//!
//! [`validate`] checks every field before anything changes (pure, so it is
//! unit-tested); [`apply`] then sets, in order: the kernel's entropy (credited,
//! then a CRNG reseed), the wall clock, the host name and `eth0` (through the
//! image's `ip`: busybox in the minimal image, iproute2 in the Debian ones —
//! the commands used are common to both). A failure names its step in the
//! error's `field`.

use std::io;
use std::net::Ipv4Addr;

use agentenv_proto::{ErrorCode, ErrorMsg, Identity, IdentityNet};

use super::sys;

/// The interface an `Identity`'s `net` configures.
pub const INTERFACE: &str = "eth0";

/// Fewest entropy bytes accepted (the kernel's CRNG seeds from 32).
pub const MIN_ENTROPY: usize = 32;

/// Most entropy bytes accepted.
pub const MAX_ENTROPY: usize = 4096;

/// Longest host name (`HOST_NAME_MAX`).
pub const MAX_HOSTNAME: usize = 64;

/// A checked [`Identity`], ready to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The new host name.
    pub hostname: String,
    /// `eth0`'s settings, when the VM has a network.
    pub net: Option<NetPlan>,
    /// The entropy bytes.
    pub entropy: Vec<u8>,
    /// Seconds since the epoch.
    pub secs: u64,
    /// Nanoseconds within the second.
    pub nanos: u32,
}

/// A checked [`IdentityNet`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    /// The address.
    pub address: Ipv4Addr,
    /// Its prefix length, 0..=32.
    pub prefix_len: u8,
    /// The default gateway.
    pub gateway: Ipv4Addr,
    /// The MAC, lower-case `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
}

fn bad(field: &str, msg: impl Into<String>) -> ErrorMsg {
    ErrorMsg::new(ErrorCode::BadRequest, Some(field), msg)
}

/// Checks every field of `id`; nothing is changed.
pub fn validate(id: &Identity) -> Result<Plan, ErrorMsg> {
    check_hostname(&id.hostname)?;
    let net = id.net.as_ref().map(check_net).transpose()?;
    let entropy = parse_entropy(&id.entropy_hex)?;
    if id.unix_time_ns == 0 {
        return Err(bad("unix_time_ns", "unix_time_ns must be set"));
    }
    Ok(Plan {
        hostname: id.hostname.clone(),
        net,
        entropy,
        secs: id.unix_time_ns / 1_000_000_000,
        nanos: (id.unix_time_ns % 1_000_000_000) as u32,
    })
}

/// `[A-Za-z0-9][A-Za-z0-9._-]*`, at most [`MAX_HOSTNAME`] bytes (a VM id fits).
pub fn check_hostname(name: &str) -> Result<(), ErrorMsg> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() > MAX_HOSTNAME {
        return Err(bad(
            "hostname",
            format!(
                "hostname must be 1 to {MAX_HOSTNAME} bytes, not {}",
                b.len()
            ),
        ));
    }
    if !b[0].is_ascii_alphanumeric()
        || !b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    {
        return Err(bad(
            "hostname",
            format!(
                "hostname {name:?} must start with a letter or digit and hold only \
                 letters, digits, `.`, `_` and `-`"
            ),
        ));
    }
    Ok(())
}

fn ipv4(field: &str, s: &str) -> Result<Ipv4Addr, ErrorMsg> {
    s.parse()
        .map_err(|_| bad(field, format!("{field} {s:?} is not an IPv4 address")))
}

/// Checks `net`: IPv4 addresses, a prefix of 0..=32, a unicast MAC.
pub fn check_net(net: &IdentityNet) -> Result<NetPlan, ErrorMsg> {
    let address = ipv4("net.address", &net.address)?;
    if address.is_unspecified() || address.is_broadcast() || address.is_multicast() {
        return Err(bad(
            "net.address",
            format!("net.address {address} cannot be an interface's address"),
        ));
    }
    if net.prefix_len > 32 {
        return Err(bad(
            "net.prefix_len",
            format!("net.prefix_len {} is not in 0..=32", net.prefix_len),
        ));
    }
    let gateway = ipv4("net.gateway", &net.gateway)?;
    let mac = parse_mac(&net.mac)?;
    Ok(NetPlan {
        address,
        prefix_len: net.prefix_len,
        gateway,
        mac,
    })
}

/// Six `:`-separated hex pairs, unicast; returned lower-case.
pub fn parse_mac(s: &str) -> Result<String, ErrorMsg> {
    let err = |why: &str| bad("net.mac", format!("net.mac {s:?} {why}"));
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6
        || !parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(err("is not a MAC (xx:xx:xx:xx:xx:xx)"));
    }
    let first = u8::from_str_radix(parts[0], 16).map_err(|_| err("is not a MAC"))?;
    if first & 1 != 0 {
        return Err(err("is a multicast address"));
    }
    if parts.iter().all(|p| *p == "00") {
        return Err(err("is all zeros"));
    }
    Ok(s.to_ascii_lowercase())
}

/// Hex of [`MIN_ENTROPY`]..=[`MAX_ENTROPY`] bytes.
pub fn parse_entropy(hex: &str) -> Result<Vec<u8>, ErrorMsg> {
    let field = "entropy_hex";
    let n = hex.len() / 2;
    if n * 2 != hex.len() || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad(
            field,
            "entropy_hex must be an even number of hex digits",
        ));
    }
    if !(MIN_ENTROPY..=MAX_ENTROPY).contains(&n) {
        return Err(bad(
            field,
            format!("entropy_hex holds {n} bytes, not {MIN_ENTROPY} to {MAX_ENTROPY}"),
        ));
    }
    Ok((0..n)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex checked"))
        .collect())
}

/// One change to [`INTERFACE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetStep {
    /// Take the link down: the kernel drops its IPv4 routes and its
    /// neighbour (ARP) entries, which name the source VM's peers.
    Down,
    /// Set the MAC (while down; a MAC change also flushes neighbours).
    Mac([u8; 6]),
    /// Remove every IPv4 address of the interface, then add this one.
    Address(Ipv4Addr, u8),
    /// Bring the link up.
    Up,
    /// The default route through the gateway.
    DefaultRoute(Ipv4Addr),
}

/// The steps that give [`INTERFACE`] its new identity, in order. They are
/// ioctls, not `ip` commands: on a TCG guest seven `ip` processes took
/// 150–500 ms, the ioctls take well under a millisecond.
pub fn net_steps(net: &NetPlan) -> Vec<NetStep> {
    vec![
        NetStep::Down,
        NetStep::Mac(net.mac_bytes()),
        NetStep::Address(net.address, net.prefix_len),
        NetStep::Up,
        NetStep::DefaultRoute(net.gateway),
    ]
}

impl NetPlan {
    /// The MAC's six bytes.
    pub fn mac_bytes(&self) -> [u8; 6] {
        let mut b = [0u8; 6];
        for (d, p) in b.iter_mut().zip(self.mac.split(':')) {
            *d = u8::from_str_radix(p, 16).expect("checked by parse_mac");
        }
        b
    }
}

fn failed(step: &str, what: &str, e: &io::Error) -> ErrorMsg {
    let code = match e.kind() {
        io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        io::ErrorKind::NotFound => ErrorCode::NotFound,
        _ => ErrorCode::Io,
    };
    ErrorMsg::new(code, Some(step), format!("{what}: {e}"))
}

fn net_step(step: NetStep) -> Result<(), ErrorMsg> {
    let dev = INTERFACE;
    let (r, what) = match step {
        NetStep::Down => (sys::set_link_up(dev, false), format!("take {dev} down")),
        NetStep::Mac(m) => (
            sys::set_mac(dev, m),
            format!(
                "set the MAC of {dev} to {}",
                m.map(|b| format!("{b:02x}")).join(":")
            ),
        ),
        NetStep::Address(a, p) => (
            sys::replace_ipv4(dev, a, p),
            format!("set the address of {dev} to {a}/{p}"),
        ),
        NetStep::Up => (sys::set_link_up(dev, true), format!("bring {dev} up")),
        NetStep::DefaultRoute(gw) => (
            sys::add_default_route(dev, gw),
            format!("add the default route via {gw} on {dev}"),
        ),
    };
    r.map_err(|e| failed("net", &what, &e))
}

/// Applies a checked identity: entropy, clock, host name, then `eth0`.
pub fn apply(plan: &Plan) -> Result<(), ErrorMsg> {
    sys::add_entropy(&plan.entropy)
        .map_err(|e| failed("entropy", "add entropy to /dev/random", &e))?;
    sys::reseed_crng().map_err(|e| failed("entropy", "reseed the kernel's CRNG", &e))?;
    sys::set_realtime(plan.secs, plan.nanos)
        .map_err(|e| failed("clock", "set the wall clock", &e))?;
    sys::sethostname(&plan.hostname).map_err(|e| {
        failed(
            "hostname",
            &format!("set the hostname to {}", plan.hostname),
            &e,
        )
    })?;
    if let Some(net) = &plan.net {
        for step in net_steps(net) {
            net_step(step)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Identity {
        Identity {
            hostname: "vm-1.clone_2".into(),
            net: Some(IdentityNet {
                address: "172.16.0.6".into(),
                prefix_len: 30,
                gateway: "172.16.0.5".into(),
                mac: "06:00:AC:10:00:06".into(),
            }),
            entropy_hex: "ab".repeat(32),
            unix_time_ns: 1_765_000_000_123_456_789,
        }
    }

    /// The field `id` is refused for.
    fn refused(id: &Identity) -> String {
        let e = validate(id).expect_err("must be refused");
        assert_eq!(e.code, ErrorCode::BadRequest, "{}", e.error);
        e.field.expect("a field is named")
    }

    #[test]
    fn a_good_identity_becomes_a_plan() {
        let p = validate(&good()).unwrap();
        assert_eq!(p.hostname, "vm-1.clone_2");
        assert_eq!((p.secs, p.nanos), (1_765_000_000, 123_456_789));
        assert_eq!(p.entropy, vec![0xab; 32]);
        let net = p.net.unwrap();
        assert_eq!(net.mac, "06:00:ac:10:00:06");
        assert_eq!(net.address, Ipv4Addr::new(172, 16, 0, 6));
        let without_net = Identity {
            net: None,
            ..good()
        };
        assert_eq!(validate(&without_net).unwrap().net, None);
    }

    #[test]
    fn bad_fields_are_refused_by_name() {
        type Change = Box<dyn Fn(&mut Identity)>;
        let cases: Vec<(&str, Change)> = vec![
            ("hostname", Box::new(|i| i.hostname = String::new())),
            ("hostname", Box::new(|i| i.hostname = "a".repeat(65))),
            ("hostname", Box::new(|i| i.hostname = "-vm".into())),
            ("hostname", Box::new(|i| i.hostname = "vm 1".into())),
            ("hostname", Box::new(|i| i.hostname = "vm/1".into())),
            ("hostname", Box::new(|i| i.hostname = "vmé".into())),
            (
                "net.address",
                Box::new(|i| set(i, |n| n.address = "172.16.0".into())),
            ),
            (
                "net.address",
                Box::new(|i| set(i, |n| n.address = "172.16.0.256".into())),
            ),
            (
                "net.address",
                Box::new(|i| set(i, |n| n.address = "0.0.0.0".into())),
            ),
            (
                "net.address",
                Box::new(|i| set(i, |n| n.address = "::1".into())),
            ),
            (
                "net.prefix_len",
                Box::new(|i| set(i, |n| n.prefix_len = 33)),
            ),
            (
                "net.gateway",
                Box::new(|i| set(i, |n| n.gateway = "gw".into())),
            ),
            (
                "net.mac",
                Box::new(|i| set(i, |n| n.mac = "06:00:ac:10:00".into())),
            ),
            (
                "net.mac",
                Box::new(|i| set(i, |n| n.mac = "06:00:ac:10:00:0g".into())),
            ),
            (
                "net.mac",
                Box::new(|i| set(i, |n| n.mac = "06-00-ac-10-00-06".into())),
            ),
            (
                "net.mac",
                Box::new(|i| set(i, |n| n.mac = "07:00:ac:10:00:06".into())),
            ),
            (
                "net.mac",
                Box::new(|i| set(i, |n| n.mac = "00:00:00:00:00:00".into())),
            ),
            ("entropy_hex", Box::new(|i| i.entropy_hex = "ab".repeat(31))),
            (
                "entropy_hex",
                Box::new(|i| i.entropy_hex = "ab".repeat(4097)),
            ),
            (
                "entropy_hex",
                Box::new(|i| i.entropy_hex = format!("{}a", "ab".repeat(32))),
            ),
            ("entropy_hex", Box::new(|i| i.entropy_hex = "zz".repeat(32))),
            ("unix_time_ns", Box::new(|i| i.unix_time_ns = 0)),
        ];
        for (field, change) in cases {
            let mut id = good();
            change(&mut id);
            assert_eq!(refused(&id), field, "{id:?}");
        }
        let mut edge = good();
        set(&mut edge, |n| n.prefix_len = 32);
        edge.hostname = "a".repeat(64);
        edge.entropy_hex = "AB".repeat(4096);
        assert!(validate(&edge).is_ok());
    }

    fn set(i: &mut Identity, f: impl Fn(&mut IdentityNet)) {
        f(i.net.as_mut().unwrap());
    }

    #[test]
    fn the_network_is_set_with_the_link_down_then_brought_up_with_a_route() {
        let net = validate(&good()).unwrap().net.unwrap();
        assert_eq!(
            net_steps(&net),
            vec![
                NetStep::Down,
                NetStep::Mac([0x06, 0x00, 0xac, 0x10, 0x00, 0x06]),
                NetStep::Address(Ipv4Addr::new(172, 16, 0, 6), 30),
                NetStep::Up,
                NetStep::DefaultRoute(Ipv4Addr::new(172, 16, 0, 5)),
            ]
        );
    }
}
