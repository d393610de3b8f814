//! Guest agent routes: `/v1/vm/{vm_id}/exec` and `/v1/vm/{vm_id}/files`.
//!
//! Bodies stream both ways: an upload is passed to the agent frame by frame as it
//! arrives, a download and a streaming exec are sent as the agent produces them,
//! so neither side ever holds a whole file. A client that goes away drops the
//! request, which kills the command or aborts the transfer in the guest.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use agentenv_api::{base64, ErrorBody, ExecEvent, ExecRequest, ExecResult, FileWritten};
use agentenv_core::agent::{Download, ExecEvent as AgentEvent, Recycler};
use agentenv_core::EngineError;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::error::{ApiError, LimitError};
use super::json::JsonBody;
use super::limits::{is_idle_timeout, BodyTimeout};
use super::AppState;

/// A response body fed by a channel; an `Err` aborts the response mid-way.
pub(crate) struct ChannelBody(pub(crate) mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|r| r.map(http_body::Frame::data)))
    }
}

/// A download's response body: the connection takes the agent's chunks as it
/// can send them, and credit for more goes back to the agent as it does, so
/// a slow client holds back the guest, not memory here. An `Err` aborts the
/// response mid-way; dropping the body (the client went away) aborts the
/// transfer in the guest.
struct DownloadBody {
    /// `None` once the file has ended or failed.
    dl: Option<Download>,
    recycler: Recycler,
}

/// A chunk on its way out; its buffer goes back to the download once sent.
struct Chunk {
    buf: Vec<u8>,
    recycler: Recycler,
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.recycler.give(std::mem::take(&mut self.buf));
    }
}

impl http_body::Body for DownloadBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(dl) = this.dl.as_mut() else {
            return Poll::Ready(None);
        };
        Poll::Ready(match ready!(dl.poll_chunk(cx)) {
            Ok(Some(buf)) => Some(Ok(http_body::Frame::data(Bytes::from_owner(Chunk {
                buf,
                recycler: this.recycler.clone(),
            })))),
            Ok(None) => {
                this.dl = None;
                None
            }
            Err(e) => {
                this.dl = None;
                Some(Err(std::io::Error::other(e.to_string())))
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.dl.is_none()
    }
}

#[utoipa::path(post, path = "/v1/vm/{vm_id}/exec", tag = "agent", request_body = ExecRequest,
    params(("vm_id" = String, Path, description = "The VM's id")),
    responses(
        (status = 200, description = "The command ended (a non-zero exit is not an error). \
            With `stream: true`: `application/x-ndjson`, one ExecEvent per line", body = ExecResult),
        (status = 400, description = "A field is malformed (named in `field`)", body = ErrorBody),
        (status = 404, description = "No such VM, program or cwd (named in `field`)", body = ErrorBody),
        (status = 409, description = "The VM is not running (state in `state`)", body = ErrorBody),
        (status = 503, description = "The guest agent is not ready", body = ErrorBody),
        (status = 504, description = "The agent did not report the end in time", body = ErrorBody),
    ))]
pub(crate) async fn exec(
    State(engine): State<AppState>,
    Path(vm_id): Path<String>,
    JsonBody(req): JsonBody<ExecRequest>,
) -> Result<Response, ApiError> {
    if !req.stream {
        return Ok(Json(engine.exec(&vm_id, &req).await?).into_response());
    }
    let mut exec = engine.exec_start(&vm_id, &req).await?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let started = ExecEvent::Started { pid: exec.pid() };
    tokio::spawn(async move {
        let mut ev = started;
        loop {
            let last = matches!(ev, ExecEvent::Exit { .. } | ExecEvent::Error { .. });
            let mut line = serde_json::to_vec(&ev).expect("events serialise");
            line.push(b'\n');
            // The client went away: dropping `exec` kills the command.
            if tx.send(Ok(line.into())).await.is_err() || last {
                return;
            }
            ev = match exec.next().await {
                Ok(AgentEvent::Stdout(b)) => ExecEvent::Stdout {
                    data: base64::encode(&b),
                },
                Ok(AgentEvent::Stderr(b)) => ExecEvent::Stderr {
                    data: base64::encode(&b),
                },
                Ok(AgentEvent::Exit(st)) => ExecEvent::Exit {
                    exit_code: st.exit_code,
                    signal: st.signal,
                    timed_out: st.timed_out,
                    duration_ms: st.duration_ms,
                },
                Err(e) => ExecEvent::Error {
                    error: e.to_string(),
                },
            };
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::new(ChannelBody(rx)),
    )
        .into_response())
}

/// Query of the files routes.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct FileQuery {
    /// Absolute path in the guest.
    path: Option<String>,
    /// Upload only: permission bits in octal (default `0644`).
    mode: Option<String>,
    /// Upload only: create missing parent directories.
    make_parents: Option<bool>,
}

