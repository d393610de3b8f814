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
        super::vm::fork,
        super::vm::reset,
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
        api::VmLimitsInfo,
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
        api::SnapshotKind,
        api::FullSnapshotInfo,
        api::RestoreSpec,
        api::ForkRequest,
        api::ForkResponse,
        api::ResetRequest,
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
    add_limit_responses(&mut doc);
    doc.to_pretty_json().expect("the document serialises") + "\n"
}

/// The answers of `limits.rs`, the same on every route they apply to: 429 on
/// every operation (every method but GET), 408 on those that read a body.
fn add_limit_responses(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, HeaderBuilder, Ref, ResponseBuilder};
    let error = || {
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("ErrorBody")))
            .build()
    };
    let too_many = ResponseBuilder::new()
        .description(
            "Too many operations in flight (`max_inflight_ops`); retry after `Retry-After` seconds",
        )
        .header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(utoipa::openapi::ObjectBuilder::new().schema_type(
                    utoipa::openapi::schema::SchemaType::Type(utoipa::openapi::Type::Integer),
                ))
                .description(Some("Seconds to wait before retrying (1)"))
                .build(),
        )
        .content("application/json", error())
        .build();
    let slow = ResponseBuilder::new()
        .description("The request body did not arrive within `body_timeout_ms`")
        .content("application/json", error())
        .build();
    for item in doc.paths.paths.values_mut() {
        for op in [&mut item.post, &mut item.put, &mut item.delete]
            .into_iter()
            .flatten()
        {
            let responses = &mut op.responses.responses;
            if op.request_body.is_some() {
                responses
                    .entry("408".into())
                    .or_insert_with(|| slow.clone().into());
            }
            responses
                .entry("429".into())
                .or_insert_with(|| too_many.clone().into());
        }
    }
}

pub(crate) async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], document())
}
