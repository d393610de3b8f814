//! Network namespaces for tests: a "host" namespace joined to an "outside" one
//! by a veth pair, deleted on drop. Tests never touch the machine's own
//! interfaces, addresses, routes or rules.

use std::path::PathBuf;
use std::process::Command;

/// The outside end's address (the host namespace's default gateway).
pub const OUTSIDE_IP: &str = "198.18.0.1";
/// The host namespace's veth address.
pub const HOST_IP: &str = "198.18.0.2";

/// A pair of namespaces made for one test.
#[derive(Debug)]
pub struct NetnsPair {
    /// Plays the VM host (TAPs, nft table, NAT).
    pub host: String,
    /// Plays the world outside.
    pub outside: String,
}

/// Why the fixture cannot be made here (not root, no `ip`), or `None`.
pub fn unavailable() -> Option<String> {
    if nix::unistd::geteuid().as_raw() != 0 {
        return Some("needs root".into());
    }
    for tool in ["ip", "nft"] {
        let ok = Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl NetnsPair {
    /// Creates `agentenv-t-<tag>-h` and `-o`, a veth pair between them,
    /// `198.18.0.2/24` in the host with a default route via `198.18.0.1`.
    pub fn new(tag: &str) -> Result<NetnsPair, String> {
        let base = format!("agentenv-t-{tag}-{}", std::process::id());
        let pair = NetnsPair {
            host: format!("{base}-h"),
            outside: format!("{base}-o"),
        };
        run(&["ip", "netns", "add", &pair.host])?;
        run(&["ip", "netns", "add", &pair.outside])?;
        let (h, o) = (pair.host.as_str(), pair.outside.as_str());
        // IPv6 address setup (DAD) finishes at its own pace and would make state
        // snapshots differ; the VM networks are IPv4 only. Namespaced sysctls.
        for ns in [h, o] {
            run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ])?;
        }
        let steps: Vec<Vec<&str>> = vec![
            vec![
                "ip", "-n", h, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
                "netns", o,
            ],
            vec![
                "ip",
                "-n",
                h,
                "addr",
                "add",
                "198.18.0.2/24",
                "dev",
                "veth0",
            ],
            vec![
                "ip",
                "-n",
                o,
                "addr",
                "add",
                "198.18.0.1/24",
                "dev",
                "veth1",
            ],
            vec!["ip", "-n", h, "link", "set", "veth0", "up"],
            vec!["ip", "-n", o, "link", "set", "veth1", "up"],
            vec!["ip", "-n", h, "link", "set", "lo", "up"],
            vec!["ip", "-n", o, "link", "set", "lo", "up"],
            vec![
                "ip",
                "-n",
                h,
                "route",
                "add",
                "default",
                "via",
                "198.18.0.1",
            ],
        ];
        for s in steps {
            run(&s)?;
        }
        // The veth's carrier comes up a moment after `link set up`; a state
        // snapshot taken before then (NO-CARRIER, routes `linkdown`) would
        // differ from every later one.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let link = pair.ip(&["-o", "link", "show", "veth0"])?;
            if link.contains("state UP") && !link.contains("NO-CARRIER") {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("veth0 in {h} has no carrier after 10 s: {link}"));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(pair)
    }

    /// `/run/netns/<host>`.
    pub fn host_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.host)
    }

    /// `ip -n <host> args…` stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["ip", "-n", &self.host];
        all.extend_from_slice(args);
        run(&all)
    }

    /// `ip netns exec <host> program args…` stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["ip", "netns", "exec", &self.host];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Links, addresses, routes and the whole nft ruleset of the host
    /// namespace, for before/after leak comparisons.
    pub fn state(&self) -> String {
        let mut out = String::new();
        for args in [
            vec!["-o", "link", "show"],
            vec!["-o", "addr", "show"],
            vec!["route", "show", "table", "all"],
        ] {
            out.push_str(&self.ip(&args).unwrap_or_else(|e| e));
        }
        out.push_str(&self.exec(&["nft", "list", "ruleset"]).unwrap_or_else(|e| e));
        // Link statistics and ids change between snapshots; keep names and flags.
        out.lines()
            .map(|l| {
                l.split_whitespace()
                    .filter(|w| !w.starts_with("link/") || w.len() < 12)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.host, &self.outside] {
            if let Err(e) = run(&["ip", "netns", "del", ns]) {
                eprintln!("cannot delete namespace {ns}: {e}");
            }
        }
    }
}
