//! Who a request comes from, when the transport itself says so.
//!
//! A Unix-socket peer (the socket's permissions are its credential) and a
//! client certificate accepted under mTLS are principals before any header is
//! read: the connection inserts a [`Principal`] into each request's
//! extensions, and the bearer-token check skips requests that carry one.

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    Admin,
    /// Only the VMs and snapshots it created.
    User,
}

/// A caller the daemon knows by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `uid:<peer uid>` for a Unix-socket peer, the subject CN of a client
    /// certificate under mTLS, or a token's name.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
}
