//! A minimal blocking HTTP/1.1 client over TCP or a Unix stream socket.
//!
//! One keep-alive connection per [`Client`], a request written with a single
//! `write`, and a response read up to the end of its body (`Content-Length`,
//! chunked, or no body for 204/304). The daemon side and the bare Firecracker
//! side of a benchmark both go through this code, so the client's own cost is
//! the same on both sides.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Longest status or header line accepted.
const MAX_LINE: u64 = 16 * 1024;

/// Where a client connects.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// A TCP address (the daemon).
    Tcp(SocketAddr),
    /// A Unix stream socket (Firecracker's API socket).
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "http://{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// A response: status and the whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body (empty when there is none).
    pub body: Vec<u8>,
}

impl Response {
    /// True for 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as (lossy) text, for error messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> io::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("response is not JSON ({e}): {}", self.text()),
            )
        })
    }
}

/// One keep-alive connection to an endpoint, opened on first use and re-opened
/// once when a kept-alive connection turns out to be closed.
pub struct Client {
    endpoint: Endpoint,
    timeout: Duration,
    conn: Option<BufReader<Stream>>,
    /// How many connections this client opened.
    pub connects: u64,
}

/// What a failed exchange looked like, to decide whether a retry is safe.
enum Failure {
    /// Nothing of a response was read: the server may not have seen the request.
    BeforeResponse(io::Error),
    /// Part of a response was read.
    During(io::Error),
}

impl Client {
    /// A client for `endpoint`; each read or write may block at most `timeout`.
    pub fn new(endpoint: Endpoint, timeout: Duration) -> Client {
        Client {
            endpoint,
            timeout,
            conn: None,
            connects: 0,
        }
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Opens the connection now if there is none (so the next request does not
    /// pay for it).
    pub fn connect(&mut self) -> io::Result<()> {
        if self.conn.is_none() {
            self.conn = Some(BufReader::with_capacity(64 * 1024, self.open()?));
            self.connects += 1;
        }
        Ok(())
    }

    /// Drops the connection.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    fn open(&self) -> io::Result<Stream> {
        match &self.endpoint {
            Endpoint::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, self.timeout)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(self.timeout))?;
                s.set_write_timeout(Some(self.timeout))?;
                Ok(Stream::Tcp(s))
            }
            Endpoint::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_read_timeout(Some(self.timeout))?;
                s.set_write_timeout(Some(self.timeout))?;
                Ok(Stream::Unix(s))
            }
        }
    }

    /// Sends one request and reads the whole response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> io::Result<Response> {
        let bytes = encode_request(method, path, body);
        let reused = self.conn.is_some();
        match self.exchange(&bytes) {
            Ok(r) => Ok(r),
            // A kept-alive connection the server had closed: the request was not
            // seen, so sending it again on a fresh connection is safe.
            Err(Failure::BeforeResponse(_)) if reused => {
                self.conn = None;
                self.exchange(&bytes).map_err(|f| match f {
                    Failure::BeforeResponse(e) | Failure::During(e) => e,
                })
            }
            Err(Failure::BeforeResponse(e) | Failure::During(e)) => Err(e),
        }
    }

    /// `request` with a JSON body.
    pub fn request_json(
        &mut self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> io::Result<Response> {
        let bytes = serde_json::to_vec(body).expect("JSON values serialise");
        self.request(method, path, Some(&bytes))
    }

    fn exchange(&mut self, request: &[u8]) -> Result<Response, Failure> {
        self.connect().map_err(Failure::BeforeResponse)?;
        let conn = self.conn.as_mut().expect("connected above");
        if let Err(e) = conn.get_mut().write_all(request) {
            self.conn = None;
            return Err(Failure::BeforeResponse(e));
        }
        match read_response(conn) {
            Ok((resp, close)) => {
                if close {
                    self.conn = None;
                }
                Ok(resp)
            }
            Err(f) => {
                self.conn = None;
                Err(f)
            }
        }
    }
}

/// The request's bytes: request line, headers, body.
pub fn encode_request(method: &str, path: &str, body: Option<&[u8]>) -> Vec<u8> {
    let mut out =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    match body {
        Some(b) => {
            out.push_str("Content-Type: application/json\r\n");
            out.push_str(&format!("Content-Length: {}\r\n\r\n", b.len()));
        }
        None if matches!(method, "POST" | "PUT" | "PATCH") => {
            out.push_str("Content-Length: 0\r\n\r\n");
        }
        None => out.push_str("\r\n"),
    }
    let mut bytes = out.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    bytes
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// One line without its CRLF; `Ok(None)` at end of stream before any byte.
fn read_line<R: BufRead>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = r.by_ref().take(MAX_LINE).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(if n as u64 >= MAX_LINE {
            bad("response line too long")
        } else {
            io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-line")
        });
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

fn eof(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("connection closed {what}"),
    )
}

