//! The daemon's own limits on requests: a cap on mutating requests in flight
//! (`max_inflight_ops`, 429 beyond it) and the body read timeouts
//! (`body_timeout_ms`, 408). Statuses are decided in `error.rs`.
//!
//! The header read timeout (`header_timeout_ms`) is the HTTP server's, set in
//! `server::run`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use agentenv_core::config::Config;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use super::error::{ApiError, LimitError};

/// The limits one daemon applies, shared by every connection.
#[derive(Clone)]
pub struct Limits {
    inflight: Arc<Semaphore>,
    max_inflight: u32,
    body_timeout: Duration,
}

/// How long a request's body may take, put in the request's extensions for the
/// extractors (`json.rs`, the file upload).
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub Duration);

impl Default for BodyTimeout {
    fn default() -> Self {
        BodyTimeout(Duration::from_millis(Config::default().body_timeout_ms))
    }
}

impl BodyTimeout {
    /// The timeout in milliseconds, for messages.
    pub fn ms(&self) -> u64 {
        self.0.as_millis() as u64
    }
}

impl Limits {
    /// The limits a config asks for.
    pub fn from_config(cfg: &Config) -> Limits {
        Limits {
            inflight: Arc::new(Semaphore::new(cfg.max_inflight_ops as usize)),
            max_inflight: cfg.max_inflight_ops,
            body_timeout: Duration::from_millis(cfg.body_timeout_ms),
        }
    }

    /// Mutating requests being served now.
    pub fn in_flight(&self) -> usize {
        self.max_inflight as usize - self.inflight.available_permits()
    }

    /// Waits up to `timeout` until no operation is in flight (their tasks
    /// hold permits until they end); false when some still are.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let all = self.inflight.acquire_many(self.max_inflight);
        matches!(tokio::time::timeout(timeout, all).await, Ok(Ok(_)))
    }
}

/// Only reads are free; everything else is an operation.
fn is_operation(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The middleware: every request's body gets the idle timeout, every operation
/// holds a permit from the request's arrival until its response body ends (a
/// streaming exec counts until its last line), and an operation that finds no
/// permit is answered 429 at once.
pub async fn limit(State(limits): State<Limits>, req: Request, next: Next) -> Response {
    let timeout = limits.body_timeout;
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(BodyTimeout(timeout));
    let req = Request::from_parts(parts, Body::new(IdleTimeoutBody::new(body, timeout)));
    if !is_operation(req.method()) {
        return next.run(req).await;
    }
    let Ok(permit) = limits.inflight.clone().try_acquire_owned() else {
        return ApiError::from(LimitError::TooManyOps {
            limit: limits.max_inflight,
        })
        .into_response();
    };
    let permit = Permit {
        _shared: Arc::new(permit),
    };
    let mut req = req;
    req.extensions_mut().insert(permit.clone());
    let resp = next.run(req).await;
    resp.map(|b| {
        Body::new(PermitBody {
            inner: b,
            _permit: permit,
        })
    })
}

/// An operation's in-flight permit, shared by the request, its response body
/// and the engine task it started (see [`Held`]): given back when the last goes.
#[derive(Clone)]
struct Permit {
    _shared: Arc<OwnedSemaphorePermit>,
}

/// The in-flight permit of the request, for a handler to move into the task
/// that runs its engine operation (`server::detached`): an operation whose
/// client went away still counts until it has finished.
pub struct Held {
    _permit: Option<Permit>,
}

impl<S: Send + Sync> FromRequestParts<S> for Held {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Held {
            _permit: parts.extensions.get::<Permit>().cloned(),
        })
    }
}

/// A response body that holds an in-flight permit until it ends or is dropped.
struct PermitBody {
    inner: Body,
    _permit: Permit,
}

impl http_body::Body for PermitBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The error a stalled request body ends with; found again with
/// [`is_idle_timeout`].
#[derive(Debug)]
struct BodyIdle;

impl std::fmt::Display for BodyIdle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body stalled")
    }
}

impl std::error::Error for BodyIdle {}

/// True when a body error is the idle timeout of [`IdleTimeoutBody`].
pub fn is_idle_timeout(e: &axum::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyIdle>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A request body that fails when the server waits longer than `timeout` for
/// the next piece. Only time spent waiting on the client counts: the clock
/// starts when the handler asks for data, not while it works on the last piece.
struct IdleTimeoutBody {
    inner: Body,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    waiting: bool,
}

impl IdleTimeoutBody {
    fn new(inner: Body, timeout: Duration) -> IdleTimeoutBody {
        IdleTimeoutBody {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            waiting: false,
        }
    }
}

impl http_body::Body for IdleTimeoutBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame);
        }
        if !this.waiting {
            this.waiting = true;
            let deadline = Instant::now() + this.timeout;
            this.sleep.as_mut().reset(deadline);
        }
        match this.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyIdle)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // A request body fed by a channel, as a slow client would send it.
    use crate::server::agent::ChannelBody;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    #[tokio::test]
    async fn an_idle_body_times_out_but_a_slow_consumer_does_not() {
        let (tx, rx) = mpsc::channel(1);
        let mut body = IdleTimeoutBody::new(Body::new(ChannelBody(rx)), Duration::from_millis(100));
        tx.send(Ok(Bytes::from_static(b"a"))).await.unwrap();
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "a");
        // The consumer is busy for longer than the timeout: not the client's fault.
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(Ok(Bytes::from_static(b"b"))).await.unwrap();
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "b");
        // The client sends nothing for 100 ms: the body fails, recognisably.
        let start = Instant::now();
        let e = body.frame().await.unwrap().unwrap_err();
        assert!(is_idle_timeout(&e), "{e}");
        assert!(start.elapsed() >= Duration::from_millis(100));
        // Other body errors are not taken for the timeout.
        let other = axum::Error::new(std::io::Error::other("reset"));
        assert!(!is_idle_timeout(&other));
        drop(tx);
    }

    #[test]
    fn only_reads_are_free() {
        for (m, op) in [
            (Method::GET, false),
            (Method::HEAD, false),
            (Method::POST, true),
            (Method::PUT, true),
            (Method::DELETE, true),
            (Method::PATCH, true),
        ] {
            assert_eq!(is_operation(&m), op, "{m}");
        }
    }
}
