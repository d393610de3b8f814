//! Version 1 of the host ⇄ guest agent protocol.
//!
//! The same byte stream runs over Firecracker's hybrid vsock (one connection per
//! host connect, guest port [`VSOCK_PORT`]) and over a QEMU virtio-serial port
//! named [`SERIAL_PORT_NAME`] (one long-lived stream). docs/guest-agent.md is the
//! prose version of this module.
//!
//! This crate is the wire format only (frames, messages, constants and their
//! codecs over any `Read` or byte buffer); it opens nothing. The guest agent
//! (`agentenv-guest`) serves it, the host client (`agentenv_host::agent`)
//! speaks it, and `agentenv-core` uses its message types in its agent seam.
//!
//! # Frames
//!
//! ```text
//! frame := len:u32be kind:u8 stream:u32be payload[len - 5]
//! ```
//!
//! `len` counts everything after itself, so it is at least 5 and at most
//! `5 + MAX_PAYLOAD`. A frame with a bad length or an unknown kind is a protocol
//! error: the receiver answers an [`Kind::Error`] on stream 0 and drops the
//! connection (on the serial port: discards its parser state and waits for the
//! next `Hello`).
//!
//! # Streams
//!
//! Stream 0 carries the connection handshake: the host sends [`Kind::Hello`]
//! (JSON [`Hello`]) and the agent answers [`Kind::HelloOk`] whose payload is the
//! host's 16-byte nonce followed by JSON [`HelloOk`]. On the serial port the host
//! skips every byte before that nonce, which resynchronises a stream that an
//! earlier connection left mid-frame.
//!
//! Every other stream is one request, numbered by the host (non-zero, unique per
//! connection). Requests run concurrently. A request ends with exactly one of
//! [`Kind::Exit`], [`Kind::Done`] or [`Kind::Error`].
//!
//! # Flow control
//!
//! Bulk bytes (stdout/stderr/file data from the guest, stdin/file data from the
//! host) are credited per stream: a sender starts with [`INITIAL_WINDOW`] bytes
//! of credit and spends it on payload bytes; the receiver returns credit with
//! [`Kind::Window`] (host → guest) or [`Kind::GuestWindow`] (guest → host), a
//! `u32be` increment, once it has consumed the bytes (in batches of at least
//! [`GRANT_BATCH`]). So no side buffers more than a window per stream, however
//! slow the other end reads.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Bytes before the payload: `len`, `kind`, `stream`.
pub const HEADER_LEN: usize = 9;

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// Bulk data is sent in frames of at most this many payload bytes.
pub const DATA_CHUNK: usize = 128 * 1024;

/// Credit each side starts with, per stream and direction.
pub const INITIAL_WINDOW: u32 = 4 * 1024 * 1024;

/// A receiver returns credit once it has consumed at least this many bytes
/// (one window message per 256 KiB, not per frame). Never more than the
/// window, so a sender waiting for credit always gets it.
pub const GRANT_BATCH: u32 = 256 * 1024;

/// The vsock port the agent listens on (Firecracker).
pub const VSOCK_PORT: u32 = 10789;

/// The name of the virtio-serial port the agent opens (QEMU).
pub const SERIAL_PORT_NAME: &str = "org.agentenv.agent.0";

/// Length of the handshake nonce.
pub const NONCE_LEN: usize = 16;

