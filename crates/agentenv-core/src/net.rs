//! Automatic per-VM networking: the pure allocation plan, and the seam to the
//! host's network stack ([`HostNetwork`]).
//!
//! VM number `n` gets the `n`-th subnet of size `netmask` inside
//! `{subnet_prefix}.0.0/16`; the host side of its TAP is the subnet's first
//! address, the guest the second. Indexes start at 1 and the lowest free one is
//! reused, so allocation is rebuilt from the VM records after a restart.

use std::net::Ipv4Addr;

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

    /// The whole range VM subnets come from, as `(network, prefix_len)` (a /16).
    pub fn supernet(&self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::from(self.base), 16)
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

    #[test]
    fn lowest_free_index_is_reused() {
        let p = plan("255.255.255.0");
        assert_eq!(p.next_free([]).unwrap().index, 1);
        assert_eq!(p.next_free([1, 2, 4]).unwrap().index, 3);
        assert_eq!(p.next_free([3, 1, 2]).unwrap().index, 4);
        assert!(p.next_free(1..=255).is_none());
    }
}
