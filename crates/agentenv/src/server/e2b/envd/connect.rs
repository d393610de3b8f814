//! The Connect protocol with its JSON codec, as the SDK speaks it
//! (connectrpc.com/docs/protocol): unary calls (`application/json`),
//! server streams and client streams (`application/connect+json`, 5-byte
//! envelopes `[flags][len u32 BE][JSON]`, an end-stream envelope with flags
//! `0x02` last), and the proto3 JSON mapping of the messages (camelCase or
//! snake_case names, int64 as a string or a number, enums by name or number).
//!
//! Every malformed input is a Connect error, never a panic: a message over
//! [`MAX_MESSAGE`] is `resource_exhausted`, a broken envelope, bad JSON or
//! bad base64 `invalid_argument`, a wrong content type `unimplemented`
//! (HTTP 415).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::server::agent::ChannelBody;
use crate::server::e2b::error::{Code, ConnectError};

/// The largest request message taken (bytes of JSON).
pub const MAX_MESSAGE: usize = 4 << 20;

/// Envelope flag: the end-stream message.
const END_STREAM: u8 = 0x02;
/// Envelope flag: a compressed message (never negotiated here).
const COMPRESSED: u8 = 0x01;

/// How a method exchanges messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One message each way, `application/json`.
    Unary,
    /// One request envelope, a stream of answers.
    ServerStream,
    /// A stream of request envelopes, one answer.
    ClientStream,
}

/// Checks the request's content type against the method's shape.
pub fn check_content_type(headers: &HeaderMap, shape: Shape) -> Result<(), ConnectError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let base = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let want = match shape {
        Shape::Unary => "application/json",
        Shape::ServerStream | Shape::ClientStream => "application/connect+json",
    };
    if base == want {
        return Ok(());
    }
    Err(ConnectError::new(
        Code::Unimplemented,
        format!("content-type {ct:?} is not served for this method: send {want} (the JSON codec)"),
    ))
}

/// The answer for a wrong content type: 415 with the Connect error body.
pub fn unsupported_media(e: ConnectError) -> Response {
    let mut resp = e.into_response();
    *resp.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
    resp
}

/// `Connect-Timeout-Ms`: the call's deadline, when the client set one.
pub fn timeout_of(headers: &HeaderMap) -> Result<Option<Duration>, ConnectError> {
    let Some(v) = headers.get("connect-timeout-ms") else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("").trim();
    // The protocol allows at most 10 digits.
    match s.parse::<u64>() {
        Ok(ms) if !s.is_empty() && s.len() <= 10 => Ok(Some(Duration::from_millis(ms))),
        _ => Err(ConnectError::new(
            Code::InvalidArgument,
            format!("connect-timeout-ms: {s:?} is not a number of milliseconds"),
        )),
    }
}

/// `Keepalive-Ping-Interval` (seconds): how often an idle stream gets a
/// keepalive message; none when absent or 0.
pub fn keepalive_of(headers: &HeaderMap) -> Option<Duration> {
    let s = headers.get("keepalive-ping-interval")?.to_str().ok()?;
    let secs: u64 = s.trim().parse().ok()?;
    (secs > 0).then(|| Duration::from_secs(secs.min(3600)))
}

/// Reads a unary call's message: the whole body, as JSON.
pub async fn read_unary(body: Body) -> Result<Value, ConnectError> {
    let bytes = read_limited(body, MAX_MESSAGE).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    parse_message(&bytes)
}

/// Reads a server-streaming call's request: exactly one envelope.
pub async fn read_one_envelope(body: Body) -> Result<Value, ConnectError> {
    let mut reader = EnvelopeReader::new(body);
    let msg = reader.next().await?.ok_or_else(|| {
        ConnectError::new(Code::InvalidArgument, "the request has no message envelope")
    })?;
    if reader.next().await?.is_some() {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            "a server-streaming call takes exactly one request message",
        ));
    }
    Ok(msg)
}

/// Reads the body up to `limit` bytes.
async fn read_limited(mut body: Body, limit: usize) -> Result<Vec<u8>, ConnectError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body_error(&e))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(too_big(limit));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

