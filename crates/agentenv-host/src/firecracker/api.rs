//! A small HTTP/1.1 client for Firecracker's API on its Unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentenv_core::backend::VmmError;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Serialize;

use super::models::ApiError;

/// One keep-alive connection to a Firecracker API socket, re-opened when it breaks.
pub struct FcClient {
    socket: PathBuf,
    timeout: Duration,
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
    /// Keep the connection between requests (during configuration bursts);
    /// otherwise each request closes it, so an idle VM holds no connection.
    keep_alive: std::sync::atomic::AtomicBool,
}

impl FcClient {
    /// A client for `socket`; each request may take at most `timeout`.
    pub fn new(socket: &Path, timeout: Duration) -> FcClient {
        FcClient {
            socket: socket.to_path_buf(),
            timeout,
            conn: tokio::sync::Mutex::new(None),
            keep_alive: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Whether to keep the connection open between requests; turning it off
    /// closes the current one.
    pub async fn set_keep_alive(&self, on: bool) {
        self.keep_alive
            .store(on, std::sync::atomic::Ordering::Relaxed);
        if !on {
            *self.conn.lock().await = None;
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.socket.display()))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("http handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Opens the connection, retrying while the socket exists but does not accept
    /// yet (bound, not listening), until `timeout`.
    pub async fn connect_within(&self, timeout: Duration) -> Result<(), VmmError> {
        let start = std::time::Instant::now();
        loop {
            match self.connect().await {
                Ok(sender) => {
                    *self.conn.lock().await = Some(sender);
                    return Ok(());
                }
                Err(message) if start.elapsed() >= timeout => {
                    return Err(VmmError::Transport {
                        request: "connect".into(),
                        message,
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    /// `PUT path` with `body`.
    pub async fn put<T: Serialize>(&self, path: &str, body: &T) -> Result<(), VmmError> {
        self.request(Method::PUT, path, Some(to_bytes(body)))
            .await
            .map(|_| ())
    }

    /// Sends one request. Success is any 2xx; its body (maybe empty) is returned.
    /// A 4xx/5xx becomes [`VmmError::Refused`] with Firecracker's `fault_message`.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Bytes, VmmError> {
        self.request_within(method, path, body, self.timeout).await
    }

    /// [`FcClient::request`] that may take `timeout` instead of the
    /// client's own (for requests whose work grows with the guest, such as
    /// writing its memory).
    pub async fn request_within(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, VmmError> {
        let what = format!("{method} {path}");
        let fut = self.request_inner(method, path, body, &what);
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => {
                // The connection may be mid-request; never reuse it.
                if let Ok(mut c) = self.conn.try_lock() {
                    *c = None;
                }
                Err(VmmError::Timeout {
                    request: what,
                    timeout_ms: timeout.as_millis() as u64,
                })
            }
        }
    }

    async fn request_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        what: &str,
    ) -> Result<Bytes, VmmError> {
        let transport = |message: String| VmmError::Transport {
            request: what.to_string(),
            message,
        };
        let has_body = body.is_some();
        let bytes = body.unwrap_or_default();
        let mut guard = self.conn.lock().await;
        let mut attempt = 0;
        let resp = loop {
            attempt += 1;
            let sender = match guard.as_mut() {
                Some(s) if !s.is_closed() => s,
                _ => guard.insert(self.connect().await.map_err(transport)?),
            };
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header("Host", "localhost")
                .header("Accept", "application/json");
            if has_body {
                req = req.header("Content-Type", "application/json");
            }
            let req = req
                .body(Full::new(bytes.clone()))
                .map_err(|e| transport(e.to_string()))?;
            if sender.ready().await.is_err() {
                *guard = None;
                if attempt < 2 {
                    continue;
                }
                return Err(transport("connection closed".into()));
            }
            match sender.send_request(req).await {
                Ok(r) => break r,
                // A kept-alive connection the server closed: retry once on a new one.
                Err(e) if attempt < 2 && e.is_canceled() => {
                    *guard = None;
                }
                Err(e) => {
                    *guard = None;
                    return Err(transport(e.to_string()));
                }
            }
        };
        if !self.keep_alive.load(std::sync::atomic::Ordering::Relaxed) {
            *guard = None;
        }
        drop(guard);
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(e.to_string()))?
            .to_bytes();
        if status.is_success() {
            return Ok(body);
        }
        let message = serde_json::from_slice::<ApiError>(&body)
            .map(|e| e.fault_message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        Err(VmmError::Refused {
            request: what.to_string(),
            status: status.as_u16(),
            message: if message.is_empty() {
                status.canonical_reason().unwrap_or("error").to_string()
            } else {
                message
            },
        })
    }
}

pub(super) fn to_bytes<T: Serialize>(body: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(body).expect("api objects serialise"))
}
