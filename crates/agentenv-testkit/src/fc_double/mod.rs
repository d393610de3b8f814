//! A test double of the Firecracker VMM's HTTP API (the `fc-double` binary).
//!
//! It takes Firecracker's command line, listens on the API socket
//! (HTTP/1.1 over a Unix stream socket) and answers the API requests
//! agentenv's driver makes as Firecracker v1.13.1 (or, with
//! `--fc-version 1.16.1`, v1.16) does: the same paths, bodies parsed with the
//! driver's own typed API objects (`agentenv_host::firecracker::models`), the
//! same pre-boot/post-boot rules, status codes and fault messages where they
//! are known. It runs no guest: `InstanceStart` only changes the state, and a
//! few flags script what the "guest" does and inject failures. It uses only
//! std threads and starts in a few milliseconds.
//!
//! Modelled: `GET /`, `GET /version`, `GET /vm/config`, `PUT /machine-config`,
//! `/boot-source`, `/drives/{id}`, `/network-interfaces/{id}`, `/vsock`,
//! `/actions` (`InstanceStart`, `SendCtrlAltDel`, `FlushMetrics`),
//! `PATCH /vm`, `PUT /snapshot/create` and `PUT /snapshot/load`. Firecracker's
//! other endpoints (balloon, MMDS, logger, metrics, entropy, CPU templates,
//! updates of drives and interfaces, v1.16's pmem, serial and hotplug)
//! answer 400 `fc-double does not model …`: the driver never calls them.
//!
//! Behaviours that decide real outcomes:
//!
//! - **The kernel command-line budget.** At `InstanceStart` Firecracker
//!   appends `pci=off` (run without `--enable-pci`), `root=/dev/vda ro` (or
//!   `rw`; for the root drive) and one
//!   `virtio_mmio.device=4K@0x…:IRQ` per virtio device (drives, network
//!   interfaces, vsock) to `boot_args`, within 2048 bytes (the final NUL
//!   included). Over it, `InstanceStart` fails with 400 `Start microvm error:
//!   Invalid kernel command line: Inserting string would make command line
//!   too long.` (linux-loader's wording) and the VM stays `Not started`.
//! - **Ctrl-Alt-Del before the keyboard driver is up.** A real guest only
//!   acts on `SendCtrlAltDel` once its i8042 driver is up; before that the
//!   request is answered 204 and the key press is lost.
//!   `--i8042-delay-ms N` sets when that happens (N ms after
//!   `InstanceStart`; default 0; a restored guest has it up already).
//! - **Snapshots.** `PUT /snapshot/create` only on a paused VM (else 400;
//!   `Diff` only with dirty page tracking): it writes a state file (a
//!   `fc-double snapshot` line, then a versioned JSON document of the VM's
//!   configuration: machine, drives with their paths, interfaces, the vsock
//!   with its `uds_path`) and a sparse memory file of `mem_size_mib`.
//!   `PUT /snapshot/load` only in a fresh process before any configuration
//!   (else 400); exactly one of `mem_backend` (`File` or `Uffd`) and the
//!   deprecated `mem_file_path`; it reads the state back (missing, corrupt,
//!   another format or another Firecracker version → 400), checks the memory
//!   file (missing or shorter than the guest memory → 400; the file is then
//!   held open, as Firecracker maps it), opens the drives and binds the vsock
//!   socket at their saved paths (a relative path, as agentenv's driver gives
//!   them, resolves in the process's working directory, as in Firecracker:
//!   clones in their own directories open their own disk copies and bind
//!   their own sockets), applies `network_overrides` (an unknown interface or
//!   a TAP name of 16 bytes or more → 400) and — v1.16 only, v1.13.1 refuses
//!   them as unknown fields — `vsock_override` and `clock_realtime`, and
//!   leaves the VM
//!   `Paused`, or `Running` with `resume_vm`. A failure once loading began is
//!   fatal, as in Firecracker: answered, then the process exits with
//!   status 1.
//!
//! Flags of its own (besides Firecracker's, which are accepted; `--api-sock`,
//! `--id`, `--log-path` and `--http-api-max-payload-size` are honoured):
//!
//! - `--fc-version V`: the Firecracker version to emulate, `1.13.1`
//!   (default) or `1.16.1`; `GET /version`, `GET /` and `--version` report it.
//! - `--i8042-delay-ms N` (default 0): Ctrl-Alt-Del is lost until N ms after
//!   `InstanceStart`.
//! - `--fail-request "METHOD /path"` (repeatable): answer 400 with
//!   `injected failure: …` to requests of that method whose path starts with
//!   `/path`.
//! - `--hang-on "METHOD /path"` (repeatable): read such a request and never
//!   answer it.
//! - `--no-socket`: never create the socket; sleep until killed.
//! - `--exit-at-start N`: exit with status N at once.
//! - `--exit-on-start`: exit 0 right after answering `InstanceStart`.
//! - `--panic-on-start`: after `InstanceStart`, print a kernel panic line and
//!   exit 0 about 100 ms later.
//! - `--shutdown-delay-ms N` (default 50): after a Ctrl-Alt-Del the guest
//!   took, exit 0 after N ms of guest run time.
//! - `--ignore-ctrl-alt-del`: accept `SendCtrlAltDel` but never exit.
//! - `--boot-console`: after `InstanceStart`, print kernel lines,
//!   `AGENTENV_READY vm_id=ID`, then `agentenv-heartbeat N` every 200 ms while
//!   running.
//! - `--vsock-agent PORT=UNIX_PATH` (repeatable): a program in the "guest"
//!   listens on vsock port PORT; host-initiated connections to it through the
//!   vsock device (`CONNECT PORT`) are bridged to the Unix socket UNIX_PATH
//!   (see `vsock.rs`).

