//! Sandbox deadlines: one timer task per daemon sleeps until the earliest
//! `endAt` of the sorted set in `state::Deadlines`, then kills the sandboxes
//! that are due (engine delete: the VM, its session directory and the
//! record in it go, and envd forgets them), or pauses those created with
//! `autoPause`. A paused sandbox does not expire; connect resumes it and
//! arms a new deadline. Deadlines are in the records, so a restarted
//! daemon re-arms them ([`start`]); one that passed while the daemon was
//! down fires at once.

use std::sync::Arc;
use std::time::Duration;

use agentenv_api::VmState;
use agentenv_core::EngineError;

use super::{forget, now_ms};
use crate::server::e2b::E2bState;

/// How soon a sandbox that could not be ended (busy, say) is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Arms every record's deadline and starts the timer task.
pub(super) fn start(state: &Arc<E2bState>) {
    for r in state.sandboxes.all() {
        state
            .sandboxes
            .deadlines
            .arm(&r.sandbox_id, None, r.end_at_ms);
    }
    let task = tokio::spawn(run(state.clone()));
    let old = state
        .sandboxes
        .timer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .replace(task);
    if let Some(old) = old {
        old.abort();
    }
}

/// Stops the timer task (sandboxes being ended finish in their own tasks).
pub(super) async fn stop(state: &Arc<E2bState>) {
    let task = state
        .sandboxes
        .timer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(task) = task {
        task.abort();
        let _ = task.await;
    }
}

/// The timer: sleeps until the earliest deadline or a change of the set.
async fn run(state: Arc<E2bState>) {
    let deadlines = &state.sandboxes.deadlines;
    loop {
        let now = now_ms();
        match deadlines.next() {
            Some(at) if at <= now => {
                for id in deadlines.take_due(now) {
                    let state = state.clone();
                    tokio::spawn(async move { expire(&state, &id).await });
                }
            }
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(at - now)) => {}
                    () = deadlines.changed.notified() => {}
                }
            }
            None => deadlines.changed.notified().await,
        }
    }
}

/// Ends sandbox `id` if its deadline has passed: pauses it (`autoPause`)
/// or kills it. A sandbox whose deadline moved meanwhile, that is paused,
/// or that is gone is left alone (a gone one's record is dropped).
pub async fn expire(state: &Arc<E2bState>, id: &str) {
    let Some(r) = state.sandboxes.get(id) else {
        return;
    };
    if r.end_at_ms > now_ms() {
        return;
    }
    let vm = match state.engine.get(id) {
        Ok(vm) => vm,
        Err(_) => {
            forget(state, &r);
            return;
        }
    };
    let result = match vm.state {
        VmState::Paused => return,
        VmState::Running if r.auto_pause => state.engine.pause(id).await.map(|_| ()),
        VmState::Running | VmState::Stopped | VmState::Failed => {
            match state.engine.delete(id).await {
                Ok(()) | Err(EngineError::NotFound { .. }) => {
                    forget(state, &r);
                    tracing::info!("e2b: sandbox {id} reached its end of life; killed");
                    return;
                }
                Err(e) => Err(e),
            }
        }
        // Busy (creating, snapshotting, …): try again shortly.
        other => Err(EngineError::Conflict {
            message: format!("vm {id} is {other}"),
            state: Some(other),
        }),
    };
    match result {
        Ok(()) => tracing::info!("e2b: sandbox {id} reached its end of life; paused (autoPause)"),
        Err(e) => {
            tracing::warn!("e2b: sandbox {id}: ending it at its deadline failed: {e}; retrying");
            let at = now_ms() + RETRY.as_millis() as u64;
            if let Some(Ok(r)) = state.sandboxes.update(id, |rec| rec.end_at_ms = at) {
                state.sandboxes.deadlines.arm(id, None, r.end_at_ms);
            }
        }
    }
}