/// Frame kinds. `0x0_` go host → guest, `0x8_` guest → host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Host → guest, stream 0: JSON [`Hello`].
    Hello = 0x01,
    /// Starts a command: JSON [`ExecRequest`].
    Exec = 0x02,
    /// Stdin bytes of a command, or the content of a file being uploaded.
    Data = 0x03,
    /// End of the `Data` bytes (closes the command's stdin; ends an upload).
    Eof = 0x04,
    /// Cancels a request: kills the command's process group, aborts a transfer.
    Kill = 0x05,
    /// Credit for the guest's output on this stream: `u32be` bytes.
    Window = 0x06,
    /// Starts an upload: JSON [`PutFile`], then `Data`…, `Eof`.
    PutFile = 0x07,
    /// Starts a download: JSON [`GetFile`].
    GetFile = 0x08,
    /// Freezes the guest's writable file systems (`FIFREEZE`): empty payload.
    Freeze = 0x09,
    /// Thaws what `Freeze` froze: empty payload.
    Thaw = 0x0a,
    /// Liveness check: empty payload; answered with `Done`.
    Ping = 0x0b,
    /// The VM's new identity after a restore from a memory snapshot: JSON
    /// [`Identity`]; answered with `Done` once applied.
    Identity = 0x0c,
    /// Sends a signal to a command's process group: JSON [`SignalMsg`].
    Signal = 0x0d,
    /// Resizes a command's terminal: JSON [`PtySize`].
    Resize = 0x0e,
    /// A file-system operation: JSON [`FsRequest`]; answered by `FsEntries`…
    /// then `FsResult`, or `Error`.
    Fs = 0x0f,
    /// Watches a directory: JSON [`WatchRequest`]; answered by `FsEvent`
    /// frames until the host sends `Kill` (then `Done`), or `Error`.
    Watch = 0x10,

    /// Guest → host, stream 0: nonce + JSON [`HelloOk`].
    HelloOk = 0x81,
    /// The command started: JSON [`Started`].
    Started = 0x82,
    /// Stdout bytes of a command.
    Stdout = 0x83,
    /// Stderr bytes of a command.
    Stderr = 0x84,
    /// The command ended: JSON [`ExitStatus`]. Ends the stream.
    Exit = 0x85,
    /// The request failed: JSON [`ErrorMsg`]. Ends the stream (on stream 0: the connection).
    Error = 0x86,
    /// Content of a file being downloaded.
    FileData = 0x87,
    /// The request succeeded: JSON [`Done`]. Ends the stream.
    Done = 0x88,
    /// Credit for the host's `Data` on this stream: `u32be` bytes.
    GuestWindow = 0x89,
    /// A download starts: JSON [`FileInfo`], then `FileData`…, `Done`.
    FileInfo = 0x8a,
    /// The answer to `Fs`: JSON [`FsResponse`]. Ends the stream.
    FsResult = 0x8b,
    /// A change in a watched directory: JSON [`FsEvent`]. Bulk: its payload
    /// spends the stream's credit like output does.
    FsEvent = 0x8c,
    /// Part of a listing (before its `FsResult`): JSON `Vec<`[`EntryInfo`]`>`.
    /// Bulk: its payload spends the stream's credit like output does.
    FsEntries = 0x8d,
}

impl Kind {
    /// The kind with this wire value.
    pub fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            0x01 => Hello,
            0x02 => Exec,
            0x03 => Data,
            0x04 => Eof,
            0x05 => Kill,
            0x06 => Window,
            0x07 => PutFile,
            0x08 => GetFile,
            0x09 => Freeze,
            0x0a => Thaw,
            0x0b => Ping,
            0x0c => Identity,
            0x0d => Signal,
            0x0e => Resize,
            0x0f => Fs,
            0x10 => Watch,
            0x81 => HelloOk,
            0x82 => Started,
            0x83 => Stdout,
            0x84 => Stderr,
            0x85 => Exit,
            0x86 => Error,
            0x87 => FileData,
            0x88 => Done,
            0x89 => GuestWindow,
            0x8a => FileInfo,
            0x8b => FsResult,
            0x8c => FsEvent,
            0x8d => FsEntries,
            _ => return None,
        })
    }

    /// True for kinds the host sends.
    pub fn from_host(self) -> bool {
        (self as u8) < 0x80
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it is.
    pub kind: Kind,
    /// Which request it belongs to (0: the connection).
    pub stream: u32,
    /// Its bytes.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame with a JSON payload.
    pub fn json<T: Serialize>(kind: Kind, stream: u32, msg: &T) -> Frame {
        Frame {
            kind,
            stream,
            payload: serde_json::to_vec(msg).expect("protocol messages serialise"),
        }
    }

    /// A `Window`/`GuestWindow` frame granting `bytes` of credit.
    pub fn window(kind: Kind, stream: u32, bytes: u32) -> Frame {
        Frame {
            kind,
            stream,
            payload: bytes.to_be_bytes().to_vec(),
        }
    }

    /// The payload as JSON.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ProtoError> {
        serde_json::from_slice(&self.payload).map_err(|e| ProtoError::BadMessage {
            kind: self.kind,
            message: e.to_string(),
        })
    }

    /// The credit carried by a window frame.
    pub fn window_bytes(&self) -> Result<u32, ProtoError> {
        let b: [u8; 4] =
            self.payload
                .as_slice()
                .try_into()
                .map_err(|_| ProtoError::BadMessage {
                    kind: self.kind,
                    message: format!("window payload is {} bytes, not 4", self.payload.len()),
                })?;
        Ok(u32::from_be_bytes(b))
    }

    /// The frame's wire bytes.
    pub fn encode(&self) -> Vec<u8> {
        encode(self.kind, self.stream, &self.payload)
    }
}

