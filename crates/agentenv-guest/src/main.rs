//! agentenv-guest: the agent every agentenv VM runs (placeholder while it is written).
fn main() {}
