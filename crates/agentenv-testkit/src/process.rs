//! Children that go away with the test or benchmark that started them: each
//! in a process group of its own (so a terminal's Ctrl-C reaches only the
//! parent, which then stops them in order, and a kill takes their children
//! too), with a signal from the kernel should the parent die first.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Has the kernel send `sig` to the child once the thread that starts it
/// ends (`PR_SET_PDEATHSIG`), so that nothing outlives a parent that is
/// killed before it can clean up.
pub fn die_with_parent(cmd: &mut Command, sig: libc::c_int) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
    unsafe {
        cmd.pre_exec(move || match libc::prctl(libc::PR_SET_PDEATHSIG, sig) {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        })
    }
}

/// Spawns `cmd` as the leader of a process group of its own, with `sig` sent
/// to it by the kernel should the parent die first.
pub fn spawn_group(cmd: &mut Command, sig: libc::c_int) -> std::io::Result<Child> {
    die_with_parent(cmd.process_group(0), sig)
        .spawn()
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot start {:?}: {e}", cmd.get_program()),
            )
        })
}

/// SIGKILL to the process group a child leads (it was started by
/// [`spawn_group`]), then reaps the child.
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
