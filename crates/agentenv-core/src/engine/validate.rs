//! Field validators for create requests: pure checks of one value each,
//! with the error naming the field.

use agentenv_api::NetworkSpec;

use crate::backend::NetAttachment;
use crate::error::EngineError;
use crate::net::EgressPolicy;

/// Longest kernel command line accepted from a request.
const MAX_BOOT_ARGS: usize = 2048;

/// A caller's kernel command line: not empty, bounded, printable, and not
/// setting what agentenv sets itself.
pub(super) fn check_boot_args(args: &str) -> Result<(), EngineError> {
    const F: &str = "boot_args";
    if args.trim().is_empty() {
        return Err(EngineError::bad(F, "boot_args must not be empty"));
    }
    if args.len() > MAX_BOOT_ARGS {
        return Err(EngineError::bad(
            F,
            format!("boot_args is {} bytes, at most {MAX_BOOT_ARGS}", args.len()),
        ));
    }
    if args.chars().any(|c| c.is_control()) {
        return Err(EngineError::bad(
            F,
            "boot_args must not contain control characters",
        ));
    }
    // The parameters agentenv sets itself (docs/guest-contract.md); others,
    // such as agentenv.heartbeat, are the caller's to give.
    const RESERVED: [&str; 6] = ["vm_id", "root", "overlay", "share", "ip", "gw"];
    if let Some(w) = args.split_whitespace().find(|w| {
        w.strip_prefix("agentenv.")
            .map(|rest| rest.split('=').next().unwrap_or(""))
            .is_some_and(|name| RESERVED.contains(&name))
    }) {
        return Err(EngineError::bad(
            F,
            format!("boot_args must not set {w:?}: agentenv sets agentenv.vm_id, .root, .overlay, .share, .ip and .gw itself"),
        ));
    }
    Ok(())
}

/// Firecracker's kernel command line capacity, its final NUL included (as
/// linux-loader's `Cmdline` counts it: at most 2047 visible bytes).
pub const FIRECRACKER_CMDLINE_CAPACITY: usize = 2048;

/// What Firecracker (v1.13–v1.16) appends to `boot_args` at `InstanceStart`,
/// each part after a space: `pci=off` (it runs without `--enable-pci`; it is
/// appended even when `boot_args` has it already), `root=/dev/vda ro|rw` when
/// the first drive is the root device, then one
/// `virtio_mmio.device=4K@0x<addr>:<irq>` per virtio device (drives, network
/// interface, vsock), addresses from `0xd0000000` in steps of `0x1000`, IRQs
/// from 5 — with or without ACPI. (Checked against the real v1.13.1: a
/// command line one byte over this budget is refused at `InstanceStart`.)
pub fn firecracker_appends(root_read_only: Option<bool>, devices: usize) -> Vec<String> {
    let mut parts = Vec::with_capacity(devices + 2);
    parts.push("pci=off".to_string());
    if let Some(ro) = root_read_only {
        parts.push(format!("root=/dev/vda {}", if ro { "ro" } else { "rw" }));
    }
    for i in 0..devices as u64 {
        parts.push(format!(
            "virtio_mmio.device=4K@0x{:x}:{}",
            0xd000_0000u64 + i * 0x1000,
            5 + i
        ));
    }
    parts
}

/// Refuses a kernel command line that Firecracker would refuse at
/// `InstanceStart` ("Inserting string would make command line too long"):
/// `args` (agentenv's parameters included) plus `later` bytes still to come
/// (a network lease's parameters) plus [`firecracker_appends`] must fit in
/// [`FIRECRACKER_CMDLINE_CAPACITY`].
pub(super) fn check_firecracker_cmdline(
    args: &str,
    later: usize,
    root_read_only: Option<bool>,
    devices: usize,
) -> Result<(), EngineError> {
    let appended: usize = firecracker_appends(root_read_only, devices)
        .iter()
        .map(|p| p.len() + 1)
        .sum();
    let total = args.len() + later + appended;
    let limit = FIRECRACKER_CMDLINE_CAPACITY - 1;
    if total > limit {
        let over = total - limit;
        return Err(EngineError::bad(
            "boot_args",
            format!(
                "the kernel command line would be {total} bytes as Firecracker sees it (boot_args, \
                 agentenv's own parameters and what Firecracker appends: pci=off, root=/dev/vda and \
                 one virtio_mmio.device= per device), over its limit of {limit} bytes plus the final NUL; \
                 shorten boot_args by {over} bytes"
            ),
        ));
    }
    Ok(())
}