/// The wire bytes of one frame. Panics if `payload` exceeds [`MAX_PAYLOAD`]
/// (a caller bug: bulk data is chunked by [`DATA_CHUNK`]).
pub fn encode(kind: Kind, stream: u32, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() <= MAX_PAYLOAD, "frame payload too large");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header(kind, stream, payload.len()));
    out.extend_from_slice(payload);
    out
}

/// The header of a frame with `len` payload bytes, for a caller that builds
/// the frame in place behind it.
pub fn header(kind: Kind, stream: u32, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&((len + 5) as u32).to_be_bytes());
    h[4] = kind as u8;
    h[5..].copy_from_slice(&stream.to_be_bytes());
    h
}

/// What can be wrong with a byte stream or a message.
#[derive(Debug)]
pub enum ProtoError {
    /// The frame length is below 5 or above `5 + MAX_PAYLOAD`.
    BadLength(u32),
    /// The kind byte is not a known kind.
    UnknownKind(u8),
    /// The stream ended inside a frame.
    Truncated,
    /// A message did not parse.
    BadMessage {
        /// The frame kind.
        kind: Kind,
        /// Why.
        message: String,
    },
    /// Reading or writing failed.
    Io(std::io::Error),
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtoError::BadLength(n) => {
                write!(f, "bad frame length {n} (must be 5..={})", MAX_PAYLOAD + 5)
            }
            ProtoError::UnknownKind(k) => write!(f, "unknown frame kind 0x{k:02x}"),
            ProtoError::Truncated => f.write_str("the stream ended inside a frame"),
            ProtoError::BadMessage { kind, message } => {
                write!(f, "bad {kind:?} message: {message}")
            }
            ProtoError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ProtoError {}

impl From<std::io::Error> for ProtoError {
    fn from(e: std::io::Error) -> Self {
        ProtoError::Io(e)
    }
}

/// Checks a header; returns the kind, the stream and the payload length.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(Kind, u32, usize), ProtoError> {
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    if !(5..=(MAX_PAYLOAD as u32 + 5)).contains(&len) {
        return Err(ProtoError::BadLength(len));
    }
    let kind = Kind::from_u8(h[4]).ok_or(ProtoError::UnknownKind(h[4]))?;
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
    Ok((kind, stream, len as usize - 5))
}

/// Reads one frame. `Ok(None)` at a clean end of stream (between frames).
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Frame>, ProtoError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtoError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (kind, stream, n) = parse_header(&h)?;
    let mut payload = vec![0u8; n];
    r.read_exact(&mut payload).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ProtoError::Truncated
        } else {
            ProtoError::Io(e)
        }
    })?;
    Ok(Some(Frame {
        kind,
        stream,
        payload,
    }))
}

/// Writes one frame in a single `write_all`.
pub fn write_frame<W: Write>(w: &mut W, f: &Frame) -> std::io::Result<()> {
    w.write_all(&f.encode())
}

/// Takes one whole frame off the front of `buf`, if `buf` holds one.
pub fn take_frame(buf: &mut Vec<u8>) -> Result<Option<Frame>, ProtoError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let h: [u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().expect("length checked");
    let (kind, stream, n) = parse_header(&h)?;
    if buf.len() < HEADER_LEN + n {
        return Ok(None);
    }
    let payload = buf[HEADER_LEN..HEADER_LEN + n].to_vec();
    buf.drain(..HEADER_LEN + n);
    Ok(Some(Frame {
        kind,
        stream,
        payload,
    }))
}

/// The agent's answer to `hello`: its nonce, then `ok` as JSON (stream 0).
pub fn hello_ok_frame(hello: &Hello, ok: &HelloOk) -> Frame {
    let mut payload = hello.nonce.clone().into_bytes();
    payload.extend_from_slice(&serde_json::to_vec(ok).expect("json serialises"));
    Frame {
        kind: Kind::HelloOk,
        stream: 0,
        payload,
    }
}

