//! The HTTP/1.1 server side of the API socket, modelled on the behaviour of
//! Firecracker's HTTP server (`micro_http`):
//!
//! - Bytes are taken off the stream in reads of at most 1024 bytes into a
//!   fixed buffer and parsed as a state machine (request line, headers,
//!   body). Lines end with CRLF only; a line that does not fit in the buffer
//!   is an error.
//! - Only `GET`, `PUT` and `PATCH` exist; HTTP/1.0 and HTTP/1.1 are accepted.
//!   Of the headers only `Content-Length`, `Expect: 100-continue` and
//!   `Accept-Encoding` matter; other headers and unsupported values (e.g.
//!   `Transfer-Encoding: chunked`) are ignored.
//! - Bytes that cannot be parsed are answered with a 400 whose body is
//!   `{ "error": "<reason>\nAll previous unanswered requests will be
//!   dropped." }` (a raw newline: not valid JSON). The requests parsed from
//!   the same read are dropped, the rest of that read is discarded, and the
//!   connection stays open in the state the parser was in: after a bad
//!   request line the next bytes start a new request, after a bad header the
//!   next lines are still taken as headers of the same request.
//! - Responses have a status line without reason phrase and always say
//!   `Connection: keep-alive`; the server never closes a connection.
//!
//! One deliberate difference: a request with `Connection: close` gets its
//! answer and then the connection is closed (Firecracker ignores the header
//! and keeps the connection open).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

/// The size of the read buffer: no line (plus its CRLF) may be longer.
const BUFFER_SIZE: usize = 1024;
const CRLF: &[u8] = b"\r\n";
const DROPPED: &str = "All previous unanswered requests will be dropped.";
const INVALID_REQUEST: &str = "Invalid request.";

/// One parsed request.
#[derive(Debug)]
pub struct Request {
    /// `GET`, `PUT` or `PATCH`.
    pub method: &'static str,
    /// The absolute path, e.g. `/drives/rootfs`; empty when the request
    /// target had none (Firecracker routes that like `/`).
    pub path: String,
    /// The body; `None` when there was none (no or a zero Content-Length).
    pub body: Option<Vec<u8>>,
    /// The client asked to close the connection after this request (the
    /// double's one departure from Firecracker, see the module docs).
    pub close: bool,
}

/// What one read off the socket produced.
#[derive(Debug, Default)]
pub struct Batch {
    /// Interim `100 Continue` answers owed (the HTTP version of each
    /// request that asked), to be written before anything else.
    pub continues: Vec<&'static str>,
    /// Complete requests, in order.
    pub requests: Vec<Request>,
    /// The bytes could not be parsed: answer with [`write_parse_error`].
    /// `requests` is then empty.
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    RequestLine,
    Headers,
    Body,
}

/// The request being parsed.
#[derive(Debug)]
struct Pending {
    method: &'static str,
    path: String,
    version: &'static str,
    content_length: u32,
    expect_continue: bool,
    close: bool,
    body: Option<Vec<u8>>,
}

/// The reading side of one connection.
pub struct Connection {
    stream: UnixStream,
    buffer: Box<[u8; BUFFER_SIZE]>,
    /// Where the next read goes: bytes before it are an incomplete line
    /// kept from the previous read.
    read_cursor: usize,
    stage: Stage,
    pending: Option<Pending>,
    /// Body bytes still to come, and those already read.
    body_left: usize,
    body: Vec<u8>,
    payload_limit: usize,
}

fn find_crlf(bytes: &[u8]) -> Option<usize> {
    bytes.windows(CRLF.len()).position(|w| w == CRLF)
}

/// The path of a request target, as Firecracker takes it: the part from the
/// first `/` after `http://host`, the target itself when it starts with
/// `/`, otherwise nothing.
fn abs_path(uri: &str) -> &str {
    if let Some(rest) = uri.strip_prefix("http://") {
        return rest.find('/').map_or("", |i| &rest[i..]);
    }
    if uri.starts_with('/') {
        uri
    } else {
        ""
    }
}