mod console;
mod http;
mod model;
mod vmm;
mod vsock;

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use vmm::FcVersion;

use vmm::{After, Reply, Shared, VmmState};

/// Firecracker's default API socket path.
const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";
/// Firecracker's default instance id.
const DEFAULT_INSTANCE_ID: &str = "anonymous-instance";
/// Firecracker's default limit on an API request body, in bytes.
const DEFAULT_PAYLOAD_LIMIT: usize = 51200;
/// Firecracker's exit status for a command line it cannot parse.
const EXIT_ARG_PARSING: i32 = 153;

/// A request selected by `--fail-request` or `--hang-on`.
#[derive(Clone, Debug)]
struct RequestMatch {
    method: String,
    path_prefix: String,
}

impl RequestMatch {
    fn parse(spec: &str) -> Result<Self, String> {
        let mut words = spec.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some(method), Some(path), None) if path.starts_with('/') => Ok(RequestMatch {
                method: method.to_ascii_uppercase(),
                path_prefix: path.to_string(),
            }),
            _ => Err(format!(
                "expected \"METHOD /path\" (e.g. \"PUT /drives\"), got {spec:?}"
            )),
        }
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        self.method == method && path.starts_with(&self.path_prefix)
    }
}

/// The command line.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    api_sock: PathBuf,
    pub(crate) id: String,
    log_path: Option<PathBuf>,
    payload_limit: usize,
    pub(crate) fc_version: FcVersion,
    pub(crate) i8042_delay_ms: u64,
    fail_requests: Vec<RequestMatch>,
    hang_on: Vec<RequestMatch>,
    no_socket: bool,
    exit_at_start: Option<i32>,
    exit_on_start: bool,
    panic_on_start: bool,
    shutdown_delay_ms: u64,
    ignore_ctrl_alt_del: bool,
    boot_console: bool,
    vsock_agents: Vec<(u32, PathBuf)>,
    version: bool,
    help: bool,
}

