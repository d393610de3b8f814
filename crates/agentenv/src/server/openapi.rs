//! The OpenAPI document, generated from the handlers and the wire types.
//! `docs/openapi.json` is this document; a test fails when they drift.

use agentenv_api as api;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa::OpenApi;

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "agentenv",
        description = "Disposable microVMs behind a JSON API."
    ),
    paths(
        super::health,
        super::vm::create,
        super::vm::list,
        super::vm::show,
        super::vm::pause,
        super::vm::resume,
        super::vm::shutdown,
        super::vm::delete,
        super::snapshots::create,
        super::snapshots::list,
        super::snapshots::show,
        super::snapshots::persist,
        super::snapshots::delete,
        super::agent::exec,
        super::agent::put_file,
        super::agent::get_file,
    ),
    components(schemas(
        api::CreateVmRequest,
        api::DiskSpec,
        api::NetworkSpec,
        api::VmInfo,
        api::VmList,
        api::DiskInfo,
        api::ExitInfo,
        api::VmState,
        api::BackendKind,
        api::ErrorBody,
        api::Health,
        api::ShareSpec,
        api::ShareInfo,
        api::CreateSnapshotRequest,
        api::PersistSnapshotRequest,
        api::SnapshotInfo,
        api::SnapshotList,
        api::SnapshotTier,
        api::SnapshotStatus,
        api::AgentInfo,
        api::ExecRequest,
        api::ExecResult,
        api::ExecEvent,
        api::FileWritten,
    ))
)]
pub struct ApiDoc;

/// The document as pretty JSON, as checked in.
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.to_pretty_json().expect("the document serialises") + "\n"
}

pub(crate) async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], document())
}
