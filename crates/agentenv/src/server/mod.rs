//! The HTTP API: routes that translate HTTP to engine calls and back. Handlers
//! parse, call the engine, map the result — no state checks, no OS calls.

mod agent;
pub mod auth;
pub mod e2b;
pub mod error;
pub mod guard;
pub mod json;
pub mod limits;
pub mod listen;
pub mod openapi;
pub mod principal;
mod snapshots;
pub mod tls;
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
/// first: the cross-site refusals (Host allow-list, Content-Type), then
/// authentication (and the audit log: a request without a valid credential
/// never takes an in-flight slot), the in-flight limit, JSON error bodies;
/// then routing, and on every route the ownership check.
fn router_with(engine: Arc<Engine>, limits: limits::Limits, auth: auth::Auth) -> Router {
    let allowed_hosts = engine.config().http.allowed_hosts.clone();
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
        // Outermost: cross-site refusals cost nothing and take no slot.
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(guard::AllowedHosts::new(&allowed_hosts)),
            guard::check,
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
    run_listeners(vec![listen::Listener::tcp(listener)], engine, shutdown).await
}

/// Like [`run`], on several listeners at once (TCP, TLS, Unix sockets; see
/// [`listen::Listener::bind`]), callers authenticated as the engine's config
/// says (`[auth]`).
pub async fn run_listeners(
    listeners: Vec<listen::Listener>,
    engine: Arc<Engine>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let auth = auth::Auth::from_config(engine.config()).map_err(std::io::Error::other)?;
    run_listeners_with(listeners, engine, auth, shutdown).await
}

/// [`run_listeners`] with the authentication given (the daemon keeps a
/// handle to reload its tokens on SIGHUP). Each request carries its
/// [`listen::Peer`] and [`auth::ClientAddr`], and, for a Unix peer or an mTLS
/// client, its [`principal::Principal`]. A TLS handshake must end within the
/// header read timeout. A Unix listener's socket file is removed when this
/// returns.
pub async fn run_listeners_with(
    listeners: Vec<listen::Listener>,
    engine: Arc<Engine>,
    auth: auth::Auth,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_surfaces(listeners, Vec::new(), engine, auth, shutdown).await
}

