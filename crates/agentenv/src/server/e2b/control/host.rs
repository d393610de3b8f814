//! The E2B listener's `Host` check, before a request reaches either plane:
//! the native API's rule (`server::guard`: loopback names,
//! `http.allowed_hosts`, the listener's own address) plus, when
//! `[e2b] domain` is set, `api.<domain>` and `*.<domain>` (the SDK's
//! control-plane and sandbox hosts). Anything else is 421: a web page that
//! rebinds its DNS name to this host cannot reach it from a browser.
//! Requests on a Unix socket are not checked. (No Content-Type rule is
//! needed here: every E2B request must carry a custom header —
//! `X-API-KEY` or `X-Access-Token` — which a browser sends cross-site only
//! after a preflight the daemon never answers.)

use agentenv_core::config::Config;
use axum::extract::Request;
use axum::http::{header, StatusCode};

use crate::server::e2b::error::E2bError;
use crate::server::guard::AllowedHosts;
use crate::server::listen::{Peer, Transport};

/// `Ok` when `req` may be served, else the 421.
pub fn check(config: &Config, req: &Request) -> Result<(), E2bError> {
    let peer = req.extensions().get::<Peer>();
    if matches!(peer, Some(p) if p.transport == Transport::Unix) {
        return Ok(());
    }
    let local = peer.and_then(|p| p.local);
    let refusal = match req.headers().get(header::HOST).map(|h| h.to_str()) {
        None => "a request without a Host header".to_string(),
        Some(Err(_)) => "a Host header that is not text".to_string(),
        Some(Ok(h)) if allows(config, h, local) => return Ok(()),
        Some(Ok(h)) => format!("Host {h:?}"),
    };
    let domain = match &config.e2b.domain {
        Some(d) => format!(", api.{d} and *.{d}"),
        None => String::new(),
    };
    Err(E2bError::new(
        StatusCode::MISDIRECTED_REQUEST,
        format!("{refusal} does not name this daemon; allowed: localhost, 127.0.0.1, [::1], the listen address, http.allowed_hosts{domain}"),
    ))
}

/// True when `host` names this daemon's E2B listener.
fn allows(config: &Config, host: &str, local: Option<std::net::SocketAddr>) -> bool {
    if AllowedHosts::new(&config.http.allowed_hosts).allows(host, local) {
        return true;
    }
    let Some(domain) = &config.e2b.domain else {
        return false;
    };
    crate::server::e2b::below_domain(host, domain).is_some_and(|label| {
        label
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let mut cfg = Config::default();
        cfg.http.allowed_hosts = vec!["box.example".into()];
        let local = Some("10.0.0.2:3000".parse().unwrap());
        for ok in [
            "localhost:3000",
            "127.0.0.1",
            "box.example",
            "10.0.0.2:3000",
        ] {
            assert!(allows(&cfg, ok, local), "{ok}");
        }
        assert!(!allows(&cfg, "api.ae.example", local));
        cfg.e2b.domain = Some("ae.example".into());
        for ok in [
            "api.ae.example",
            "API.ae.example:443",
            "49983-i0123456789abcdefghi.ae.example",
            "localhost",
        ] {
            assert!(allows(&cfg, ok, local), "{ok}");
        }
        for bad in [
            "ae.example",
            "evil.example",
            "api.ae.example.evil.example",
            "x..ae.example",
            "xae.example",
            "",
        ] {
            assert!(!allows(&cfg, bad, local), "{bad}");
        }
    }
}
