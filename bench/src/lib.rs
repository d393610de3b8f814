//! Benchmarks of agentenv, and the harness they share.
//!
//! Every benchmark prints its figures side by side with a baseline measured
//! in the same run, on the same machine, interleaved with the measured side
//! where that makes sense. Targets are shown as PASS/MISS for information;
//! nothing here is a timed assertion. A benchmark's binary holds only its
//! scenario; the rest is here:
//!
//! - [`args`], the flags every benchmark takes (`--quick`, `--json`,
//!   `--keep`, `--tmp-dir`, `--bin-dir`); each declares its own beside them,
//!   `--warmup` among them where it applies;
//! - [`runner`], the interleaved A/B runner (rotating order, warm-up, paired
//!   samples) and progress lines;
//! - [`report`], the figures: tables with targets, as text or JSON, the
//!   cleanup, and the exit status;
//! - [`stats`], percentiles, medians and spreads;
//! - [`daemon`], the real `agentenv` daemon as a separate process: finding
//!   the binaries, a temporary directory with a generated config (networking
//!   always off), start, health wait, and a teardown that deletes the VMs,
//!   stops the daemon with SIGTERM and checks that no process is left; what
//!   a QEMU guest needs; and running a command to completion;
//! - [`procfs`], memory and CPU figures from `/proc`, and the host's
//!   description and load;
//! - [`bare`], fc-double spawned and driven directly: the bare baseline;
//! - [`signals`], Ctrl-C and SIGTERM turned into a flag that the benchmark
//!   loops check, so they can stop and clean up; and children that die with
//!   the benchmark.
//!
//! See `bench/README.md` for how to run each benchmark.

pub mod args;
pub mod bare;
pub mod daemon;
pub mod procfs;
pub mod report;
pub mod runner;
pub mod signals;
pub mod stats;
