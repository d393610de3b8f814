//! The flags every benchmark takes, flattened into each binary's own `Args`.
//! A benchmark declares its own flags beside them, each with its default and,
//! where `--quick` changes it, `default_value_if("quick", "true", …)`.

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
    /// The directory the run's temporary directory goes in.
    pub fn tmp_parent(&self) -> PathBuf {
        self.tmp_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

/// The value parser of every count flag (`--runs`, `--execs`, …): a whole
/// number of at least 1, so that no series runs empty and no row or target
/// silently drops out of the report.
pub fn count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_are_at_least_one() {
        assert_eq!(super::count("3"), Ok(3));
        assert!(super::count("0").is_err());
        assert!(super::count("-1").is_err());
    }
}