/// Firecracker's flags that take a value, and those that do not.
const FC_VALUE_FLAGS: &[&str] = &[
    "api-sock",
    "id",
    "seccomp-filter",
    "start-time-us",
    "start-time-cpu-us",
    "parent-cpu-time-us",
    "config-file",
    "metadata",
    "log-path",
    "level",
    "module",
    "metrics-path",
    "describe-snapshot",
    "http-api-max-payload-size",
    "mmds-size-limit",
];
const FC_SWITCHES: &[&str] = &[
    "no-seccomp",
    "no-api",
    "show-level",
    "show-log-origin",
    "boot-timer",
    "version",
    "snapshot-version",
    "enable-pci",
    "help",
];
/// The double's own flags.
const DOUBLE_VALUE_FLAGS: &[&str] = &[
    "fail-request",
    "hang-on",
    "exit-at-start",
    "shutdown-delay-ms",
    "fc-version",
    "i8042-delay-ms",
    "vsock-agent",
];
const DOUBLE_SWITCHES: &[&str] = &[
    "no-socket",
    "exit-on-start",
    "panic-on-start",
    "ignore-ctrl-alt-del",
    "boot-console",
];

fn parse_number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("'{flag}' expects a number, got {value:?}"))
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut opts = Options {
        api_sock: PathBuf::from(DEFAULT_API_SOCK),
        id: DEFAULT_INSTANCE_ID.to_string(),
        log_path: None,
        payload_limit: DEFAULT_PAYLOAD_LIMIT,
        fc_version: FcVersion::default(),
        i8042_delay_ms: 0,
        fail_requests: Vec::new(),
        hang_on: Vec::new(),
        no_socket: false,
        exit_at_start: None,
        exit_on_start: false,
        panic_on_start: false,
        shutdown_delay_ms: 50,
        ignore_ctrl_alt_del: false,
        boot_console: false,
        vsock_agents: Vec::new(),
        version: false,
        help: false,
    };
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            return Err(format!(
                "Found argument '{arg}' which wasn't expected, or isn't valid in this context."
            ));
        };
        let (name, inline_value) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (flag, None),
        };
        let takes_value = FC_VALUE_FLAGS.contains(&name) || DOUBLE_VALUE_FLAGS.contains(&name);
        let is_switch = FC_SWITCHES.contains(&name) || DOUBLE_SWITCHES.contains(&name);
        if !takes_value && !is_switch {
            return Err(format!(
                "Found argument '--{name}' which wasn't expected, or isn't valid in this context."
            ));
        }
        if is_switch {
            if inline_value.is_some() {
                return Err(format!("Argument '--{name}' does not take a value."));
            }
            match name {
                "version" => opts.version = true,
                "help" => opts.help = true,
                "no-socket" => opts.no_socket = true,
                "exit-on-start" => opts.exit_on_start = true,
                "panic-on-start" => opts.panic_on_start = true,
                "ignore-ctrl-alt-del" => opts.ignore_ctrl_alt_del = true,
                "boot-console" => opts.boot_console = true,
                _ => {} // Firecracker switches without meaning here.
            }
            continue;
        }
        let value = match inline_value {
            Some(v) => v,
            None => iter
                .next()
                .cloned()
                .ok_or_else(|| format!("The argument '--{name}' requires a value."))?,
        };
        match name {
            "api-sock" => opts.api_sock = PathBuf::from(value),
            "id" => opts.id = value,
            "log-path" => opts.log_path = Some(PathBuf::from(value)),
            "http-api-max-payload-size" => opts.payload_limit = parse_number(name, &value)?,
            "fc-version" => opts.fc_version = FcVersion::parse(&value)?,
            "i8042-delay-ms" => opts.i8042_delay_ms = parse_number(name, &value)?,
            "fail-request" => opts.fail_requests.push(RequestMatch::parse(&value)?),
            "hang-on" => opts.hang_on.push(RequestMatch::parse(&value)?),
            "exit-at-start" => opts.exit_at_start = Some(parse_number(name, &value)?),
            "shutdown-delay-ms" => opts.shutdown_delay_ms = parse_number(name, &value)?,
            "vsock-agent" => opts.vsock_agents.push(vsock::parse_agent(&value)?),
            _ => {} // Firecracker options without meaning here.
        }
    }
    Ok(opts)
}