fn too_big(limit: usize) -> ConnectError {
    ConnectError::new(
        Code::ResourceExhausted,
        format!("the request message is larger than {limit} bytes"),
    )
}

fn body_error(e: &axum::Error) -> ConnectError {
    ConnectError::new(
        Code::InvalidArgument,
        format!("reading the request body failed: {e}"),
    )
}

fn parse_message(bytes: &[u8]) -> Result<Value, ConnectError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        ConnectError::new(
            Code::InvalidArgument,
            format!("the request message is not JSON: {e}"),
        )
    })?;
    if !v.is_object() {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            "the request message must be a JSON object",
        ));
    }
    Ok(v)
}

/// The envelopes of a streaming request, read as they arrive.
pub struct EnvelopeReader {
    body: Body,
    buf: Vec<u8>,
    done: bool,
}

impl EnvelopeReader {
    /// Reads envelopes from `body`.
    pub fn new(body: Body) -> EnvelopeReader {
        EnvelopeReader {
            body,
            buf: Vec::new(),
            done: false,
        }
    }

    /// The next message, `None` at the end of the body (or after an
    /// end-stream envelope). A body cut inside an envelope is an error.
    pub async fn next(&mut self) -> Result<Option<Value>, ConnectError> {
        loop {
            if self.buf.len() >= 5 {
                let flags = self.buf[0];
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > MAX_MESSAGE {
                    return Err(too_big(MAX_MESSAGE));
                }
                if flags & COMPRESSED != 0 {
                    return Err(ConnectError::new(
                        Code::InvalidArgument,
                        "compressed envelopes are not accepted (connect-content-encoding: identity)",
                    ));
                }
                if flags & !END_STREAM != 0 {
                    return Err(ConnectError::new(
                        Code::InvalidArgument,
                        format!("envelope flags {flags:#04x} are not defined"),
                    ));
                }
                if self.buf.len() >= 5 + len {
                    let msg: Vec<u8> = self.buf.drain(..5 + len).skip(5).collect();
                    if flags & END_STREAM != 0 {
                        self.done = true;
                        return Ok(None);
                    }
                    return parse_message(&msg).map(Some);
                }
            }
            if self.done {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnectError::new(
                        Code::InvalidArgument,
                        format!(
                            "the request body ended inside an envelope ({} bytes left over)",
                            self.buf.len()
                        ),
                    ))
                };
            }
            match self.body.frame().await {
                None => self.done = true,
                Some(Err(e)) => return Err(body_error(&e)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// One envelope around `msg`.
fn envelope(flags: u8, msg: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(flags);
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    out.into()
}

/// The end-stream envelope: `{}`, or `{"error":{…}}`.
pub fn end_envelope(err: Option<&ConnectError>) -> Bytes {
    let v = match err {
        None => serde_json::json!({}),
        Some(e) => serde_json::json!({ "error": e.to_json() }),
    };
    envelope(
        END_STREAM,
        &serde_json::to_vec(&v).expect("json serialises"),
    )
}

/// The client went away: the stream's body is gone.
#[derive(Debug)]
pub struct Gone;

/// The sending half of a streaming response.
pub struct StreamSender {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
}

impl StreamSender {
    /// Sends one message (waits while the client is slow).
    pub async fn send(&self, msg: &Value) -> Result<(), Gone> {
        let bytes = serde_json::to_vec(msg).expect("json serialises");
        self.tx
            .send(Ok(envelope(0, &bytes)))
            .await
            .map_err(|_| Gone)
    }

    /// Ends the stream, with `err` or successfully.
    pub async fn finish(self, err: Option<ConnectError>) {
        let _ = self.tx.send(Ok(end_envelope(err.as_ref()))).await;
    }

    /// Resolves once the client has gone away.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// A streaming response and the sender that feeds it.
pub fn stream_response() -> (StreamSender, Response) {
    let (tx, rx) = mpsc::channel(8);
    let mut resp = (StatusCode::OK, Body::new(ChannelBody(rx))).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/connect+json"),
    );
    (StreamSender { tx }, resp)
}

/// A streaming response that is only an end-stream error.
pub fn stream_error(err: ConnectError) -> Response {
    stream_body(end_envelope(Some(&err)).to_vec())
}

/// One message envelope.
pub fn envelope_bytes(msg: &Value) -> Vec<u8> {
    envelope(0, &serde_json::to_vec(msg).expect("json serialises")).to_vec()
}

/// A whole streaming response body, known up front.
pub fn stream_body(body: Vec<u8>) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/connect+json"),
    );
    resp
}

/// A unary success.
pub fn unary_ok(msg: Value) -> Response {
    let mut resp = (StatusCode::OK, serde_json::to_vec(&msg).expect("json")).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

// --- proto3 JSON ---------------------------------------------------------

/// The field `name` (lowerCamelCase) of `msg`, also found under its
/// snake_case name; `null` counts as absent.
pub fn field<'a>(msg: &'a Value, name: &str) -> Option<&'a Value> {
    let obj = msg.as_object()?;
    let v = obj.get(name).or_else(|| {
        let snake = snake_case(name);
        (snake != name).then(|| obj.get(&snake)).flatten()
    })?;
    (!v.is_null()).then_some(v)
}

