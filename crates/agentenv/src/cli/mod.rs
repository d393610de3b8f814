//! The CLI: a typed client of the API. Tables for people, `--json` for scripts.
//!
//! [`args`] holds the clap definitions (the daemon's flags too), [`commands`]
//! turns each client command into [`agentenv_client::ApiClient`] calls, and
//! [`render`] prints their answers.

pub mod args;
pub mod commands;
pub mod render;

pub use args::{
    Cli, ClientOpts, Command, DaemonArgs, SnapshotCommand, TokenCommand, TokenFileArgs, VmCommand,
};
pub use commands::{run_snapshot, run_token, run_vm};