fn parse_request_line(line: &[u8]) -> Result<Pending, String> {
    let split = |bytes: &[u8]| bytes.iter().position(|&b| b == b' ');
    let method_end = split(line).ok_or(INVALID_REQUEST)?;
    let (method, rest) = (&line[..method_end], &line[method_end + 1..]);
    let uri_end = split(rest).ok_or(INVALID_REQUEST)?;
    let (uri, version) = (&rest[..uri_end], &rest[uri_end + 1..]);
    let method = match method {
        b"GET" => "GET",
        b"PUT" => "PUT",
        b"PATCH" => "PATCH",
        _ => return Err("Invalid HTTP Method: Unsupported HTTP method.".to_string()),
    };
    if uri.is_empty() {
        return Err("Invalid URI: Empty URI not allowed.".to_string());
    }
    let uri = std::str::from_utf8(uri).map_err(|_| "Invalid URI: Cannot parse URI as UTF-8.")?;
    let version = match version {
        b"HTTP/1.0" => "HTTP/1.0",
        b"HTTP/1.1" => "HTTP/1.1",
        _ => return Err("Invalid HTTP Version: Unsupported HTTP version.".to_string()),
    };
    Ok(Pending {
        method,
        path: abs_path(uri).to_string(),
        version,
        content_length: 0,
        expect_continue: false,
        close: false,
        body: None,
    })
}

fn header_error(reason: String) -> String {
    format!("Invalid header. Reason: {reason}")
}

/// Applies one header line to `request`.
fn parse_header_line(request: &mut Pending, line: &[u8]) -> Result<(), String> {
    let line = std::str::from_utf8(line)
        .map_err(|e| header_error(format!("Header contains invalid characters. Key: {e}")))?;
    let Some((name, value)) = line.split_once(':') else {
        return Err(header_error(format!(
            "Header is incorrectly formatted. Key: {line}"
        )));
    };
    match name.trim().to_ascii_lowercase().as_str() {
        "content-length" => {
            request.content_length = value
                .trim()
                .parse()
                .map_err(|_| header_error(format!("Invalid value. Key:{name}; Value:{value}")))?;
        }
        "expect" if value.trim() == "100-continue" => request.expect_continue = true,
        "accept-encoding" => {
            let value = value.trim();
            if value.is_empty() {
                return Err(INVALID_REQUEST.to_string());
            }
            for encoding in value.split(',') {
                let refused = match encoding.trim() {
                    "identity;q=0" => true,
                    "*;q=0" => !value.contains("identity"),
                    _ => false,
                };
                if refused {
                    return Err(header_error(format!(
                        "Invalid value. Key:Accept-Encoding; Value:{encoding}"
                    )));
                }
            }
        }
        "connection" => request.close = value.trim().eq_ignore_ascii_case("close"),
        // Content-Type, Accept, Transfer-Encoding, Server and any other
        // header: nothing that changes the parsing.
        _ => {}
    }
    Ok(())
}

impl Connection {
    /// Reads requests from `stream`; bodies larger than `payload_limit` are
    /// refused.
    pub fn new(stream: UnixStream, payload_limit: usize) -> Connection {
        Connection {
            stream,
            buffer: Box::new([0; BUFFER_SIZE]),
            read_cursor: 0,
            stage: Stage::RequestLine,
            pending: None,
            body_left: 0,
            body: Vec::new(),
            payload_limit,
        }
    }

