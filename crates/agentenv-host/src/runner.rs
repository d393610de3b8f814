//! The one way agentenv runs external commands: explicit arguments, a timeout,
//! and the command's stderr in the error.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

/// A command that failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// It could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// It ran too long and was killed.
    #[error("{program} timed out after {timeout_ms} ms")]
    Timeout {
        /// The program.
        program: String,
        /// The limit.
        timeout_ms: u64,
    },
    /// It exited unsuccessfully.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        /// The program.
        program: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
}

/// Runs `program args…` with stdin closed, waits at most `timeout`, and returns
/// its stdout.
pub async fn run<I, S>(program: &str, args: I, timeout: Duration) -> Result<Vec<u8>, RunError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| RunError::Spawn {
            program: program.to_string(),
            source,
        })?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(source)) => {
            return Err(RunError::Spawn {
                program: program.to_string(),
                source,
            })
        }
        Err(_) => {
            return Err(RunError::Timeout {
                program: program.to_string(),
                timeout_ms: timeout.as_millis() as u64,
            })
        }
    };
    if !out.status.success() {
        return Err(RunError::Failed {
            program: program.to_string(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn captures_stdout_and_stderr() {
        let out = run("sh", ["-c", "echo hi"], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(out, b"hi\n");
        let e = run("sh", ["-c", "echo bad >&2; exit 2"], Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("bad"), "{e}");
    }

    #[tokio::test]
    async fn times_out() {
        let e = run("sleep", ["10"], Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(e, RunError::Timeout { .. }), "{e}");
    }

    #[tokio::test]
    async fn missing_program_is_named() {
        let e = run("no-such-program-xyz", [""; 0], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no-such-program-xyz"), "{e}");
    }
}
