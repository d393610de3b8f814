//! A blocking client of the agentenv HTTP API, over TCP or a Unix socket.
//!
//! [`ApiClient`] has one method per endpoint, typed with `agentenv-api`'s wire
//! types; errors are [`ClientError`]. Under it, [`transport`] is a small
//! HTTP/1.1 client (keep-alive, streamed bodies, raw requests) that the
//! benchmarks and the tests also use directly.

pub mod tls;
pub mod transport;

use std::io::{self, BufRead, BufReader, Read};
use std::sync::Mutex;
use std::time::Duration;

use agentenv_api::{
    CreateSnapshotRequest, CreateVmRequest, ErrorBody, ExecEvent, ExecRequest, ExecResult,
    FileWritten, Health, PersistSnapshotRequest, SnapshotInfo, SnapshotList, VmInfo, VmList,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use transport::{
    encode_request, Body, BodyReader, Client, Endpoint, EndpointError, Request, Response,
    ResponseHead, Stream, StreamingResponse, TlsOptions,
};

/// How long one read or write may block by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// What went wrong in a call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with an error status.
    #[error("{} (HTTP {status})", body.error)]
    Api {
        /// The status code.
        status: u16,
        /// The error body (a body that is not one is carried in `error`).
        body: ErrorBody,
    },
    /// The server string is not an endpoint.
    #[error("bad server address: {0}")]
    Endpoint(EndpointError),
    /// No answer: the daemon could not be reached, or the exchange broke.
    #[error("cannot reach the agentenv daemon at {server}: {error}")]
    Unreachable {
        /// The daemon's address.
        server: String,
        /// The transport's error (in the message, so not a `source`).
        error: io::Error,
    },
    /// A streamed body (exec output, a file) broke off.
    #[error("reading {what} from the agentenv daemon at {server}: {error}")]
    Stream {
        /// The daemon's address.
        server: String,
        /// What was being read.
        what: String,
        /// The transport's error (in the message, so not a `source`).
        error: io::Error,
    },
    /// A success answer that is not what the API promises.
    #[error("bad response from the agentenv daemon at {server} to {what}: {detail}")]
    BadResponse {
        /// The daemon's address.
        server: String,
        /// The request.
        what: String,
        /// What was wrong with it.
        detail: String,
    },
}

impl From<EndpointError> for ClientError {
    fn from(e: EndpointError) -> ClientError {
        ClientError::Endpoint(e)
    }
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Where and how an upload writes its file.
#[derive(Debug, Clone, Default)]
pub struct UploadOptions {
    /// Permission bits of the new file (default: the daemon's).
    pub mode: Option<u32>,
    /// Create missing parent directories.
    pub make_parents: bool,
}

/// A typed client of the agentenv API. Calls share one keep-alive connection
/// (one at a time); streamed answers get their own.
pub struct ApiClient {
    server: String,
    token: Option<String>,
    http: Mutex<Client>,
}

impl ApiClient {
    /// A client for `server` (`http://HOST:PORT` or `unix:/PATH`).
    pub fn new(server: &str) -> Result<ApiClient, ClientError> {
        let server = server.trim_end_matches('/');
        let endpoint = Endpoint::parse(server)?;
        Ok(ApiClient {
            server: server.to_string(),
            token: None,
            http: Mutex::new(Client::new(endpoint, DEFAULT_TIMEOUT)),
        })
    }

    /// A client for `server`, which may also be `https://HOST:PORT`: the
    /// daemon's certificate is checked against `tls.cacert`, and `tls.cert`
    /// / `tls.key` are sent when the daemon asks for a client certificate.
    pub fn with_tls(server: &str, tls: &TlsOptions) -> Result<ApiClient, ClientError> {
        let server = server.trim_end_matches('/');
        let endpoint = Endpoint::parse_with(server, tls)?;
        Ok(ApiClient {
            server: server.to_string(),
            token: None,
            http: Mutex::new(Client::new(endpoint, DEFAULT_TIMEOUT)),
        })
    }