/// Finds the agent's `HelloOk` for `nonce` in bytes received after a `Hello`.
/// Returns the offset of its header, skipping whatever came before it.
pub fn find_hello_ok(buf: &[u8], nonce: &[u8; NONCE_LEN]) -> Option<usize> {
    let mut from = 0;
    while from + HEADER_LEN + NONCE_LEN <= buf.len() {
        let pos = buf[from + HEADER_LEN..]
            .windows(NONCE_LEN)
            .position(|w| w == nonce)?
            + from;
        let h = &buf[pos..pos + HEADER_LEN];
        if h[4] == Kind::HelloOk as u8 && h[5..9] == [0, 0, 0, 0] {
            return Some(pos);
        }
        from = pos + 1;
    }
    None
}

/// `Hello` (host → guest, stream 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The host's protocol version.
    pub version: u32,
    /// 16 ASCII characters the agent echoes in front of its `HelloOk`.
    pub nonce: String,
}

/// `HelloOk` (guest → host, stream 0, after the nonce).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloOk {
    /// The agent's protocol version.
    pub version: u32,
    /// The agent's name and version, e.g. `agentenv-guest 0.1.0`.
    pub agent: String,
    /// The agent's process id in the guest.
    pub pid: u32,
    /// What this agent serves beyond protocol 1's first set of requests
    /// ([`FEATURES`] for this crate's agent; empty for an older agent).
    #[serde(default)]
    pub features: Vec<String>,
}

/// The optional features an agent of this crate's version serves: `Exec`
/// with `user` and `pty`, `Signal`, `Resize`, `Fs`, `Watch`, and transfers
/// with `user`.
pub const FEATURES: [&str; 5] = ["user", "pty", "signal", "fs", "watch"];

/// `Exec`: run a command.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH`.
    pub cmd: Vec<String>,
    /// Extra environment variables (on top of the agent's base environment).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// The host sends stdin as `Data`… `Eof`; when false stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the command's process group after this long.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Send at most this many bytes of each of stdout and stderr; the rest is
    /// read and dropped, and the exit status says it was truncated.
    #[serde(default)]
    pub max_output: Option<u64>,
    /// Run as this guest user (uid, gid and supplementary groups from the
    /// guest's /etc/passwd and /etc/group; `HOME`, `USER`, `LOGNAME`, `SHELL`
    /// set; `cwd` defaults to, and a relative `cwd` resolves against, the
    /// user's home). None: root, as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Run in a new session with a pseudo-terminal of this size as its
    /// controlling terminal on stdin, stdout and stderr: output comes as
    /// `Stdout`, `Data` goes to the terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
}

/// A terminal size (`Exec.pty`, `Resize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Columns (at least 1).
    pub cols: u16,
    /// Rows (at least 1).
    pub rows: u16,
}

/// `Signal`: a signal for a command's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalMsg {
    /// The signal number (1..=64).
    pub signal: i32,
}

/// `Started`: the command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// Its process id (also its process group id) in the guest.
    pub pid: u32,
}

/// `Exit`: how a command ended.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit status, when it exited.
    pub exit_code: Option<i32>,
    /// Signal, when one killed it.
    pub signal: Option<i32>,
    /// The agent killed it because `timeout_ms` passed.
    pub timed_out: bool,
    /// The agent killed it because the host sent `Kill`.
    pub killed: bool,
    /// Wall time from start to exit.
    pub duration_ms: u64,
    /// Bytes the command wrote to stdout (sent or not).
    pub stdout_bytes: u64,
    /// Bytes the command wrote to stderr (sent or not).
    pub stderr_bytes: u64,
    /// Stdout went past `max_output`.
    pub stdout_truncated: bool,
    /// Stderr went past `max_output`.
    pub stderr_truncated: bool,
}

/// What kind of failure an [`ErrorMsg`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request itself is wrong (a field says which part).
    BadRequest,
    /// A path or program does not exist.
    NotFound,
    /// The guest refused (permissions).
    PermissionDenied,
    /// Any other guest-side I/O failure.
    Io,
    /// The byte stream broke the protocol; the connection is dropped.
    Protocol,
    /// The path to create exists already (`make_dir`).
    AlreadyExists,
}