fn snake_case(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn wrong(name: &str, want: &str, v: &Value) -> ConnectError {
    ConnectError::new(
        Code::InvalidArgument,
        format!("{name}: expected {want}, got {v}"),
    )
}

/// A string field (`""` when absent).
pub fn string(msg: &Value, name: &str) -> Result<String, ConnectError> {
    opt_string(msg, name).map(Option::unwrap_or_default)
}

/// An optional string field.
pub fn opt_string(msg: &Value, name: &str) -> Result<Option<String>, ConnectError> {
    match field(msg, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(wrong(name, "a string", v)),
    }
}

/// An optional bool field.
pub fn opt_bool(msg: &Value, name: &str) -> Result<Option<bool>, ConnectError> {
    match field(msg, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong(name, "true or false", v)),
    }
}

/// A bool field (`false` when absent).
pub fn boolean(msg: &Value, name: &str) -> Result<bool, ConnectError> {
    opt_bool(msg, name).map(Option::unwrap_or_default)
}

/// An unsigned integer field (`0` when absent), as a number or a string.
pub fn uint(msg: &Value, name: &str, max: u64) -> Result<u64, ConnectError> {
    let Some(v) = field(msg, name) else {
        return Ok(0);
    };
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n <= max => Ok(n),
        _ => Err(wrong(name, &format!("an integer from 0 to {max}"), v)),
    }
}

/// An enum field (`0` when absent) by name or number; `names` maps the
/// names the method knows to their numbers.
pub fn enumeration(msg: &Value, name: &str, names: &[(&str, i64)]) -> Result<i64, ConnectError> {
    let Some(v) = field(msg, name) else {
        return Ok(0);
    };
    let found = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => names.iter().find(|(n, _)| *n == s).map(|&(_, i)| i),
        _ => None,
    };
    found.ok_or_else(|| {
        let known: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
        wrong(name, &format!("one of {}", known.join(", ")), v)
    })
}

/// A bytes field (standard base64) (`[]` when absent).
pub fn bytes(msg: &Value, name: &str) -> Result<Vec<u8>, ConnectError> {
    match field(msg, name) {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => {
            // proto3 JSON accepts the URL-safe alphabet too.
            let std: String = s
                .chars()
                .map(|c| match c {
                    '-' => '+',
                    '_' => '/',
                    c => c,
                })
                .collect();
            agentenv_api::base64::decode(&std).ok_or_else(|| {
                ConnectError::new(Code::InvalidArgument, format!("{name}: not valid base64"))
            })
        }
        Some(v) => Err(wrong(name, "a base64 string", v)),
    }
}

