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
use agentenv_proto::{self as proto, ErrorCode, PutFile};
use chrono::Utc;

use super::{Engine, VmSlot};
use crate::agent::{AgentError, AgentLink, Download, Exec, ExecEvent, Upload};
use crate::backend::{AgentChannel, VmmInstance};
use crate::error::EngineError;

/// Longest guest path accepted.
const MAX_GUEST_PATH: usize = 4096;

/// Longest a freeze may take before the snapshot goes ahead with a pause only.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// Starts an upload of a guest file.
    pub async fn put_file(
        &self,
        vm_id: &str,
        path: &str,
        mode: Option<u32>,
        make_parents: bool,
    ) -> Result<Upload, EngineError> {
        let slot = self.slot(vm_id)?;
        let path = guest_path("path", path)?;
        if path.ends_with('/') {
            return Err(EngineError::bad(
                "path",
                format!("path {path:?} names a directory"),
            ));
        }
        if let Some(m) = mode {
            if m > 0o7777 {
                return Err(EngineError::bad(
                    "mode",
                    format!("mode {m:o} is not a permission mode"),
                ));
            }
        }
        let agent = self.agent(&slot)?;
        Ok(agent
            .put_file(&PutFile {
                path,
                mode,
                make_parents,
            })
            .await?)
    }

    /// Starts a download of a guest file.
    pub async fn get_file(&self, vm_id: &str, path: &str) -> Result<Download, EngineError> {
        let slot = self.slot(vm_id)?;
        let path = guest_path("path", path)?;
        let agent = self.agent(&slot)?;
        Ok(agent.get_file(&path).await?)
    }

    /// Freezes the guest's file systems for a snapshot, when its agent answers.
    /// Returns the connection to thaw with, or `None` (pause-only snapshot).
    pub(super) async fn freeze_for_snapshot(&self, slot: &VmSlot) -> Option<Arc<dyn AgentLink>> {
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
        delay = Duration::from_millis(50);
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
        tracing::info!(vm_id = %vm_id, "guest agent connection ended: {why}");
        unanswered_since = tokio::time::Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
