//! The flags every benchmark takes, flattened into each binary's own `Args`.

use std::path::PathBuf;

/// The common flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// A short run: fewer iterations and smaller sizes (each benchmark's
    /// defaults say what changes).
    #[arg(long)]
    pub quick: bool,
    /// Print the figures as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Keep what the run made (temporary directory with config, logs and
    /// sessions; net_setup: its namespaces) instead of removing it.
    #[arg(long)]
    pub keep: bool,
    /// Where the run's temporary directory is made (its file system decides
    /// what fsyncs cost) [default: $TMPDIR or /tmp].
    #[arg(long, value_name = "DIR")]
    pub tmp_dir: Option<PathBuf>,
    /// Directory holding the agentenv binaries the benchmark runs [default:
    /// this binary's directory, then <workspace>/target/release].
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
}

impl Common {
    /// `full` for a normal run, `quick` with `--quick`.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }

    /// The directory the run's temporary directory goes in.
    pub fn tmp_parent(&self) -> PathBuf {
        self.tmp_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

/// `--warmup`, for the benchmarks that repeat a step and can discard its
/// first rounds.
#[derive(Debug, Clone, clap::Args)]
pub struct Warmup {
    /// Untimed rounds before each timed series [default: per benchmark,
    /// fewer with --quick].
    #[arg(long, value_name = "N")]
    pub warmup: Option<usize>,
}

impl Warmup {
    /// The flag's value, else the benchmark's default for a normal or a
    /// `--quick` run.
    pub fn get(&self, common: &Common, full: usize, quick: usize) -> usize {
        self.warmup.unwrap_or(common.pick(full, quick))
    }
}
