//! agentenv's host implementations: the VMM drivers and everything else that
//! touches the operating system.

pub mod agent;
pub mod caps;
pub mod cgroup;
pub mod disk;
pub mod firecracker;
pub mod jail;
pub mod kvm;
pub mod local;
pub mod net;
pub mod private;
pub mod process;
pub mod qemu;
pub mod runner;
pub mod safe_open;
pub mod snapshots;

pub use local::LocalHost;
