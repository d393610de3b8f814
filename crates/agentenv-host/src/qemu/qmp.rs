//! A small QMP client: newline-delimited JSON over QEMU's Unix socket.
//!
//! One connection is kept behind a lock. Every command carries an `id` and its
//! reply is the next `return`/`error` with that id; asynchronous events (and stale
//! replies of a command that timed out earlier) are skipped. Each command is
//! bounded by the request timeout. A connection that failed is dropped, and the
//! next command connects again (QEMU serves one QMP client at a time on a socket,
//! so the old one must be closed first).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentenv_core::backend::VmmError;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

/// Longest QMP message accepted (QEMU's replies here are a few hundred bytes).
const MAX_LINE: u64 = 1 << 20;

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    /// The greeting sent on connect (`{"QMP": {...}}`).
    Greeting(Value),
    /// An asynchronous event (`{"event": NAME, ...}`).
    Event(String),
    /// A successful reply.
    Return {
        /// The id the command carried.
        id: Option<Value>,
        /// The reply value.
        value: Value,
    },
    /// A failed command.
    Error {
        /// The id the command carried.
        id: Option<Value>,
        /// QMP's error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// Parses one line from QEMU.
pub fn parse_message(line: &str) -> Result<QmpMessage, String> {
    let v: Value =
        serde_json::from_str(line).map_err(|e| format!("invalid json from qemu: {e}"))?;
    let Value::Object(mut m) = v else {
        return Err(format!("qmp message is not an object: {}", line.trim()));
    };
    let id = m.remove("id");
    if let Some(g) = m.remove("QMP") {
        return Ok(QmpMessage::Greeting(g));
    }
    if let Some(e) = m.get("event") {
        return Ok(QmpMessage::Event(
            e.as_str().unwrap_or_default().to_string(),
        ));
    }
    if let Some(value) = m.remove("return") {
        return Ok(QmpMessage::Return { id, value });
    }
    if let Some(err) = m.remove("error") {
        let class = err["class"].as_str().unwrap_or("unknown").to_string();
        let desc = err["desc"].as_str().unwrap_or_default().to_string();
        return Ok(QmpMessage::Error { id, class, desc });
    }
    Err(format!("unexpected qmp message: {}", line.trim()))
}

/// What waiting for the reply to command `id` makes of one message: `None` to
/// keep reading (events, replies to other ids), or the command's result.
pub fn reply_for(request: &str, id: &Value, msg: QmpMessage) -> Option<Result<Value, VmmError>> {
    match msg {
        QmpMessage::Greeting(_) | QmpMessage::Event(_) => None,
        QmpMessage::Return { id: got, .. } | QmpMessage::Error { id: got, .. }
            if got.as_ref() != Some(id) =>
        {
            None
        }
        QmpMessage::Return { value, .. } => Some(Ok(value)),
        QmpMessage::Error { class, desc, .. } => Some(Err(VmmError::Refused {
            request: request.to_string(),
            status: 0,
            message: format!("{class}: {desc}"),
        })),
    }
}

struct Conn {
    stream: BufReader<UnixStream>,
    next_id: u64,
}

/// A QMP client for one QEMU process.
pub struct QmpClient {
    path: PathBuf,
    timeout: Duration,
    conn: Mutex<Option<Conn>>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("path", &self.path)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl QmpClient {
    /// A client for the QMP socket at `path`; each command may take `timeout`.
    pub fn new(path: &Path, timeout: Duration) -> QmpClient {
        QmpClient {
            path: path.to_path_buf(),
            timeout,
            conn: Mutex::new(None),
        }
    }

    /// How long one command may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Connects and negotiates capabilities, waiting at most `timeout` for the
    /// greeting (QEMU sends it only once its main loop runs).
    pub async fn connect(&self, timeout: Duration) -> Result<(), VmmError> {
        let mut guard = self.conn.lock().await;
        *guard = None;
        *guard = Some(self.open(timeout).await?);
        Ok(())
    }

    /// Runs `command` with optional `arguments` and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let mut guard = self.conn.lock().await;
        let mut reconnected = false;
        if guard.is_none() {
            *guard = Some(self.open(self.timeout).await?);
            reconnected = true;
        }
        let conn = guard.as_mut().expect("connected above");
        let (id, line) = request_line(conn, command, arguments.as_ref());
        let sent = match self.send(conn, command, &line).await {
            Err(e) if !reconnected => {
                // The kept connection broke (QEMU closes a client when it is
                // restarted or the peer misbehaved): connect once more. Nothing
                // was delivered, so sending again is safe.
                tracing::debug!(socket = %self.path.display(), "qmp reconnect after: {e}");
                *guard = None;
                let mut fresh = self.open(self.timeout).await?;
                let (id, line) = request_line(&mut fresh, command, arguments.as_ref());
                let r = self.send(&mut fresh, command, &line).await;
                *guard = Some(fresh);
                r.map(|()| id)
            }
            other => other.map(|()| id),
        };
        let result = match sent {
            Ok(id) => {
                let conn = guard.as_mut().expect("connected above");
                self.read_reply(conn, command, &id).await
            }
            Err(e) => Err(e),
        };
        // After a transport failure or a timeout the stream's state is unknown:
        // drop it so the next command starts clean.
        if matches!(
            result,
            Err(VmmError::Transport { .. } | VmmError::Timeout { .. })
        ) {
            *guard = None;
        }
        result
    }

    /// Hands QEMU an open file under `fdname` (QMP `getfd`: the descriptor
    /// travels with the command as `SCM_RIGHTS`), for a later `fd:NAME`
    /// migration URI. A file descriptor, not a path or an `exec:` URI, because
    /// QEMU's seccomp sandbox (`spawn=deny`) kills a QEMU that forks a shell.
    pub async fn send_fd(&self, fdname: &str, fd: BorrowedFd<'_>) -> Result<(), VmmError> {
        let request = "getfd";
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            *guard = Some(self.open(self.timeout).await?);
        }
        let conn = guard.as_mut().expect("connected above");
        let args = json!({ "fdname": fdname });
        let (id, line) = request_line(conn, request, Some(&args));
        let sent = bounded(request, self.timeout, send_with_fd(conn, &line, fd)).await;
        let result = match sent {
            Ok(()) => self.read_reply(conn, request, &id).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if matches!(
            result,
            Err(VmmError::Transport { .. } | VmmError::Timeout { .. })
        ) {
            *guard = None;
        }
        result
    }

    /// `query-status`'s `status` (`running`, `paused`, `shutdown`, …).
    pub async fn query_status(&self) -> Result<String, VmmError> {
        let v = self.execute("query-status", None).await?;
        v["status"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| VmmError::Transport {
                request: "query-status".into(),
                message: format!("reply without a status: {v}"),
            })
    }

    async fn open(&self, timeout: Duration) -> Result<Conn, VmmError> {
        let request = "qmp_capabilities";
        let fut = async {
            let stream = loop {
                match UnixStream::connect(&self.path).await {
                    Ok(s) => break s,
                    // QEMU binds the socket file before it listens on it: a
                    // refusal right after startup means "not yet". The timeout
                    // around this future bounds the retries.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => {
                        return Err(transport(
                            request,
                            format!("connect {}: {e}", self.path.display()),
                        ))
                    }
                }
            };
            let mut conn = Conn {
                stream: BufReader::new(stream),
                next_id: 1,
            };
            loop {
                match parse_message(&read_line(&mut conn.stream, request).await?) {
                    Ok(QmpMessage::Greeting(_)) => break,
                    Ok(QmpMessage::Event(_)) => continue,
                    Ok(other) => {
                        return Err(transport(
                            request,
                            format!("expected greeting, got {other:?}"),
                        ))
                    }
                    Err(e) => return Err(transport(request, e)),
                }
            }
            let (id, line) = request_line(&mut conn, request, None);
            write_line(&mut conn.stream, request, &line).await?;
            read_until_reply(&mut conn.stream, request, &id).await?;
            Ok(conn)
        };
        bounded(request, timeout, fut).await
    }

    async fn send(&self, conn: &mut Conn, request: &str, line: &str) -> Result<(), VmmError> {
        bounded(
            request,
            self.timeout,
            write_line(&mut conn.stream, request, line),
        )
        .await
    }

    async fn read_reply(
        &self,
        conn: &mut Conn,
        request: &str,
        id: &Value,
    ) -> Result<Value, VmmError> {
        bounded(
            request,
            self.timeout,
            read_until_reply(&mut conn.stream, request, id),
        )
        .await
    }
}