fn usage() -> String {
    let mut text = format!(
        "Firecracker v{}-double\n\nA test double of Firecracker's API (no guest is \
         run).\n\nFirecracker flags (accepted; api-sock, id, log-path and \
         http-api-max-payload-size are honoured):\n",
        FcVersion::default().label()
    );
    for flag in FC_VALUE_FLAGS {
        text.push_str(&format!("  --{flag} <value>\n"));
    }
    for flag in FC_SWITCHES {
        text.push_str(&format!("  --{flag}\n"));
    }
    text.push_str("\nFailure injection and fake guest:\n");
    let own = [
        (
            "--fc-version V",
            "emulate Firecracker 1.13.1 (default) or 1.16.1",
        ),
        (
            "--i8042-delay-ms N",
            "Ctrl-Alt-Del is lost until N ms after InstanceStart",
        ),
        (
            "--fail-request \"METHOD /path\"",
            "answer 400 to matching requests (repeatable)",
        ),
        (
            "--hang-on \"METHOD /path\"",
            "never answer matching requests (repeatable)",
        ),
        ("--no-socket", "never create the API socket"),
        ("--exit-at-start N", "exit with status N at once"),
        ("--exit-on-start", "exit 0 right after InstanceStart"),
        (
            "--panic-on-start",
            "print a kernel panic after InstanceStart, then exit 0",
        ),
        (
            "--shutdown-delay-ms N",
            "exit N ms after SendCtrlAltDel (default 50)",
        ),
        ("--ignore-ctrl-alt-del", "never exit on SendCtrlAltDel"),
        (
            "--boot-console",
            "print boot lines, AGENTENV_READY and heartbeats",
        ),
        (
            "--vsock-agent PORT=UNIX_PATH",
            "bridge vsock CONNECT PORT to a Unix socket (repeatable)",
        ),
    ];
    for (flag, what) in own {
        text.push_str(&format!("  {flag:<30}  {what}\n"));
    }
    text
}

/// Firecracker's check of an instance id: 1 to 64 characters, alphanumeric
/// or `-`.
fn validate_instance_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!(
            "Invalid len ({});  the length must be between 1 and 64",
            id.len()
        ));
    }
    match id.chars().position(|c| !(c == '-' || c.is_alphanumeric())) {
        Some(pos) => Err(format!(
            "Invalid char ({}) at position {pos}",
            id.chars().nth(pos).unwrap_or('?')
        )),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------- logging

static INSTANCE_ID: OnceLock<String> = OnceLock::new();
static LOG_TARGET: Mutex<Option<File>> = Mutex::new(None);

/// Sends the log to `file` instead of stdout (`PUT /logger`, `--log-path`).
pub(crate) fn set_log_target(file: File) {
    *LOG_TARGET.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
}

/// A UTC time stamp, `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn`.
fn timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

/// Starts a named thread (Firecracker's thread names), logging when it cannot.
pub(crate) fn spawn(name: &str, body: impl FnOnce() + Send + 'static) {
    if thread::Builder::new()
        .name(name.to_string())
        .spawn(body)
        .is_err()
    {
        log(&format!("Cannot start the {name} thread."));
    }
}

/// Writes one log line, Firecracker style, to the log target (stdout unless
/// a logger was configured).
pub(crate) fn log(message: &str) {
    let id = INSTANCE_ID
        .get()
        .map(String::as_str)
        .unwrap_or(DEFAULT_INSTANCE_ID);
    let current = thread::current();
    let thread_name = current.name().unwrap_or("-");
    let line = format!("{} [{id}:{thread_name}] {message}\n", timestamp());
    let mut target = LOG_TARGET.lock().unwrap_or_else(|e| e.into_inner());
    match target.as_mut() {
        Some(file) => {
            let _ = file.write_all(line.as_bytes());
        }
        None => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }
    }
}

