//! The synchronous twin of [`crate::runner::run`] for the network worker
//! thread: explicit arguments, bytes on stdin, a timeout, and stderr in the
//! error. The child is spawned from the calling thread, so it starts in that
//! thread's network namespace.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::runner::RunError;

/// Runs `program args…` with `input` on its stdin, waits at most `timeout`,
/// and returns its stdout.
pub fn run_with_input(
    program: &str,
    args: &[&str],
    input: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, RunError> {
    let deadline = Instant::now() + timeout;
    let spawn_err = |source| RunError::Spawn {
        program: program.to_string(),
        source,
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A non-root daemon with CAP_NET_ADMIN (setcap) passes it on to `nft`.
    crate::caps::pass_net_admin(&mut cmd);
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let (tx, rx) = mpsc::channel::<(u8, Vec<u8>)>();
    let mut stdin = child.stdin.take().expect("piped");
    let input = input.to_vec();
    std::thread::spawn(move || {
        // A child that exits without reading gives EPIPE; its status tells.
        let _ = stdin.write_all(&input);
    });
    for (which, pipe) in [
        (
            1u8,
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
        (
            2u8,
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
    ] {
        let mut pipe = pipe.expect("piped");
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send((which, buf));
        });
    }
    drop(tx);
    let timed_out = || RunError::Timeout {
        program: program.to_string(),
        timeout_ms: timeout.as_millis() as u64,
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((1, b)) => stdout = b,
            Ok((_, b)) => stderr = b,
            Err(_) => {
                // The child is not reaped yet (only this thread waits), so its
                // pid cannot have been reused.
                let _ = child.kill();
                let _ = child.wait();
                return Err(timed_out());
            }
        }
    }
    // Both pipes are closed: the child is exiting. Reap it within the deadline.
    let mut pause = Duration::from_micros(50);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(spawn_err)? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(timed_out());
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    };
    if !status.success() {
        return Err(RunError::Failed {
            program: program.to_string(),
            status,
            stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
        });
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_stdin_and_returns_stdout() {
        let out =
            run_with_input("sh", &["-c", "tr a-z A-Z"], b"hi\n", Duration::from_secs(5)).unwrap();
        assert_eq!(out, b"HI\n");
    }

    #[test]
    fn large_input_and_output_do_not_deadlock() {
        let input = vec![b'x'; 1 << 20];
        let out = run_with_input("cat", &[], &input, Duration::from_secs(10)).unwrap();
        assert_eq!(out.len(), 1 << 20);
    }

    #[test]
    fn failure_carries_stderr() {
        let e = run_with_input(
            "sh",
            &["-c", "echo bad thing >&2; exit 3"],
            b"",
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(e.to_string().contains("bad thing"), "{e}");
    }

    #[test]
    fn times_out() {
        let e = run_with_input("sleep", &["10"], b"", Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, RunError::Timeout { .. }), "{e}");
    }

    #[test]
    fn a_child_that_closes_its_pipes_is_still_timed() {
        let e = run_with_input(
            "sh",
            &["-c", "exec >&- 2>&-; exec sleep 10"],
            b"",
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(matches!(e, RunError::Timeout { .. }), "{e}");
    }

    #[test]
    fn missing_program_is_named() {
        let e =
            run_with_input("no-such-program-xyz", &[], b"", Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("no-such-program-xyz"), "{e}");
    }
}
