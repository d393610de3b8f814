//! fc-double run "bare", spawned as the daemon spawns it and driven over its
//! API socket: the baseline of `api_overhead` and `snapshot_restore`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentenv_client::{Client, Endpoint};
use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::daemon::wait_for_socket;
use crate::runner::timed;
use crate::signals;

/// A running fc-double and a connection to its API; killed when dropped.
pub struct BareVmm {
    child: Option<Child>,
    sock: PathBuf,
    api: Client,
}

impl BareVmm {
    /// `fc_double --api-sock DIR/NAME.sock --id NAME` in `dir` (own process group,
    /// output in `NAME.log`), connected once its socket is (polled every 100 µs).
    pub fn start(fc_double: &Path, dir: &Path, name: &str, timeout: Duration) -> Result<BareVmm> {
        let sock = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(fc_double);
        cmd.arg("--api-sock").arg(&sock).arg("--id").arg(name);
        cmd.current_dir(dir).stdin(Stdio::null());
        cmd.stderr(out.try_clone()?).stdout(out);
        let child = Some(signals::spawn_group(&mut cmd, libc::SIGKILL)?);
        let api = Client::new(Endpoint::Unix(sock.clone()), timeout);
        // Made before the waits, so that a failure kills it (on drop).
        let mut vmm = BareVmm { child, sock, api };
        let child = vmm.child.as_mut().expect("spawned");
        let poll = Duration::from_micros(100);
        wait_for_socket(child, &vmm.sock, &log, "fc-double", poll)?;
        // The socket file appears at bind(), an instant before listen().
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = vmm.api.connect() {
            let refused = e.kind() == std::io::ErrorKind::ConnectionRefused;
            if !refused || Instant::now() >= deadline {
                return Err(e).context("cannot connect to fc-double");
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(vmm)
    }

    /// A `PUT` or `PATCH` with a JSON body, timed; Firecracker answers 204.
    pub fn call(&mut self, method: &str, path: &str, body: &Value) -> Result<Duration> {
        let (r, took) = timed(|| {
            let r = self.api.request_json(method, path, body);
            r.with_context(|| format!("{method} {path}"))
        })?;
        let (status, text) = (r.status, r.text());
        ensure!(status == 204, "{method} {path}: HTTP {status}: {text}");
        Ok(took)
    }

    /// What the daemon does to a VMM it deletes: kill its group, reap, unlink; timed.
    pub fn kill(&mut self) -> Duration {
        let t0 = Instant::now();
        self.api.disconnect();
        if let Some(child) = self.child.take() {
            signals::kill_group(child);
        }
        let _ = std::fs::remove_file(&self.sock);
        t0.elapsed()
    }
}

impl Drop for BareVmm {
    fn drop(&mut self) {
        self.kill();
    }
}
