//! The guest agent: readiness, exec, files, and file-system freezes for snapshots.
//!
//! Each running VM with an agent channel has a watcher task that connects to the
//! agent (retrying while the guest boots), marks the VM `ready` with the agent's
//! version while the connection lives, and reconnects if it breaks. Exec and file
//! calls use that connection; they do not take the VM's operation lock, so many
//! run at once and a long command never blocks pause or snapshot.

use std::sync::{Arc, Weak};
use std::time::Duration;

use agentenv_api::{AgentInfo, ExecRequest, ExecResult, VmInfo, VmState};
use agentenv_proto::{self as proto, ErrorCode, FsOp, FsRequest, FsResponse, GetFile, PutFile};
use chrono::Utc;
use tokio::sync::watch;

use super::{Engine, VmSlot};
use crate::agent::{AgentError, AgentLink, Download, Exec, ExecEvent, Upload, Watch};
use crate::backend::{AgentChannel, VmmExit, VmmInstance};
use crate::error::EngineError;

/// Longest guest path accepted.
const MAX_GUEST_PATH: usize = 4096;

/// Longest a freeze may take before the snapshot goes ahead with a pause only.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest the host waits for the thaw after a snapshot.
const THAW_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the agent watcher retries quickly before backing off to 5 s.
const SLOW_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Extra time the host gives the agent past an exec's own timeout.
const EXEC_GRACE: Duration = Duration::from_secs(30);

impl From<AgentError> for EngineError {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::Remote(m) => {
                let field = m.field.clone().unwrap_or_default();
                match m.code {
                    ErrorCode::BadRequest => EngineError::BadRequest {
                        field,
                        message: m.error,
                    },
                    ErrorCode::NotFound => EngineError::NotFound {
                        field,
                        message: m.error,
                    },
                    ErrorCode::PermissionDenied => EngineError::Forbidden {
                        field,
                        message: m.error,
                    },
                    ErrorCode::AlreadyExists => EngineError::Conflict {
                        message: m.error,
                        state: None,
                    },
                    ErrorCode::Io | ErrorCode::Protocol => {
                        EngineError::Guest(format!("guest agent: {}", m.error))
                    }
                }
            }
            AgentError::Timeout(_) => EngineError::Timeout(e.to_string()),
            other => EngineError::AgentUnavailable(other.to_string()),
        }
    }
}

/// A guest path from a request: absolute, no NUL, bounded.
pub(super) fn guest_path(field: &str, p: &str) -> Result<String, EngineError> {
    if p.is_empty() {
        return Err(EngineError::bad(field, format!("{field} is empty")));
    }
    if p.contains('\0') {
        return Err(EngineError::bad(
            field,
            format!("{field} contains a NUL byte"),
        ));
    }
    if !p.starts_with('/') {
        return Err(EngineError::bad(
            field,
            format!("{field} must be an absolute guest path, got {p:?}"),
        ));
    }
    if p.len() > MAX_GUEST_PATH {
        return Err(EngineError::bad(
            field,
            format!("{field} is longer than {MAX_GUEST_PATH} bytes"),
        ));
    }
    Ok(p.to_string())
}

/// Longest guest user name accepted.
const MAX_USER_NAME: usize = 256;

/// A guest user name from a request: what /etc/passwd can hold.
fn guest_user(user: &Option<String>) -> Result<(), EngineError> {
    let Some(u) = user else { return Ok(()) };
    if u.is_empty()
        || u.len() > MAX_USER_NAME
        || u.chars()
            .any(|c| c == ':' || c == '/' || c.is_control() || c.is_whitespace())
    {
        return Err(EngineError::bad(
            "user",
            format!("user {u:?} is not a user name"),
        ));
    }
    Ok(())
}

/// A guest path that may be relative to `user`'s home (absolute without a user).
fn user_path(field: &str, p: &str, user: &Option<String>) -> Result<(), EngineError> {
    if user.is_some() && !p.starts_with('/') && !p.is_empty() {
        // Relative: the guest resolves it against the user's home.
        guest_path(field, &format!("/{p}")).map(drop)
    } else {
        guest_path(field, p).map(drop)
    }
}