    /// Sends `Authorization: Bearer TOKEN` with every request.
    pub fn with_token(mut self, token: impl Into<String>) -> ApiClient {
        self.token = Some(token.into());
        self
    }

    /// Each read or write blocks at most `timeout` (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(self, timeout: Duration) -> ApiClient {
        let endpoint = self.endpoint();
        ApiClient {
            http: Mutex::new(Client::new(endpoint, timeout)),
            ..self
        }
    }

    /// The server as given.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Where the client connects.
    pub fn endpoint(&self) -> Endpoint {
        self.lock().endpoint().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Client> {
        self.http.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the token, when there is one.
    fn authorize<'a>(&self, req: Request<'a>) -> Request<'a> {
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    fn unreachable(&self, error: io::Error) -> ClientError {
        ClientError::Unreachable {
            server: self.server.clone(),
            error,
        }
    }

    /// Sends `req` (with the token) and returns the answer whatever its status.
    pub fn send(&self, req: Request<'_>) -> Result<Response, ClientError> {
        let req = self.authorize(req);
        self.lock().send(req).map_err(|e| self.unreachable(e))
    }

    /// Sends `req` (with the token) and returns the answer's head whatever its
    /// status, with its body to be read as it comes.
    pub fn send_streaming(&self, req: Request<'_>) -> Result<StreamingResponse, ClientError> {
        let req = self.authorize(req);
        self.lock()
            .send_streaming(req)
            .map_err(|e| self.unreachable(e))
    }

    /// One call: a JSON body (or none), a 2xx answer parsed as `T`.
    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let bytes = body.map(|b| serde_json::to_vec(b).expect("API requests serialise"));
        let req =
            Request::new(method, path).body(bytes.as_deref().map_or(Body::Empty, Body::Bytes));
        let resp = self.send(req)?;
        if !resp.is_success() {
            return Err(api_error(resp.status, &resp.body));
        }
        let body = if resp.body.is_empty() {
            &b"null"[..]
        } else {
            &resp.body
        };
        serde_json::from_slice(body).map_err(|e| self.bad_response(method, path, e))
    }

    fn bad_response(&self, method: &str, path: &str, detail: impl ToString) -> ClientError {
        ClientError::BadResponse {
            server: self.server.clone(),
            what: format!("{method} {path}"),
            detail: detail.to_string(),
        }
    }

    /// A streamed answer, or the API error it is.
    fn stream(&self, req: Request<'_>) -> Result<StreamingResponse, ClientError> {
        let resp = self.send_streaming(req)?;
        if !(200..300).contains(&resp.status()) {
            let status = resp.status();
            let body = resp.into_response().map(|r| r.body).unwrap_or_default();
            return Err(api_error(status, &body));
        }
        // A quiet command or a slow guest disk is not a dead daemon.
        resp.set_read_timeout(None)
            .map_err(|e| self.unreachable(e))?;
        Ok(resp)
    }

    /// `GET /v1/health`.
    pub fn health(&self) -> Result<Health, ClientError> {
        self.call("GET", "/v1/health", None::<&()>)
    }