fn request_line(conn: &mut Conn, command: &str, arguments: Option<&Value>) -> (Value, String) {
    let id = json!(conn.next_id);
    conn.next_id += 1;
    let mut msg = json!({ "execute": command, "id": id });
    if let Some(a) = arguments {
        msg["arguments"] = a.clone();
    }
    let mut line = msg.to_string();
    line.push('\n');
    (id, line)
}

/// Writes one command line with `fd` attached (`SCM_RIGHTS`) to the first
/// byte. The line is short, so it goes in one `sendmsg` once the socket is
/// writable; a partial write sends the rest without the descriptor.
async fn send_with_fd(conn: &mut Conn, line: &str, fd: BorrowedFd<'_>) -> Result<(), VmmError> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::io::IoSlice;
    let request = "getfd";
    let stream = conn.stream.get_mut();
    let fds = [fd.as_raw_fd()];
    let bytes = line.as_bytes();
    let sent = loop {
        stream
            .writable()
            .await
            .map_err(|e| transport(request, format!("wait writable: {e}")))?;
        let r = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let iov = [IoSlice::new(bytes)];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match r {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(transport(request, format!("sendmsg: {e}"))),
        }
    };
    stream
        .write_all(&bytes[sent..])
        .await
        .map_err(|e| transport(request, format!("write: {e}")))
}

