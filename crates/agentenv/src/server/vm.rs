//! `/v1/vm` routes.

use agentenv_api::{CreateVmRequest, ErrorBody, ForkRequest, ForkResponse, ResetRequest, VmInfo};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;

use super::auth::{AuditTarget, Caller};
use super::error::ApiError;
use super::json::JsonBody;
use super::limits::Held;
use super::{detached, AppState};

#[utoipa::path(post, path = "/v1/vm", tag = "vm", request_body = CreateVmRequest,
    responses(
        (status = 201, description = "Created and running (booted, or restored from a full snapshot)", body = VmInfo),
        (status = 400, description = "A field is malformed (named in `field`), or given with `restore`", body = ErrorBody),
        (status = 403, description = "Not allowed by config (direct disks)", body = ErrorBody),
        (status = 404, description = "Unknown rootfs, kernel, initrd or snapshot", body = ErrorBody),
        (status = 409, description = "The vm_id is taken; or `restore` names a disk snapshot or one from another backend, VMM version, kernel or base image (named in the message)", body = ErrorBody),
        (status = 422, description = "The snapshot is corrupt", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 502, description = "The VMM failed to start or refused its configuration", body = ErrorBody),
        (status = 507, description = "Not enough host memory", body = ErrorBody),
    ))]
pub(crate) async fn create(
    State(engine): State<AppState>,
    Caller(who): Caller,
    held: Held,
    JsonBody(req): JsonBody<CreateVmRequest>,
) -> impl IntoResponse {
    let target = AuditTarget::vm(&req.vm_id);
    let vm = detached(held, async move { engine.create_as(&who, req).await }).await;
    let mut resp = vm.map(|vm| (StatusCode::CREATED, Json(vm))).into_response();
    resp.extensions_mut().insert(target);
    resp
}

#[utoipa::path(get, path = "/v1/vm", tag = "vm",
    responses((status = 200, description = "Every VM", body = agentenv_api::VmList)))]
pub(crate) async fn list(State(engine): State<AppState>, Caller(who): Caller) -> impl IntoResponse {
    // Each VM's JSON is rendered when it changes; listing only concatenates.
    (
        [(header::CONTENT_TYPE, "application/json")],
        engine.list_json_as(&who),
    )
}

#[utoipa::path(get, path = "/v1/vm/{vm_id}", tag = "vm",
    params(("vm_id" = String, Path, description = "The VM's id")),
    responses(
        (status = 200, description = "The VM", body = VmInfo),
        (status = 400, description = "Malformed vm_id", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
    ))]
pub(crate) async fn show(
    State(engine): State<AppState>,
    Path(vm_id): Path<String>,
) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(engine.get(&vm_id)?))
}

#[utoipa::path(post, path = "/v1/vm/{vm_id}/pause", tag = "vm",
    params(("vm_id" = String, Path, description = "The VM's id")),
    responses(
        (status = 200, description = "Paused", body = VmInfo),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "Not running (current state in `state`)", body = ErrorBody),
        (status = 502, description = "The VMM refused", body = ErrorBody),
        (status = 504, description = "The VMM did not answer in time", body = ErrorBody),
    ))]
pub(crate) async fn pause(
    State(engine): State<AppState>,
    held: Held,
    Path(vm_id): Path<String>,
) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(
        detached(held, async move { engine.pause(&vm_id).await }).await?,
    ))
}

#[utoipa::path(post, path = "/v1/vm/{vm_id}/resume", tag = "vm",
    params(("vm_id" = String, Path, description = "The VM's id")),
    responses(
        (status = 200, description = "Running again", body = VmInfo),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "Not paused (current state in `state`)", body = ErrorBody),
        (status = 502, description = "The VMM refused", body = ErrorBody),
        (status = 504, description = "The VMM did not answer in time", body = ErrorBody),
    ))]
pub(crate) async fn resume(
    State(engine): State<AppState>,
    held: Held,
    Path(vm_id): Path<String>,
) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(
        detached(held, async move { engine.resume(&vm_id).await }).await?,
    ))
}

#[utoipa::path(post, path = "/v1/vm/{vm_id}/shutdown", tag = "vm",
    params(("vm_id" = String, Path, description = "The VM's id")),
    responses(
        (status = 200, description = "Stopped; the record stays", body = VmInfo),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "Already stopped or busy (current state in `state`)", body = ErrorBody),
    ))]
pub(crate) async fn shutdown(
    State(engine): State<AppState>,
    held: Held,
    Path(vm_id): Path<String>,
) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(
        detached(held, async move { engine.shutdown(&vm_id).await }).await?,
    ))
}

#[utoipa::path(delete, path = "/v1/vm/{vm_id}", tag = "vm",
    params(("vm_id" = String, Path, description = "The VM's id")),
    responses(
        (status = 204, description = "Stopped if needed and removed with its session directory"),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "Busy (current state in `state`)", body = ErrorBody),
    ))]
pub(crate) async fn delete(
    State(engine): State<AppState>,
    held: Held,
    Path(vm_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    detached(held, async move { engine.delete(&vm_id).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/vm/{vm_id}/fork", tag = "vm",
    params(("vm_id" = String, Path, description = "The VM's id")),
    request_body = ForkRequest,
    responses(
        (status = 201, description = "The clones, running; the source runs on after a short pause", body = ForkResponse),
        (status = 400, description = "`count` is 0 or above `max_fork`, or `vm_ids` does not fit it", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "A clone id is taken, or the VM cannot have a full snapshot", body = ErrorBody),
        (status = 507, description = "Not enough host memory or snapshot space", body = ErrorBody),
    ))]
pub(crate) async fn fork(
    State(engine): State<AppState>,
    Caller(who): Caller,
    held: Held,
    Path(vm_id): Path<String>,
    JsonBody(req): JsonBody<ForkRequest>,
) -> Result<(StatusCode, Json<ForkResponse>), ApiError> {
    let vms = detached(held, async move { engine.fork_as(&who, &vm_id, req).await }).await?;
    Ok((StatusCode::CREATED, Json(ForkResponse { vms })))
}

#[utoipa::path(post, path = "/v1/vm/{vm_id}/reset", tag = "vm",
    params(("vm_id" = String, Path, description = "The VM's id")),
    request_body = ResetRequest,
    responses(
        (status = 200, description = "Back to the snapshot, running, same id and address", body = VmInfo),
        (status = 404, description = "No such VM or snapshot", body = ErrorBody),
        (status = 409, description = "A disk-only snapshot, one that does not fit the VM, or the VM is busy", body = ErrorBody),
        (status = 422, description = "The snapshot is corrupt", body = ErrorBody),
    ))]
pub(crate) async fn reset(
    State(engine): State<AppState>,
    Caller(who): Caller,
    held: Held,
    Path(vm_id): Path<String>,
    JsonBody(req): JsonBody<ResetRequest>,
) -> Result<Json<VmInfo>, ApiError> {
    let vm = detached(held, async move {
        engine.reset_as(&who, &vm_id, &req.snapshot_id).await
    })
    .await?;
    Ok(Json(vm))
}