    /// `GET /v1/openapi.json`.
    pub fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        self.call("GET", "/v1/openapi.json", None::<&()>)
    }

    /// `POST /v1/vm`.
    pub fn create_vm(&self, req: &CreateVmRequest) -> Result<VmInfo, ClientError> {
        self.call("POST", "/v1/vm", Some(req))
    }

    /// `GET /v1/vm`.
    pub fn list_vms(&self) -> Result<VmList, ClientError> {
        self.call("GET", "/v1/vm", None::<&()>)
    }

    /// `GET /v1/vm/{vm_id}`.
    pub fn get_vm(&self, vm_id: &str) -> Result<VmInfo, ClientError> {
        self.call("GET", &vm_path(vm_id, ""), None::<&()>)
    }

    /// `POST /v1/vm/{vm_id}/pause`.
    pub fn pause_vm(&self, vm_id: &str) -> Result<VmInfo, ClientError> {
        self.call("POST", &vm_path(vm_id, "/pause"), None::<&()>)
    }

    /// `POST /v1/vm/{vm_id}/resume`.
    pub fn resume_vm(&self, vm_id: &str) -> Result<VmInfo, ClientError> {
        self.call("POST", &vm_path(vm_id, "/resume"), None::<&()>)
    }

    /// `POST /v1/vm/{vm_id}/shutdown`.
    pub fn shutdown_vm(&self, vm_id: &str) -> Result<VmInfo, ClientError> {
        self.call("POST", &vm_path(vm_id, "/shutdown"), None::<&()>)
    }

    /// `DELETE /v1/vm/{vm_id}`.
    pub fn delete_vm(&self, vm_id: &str) -> Result<(), ClientError> {
        self.call::<serde::de::IgnoredAny>("DELETE", &vm_path(vm_id, ""), None::<&()>)
            .map(drop)
    }

    /// `POST /v1/vm/{vm_id}/snapshot`.
    pub fn snapshot_vm(
        &self,
        vm_id: &str,
        snapshot_id: Option<String>,
    ) -> Result<SnapshotInfo, ClientError> {
        self.snapshot_vm_with(
            vm_id,
            &CreateSnapshotRequest {
                snapshot_id,
                memory: false,
            },
        )
    }

    /// `POST /v1/vm/{vm_id}/snapshot` with the whole request (`memory: true`
    /// for a full snapshot).
    pub fn snapshot_vm_with(
        &self,
        vm_id: &str,
        req: &CreateSnapshotRequest,
    ) -> Result<SnapshotInfo, ClientError> {
        self.call("POST", &vm_path(vm_id, "/snapshot"), Some(req))
    }

    /// `POST /v1/vm` with `restore`: a VM restored from a full snapshot.
    pub fn restore_vm(
        &self,
        vm_id: &str,
        snapshot_id: &str,
        wait_ready: bool,
    ) -> Result<VmInfo, ClientError> {
        self.create_vm(&CreateVmRequest {
            wait_ready,
            ..CreateVmRequest::restore(vm_id, snapshot_id)
        })
    }

    /// `POST /v1/vm/{vm_id}/fork`: new running VMs from the VM's current state.
    pub fn fork_vm(
        &self,
        vm_id: &str,
        req: &agentenv_api::ForkRequest,
    ) -> Result<agentenv_api::ForkResponse, ClientError> {
        self.call("POST", &vm_path(vm_id, "/fork"), Some(req))
    }

    /// `POST /v1/vm/{vm_id}/reset`: the VM goes back to a full snapshot in place.
    pub fn reset_vm(&self, vm_id: &str, snapshot_id: &str) -> Result<VmInfo, ClientError> {
        let req = agentenv_api::ResetRequest {
            snapshot_id: snapshot_id.into(),
        };
        self.call("POST", &vm_path(vm_id, "/reset"), Some(&req))
    }

    /// `POST /v1/vm/{vm_id}/exec`, the whole result at the end (`stream` is
    /// sent as false).
    pub fn exec(&self, vm_id: &str, req: &ExecRequest) -> Result<ExecResult, ClientError> {
        let req = ExecRequest {
            stream: false,
            ..req.clone()
        };
        self.call("POST", &vm_path(vm_id, "/exec"), Some(&req))
    }

    /// `POST /v1/vm/{vm_id}/exec` with `stream: true`: the events as they come.
    pub fn exec_stream(&self, vm_id: &str, req: &ExecRequest) -> Result<ExecStream, ClientError> {
        let req = ExecRequest {
            stream: true,
            ..req.clone()
        };
        let path = vm_path(vm_id, "/exec");
        let body = serde_json::to_vec(&req).expect("API requests serialise");
        let resp = self.stream(Request::new("POST", &path).body(Body::Bytes(&body)))?;
        Ok(ExecStream {
            lines: BufReader::new(resp),
            server: self.server.clone(),
            what: format!("the output of POST {path}"),
        })
    }

    /// `PUT /v1/vm/{vm_id}/files?path=…`: streams `body` (`len` bytes, or up
    /// to its end when `None`) into the guest file `path`.
    pub fn upload(
        &self,
        vm_id: &str,
        path: &str,
        opts: &UploadOptions,
        body: impl Read,
        len: Option<u64>,
    ) -> Result<FileWritten, ClientError> {
        let mut target = format!("{}?path={}", vm_path(vm_id, "/files"), percent_encode(path));
        if let Some(m) = opts.mode {
            target.push_str(&format!("&mode={m:o}"));
        }
        if opts.make_parents {
            target.push_str("&make_parents=true");
        }
        let req = Request::new("PUT", &target)
            .header("Content-Type", "application/octet-stream")
            .body(Body::Reader {
                reader: Box::new(body),
                len,
            });
        let resp = self.stream(req)?;
        let resp = resp.into_response().map_err(|e| self.unreachable(e))?;
        serde_json::from_slice(&resp.body).map_err(|e| self.bad_response("PUT", &target, e))
    }

    /// `GET /v1/vm/{vm_id}/files?path=…`: the guest file as a stream.
    pub fn download(&self, vm_id: &str, path: &str) -> Result<Download, ClientError> {
        let target = format!("{}?path={}", vm_path(vm_id, "/files"), percent_encode(path));
        let resp = self.stream(Request::new("GET", &target))?;
        Ok(Download {
            size: resp
                .header("x-agentenv-file-size")
                .and_then(|v| v.parse().ok()),
            mode: resp
                .header("x-agentenv-file-mode")
                .and_then(|v| u32::from_str_radix(v, 8).ok()),
            body: resp,
        })
    }

    /// `GET /v1/snapshots`.
    pub fn list_snapshots(&self) -> Result<SnapshotList, ClientError> {
        self.call("GET", "/v1/snapshots", None::<&()>)
    }

    /// `GET /v1/snapshots/{snapshot_id}`.
    pub fn get_snapshot(&self, snapshot_id: &str) -> Result<SnapshotInfo, ClientError> {
        self.call("GET", &snapshot_path(snapshot_id, ""), None::<&()>)
    }

    /// `POST /v1/snapshots/{snapshot_id}/persist`.
    pub fn persist_snapshot(
        &self,
        snapshot_id: &str,
        keep_tmpfs: bool,
    ) -> Result<SnapshotInfo, ClientError> {
        let req = PersistSnapshotRequest { keep_tmpfs };
        self.call("POST", &snapshot_path(snapshot_id, "/persist"), Some(&req))
    }

    /// `DELETE /v1/snapshots/{snapshot_id}`.
    pub fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), ClientError> {
        self.call::<serde::de::IgnoredAny>("DELETE", &snapshot_path(snapshot_id, ""), None::<&()>)
            .map(drop)
    }
}