    /// Reads once from the stream (blocking) and parses what came.
    /// `Ok(None)` means the peer closed the connection.
    pub fn read_batch(&mut self) -> io::Result<Option<Batch>> {
        let n = loop {
            match self.stream.read(&mut self.buffer[self.read_cursor..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Ok(None);
        }
        let end = self.read_cursor + n;
        let mut batch = Batch::default();
        if let Err(message) = self.parse(end, &mut batch) {
            // As in Firecracker: what was parsed from this read is dropped,
            // and so are the bytes after the error (the read cursor stays
            // where it was), but the parser's state is kept.
            batch.requests.clear();
            batch.error = Some(message);
        }
        Ok(Some(batch))
    }

    fn parse(&mut self, end: usize, batch: &mut Batch) -> Result<(), String> {
        let mut start = 0;
        loop {
            let more = match self.stage {
                Stage::RequestLine => self.parse_request_line(&mut start, end)?,
                Stage::Headers => self.parse_headers(&mut start, end, batch)?,
                Stage::Body => self.parse_body(&mut start, end, batch)?,
            };
            if !more {
                return Ok(());
            }
        }
    }

    /// Keeps the incomplete line `start..end` for the next read.
    fn keep_tail(&mut self, start: usize, end: usize) {
        self.buffer.copy_within(start..end, 0);
        self.read_cursor = end - start;
    }

    fn finish_request(&mut self, batch: &mut Batch) {
        if let Some(p) = self.pending.take() {
            batch.requests.push(Request {
                method: p.method,
                path: p.path,
                body: p.body,
                close: p.close,
            });
        }
        self.stage = Stage::RequestLine;
    }

    fn parse_request_line(&mut self, start: &mut usize, end: usize) -> Result<bool, String> {
        let Some(len) = find_crlf(&self.buffer[*start..end]) else {
            if *start == 0 && end == BUFFER_SIZE {
                return Err(INVALID_REQUEST.to_string());
            }
            self.keep_tail(*start, end);
            return Ok(false);
        };
        let line = &self.buffer[*start..*start + len];
        *start += len + CRLF.len();
        self.pending = Some(parse_request_line(line)?);
        self.stage = Stage::Headers;
        Ok(true)
    }

    fn parse_headers(
        &mut self,
        start: &mut usize,
        end: usize,
        batch: &mut Batch,
    ) -> Result<bool, String> {
        let Some(len) = find_crlf(&self.buffer[*start..end]) else {
            if *start == 0 && end == BUFFER_SIZE {
                let text = String::from_utf8_lossy(&self.buffer[..]).into_owned();
                return Err(header_error(format!(
                    "Invalid content length. Header: {text}"
                )));
            }
            self.keep_tail(*start, end);
            return Ok(false);
        };
        let Some(request) = self.pending.as_mut() else {
            return Err(
                "No request was pending while the request headers were being parsed.".to_string(),
            );
        };
        if len > 0 {
            parse_header_line(request, &self.buffer[*start..*start + len])?;
            *start += len + CRLF.len();
            return Ok(true);
        }
        // The empty line: the end of the headers.
        let content_length = request.content_length as usize;
        if content_length == 0 {
            *start += CRLF.len();
            self.finish_request(batch);
            return Ok(true);
        }
        if content_length > self.payload_limit {
            return Err(format!(
                "Request payload with size {content_length} is larger than the limit of {} \
                 allowed by server.",
                self.payload_limit
            ));
        }
        if request.expect_continue {
            batch.continues.push(request.version);
        }
        *start += CRLF.len();
        self.body_left = content_length;
        self.body.clear();
        self.stage = Stage::Body;
        Ok(true)
    }

    fn parse_body(
        &mut self,
        start: &mut usize,
        end: usize,
        batch: &mut Batch,
    ) -> Result<bool, String> {
        let available = end - *start;
        if available < self.body_left {
            self.body.extend_from_slice(&self.buffer[*start..end]);
            self.body_left -= available;
            self.read_cursor = 0;
            return Ok(false);
        }
        let body_end = *start + self.body_left;
        self.body.extend_from_slice(&self.buffer[*start..body_end]);
        *start = body_end;
        self.body_left = 0;
        let body = std::mem::take(&mut self.body);
        let Some(request) = self.pending.as_mut() else {
            return Err(
                "No request was pending while the request body was being parsed.".to_string(),
            );
        };
        request.body = Some(body);
        self.finish_request(batch);
        Ok(true)
    }
}

/// Writes a response the way Firecracker's HTTP server does.
pub fn write_response(
    writer: &mut UnixStream,
    status: u16,
    body: Option<&str>,
    deprecation: bool,
) -> io::Result<()> {
    let mut out =
        format!("HTTP/1.1 {status} \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n");
    if deprecation {
        out.push_str("Deprecation: true\r\n");
    }
    if let Some(body) = body {
        out.push_str("Content-Type: application/json\r\n");
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    if let Some(body) = body {
        out.push_str(body);
    }
    writer.write_all(out.as_bytes())?;
    writer.flush()
}

/// Writes the interim answer to `Expect: 100-continue`.
pub fn write_continue(writer: &mut UnixStream, version: &str) -> io::Result<()> {
    let out =
        format!("{version} 100 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n");
    writer.write_all(out.as_bytes())?;
    writer.flush()
}

/// The body of the answer to bytes that could not be parsed (with a raw
/// newline, exactly as Firecracker writes it).
pub fn parse_error_body(message: &str) -> String {
    format!("{{ \"error\": \"{message}\n{DROPPED}\" }}")
}

/// Writes the answer to bytes that could not be parsed.
pub fn write_parse_error(writer: &mut UnixStream, message: &str) -> io::Result<()> {
    write_response(writer, 400, Some(&parse_error_body(message)), false)
}

/// The reason phrase of a status, for the log.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "200 OK",
        204 => "204 No Content",
        400 => "400 Bad Request",
        404 => "404 Not Found",
        413 => "413 Payload Too Large",
        _ => "500 Internal Server Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_taken_like_firecracker() {
        assert_eq!(abs_path("/drives/a"), "/drives/a");
        assert_eq!(abs_path("http://localhost/version"), "/version");
        assert_eq!(abs_path("http://localhost"), "");
        assert_eq!(abs_path("https://localhost/version"), "");
        assert_eq!(abs_path("version"), "");
    }

    #[test]
    fn request_lines_are_checked_in_order() {
        let err = |line: &[u8]| parse_request_line(line).err().unwrap();
        assert_eq!(err(b"GET /"), INVALID_REQUEST);
        assert_eq!(
            err(b"DELETE  HTTP/9"),
            "Invalid HTTP Method: Unsupported HTTP method."
        );
        assert_eq!(err(b"GET  HTTP/9"), "Invalid URI: Empty URI not allowed.");
        assert_eq!(
            err(b"GET / HTTP/1.1 x"),
            "Invalid HTTP Version: Unsupported HTTP version."
        );
        let ok = parse_request_line(b"PATCH http://h/vm HTTP/1.0").unwrap();
        assert_eq!(
            (ok.method, ok.path.as_str(), ok.version),
            ("PATCH", "/vm", "HTTP/1.0")
        );
    }

    #[test]
    fn headers_that_matter() {
        let mut req = parse_request_line(b"PUT /actions HTTP/1.1").unwrap();
        parse_header_line(&mut req, b"content-length : 12").unwrap();
        assert_eq!(req.content_length, 12);
        parse_header_line(&mut req, b"Transfer-Encoding: chunked").unwrap();
        parse_header_line(&mut req, b"Accept: text/html").unwrap();
        parse_header_line(&mut req, b"Expect: 100-continue").unwrap();
        assert!(req.expect_continue);
        assert_eq!(
            parse_header_line(&mut req, b"Content-Length: -1").unwrap_err(),
            "Invalid header. Reason: Invalid value. Key:Content-Length; Value: -1"
        );
        assert_eq!(
            parse_header_line(&mut req, b"Accept-Encoding: gzip, identity;q=0").unwrap_err(),
            "Invalid header. Reason: Invalid value. Key:Accept-Encoding; Value: identity;q=0"
        );
        assert_eq!(
            parse_header_line(&mut req, b"no colon").unwrap_err(),
            "Invalid header. Reason: Header is incorrectly formatted. Key: no colon"
        );
        assert_eq!(
            parse_error_body("Invalid request."),
            "{ \"error\": \"Invalid request.\nAll previous unanswered requests will be dropped.\" }"
        );
    }
}
