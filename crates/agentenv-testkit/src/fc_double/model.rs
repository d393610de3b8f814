//! The request and response bodies the double parses and prints: the
//! driver's own typed Firecracker API objects
//! ([`agentenv_host::firecracker::models`]), so the driver and the double
//! cannot drift apart, plus what only the double needs: MAC address checks,
//! rate limiters as Firecracker reports them back, and its snapshot state
//! file.

use std::fmt;

pub use agentenv_host::firecracker::models::*;
use serde::{Deserialize, Serialize};

/// The version of the double's snapshot state file format.
pub const SNAPSHOT_FORMAT: u32 = 2;

/// The first line of a snapshot state file (a JSON document follows).
pub const SNAPSHOT_MAGIC: &str = "fc-double snapshot";

/// A token bucket as Firecracker reports it back: a bucket with a zero size
/// or a zero refill time is disabled (reported as absent), and a zero
/// one-time burst is reported as absent.
fn normalize_bucket(b: TokenBucket) -> Option<TokenBucket> {
    if b.size == 0 || b.refill_time == 0 {
        return None;
    }
    Some(TokenBucket {
        one_time_burst: b.one_time_burst.filter(|v| *v != 0),
        ..b
    })
}

/// A rate limiter as reported back: absent when neither bucket is active.
pub fn normalize_rate_limiter(rl: Option<RateLimiter>) -> Option<RateLimiter> {
    let rl = rl?;
    let out = RateLimiter {
        bandwidth: rl.bandwidth.and_then(normalize_bucket),
        ops: rl.ops.and_then(normalize_bucket),
    };
    if out.bandwidth.is_none() && out.ops.is_none() {
        None
    } else {
        Some(out)
    }
}

/// A MAC address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn parse(s: &str) -> Option<MacAddr> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return None;
        }
        let mut bytes = [0u8; 6];
        for (slot, part) in bytes.iter_mut().zip(parts) {
            if part.len() != 2 {
                return None;
            }
            *slot = u8::from_str_radix(part, 16).ok()?;
        }
        Some(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// What the double writes into a snapshot state file (after the
/// [`SNAPSHOT_MAGIC`] line), so that a later `PUT /snapshot/load` restores
/// the same devices: the drives and the vsock socket at their saved paths,
/// as Firecracker does.
#[derive(Debug, Deserialize, Serialize)]
pub struct SnapshotState {
    /// [`SNAPSHOT_FORMAT`].
    pub format: u32,
    /// The Firecracker version the double emulated (a snapshot loads only
    /// into the same version).
    pub vmm_version: String,
    pub vm_id: String,
    pub machine_config: MachineConfiguration,
    pub drives: Vec<Drive>,
    pub network_interfaces: Vec<NetworkInterface>,
    pub vsock: Option<Vsock>,
    pub heartbeat: u64,
}