/// Checks an agent-level exec request (the E2B surface's): the same rules as
/// the native API's, plus `user` and `pty`; `cwd` may be relative to the
/// user's home.
fn check_agent_exec(req: &proto::ExecRequest) -> Result<(), EngineError> {
    let api = ExecRequest {
        cmd: req.cmd.clone(),
        env: req.env.clone(),
        ..Default::default()
    };
    exec_request(&api, 1)?;
    guest_user(&req.user)?;
    if let Some(cwd) = &req.cwd {
        user_path("cwd", cwd, &req.user)?;
    }
    if let Some(size) = req.pty {
        check_pty(size)?;
    }
    if req.timeout_ms == Some(0) {
        return Err(EngineError::bad(
            "timeout_ms",
            "timeout_ms must be more than 0",
        ));
    }
    Ok(())
}

/// A terminal size: both sides at least 1.
pub(super) fn check_pty(size: proto::PtySize) -> Result<(), EngineError> {
    if size.cols == 0 || size.rows == 0 {
        return Err(EngineError::bad(
            "pty",
            format!(
                "a terminal of {}x{} has no room: cols and rows must be at least 1",
                size.cols, size.rows
            ),
        ));
    }
    Ok(())
}

/// Checks a file-system request's user and paths.
fn check_fs(req: &FsRequest) -> Result<(), EngineError> {
    guest_user(&req.user)?;
    match &req.op {
        FsOp::Stat { path } | FsOp::MakeDir { path } | FsOp::Remove { path } => {
            user_path("path", path, &req.user)
        }
        FsOp::List { path, depth } => {
            if *depth == 0 {
                return Err(EngineError::bad("depth", "depth must be at least 1"));
            }
            user_path("path", path, &req.user)
        }
        FsOp::Move {
            source,
            destination,
        } => {
            user_path("source", source, &req.user)?;
            user_path("destination", destination, &req.user)
        }
    }
}

/// The agent-side request for an API exec, checked.
fn exec_request(
    req: &ExecRequest,
    default_timeout_s: u64,
) -> Result<(proto::ExecRequest, Option<Vec<u8>>, Duration), EngineError> {
    if req.cmd.is_empty() || req.cmd[0].is_empty() {
        return Err(EngineError::bad("cmd", "cmd must name a program"));
    }
    for (i, a) in req.cmd.iter().enumerate() {
        if a.contains('\0') {
            return Err(EngineError::bad(
                &format!("cmd[{i}]"),
                format!("cmd[{i}] contains a NUL byte"),
            ));
        }
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(EngineError::bad(
                &format!("env.{k}"),
                format!("environment name {k:?} must be non-empty, without '=' or NUL"),
            ));
        }
        if v.contains('\0') {
            return Err(EngineError::bad(
                &format!("env.{k}"),
                format!("the value of {k} contains a NUL byte"),
            ));
        }
    }
    let cwd = match &req.cwd {
        Some(c) => Some(guest_path("cwd", c)?),
        None => None,
    };
    let stdin =
        match (&req.stdin, &req.stdin_base64) {
            (Some(_), Some(_)) => {
                return Err(EngineError::bad(
                    "stdin_base64",
                    "give stdin or stdin_base64, not both",
                ))
            }
            (Some(s), None) => Some(s.clone().into_bytes()),
            (None, Some(b)) => Some(agentenv_api::base64::decode(b).ok_or_else(|| {
                EngineError::bad("stdin_base64", "stdin_base64 is not valid base64")
            })?),
            (None, None) => None,
        };
    let timeout = match req.timeout_s {
        None => Duration::from_secs(default_timeout_s),
        Some(t) if t.is_finite() && t > 0.0 && t <= 86_400.0 => Duration::from_secs_f64(t),
        Some(t) => {
            return Err(EngineError::bad(
                "timeout_s",
                format!("timeout_s must be more than 0 and at most 86400, got {t}"),
            ))
        }
    };
    Ok((
        proto::ExecRequest {
            cmd: req.cmd.clone(),
            env: req.env.clone(),
            cwd,
            stdin: stdin.is_some(),
            timeout_ms: Some(timeout.as_millis().max(1) as u64),
            max_output: None,
            user: None,
            pty: None,
        },
        stdin,
        timeout,
    ))
}