async fn bounded<T>(
    request: &str,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, VmmError>>,
) -> Result<T, VmmError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(VmmError::Timeout {
            request: request.to_string(),
            timeout_ms: timeout.as_millis() as u64,
        }),
    }
}

fn transport(request: &str, message: impl Into<String>) -> VmmError {
    VmmError::Transport {
        request: request.to_string(),
        message: message.into(),
    }
}

async fn write_line(
    stream: &mut BufReader<UnixStream>,
    request: &str,
    line: &str,
) -> Result<(), VmmError> {
    stream
        .get_mut()
        .write_all(line.as_bytes())
        .await
        .map_err(|e| transport(request, format!("write: {e}")))
}

async fn read_line(stream: &mut BufReader<UnixStream>, request: &str) -> Result<String, VmmError> {
    let mut buf = Vec::new();
    let n = (&mut *stream)
        .take(MAX_LINE)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|e| transport(request, format!("read: {e}")))?;
    if n == 0 {
        return Err(transport(request, "qemu closed the qmp connection"));
    }
    if buf.last() != Some(&b'\n') {
        return Err(transport(
            request,
            format!("qmp message longer than {MAX_LINE} bytes or cut off"),
        ));
    }
    String::from_utf8(buf).map_err(|_| transport(request, "qmp message is not utf-8"))
}

