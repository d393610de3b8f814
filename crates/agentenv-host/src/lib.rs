//! agentenv's host implementations: the VMM drivers and everything else that
//! touches the operating system.

pub mod firecracker;
pub mod local;
pub mod process;
pub mod runner;

pub use local::LocalHost;