impl Engine {
    /// Watches a VM's agent for as long as `inst` is the VM's VMM.
    pub(super) fn spawn_agent_watch(self: &Arc<Self>, vm_id: String, inst: Arc<dyn VmmInstance>) {
        let Some(ch) = inst.agent_channel() else {
            return;
        };
        let engine = Arc::downgrade(self);
        tokio::spawn(agent_watch(engine, vm_id, inst, ch));
    }

    /// The VM's agent connection, when the VM is running and its agent answers.
    fn agent(&self, slot: &VmSlot) -> Result<Arc<dyn AgentLink>, EngineError> {
        let state = slot.state();
        if matches!(state, VmState::Paused | VmState::Pausing) {
            return Err(EngineError::Conflict {
                message: format!(
                    "vm {} is {state}: resume it before using its agent",
                    slot.info().vm_id
                ),
                state: Some(state),
            });
        }
        if !state.has_vmm() || state == VmState::Creating {
            return Err(EngineError::Conflict {
                message: format!("vm {} is {state}: it has no agent", slot.info().vm_id),
                state: Some(state),
            });
        }
        match slot.agent() {
            Some(c) if !c.is_closed() => Ok(c),
            _ => Err(EngineError::AgentUnavailable(format!(
                "vm {}: the guest agent is not ready (yet); wait for `ready` or create with wait_ready",
                slot.info().vm_id
            ))),
        }
    }

