//! `agentenv`: with no subcommand, the daemon; `agentenv vm …`, the CLI.

use agentenv::cli::{Cli, Command, DaemonArgs};
use clap::{CommandFactory, FromArgMatches};

fn main() {
    let matches = Cli::command().get_matches();
    let given = |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    let daemon_flags = given("config") || given("listen");
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        None => daemon(cli.daemon),
        Some(Command::Serve(args)) => daemon(args.or(cli.daemon)),
        Some(Command::Vm { .. } | Command::Snapshot { .. }) if daemon_flags => Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--config and --listen are the daemon's; client commands take --server",
            )
            .exit(),
        Some(Command::Vm { opts, command }) => agentenv::cli::run_vm(&opts, command),
        Some(Command::Snapshot { opts, command }) => agentenv::cli::run_snapshot(&opts, command),
        Some(Command::Token { file, command }) => agentenv::cli::run_token(&file, command),
        Some(Command::CheckConfig { config }) => {
            agentenv::daemon::load_config(config.or(cli.daemon.config).as_deref())
                .map(|c| print_out(&format!("{c:#?}\n")))
        }
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

fn daemon(args: DaemonArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Everything the daemon makes is private unless it says otherwise.
    agentenv::daemon::private_umask();
    let cfg = agentenv::daemon::load_config(args.config.as_deref())?;
    agentenv::daemon::drop_unused_capabilities(&cfg)?;
    let listen = args.listen(&cfg)?;
    let e2b_listen = args.e2b_listen(&cfg)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(agentenv::daemon::serve(cfg, listen, e2b_listen))
}
