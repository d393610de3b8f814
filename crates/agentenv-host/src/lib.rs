//! agentenv's host implementations: the VMM drivers and everything else that
//! touches the operating system.

pub mod agent;
pub mod disk;
pub mod firecracker;
pub mod jail;
pub mod kvm;
pub mod local;
pub mod net;
pub mod process;
pub mod qemu;
pub mod runner;
pub mod snapshots;

pub use local::LocalHost;
