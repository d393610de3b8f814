//! agentenv's domain and engine.
//!
//! Invariant: this crate makes no direct OS calls. Everything that touches the
//! host (VMM processes, files, memory figures, the guest agent's sockets) goes
//! through the traits in [`backend`], [`host`], [`net`], [`snapshot`] and
//! [`agent`], implemented in `agentenv-host` and faked by the recording fakes
//! of `testing` (and `engine/agent/fake.rs`) in the engine's own tests.

pub mod agent;
pub mod backend;
pub mod config;
pub mod engine;
pub mod error;
pub mod failpoints;
pub mod host;
pub mod ids;
pub mod limits;
pub mod net;
pub mod principal;
pub mod snapshot;
pub mod state;
#[cfg(test)]
pub(crate) mod testing;

pub use engine::Engine;
pub use error::EngineError;
