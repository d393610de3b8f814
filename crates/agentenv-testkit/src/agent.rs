//! The guest agent (`agentenv-guest --listen-unix SOCKET`) running on the host,
//! for the tests and benchmarks that take the agent path without a VM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{kill_group, spawn_group};

/// An agent on the host, in a process group of its own; killed (the whole
/// group) and its socket removed when stopped or dropped.
pub struct HostAgent {
    child: Option<Child>,
    /// The agent's Unix socket.
    pub socket: PathBuf,
}

impl HostAgent {
    /// Starts the workspace's `agentenv-guest` on `socket` (output inherited),
    /// for a test; panics when it does not come up.
    pub fn start(socket: &Path) -> HostAgent {
        HostAgent::spawn(&crate::paths::guest_agent(), socket, None)
            .unwrap_or_else(|e| panic!("agentenv-guest: {e}"))
    }

    /// Starts `bin --listen-unix socket` (stdout and stderr to `log`, or
    /// inherited), which gets SIGKILL when the thread that started it ends
    /// (`PR_SET_PDEATHSIG`, so nothing outlives a killed benchmark), and
    /// waits up to 10 s for its socket.
    pub fn spawn(bin: &Path, socket: &Path, log: Option<&Path>) -> std::io::Result<HostAgent> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(bin);
        cmd.arg("--listen-unix").arg(socket).stdin(Stdio::null());
        if let Some(log) = log {
            let out = std::fs::File::create(log)?;
            cmd.stdout(out.try_clone()?).stderr(out);
        }
        let mut agent = HostAgent {
            child: Some(spawn_group(&mut cmd, libc::SIGKILL)?),
            socket: socket.to_path_buf(),
        };
        let start = Instant::now();
        while !socket.exists() {
            let child = agent.child.as_mut().expect("just spawned");
            if let Some(status) = child.try_wait()? {
                return Err(std::io::Error::other(format!("exited at start ({status})")));
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(std::io::Error::other(format!(
                    "no socket {} within 10 s",
                    socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Connectable by any uid (a jailed VMM's bridge runs as its own): the
        // directory it is in is what guards it on the host.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;
        Ok(agent)
    }

    /// The agent's process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Kills the agent's process group, reaps it and removes its socket.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            kill_group(child);
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        self.stop();
    }
}
