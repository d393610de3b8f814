//! One session: the frames of one host connection (a vsock/Unix connection, or
//! the serial port between two host disconnects), dispatched by the transport's
//! reader thread. Requests run on their own threads and are found by stream id
//! in the session's [`Registry`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use agentenv_proto::{
    Done, ErrorCode, ErrorMsg, ExecRequest, Frame, GetFile, Hello, HelloOk, Identity, Kind,
    PutFile, NONCE_LEN, PROTOCOL_VERSION,
};

use super::exec::{self, ExecHandle, KillReason};
use super::files::{self, PutHandle};
use super::freeze;
use super::identity;
use super::out::{OutStream, Outbox};
use super::{io_error, lock, spawn, Config, AGENT};

/// The live requests of a session by stream id.
pub type Registry = Mutex<HashMap<u32, Entry>>;

/// One live request.
#[derive(Clone)]
pub struct Entry {
    /// Unique among all requests (a stream id can be reused after a reset).
    pub id: u64,
    /// Its way out.
    pub out: Arc<OutStream>,
    /// What it is.
    pub handle: Handle,
}

/// The request-specific part of an [`Entry`].
#[derive(Clone)]
pub enum Handle {
    /// A command.
    Exec(ExecHandle),
    /// An upload.
    Put(PutHandle),
    /// A download (driven by credit only).
    Get,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Why a session must drop its connection (or resync the serial port).
pub type ProtocolError = String;

/// The state of one session.
pub struct Session {
    id: u64,
    cfg: Arc<Config>,
    out: Outbox,
    /// The serial port's generation counter (None for socket connections):
    /// bumped when the host reconnects, so frames for the old host are dropped.
    gen: Option<Arc<AtomicU64>>,
    hello: bool,
    reg: Arc<Registry>,
}

impl Session {
    /// A session writing through `out`. `gen`: the serial generation counter.
    pub fn new(out: Outbox, gen: Option<Arc<AtomicU64>>, cfg: Arc<Config>) -> Session {
        Session {
            id: next_id(),
            cfg,
            out,
            gen,
            hello: false,
            reg: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Handles one frame from the host. An `Err` is a protocol error: the
    /// caller reports it with [`Session::protocol_error`].
    pub fn frame(&mut self, f: Frame) -> Result<(), ProtocolError> {
        if !f.kind.from_host() {
            return Err(format!("the host sent a {:?} frame", f.kind));
        }
        if f.stream == 0 {
            return match f.kind {
                Kind::Hello => self.hello(&f),
                k => Err(format!("{k:?} frame on stream 0")),
            };
        }
        match f.kind {
            Kind::Hello => Err(format!("Hello frame on stream {}", f.stream)),
            Kind::Exec
            | Kind::PutFile
            | Kind::GetFile
            | Kind::Freeze
            | Kind::Thaw
            | Kind::Ping
            | Kind::Identity => {
                self.request(f);
                Ok(())
            }
            Kind::Data | Kind::Eof => self.data(f),
            Kind::Kill => {
                self.kill(f.stream);
                Ok(())
            }
            Kind::Window => self.window(&f),
            Kind::Signal | Kind::Resize => Ok(()),
            Kind::Fs | Kind::Watch => {
                self.out.error(
                    f.stream,
                    &ErrorMsg::new(
                        ErrorCode::BadRequest,
                        None,
                        "not supported by this agent yet",
                    ),
                );
                Ok(())
            }
            // Guest → host kinds were refused above.
            _ => Err(format!("the host sent a {:?} frame", f.kind)),
        }
    }

    /// Reports a protocol error on stream 0 and forgets the session's
    /// requests and handshake: for the host, the connection is gone.
    pub fn protocol_error(&mut self, message: &str) {
        self.out
            .error(0, &ErrorMsg::new(ErrorCode::Protocol, None, message));
        self.end();
    }

    /// Ends the session: kills its commands, aborts its transfers, thaws
    /// what it froze.
    pub fn end(&mut self) {
        let entries: Vec<Entry> = lock(&self.reg).drain().map(|(_, e)| e).collect();
        for e in entries {
            // Closed first, so that nothing the kill or the abort provokes
            // (an `Exit`, an `Error`) goes out for a session that has ended.
            e.out.close();
            match &e.handle {
                Handle::Exec(h) => h.exec.kill(KillReason::SessionEnd),
                Handle::Put(h) => h.abort(),
                Handle::Get => {}
            }
        }
        self.hello = false;
        freeze::release(self.id);
    }

    /// The serial port's host went away: ends the session and starts a new
    /// generation, so whatever is still queued for the old host is dropped.
    pub fn disconnected(&mut self) {
        self.end();
        self.new_generation();
    }

    fn new_generation(&mut self) {
        if let Some(g) = &self.gen {
            let n = g.fetch_add(1, Ordering::SeqCst) + 1;
            self.out = self.out.with_gen(n);
        }
    }

    fn hello(&mut self, f: &Frame) -> Result<(), ProtocolError> {
        let h: Hello = f.parse().map_err(|e| e.to_string())?;
        if h.version != PROTOCOL_VERSION {
            return Err(format!(
                "the host speaks protocol version {}, this agent speaks version {PROTOCOL_VERSION}",
                h.version
            ));
        }
        if h.nonce.len() != NONCE_LEN {
            return Err(format!(
                "the hello nonce is {} bytes, not {NONCE_LEN}",
                h.nonce.len()
            ));
        }
        if let Some(marker) = &self.cfg.boot_marker {
            super::wait_for_boot_setup(marker);
        }
        // A Hello mid-session: the host reconnected (serial) or starts over.
        self.end();
        self.new_generation();
        let mut payload = h.nonce.into_bytes();
        let ok = HelloOk {
            version: PROTOCOL_VERSION,
            agent: AGENT.to_string(),
            pid: std::process::id(),
            features: Vec::new(),
        };
        payload.extend_from_slice(&Frame::json(Kind::HelloOk, 0, &ok).payload);
        self.out.send(Kind::HelloOk, 0, &payload);
        self.hello = true;
        Ok(())
    }

    fn request(&mut self, f: Frame) {
        let stream = f.stream;
        if !self.hello {
            self.out.error(
                stream,
                &ErrorMsg::new(ErrorCode::Protocol, None, "no hello yet"),
            );
            return;
        }
        match f.kind {
            Kind::Ping => self.out.json(Kind::Done, stream, &Done::default()),
            Kind::Freeze | Kind::Thaw => {
                let out = OutStream::new(self.out.clone(), stream, None);
                let (session, cfg, kind) = (self.id, self.cfg.clone(), f.kind);
                let run = move || {
                    let r = if kind == Kind::Freeze && !cfg.freeze_enabled {
                        Err(ErrorMsg::new(
                            ErrorCode::BadRequest,
                            None,
                            "freeze is disabled: this agent serves a unix socket on a host \
                             (give --freeze-only-under DIR to allow it there)",
                        ))
                    } else if kind == Kind::Freeze {
                        freeze::freeze(session, cfg.freeze_only_under.as_deref())
                    } else {
                        freeze::thaw()
                    };
                    match r {
                        Ok(mounts) => out.finish(Kind::Done, &Done { bytes: 0, mounts }),
                        Err(e) => out.fail(&e),
                    };
                };
                if let Err(e) = spawn("freeze", run) {
                    self.out
                        .error(stream, &io_error("stream", "start a thread", &e));
                }
            }
            Kind::Identity => self.identity(&f),
            _ => self.transfer_or_exec(f),
        }
    }

    /// Checks the new identity here, then applies it on its own thread (the
    /// `ip` commands take a while; the session keeps reading).
    fn identity(&mut self, f: &Frame) {
        let stream = f.stream;
        let plan = f
            .parse::<Identity>()
            .map_err(bad_message)
            .and_then(|id| identity::validate(&id));
        let plan = match plan {
            Ok(_) if !self.cfg.identity_enabled => Err(ErrorMsg::new(
                ErrorCode::BadRequest,
                None,
                "identity is disabled: this agent serves a unix socket on a host, whose \
                 name, network, clock and random pool it must not change",
            )),
            r => r,
        };
        let plan = match plan {
            Ok(p) => p,
            Err(e) => return self.out.error(stream, &e),
        };
        let out = OutStream::new(self.out.clone(), stream, None);
        let run = move || {
            match identity::apply(&plan) {
                Ok(()) => out.finish(Kind::Done, &Done::default()),
                Err(e) => out.fail(&e),
            };
        };
        if let Err(e) = spawn("identity", run) {
            self.out
                .error(stream, &io_error("stream", "start a thread", &e));
        }
    }

    fn transfer_or_exec(&mut self, f: Frame) {
        let stream = f.stream;
        // Held while the request starts, so a request that ends at once
        // cannot unregister itself before it is registered.
        let mut reg = lock(&self.reg);
        if reg.contains_key(&stream) {
            drop(reg);
            self.out.error(
                stream,
                &ErrorMsg::new(
                    ErrorCode::BadRequest,
                    None,
                    format!("stream {stream} is already in use"),
                ),
            );
            return;
        }
        let id = next_id();
        let out = OutStream::new(
            self.out.clone(),
            stream,
            Some((Arc::downgrade(&self.reg), id)),
        );
        let started = match f.kind {
            Kind::Exec => f
                .parse::<ExecRequest>()
                .map_err(bad_message)
                .and_then(|req| exec::start(req, out.clone()))
                .map(Handle::Exec),
            Kind::PutFile => f
                .parse::<PutFile>()
                .map_err(bad_message)
                .and_then(|req| files::start_put(req, out.clone()))
                .map(Handle::Put),
            Kind::GetFile => f
                .parse::<GetFile>()
                .map_err(bad_message)
                .and_then(|req| files::start_get(req, out.clone()))
                .map(|()| Handle::Get),
            _ => return,
        };
        match started {
            Ok(handle) => {
                reg.insert(stream, Entry { id, out, handle });
            }
            Err(e) => {
                drop(reg);
                self.out.error(stream, &e);
            }
        }
    }

    fn entry(&self, stream: u32) -> Option<Entry> {
        lock(&self.reg).get(&stream).cloned()
    }

    fn data(&mut self, f: Frame) -> Result<(), ProtocolError> {
        // Frames for streams that ended are dropped: they race with the end.
        let Some(e) = self.entry(f.stream) else {
            return Ok(());
        };
        let eof = f.kind == Kind::Eof;
        let accepted = match &e.handle {
            Handle::Exec(h) => h.stdin(f.payload, eof),
            Handle::Put(h) => h.data(f.payload, eof),
            Handle::Get => true,
        };
        if accepted {
            Ok(())
        } else {
            Err(format!(
                "stream {} sent more data than its window allows",
                f.stream
            ))
        }
    }

    fn kill(&mut self, stream: u32) {
        let Some(e) = self.entry(stream) else {
            return;
        };
        match &e.handle {
            Handle::Exec(h) => h.exec.kill(KillReason::Killed),
            Handle::Put(h) => h.kill(),
            Handle::Get => {
                e.out.fail(&cancelled());
            }
        }
    }

    fn window(&mut self, f: &Frame) -> Result<(), ProtocolError> {
        let Some(e) = self.entry(f.stream) else {
            return Ok(());
        };
        let n = f.window_bytes().map_err(|e| e.to_string())?;
        e.out.grant(n);
        Ok(())
    }
}

fn bad_message(e: agentenv_proto::ProtoError) -> ErrorMsg {
    ErrorMsg::new(ErrorCode::BadRequest, None, e.to_string())
}

/// The `Error` a transfer cancelled by `Kill` ends with.
pub fn cancelled() -> ErrorMsg {
    ErrorMsg::new(ErrorCode::Io, None, "cancelled by the host")
}
