//! agentenv-guest: the agent every agentenv VM runs. It serves the protocol of
//! `agentenv_proto` on the vsock port and the virtio-serial port (or,
//! for tests, on a Unix socket): commands, file transfers, file-system freezes.

mod agent;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: agentenv-guest [--listen-unix PATH [--freeze-only-under DIR]]
       agentenv-guest --version | --help

Without arguments (in a VM) the agent serves vsock port 10789 and the
virtio-serial port org.agentenv.agent.0, whichever exist.

  --listen-unix PATH        serve connections on a Unix socket instead (tests)
  --freeze-only-under DIR   Freeze only file systems mounted under DIR (tests)
  --version                 print the version
  --help                    print this help";

enum Mode {
    Guest,
    Unix(PathBuf),
    Version,
    Help,
}

fn parse(args: impl Iterator<Item = String>) -> Result<(Mode, agent::Config), String> {
    let mut mode = Mode::Guest;
    let mut cfg = agent::Config::default();
    let mut args = args.peekable();
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--version" => mode = Mode::Version,
            "--help" | "-h" => mode = Mode::Help,
            "--listen-unix" => mode = Mode::Unix(PathBuf::from(value("--listen-unix")?)),
            "--freeze-only-under" => {
                cfg.freeze_only_under = Some(PathBuf::from(value("--freeze-only-under")?));
            }
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    if cfg.freeze_only_under.is_some() && !matches!(mode, Mode::Unix(_)) {
        return Err("--freeze-only-under needs --listen-unix".to_string());
    }
    cfg.freeze_enabled = matches!(mode, Mode::Guest) || cfg.freeze_only_under.is_some();
    cfg.identity_enabled = matches!(mode, Mode::Guest);
    if matches!(mode, Mode::Guest) {
        cfg.boot_marker = Some(PathBuf::from(agent::BOOT_MARKER));
    }
    Ok((mode, cfg))
}

fn main() -> ExitCode {
    let (mode, cfg) = match parse(std::env::args().skip(1)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("agentenv-guest: {e} (try --help)");
            return ExitCode::from(2);
        }
    };
    match mode {
        Mode::Version => println!("{}", agent::AGENT),
        Mode::Help => println!("{USAGE}"),
        Mode::Guest => agent::run_guest(cfg),
        Mode::Unix(path) => {
            if let Err(e) = agent::run_unix(&path, cfg) {
                eprintln!("agentenv-guest: listen on {}: {e}", path.display());
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}
