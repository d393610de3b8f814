//! envd's `/files`: `GET` downloads a file (gzip when the client accepts
//! it), `POST` uploads one or more (multipart parts named `file` whose
//! filename is the target path, or an `application/octet-stream` body for
//! `?path=`; `Content-Encoding: gzip` bodies are inflated). Both stream:
//! the daemon holds a chunk at a time, never a whole file. Errors are the
//! control plane's JSON shape (`{"code":int,"message"}`), which the SDK
//! reads for `/files`.

use std::sync::Arc;

use agentenv_core::agent::Download;
use agentenv_core::EngineError;
use agentenv_proto::{FsOp, FsRequest, GetFile, PutFile};
use async_compression::tokio::bufread::{GzipDecoder, GzipEncoder};
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt, TryStreamExt};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::io::{ReaderStream, StreamReader};

use super::{check_user, Call};
use crate::server::e2b::error::E2bError;
use crate::server::e2b::state::SandboxRecord;
use crate::server::e2b::E2bState;

/// The query of `/files`.
#[derive(Debug, Default)]
pub struct FilesQuery {
    /// `path`.
    pub path: Option<String>,
    /// `username`.
    pub username: Option<String>,
    /// `signature` (`v1_…`).
    pub signature: Option<String>,
    /// `signature_expiration` (Unix seconds).
    pub signature_expiration: Option<String>,
}

impl FilesQuery {
    /// Parses the query string; a repeated parameter is an error.
    pub fn parse(query: Option<&str>) -> Result<FilesQuery, E2bError> {
        let mut q = FilesQuery::default();
        let pairs: Vec<(String, String)> =
            axum::extract::Query::<Vec<(String, String)>>::try_from_uri(
                &format!("/?{}", query.unwrap_or(""))
                    .parse()
                    .map_err(|_| E2bError::bad_field("query", "not a valid query string"))?,
            )
            .map_err(|e| E2bError::bad_field("query", e.body_text()))?
            .0;
        for (k, v) in pairs {
            let slot = match k.as_str() {
                "path" => &mut q.path,
                "username" => &mut q.username,
                "signature" => &mut q.signature,
                "signature_expiration" => &mut q.signature_expiration,
                _ => continue,
            };
            if slot.replace(v).is_some() {
                return Err(E2bError::bad_field(&k, "given more than once"));
            }
        }
        Ok(q)
    }

    /// True when the query's signature is the one `token` gives for `op`
    /// (`read` or `write`) and has not expired (protocol §3.4).
    pub fn signature_ok(&self, op: &str, token: &str, _default_user: &str) -> bool {
        let (Some(sig), Some(path)) = (&self.signature, &self.path) else {
            return false;
        };
        if token.is_empty() {
            return false;
        }
        let user = self.username.as_deref().unwrap_or("");
        let raw = match &self.signature_expiration {
            None => format!("{path}:{op}:{user}:{token}"),
            Some(exp) => {
                let Ok(exp_s) = exp.parse::<u64>() else {
                    return false;
                };
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(u64::MAX);
                if now > exp_s {
                    return false;
                }
                format!("{path}:{op}:{user}:{token}:{exp}")
            }
        };
        let digest = Sha256::digest(raw.as_bytes());
        let want = format!(
            "v1_{}",
            agentenv_api::base64::encode(&digest).trim_end_matches('=')
        );
        bool::from(want.as_bytes().ct_eq(sig.as_bytes()))
    }
}

/// The signature operation of a `/files` method.
pub fn op_of(method: &Method) -> Option<&'static str> {
    match *method {
        Method::GET => Some("read"),
        Method::POST => Some("write"),
        _ => None,
    }
}

/// Serves `/files` for `record`'s sandbox (`token_valid`: the request
/// carried the sandbox's access token).
pub async fn handle(
    state: Arc<E2bState>,
    record: Arc<SandboxRecord>,
    token_valid: bool,
    req: Request,
) -> Response {
    let r = async {
        let q = FilesQuery::parse(req.uri().query())?;
        let Some(op) = op_of(req.method()) else {
            return Err(E2bError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} /files: use GET or POST", req.method()),
            ));
        };
        let signed = q.signature.is_some()
            && q.signature_ok(op, &record.envd_access_token, &state.config.default_user);
        if !token_valid && !signed {
            return Err(E2bError::new(
                StatusCode::UNAUTHORIZED,
                if q.signature.is_some() {
                    "signature: invalid or expired for this path, user and operation"
                } else {
                    "x-access-token: missing or not this sandbox's envd access token"
                },
            ));
        }
        let user = match q.username.as_deref() {
            None | Some("") => state.config.default_user.clone(),
            Some(u) => {
                check_user(u).map_err(|m| E2bError::new(StatusCode::UNAUTHORIZED, m))?;
                u.to_string()
            }
        };
        let call = Call {
            state,
            record,
            user,
        };
        if op == "read" {
            download(&call, &q, req.headers()).await
        } else {
            upload(&call, &q, req).await
        }
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