// ------------------------------------------------------------ exit, signals

static API_SOCK_C: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());
static VSOCK_C: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());

fn register_path(slot: &AtomicPtr<libc::c_char>, path: Option<&Path>) {
    let ptr = match path.and_then(|p| CString::new(p.as_os_str().as_bytes()).ok()) {
        Some(c) => c.into_raw(),
        None => std::ptr::null_mut(),
    };
    // The previous string is leaked on purpose: a signal handler may be
    // reading it.
    slot.store(ptr, Ordering::SeqCst);
}

/// Records the vsock host socket, to be removed at exit.
pub(crate) fn set_vsock_path(path: Option<&Path>) {
    register_path(&VSOCK_C, path);
}

/// Removes the API socket and the vsock socket (async-signal-safe).
fn unlink_sockets() {
    for slot in [&API_SOCK_C, &VSOCK_C] {
        let ptr = slot.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !ptr.is_null() {
            // SAFETY: `ptr` comes from `CString::into_raw` and is never freed.
            unsafe {
                libc::unlink(ptr);
            }
        }
    }
}

/// Ends the process: removes the sockets, then exits with `code`.
pub(crate) fn exit_process(code: i32) -> ! {
    unlink_sockets();
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

extern "C" fn on_terminate(signal: libc::c_int) {
    unlink_sockets();
    // The handler was installed with SA_RESETHAND: re-raising ends the
    // process by the signal, as if it had not been caught.
    // SAFETY: raise is async-signal-safe.
    unsafe {
        libc::raise(signal);
    }
}

fn install_signal_handlers() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is valid; the handler only calls
        // async-signal-safe functions.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_terminate as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESETHAND;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

// ------------------------------------------------------------------ server

fn describe_request(method: &str, path: &str, body: Option<&[u8]>) -> String {
    let method = match method {
        "GET" => "Get",
        "PUT" => "Put",
        "PATCH" => "Patch",
        other => other,
    };
    match body {
        Some(body) if path != "/mmds" => format!(
            "The API server received a {method} request on {path:?} with body {:?}.",
            String::from_utf8_lossy(body)
        ),
        _ => format!("The API server received a {method} request on {path:?}."),
    }
}

fn log_reply(reply: &Reply) {
    let status = http::reason(reply.status);
    match reply.fault_message() {
        Some(message) => log(&format!(
            "Received Error. Status code: {status}. Message: {message}"
        )),
        None => log(&format!(
            "The request was executed successfully. Status code: {status}."
        )),
    }
}

fn spawn_named(name: &str, body: impl FnOnce() + Send + 'static) {
    if thread::Builder::new()
        .name(name.to_string())
        .spawn(body)
        .is_err()
    {
        log(&format!("Cannot start the {name} thread."));
    }
}

/// What happens once a response has been written.
fn after_reply(shared: &Arc<Shared>, after: After) {
    let opts = &shared.opts;
    match after {
        After::Nothing => {}
        After::Started => {
            if opts.exit_on_start {
                log("The guest powered off at once (--exit-on-start).");
                exit_process(0);
            }
            if opts.panic_on_start {
                spawn_named("fc_vcpu_0", || console::panic_and_exit());
            } else if opts.boot_console {
                console::spawn_boot(Arc::clone(shared));
            }
        }
        After::CtrlAltDel => {
            if opts.ignore_ctrl_alt_del {
                log("The guest ignores Ctrl-Alt-Del (--ignore-ctrl-alt-del).");
            } else {
                console::spawn_power_off(
                    Arc::clone(shared),
                    Duration::from_millis(opts.shutdown_delay_ms),
                    opts.boot_console,
                );
            }
        }
        After::Restored => {
            if opts.boot_console {
                console::spawn_heartbeat(Arc::clone(shared));
            }
        }
        After::Fatal(code) => {
            log(&format!("Firecracker exiting with error. exit_code={code}"));
            exit_process(code);
        }
    }
}

/// Serves one connection: requests are answered in order, until the peer
/// closes it (bytes that are not HTTP get a 400; the connection stays open,
/// as in Firecracker).
fn serve(shared: Arc<Shared>, stream: UnixStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut conn = http::Connection::new(stream, shared.opts.payload_limit);
    loop {
        let batch = match conn.read_batch() {
            Ok(Some(batch)) => batch,
            Ok(None) | Err(_) => return,
        };
        for version in batch.continues {
            if http::write_continue(&mut writer, version).is_err() {
                return;
            }
        }
        if let Some(message) = batch.error {
            if http::write_parse_error(&mut writer, &message).is_err() {
                return;
            }
            continue;
        }
        for request in batch.requests {
            if !answer(&shared, &mut writer, request) {
                let _ = writer.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

/// Answers one request; `false` when the connection is to be closed.
fn answer(shared: &Arc<Shared>, writer: &mut UnixStream, request: http::Request) -> bool {
    log(&describe_request(
        request.method,
        &request.path,
        request.body.as_deref(),
    ));
    let opts = &shared.opts;
    if opts
        .hang_on
        .iter()
        .any(|m| m.matches(request.method, &request.path))
    {
        log("This request is never answered (--hang-on).");
        loop {
            thread::sleep(Duration::from_secs(3600));
        }
    }
    let injected = opts
        .fail_requests
        .iter()
        .any(|m| m.matches(request.method, &request.path));
    let reply = if injected {
        Reply::error(
            400,
            format!("injected failure: {} {}", request.method, request.path),
        )
    } else {
        vmm::handle(
            shared,
            request.method,
            &request.path,
            request.body.as_deref(),
        )
    };
    log_reply(&reply);
    let written = http::write_response(
        writer,
        reply.status,
        reply.body.as_deref(),
        reply.deprecation,
    );
    after_reply(shared, reply.after);
    written.is_ok() && !request.close
}

/// Runs the double with a full command line (`args[0]` is the program
/// name). Returns the exit status for the cases that end at once; once the
/// socket is up it only ends through [`exit_process`] or a signal.
fn run(args: &[String]) -> i32 {
    let opts = match parse_args(args) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("Error: Arguments parsing error: {e} \n\nFor more information try --help.");
            return EXIT_ARG_PARSING;
        }
    };
    if opts.help {
        println!("{}", usage());
        return 0;
    }
    if opts.version {
        println!("Firecracker v{}-double\n", opts.fc_version.label());
        return 0;
    }
    if let Some(code) = opts.exit_at_start {
        eprintln!("fc-double: exiting at start with status {code} (--exit-at-start)");
        return code;
    }
    if let Err(e) = validate_instance_id(&opts.id) {
        eprintln!("Invalid instance ID: {e}");
        return 1;
    }
    let _ = INSTANCE_ID.set(opts.id.clone());
    if let Some(path) = &opts.log_path {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => set_log_target(file),
            Err(e) => eprintln!(
                "fc-double: cannot open the log path {}: {e}; logging to stdout",
                path.display()
            ),
        }
    }
    log(&format!("Running Firecracker v{}", opts.fc_version.label()));

    let state = VmmState::new();

    if opts.no_socket {
        log("The API socket is not created (--no-socket).");
        loop {
            thread::sleep(Duration::from_secs(3600));
        }
    }

    install_signal_handlers();
    let sock = opts.api_sock.clone();
    let in_use = || {
        log(&format!(
            "Failed to open the API socket at: {}. Check that it is not already used.",
            sock.display()
        ));
        eprintln!(
            "Error: RunWithApi(FailedToBindSocket({:?}))",
            sock.display().to_string()
        );
        1
    };
    if std::fs::symlink_metadata(&sock).is_ok() {
        return in_use();
    }
    let listener = match UnixListener::bind(&sock) {
        Ok(listener) => listener,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => return in_use(),
        Err(e) => {
            log(&format!("Failed to bind and run the HTTP server: {e}"));
            eprintln!("Error: RunWithApi(FailedToBindAndRunHttpServer(IOError({e:?})))");
            return 1;
        }
    };
    register_path(&API_SOCK_C, Some(&sock));
    log(&format!("Listening on API socket ({sock:?})."));

    let vsock = Arc::new(vsock::Mux::new(opts.vsock_agents.clone()));
    let shared = Arc::new(Shared {
        opts,
        state: Mutex::new(state),
        vsock,
    });
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let shared = Arc::clone(&shared);
                spawn_named("fc_api", move || serve(shared, stream));
            }
            Err(e) => log(&format!("API Server error on accepting a connection: {e}")),
        }
    }
    0
}

