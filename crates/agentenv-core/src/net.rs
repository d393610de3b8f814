//! Automatic per-VM networking: the pure allocation plan, and the seam to the
//! host's network stack ([`HostNetwork`]).
//!
//! VM number `n` gets the `n`-th subnet of size `netmask` inside
//! `{subnet_prefix}.0.0/16`; the host side of its TAP is the subnet's first
//! address, the guest the second. Indexes start at 1 and the lowest free one is
//! reused, so allocation is rebuilt from the VM records after a restart.
//!
//! A lease also carries the VM's egress policy ([`EgressPolicy`]): what the
//! guest may reach beyond the daemon-wide defaults. It is parsed here from the
//! create request's `network.allow` / `network.internet` (pure), recorded in
//! the VM record with the lease, and enforced by the host network as set
//! elements (`docs/security.md`, "Egress").

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::NetworkConfig;

/// One VM's network resources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetLease {
    /// Allocation index (1-based).
    pub index: u32,
    /// Host TAP device, `{tap_prefix}{index}`.
    pub tap_name: String,
    /// Stable, locally administered guest MAC derived from the guest address.
    pub guest_mac: String,
    /// Host side (gateway) address.
    pub host_ip: Ipv4Addr,
    /// Guest address.
    pub guest_ip: Ipv4Addr,
    /// Prefix length of the VM's subnet.
    pub prefix_len: u8,
    /// The VM that holds the lease (its TAP is marked with it). Empty in
    /// records written before TAPs were marked.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vm_id: String,
    /// What the guest may reach (recorded, so a restart restores it).
    #[serde(default, skip_serializing_if = "EgressPolicy::is_default")]
    pub egress: EgressPolicy,
}

impl NetLease {
    /// The subnet's network address.
    pub fn network(&self) -> Ipv4Addr {
        let mask = u32::MAX << (32 - self.prefix_len);
        Ipv4Addr::from(u32::from(self.host_ip) & mask)
    }

    /// Kernel command line parameters for the guest's init.
    pub fn boot_args(&self) -> String {
        format!(
            "agentenv.ip={}/{} agentenv.gw={}",
            self.guest_ip, self.prefix_len, self.host_ip
        )
    }
}

/// The allocation plan derived from the `[network]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    base: u32,
    prefix_len: u8,
    tap_prefix: String,
    deny_private: bool,
}

impl NetPlan {
    /// A plan from a validated `[network]` table.
    pub fn new(cfg: &NetworkConfig) -> NetPlan {
        let octets: Vec<u8> = cfg
            .subnet_prefix
            .split('.')
            .map(|o| o.parse().expect("validated config"))
            .collect();
        let mask: Ipv4Addr = cfg.netmask.parse().expect("validated config");
        NetPlan {
            base: u32::from(Ipv4Addr::new(octets[0], octets[1], 0, 0)),
            prefix_len: u32::from(mask).leading_ones() as u8,
            tap_prefix: cfg.tap_prefix.clone(),
            deny_private: cfg.deny_private,
        }
    }

    /// How many VM subnets fit in the /16.
    pub fn capacity(&self) -> u32 {
        // Index 0 would hold `{prefix}.0.0`; it is left unused.
        (1u32 << (self.prefix_len - 16)) - 1
    }

    /// The lease for index `n` (1-based), or `None` past the capacity.
    pub fn lease(&self, n: u32) -> Option<NetLease> {
        if n == 0 || n > self.capacity() {
            return None;
        }
        let block = 1u32 << (32 - self.prefix_len);
        let net = self.base + n * block;
        let host_ip = Ipv4Addr::from(net + 1);
        let guest_ip = Ipv4Addr::from(net + 2);
        let g = guest_ip.octets();
        Some(NetLease {
            index: n,
            tap_name: format!("{}{n}", self.tap_prefix),
            guest_mac: format!("06:00:{:02x}:{:02x}:{:02x}:{:02x}", g[0], g[1], g[2], g[3]),
            host_ip,
            guest_ip,
            prefix_len: self.prefix_len,
            vm_id: String::new(),
            egress: EgressPolicy::default(),
        })
    }

    /// The lowest index not in `used`.
    pub fn next_free(&self, used: impl IntoIterator<Item = u32>) -> Option<NetLease> {
        let mut used: Vec<u32> = used.into_iter().collect();
        used.sort_unstable();
        let mut n = 1;
        for u in used {
            if u == n {
                n += 1;
            } else if u > n {
                break;
            }
        }
        self.lease(n)
    }

