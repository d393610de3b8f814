//! Per-VM networking on Linux: [`LinuxNetwork`], the host side of
//! [`HostNetwork`].
//!
//! Each VM gets a persistent TAP (`/dev/net/tun`) carrying the host side of
//! its subnet, marked as agentenv's with its alias ([`TAP_MARK`]) and
//! configured over rtnetlink ([`rtnl`]), and elements in the sets of
//! agentenv's own nftables table ([`nft`]), which does NAT, isolation,
//! anti-spoofing and the VM's egress policy with fixed rules. All of it runs
//! on one thread that joined the target network namespace ([`NetnsThread`]);
//! the async methods only queue jobs for it. See `docs/networking.md` and
//! `docs/security.md` (Egress).

mod cmd;
pub mod netns;
pub mod nft;
pub mod rtnl;
pub mod tap;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agentenv_core::config::NetworkConfig;
use agentenv_core::net::{HostNetwork, NetError, NetLease, NetPlan};
use async_trait::async_trait;

pub use netns::NetnsThread;
use nft::{is_plain_ifname, TableSpec};
use rtnl::{Rtnl, RtnlError};

/// The nft binary (looked up in `PATH`).
const NFT: &str = "nft";
/// How long one `nft -f -` may take.
const NFT_TIMEOUT: Duration = Duration::from_secs(10);
/// Forwarding switch of the namespace the worker is in.
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// Longest TAP prefix: leaves room for five index digits in 15 bytes.
const MAX_TAP_PREFIX: usize = 10;
/// The alias of every TAP agentenv creates, followed by the VM's id
/// (`agentenv:VM_ID`): the startup sweep removes only links that carry it.
pub const TAP_MARK: &str = "agentenv:";

/// TAPs, addresses and nftables rules in one network namespace.
#[derive(Debug)]
pub struct LinuxNetwork {
    worker: NetnsThread,
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    rtnl: Rtnl,
    /// `[network] host_interface`; `None`: the default route's, found at init.
    configured_host_interface: Option<String>,
    /// Set by a successful `init`.
    active: Option<Active>,
}

#[derive(Debug)]
struct Active {
    plan: NetPlan,
}

impl LinuxNetwork {
    /// Starts the worker thread in the namespace at `netns` (e.g.
    /// `/run/netns/NAME`; `None`: the daemon's own) and opens its netlink
    /// socket. Nothing is changed until [`HostNetwork::init`].
    pub fn new(cfg: &NetworkConfig, netns: Option<PathBuf>) -> Result<LinuxNetwork, NetError> {
        check_tap_prefix(&cfg.tap_prefix)?;
        if let Some(hostif) = &cfg.host_interface {
            check_host_interface(hostif)?;
        }
        let worker = NetnsThread::spawn(netns.as_deref())?;
        let rtnl = worker
            .run_blocking(Rtnl::open)?
            .map_err(|e| err("open an rtnetlink socket", e))?;
        Ok(LinuxNetwork {
            worker,
            state: Arc::new(Mutex::new(State {
                rtnl,
                configured_host_interface: cfg.host_interface.clone(),
                active: None,
            })),
        })
    }

    /// The interface of the namespace's best IPv4 default route, `None` when
    /// there is no default route. Blocks the caller for one netlink round trip.
    pub fn default_route_interface(&self) -> Result<Option<String>, NetError> {
        let state = self.state.clone();
        self.worker
            .run_blocking(move || lock(&state).default_route_interface())?
    }

    async fn call<R, F>(&self, f: F) -> Result<R, NetError>
    where
        R: Send + 'static,
        F: FnOnce(&mut State) -> Result<R, NetError> + Send + 'static,
    {
        let state = self.state.clone();
        self.worker.run(move || f(&mut lock(&state))).await?
    }
}

#[async_trait]
impl HostNetwork for LinuxNetwork {
    async fn init(&self, plan: &NetPlan, keep: &[NetLease]) -> Result<(), NetError> {
        let plan = plan.clone();
        let keep = keep.to_vec();
        self.call(move |s| s.init(plan, &keep)).await
    }

