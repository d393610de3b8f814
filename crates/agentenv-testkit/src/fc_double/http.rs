//! A small blocking HTTP/1.1 server side: reads requests off a Unix stream
//! and writes responses shaped like Firecracker's (its status line has no
//! reason phrase, and it always says `Connection: keep-alive`).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;

/// The longest request line or header line accepted.
const MAX_LINE: usize = 8 * 1024;
/// The most header lines accepted in one request.
const MAX_HEADERS: usize = 100;

/// One parsed request.
#[derive(Debug)]
pub struct Request {
    /// `GET`, `PUT`, `PATCH` or `DELETE`.
    pub method: String,
    /// The absolute path, e.g. `/drives/rootfs`.
    pub path: String,
    /// The body; `None` when there was none (no or a zero Content-Length).
    pub body: Option<Vec<u8>>,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

/// Why no request could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection (between requests or in the middle of
    /// one).
    Closed,
    /// The bytes are not an acceptable request: answer 400 with this
    /// message, then close.
    Malformed(String),
}

impl From<io::Error> for ReadError {
    fn from(_: io::Error) -> Self {
        ReadError::Closed
    }
}

/// Reads one line (without its CRLF). `Ok(None)` means end of stream before
/// any byte.
fn read_line(reader: &mut BufReader<UnixStream>) -> Result<Option<Vec<u8>>, ReadError> {
    let mut line = Vec::new();
    let n = reader
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        if line.len() > MAX_LINE {
            return Err(ReadError::Malformed("Invalid request.".to_string()));
        }
        // The stream ended in the middle of a line.
        return Err(ReadError::Closed);
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

/// Takes the path out of a request target: origin form (`/a/b`) or absolute
/// form (`http://host/a/b`).
fn path_of(target: &str) -> Result<String, ReadError> {
    if target.is_empty() {
        return Err(ReadError::Malformed(
            "Invalid URI: Empty URI not allowed.".to_string(),
        ));
    }
    if target.starts_with('/') {
        return Ok(target.to_string());
    }
    for scheme in ["http://", "https://"] {
        if let Some(rest) = target.strip_prefix(scheme) {
            return Ok(match rest.find('/') {
                Some(i) => rest[i..].to_string(),
                None => "/".to_string(),
            });
        }
    }
    Err(ReadError::Malformed("Invalid request.".to_string()))
}

/// Reads the next request from `reader`. `writer` is the same stream, used
/// to answer `Expect: 100-continue`. Bodies larger than `payload_limit` are
/// refused.
pub fn read_request(
    reader: &mut BufReader<UnixStream>,
    writer: &mut UnixStream,
    payload_limit: usize,
) -> Result<Request, ReadError> {
    // Skip empty lines before the request line, as HTTP allows.
    let request_line = loop {
        match read_line(reader)? {
            None => return Err(ReadError::Closed),
            Some(line) if line.is_empty() => continue,
            Some(line) => break line,
        }
    };
    let request_line = String::from_utf8(request_line)
        .map_err(|_| ReadError::Malformed("Invalid request.".to_string()))?;
    let parts: Vec<&str> = request_line.split(' ').collect();
    if parts.len() != 3 {
        return Err(ReadError::Malformed("Invalid request.".to_string()));
    }
    let method = parts[0];
    if !matches!(method, "GET" | "PUT" | "PATCH" | "DELETE") {
        return Err(ReadError::Malformed(
            "Invalid HTTP Method: Unsupported HTTP method.".to_string(),
        ));
    }
    let path = path_of(parts[1])?;
    let http10 = match parts[2] {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => {
            return Err(ReadError::Malformed(
                "Invalid HTTP Version: Unsupported HTTP version.".to_string(),
            ))
        }
    };

    let mut content_length: usize = 0;
    let mut close = http10;
    let mut expect_continue = false;
    let mut header_count = 0;
    loop {
        let Some(line) = read_line(reader)? else {
            return Err(ReadError::Closed);
        };
        if line.is_empty() {
            break;
        }
        header_count += 1;
        if header_count > MAX_HEADERS {
            return Err(ReadError::Malformed("Invalid request.".to_string()));
        }
        let line = String::from_utf8(line).map_err(|_| {
            ReadError::Malformed("Invalid header. Reason: Invalid header.".to_string())
        })?;
        let Some((name, value)) = line.split_once(':') else {
            return Err(ReadError::Malformed(
                "Invalid header. Reason: Invalid header.".to_string(),
            ));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                content_length = value.parse().map_err(|_| {
                    ReadError::Malformed(format!(
                        "Invalid header. Reason: Invalid value. Key:Content-Length; Value:{value}"
                    ))
                })?;
            }
            "transfer-encoding" if !value.eq_ignore_ascii_case("identity") => {
                return Err(ReadError::Malformed(format!(
                    "Invalid header. Reason: Unsupported value. Key:Transfer-Encoding; \
                     Value:{value}"
                )));
            }
            "connection" => {
                if value.eq_ignore_ascii_case("close") {
                    close = true;
                } else if value.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }

    let body = if content_length == 0 {
        None
    } else {
        if content_length > payload_limit {
            return Err(ReadError::Malformed(format!(
                "Request payload with size {content_length} is larger than the limit of \
                 {payload_limit} allowed by server."
            )));
        }
        if expect_continue {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let mut body = vec![0u8; content_length];
        reader.read_exact(&mut body)?;
        Some(body)
    };

    Ok(Request {
        method: method.to_string(),
        path,
        body,
        close,
    })
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