    /// The TAP name prefix (for reclaiming TAPs left by a crash).
    pub fn tap_prefix(&self) -> &str {
        &self.tap_prefix
    }

    /// Guests may not reach private, link-local, multicast and other
    /// non-public IPv4 ranges unless their `allow` lists them
    /// (`[network] deny_private`).
    pub fn deny_private(&self) -> bool {
        self.deny_private
    }

    /// The whole range VM subnets come from, as `(network, prefix_len)` (a /16).
    pub fn supernet(&self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::from(self.base), 16)
    }
}

/// Most entries one VM's `network.allow` may have.
pub const MAX_ALLOW: usize = 64;

/// One `network.allow` entry: an IPv4 network, and optionally one port (TCP
/// and UDP). Without a port every protocol and port to the network is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EgressRule {
    /// Network address (host bits zero).
    pub net: Ipv4Addr,
    /// Prefix length, 0 to 32.
    pub prefix_len: u8,
    /// Destination port, when only one is open.
    pub port: Option<u16>,
}

impl EgressRule {
    /// The last address of the network.
    pub fn last(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net) | host_mask(self.prefix_len))
    }

    /// True when every packet `other` admits, `self` admits too.
    pub fn covers(&self, other: &EgressRule) -> bool {
        self.prefix_len <= other.prefix_len
            && u32::from(other.net) & !host_mask(self.prefix_len) == u32::from(self.net)
            && (self.port.is_none() || self.port == other.port)
    }
}

fn host_mask(prefix_len: u8) -> u32 {
    u32::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0)
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix_len)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl FromStr for EgressRule {
    type Err = String;

    /// `A.B.C.D[/LEN][:PORT]`: a bare address is a /32; host bits must be
    /// zero (`10.1.2.3/24` is refused, not silently widened); the port is
    /// 1 to 65535.
    fn from_str(s: &str) -> Result<EgressRule, String> {
        let (cidr, port) = match s.split_once(':') {
            Some((c, p)) => (c, Some(p)),
            None => (s, None),
        };
        let (addr, len) = match cidr.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (cidr, None),
        };
        let net: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 address (IPv6 is not forwarded)"))?;
        let prefix_len = match len {
            None => 32,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= 32 && !l.starts_with('+') => n,
                _ => return Err(format!("prefix length {l:?} must be 0 to 32")),
            },
        };
        if u32::from(net) & host_mask(prefix_len) != 0 {
            return Err(format!(
                "{net}/{prefix_len} has host bits set (the network is {}/{prefix_len})",
                Ipv4Addr::from(u32::from(net) & !host_mask(prefix_len))
            ));
        }
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && !p.starts_with('+') => Some(n),
                _ => return Err(format!("port {p:?} must be 1 to 65535")),
            },
        };
        Ok(EgressRule {
            net,
            prefix_len,
            port,
        })
    }
}

impl Serialize for EgressRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EgressRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<EgressRule, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What one guest may reach beyond its own gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressPolicy {
    /// Public destinations are open (`network.internet`, default true).
    /// `false`: nothing but `allow` is.
    pub internet: bool,
    /// Opened whatever `internet` and `[network] deny_private` say;
    /// normalised: sorted, no entry covered by another.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<EgressRule>,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        EgressPolicy {
            internet: true,
            allow: Vec::new(),
        }
    }
}

impl EgressPolicy {
    /// The policy of a request's `allow` entries and `internet` flag.
    pub fn parse(allow: &[String], internet: Option<bool>) -> Result<EgressPolicy, EgressError> {
        if allow.len() > MAX_ALLOW {
            return Err(EgressError::TooMany { count: allow.len() });
        }
        let mut rules = Vec::with_capacity(allow.len());
        for (index, entry) in allow.iter().enumerate() {
            let rule = entry.parse().map_err(|message| EgressError::Entry {
                index,
                entry: entry.clone(),
                message,
            })?;
            rules.push(rule);
        }
        Ok(EgressPolicy {
            internet: internet.unwrap_or(true),
            allow: normalise(rules),
        })
    }

    /// True for the default (internet on, nothing extra).
    pub fn is_default(&self) -> bool {
        *self == EgressPolicy::default()
    }

