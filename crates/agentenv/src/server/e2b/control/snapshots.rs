//! E2B snapshots: `POST /sandboxes/{id}/snapshots`, `GET /snapshots`,
//! `DELETE /templates/{id}`. An E2B snapshot is a full engine snapshot
//! (memory and disk) of a sandbox, owned by its taker; its id (or one of
//! its names) is usable as a `templateID`: the create restores it.

use std::sync::Arc;

use agentenv_core::principal::Principal;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::query::{self, Cursor, Order};
use super::sandboxes::with_next_token;
use super::{api_error, internal, now_ms, random_alnum, visible, with_target, Caller, E2bJson};
use crate::server::auth::AuditTarget;
use crate::server::e2b::error::E2bError;
use crate::server::e2b::state::SnapshotRecord;
use crate::server::e2b::E2bState;
use crate::server::limits::Held;

/// `SandboxSnapshotRequest`. `memory: false` is accepted, but the snapshot
/// is a full one all the same (a create from it restores, never reboots).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct SnapshotBody {
    name: Option<String>,
    #[allow(dead_code)]
    memory: Option<bool>,
}

/// A snapshot name: 1 to 128 characters of letters, digits and `._:/-`.
fn check_name(name: &str) -> Result<(), E2bError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(E2bError::bad_field(
            "name",
            format!("{name:?} must be 1 to 128 characters of letters, digits and ._:/-"),
        ))
    }
}

/// The E2B snapshot `id_or_name` names (its id, else the newest with that
/// name) when `who` may see it and its engine snapshot exists.
pub(super) fn find(state: &E2bState, who: &Principal, id_or_name: &str) -> Option<SnapshotRecord> {
    let exists = |s: &SnapshotRecord| state.engine.snapshot_info(&s.snapshot_id).is_ok();
    if let Some(s) = state.sandboxes.snapshot(id_or_name) {
        return (who.may_see(Some(&s.owner)) && exists(&s)).then_some(s);
    }
    state
        .sandboxes
        .snapshots()
        .into_iter()
        .filter(|s| s.names.iter().any(|n| n == id_or_name) && who.may_see(Some(&s.owner)))
        .filter(exists)
        .max_by_key(|s| s.created_at_ms)
}

fn info_json(s: &SnapshotRecord) -> Value {
    json!({ "snapshotID": s.snapshot_id, "names": s.names })
}

/// `POST /sandboxes/{id}/snapshots` (`{"name"?, "memory"?}`): 201
/// `{"snapshotID", "names"}`. The sandbox runs on.
pub(super) async fn create(
    State(state): State<Arc<E2bState>>,
    Caller(who): Caller,
    held: Held,
    Path(id): Path<String>,
    E2bJson(body): E2bJson<SnapshotBody>,
) -> Result<Response, E2bError> {
    let (r, _) = visible(&state, &who, &id)?;
    if let Some(n) = &body.name {
        check_name(n)?;
    }
    let snapshot_id = format!("s{}", random_alnum(19)?);
    let task = {
        let state = state.clone();
        let snapshot_id = snapshot_id.clone();
        async move {
            let _held = held;
            state
                .engine
                .snapshot_as(&who, &id, Some(snapshot_id.clone()), true)
                .await
                .map_err(super::engine_error)?;
            let record = SnapshotRecord {
                snapshot_id: snapshot_id.clone(),
                names: body.name.into_iter().collect(),
                sandbox_id: id,
                owner: who.name.clone(),
                template_id: r.template_id.clone(),
                alias: r.alias.clone(),
                env_vars: r.env_vars.clone(),
                created_at_ms: now_ms(),
            };
            if let Err(e) = state.sandboxes.put_snapshot(record.clone()) {
                if let Err(de) = state.engine.delete_snapshot(&snapshot_id).await {
                    tracing::error!(
                        "e2b: snapshot {snapshot_id}: deleting it after a failed record: {de}"
                    );
                }
                return Err(internal(format!("writing the E2B snapshot registry: {e}")));
            }
            Ok::<_, E2bError>(record)
        }
    };
    let record = tokio::spawn(task)
        .await
        .map_err(|e| internal(format!("snapshot task: {e}")))??;
    let resp = (StatusCode::CREATED, Json(info_json(&record))).into_response();
    Ok(with_target(resp, AuditTarget::snapshot(&snapshot_id)))
}

/// `GET /snapshots?sandboxID=&name=&limit=&nextToken=`: the caller's E2B
/// snapshots (an admin's: all), oldest first, `x-next-token` when more.
pub(super) async fn list(
    State(state): State<Arc<E2bState>>,
    Caller(who): Caller,
    uri: axum::http::Uri,
) -> Result<Response, E2bError> {
    let mut sandbox = None;
    let mut name = None;
    let mut limit = query::DEFAULT_LIMIT;
    let mut after = None;
    for (k, v) in query::pairs(uri.query()) {
        match k.as_str() {
            "sandboxID" => sandbox = Some(v),
            "name" => name = Some(v),
            "limit" => limit = query::limit(&v)?,
            "nextToken" => after = Some(Cursor::parse(&v)?),
            _ => {}
        }
    }
    let items = state
        .sandboxes
        .snapshots()
        .into_iter()
        .filter(|s| who.may_see(Some(&s.owner)))
        .filter(|s| sandbox.as_ref().is_none_or(|id| *id == s.sandbox_id))
        .filter(|s| name.as_ref().is_none_or(|n| s.names.contains(n)))
        .filter(|s| state.engine.snapshot_info(&s.snapshot_id).is_ok())
        .map(|s| {
            let c = Cursor {
                at_ms: s.created_at_ms,
                id: s.snapshot_id.clone(),
            };
            (c, info_json(&s))
        })
        .collect();
    let (page, next) = query::page(items, Order::Asc, after.as_ref(), limit);
    Ok(with_next_token(Json(page).into_response(), next))
}

/// `DELETE /templates/{id}`: deletes the E2B snapshot `id` (or of that
/// name): 204; 404 when the caller has none such.
pub(super) async fn delete(
    State(state): State<Arc<E2bState>>,
    Caller(who): Caller,
    held: Held,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let not_found = || E2bError::new(StatusCode::NOT_FOUND, format!("template {id:?} not found"));
    let s = find(&state, &who, &id).ok_or_else(not_found)?;
    let engine = state.engine.clone();
    let snapshot_id = s.snapshot_id.clone();
    let deleted =
        crate::server::detached(
            held,
            async move { engine.delete_snapshot(&snapshot_id).await },
        )
        .await;
    match deleted {
        Ok(()) => {}
        Err(e) if e.status == StatusCode::NOT_FOUND => {}
        Err(e) => return Err(api_error(e)),
    }
    state
        .sandboxes
        .remove_snapshot(&s.snapshot_id)
        .map_err(|e| internal(format!("writing the E2B snapshot registry: {e}")))?;
    Ok(StatusCode::NO_CONTENT)
}
