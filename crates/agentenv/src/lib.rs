//! The agentenv daemon and CLI.

pub mod cli;
pub mod daemon;
pub mod server;
pub mod tokens;
