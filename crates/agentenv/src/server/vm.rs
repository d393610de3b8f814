//! `/v1/vm` routes.

use agentenv_api::{CreateVmRequest, ErrorBody, VmInfo};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;

use super::error::ApiError;
use super::json::JsonBody;
use super::limits::Held;
use super::{detached, AppState};

#[utoipa::path(post, path = "/v1/vm", tag = "vm", request_body = CreateVmRequest,
    responses(
        (status = 201, description = "Created and running", body = VmInfo),
        (status = 400, description = "A field is malformed (named in `field`)", body = ErrorBody),
        (status = 403, description = "Not allowed by config (direct disks)", body = ErrorBody),
        (status = 404, description = "Unknown rootfs, kernel, initrd or snapshot", body = ErrorBody),
        (status = 409, description = "The vm_id is taken", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 502, description = "The VMM failed to start or refused its configuration", body = ErrorBody),
        (status = 507, description = "Not enough host memory", body = ErrorBody),
    ))]
pub(crate) async fn create(
    State(engine): State<AppState>,
    held: Held,
    JsonBody(req): JsonBody<CreateVmRequest>,
) -> Result<(StatusCode, Json<VmInfo>), ApiError> {
    let vm = detached(held, async move { engine.create(req).await }).await?;
    Ok((StatusCode::CREATED, Json(vm)))
}

#[utoipa::path(get, path = "/v1/vm", tag = "vm",
    responses((status = 200, description = "Every VM", body = agentenv_api::VmList)))]
pub(crate) async fn list(State(engine): State<AppState>) -> impl IntoResponse {
    // Each VM's JSON is rendered when it changes; listing only concatenates.
    (
        [(header::CONTENT_TYPE, "application/json")],
        engine.list_json(),
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