/// The API error an error answer is: its `ErrorBody`, or its text as one.
fn api_error(status: u16, body: &[u8]) -> ClientError {
    let body = serde_json::from_slice::<ErrorBody>(body).unwrap_or_else(|_| ErrorBody {
        error: String::from_utf8_lossy(body).into_owned(),
        field: None,
        state: None,
    });
    ClientError::Api { status, body }
}

/// The events of a streaming exec, one per NDJSON line.
pub struct ExecStream {
    lines: BufReader<StreamingResponse>,
    server: String,
    what: String,
}

impl Iterator for ExecStream {
    type Item = Result<ExecEvent, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut line = String::new();
        loop {
            line.clear();
            match self.lines.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) if line.trim().is_empty() => continue,
                Ok(_) => {
                    return Some(serde_json::from_str(line.trim_end()).map_err(|e| {
                        ClientError::BadResponse {
                            server: self.server.clone(),
                            what: self.what.clone(),
                            detail: format!("bad event {:?}: {e}", line.trim_end()),
                        }
                    }))
                }
                Err(error) => {
                    return Some(Err(ClientError::Stream {
                        server: self.server.clone(),
                        what: self.what.clone(),
                        error,
                    }))
                }
            }
        }
    }
}

/// A guest file being downloaded.
pub struct Download {
    /// Its size (`x-agentenv-file-size`).
    pub size: Option<u64>,
    /// Its permission bits (`x-agentenv-file-mode`).
    pub mode: Option<u32>,
    body: StreamingResponse,
}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.body.read(buf)
    }
}

