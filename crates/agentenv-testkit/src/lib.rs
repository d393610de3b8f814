//! Test kit.

pub mod leaks;
pub mod netns;
pub mod paths;

pub mod fc_double;