/// A caller's own TAP and MAC (without automatic networking): both required;
/// the MAC comes back lower-case.
pub(super) fn check_network(n: &NetworkSpec) -> Result<NetAttachment, EngineError> {
    let t = n.tap_name.as_deref().ok_or_else(|| {
        EngineError::bad(
            "network.tap_name",
            "network.tap_name is required: automatic networking is disabled, so give the TAP and guest_mac",
        )
    })?;
    if t.is_empty()
        || t.len() > 15
        || !t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(EngineError::bad(
            "network.tap_name",
            format!(
                "network.tap_name {t:?} must be 1 to 15 ASCII letters, digits, `-`, `_` or `.`"
            ),
        ));
    }
    let mac = n.guest_mac.as_deref().unwrap_or("");
    if !is_unicast_mac(mac) {
        return Err(EngineError::bad(
            "network.guest_mac",
            format!("network.guest_mac {mac:?} must be a unicast MAC written as xx:xx:xx:xx:xx:xx"),
        ));
    }
    Ok(NetAttachment {
        tap_name: t.to_string(),
        guest_mac: mac.to_ascii_lowercase(),
    })
}

/// `network.allow` and `network.internet`: parsed into the VM's policy.
/// They need automatic networking (`auto`): a caller's own TAP is outside
/// agentenv's firewall, so a policy for it could not be kept. Also checks
/// that `tap_name` and `guest_mac` come together, in either mode.
pub(super) fn check_egress(
    n: Option<&NetworkSpec>,
    auto: bool,
) -> Result<EgressPolicy, EngineError> {
    let Some(n) = n else {
        return Ok(EgressPolicy::default());
    };
    if n.tap_name.is_some() != n.guest_mac.is_some() {
        return Err(EngineError::bad(
            "network",
            "network.tap_name and network.guest_mac go together: give both or neither",
        ));
    }
    if !auto && n.has_egress() {
        let field = if n.allow.is_empty() {
            "network.internet"
        } else {
            "network.allow"
        };
        return Err(EngineError::bad(
            field,
            format!("{field} needs automatic networking ([network] enable = true): agentenv's firewall does not see a caller's own TAP"),
        ));
    }
    EgressPolicy::parse(&n.allow, n.internet)
        .map_err(|e| EngineError::bad(&e.field(), e.to_string()))
}

fn is_unicast_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return false;
    }
    let mut bytes = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return false;
        }
        match u8::from_str_radix(p, 16) {
            Ok(b) => bytes[i] = b,
            Err(_) => return false,
        }
    }
    bytes[0] & 1 == 0 && bytes != [0; 6]
}

