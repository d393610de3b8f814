//! Refusals of cross-site requests, before any other work (and before an
//! in-flight slot is taken).
//!
//! - **Host allow-list** (TCP only): a web page that rebinds its own DNS name
//!   to 127.0.0.1 reaches the daemon from the victim's browser with *its*
//!   name in `Host`; only loopback names, `http.allowed_hosts` and the
//!   listener's own address pass, everything else is 421.
//! - **Content-Type**: a browser sends a cross-site POST without asking first
//!   (no CORS preflight) only when its type is `text/plain`, a form type, or
//!   absent. Requiring `application/json` (and `application/octet-stream` for
//!   file uploads) makes every cross-site write a preflighted one, and the
//!   daemon never answers a preflight with `Access-Control-*` headers, so the
//!   browser never sends it.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::listen::{Peer, Transport};

/// Host names every TCP request may carry (with or without a port).
const LOOPBACK_NAMES: &[&str] = &["localhost", "127.0.0.1", "[::1]"];

/// The names TCP requests may carry in `Host`.
#[derive(Debug, Clone)]
pub struct AllowedHosts {
    /// `http.allowed_hosts`, lower-case: a bare name matches any port.
    configured: Vec<String>,
}

impl AllowedHosts {
    /// The loopback names and `configured`.
    pub fn new(configured: &[String]) -> AllowedHosts {
        AllowedHosts {
            configured: configured.iter().map(|h| h.to_ascii_lowercase()).collect(),
        }
    }

    /// True when `host` (a `Host` header value) names this daemon: a loopback
    /// name, a configured name, or the listener's own address `local`.
    pub fn allows(&self, host: &str, local: Option<std::net::SocketAddr>) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let name = strip_port(&host);
        if LOOPBACK_NAMES.contains(&name) {
            return true;
        }
        if let Some(local) = local {
            let ip = match local.ip() {
                std::net::IpAddr::V4(v4) => v4.to_string(),
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            };
            if host == local.to_string() || name == ip {
                return true;
            }
        }
        self.configured.iter().any(|c| {
            *c == host || (!c.contains(':') && *c == name) || (c.starts_with('[') && *c == name)
        })
    }
}

/// `name` without its `:port` (IPv6 literals keep their brackets).
pub(crate) fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// The middleware: 421 for a TCP request whose `Host` is not allowed, 415 for
/// a body that is not of the route's type.
pub async fn check(State(allowed): State<Arc<AllowedHosts>>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<Peer>();
    let tcp = !matches!(peer, Some(p) if p.transport == Transport::Unix);
    if tcp {
        let local = peer.and_then(|p| p.local);
        let host = req.headers().get(header::HOST).map(|h| h.to_str());
        let refusal = match host {
            None => Some("a request without a Host header".to_string()),
            Some(Err(_)) => Some("a Host header that is not text".to_string()),
            Some(Ok(h)) if !allowed.allows(h, local) => Some(format!("Host {h:?}")),
            Some(Ok(_)) => None,
        };
        if let Some(what) = refusal {
            let mut e = ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                format!("{what} does not name this daemon; allowed: localhost, 127.0.0.1, [::1], the listen address and http.allowed_hosts"),
            );
            e.body.field = Some("Host".into());
            return e.into_response();
        }
    }
    if has_body(req.headers()) {
        let want = if is_files_route(req.uri().path()) {
            "application/octet-stream"
        } else {
            "application/json"
        };
        let got = req.headers().get(header::CONTENT_TYPE);
        let ok = got
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| media_type(v).eq_ignore_ascii_case(want));
        if !ok {
            let got = match got {
                None => "none".to_string(),
                Some(v) => format!("{:?}", String::from_utf8_lossy(v.as_bytes())),
            };
            let mut e = ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("a request body must be sent with Content-Type: {want} (got {got})"),
            );
            e.body.field = Some("Content-Type".into());
            return e.into_response();
        }
    }
    next.run(req).await
}

/// True when the request carries a body (a non-zero length, or chunked).
fn has_body(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
}

/// `/v1/vm/{id}/files`: the file route, whose upload body (`PUT`) is the
/// file's bytes (a bad id is the route's to refuse, with a 400 naming `vm_id`).
fn is_files_route(path: &str) -> bool {
    path.starts_with("/v1/vm/") && path.ends_with("/files")
}

/// The media type of a `Content-Type` value, without its parameters.
fn media_type(value: &str) -> &str {
    value.split(';').next().unwrap_or("").trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let a = AllowedHosts::new(&["API.example.com".into(), "10.0.0.5:8443".into()]);
        let local = Some("192.168.1.2:8080".parse().unwrap());
        for ok in [
            "localhost",
            "localhost:8080",
            "127.0.0.1",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:8080",
            "LOCALHOST",
            "api.example.com",
            "api.example.com:443",
            "10.0.0.5:8443",
            "192.168.1.2:8080",
            "192.168.1.2",
        ] {
            assert!(a.allows(ok, local), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.5",
            "10.0.0.5:80",
            "127.0.0.2",
            "",
            "[::2]:8080",
        ] {
            assert!(!a.allows(bad, local), "{bad}");
        }
    }

    #[test]
    fn files_route() {
        assert!(is_files_route("/v1/vm/a/files"));
        assert!(is_files_route("/v1/vm//files"));
        assert!(!is_files_route("/v1/snapshots/a/files"));
        assert!(!is_files_route("/v1/vm"));
        assert!(!is_files_route("/v1/vm/a/exec"));
        assert_eq!(
            media_type("application/json; charset=utf-8"),
            "application/json"
        );
    }
}