    /// Waits until the VM's agent answers, the VM stops, or `timeout` passes.
    pub(super) async fn wait_ready(
        &self,
        vm_id: &str,
        timeout: Duration,
    ) -> Result<VmInfo, EngineError> {
        let slot = self.slot(vm_id)?;
        let mut rx = slot.ready.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let info = slot.info();
            if info.ready {
                return Ok(info);
            }
            if !info.state.has_vmm() {
                let cause = info.exit.map(|e| e.cause).unwrap_or_default();
                return Err(EngineError::Conflict {
                    message: format!(
                        "vm {vm_id} is {} before its agent answered: {cause}",
                        info.state
                    ),
                    state: Some(info.state),
                });
            }
            // The exit is noticed by polling the state; readiness by the watch.
            let tick = tokio::time::sleep(Duration::from_millis(100));
            tokio::select! {
                _ = rx.changed() => {}
                _ = tick => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(EngineError::Timeout(format!(
                        "vm {vm_id} is {} but its guest agent did not answer within {} s; \
                         the vm is kept (see its console log)",
                        slot.state(),
                        timeout.as_secs_f64()
                    )));
                }
            }
        }
    }

    /// Starts a command in the VM; the caller reads its events.
    pub async fn exec_start(&self, vm_id: &str, req: &ExecRequest) -> Result<Exec, EngineError> {
        let slot = self.slot(vm_id)?;
        let (areq, stdin, _) = exec_request(req, self.cfg.agent.default_exec_timeout_s)?;
        let agent = self.agent(&slot)?;
        Ok(agent.exec(&areq, stdin).await?)
    }

    /// Runs a command to its end and returns its (capped) output.
    pub async fn exec(&self, vm_id: &str, req: &ExecRequest) -> Result<ExecResult, EngineError> {
        let slot = self.slot(vm_id)?;
        let (mut areq, stdin, timeout) = exec_request(req, self.cfg.agent.default_exec_timeout_s)?;
        let cap = self.cfg.agent.max_output_bytes;
        areq.max_output = Some(cap);
        let agent = self.agent(&slot)?;
        let run = async {
            let mut exec = agent.exec(&areq, stdin).await?;
            let (mut out, mut err) = (Vec::new(), Vec::new());
            loop {
                match exec.next().await? {
                    ExecEvent::Stdout(b) => append_capped(&mut out, &b, cap),
                    ExecEvent::Stderr(b) => append_capped(&mut err, &b, cap),
                    ExecEvent::Exit(st) => {
                        return Ok::<_, AgentError>(ExecResult {
                            exit_code: st.exit_code,
                            signal: st.signal,
                            truncated: st.stdout_truncated
                                || st.stderr_truncated
                                || st.stdout_bytes > out.len() as u64
                                || st.stderr_bytes > err.len() as u64,
                            stdout: String::from_utf8_lossy(&out).into_owned(),
                            stderr: String::from_utf8_lossy(&err).into_owned(),
                            timed_out: st.timed_out,
                            duration_ms: st.duration_ms,
                            stdout_bytes: st.stdout_bytes,
                            stderr_bytes: st.stderr_bytes,
                        });
                    }
                }
            }
        };
        match tokio::time::timeout(timeout + EXEC_GRACE, run).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(EngineError::Timeout(format!(
                "vm {vm_id}: the guest agent did not report the command's end within {} s",
                (timeout + EXEC_GRACE).as_secs()
            ))),
        }
    }

    /// Starts a command given as the agent protocol's own request (with
    /// `user`, `pty`, an open stdin): the E2B surface's exec. With `stdin`,
    /// its bytes are sent and stdin closed; without, and with `req.stdin`,
    /// stdin stays open for [`Exec::control`]. `timeout_ms` is optional
    /// here (None: the command runs until it ends or is killed).
    pub async fn agent_exec(
        &self,
        vm_id: &str,
        req: &proto::ExecRequest,
        stdin: Option<Vec<u8>>,
    ) -> Result<Exec, EngineError> {
        let slot = self.slot(vm_id)?;
        check_agent_exec(req)?;
        let agent = self.agent(&slot)?;
        Ok(agent.exec(req, stdin).await?)
    }

    /// One file-system operation in the guest (stat, list, make_dir, move,
    /// remove), as `req.user`.
    pub async fn agent_fs(&self, vm_id: &str, req: &FsRequest) -> Result<FsResponse, EngineError> {
        let slot = self.slot(vm_id)?;
        check_fs(req)?;
        let agent = self.agent(&slot)?;
        Ok(agent.fs(req).await?)
    }

    /// Starts watching a guest directory; dropping the [`Watch`] stops it.
    pub async fn agent_watch(
        &self,
        vm_id: &str,
        req: &proto::WatchRequest,
    ) -> Result<Watch, EngineError> {
        let slot = self.slot(vm_id)?;
        guest_user(&req.user)?;
        user_path("path", &req.path, &req.user)?;
        let agent = self.agent(&slot)?;
        Ok(agent.watch(req).await?)
    }

    /// Starts an upload of a guest file.
    pub async fn put_file(
        &self,
        vm_id: &str,
        path: &str,
        mode: Option<u32>,
        make_parents: bool,
    ) -> Result<Upload, EngineError> {
        let path = guest_path("path", path)?;
        self.put_file_as(
            vm_id,
            &PutFile {
                path,
                mode,
                make_parents,
                user: None,
            },
        )
        .await
    }

    /// Starts an upload of a guest file as `put.user` (who then owns it and
    /// the parents it creates; a relative path is relative to its home).
    pub async fn put_file_as(&self, vm_id: &str, put: &PutFile) -> Result<Upload, EngineError> {
        let slot = self.slot(vm_id)?;
        guest_user(&put.user)?;
        user_path("path", &put.path, &put.user)?;
        let path = &put.path;
        if path.ends_with('/') {
            return Err(EngineError::bad(
                "path",
                format!("path {path:?} names a directory"),
            ));
        }
        if let Some(m) = put.mode {
            if m > 0o7777 {
                return Err(EngineError::bad(
                    "mode",
                    format!("mode {m:o} is not a permission mode"),
                ));
            }
        }
        let agent = self.agent(&slot)?;
        Ok(agent.put_file(put).await?)
    }

    /// Starts a download of a guest file.
    pub async fn get_file(&self, vm_id: &str, path: &str) -> Result<Download, EngineError> {
        let path = guest_path("path", path)?;
        self.get_file_as(vm_id, &GetFile { path, user: None }).await
    }

    /// Starts a download of a guest file as `get.user` (a relative path is
    /// relative to its home).
    pub async fn get_file_as(&self, vm_id: &str, get: &GetFile) -> Result<Download, EngineError> {
        let slot = self.slot(vm_id)?;
        guest_user(&get.user)?;
        user_path("path", &get.path, &get.user)?;
        let agent = self.agent(&slot)?;
        Ok(agent.get_file(get).await?)
    }
}