/// The `fc-double` program: runs with the process's arguments and exits.
pub fn main() -> ! {
    let args: Vec<String> = std::env::args().collect();
    let code = run(&args);
    exit_process(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        std::iter::once("fc-double")
            .chain(list.iter().copied())
            .map(String::from)
            .collect()
    }

    #[test]
    fn parses_firecracker_and_double_flags() {
        let opts = parse_args(&args(&[
            "--api-sock",
            "/tmp/x.sock",
            "--id=vm1",
            "--level",
            "Debug",
            "--show-level",
            "--no-seccomp",
            "--fail-request",
            "PUT /drives",
            "--fail-request",
            "patch /vm",
            "--shutdown-delay-ms",
            "5",
            "--boot-console",
            "--vsock-agent",
            "10789=/tmp/agent.sock",
            "--vsock-agent=52=/tmp/b",
        ]))
        .unwrap();
        assert_eq!(opts.api_sock, PathBuf::from("/tmp/x.sock"));
        assert_eq!(opts.id, "vm1");
        assert_eq!(opts.shutdown_delay_ms, 5);
        assert!(opts.boot_console);
        assert!(opts.fail_requests[0].matches("PUT", "/drives/rootfs"));
        assert!(!opts.fail_requests[0].matches("PATCH", "/drives/rootfs"));
        assert!(opts.fail_requests[1].matches("PATCH", "/vm"));
        assert_eq!(opts.fc_version, FcVersion::V1_13);
        assert_eq!(
            opts.vsock_agents,
            [
                (10789, PathBuf::from("/tmp/agent.sock")),
                (52, PathBuf::from("/tmp/b"))
            ]
        );
        let opts = parse_args(&args(&["--fc-version", "1.16.1", "--i8042-delay-ms=700"])).unwrap();
        assert_eq!(opts.fc_version, FcVersion::V1_16);
        assert_eq!(opts.i8042_delay_ms, 700);
    }

    #[test]
    fn refuses_unknown_flags_and_missing_values() {
        assert!(parse_args(&args(&["--bogus"])).is_err());
        assert!(parse_args(&args(&["--api-sock"])).is_err());
        assert!(parse_args(&args(&["stray"])).is_err());
        assert!(parse_args(&args(&["--fail-request", "PUT"])).is_err());
        assert!(parse_args(&args(&["--exit-at-start", "x"])).is_err());
        assert!(parse_args(&args(&["--vsock-agent", "/tmp/a"])).is_err());
        assert!(parse_args(&args(&["--fc-version", "1.7.0"])).is_err());
    }

    #[test]
    fn instance_ids_are_checked() {
        assert!(validate_instance_id("vm-1").is_ok());
        assert!(validate_instance_id("").is_err());
        assert!(validate_instance_id("vm_1").is_err());
        assert!(validate_instance_id(&"a".repeat(65)).is_err());
    }

    #[test]
    fn timestamps_look_right() {
        let ts = timestamp();
        assert_eq!(ts.len(), "2024-01-01T00:00:00.000000000".len());
        assert_eq!(&ts[4..5], "-");
        assert_eq!(&ts[10..11], "T");
    }
}
