//! Benchmarks of agentenv, and the small pieces they share.
//!
//! Every benchmark prints its figures side by side with a baseline measured
//! in the same run, on the same machine, interleaved with the measured side
//! where that makes sense. Targets are shown as PASS/MISS for information;
//! nothing here is a timed assertion.
//!
//! - [`http`], a minimal blocking HTTP/1.1 client over TCP or a Unix socket,
//!   used for both the daemon and the bare Firecracker API baseline, so that
//!   both sides pay for the same client code;
//! - [`stats`], percentiles;
//! - [`procfs`], memory figures and process scans from `/proc`;
//! - [`signals`], Ctrl-C and SIGTERM turned into a flag that the benchmark
//!   loops check, so they can stop and clean up.
//!
//! See `bench/README.md` for how to run each benchmark.

pub mod http;
pub mod procfs;
pub mod signals;
pub mod stats;
