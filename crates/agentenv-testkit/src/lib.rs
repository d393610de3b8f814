//! Test kit.

pub mod agent;
pub mod leaks;
pub mod netns;
pub mod paths;
pub mod process;
pub mod skip;

pub mod fc_double;