/// A path from a request: relative paths are the guest's to resolve
/// against the user's home (a leading `~/` is the home too).
pub fn user_path(path: &str) -> Result<String, E2bError> {
    if path.is_empty() {
        return Err(E2bError::bad_field("path", "the path is empty"));
    }
    if path.contains('\0') {
        return Err(E2bError::bad_field("path", "the path contains a NUL byte"));
    }
    Ok(match path {
        "~" => ".".to_string(),
        p => p.strip_prefix("~/").unwrap_or(p).to_string(),
    })
}

/// The `/files` error of an engine error.
fn files_error(e: EngineError, sandbox: &str) -> E2bError {
    let msg = e.to_string();
    let status = match e {
        EngineError::BadRequest { .. } => StatusCode::BAD_REQUEST,
        // envd: an unknown user is 401.
        EngineError::NotFound { ref field, .. } if field == "user" => StatusCode::UNAUTHORIZED,
        EngineError::NotFound { .. } => StatusCode::NOT_FOUND,
        EngineError::Forbidden { .. } => StatusCode::FORBIDDEN,
        EngineError::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
        EngineError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        EngineError::Conflict { .. } => return super::sandbox_gone(sandbox),
        EngineError::AgentUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    E2bError::new(status, msg)
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|enc| {
            let mut parts = enc.split(';');
            let name = parts.next().unwrap_or("").trim();
            let q_zero = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .is_some_and(|q| q.trim().parse::<f32>() == Ok(0.0))
            });
            name.eq_ignore_ascii_case("gzip") && !q_zero
        })
}

/// A download's chunks as a byte stream.
fn chunks(dl: Download) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    futures_util::stream::try_unfold(dl, |mut dl| async move {
        match dl.next_chunk().await {
            Ok(Some(c)) => Ok(Some((Bytes::from(c), dl))),
            Ok(None) => Ok(None),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    })
}

async fn download(call: &Call, q: &FilesQuery, headers: &HeaderMap) -> Result<Response, E2bError> {
    let path = q
        .path
        .as_deref()
        .ok_or_else(|| E2bError::bad_field("path", "the query needs path"))?;
    let get = GetFile {
        path: user_path(path)?,
        user: Some(call.user.clone()),
    };
    let dl = call
        .state
        .engine
        .get_file_as(call.sandbox_id(), &get)
        .await
        .map_err(|e| files_error(e, call.sandbox_id()))?;
    let stream = chunks(dl);
    let mut resp = if accepts_gzip(headers) {
        let gz = GzipEncoder::new(StreamReader::new(stream));
        let mut r = Body::from_stream(ReaderStream::new(gz)).into_response();
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        Body::from_stream(stream).into_response()
    };
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(resp)
}

/// The request body as bytes, inflated when it is gzip-encoded.
fn body_stream(
    headers: &HeaderMap,
    body: Body,
) -> Result<std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>, E2bError> {
    let raw = body.into_data_stream().map_err(std::io::Error::other);
    let enc = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    match enc.as_str() {
        "" | "identity" => Ok(Box::pin(raw)),
        "gzip" | "x-gzip" => Ok(Box::pin(ReaderStream::new(GzipDecoder::new(
            StreamReader::new(raw),
        )))),
        other => Err(E2bError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content-encoding: {other:?} is not accepted (gzip or identity)"),
        )),
    }
}

/// Writes the bytes of `data` to `path` (parents created); its entry.
async fn write_one<S>(call: &Call, path: &str, mut data: S) -> Result<Value, E2bError>
where
    S: Stream<Item = Result<Bytes, E2bError>> + Unpin,
{
    let put = PutFile {
        path: user_path(path)?,
        mode: None,
        make_parents: true,
        user: Some(call.user.clone()),
    };
    let sandbox = call.sandbox_id();
    let engine = &call.state.engine;
    let mut up = engine
        .put_file_as(sandbox, &put)
        .await
        .map_err(|e| files_error(e, sandbox))?;
    // An error drops `up`, which aborts the upload: no partial file stays.
    while let Some(chunk) = data.next().await {
        up.write(&chunk?)
            .await
            .map_err(|e| files_error(e.into(), sandbox))?;
    }
    up.finish()
        .await
        .map_err(|e| files_error(e.into(), sandbox))?;
    // The answer names the absolute path: the guest resolved a relative one.
    let path = if put.path.starts_with('/') {
        put.path
    } else {
        let stat = FsRequest {
            user: put.user.clone(),
            op: FsOp::Stat { path: put.path },
        };
        let res = engine
            .agent_fs(sandbox, &stat)
            .await
            .map_err(|e| files_error(e, sandbox))?;
        res.entry.map(|e| e.path).ok_or_else(|| {
            E2bError::new(StatusCode::BAD_GATEWAY, "the agent's stat named no entry")
        })?
    };
    let name = path.rsplit('/').next().unwrap_or("").to_string();
    Ok(json!({ "name": name, "type": "file", "path": path }))
}