/// A `map<string,string>` field (empty when absent).
pub fn string_map(
    msg: &Value,
    name: &str,
) -> Result<std::collections::BTreeMap<String, String>, ConnectError> {
    let Some(v) = field(msg, name) else {
        return Ok(Default::default());
    };
    let obj = v
        .as_object()
        .ok_or_else(|| wrong(name, "an object of strings", v))?;
    obj.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            v => Err(wrong(&format!("{name}.{k}"), "a string", v)),
        })
        .collect()
}

/// A `repeated string` field (empty when absent).
pub fn strings(msg: &Value, name: &str) -> Result<Vec<String>, ConnectError> {
    let Some(v) = field(msg, name) else {
        return Ok(Vec::new());
    };
    let arr = v
        .as_array()
        .ok_or_else(|| wrong(name, "an array of strings", v))?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            v => Err(wrong(&format!("{name}[{i}]"), "a string", v)),
        })
        .collect()
}

/// A message field (an object; `{}` when absent).
pub fn message<'a>(msg: &'a Value, name: &str) -> Result<Option<&'a Value>, ConnectError> {
    match field(msg, name) {
        None => Ok(None),
        Some(v @ Value::Object(_)) => Ok(Some(v)),
        Some(v) => Err(wrong(name, "an object", v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn envelopes_are_read_across_chunks_and_a_cut_one_is_an_error() {
        let mut raw = envelope(0, br#"{"a":1}"#).to_vec();
        raw.extend_from_slice(&envelope(0, br#"{"b":2}"#));
        // Fed a byte at a time.
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            raw.iter().map(|b| Ok(Bytes::from(vec![*b]))).collect();
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let mut r = EnvelopeReader::new(body);
        assert_eq!(r.next().await.unwrap(), Some(json!({"a":1})));
        assert_eq!(r.next().await.unwrap(), Some(json!({"b":2})));
        assert_eq!(r.next().await.unwrap(), None);

        let cut = envelope(0, br#"{"a":1}"#).slice(..8);
        let e = EnvelopeReader::new(Body::from(cut))
            .next()
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);

        let mut huge = vec![0u8];
        huge.extend_from_slice(&((MAX_MESSAGE + 1) as u32).to_be_bytes());
        let e = EnvelopeReader::new(Body::from(huge))
            .next()
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::ResourceExhausted);

        let e = EnvelopeReader::new(Body::from(envelope(1, b"{}")))
            .next()
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        let e = EnvelopeReader::new(Body::from(envelope(0, b"{nope")))
            .next()
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
    }

    #[test]
    fn proto3_json_takes_both_spellings_and_number_forms() {
        let m = json!({"watcher_id": "w", "includeEntry": true, "depth": "3", "signal": 9,
            "sig2": "SIGNAL_SIGTERM", "data": "aGk=", "bad": "!!"});
        assert_eq!(string(&m, "watcherId").unwrap(), "w");
        assert!(boolean(&m, "includeEntry").unwrap());
        assert_eq!(uint(&m, "depth", 100).unwrap(), 3);
        assert_eq!(uint(&m, "missing", 100).unwrap(), 0);
        let names = [("SIGNAL_SIGTERM", 15), ("SIGNAL_SIGKILL", 9)];
        assert_eq!(enumeration(&m, "signal", &names).unwrap(), 9);
        assert_eq!(enumeration(&m, "sig2", &names).unwrap(), 15);
        assert_eq!(bytes(&m, "data").unwrap(), b"hi");
        assert_eq!(bytes(&m, "bad").unwrap_err().code, Code::InvalidArgument);
        assert_eq!(
            uint(&json!({"depth": -1}), "depth", 10).unwrap_err().code,
            Code::InvalidArgument
        );
        assert_eq!(
            string(&json!({"path": 3}), "path").unwrap_err().code,
            Code::InvalidArgument
        );
    }

    #[test]
    fn end_envelopes_carry_the_error() {
        let e = end_envelope(Some(&ConnectError::new(Code::DeadlineExceeded, "late")));
        assert_eq!(e[0], 2);
        let v: Value = serde_json::from_slice(&e[5..]).unwrap();
        assert_eq!(v["error"]["code"], "deadline_exceeded");
        assert_eq!(&end_envelope(None)[5..], b"{}");
    }
}