/// Reads one response; returns it and whether the server will close the
/// connection. Interim 1xx responses are skipped.
fn read_response<R: BufRead>(r: &mut R) -> Result<(Response, bool), Failure> {
    let status = loop {
        let line = match read_line(r) {
            Ok(Some(l)) => l,
            Ok(None) => return Err(Failure::BeforeResponse(eof("before the response"))),
            Err(e) => return Err(Failure::BeforeResponse(e)),
        };
        let status = parse_status(&line).map_err(Failure::During)?;
        if (100..200).contains(&status) {
            skip_headers(r).map_err(Failure::During)?;
            continue;
        }
        break status;
    };
    read_rest(r, status).map_err(Failure::During)
}

fn parse_status(line: &[u8]) -> io::Result<u16> {
    let text = String::from_utf8_lossy(line);
    let mut words = text.split_whitespace();
    match (words.next(), words.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code
            .parse()
            .map_err(|_| bad(format!("bad status line {text:?}"))),
        _ => Err(bad(format!("bad status line {text:?}"))),
    }
}

fn skip_headers<R: BufRead>(r: &mut R) -> io::Result<()> {
    loop {
        match read_line(r)? {
            None => return Err(eof("in the headers")),
            Some(l) if l.is_empty() => return Ok(()),
            Some(_) => {}
        }
    }
}

fn read_rest<R: BufRead>(r: &mut R, status: u16) -> io::Result<(Response, bool)> {
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut close = false;
    loop {
        let line = read_line(r)?.ok_or_else(|| eof("in the headers"))?;
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        let Some((name, value)) = text.split_once(':') else {
            return Err(bad(format!("bad header line {text:?}")));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                length = Some(
                    value
                        .parse()
                        .map_err(|_| bad(format!("bad Content-Length {value:?}")))?,
                )
            }
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let body = if status == 204 || status == 304 {
        Vec::new()
    } else if chunked {
        read_chunked(r)?
    } else if let Some(n) = length {
        let mut body = vec![0; n];
        r.read_exact(&mut body)?;
        body
    } else {
        // No length: the body runs to the end of the connection.
        close = true;
        let mut body = Vec::new();
        r.read_to_end(&mut body)?;
        body
    };
    Ok((Response { status, body }, close))
}

fn read_chunked<R: BufRead>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(r)?.ok_or_else(|| eof("in a chunk header"))?;
        let text = String::from_utf8_lossy(&line);
        let size_text = text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| bad(format!("bad chunk size {text:?}")))?;
        if size == 0 {
            skip_headers(r)?;
            return Ok(body);
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])?;
        match read_line(r)? {
            Some(l) if l.is_empty() => {}
            _ => return Err(bad("chunk not followed by CRLF")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn parse(bytes: &[u8]) -> (Response, bool) {
        match read_response(&mut &bytes[..]) {
            Ok(r) => r,
            Err(Failure::BeforeResponse(e) | Failure::During(e)) => panic!("{e}"),
        }
    }

    #[test]
    fn requests_are_one_buffer_with_a_length() {
        let r = encode_request("PUT", "/actions", Some(b"{}"));
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("PUT /actions HTTP/1.1\r\n"), "{text}");
        assert!(text.ends_with("Content-Length: 2\r\n\r\n{}"), "{text}");
        let r = String::from_utf8(encode_request("POST", "/v1/vm/a/pause", None)).unwrap();
        assert!(r.ends_with("Content-Length: 0\r\n\r\n"), "{r}");
        let r = String::from_utf8(encode_request("GET", "/v1/vm", None)).unwrap();
        assert!(!r.contains("Content-Length"), "{r}");
    }

    #[test]
    fn bodies_by_length_chunks_and_none() {
        let (r, close) = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello");
        assert_eq!(
            (r.status, r.body.as_slice(), close),
            (200, &b"hello"[..], false)
        );
        // Firecracker's status line has no reason phrase, and 204 has no length.
        let (r, _) = parse(b"HTTP/1.1 204 \r\nServer: Firecracker API\r\n\r\n");
        assert_eq!((r.status, r.body.len()), (204, 0));
        let (r, _) = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        );
        assert_eq!(r.body, b"abcde");
        let (r, close) =
            parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 x\r\nConnection: close\r\n\r\nboom");
        assert_eq!(
            (r.status, r.body.as_slice(), close),
            (500, &b"boom"[..], true)
        );
        assert!(matches!(
            read_response(&mut &b""[..]),
            Err(Failure::BeforeResponse(_))
        ));
        assert!(matches!(
            read_response(&mut &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"[..]),
            Err(Failure::During(_))
        ));
    }

    #[test]
    fn keep_alive_and_one_retry_on_a_closed_connection() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            // First connection: answers two requests, then closes while idle.
            for (conn_no, answers) in [(0, 2), (1, 1)] {
                let (s, _) = listener.accept().unwrap();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                for i in 0..answers {
                    skip_headers(&mut r).unwrap();
                    let body = format!("{conn_no}.{i}");
                    write!(
                        w,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .unwrap();
                }
            }
        });
        let mut c = Client::new(Endpoint::Unix(sock), Duration::from_secs(5));
        assert_eq!(c.request("GET", "/", None).unwrap().body, b"0.0");
        assert_eq!(c.request("GET", "/", None).unwrap().body, b"0.1");
        // The server closed the kept-alive connection: retried on a new one.
        assert_eq!(c.request("GET", "/", None).unwrap().body, b"1.0");
        assert_eq!(c.connects, 2);
        server.join().unwrap();
    }
}
