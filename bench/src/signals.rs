//! SIGINT, SIGTERM and SIGHUP as a flag: the first one is recorded so that the
//! benchmark stops at its next check and cleans up; a second one kills the
//! process the default way (children started with a parent-death signal still
//! get cleaned up by the kernel).
//!
//! Also the two ways the benchmarks make sure their children go away:
//! [`die_with_parent`] (with [`spawn_group`]) and [`kill_group`].

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    RECEIVED.store(sig, Ordering::SeqCst);
    // SAFETY: signal() is async-signal-safe; the next one gets the default action.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
    }
}

/// Installs the handlers.
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only touches an atomic and calls signal().
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

/// The signal received, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// An error once a signal has arrived, for `?` in benchmark loops.
pub fn check() -> anyhow::Result<()> {
    match received() {
        None => Ok(()),
        Some(s) => anyhow::bail!("interrupted by signal {s}; cleaning up"),
    }
}

/// Has the kernel send `sig` to the child once this process dies
/// (`PR_SET_PDEATHSIG`), so that nothing outlives a benchmark that is killed
/// before it can clean up.
pub fn die_with_parent(cmd: &mut Command, sig: libc::c_int) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Spawns `cmd` as the leader of a process group of its own (so that a
/// Ctrl-C in the terminal reaches only the benchmark, which then stops it in
/// order, and [`kill_group`] takes its children too), with `sig` sent to it
/// by the kernel should the benchmark die first.
pub fn spawn_group(cmd: &mut Command, sig: libc::c_int) -> anyhow::Result<Child> {
    use anyhow::Context as _;
    die_with_parent(cmd.process_group(0), sig)
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))
}

/// SIGKILL to the process group a child leads (it was started with
/// `process_group(0)`), then reaps the child.
pub fn kill_group(child: Child) {
    stop_group(child, &[]);
}

/// Stops the process group a child leads: each of `stages`' signals in turn
/// until the leader exits within that stage's time, then SIGKILL to whatever
/// is left in the group; reaps the child.
pub fn stop_group(mut child: Child, stages: &[(libc::c_int, Duration)]) {
    let pgid = child.id() as i32;
    for &(sig, within) in stages {
        // SAFETY: the group leader is our unreaped child, so the group id is ours.
        unsafe {
            libc::killpg(pgid, sig);
        }
        let t = Instant::now();
        while t.elapsed() < within && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if t.elapsed() < within {
            break;
        }
    }
    // SAFETY: as above; the group id stays ours until we reap the leader.
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
    let _ = child.wait();
}
