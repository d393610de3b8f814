//! SIGINT, SIGTERM and SIGHUP as a flag: the first one is recorded so that the
//! benchmark stops at its next check and cleans up; a second one kills the
//! process the default way (children started with a parent-death signal still
//! get cleaned up by the kernel).
//!
//! Also, from the test kit, the ways the benchmarks make sure their children
//! go away: [`spawn_group`] (with [`die_with_parent`]), [`kill_group`] and
//! [`stop_group`].

use std::sync::atomic::{AtomicI32, Ordering};

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

pub use agentenv_testkit::process::{die_with_parent, kill_group, spawn_group, stop_group};
