//! Test kit.

pub mod leaks;
pub mod paths;

pub mod fc_double;
