//! Who a request comes from, when the transport itself says so.
//!
//! A Unix-socket peer (the socket's permissions are its credential) and a
//! client certificate accepted under mTLS are principals before any header is
//! read: the connection inserts a [`Principal`] into each request's
//! extensions, and the bearer-token check (`server::auth`) skips requests
//! that carry one. The type is the engine's, so the same principal owns what
//! it creates.

pub use agentenv_core::principal::{Principal, Scope};