/// Freezes the guest's file systems for a snapshot, when its agent answers.
/// Returns the connection to thaw with, or `None` (pause-only snapshot).
pub(super) async fn freeze_for_snapshot(slot: &VmSlot) -> Option<Arc<dyn AgentLink>> {
    let agent = slot.agent().filter(|c| !c.is_closed())?;
    let vm_id = slot.info().vm_id;
    match tokio::time::timeout(FREEZE_TIMEOUT, agent.freeze()).await {
        Ok(Ok(done)) => {
            tracing::info!(vm_id = %vm_id, "froze {:?} for a snapshot", done.mounts);
            Some(agent)
        }
        Ok(Err(e)) => {
            tracing::warn!(vm_id = %vm_id, "fsfreeze failed, snapshot with a pause only: {e}");
            None
        }
        Err(_) => {
            tracing::warn!(vm_id = %vm_id, "fsfreeze timed out, snapshot with a pause only");
            // The agent thaws by itself if no thaw comes; ask anyway.
            let a = agent.clone();
            tokio::spawn(async move {
                let _ = a.thaw().await;
            });
            None
        }
    }
}

/// Thaws what [`freeze_for_snapshot`] froze, if anything. Bounded: a guest
/// left paused cannot answer; its agent thaws by itself once it runs again and
/// no thaw has come.
pub(super) async fn thaw_after_snapshot(vm_id: &str, frozen: Option<Arc<dyn AgentLink>>) {
    let Some(agent) = frozen else {
        return;
    };
    match tokio::time::timeout(THAW_TIMEOUT, agent.thaw()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!("vm {vm_id}: thaw after snapshot failed: {e}"),
        Err(_) => tracing::error!("vm {vm_id}: thaw after snapshot timed out"),
    }
}

fn append_capped(buf: &mut Vec<u8>, b: &[u8], cap: u64) {
    let room = (cap as usize).saturating_sub(buf.len());
    buf.extend_from_slice(&b[..b.len().min(room)]);
}