/// [`run_listeners_with`], also serving the E2B-compatible API
/// ([`e2b`]) on `e2b_listeners` (none: no E2B API). Both surfaces share
/// the engine, the tokens and the in-flight limit.
pub async fn run_surfaces(
    listeners: Vec<listen::Listener>,
    e2b_listeners: Vec<listen::Listener>,
    engine: Arc<Engine>,
    auth: auth::Auth,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::server::graceful::GracefulShutdown;

    let limits = limits::Limits::from_config(engine.config());
    let native = router_with(engine.clone(), limits.clone(), auth.clone());
    let e2b_api = if e2b_listeners.is_empty() {
        None
    } else {
        Some(e2b::E2bApi::start(engine.clone(), auth, limits.clone()).await?)
    };
    // Which router serves each listener, by index.
    let mut apps = vec![native; listeners.len()];
    let mut listeners = listeners;
    if let Some(api) = &e2b_api {
        apps.extend(std::iter::repeat_n(api.router(), e2b_listeners.len()));
        listeners.extend(e2b_listeners);
    }
    let header_timeout = std::time::Duration::from_millis(engine.config().header_timeout_ms);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut turn = 0usize;
    loop {
        turn = turn.wrapping_add(1);
        let accepted = tokio::select! {
            accepted = accept_any(&listeners, turn) => accepted,
            () = &mut shutdown => break,
        };
        let accepted = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!("accepting a connection failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (index, accepted) = accepted;
        let conn = Connection {
            app: apps[index].clone(),
            header_timeout,
            watcher: graceful.watcher(),
        };
        tokio::spawn(conn.serve(accepted));
    }
    drop(listeners);
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
    if let Some(api) = e2b_api {
        api.stop().await;
    }
    engine.shutdown_all().await;
    Ok(())
}

/// A connection just accepted, with what is known of its peer.
enum Accepted {
    /// TCP, with the listener's TLS acceptor when it serves HTTPS.
    Tcp {
        stream: tokio::net::TcpStream,
        peer: listen::Peer,
        tls: Option<tls::TlsAcceptor>,
    },
    /// A Unix stream socket.
    Unix {
        stream: tokio::net::UnixStream,
        peer: listen::Peer,
        path: std::path::PathBuf,
    },
}

/// The next connection on any of `listeners`, with the listener's index,
/// asking them in turn from `turn` on (so that a busy one cannot starve the
/// others).
async fn accept_any(
    listeners: &[listen::Listener],
    turn: usize,
) -> std::io::Result<(usize, Accepted)> {
    use listen::{Listener, Peer, Transport};
    use std::task::Poll;
    let n = listeners.len().max(1);
    std::future::poll_fn(|cx| {
        for (index, l) in listeners
            .iter()
            .enumerate()
            .cycle()
            .skip(turn % n)
            .take(listeners.len())
        {
            match l {
                Listener::Tcp { listener, tls } => {
                    if let Poll::Ready(r) = listener.poll_accept(cx) {
                        return Poll::Ready(r.map(|(stream, addr)| {
                            (
                                index,
                                Accepted::Tcp {
                                    stream,
                                    peer: Peer {
                                        transport: if tls.is_some() {
                                            Transport::Tls
                                        } else {
                                            Transport::Tcp
                                        },
                                        addr: Some(addr),
                                        local: listener.local_addr().ok(),
                                        uid: None,
                                    },
                                    tls: tls.clone(),
                                },
                            )
                        }));
                    }
                }
                Listener::Unix { listener, file } => {
                    if let Poll::Ready(r) = listener.poll_accept(cx) {
                        return Poll::Ready(r.map(|(stream, _)| {
                            let uid = stream.peer_cred().ok().map(|c| c.uid());
                            (
                                index,
                                Accepted::Unix {
                                    stream,
                                    peer: Peer {
                                        transport: Transport::Unix,
                                        addr: None,
                                        local: None,
                                        uid,
                                    },
                                    path: file.path().to_path_buf(),
                                },
                            )
                        }));
                    }
                }
            }
        }
        Poll::Pending
    })
    .await
}

/// What serving one connection needs.
struct Connection {
    app: Router,
    header_timeout: std::time::Duration,
    watcher: hyper_util::server::graceful::Watcher,
}

impl Connection {
    /// Serves an accepted connection: the TLS handshake first on an HTTPS
    /// listener, then HTTP/1.1 until the client or a clean stop closes it.
    async fn serve(self, accepted: Accepted) {
        match accepted {
            Accepted::Tcp {
                stream,
                peer,
                tls: None,
            } => {
                let _ = stream.set_nodelay(true);
                self.http(stream, peer, None).await;
            }
            Accepted::Tcp {
                stream,
                peer,
                tls: Some(tls),
            } => {
                let _ = stream.set_nodelay(true);
                let who = peer.describe();
                match tokio::time::timeout(self.header_timeout, tls.accept(stream)).await {
                    Ok(Ok((stream, principal))) => {
                        if let Some(p) = &principal {
                            tracing::info!("TLS client {who}: certificate CN {:?}", p.name);
                        }
                        self.http(stream, peer, principal).await;
                    }
                    Ok(Err(e)) => tracing::info!("TLS handshake with {who} failed: {e}"),
                    Err(_) => tracing::info!("TLS handshake with {who} timed out"),
                }
            }
            Accepted::Unix { stream, peer, path } => {
                let Some(uid) = peer.uid else {
                    tracing::warn!(
                        "connection on unix:{} refused: its peer's uid is unknown (SO_PEERCRED failed)",
                        path.display()
                    );
                    return;
                };
                tracing::info!("connection on unix:{} from uid {uid}", path.display());
                self.http(stream, peer, Some(listen::unix_principal(uid)))
                    .await;
            }
        }
    }

    /// HTTP/1.1 over `io`, every request tagged with `peer` and `principal`.
    async fn http<I>(self, io: I, peer: listen::Peer, principal: Option<principal::Principal>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        use hyper_util::rt::{TokioIo, TokioTimer};
        use hyper_util::service::TowerToHyperService;
        use tower::ServiceExt;

        let app =
            self.app
                .map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    req.extensions_mut()
                        .insert(auth::ClientAddr(peer.describe()));
                    if let Some(p) = &principal {
                        req.extensions_mut().insert(p.clone());
                    }
                    req
                });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
        if let Err(e) = self.watcher.watch(conn).await {
            tracing::debug!("connection ended: {e}");
        }
    }
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