/// `Error`: the request (or, on stream 0, the connection) failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// Category.
    pub code: ErrorCode,
    /// Human-readable message; names the path or field.
    pub error: String,
    /// The request field at fault, when there is one (`cmd`, `cwd`, `path`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ErrorMsg {
    /// An error of `code` about `field`.
    pub fn new(code: ErrorCode, field: Option<&str>, error: impl Into<String>) -> ErrorMsg {
        ErrorMsg {
            code,
            error: error.into(),
            field: field.map(str::to_string),
        }
    }
}

/// `PutFile`: write a file (replaced atomically when the upload completes).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PutFile {
    /// Path in the guest: absolute, or relative to `user`'s home.
    pub path: String,
    /// Permission bits (default 0644).
    #[serde(default)]
    pub mode: Option<u32>,
    /// Create missing parent directories.
    #[serde(default)]
    pub make_parents: bool,
    /// Write as this guest user: the file and the parents it creates belong
    /// to the user (and its primary group); a relative path resolves against
    /// the user's home. None: root, and the path must be absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// `GetFile`: read a file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GetFile {
    /// Path in the guest: absolute, or relative to `user`'s home.
    pub path: String,
    /// Resolve a relative path against this guest user's home. None: root,
    /// and the path must be absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// `Fs`: one file-system operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsRequest {
    /// Act for this guest user: relative paths resolve against its home and
    /// what the operation creates belongs to it. None: root, and paths must
    /// be absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The operation.
    #[serde(flatten)]
    pub op: FsOp,
}

/// The operation of an [`FsRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FsOp {
    /// Describe a path (a symlink itself, not its target): `entry`.
    Stat {
        /// The path.
        path: String,
    },
    /// The entries of a directory, and of its sub-directories down to
    /// `depth` levels (1: the directory's own entries): `entries`.
    List {
        /// The directory.
        path: String,
        /// Levels to descend, at least 1.
        depth: u32,
    },
    /// Create a directory and its missing parents: `entry`.
    /// `AlreadyExists` when the path exists.
    MakeDir {
        /// The directory.
        path: String,
    },
    /// Rename (across file systems too: copy, then remove): the
    /// destination's `entry`. Missing parents of the destination are made.
    Move {
        /// What to move.
        source: String,
        /// Where to.
        destination: String,
    },
    /// Remove a path, recursively; a missing path is success.
    Remove {
        /// The path.
        path: String,
    },
}

/// `FsResult`: the answer to an [`FsRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FsResponse {
    /// The entry (`stat`, `make_dir`, `move`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryInfo>,
    /// The entries (`list`; on the wire they come in `FsEntries` frames
    /// before this message).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<EntryInfo>,
}

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// Anything else (device, FIFO, socket).
    Other,
}

/// One file-system entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    /// Its base name.
    pub name: String,
    /// Its absolute path.
    pub path: String,
    /// What it is (a symlink is described itself, not its target).
    pub kind: EntryKind,
    /// Its size in bytes (`lstat`).
    pub size: u64,
    /// Its permission bits (`0o777` at most).
    pub mode: u32,
    /// `ls -l` style type and permissions, e.g. `-rw-r--r--`.
    pub permissions: String,
    /// The owner's user name (the number when the guest has no name for it).
    pub owner: String,
    /// The group's name (the number when the guest has no name for it).
    pub group: String,
    /// Last modification, nanoseconds since the Unix epoch.
    pub modified_unix_ns: i128,
    /// A symlink's target, made absolute against the link's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

/// `Watch`: report changes in a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRequest {
    /// The directory: absolute, or relative to `user`'s home.
    pub path: String,
    /// Watch its sub-directories too (and the ones created later).
    #[serde(default)]
    pub recursive: bool,
    /// Resolve a relative path against this guest user's home.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// `FsEvent`: one change under a watched directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEvent {
    /// The changed entry's path relative to the watched directory.
    pub name: String,
    /// What happened.
    pub op: FsEventOp,
}

/// What an [`FsEvent`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsEventOp {
    /// Created (or moved in).
    Create,
    /// Written.
    Write,
    /// Removed.
    Remove,
    /// Renamed away (moved out).
    Rename,
    /// Its attributes (mode, owner, times) changed.
    Chmod,
}

/// `FileInfo`: the file a download sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Its size when opened.
    pub size: u64,
    /// Its permission bits.
    pub mode: u32,
}