/// Keeps a VM's agent connection while `inst` is its VMM.
async fn agent_watch(
    engine: Weak<Engine>,
    vm_id: String,
    inst: Arc<dyn VmmInstance>,
    channel: AgentChannel,
) {
    let mut exit = inst.exit_watch();
    let mut delay = Duration::from_millis(50);
    // Retries are quick while a guest boots, then slow down: a VM whose image
    // has no agent costs a connection attempt every few seconds, not twice a second.
    let mut unanswered_since = tokio::time::Instant::now();
    loop {
        let (slot, agents, connect_timeout) = {
            let Some(engine) = engine.upgrade() else {
                return;
            };
            let Ok(slot) = engine.slot(&vm_id) else {
                return;
            };
            let current = slot.instance();
            if !current.is_some_and(|c| Arc::ptr_eq(&c, &inst)) || !slot.state().has_vmm() {
                return;
            }
            (
                slot,
                engine.agents.clone(),
                Duration::from_millis(engine.cfg.agent.connect_timeout_ms),
            )
        };
        if exit.borrow().is_some() {
            return;
        }
        if matches!(slot.state(), VmState::Paused | VmState::Pausing) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let client = tokio::select! {
            r = agents.connect(&channel, connect_timeout) => r,
            _ = exit.changed() => return,
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(vm_id = %vm_id, "agent not reachable yet: {e}");
                tokio::time::sleep(delay).await;
                let cap = if unanswered_since.elapsed() < SLOW_RETRY_AFTER {
                    Duration::from_millis(500)
                } else {
                    Duration::from_secs(5)
                };
                delay = (delay * 2).min(cap);
                continue;
            }
        };
        // A VM restored from a memory snapshot still has its source's
        // identity: its agent applies its own before the VM counts as ready.
        if let Some(identity) = slot.identity() {
            let applied = tokio::select! {
                r = client.set_identity(&identity) => r,
                _ = exit.changed() => return,
            };
            match applied {
                Ok(_) => {
                    slot.set_identity(None);
                    tracing::info!(vm_id = %vm_id, "the restored guest took its own identity");
                }
                Err(e) => {
                    tracing::warn!(vm_id = %vm_id, "the guest agent did not apply the vm's identity: {e}");
                    client.shutdown();
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        delay = Duration::from_millis(50);
        let why = hold_link(&slot, &vm_id, client, &mut exit).await;
        tracing::info!(vm_id = %vm_id, "guest agent connection ended: {why}");
        unanswered_since = tokio::time::Instant::now();
    }
}

/// Holds one agent connection: the VM is ready, with the agent's version,
/// while it lives. Returns why it ended (the connection broke, or the VMM
/// exited), once the VM is marked not ready again.
async fn hold_link(
    slot: &VmSlot,
    vm_id: &str,
    client: Arc<dyn AgentLink>,
    exit: &mut watch::Receiver<Option<VmmExit>>,
) -> String {
    let hello = client.hello().clone();
    tracing::info!(vm_id = %vm_id, "guest agent ready: {} (protocol {})", hello.agent, hello.version);
    slot.set_agent(Some(client.clone()));
    let _ = slot.update(|i| {
        i.ready = true;
        i.agent = Some(AgentInfo {
            version: hello.agent.clone(),
            protocol: hello.version,
            ready_at: Utc::now(),
        });
        Ok::<(), std::convert::Infallible>(())
    });
    slot.ready.send_replace(true);
    let why = tokio::select! {
        why = client.closed() => why,
        _ = exit.changed() => "the vmm exited".to_string(),
    };
    client.shutdown();
    slot.set_agent(None);
    let _ = slot.update(|i| {
        i.ready = false;
        Ok::<(), std::convert::Infallible>(())
    });
    slot.ready.send_replace(false);
    why
}

#[cfg(test)]
pub(super) mod fake;

#[cfg(test)]
mod tests {
    use super::fake::{AgentCall, Answer, FakeAgents, FAKE_AGENT};
    use super::*;

    /// A running VM's slot, with no agent yet.
    fn running_vm(vm_id: &str) -> Arc<VmSlot> {
        let now = Utc::now();
        let info: VmInfo = serde_json::from_value(serde_json::json!({
            "vm_id": vm_id,
            "state": "running",
            "backend": "firecracker",
            "api_socket": "/run/fc.sock",
            "vcpus": 1,
            "memory_mib": 128,
            "disk": {"kind": "ephemeral", "writable_path": "/s/rootfs.ext4", "size_bytes": 0},
            "kernel": "/k/vmlinux",
            "boot_args": "console=ttyS0",
            "session_dir": "/s",
            "console_log": "/s/console.log",
            "created_at": now,
            "updated_at": now,
        }))
        .expect("a VmInfo");
        VmSlot::new(info, None, None)
    }

    /// A running VM holding a link to `agents`, once it is ready: the VM, the
    /// VMM's exit watch, and what [`hold_link`] returns.
    async fn held_link(
        agents: &FakeAgents,
    ) -> (
        Arc<VmSlot>,
        watch::Sender<Option<VmmExit>>,
        tokio::task::JoinHandle<String>,
    ) {
        let slot = running_vm("held");
        let (exit_tx, mut exit) = watch::channel(None);
        let held = {
            let (slot, link) = (slot.clone(), agents.link());
            tokio::spawn(async move { hold_link(&slot, "held", link, &mut exit).await })
        };
        slot.ready.subscribe().wait_for(|r| *r).await.unwrap();
        (slot, exit_tx, held)
    }

    #[tokio::test]
    async fn a_vm_is_ready_while_its_agent_link_lives() {
        let agents = FakeAgents::new();
        let (slot, _exit, held) = held_link(&agents).await;
        let info = slot.info();
        assert!(info.ready);
        assert_eq!(
            info.agent.as_ref().map(|a| a.version.as_str()),
            Some(FAKE_AGENT)
        );
        assert_eq!(
            info.agent.map(|a| a.protocol),
            Some(proto::PROTOCOL_VERSION)
        );
        assert!(slot.agent().is_some());

        agents.close_links("the guest rebooted");
        assert_eq!(held.await.unwrap(), "the guest rebooted");
        assert!(!*slot.ready.borrow());
        assert!(!slot.info().ready);
        assert!(slot.agent().is_none());
    }

    #[tokio::test]
    async fn a_vmm_exit_ends_the_link_and_readiness() {
        let agents = FakeAgents::new();
        let (slot, exit_tx, held) = held_link(&agents).await;
        exit_tx.send_replace(Some(VmmExit {
            code: Some(0),
            signal: None,
        }));
        assert_eq!(held.await.unwrap(), "the vmm exited");
        assert!(!slot.info().ready && slot.agent().is_none());
        // The host closed the link it held.
        assert_eq!(agents.calls(), [AgentCall::Shutdown]);
    }

    /// A snapshot's freeze, then its thaw, as `snapshot.rs` runs them.
    async fn freeze_then_thaw(freeze: Answer, thaw: Answer) -> (bool, Vec<AgentCall>) {
        let agents = FakeAgents::new();
        agents.answer(freeze, thaw);
        let slot = running_vm("frozen");
        slot.set_agent(Some(agents.link()));
        let frozen = freeze_for_snapshot(&slot).await;
        let was_frozen = frozen.is_some();
        thaw_after_snapshot("frozen", frozen).await;
        // A thaw sent in the background (after a freeze timed out) runs now.
        tokio::task::yield_now().await;
        (was_frozen, agents.calls())
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_thaws_what_it_froze_on_every_path() {
        use AgentCall::{Freeze, Thaw};
        // Frozen: thawed after the copy.
        assert_eq!(
            freeze_then_thaw(Answer::Done, Answer::Done).await,
            (true, vec![Freeze, Thaw])
        );
        // The freeze failed: nothing is frozen, nothing to thaw.
        assert_eq!(
            freeze_then_thaw(Answer::Fail, Answer::Done).await,
            (false, vec![Freeze])
        );
        // The freeze never answered: a pause-only snapshot, and a thaw anyway
        // in case the guest froze late.
        assert_eq!(
            freeze_then_thaw(Answer::Never, Answer::Done).await,
            (false, vec![Freeze, Thaw])
        );
        // A thaw that fails or never answers does not hold the snapshot up.
        for thaw in [Answer::Fail, Answer::Never] {
            assert_eq!(
                freeze_then_thaw(Answer::Done, thaw).await,
                (true, vec![Freeze, Thaw])
            );
        }
    }

    fn get(path: &str) -> GetFile {
        GetFile {
            path: path.into(),
            user: None,
        }
    }

    #[tokio::test]
    async fn the_seam_streams_exec_output_uploads_and_downloads() {
        use crate::agent::AgentConnector;
        let agents = FakeAgents::new();
        let channel = AgentChannel::Stream("/s/agent.sock".into());
        let link = agents
            .connect(&channel, Duration::from_secs(1))
            .await
            .unwrap();
        let put = PutFile {
            path: "/etc/motd".into(),
            ..PutFile::default()
        };
        let mut up = link.put_file(&put).await.unwrap();
        up.write(b"hello ").await.unwrap();
        up.write(b"world").await.unwrap();
        assert_eq!(up.finish().await.unwrap().bytes, 11);
        assert_eq!(
            agents.file("/etc/motd").as_deref(),
            Some(&b"hello world"[..])
        );

        let mut dl = link.get_file(&get("/etc/motd")).await.unwrap();
        assert_eq!(dl.info.size, 11);
        let (recycler, mut got) = (dl.recycler(), Vec::new());
        while let Some(chunk) = dl.next_chunk().await.unwrap() {
            got.extend_from_slice(&chunk);
            recycler.give(chunk);
        }
        assert_eq!(got, b"hello world");

        let req = proto::ExecRequest {
            cmd: vec!["echo".into(), "hi".into()],
            ..Default::default()
        };
        let mut exec = link.exec(&req, None).await.unwrap();
        assert_eq!(
            exec.next().await.unwrap(),
            ExecEvent::Stdout(b"hi\n".to_vec())
        );
        match exec.next().await.unwrap() {
            ExecEvent::Exit(st) => assert_eq!(st.exit_code, Some(0)),
            e => panic!("{e:?}"),
        }

        // The agent's refusals become the engine's errors, field and all.
        let e = EngineError::from(link.get_file(&get("/nope")).await.err().unwrap());
        assert!(matches!(e, EngineError::NotFound { .. }), "{e}");
        assert_eq!(e.field(), Some("path"));
        assert_eq!(
            agents.calls(),
            [
                AgentCall::Connect(channel),
                AgentCall::PutFile("/etc/motd".into()),
                AgentCall::GetFile("/etc/motd".into()),
                AgentCall::Exec(req.cmd.clone()),
                AgentCall::GetFile("/nope".into()),
            ]
        );
    }

    #[tokio::test]
    async fn no_agent_or_a_closed_one_means_a_pause_only_snapshot() {
        let slot = running_vm("noagent");
        assert!(freeze_for_snapshot(&slot).await.is_none());
        let agents = FakeAgents::new();
        slot.set_agent(Some(agents.link()));
        agents.close_links("gone");
        assert!(freeze_for_snapshot(&slot).await.is_none());
        assert_eq!(agents.calls(), []);
    }

    #[test]
    fn exec_requests_are_checked_field_by_field() {
        let ok = ExecRequest {
            cmd: vec!["true".into()],
            ..Default::default()
        };
        assert!(exec_request(&ok, 10).is_ok());
        let cases: Vec<(ExecRequest, &str)> = vec![
            (ExecRequest::default(), "cmd"),
            (
                ExecRequest {
                    cmd: vec!["a".into(), "b\0".into()],
                    ..Default::default()
                },
                "cmd[1]",
            ),
            (
                ExecRequest {
                    cwd: Some("rel".into()),
                    ..ok.clone()
                },
                "cwd",
            ),
            (
                ExecRequest {
                    timeout_s: Some(0.0),
                    ..ok.clone()
                },
                "timeout_s",
            ),
            (
                ExecRequest {
                    timeout_s: Some(f64::NAN),
                    ..ok.clone()
                },
                "timeout_s",
            ),
            (
                ExecRequest {
                    stdin: Some("x".into()),
                    stdin_base64: Some("eA==".into()),
                    ..ok.clone()
                },
                "stdin_base64",
            ),
            (
                ExecRequest {
                    stdin_base64: Some("!!".into()),
                    ..ok.clone()
                },
                "stdin_base64",
            ),
            (
                ExecRequest {
                    env: [("A=B".to_string(), "v".to_string())].into(),
                    ..ok.clone()
                },
                "env.A=B",
            ),
        ];
        for (req, field) in cases {
            let e = exec_request(&req, 10).unwrap_err();
            assert_eq!(e.field(), Some(field), "{req:?}: {e}");
        }
    }
}