    async fn setup(&self, lease: &NetLease) -> Result<(), NetError> {
        let lease = lease.clone();
        self.call(move |s| s.setup(&lease)).await
    }

    async fn teardown(&self, lease: &NetLease) -> Result<(), NetError> {
        let lease = lease.clone();
        self.call(move |s| s.teardown(&lease)).await
    }
}

impl State {
    fn default_route_interface(&mut self) -> Result<Option<String>, NetError> {
        let ctx = "find the default route's interface";
        for index in self
            .rtnl
            .default_route_interfaces()
            .map_err(|e| err(ctx, e))?
        {
            if let Some(name) = self.rtnl.link_name(index).map_err(|e| err(ctx, e))? {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    fn init(&mut self, plan: NetPlan, keep: &[NetLease]) -> Result<(), NetError> {
        check_tap_prefix(plan.tap_prefix())?;
        for lease in keep {
            check_lease(&plan, lease)?;
        }
        let host_interface = match self.configured_host_interface.clone() {
            Some(name) => name,
            None => self.default_route_interface()?.ok_or_else(|| NetError {
                context: "choose the interface NAT leaves through".into(),
                message: "there is no IPv4 default route; set [network] host_interface".into(),
            })?,
        };
        check_host_interface(&host_interface)?;
        let spec = TableSpec {
            supernet: plan.supernet(),
            host_interface: host_interface.clone(),
            deny_private: plan.deny_private(),
        };
        nft_apply(
            &nft::table_script(&spec, keep),
            &format!("load table {} {}", nft::FAMILY, nft::TABLE),
        )?;
        enable_ip_forward()?;
        let kept: HashSet<&str> = keep.iter().map(|l| l.tap_name.as_str()).collect();
        let ctx = "list links to reclaim stale taps";
        let links = self.rtnl.links().map_err(|e| err(ctx, e))?;
        for link in links {
            if is_reclaimable(&link, &kept) {
                self.rtnl
                    .delete_link(&link.name)
                    .map_err(|e| err(format!("delete stale tap {}", link.name), e))?;
                tracing::info!("network: removed stale tap {}", link.name);
            }
        }
        tracing::info!(
            "network: table {} {} loaded; nat via {host_interface}; {} lease(s) kept",
            nft::FAMILY,
            nft::TABLE,
            keep.len()
        );
        self.active = Some(Active { plan });
        Ok(())
    }

    fn plan(&self) -> Result<&NetPlan, NetError> {
        self.active
            .as_ref()
            .map(|a| &a.plan)
            .ok_or_else(|| NetError {
                context: "network".into(),
                message: "not initialised (init must run first)".into(),
            })
    }

    fn setup(&mut self, lease: &NetLease) -> Result<(), NetError> {
        check_lease(self.plan()?, lease)?;
        let tap = &lease.tap_name;
        // Exclusive: an existing link of that name (ours or anyone's) is an
        // error and is left alone.
        tap::create_persistent(tap).map_err(|e| NetError {
            context: format!("create tap {tap}"),
            message: match e.raw_os_error() {
                Some(libc::EBUSY) => format!("a device named {tap} already exists"),
                _ => e.to_string(),
            },
        })?;
        if let Err(e) = self.configure(lease) {
            return Err(match self.rtnl.delete_link(tap) {
                Ok(_) => e,
                Err(r) => NetError {
                    message: format!("{}; rollback: delete tap {tap}: {r}", e.message),
                    ..e
                },
            });
        }
        tracing::debug!(
            "network: {tap} up with {}/{}",
            lease.host_ip,
            lease.prefix_len
        );
        Ok(())
    }

    /// Everything of `setup` after the TAP exists.
    fn configure(&mut self, lease: &NetLease) -> Result<(), NetError> {
        let tap = &lease.tap_name;
        let index = self
            .rtnl
            .link_index(tap)
            .map_err(|e| err(format!("find tap {tap}"), e))?
            .ok_or_else(|| NetError {
                context: format!("find tap {tap}"),
                message: "it vanished after creation".into(),
            })?;
        self.rtnl
            .set_alias(index, &tap_mark(lease))
            .map_err(|e| err(format!("mark {tap} as agentenv's"), e))?;
        self.rtnl
            .add_ipv4(index, lease.host_ip, lease.prefix_len)
            .map_err(|e| {
                err(
                    format!(
                        "add address {}/{} to {tap}",
                        lease.host_ip, lease.prefix_len
                    ),
                    e,
                )
            })?;
        self.rtnl
            .set_up(index)
            .map_err(|e| err(format!("set {tap} up"), e))?;
        nft_apply(
            &nft::admit_script(lease),
            &format!(
                "add {tap} ({} via {}) and its egress policy to the sets of table {} {}",
                lease.guest_ip,
                lease.host_ip,
                nft::FAMILY,
                nft::TABLE
            ),
        )
    }

    fn teardown(&mut self, lease: &NetLease) -> Result<(), NetError> {
        check_lease(self.plan()?, lease)?;
        let tap = &lease.tap_name;
        // Elements first: a TAP without them can send nothing anywhere.
        nft_apply(
            &nft::evict_script(lease),
            &format!(
                "remove {tap} and its egress policy from the sets of table {} {}",
                nft::FAMILY,
                nft::TABLE
            ),
        )?;
        let gone = self
            .rtnl
            .delete_link(tap)
            .map_err(|e| err(format!("delete tap {tap}"), e))?;
        tracing::debug!(
            "network: {tap} {}",
            if gone { "removed" } else { "was already gone" }
        );
        Ok(())
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn err(context: impl Into<String>, e: RtnlError) -> NetError {
    NetError {
        context: context.into(),
        message: e.to_string(),
    }
}

fn nft_apply(script: &str, context: &str) -> Result<(), NetError> {
    cmd::run_with_input(NFT, &["-f", "-"], script.as_bytes(), NFT_TIMEOUT)
        .map(drop)
        .map_err(|e| NetError {
            context: context.to_string(),
            message: e.to_string(),
        })
}

/// Turns on IPv4 forwarding in the worker's namespace when it is off.
fn enable_ip_forward() -> Result<(), NetError> {
    let ctx = || format!("enable net.ipv4.ip_forward ({IP_FORWARD})");
    let now = std::fs::read_to_string(IP_FORWARD).map_err(|e| NetError {
        context: ctx(),
        message: e.to_string(),
    })?;
    if now.trim() != "0" {
        return Ok(());
    }
    std::fs::write(IP_FORWARD, "1\n").map_err(|e| NetError {
        context: ctx(),
        message: e.to_string(),
    })?;
    tracing::info!("network: enabled net.ipv4.ip_forward (it was off)");
    Ok(())
}

/// The alias a lease's TAP is marked with.
fn tap_mark(lease: &NetLease) -> String {
    format!("{TAP_MARK}{}", lease.vm_id)
}

/// A link `init` removes: one agentenv made (it carries [`TAP_MARK`]) that no
/// kept lease owns. Whatever its name, a link without the mark is someone
/// else's (another program's `tap0`) and is never touched.
fn is_reclaimable(link: &rtnl::Link, kept: &HashSet<&str>) -> bool {
    link.alias
        .as_deref()
        .is_some_and(|a| a.starts_with(TAP_MARK))
        && !kept.contains(link.name.as_str())
}

fn check_tap_prefix(prefix: &str) -> Result<(), NetError> {
    if is_plain_ifname(prefix) && prefix.len() <= MAX_TAP_PREFIX {
        return Ok(());
    }
    Err(NetError {
        context: format!("tap prefix {prefix:?}"),
        message: format!("must be 1-{MAX_TAP_PREFIX} characters of [A-Za-z0-9_.-]"),
    })
}

fn check_host_interface(name: &str) -> Result<(), NetError> {
    if is_plain_ifname(name) {
        return Ok(());
    }
    Err(NetError {
        context: format!("host interface {name:?}"),
        message: "must be 1-15 characters of [A-Za-z0-9_.-]".into(),
    })
}

/// A lease must be the plan's: its TAP is `{prefix}{index}` and its addresses
/// lie in the plan's /16 (this also keeps nft scripts free of odd text).
fn check_lease(plan: &NetPlan, lease: &NetLease) -> Result<(), NetError> {
    let (net, _) = plan.supernet();
    let in_net = |ip: Ipv4Addr| u32::from(ip) >> 16 == u32::from(net) >> 16;
    let ok = lease.tap_name == format!("{}{}", plan.tap_prefix(), lease.index)
        && is_plain_ifname(&lease.tap_name)
        && in_net(lease.host_ip)
        && in_net(lease.guest_ip)
        && (16..=30).contains(&lease.prefix_len);
    if ok {
        return Ok(());
    }
    Err(NetError {
        context: format!("lease {} ({})", lease.index, lease.tap_name),
        message: format!(
            "does not belong to the network plan ({}*, {}.{}.0.0/16)",
            plan.tap_prefix(),
            net.octets()[0],
            net.octets()[1]
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> NetPlan {
        NetPlan::new(&NetworkConfig::default())
    }

    fn link(name: &str, alias: Option<&str>) -> rtnl::Link {
        rtnl::Link {
            index: 7,
            name: name.into(),
            alias: alias.map(str::to_string),
        }
    }

    #[test]
    fn only_marked_links_no_vm_owns_are_reclaimed() {
        let kept: HashSet<&str> = ["agtap2"].into_iter().collect();
        let ours = Some("agentenv:vm1");
        assert!(is_reclaimable(&link("agtap1", ours), &kept));
        assert!(is_reclaimable(
            &link("agtap16383", Some("agentenv:")),
            &kept
        ));
        // A kept VM's TAP stays.
        assert!(!is_reclaimable(&link("agtap2", ours), &kept));
        // Names alone never decide: another program's links, even ones that
        // look like ours, stay.
        for name in [
            "agtap1", "agtap", "agtap1x", "agtapx1", "eth0", "tap0", "tapfoo",
        ] {
            assert!(!is_reclaimable(&link(name, None), &kept), "{name}");
            assert!(
                !is_reclaimable(&link(name, Some("libvirt: vnet")), &kept),
                "{name}"
            );
        }
        let mut l = plan().lease(1).unwrap();
        l.vm_id = "web-1".into();
        assert_eq!(tap_mark(&l), "agentenv:web-1");
    }

    #[test]
    fn leases_must_match_the_plan() {
        let p = plan();
        let good = p.lease(7).unwrap();
        check_lease(&p, &good).unwrap();
        let renamed = NetLease {
            tap_name: "agtap8".into(),
            ..good.clone()
        };
        let e = check_lease(&p, &renamed).unwrap_err();
        assert!(e.to_string().contains("agtap8"), "{e}");
        let injected = NetLease {
            tap_name: "x\" }; flush ruleset".into(),
            ..good.clone()
        };
        check_lease(&p, &injected).unwrap_err();
        let elsewhere = NetLease {
            guest_ip: Ipv4Addr::new(10, 0, 0, 2),
            ..good
        };
        check_lease(&p, &elsewhere).unwrap_err();
    }

    #[test]
    fn config_names_are_checked_before_anything_runs() {
        let cfg = NetworkConfig {
            tap_prefix: "tap*".into(),
            ..NetworkConfig::default()
        };
        let e = LinuxNetwork::new(&cfg, None).unwrap_err();
        assert!(e.to_string().contains("tap*"), "{e}");
        let cfg = NetworkConfig {
            host_interface: Some("eth0\"".into()),
            ..NetworkConfig::default()
        };
        LinuxNetwork::new(&cfg, None).unwrap_err();
        let long = NetworkConfig {
            tap_prefix: "elevenchars".into(),
            ..NetworkConfig::default()
        };
        LinuxNetwork::new(&long, None).unwrap_err();
    }
}