async fn read_until_reply(
    stream: &mut BufReader<UnixStream>,
    request: &str,
    id: &Value,
) -> Result<Value, VmmError> {
    loop {
        let line = read_line(stream, request).await?;
        let msg = parse_message(&line).map_err(|e| transport(request, e))?;
        if let Some(r) = reply_for(request, id, msg) {
            return r;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::net::UnixListener;

    #[test]
    fn messages_are_classified() {
        let g = parse_message(r#"{"QMP": {"version": {}, "capabilities": ["oob"]}}"#).unwrap();
        assert!(matches!(g, QmpMessage::Greeting(_)));
        let e =
            parse_message(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#)
                .unwrap();
        assert_eq!(e, QmpMessage::Event("STOP".into()));
        let r = parse_message(r#"{"return": {"status": "running"}, "id": 3}"#).unwrap();
        assert_eq!(
            r,
            QmpMessage::Return {
                id: Some(json!(3)),
                value: json!({"status": "running"})
            }
        );
        let err = parse_message(
            r#"{"id": 4, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
        )
        .unwrap();
        assert_eq!(
            err,
            QmpMessage::Error {
                id: Some(json!(4)),
                class: "CommandNotFound".into(),
                desc: "The command nope has not been found".into()
            }
        );
        assert!(parse_message("not json").is_err());
        assert!(parse_message("[1]").is_err());
        assert!(parse_message(r#"{"what": 1}"#).is_err());
    }

    #[test]
    fn events_and_other_ids_are_skipped_and_errors_refused() {
        let id = json!(7);
        let check = |line: &str| reply_for("stop", &id, parse_message(line).unwrap());
        assert!(check(r#"{"event": "RESUME"}"#).is_none());
        assert!(check(r#"{"return": {}, "id": 6}"#).is_none());
        assert!(check(r#"{"return": {}}"#).is_none());
        assert_eq!(
            check(r#"{"return": {}, "id": 7}"#).unwrap().unwrap(),
            json!({})
        );
        match check(r#"{"error": {"class": "GenericError", "desc": "boom"}, "id": 7}"#) {
            Some(Err(VmmError::Refused {
                request,
                status,
                message,
            })) => {
                assert_eq!(request, "stop");
                assert_eq!(status, 0);
                assert_eq!(message, "GenericError: boom");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A scripted QMP server: for each accepted connection, sends the greeting and
    /// answers commands through `answer` (which may return several lines, or none
    /// to hang up).
    fn fake_qemu(
        path: &Path,
        answer: impl Fn(usize, &Value) -> Option<Vec<String>> + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        let answer = std::sync::Arc::new(answer);
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                n += 1;
                let answer = answer.clone();
                let conn_no = n;
                tokio::spawn(async move {
                    let mut s = BufReader::new(s);
                    let greeting = "{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n";
                    if s.get_mut().write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    loop {
                        let mut line = String::new();
                        if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let req: Value = serde_json::from_str(&line).unwrap();
                        let Some(lines) = answer(conn_no, &req) else {
                            return;
                        };
                        for l in lines {
                            if l == "HANGUP" {
                                return;
                            }
                            let _ = s.get_mut().write_all(format!("{l}\n").as_bytes()).await;
                        }
                    }
                });
            }
        })
    }

    fn ret(req: &Value, v: Value) -> String {
        json!({"return": v, "id": req["id"]}).to_string()
    }

    #[tokio::test]
    async fn commands_skip_events_and_map_errors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let server = fake_qemu(&sock, |_, req| {
            let cmd = req["execute"].as_str().unwrap();
            Some(match cmd {
                "qmp_capabilities" => vec![ret(req, json!({}))],
                "query-status" => vec![
                    r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}"#.into(),
                    json!({"return": {}, "id": 999}).to_string(),
                    ret(req, json!({"status": "paused", "running": false})),
                ],
                _ => vec![json!({"error": {"class": "CommandNotFound", "desc": format!("The command {cmd} has not been found")}, "id": req["id"]}).to_string()],
            })
        });
        let c = QmpClient::new(&sock, Duration::from_secs(2));
        c.connect(Duration::from_secs(2)).await.unwrap();
        assert_eq!(c.query_status().await.unwrap(), "paused");
        match c.execute("nope", None).await {
            Err(VmmError::Refused { message, .. }) => {
                assert_eq!(
                    message,
                    "CommandNotFound: The command nope has not been found"
                )
            }
            other => panic!("{other:?}"),
        }
        // A refusal does not cost the connection.
        assert_eq!(c.query_status().await.unwrap(), "paused");
        server.abort();
    }

    #[tokio::test]
    async fn a_silent_qemu_times_out_and_a_broken_connection_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        // Connection 1 answers the handshake, then hangs up on its first command
        // and ignores the next; connection 2 works.
        let server = fake_qemu(&sock, |conn, req| match req["execute"].as_str().unwrap() {
            "qmp_capabilities" => Some(vec![ret(req, json!({}))]),
            "stop" if conn == 1 => Some(vec![]),
            "cont" if conn == 1 => None,
            _ => Some(vec![ret(req, json!({"status": "running"}))]),
        });
        let c = QmpClient::new(&sock, Duration::from_millis(200));
        c.connect(Duration::from_secs(2)).await.unwrap();
        let t = Instant::now();
        assert!(matches!(
            c.execute("stop", None).await,
            Err(VmmError::Timeout { .. })
        ));
        assert!(t.elapsed() < Duration::from_secs(1));
        // The timed-out connection was dropped: this goes over connection 2.
        assert_eq!(c.query_status().await.unwrap(), "running");
        server.abort();
    }

    #[tokio::test]
    async fn a_connection_closed_by_qemu_is_reopened_once() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let server = fake_qemu(&sock, |conn, req| match req["execute"].as_str().unwrap() {
            "qmp_capabilities" => Some(vec![ret(req, json!({}))]),
            // Connection 1 hangs up on its first command.
            _ if conn == 1 => None,
            _ => Some(vec![ret(req, json!({"status": "running"}))]),
        });
        let c = QmpClient::new(&sock, Duration::from_secs(2));
        c.connect(Duration::from_secs(2)).await.unwrap();
        // Delivered, then the peer hung up: the command's fate is unknown, so it
        // fails rather than running twice.
        assert!(matches!(
            c.execute("stop", None).await,
            Err(VmmError::Transport { .. })
        ));
        assert_eq!(c.query_status().await.unwrap(), "running");
        server.abort();
    }

    #[tokio::test]
    async fn an_idle_connection_closed_by_qemu_is_replaced_transparently() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let server = fake_qemu(&sock, |conn, req| match req["execute"].as_str().unwrap() {
            // Connection 1 hangs up right after the handshake.
            "qmp_capabilities" if conn == 1 => Some(vec![ret(req, json!({})), "HANGUP".into()]),
            "qmp_capabilities" => Some(vec![ret(req, json!({}))]),
            _ => Some(vec![ret(req, json!({"status": "running"}))]),
        });
        let c = QmpClient::new(&sock, Duration::from_secs(2));
        c.connect(Duration::from_secs(2)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(c.query_status().await.unwrap(), "running");
        server.abort();
    }

    #[tokio::test]
    async fn no_socket_is_a_transport_error() {
        let dir = tempfile::tempdir().unwrap();
        let c = QmpClient::new(&dir.path().join("none.sock"), Duration::from_secs(1));
        match c.query_status().await {
            Err(VmmError::Transport { message, .. }) => assert!(message.contains("none.sock")),
            other => panic!("{other:?}"),
        }
    }
}
