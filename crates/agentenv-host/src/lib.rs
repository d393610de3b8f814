//! agentenv's host implementations: the VMM drivers and everything else that
//! touches the operating system.

pub mod process;
