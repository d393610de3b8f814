//! The connection's opening: hybrid vsock's `CONNECT`, the hello's nonce, and
//! the agent's refusal of a hello.

use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::time::Duration;

use agentenv_core::agent::AgentError;
use agentenv_proto::{self as proto, ErrorMsg, Kind, NONCE_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// 16 random lower-case hex characters.
pub(super) fn nonce() -> [u8; NONCE_LEN] {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let v = h.finish();
    let mut out = [0u8; NONCE_LEN];
    for (i, b) in out.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[((v >> (i * 4)) & 0xf) as usize];
    }
    out
}

/// The first wait before an unanswered hello is sent again. After a restore
/// from a memory snapshot the agent answers within a few milliseconds, but the
/// first hello is often lost: a short first wait brings the channel back at once.
pub(super) const HELLO_RESEND_FIRST: Duration = Duration::from_millis(5);

/// The longest wait between two hellos: the wait doubles up to this, so a
/// guest that is still booting gets about three hellos a second, not hundreds.
pub(super) const HELLO_RESEND_MAX: Duration = Duration::from_millis(300);

/// When the hellos go out: at once, then after waits of
/// [`HELLO_RESEND_FIRST`], doubling, capped at [`HELLO_RESEND_MAX`].
#[derive(Debug, Clone)]
pub(super) struct HelloResend {
    next: Duration,
}

impl HelloResend {
    pub(super) fn new() -> HelloResend {
        HelloResend {
            next: HELLO_RESEND_FIRST,
        }
    }

    /// How long to wait for an answer before the next hello.
    pub(super) fn wait(&mut self) -> Duration {
        let w = self.next;
        self.next = (w * 2).min(HELLO_RESEND_MAX);
        w
    }
}

/// Most bytes skipped while looking for the agent's `HelloOk`.
pub(super) const MAX_RESYNC_BYTES: usize = 8 << 20;

/// The message of an `Error` frame on stream 0 at the start of `buf`, once
/// whole (read in place: the buffer may hold megabytes of resync bytes).
pub(super) fn leading_error(buf: &[u8]) -> Result<Option<ErrorMsg>, AgentError> {
    let Some(h) = buf.get(..proto::HEADER_LEN) else {
        return Ok(None);
    };
    let h: [u8; proto::HEADER_LEN] = h.try_into().expect("length checked");
    let Ok((kind, stream, n)) = proto::parse_header(&h) else {
        return Ok(None);
    };
    if kind != Kind::Error || stream != 0 {
        return Ok(None);
    }
    let Some(payload) = buf.get(proto::HEADER_LEN..proto::HEADER_LEN + n) else {
        return Ok(None);
    };
    serde_json::from_slice(payload)
        .map(Some)
        .map_err(|e| AgentError::Protocol(format!("bad Error message: {e}")))
}

pub(super) async fn vsock_handshake(
    sock: &mut UnixStream,
    path: &Path,
    port: u32,
) -> Result<(), AgentError> {
    sock.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| AgentError::Connect(format!("{}: {e}", path.display())))?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = sock
            .read(&mut b)
            .await
            .map_err(|e| AgentError::Connect(format!("{}: {e}", path.display())))?;
        if n == 0 {
            return Err(AgentError::Connect(format!(
                "{}: nothing listens on guest vsock port {port} yet",
                path.display()
            )));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 64 {
            return Err(AgentError::Protocol("vsock handshake line too long".into()));
        }
    }
    let line = String::from_utf8_lossy(&line);
    if !line.starts_with("OK ") {
        return Err(AgentError::Connect(format!(
            "{}: vsock CONNECT {port} answered {line:?}",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellos_are_resent_quickly_at_first_then_at_most_every_300_ms() {
        let mut r = HelloResend::new();
        let waits: Vec<u64> = (0..10).map(|_| r.wait().as_millis() as u64).collect();
        assert_eq!(waits, vec![5, 10, 20, 40, 80, 160, 300, 300, 300, 300]);
        // A guest that boots for 10 s gets ~40 hellos, not thousands.
        let mut r = HelloResend::new();
        let (mut t, mut n) = (Duration::ZERO, 0);
        while t < Duration::from_secs(10) {
            t += r.wait();
            n += 1;
        }
        assert!(n <= 40, "{n} hellos in 10 s");
    }
}
