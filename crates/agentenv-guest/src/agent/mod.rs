//! The agent: transports ([`transport`]) feed sessions ([`session`]), which
//! start requests: commands ([`exec`]), file transfers ([`files`]),
//! file-system operations ([`fsops`]) and watches ([`watch`]), on behalf of
//! guest users ([`users`]), file-system freezes ([`freeze`]) and a restored
//! VM's new identity ([`identity`]). Everything runs on std threads; the
//! guest → host direction goes through one writer thread per session ([`out`]).

pub mod exec;
pub mod files;
pub mod freeze;
pub mod fsops;
pub mod identity;
pub mod out;
pub mod session;
pub mod sys;
pub mod transport;
pub mod users;
pub mod watch;

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use agentenv_proto::{ErrorCode, ErrorMsg, SERIAL_PORT_NAME, VSOCK_PORT};

/// The agent's name and version, as `HelloOk` reports it.
pub const AGENT: &str = concat!("agentenv-guest ", env!("CARGO_PKG_VERSION"));

/// How often the agent looks for its devices while they are missing.
const DEVICE_POLL: Duration = Duration::from_millis(200);

/// Once one transport is up, how long (from start) the agent still looks for the other.
const LATE_DEVICES: Duration = Duration::from_secs(5);

/// Settings from the command line.
#[derive(Debug, Default)]
pub struct Config {
    /// Freeze only file systems mounted under this directory (tests).
    pub freeze_only_under: Option<PathBuf>,
    /// Freeze requests are served. Off for `--listen-unix` without
    /// `--freeze-only-under`: an agent running on a host must never freeze the
    /// host's own file systems.
    pub freeze_enabled: bool,
    /// `Identity` requests are applied. Only in a VM: an agent serving a unix
    /// socket on a host must never rename the host or touch its network,
    /// clock or random pool.
    pub identity_enabled: bool,
    /// In a VM: the file the guest's boot setup (`agentenv-boot setup`:
    /// host name, `eth0`) makes when it is done. The first hello is answered
    /// only once it exists (or after [`BOOT_SETUP_WAIT`]), so `ready` means
    /// the boot setup is over: a snapshot of a ready VM never catches it
    /// half-way, to finish later in a clone with its source's settings.
    pub boot_marker: Option<PathBuf>,
}

/// Where `agentenv-boot setup` says it is done: on devtmpfs, so every boot
/// starts without it.
pub const BOOT_MARKER: &str = "/dev/.agentenv-setup-done";

/// How long the first hello waits for [`Config::boot_marker`] (an image
/// whose boot never makes it still gets an agent, later).
pub const BOOT_SETUP_WAIT: Duration = Duration::from_secs(30);

/// Waits until `marker` exists, at most [`BOOT_SETUP_WAIT`]; says so when it
/// gives up.
pub fn wait_for_boot_setup(marker: &Path) {
    let start = Instant::now();
    while !marker.exists() {
        if start.elapsed() >= BOOT_SETUP_WAIT {
            eprintln!(
                "{AGENT}: {} did not appear within {} s; answering anyway",
                marker.display(),
                BOOT_SETUP_WAIT.as_secs()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The protocol's error for an OS error on `field`'s path.
pub fn io_error(field: &str, context: &str, e: &io::Error) -> ErrorMsg {
    let code = match e.kind() {
        io::ErrorKind::NotFound => ErrorCode::NotFound,
        io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        io::ErrorKind::InvalidInput => ErrorCode::BadRequest,
        _ if e.raw_os_error() == Some(libc::EISDIR) || e.raw_os_error() == Some(libc::ENOTDIR) => {
            ErrorCode::BadRequest
        }
        _ => ErrorCode::Io,
    };
    ErrorMsg::new(code, Some(field), format!("{context}: {e}"))
}

/// Locks a mutex; a thread that panicked while holding it does not take the
/// agent down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts a worker thread (small stack: workers keep their buffers on the heap).
pub fn spawn<F: FnOnce() + Send + 'static>(name: &str, f: F) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .stack_size(256 * 1024)
        .spawn(f)
        .map(drop)
}

/// Starts a session or listener thread (it parses JSON: a larger stack).
pub fn spawn_session<F: FnOnce() + Send + 'static>(f: F) -> io::Result<()> {
    std::thread::Builder::new()
        .name("session".to_string())
        .stack_size(1024 * 1024)
        .spawn(f)
        .map(drop)
}

/// Guest mode: serves the vsock port and the virtio-serial port, whichever
/// exist, waiting for them to appear (modules may load late).
pub fn run_guest(cfg: Config) -> ! {
    let cfg = Arc::new(cfg);
    let start = Instant::now();
    let (mut vsock, mut serial) = (false, false);
    let (mut vsock_error_shown, mut waiting_shown) = (false, false);
    loop {
        let mut now = Vec::new();
        if !vsock {
            match transport_vsock(&cfg) {
                Ok(()) => {
                    vsock = true;
                    now.push(format!("vsock port {VSOCK_PORT}"));
                }
                // No vsock support (yet): not worth a line.
                Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
                Err(e) => {
                    if !vsock_error_shown {
                        eprintln!("agentenv-guest: vsock port {VSOCK_PORT}: {e}");
                        vsock_error_shown = true;
                    }
                }
            }
        }
        if !serial {
            if let Some(dev) = transport::find_serial_port() {
                let (dev2, cfg2) = (dev.clone(), cfg.clone());
                match spawn_session(move || transport::run_serial(&dev2, &cfg2)) {
                    Ok(()) => {
                        serial = true;
                        now.push(format!("{} ({SERIAL_PORT_NAME})", dev.display()));
                    }
                    Err(e) => eprintln!(
                        "agentenv-guest: {}: cannot start a thread: {e}",
                        dev.display()
                    ),
                }
            }
        }
        if !now.is_empty() {
            eprintln!("{AGENT}: listening on {}", now.join(" and "));
        }
        let up = vsock || serial;
        if (vsock && serial) || (up && start.elapsed() >= LATE_DEVICES) {
            break;
        }
        if !up && !waiting_shown && start.elapsed() >= LATE_DEVICES {
            eprintln!(
                "{AGENT}: no vsock and no virtio-serial port named {SERIAL_PORT_NAME} yet; still looking"
            );
            waiting_shown = true;
        }
        std::thread::sleep(DEVICE_POLL);
    }
    loop {
        std::thread::park();
    }
}

fn transport_vsock(cfg: &Arc<Config>) -> io::Result<()> {
    let listener: OwnedFd = sys::vsock_listen(VSOCK_PORT)?;
    let cfg = cfg.clone();
    spawn_session(move || transport::run_vsock(&listener, &cfg))
}

/// Test mode: serves connections on the Unix socket `path`.
pub fn run_unix(path: &Path, cfg: Config) -> io::Result<()> {
    // A socket left by an earlier run is replaced; anything else is not.
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    eprintln!("{AGENT}: listening on unix socket {}", path.display());
    transport::run_unix(&listener, &Arc::new(cfg));
    Ok(())
}