/// `Identity`: who a VM restored from a memory snapshot now is. Its memory is
/// its source's, so without this it would answer with the source's name,
/// address and MAC, draw the same random numbers and keep the snapshot's time.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Identity {
    /// The host name (`sethostname`).
    pub hostname: String,
    /// The network interface's new settings, when the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<IdentityNet>,
    /// Fresh host entropy, hex (at least 32 bytes), credited to the guest
    /// kernel's pool (`RNDADDENTROPY`) and followed by a reseed of its CRNG.
    pub entropy_hex: String,
    /// The host's wall clock, nanoseconds since the Unix epoch (`clock_settime`).
    pub unix_time_ns: u64,
}

/// `eth0` after a restore.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IdentityNet {
    /// The guest's IPv4 address.
    pub address: String,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The default gateway.
    pub gateway: String,
    /// The interface's MAC, `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
}

/// `Done`: a request other than `Exec` succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Done {
    /// Bytes written (`PutFile`) or sent (`GetFile`).
    #[serde(default)]
    pub bytes: u64,
    /// Mount points frozen (`Freeze`) or thawed (`Thaw`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<String>,
}

/// Decodes the `\ooo` escapes `/proc/mounts` and `/proc/self/mountinfo` use
/// for space, tab, newline and backslash in a field. (Not part of the
/// protocol: here because the guest agent and the host both read mount
/// tables, and this is the crate they share.)
pub fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_both_decoders() {
        let f = Frame::json(
            Kind::Exec,
            7,
            &ExecRequest {
                cmd: vec!["true".into()],
                ..Default::default()
            },
        );
        let bytes = f.encode();
        assert_eq!(&bytes[..4], &((bytes.len() - 4) as u32).to_be_bytes());
        assert_eq!(read_frame(&mut &bytes[..]).unwrap(), Some(f.clone()));
        let mut buf = bytes[..bytes.len() - 1].to_vec();
        assert_eq!(take_frame(&mut buf).unwrap(), None);
        buf.push(*bytes.last().unwrap());
        buf.extend_from_slice(&encode(Kind::Eof, 7, &[]));
        assert_eq!(take_frame(&mut buf).unwrap(), Some(f));
        assert_eq!(take_frame(&mut buf).unwrap().unwrap().kind, Kind::Eof);
        assert!(buf.is_empty());
        assert_eq!(read_frame(&mut &[][..]).unwrap(), None);
    }

    #[test]
    fn bad_frames_are_rejected() {
        let huge = ((MAX_PAYLOAD + 6) as u32).to_be_bytes();
        let mut h = huge.to_vec();
        h.extend_from_slice(&[0x02, 0, 0, 0, 1]);
        assert!(matches!(
            read_frame(&mut &h[..]),
            Err(ProtoError::BadLength(_))
        ));
        let mut short = 4u32.to_be_bytes().to_vec();
        short.extend_from_slice(&[0x02, 0, 0, 0, 1]);
        assert!(matches!(
            take_frame(&mut short),
            Err(ProtoError::BadLength(4))
        ));
        let mut unknown = 5u32.to_be_bytes().to_vec();
        unknown.extend_from_slice(&[0x7f, 0, 0, 0, 1]);
        assert!(matches!(
            read_frame(&mut &unknown[..]),
            Err(ProtoError::UnknownKind(0x7f))
        ));
        let cut = &encode(Kind::Data, 1, b"abc")[..10];
        assert!(matches!(
            read_frame(&mut &cut[..]),
            Err(ProtoError::Truncated)
        ));
    }

    #[test]
    fn hello_ok_is_found_after_garbage() {
        let nonce = *b"0123456789abcdef";
        let mut payload = nonce.to_vec();
        payload.extend_from_slice(b"{}");
        let mut buf = b"\x00\x00\x01garbage 0123456789abcdef".to_vec();
        let at = buf.len();
        buf.extend_from_slice(&encode(Kind::HelloOk, 0, &payload));
        assert_eq!(find_hello_ok(&buf, &nonce), Some(at));
        assert_eq!(find_hello_ok(&buf[..at + 10], &nonce), None);
        assert_eq!(find_hello_ok(b"short", &nonce), None);
    }

    #[test]
    fn every_kind_round_trips_through_its_byte() {
        for b in 0..=255u8 {
            if let Some(k) = Kind::from_u8(b) {
                assert_eq!(k as u8, b);
                assert_eq!(k.from_host(), b < 0x80);
            }
        }
        for k in [Kind::Signal, Kind::Resize, Kind::Fs, Kind::Watch] {
            assert!(k.from_host(), "{k:?}");
        }
        for k in [Kind::FsResult, Kind::FsEvent, Kind::FsEntries] {
            assert!(!k.from_host(), "{k:?}");
        }
    }

    #[test]
    fn new_fields_are_optional_for_old_peers() {
        // An old host's requests and an old agent's hello still parse.
        let exec: ExecRequest = serde_json::from_str(r#"{"cmd":["true"]}"#).unwrap();
        assert_eq!((exec.user, exec.pty), (None, None));
        let put: PutFile = serde_json::from_str(r#"{"path":"/a"}"#).unwrap();
        assert_eq!(put.user, None);
        let get: GetFile = serde_json::from_str(r#"{"path":"/a"}"#).unwrap();
        assert_eq!(get.user, None);
        let ok: HelloOk =
            serde_json::from_str(r#"{"version":1,"agent":"agentenv-guest 0.1.0","pid":1}"#)
                .unwrap();
        assert!(ok.features.is_empty());
        // And what a new host sends without the new fields is what an old agent reads.
        let old = serde_json::to_value(ExecRequest {
            cmd: vec!["true".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(
            old.get("user").is_none() && old.get("pty").is_none(),
            "{old}"
        );
    }

    #[test]
    fn fs_messages_have_their_documented_shape() {
        let req = FsRequest {
            user: Some("user".into()),
            op: FsOp::List {
                path: "docs".into(),
                depth: 2,
            },
        };
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"user":"user","op":"list","path":"docs","depth":2})
        );
        assert_eq!(serde_json::from_value::<FsRequest>(v).unwrap(), req);
        let mv: FsRequest =
            serde_json::from_str(r#"{"op":"move","source":"/a","destination":"/b"}"#).unwrap();
        assert_eq!(
            mv.op,
            FsOp::Move {
                source: "/a".into(),
                destination: "/b".into()
            }
        );
        for op in ["stat", "make_dir", "remove"] {
            let r: FsRequest =
                serde_json::from_str(&format!(r#"{{"op":"{op}","path":"/p"}}"#)).unwrap();
            assert_eq!(r.user, None);
        }
        assert!(serde_json::from_str::<FsRequest>(r#"{"op":"chmod","path":"/p"}"#).is_err());

        let entry = EntryInfo {
            name: "a.txt".into(),
            path: "/home/user/a.txt".into(),
            kind: EntryKind::Symlink,
            size: 12,
            mode: 0o777,
            permissions: "lrwxrwxrwx".into(),
            owner: "user".into(),
            group: "user".into(),
            modified_unix_ns: -5,
            symlink_target: Some("/etc/hosts".into()),
        };
        let res = FsResponse {
            entry: Some(entry.clone()),
            entries: vec![entry],
        };
        let f = Frame::json(Kind::FsResult, 3, &res);
        let back = read_frame(&mut &f.encode()[..]).unwrap().unwrap();
        assert_eq!(back.parse::<FsResponse>().unwrap(), res);
        assert_eq!(
            serde_json::from_str::<FsResponse>("{}").unwrap(),
            FsResponse::default()
        );

        let ev = FsEvent {
            name: "sub/new.txt".into(),
            op: FsEventOp::Create,
        };
        assert_eq!(
            serde_json::to_value(&ev).unwrap(),
            serde_json::json!({"name":"sub/new.txt","op":"create"})
        );
        let w: WatchRequest = serde_json::from_str(r#"{"path":"/tmp"}"#).unwrap();
        assert!(!w.recursive && w.user.is_none());
        assert_eq!(
            serde_json::to_value(ErrorCode::AlreadyExists).unwrap(),
            "already_exists"
        );
        let sig = Frame::json(Kind::Signal, 5, &SignalMsg { signal: 15 });
        assert_eq!(sig.payload, br#"{"signal":15}"#);
        let size = Frame::json(Kind::Resize, 5, &PtySize { cols: 80, rows: 24 });
        assert_eq!(
            size.parse::<PtySize>().unwrap(),
            PtySize { cols: 80, rows: 24 }
        );
    }
}