fn read_error(e: std::io::Error) -> E2bError {
    E2bError::bad_field("body", format!("reading the upload failed: {e}"))
}

async fn upload(call: &Call, q: &FilesQuery, req: Request) -> Result<Response, E2bError> {
    let (parts, body) = req.into_parts();
    let ct = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let stream = body_stream(&parts.headers, body)?;
    let mut written = Vec::new();
    if ct.to_ascii_lowercase().starts_with("multipart/form-data") {
        let boundary = multer::parse_boundary(&ct)
            .map_err(|e| E2bError::bad_field("content-type", e.to_string()))?;
        let mut mp = multer::Multipart::new(stream, boundary);
        loop {
            let field = mp
                .next_field()
                .await
                .map_err(|e| E2bError::bad_field("body", format!("malformed multipart: {e}")))?;
            let Some(mut field) = field else { break };
            if field.name() != Some("file") {
                // envd takes only `file` parts; drain the others.
                while field
                    .chunk()
                    .await
                    .map_err(|e| E2bError::bad_field("body", e.to_string()))?
                    .is_some()
                {}
                continue;
            }
            let target = match (&q.path, field.file_name()) {
                (Some(p), _) if written.is_empty() => p.clone(),
                (Some(_), _) => {
                    return Err(E2bError::bad_field(
                        "path",
                        "path names one file, the request has several: leave it out and name each part's filename",
                    ))
                }
                (None, Some(f)) if !f.is_empty() => f.to_string(),
                (None, _) => {
                    return Err(E2bError::bad_field(
                        "path",
                        "the part has no filename and the query no path",
                    ))
                }
            };
            let data = futures_util::stream::try_unfold(field, |mut f| async move {
                match f.chunk().await {
                    Ok(Some(c)) => Ok(Some((c, f))),
                    Ok(None) => Ok(None),
                    Err(e) => Err(E2bError::bad_field(
                        "body",
                        format!("malformed multipart: {e}"),
                    )),
                }
            });
            written.push(write_one(call, &target, Box::pin(data)).await?);
        }
        if written.is_empty() {
            return Err(E2bError::bad_field("body", "no part named file"));
        }
    } else if ct.is_empty()
        || ct
            .to_ascii_lowercase()
            .starts_with("application/octet-stream")
    {
        let path = q.path.as_deref().ok_or_else(|| {
            E2bError::bad_field("path", "an octet-stream upload needs the path query")
        })?;
        written.push(write_one(call, path, stream.map_err(read_error)).await?);
    } else {
        return Err(E2bError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "content-type: {ct:?} is not accepted (multipart/form-data or application/octet-stream)"
            ),
        ));
    }
    Ok(axum::Json(Value::Array(written)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_the_sdks() {
        // sha256("/a.txt:read::tok"), base64 without padding (computed with
        // the SDK's get_signature).
        let mut q = FilesQuery::parse(Some("path=/a.txt")).unwrap();
        let digest = Sha256::digest(b"/a.txt:read::tok");
        let sig = format!(
            "v1_{}",
            agentenv_api::base64::encode(&digest).trim_end_matches('=')
        );
        q.signature = Some(sig);
        assert!(q.signature_ok("read", "tok", "user"));
        assert!(!q.signature_ok("write", "tok", "user"));
        assert!(!q.signature_ok("read", "other", "user"));
        q.signature_expiration = Some("1".into());
        assert!(!q.signature_ok("read", "tok", "user"), "expired");
        assert!(FilesQuery::parse(Some("path=a&path=b")).is_err());
    }

    #[test]
    fn paths_are_checked_and_home_is_the_guests() {
        assert_eq!(user_path("a/b").unwrap(), "a/b");
        assert_eq!(user_path("~/x").unwrap(), "x");
        assert_eq!(user_path("~").unwrap(), ".");
        assert_eq!(user_path("/etc/x").unwrap(), "/etc/x");
        assert!(user_path("").is_err());
        assert!(user_path("a\0").is_err());
    }

    #[test]
    fn gzip_acceptance_honours_q_zero() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("zstd, gzip"),
        );
        assert!(accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip;q=0"),
        );
        assert!(!accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        assert!(!accepts_gzip(&h));
    }
}
