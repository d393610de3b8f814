//! `agentenv`: with no subcommand, the daemon; `agentenv vm …`, the CLI.

use std::net::SocketAddr;
use std::path::PathBuf;

use agentenv::cli::{ClientOpts, SnapshotCommand, VmCommand};
use clap::{Parser, Subcommand};

/// Disposable microVMs behind a JSON HTTP API.
#[derive(Debug, Parser)]
#[command(name = "agentenv", version, about)]
struct Cli {
    /// Daemon configuration file (TOML). Without one, defaults under ./data.
    #[arg(long, env = "AGENTENV_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Address the daemon listens on.
    #[arg(long, default_value = "127.0.0.1:8080", global = true)]
    listen: SocketAddr,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (the default when no command is given).
    Serve,
    /// Manage VMs through a running daemon.
    Vm {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Manage disk snapshots through a running daemon.
    Snapshot {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Check a config file and print it with every default filled in.
    CheckConfig,
    /// Print the OpenAPI document.
    Openapi,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        None | Some(Command::Serve) => daemon(cli.config, cli.listen),
        Some(Command::Vm { opts, command }) => agentenv::cli::run_vm(&opts, command),
        Some(Command::Snapshot { opts, command }) => agentenv::cli::run_snapshot(&opts, command),
        Some(Command::CheckConfig) => agentenv::daemon::load_config(cli.config.as_deref())
            .map(|c| print_out(&format!("{c:#?}\n"))),
        Some(Command::Openapi) => {
            print_out(&agentenv::server::openapi::document());
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("agentenv: {e:#}");
        std::process::exit(1);
    }
}

/// Writes to stdout, ignoring a closed pipe (`agentenv openapi | head`).
fn print_out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn daemon(config: Option<PathBuf>, listen: SocketAddr) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = agentenv::daemon::load_config(config.as_deref())?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(agentenv::daemon::serve(cfg, listen))
}
