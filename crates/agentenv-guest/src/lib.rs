//! The agentenv guest agent's wire protocol ([`proto`]) and, with the `client`
//! feature, the host side of it ([`client`]).
//!
//! The agent itself is the `agentenv-guest` binary of this crate (`src/main.rs`),
//! a small static program that every agentenv root file system carries.

pub mod proto;

#[cfg(feature = "client")]
pub mod client;
