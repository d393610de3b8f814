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
        api::EgressInfo,
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
    add_auth(&mut doc);
    doc.to_pretty_json().expect("the document serialises") + "\n"
}

/// The answers of `limits.rs`, the same on every route they apply to: 429 on
/// every operation (every method but GET), 408 on those that read a body.
fn add_limit_responses(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let error = || {
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("ErrorBody")))
            .build()
    };
    let too_many = error_with_header(
        "Too many operations in flight (`max_inflight_ops`); retry after `Retry-After` seconds",
        "Retry-After",
        utoipa::openapi::Type::Integer,
        "Seconds to wait before retrying (1)",
    );
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

/// An `ErrorBody` answer with one documented header.
fn error_with_header(
    description: &str,
    header: &str,
    ty: utoipa::openapi::Type,
    header_description: &str,
) -> utoipa::openapi::Response {
    use utoipa::openapi::{ContentBuilder, HeaderBuilder, Ref, ResponseBuilder};
    ResponseBuilder::new()
        .description(description)
        .header(
            header,
            HeaderBuilder::new()
                .schema(
                    utoipa::openapi::ObjectBuilder::new()
                        .schema_type(utoipa::openapi::schema::SchemaType::Type(ty)),
                )
                .description(Some(header_description))
                .build(),
        )
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

/// The answers of `auth.rs`: every route but `GET /v1/health` needs a bearer
/// token (security scheme `bearer`) and answers 401 without a valid one.
fn add_auth(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
    );
    let unauthorized = error_with_header(
        "No valid credential: the `Authorization: Bearer TOKEN` header is missing, malformed or names an unknown token",
        "WWW-Authenticate",
        utoipa::openapi::Type::String,
        "`Bearer realm=\"agentenv\"`",
    );
    let bearer = vec![SecurityRequirement::new("bearer", Vec::<String>::new())];
    for (path, item) in doc.paths.paths.iter_mut() {
        for op in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
            if path == "/v1/health" {
                continue;
            }
            op.security = Some(bearer.clone());
            if let Some(utoipa::openapi::RefOr::T(r)) = op.responses.responses.get_mut("404") {
                r.description
                    .push_str("; a `user` token gets the same answer for another owner's");
            }
            op.responses
                .responses
                .entry("401".into())
                .or_insert_with(|| unauthorized.clone().into());
        }
    }
}

pub(crate) async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], document())
}
