//! The HTTP API: routes that translate HTTP to engine calls and back. Handlers
//! parse, call the engine, map the result — no state checks, no OS calls.

mod agent;
pub mod auth;
pub mod error;
pub mod json;
pub mod limits;
pub mod openapi;
mod snapshots;
mod vm;

use std::future::Future;
use std::sync::Arc;

use agentenv_api::Health;
use agentenv_core::Engine;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};

use error::ApiError;

/// Shared state of every handler.
pub type AppState = Arc<Engine>;

/// The whole API, with the request limits of the engine's config, callers
/// authenticated by `auth`.
pub fn router(engine: Arc<Engine>, auth: auth::Auth) -> Router {
    let limits = limits::Limits::from_config(engine.config());
    router_with(engine, limits, auth)
}

/// The whole API, counting its operations in `limits`. Layers, outermost
/// first: authentication (and the audit log: a request without a valid
/// credential never takes an in-flight slot), the in-flight limit, JSON
/// error bodies; then routing, and on every route the ownership check.
fn router_with(engine: Arc<Engine>, limits: limits::Limits, auth: auth::Auth) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi::serve))
        .route("/v1/vm", post(vm::create).get(vm::list))
        .route("/v1/vm/{vm_id}", get(vm::show).delete(vm::delete))
        .route("/v1/vm/{vm_id}/pause", post(vm::pause))
        .route("/v1/vm/{vm_id}/resume", post(vm::resume))
        .route("/v1/vm/{vm_id}/shutdown", post(vm::shutdown))
        .route("/v1/vm/{vm_id}/snapshot", post(snapshots::create))
        .route("/v1/vm/{vm_id}/fork", post(vm::fork))
        .route("/v1/vm/{vm_id}/reset", post(vm::reset))
        .route("/v1/vm/{vm_id}/exec", post(agent::exec))
        .route(
            "/v1/vm/{vm_id}/files",
            get(agent::get_file).put(agent::put_file),
        )
        .route("/v1/snapshots", get(snapshots::list))
        .route(
            "/v1/snapshots/{snapshot_id}",
            get(snapshots::show).delete(snapshots::delete),
        )
        .route(
            "/v1/snapshots/{snapshot_id}/persist",
            post(snapshots::persist),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            engine.clone(),
            auth::owns,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(engine)
        .layer(Extension(limits.clone()))
        .layer(axum::middleware::map_response(error::json_rejections))
        .layer(axum::middleware::from_fn_with_state(limits, limits::limit))
        .layer(axum::middleware::from_fn_with_state(
            auth,
            auth::authenticate,
        ))
}

/// How long a clean stop waits for operations still in flight.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves the API on an already-bound listener until `shutdown` resolves, then
/// waits for the operations in flight and stops the VMs as `on_shutdown` says.
///
/// HTTP/1.1 with a header read timeout (`header_timeout_ms`): a client that
/// does not send its request headers in time, or leaves a kept-alive
/// connection idle that long, is disconnected. On shutdown, no new connection
/// is accepted, idle ones are closed, requests in progress finish first, and
/// so do operations whose clients went away (up to [`SHUTDOWN_GRACE`]).
///
/// Callers are authenticated as the engine's config says (`[auth]`); a
/// tokens file that cannot be used is an error before anything is served.
pub async fn run(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let auth = auth::Auth::from_config(engine.config()).map_err(std::io::Error::other)?;
    run_with(listener, engine, auth, shutdown).await
}

/// [`run`] with the authentication given (the daemon keeps a handle to
/// reload its tokens on SIGHUP).
pub async fn run_with(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    auth: auth::Auth,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let limits = limits::Limits::from_config(engine.config());
    let app = router_with(engine.clone(), limits.clone(), auth);
    let header_timeout = std::time::Duration::from_millis(engine.config().header_timeout_ms);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let client = auth::ClientAddr(peer.to_string());
        let service = TowerToHyperService::new(app.clone().map_request(
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(client.clone());
                req
            },
        ));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    // Operations whose clients went away still run in their own tasks: they
    // finish (or roll back) before the runtime goes, not cut at an arbitrary
    // step. One still running after the grace period is cut as a crash would
    // cut it, and the next start finishes it.
    if !limits.drain(SHUTDOWN_GRACE).await {
        tracing::warn!(
            "{} operation(s) still running after {}s; stopping anyway (the next start finishes them)",
            limits.in_flight(),
            SHUTDOWN_GRACE.as_secs()
        );
    }
    engine.shutdown_all().await;
    Ok(())
}

#[utoipa::path(get, path = "/v1/health", tag = "daemon",
    responses((status = 200, description = "The daemon answers", body = Health)))]
pub(crate) async fn health(
    State(engine): State<AppState>,
    Extension(limits): Extension<limits::Limits>,
) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        backend: engine.backend(),
        ops_in_flight: u32::try_from(limits.in_flight()).unwrap_or(u32::MAX),
    })
}

/// Runs an engine operation in its own task, so that a client that goes away
/// (or a request timeout) cannot cancel it half-way: the operation finishes or
/// rolls back on its own, whatever happens to the connection. The task holds
/// the request's in-flight permit (`held`), so it counts against
/// `max_inflight_ops` until it ends, with or without its client.
pub(crate) async fn detached<T: Send + 'static>(
    held: limits::Held,
    op: impl Future<Output = Result<T, agentenv_core::EngineError>> + Send + 'static,
) -> Result<T, ApiError> {
    let task = async move {
        let out = op.await;
        drop(held);
        out
    };
    match tokio::spawn(task).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("operation failed: {e}"),
        )),
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {}", uri.path()),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}
