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

/// How often an unanswered hello is sent again.
pub(super) const HELLO_RESEND: Duration = Duration::from_millis(300);

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