    /// `allow` as the API shows it.
    pub fn allow_strings(&self) -> Vec<String> {
        self.allow.iter().map(ToString::to_string).collect()
    }
}

/// Sorted, deduplicated, and without entries another one covers: the
/// firewall's interval sets refuse overlapping elements of one guest, and
/// CIDRs either nest or are disjoint, so what is left never overlaps.
fn normalise(mut rules: Vec<EgressRule>) -> Vec<EgressRule> {
    rules.sort();
    rules.dedup();
    let all = rules.clone();
    rules.retain(|r| !all.iter().any(|o| o != r && o.covers(r)));
    rules
}

/// A `network.allow` / `network.internet` request that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    /// One entry is not `CIDR` or `CIDR:port`.
    #[error("network.allow[{index}] {entry:?}: {message}")]
    Entry {
        /// Its position in the list.
        index: usize,
        /// The entry as given.
        entry: String,
        /// What is wrong with it.
        message: String,
    },
    /// More entries than [`MAX_ALLOW`].
    #[error("network.allow has {count} entries, at most {MAX_ALLOW}")]
    TooMany {
        /// How many were given.
        count: usize,
    },
}

impl EgressError {
    /// The request field it names (`network.allow[i]` or `network.allow`).
    pub fn field(&self) -> String {
        match self {
            EgressError::Entry { index, .. } => format!("network.allow[{index}]"),
            EgressError::TooMany { .. } => "network.allow".into(),
        }
    }
}

/// A network operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {message}")]
pub struct NetError {
    /// What was being done (names the TAP, address or rule).
    pub context: String,
    /// The kernel's or the command's message.
    pub message: String,
}