fn query(q: Result<Query<FileQuery>, QueryRejection>) -> Result<(FileQuery, String), ApiError> {
    let Query(q) = q.map_err(|e| {
        // The message names the parameter: `…: make_parents: provided string
        // was not true or false`, `duplicate field `path``.
        let text = e.body_text();
        let field = ["path", "mode", "make_parents"]
            .into_iter()
            .find(|f| text.contains(&format!(": {f}: ")) || text.contains(&format!("`{f}`")));
        ApiError::bad_field(field.map(String::from), format!("bad query string: {e}"))
    })?;
    let path = q.path.clone().ok_or_else(|| {
        ApiError::bad_field(
            Some("path".into()),
            "the query needs path=ABSOLUTE_GUEST_PATH",
        )
    })?;
    Ok((q, path))
}

#[utoipa::path(put, path = "/v1/vm/{vm_id}/files", tag = "agent",
    params(("vm_id" = String, Path, description = "The VM's id"), FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The file's bytes; any size (streamed)"),
    responses(
        (status = 200, description = "Written (replaced atomically)", body = FileWritten),
        (status = 400, description = "Bad path or mode (named in `field`)", body = ErrorBody),
        (status = 404, description = "No such VM, or the parent directory is missing", body = ErrorBody),
        (status = 408, description = "The upload sent nothing for `body_timeout_ms`", body = ErrorBody),
        (status = 409, description = "The VM is not running", body = ErrorBody),
        (status = 503, description = "The guest agent is not ready", body = ErrorBody),
    ))]
pub(crate) async fn put_file(
    State(engine): State<AppState>,
    Path(vm_id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
    timeout: Option<Extension<BodyTimeout>>,
    body: Body,
) -> Result<Json<FileWritten>, ApiError> {
    let timeout = timeout.map(|Extension(t)| t).unwrap_or_default();
    let (q, path) = query(q)?;
    let mode = match &q.mode {
        None => None,
        Some(m) => Some(u32::from_str_radix(m, 8).map_err(|_| {
            ApiError::bad_field(
                Some("mode".into()),
                format!("mode {m:?} is not an octal number"),
            )
        })?),
    };
    let mut up = engine
        .put_file(&vm_id, &path, mode, q.make_parents.unwrap_or(false))
        .await?;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        // A stalled upload ends with 408 after `body_timeout_ms` without a byte
        // (see `limits.rs`); dropping `up` aborts the transfer in the guest.
        let frame = frame.map_err(|e| {
            if is_idle_timeout(&e) {
                ApiError::from(LimitError::BodyIdle {
                    timeout_ms: timeout.ms(),
                })
            } else {
                ApiError::bad_field(None, format!("reading the request body failed: {e}"))
            }
        })?;
        if let Ok(data) = frame.into_data() {
            up.write(&data).await.map_err(EngineError::from)?;
        }
    }
    let done = up.finish().await.map_err(EngineError::from)?;
    Ok(Json(FileWritten {
        path,
        bytes: done.bytes,
    }))
}

#[utoipa::path(get, path = "/v1/vm/{vm_id}/files", tag = "agent",
    params(("vm_id" = String, Path, description = "The VM's id"), FileQuery),
    responses(
        (status = 200, description = "The file's bytes (streamed; size and mode in \
            `x-agentenv-file-size` and `x-agentenv-file-mode`)", body = Vec<u8>,
            content_type = "application/octet-stream"),
        (status = 400, description = "Bad path, or not a regular file", body = ErrorBody),
        (status = 404, description = "No such VM or file", body = ErrorBody),
        (status = 409, description = "The VM is not running", body = ErrorBody),
        (status = 503, description = "The guest agent is not ready", body = ErrorBody),
    ))]
pub(crate) async fn get_file(
    State(engine): State<AppState>,
    Path(vm_id): Path<String>,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (q, path) = query(q)?;
    if q.mode.is_some() || q.make_parents.is_some() {
        let f = if q.mode.is_some() {
            "mode"
        } else {
            "make_parents"
        };
        return Err(ApiError::bad_field(
            Some(f.into()),
            format!("{f} applies to uploads only"),
        ));
    }
    let dl = engine.get_file(&vm_id, &path).await?;
    let info = dl.info;
    let body = DownloadBody {
        recycler: dl.recycler(),
        dl: Some(dl),
    };
    let mut resp = (StatusCode::OK, Body::new(body)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert("x-agentenv-file-size", HeaderValue::from(info.size));
    h.insert(
        "x-agentenv-file-mode",
        HeaderValue::from_str(&format!("{:04o}", info.mode & 0o7777)).expect("ascii"),
    );
    Ok(resp)
}
