//! `/v1/snapshots` routes and `POST /v1/vm/{vm_id}/snapshot`.

use agentenv_api::{
    CreateSnapshotRequest, ErrorBody, PersistSnapshotRequest, SnapshotInfo, SnapshotList,
};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;

use super::auth::{AuditTarget, Caller};
use super::error::ApiError;
use super::json::OptionalJsonBody;
use super::limits::Held;
use super::{detached, AppState};

#[utoipa::path(post, path = "/v1/vm/{vm_id}/snapshot", tag = "snapshots",
    params(("vm_id" = String, Path, description = "The VM's id")),
    request_body(content = CreateSnapshotRequest, description = "Optional; an empty body generates the id and takes a disk snapshot; `memory: true` takes a full one"),
    responses(
        (status = 201, description = "Complete; the VM runs again if it was running", body = SnapshotInfo),
        (status = 400, description = "Malformed snapshot_id", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "The id is taken, the VM is not running or paused, or (memory) it cannot have a full snapshot (a direct disk, shares)", body = ErrorBody),
        (status = 503, description = "The durable tier is missing or read-only", body = ErrorBody),
        (status = 507, description = "Both tiers are full; nothing was kept", body = ErrorBody),
    ))]
pub(crate) async fn create(
    State(engine): State<AppState>,
    Caller(who): Caller,
    held: Held,
    Path(vm_id): Path<String>,
    OptionalJsonBody(req): OptionalJsonBody<CreateSnapshotRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let s = detached(held, async move {
        engine
            .snapshot_as(&who, &vm_id, req.snapshot_id, req.memory)
            .await
    })
    .await?;
    let target = AuditTarget::snapshot(&s.snapshot_id);
    Ok((StatusCode::CREATED, axum::Extension(target), Json(s)))
}

#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots",
    responses((status = 200, description = "Every complete snapshot", body = SnapshotList)))]
pub(crate) async fn list(
    State(engine): State<AppState>,
    Caller(who): Caller,
) -> Json<SnapshotList> {
    Json(SnapshotList {
        snapshots: engine.snapshots_as(&who),
    })
}

#[utoipa::path(get, path = "/v1/snapshots/{snapshot_id}", tag = "snapshots",
    params(("snapshot_id" = String, Path, description = "The snapshot's id")),
    responses(
        (status = 200, description = "The snapshot", body = SnapshotInfo),
        (status = 404, description = "No such snapshot", body = ErrorBody),
    ))]
pub(crate) async fn show(
    State(engine): State<AppState>,
    Path(snapshot_id): Path<String>,
) -> Result<Json<SnapshotInfo>, ApiError> {
    Ok(Json(engine.snapshot_info(&snapshot_id)?))
}

#[utoipa::path(post, path = "/v1/snapshots/{snapshot_id}/persist", tag = "snapshots",
    params(("snapshot_id" = String, Path, description = "The snapshot's id")),
    request_body(content = PersistSnapshotRequest, description = "Optional"),
    responses(
        (status = 200, description = "Durable (also when it already was)", body = SnapshotInfo),
        (status = 404, description = "No such snapshot", body = ErrorBody),
        (status = 422, description = "The tmpfs copy is corrupt", body = ErrorBody),
        (status = 503, description = "The durable tier is missing or read-only", body = ErrorBody),
        (status = 507, description = "The durable tier is full", body = ErrorBody),
    ))]
pub(crate) async fn persist(
    State(engine): State<AppState>,
    held: Held,
    Path(snapshot_id): Path<String>,
    OptionalJsonBody(req): OptionalJsonBody<PersistSnapshotRequest>,
) -> Result<Json<SnapshotInfo>, ApiError> {
    let s = detached(held, async move {
        engine.persist_snapshot(&snapshot_id, req.keep_tmpfs).await
    })
    .await?;
    Ok(Json(s))
}

#[utoipa::path(delete, path = "/v1/snapshots/{snapshot_id}", tag = "snapshots",
    params(("snapshot_id" = String, Path, description = "The snapshot's id")),
    responses(
        (status = 204, description = "Removed from every tier"),
        (status = 404, description = "No such snapshot", body = ErrorBody),
        (status = 409, description = "A VM is being created from it", body = ErrorBody),
    ))]
pub(crate) async fn delete(
    State(engine): State<AppState>,
    held: Held,
    Path(snapshot_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    detached(
        held,
        async move { engine.delete_snapshot(&snapshot_id).await },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