/// The host side of VM networking: TAPs, addresses, NAT and isolation rules.
#[async_trait]
pub trait HostNetwork: Send + Sync + 'static {
    /// At daemon start: installs agentenv's own firewall table for the plan
    /// (idempotent), enables forwarding if needed, and removes TAPs with the
    /// plan's prefix and rules that no lease in `keep` owns.
    async fn init(&self, plan: &NetPlan, keep: &[NetLease]) -> Result<(), NetError>;

    /// Creates the lease's TAP, gives it the host address, brings it up and
    /// admits it in the firewall. On error nothing of it is left.
    async fn setup(&self, lease: &NetLease) -> Result<(), NetError>;

    /// Removes everything `setup` made; succeeds when it is already gone.
    async fn teardown(&self, lease: &NetLease) -> Result<(), NetError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(mask: &str) -> NetPlan {
        NetPlan::new(&NetworkConfig {
            netmask: mask.into(),
            ..NetworkConfig::default()
        })
    }

    #[test]
    fn default_plan_matches_the_seed_layout() {
        let p = plan("255.255.255.0");
        let l = p.lease(1).unwrap();
        assert_eq!(l.tap_name, "agtap1");
        assert_eq!(l.host_ip, Ipv4Addr::new(172, 20, 1, 1));
        assert_eq!(l.guest_ip, Ipv4Addr::new(172, 20, 1, 2));
        assert_eq!(l.guest_mac, "06:00:ac:14:01:02");
        assert_eq!(l.network(), Ipv4Addr::new(172, 20, 1, 0));
        assert_eq!(
            l.boot_args(),
            "agentenv.ip=172.20.1.2/24 agentenv.gw=172.20.1.1"
        );
        assert_eq!(p.capacity(), 255);
        assert!(p.lease(256).is_none());
        assert!(p.lease(0).is_none());
    }

    #[test]
    fn small_subnets_hold_thousands() {
        let p = plan("255.255.255.252");
        assert_eq!(p.capacity(), 16383);
        let l = p.lease(1000).unwrap();
        assert_eq!(l.host_ip, Ipv4Addr::new(172, 20, 15, 161));
        assert_eq!(l.guest_ip, Ipv4Addr::new(172, 20, 15, 162));
    }

    fn rule(s: &str) -> EgressRule {
        s.parse().unwrap()
    }

    #[test]
    fn allow_entries_parse_as_cidr_and_port() {
        let check = |s: &str, net: [u8; 4], len: u8, port: Option<u16>| {
            assert_eq!(
                rule(s),
                EgressRule {
                    net: Ipv4Addr::from(net),
                    prefix_len: len,
                    port
                },
                "{s}"
            );
        };
        check("10.1.2.0/24:443", [10, 1, 2, 0], 24, Some(443));
        check("10.1.2.3", [10, 1, 2, 3], 32, None);
        check("10.1.2.3:53", [10, 1, 2, 3], 32, Some(53));
        check("0.0.0.0/0", [0, 0, 0, 0], 0, None);
        check("192.168.0.0/16:65535", [192, 168, 0, 0], 16, Some(65535));
        assert_eq!(rule("10.1.2.0/24:443").to_string(), "10.1.2.0/24:443");
        assert_eq!(rule("10.1.2.3").to_string(), "10.1.2.3/32");
        for bad in [
            "",
            "10.1.2.0/33",
            "10.1.2.0/-1",
            "10.1.2.0/+8",
            "10.1.2.3/24",
            "10.1.2.0/24:0",
            "10.1.2.0/24:65536",
            "10.1.2.0/24:+80",
            "10.1.2.0/24:",
            "10.1.2/24",
            "fc00::/7",
            "example.com:443",
            "10.1.2.0/24:443:1",
            "10.1.2.0 /24",
        ] {
            assert!(bad.parse::<EgressRule>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn allow_errors_name_the_entry() {
        let list: Vec<String> = ["10.0.0.0/8", "1.2.3.4/8:80"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let e = EgressPolicy::parse(&list, None).unwrap_err();
        assert_eq!(e.field(), "network.allow[1]");
        assert!(e.to_string().contains("host bits"), "{e}");
        let many: Vec<String> = (0..=MAX_ALLOW).map(|i| format!("10.0.{i}.0/24")).collect();
        let e = EgressPolicy::parse(&many, Some(false)).unwrap_err();
        assert_eq!(e.field(), "network.allow");
        assert!(e.to_string().contains("at most 64"), "{e}");
        let ok = EgressPolicy::parse(&many[..MAX_ALLOW], Some(false)).unwrap();
        assert_eq!(ok.allow.len(), MAX_ALLOW);
        assert!(!ok.internet);
        assert!(EgressPolicy::parse(&[], None).unwrap().is_default());
    }

    #[test]
    fn covered_entries_are_dropped() {
        let list: Vec<String> = [
            "10.1.2.3/32:443",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.2.0.0/16:443",
            "10.2.3.0/24:443",
            "10.2.3.0/24:80",
            "10.1.0.0/16",
            "8.8.8.8",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = EgressPolicy::parse(&list, None).unwrap();
        assert_eq!(
            p.allow_strings(),
            [
                "8.8.8.8/32",
                "10.1.0.0/16",
                "10.2.0.0/16:443",
                "10.2.3.0/24:80"
            ]
        );
        assert!(rule("0.0.0.0/0").covers(&rule("10.0.0.0/8:22")));
        assert!(!rule("10.0.0.0/8:22").covers(&rule("10.0.0.0/8")));
        assert!(!rule("10.0.0.0/8").covers(&rule("11.0.0.0/8")));
        assert_eq!(rule("10.0.0.0/8").last(), Ipv4Addr::new(10, 255, 255, 255));
        assert_eq!(rule("0.0.0.0/0").last(), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn policies_survive_the_record() {
        let mut l = plan("255.255.255.0").lease(3).unwrap();
        let json = serde_json::to_string(&l).unwrap();
        assert!(
            !json.contains("egress"),
            "default policy not written: {json}"
        );
        l.egress = EgressPolicy::parse(&["10.0.0.0/8:22".into()], Some(false)).unwrap();
        l.vm_id = "vm3".into();
        let back: NetLease = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
        // Records from before egress policies still load, with the default.
        let old = r#"{"index":1,"tap_name":"agtap1","guest_mac":"06:00:ac:14:01:02","host_ip":"172.20.1.1","guest_ip":"172.20.1.2","prefix_len":24}"#;
        let old: NetLease = serde_json::from_str(old).unwrap();
        assert!(old.egress.is_default() && old.vm_id.is_empty());
    }

    #[test]
    fn lowest_free_index_is_reused() {
        let p = plan("255.255.255.0");
        assert_eq!(p.next_free([]).unwrap().index, 1);
        assert_eq!(p.next_free([1, 2, 4]).unwrap().index, 3);
        assert_eq!(p.next_free([3, 1, 2]).unwrap().index, 4);
        assert!(p.next_free(1..=255).is_none());
    }
}