/// A share's mount point in the guest: absolute, not `/`, plain ASCII, without
/// `.` or `..` components.
pub(super) fn check_share_guest_path(gfield: &str, g: &str) -> Result<(), EngineError> {
    // `//` (any run of slashes) is the root too.
    if !g.starts_with('/')
        || g.bytes().all(|b| b == b'/')
        || g.len() > 255
        || g.split('/').any(|c| c == "." || c == "..")
        || !g
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-'))
    {
        return Err(EngineError::bad(
            gfield,
            format!("{gfield} {g:?} must be an absolute guest path other than / made of ASCII letters, digits, `/`, `.`, `_` and `-`, without `.` or `..` components"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert!(is_unicast_mac("06:00:ac:10:00:02"));
        assert!(is_unicast_mac("AA:BB:CC:DD:EE:FE"));
        assert!(!is_unicast_mac("01:00:5e:00:00:01"), "multicast");
        assert!(!is_unicast_mac("00:00:00:00:00:00"));
        assert!(!is_unicast_mac("06:00:ac:10:00"));
        assert!(!is_unicast_mac("06-00-ac-10-00-02"));
        assert!(!is_unicast_mac("06:00:ac:10:00:0g"));
    }

    #[test]
    fn boot_args_rules() {
        assert!(check_boot_args("console=ttyS0 panic=1").is_ok());
        assert!(check_boot_args("console=ttyS0 agentenv.heartbeat=1").is_ok());
        for bad in [
            "",
            "  ",
            "a\nb",
            "x agentenv.root=/dev/sda",
            &"a".repeat(3000),
        ] {
            let e = check_boot_args(bad).unwrap_err();
            assert_eq!(e.field(), Some("boot_args"), "{bad:?}");
        }
    }

    #[test]
    fn tap_names() {
        let ok = NetworkSpec {
            tap_name: Some("tap0".into()),
            guest_mac: Some("06:00:00:00:00:0A".into()),
            ..NetworkSpec::default()
        };
        let a = check_network(&ok).unwrap();
        assert_eq!(
            (a.tap_name.as_str(), a.guest_mac.as_str()),
            ("tap0", "06:00:00:00:00:0a")
        );
        for bad in ["", "a/b", "way-too-long-name0", "tap 0"] {
            let n = NetworkSpec {
                tap_name: Some(bad.into()),
                ..ok.clone()
            };
            assert_eq!(
                check_network(&n).unwrap_err().field(),
                Some("network.tap_name")
            );
        }
        let missing = NetworkSpec {
            tap_name: None,
            ..ok.clone()
        };
        assert_eq!(
            check_network(&missing).unwrap_err().field(),
            Some("network.tap_name")
        );
        let no_mac = NetworkSpec {
            guest_mac: None,
            ..ok
        };
        assert_eq!(
            check_network(&no_mac).unwrap_err().field(),
            Some("network.guest_mac")
        );
    }

    #[test]
    fn egress_fields() {
        let spec = |allow: &[&str], internet| NetworkSpec {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            internet,
            ..NetworkSpec::default()
        };
        assert!(check_egress(None, false).unwrap().is_default());
        assert!(check_egress(Some(&NetworkSpec::default()), false)
            .unwrap()
            .is_default());
        let p = check_egress(Some(&spec(&["10.1.2.0/24:443"], Some(false))), true).unwrap();
        assert!(!p.internet);
        assert_eq!(p.allow_strings(), ["10.1.2.0/24:443"]);
        let e = check_egress(Some(&spec(&["10.1.2.0/24:443"], None)), false).unwrap_err();
        assert_eq!(e.field(), Some("network.allow"));
        let e = check_egress(Some(&spec(&[], Some(false))), false).unwrap_err();
        assert_eq!(e.field(), Some("network.internet"));
        let half = NetworkSpec {
            tap_name: Some("tap0".into()),
            ..NetworkSpec::default()
        };
        for auto in [true, false] {
            let e = check_egress(Some(&half), auto).unwrap_err();
            assert_eq!(e.field(), Some("network"));
        }
        let e = check_egress(
            Some(&spec(&["10.0.0.0/8", "10.1.2.0/24:99999"], None)),
            true,
        )
        .unwrap_err();
        assert_eq!(e.field(), Some("network.allow[1]"));
        assert!(e.to_string().contains("99999"), "{e}");
    }
}

#[cfg(test)]
mod firecracker_cmdline_tests {
    use super::*;

    #[test]
    fn firecracker_appends_root_and_one_mmio_device_each() {
        assert_eq!(
            firecracker_appends(Some(true), 3).join(" "),
            "pci=off root=/dev/vda ro virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=4K@0xd0001000:6 virtio_mmio.device=4K@0xd0002000:7"
        );
        assert_eq!(
            firecracker_appends(Some(false), 0),
            ["pci=off", "root=/dev/vda rw"]
        );
        assert_eq!(firecracker_appends(None, 0), ["pci=off"]);
    }

    #[test]
    fn the_budget_is_2047_bytes_with_what_firecracker_appends() {
        let appended = " pci=off root=/dev/vda ro virtio_mmio.device=4K@0xd0000000:5".len();
        let fits = "a".repeat(2047 - appended);
        check_firecracker_cmdline(&fits, 0, Some(true), 1).unwrap();
        let e = check_firecracker_cmdline(&format!("{fits}a"), 0, Some(true), 1).unwrap_err();
        assert!(
            e.to_string().contains("shorten boot_args by 1 bytes"),
            "{e}"
        );
        let e = check_firecracker_cmdline(&fits, 10, Some(true), 1).unwrap_err();
        assert!(e.to_string().contains("by 10 bytes"), "{e}");
    }
}