fn vm_path(vm_id: &str, rest: &str) -> String {
    format!("/v1/vm/{}{rest}", percent_encode(vm_id))
}

fn snapshot_path(snapshot_id: &str, rest: &str) -> String {
    format!("/v1/snapshots/{}{rest}", percent_encode(snapshot_id))
}

/// Percent-encodes everything but RFC 3986's unreserved characters (for a
/// path segment or a query value).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    /// A server giving `answers` in turn, on as many connections as the client
    /// opens; returns the requests it read.
    fn serve(answers: Vec<String>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let t = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut answers = answers.into_iter().peekable();
            while answers.peek().is_some() {
                let (s, _) = listener.accept().unwrap();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                // One request after another until the client hangs up.
                while let Some(req) = read_request(&mut r) {
                    seen.push(req);
                    let answer = answers.next().unwrap();
                    w.write_all(answer.as_bytes()).unwrap();
                    if answers.peek().is_none() {
                        break;
                    }
                }
            }
            seen
        });
        (base, t)
    }

    /// One request, raw, its body included (`None` when the client hung up).
    fn read_request(r: &mut impl BufRead) -> Option<String> {
        let mut req = String::new();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap() == 0 {
                return None;
            }
            req.push_str(&l);
            if l == "\r\n" {
                break;
            }
        }
        let lower = req.to_ascii_lowercase();
        if let Some(n) = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
        {
            let mut b = vec![0; n.trim().parse().unwrap()];
            r.read_exact(&mut b).unwrap();
            req.push_str(&String::from_utf8(b).unwrap());
        } else if lower.contains("transfer-encoding: chunked") {
            loop {
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
                let n = usize::from_str_radix(l.trim(), 16).unwrap();
                let mut b = vec![0; n + 2];
                r.read_exact(&mut b).unwrap();
                if n == 0 {
                    return Some(req);
                }
                req.push_str(&String::from_utf8_lossy(&b[..n]));
            }
        }
        Some(req)
    }

    /// An answer with a `Content-Length` body.
    fn sized(status: &str, headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    /// An answer whose body is sent as these chunks.
    fn chunked(status: &str, headers: &str, chunks: &[&str]) -> String {
        let mut out = format!("HTTP/1.1 {status}\r\n{headers}Transfer-Encoding: chunked\r\n\r\n");
        for c in chunks {
            out.push_str(&format!("{:x}\r\n{c}\r\n", c.len()));
        }
        out + "0\r\n\r\n"
    }

    #[test]
    fn calls_are_typed_and_errors_carry_the_body() {
        let (base, server) = serve(vec![
            sized(
                "200 OK",
                "",
                r#"{"status":"ok","version":"1","backend":"qemu"}"#,
            ),
            sized(
                "409 Conflict",
                "",
                r#"{"error":"vm a is paused","state":"paused"}"#,
            ),
            "HTTP/1.1 204 No Content\r\n\r\n".into(),
            sized("502 Bad Gateway", "", "oops"),
        ]);
        let c = ApiClient::new(&format!("{base}/"))
            .unwrap()
            .with_token("s3cret");
        assert_eq!(c.health().unwrap().status, "ok");
        let e = c.pause_vm("a").unwrap_err();
        assert_eq!(e.to_string(), "vm a is paused (HTTP 409)");
        assert!(matches!(
            &e,
            ClientError::Api { status: 409, body } if body.state == Some(agentenv_api::VmState::Paused)
        ));
        c.delete_vm("a b").unwrap();
        let e = c.get_snapshot("s").unwrap_err();
        assert_eq!(
            (e.status(), e.to_string()),
            (Some(502), "oops (HTTP 502)".into())
        );
        let seen = server.join().unwrap();
        assert_eq!(seen.len(), 4);
        assert!(
            seen[0].starts_with("GET /v1/health HTTP/1.1\r\n"),
            "{}",
            seen[0]
        );
        assert!(seen
            .iter()
            .all(|r| r.contains("Authorization: Bearer s3cret\r\n")));
        assert!(seen[1].starts_with("POST /v1/vm/a/pause "), "{}", seen[1]);
        assert!(seen[2].starts_with("DELETE /v1/vm/a%20b "), "{}", seen[2]);
        // All on one kept-alive connection.
        assert_eq!(c.lock().connects, 1);
    }

    #[test]
    fn no_token_no_header_and_unreachable_names_the_server() {
        let (base, server) = serve(vec![sized("200 OK", "", r#"{"vms":[]}"#)]);
        let c = ApiClient::new(&base).unwrap();
        assert!(c.list_vms().unwrap().vms.is_empty());
        assert!(!server.join().unwrap()[0].contains("Authorization"));
        // Nothing listens there any more.
        let e = c.list_vms().unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot reach the agentenv daemon at {base}: ")),
            "{e}"
        );
        assert!(matches!(
            ApiClient::new("localhost:80"),
            Err(ClientError::Endpoint(_))
        ));
    }

    #[test]
    fn exec_events_stream_and_files_go_up_chunked_and_down_sized() {
        let (base, server) = serve(vec![
            chunked(
                "200 OK",
                "Content-Type: application/x-ndjson\r\n",
                &[
                    r#"{"type":"started","#,
                    "\"pid\":7}\n",
                    r#"{"type":"exit","exit_code":3,"signal":null,"timed_out":false,"#,
                    "\"duration_ms\":1}\n\n",
                ],
            ),
            sized("201 Created", "", r#"{"path":"/a b","bytes":70000}"#),
            sized(
                "200 OK",
                "x-agentenv-file-size: 5\r\nx-agentenv-file-mode: 0640\r\n",
                "hello",
            ),
            sized(
                "404 Not Found",
                "",
                r#"{"error":"no such file","field":"path"}"#,
            ),
        ]);
        let c = ApiClient::new(&base).unwrap();
        let req = ExecRequest {
            cmd: vec!["true".into()],
            ..Default::default()
        };
        let events: Vec<ExecEvent> = c
            .exec_stream("v", &req)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            events,
            vec![
                ExecEvent::Started { pid: 7 },
                ExecEvent::Exit {
                    exit_code: Some(3),
                    signal: None,
                    timed_out: false,
                    duration_ms: 1
                }
            ]
        );
        let data = vec![b'x'; 70_000];
        let opts = UploadOptions {
            mode: Some(0o640),
            make_parents: true,
        };
        let w = c.upload("v", "/a b", &opts, &data[..], None).unwrap();
        assert_eq!(w.bytes, 70_000);
        let mut d = c.download("v", "/a b").unwrap();
        assert_eq!((d.size, d.mode), (Some(5), Some(0o640)));
        let mut text = String::new();
        d.read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello");
        // Its connection is its own: the server sees it closed.
        drop(d);
        let e = c.download("v", "/nope").err().unwrap();
        assert!(
            matches!(&e, ClientError::Api { status: 404, body } if body.field.as_deref() == Some("path")),
            "{e}"
        );
        let seen = server.join().unwrap();
        assert!(seen[0].contains("\"stream\":true"), "{}", seen[0]);
        assert!(
            seen[1].starts_with("PUT /v1/vm/v/files?path=%2Fa%20b&mode=640&make_parents=true "),
            "{}",
            &seen[1][..80]
        );
        assert!(seen[1].contains("Content-Type: application/octet-stream\r\n"));
        assert!(seen[1].ends_with(&"x".repeat(70_000)));
        assert!(
            seen[2].starts_with("GET /v1/vm/v/files?path=%2Fa%20b "),
            "{}",
            seen[2]
        );
    }
}
