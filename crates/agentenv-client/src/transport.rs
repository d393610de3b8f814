//! A minimal blocking HTTP/1.1 client over TCP or a Unix stream socket.
//!
//! One keep-alive connection per [`Client`], a request with a body in memory
//! written with a single `write`, and a response read up to the end of its body
//! (`Content-Length`, chunked, or no body for 204/304). The daemon side and the
//! bare Firecracker side of a benchmark both go through this code, so the
//! client's own cost is the same on both sides.
//!
//! Beyond that: extra request headers and the response's headers
//! ([`Request`], [`Response::header`]), request bodies streamed from a reader
//! ([`Body::Reader`]), response bodies read as a stream ([`Client::send_streaming`]),
//! and the pieces of a raw exchange ([`Endpoint::open`], [`ResponseHead::read`],
//! [`BodyReader`]) for tests that write bytes of their own.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::tls::{TlsClient, TlsError, TlsOptions};

/// Longest status or header line accepted.
const MAX_LINE: u64 = 16 * 1024;

/// Size of the chunks a body of unknown length is sent in.
const CHUNK: usize = 64 * 1024;

/// Where a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address (the daemon).
    Tcp(SocketAddr),
    /// A Unix stream socket (Firecracker's API socket, or a daemon's).
    Unix(PathBuf),
    /// HTTPS: TLS over TCP, the daemon's certificate checked for `name`.
    Https {
        /// The address connected to.
        addr: SocketAddr,
        /// The host name (or IP) the certificate must be valid for.
        name: String,
        /// The client configuration (CA, client certificate).
        tls: TlsClient,
    },
}

/// Why an endpoint string was refused.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Neither `http://HOST:PORT`, `https://HOST:PORT` nor `unix:/PATH`.
    #[error("endpoint {0:?} is neither http://HOST:PORT, https://HOST:PORT nor unix:/PATH")]
    Form(String),
    /// The TLS files of an `https://` endpoint cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The host name did not resolve.
    #[error("cannot resolve {addr:?}: {error}")]
    Resolve {
        /// The `HOST:PORT` part.
        addr: String,
        /// The resolver's error (in the message, so not a `source`).
        error: io::Error,
    },
}

impl Endpoint {
    /// Parses `http://HOST:PORT` (a trailing `/` allowed; the host is resolved
    /// now, the first address wins) or `unix:/PATH` (also `unix:///PATH`).
    pub fn parse(s: &str) -> Result<Endpoint, EndpointError> {
        Endpoint::parse_with(s, &TlsOptions::default())
    }

    /// Like [`Endpoint::parse`], also taking `https://HOST:PORT`, checked
    /// against the CA in `tls` (and sending its client certificate, if any).
    pub fn parse_with(s: &str, tls: &TlsOptions) -> Result<Endpoint, EndpointError> {
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if !path.starts_with('/') {
                return Err(EndpointError::Form(s.into()));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let (https, addr) = match (s.strip_prefix("http://"), s.strip_prefix("https://")) {
            (Some(a), _) => (false, a),
            (_, Some(a)) => (true, a),
            _ => return Err(EndpointError::Form(s.into())),
        };
        let addr = addr.strip_suffix('/').unwrap_or(addr);
        if addr.is_empty() || addr.contains('/') || !addr.contains(':') {
            return Err(EndpointError::Form(s.into()));
        }
        let tls = if https { Some(tls.client()?) } else { None };
        let resolve = |error| EndpointError::Resolve {
            addr: addr.into(),
            error,
        };
        let sockaddr = addr
            .to_socket_addrs()
            .map_err(resolve)?
            .next()
            .ok_or_else(|| resolve(io::Error::new(io::ErrorKind::NotFound, "no address")))?;
        Ok(match tls {
            None => Endpoint::Tcp(sockaddr),
            Some(tls) => {
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                Endpoint::Https {
                    addr: sockaddr,
                    name: host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                    tls,
                }
            }
        })
    }

    /// A new connection; reads and writes on it block at most `timeout`.
    pub fn open(&self, timeout: Duration) -> io::Result<Stream> {
        let s = match self {
            Endpoint::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, timeout)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Endpoint::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
            Endpoint::Https { addr, name, tls } => {
                let s = TcpStream::connect_timeout(addr, timeout)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                let server_name = rustls::pki_types::ServerName::try_from(name.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let mut conn = rustls::ClientConnection::new(tls.0.clone(), server_name)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let mut s = s;
                // The handshake now, so that a refused certificate is an error
                // of the connection, not of the first request.
                while conn.is_handshaking() {
                    conn.complete_io(&mut s)?;
                }
                Stream::Tls(Box::new(rustls::StreamOwned::new(conn, s)))
            }
        };
        s.set_timeout(Some(timeout))?;
        Ok(s)
    }
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Endpoint, EndpointError> {
        Endpoint::parse(s)
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "http://{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Https { addr, .. } => write!(f, "https://{addr}"),
        }
    }
}

/// One connection to an [`Endpoint`].
#[derive(Debug)]
pub enum Stream {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a Unix stream socket.
    Unix(UnixStream),
    /// TLS over TCP.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    /// A second handle on the same connection (to write from another thread).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "a TLS connection has one handle",
                ))
            }
        })
    }

    /// Sets both the read and the write timeout (`None`: block for ever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        match self {
            Stream::Tcp(s) => s.set_write_timeout(timeout),
            Stream::Unix(s) => s.set_write_timeout(timeout),
            Stream::Tls(s) => s.sock.set_write_timeout(timeout),
        }
    }

    /// Sets the read timeout (`None`: block for ever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
            Stream::Tls(s) => s.sock.set_read_timeout(timeout),
        }
    }

    /// Shuts down both directions.
    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tls(s) => s.sock.shutdown(std::net::Shutdown::Both),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// A request's body.
pub enum Body<'a> {
    /// No body.
    Empty,
    /// Bytes in memory.
    Bytes(&'a [u8]),
    /// Bytes read from `reader` as they are sent: `len` of them
    /// (`Content-Length`), or up to its end when `len` is `None` (chunked).
    Reader {
        /// Where the bytes come from.
        reader: Box<dyn Read + 'a>,
        /// How many bytes it yields, when known.
        len: Option<u64>,
    },
}

/// One request: method, target (sent verbatim), extra headers and a body.
pub struct Request<'a> {
    /// `GET`, `POST`, … (any token).
    pub method: &'a str,
    /// The request target, e.g. `/v1/vm?x=1`, sent exactly as given.
    pub target: &'a str,
    /// Headers sent after `Host` and `Accept`; a `Content-Type` here replaces
    /// the default `application/json` of a body.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Body<'a>,
}

impl<'a> Request<'a> {
    /// A request without a body or extra headers.
    pub fn new(method: &'a str, target: &'a str) -> Request<'a> {
        Request {
            method,
            target,
            headers: Vec::new(),
            body: Body::Empty,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Request<'a> {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: Body<'a>) -> Request<'a> {
        self.body = body;
        self
    }

    /// The request line and headers, ending with the empty line.
    fn head(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n",
            self.method, self.target
        );
        let mut typed = false;
        for (k, v) in &self.headers {
            typed |= k.eq_ignore_ascii_case("content-type");
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        let has_body = !matches!(self.body, Body::Empty);
        if has_body && !typed {
            out.push_str("Content-Type: application/json\r\n");
        }
        match &self.body {
            Body::Bytes(b) => out.push_str(&format!("Content-Length: {}\r\n", b.len())),
            Body::Reader { len: Some(n), .. } => out.push_str(&format!("Content-Length: {n}\r\n")),
            Body::Reader { len: None, .. } => out.push_str("Transfer-Encoding: chunked\r\n"),
            Body::Empty if matches!(self.method, "POST" | "PUT" | "PATCH") => {
                out.push_str("Content-Length: 0\r\n")
            }
            Body::Empty => {}
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

/// The request's bytes: request line, headers, body.
pub fn encode_request(method: &str, path: &str, body: Option<&[u8]>) -> Vec<u8> {
    let req = Request::new(method, path).body(body.map_or(Body::Empty, Body::Bytes));
    let mut bytes = req.head();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    bytes
}

/// A response: status, headers and the whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body (empty when there is none).
    pub body: Vec<u8>,
    /// The headers, in order, names as sent.
    pub headers: Vec<(String, String)>,
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

    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

fn find_header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (204, 304).
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Up to the end of the connection.
    ToEnd,
}

/// A response's status line and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The status code.
    pub status: u16,
    /// The headers, in order, names as sent.
    pub headers: Vec<(String, String)>,
    framing: Framing,
    close: bool,
}

impl ResponseHead {
    /// Reads a status line and headers off `r`, skipping interim 1xx responses.
    pub fn read<R: BufRead>(r: &mut R) -> io::Result<ResponseHead> {
        read_head(r).map_err(Failure::into_error)
    }

    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Whether the server closes the connection after this response.
    pub fn closes(&self) -> bool {
        self.close
    }

    /// The body that follows this head on `r`.
    pub fn body<R: BufRead>(&self, r: R) -> BodyReader<R> {
        BodyReader {
            inner: r,
            left: match self.framing {
                Framing::Empty => Some(0),
                Framing::Length(n) => Some(n),
                Framing::Chunked | Framing::ToEnd => None,
            },
            chunked: self.framing == Framing::Chunked,
            done: self.framing == Framing::Empty || self.framing == Framing::Length(0),
        }
    }
}

/// A response body as a stream: sized, chunked (decoded) or up to the end of
/// the connection. A sized body cut short is an `UnexpectedEof` error.
pub struct BodyReader<R> {
    inner: R,
    /// Bytes left of the body (sized) or of the current chunk; `None` before
    /// the first chunk or for a body running to the end.
    left: Option<u64>,
    chunked: bool,
    done: bool,
}

impl<R: BufRead> BodyReader<R> {
    /// True once the whole body was read (the connection can carry another
    /// request).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The connection under the body.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads the next chunk's size line (and the trailers after the last).
    fn next_chunk(&mut self) -> io::Result<()> {
        let line = read_line(&mut self.inner)?.ok_or_else(|| eof("in a chunk header"))?;
        let text = String::from_utf8_lossy(&line);
        let size_text = text.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size_text, 16)
            .map_err(|_| bad(format!("bad chunk size {text:?}")))?;
        if size == 0 {
            skip_headers(&mut self.inner)?;
            self.done = true;
        }
        self.left = Some(size);
        Ok(())
    }
}

impl<R: BufRead> Read for BodyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.chunked && matches!(self.left, None | Some(0)) {
            self.next_chunk()?;
            if self.done {
                return Ok(0);
            }
        }
        let want = match self.left {
            Some(n) => buf.len().min(usize::try_from(n).unwrap_or(usize::MAX)),
            None => buf.len(),
        };
        let n = self.inner.read(&mut buf[..want])?;
        match &mut self.left {
            None if n == 0 => self.done = true,
            None => {}
            Some(_) if n == 0 => return Err(eof("in the body")),
            Some(left) => {
                *left -= n as u64;
                if *left == 0 {
                    if self.chunked {
                        match read_line(&mut self.inner)? {
                            Some(l) if l.is_empty() => {}
                            _ => return Err(bad("chunk not followed by CRLF")),
                        }
                    } else {
                        self.done = true;
                    }
                }
            }
        }
        Ok(n)
    }
}

/// A response whose body is read as it comes; it owns its connection, which
/// is closed when it is dropped.
pub struct StreamingResponse {
    /// The status line and headers.
    pub head: ResponseHead,
    body: BodyReader<BufReader<Stream>>,
}

impl StreamingResponse {
    /// The status code.
    pub fn status(&self) -> u16 {
        self.head.status
    }

    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    /// Sets the read timeout for the rest of the body (`None`: wait for ever,
    /// e.g. for a command that is quiet for long).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.body.inner.get_ref().set_read_timeout(timeout)
    }

    /// Reads the rest of the body into a [`Response`].
    pub fn into_response(mut self) -> io::Result<Response> {
        let mut body = Vec::new();
        self.body.read_to_end(&mut body)?;
        Ok(Response {
            status: self.head.status,
            body,
            headers: self.head.headers,
        })
    }
}

impl Read for StreamingResponse {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.body.read(buf)
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

impl Failure {
    fn into_error(self) -> io::Error {
        match self {
            Failure::BeforeResponse(e) | Failure::During(e) => e,
        }
    }
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
            self.conn = Some(BufReader::with_capacity(
                64 * 1024,
                self.endpoint.open(self.timeout)?,
            ));
            self.connects += 1;
        }
        Ok(())
    }

    /// Drops the connection.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// Sends one request and reads the whole response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> io::Result<Response> {
        self.send(Request::new(method, path).body(body.map_or(Body::Empty, Body::Bytes)))
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

    /// Sends `req` and reads the whole response. A body from a reader goes on
    /// a fresh connection (it cannot be sent twice); one in memory is sent
    /// again, once, when a kept-alive connection turns out to be closed.
    pub fn send(&mut self, mut req: Request<'_>) -> io::Result<Response> {
        let head = req.head();
        let reused = self.conn.is_some() && !matches!(req.body, Body::Reader { .. });
        if matches!(req.body, Body::Reader { .. }) {
            self.conn = None;
        }
        match self.exchange(&head, &mut req.body) {
            Ok(r) => Ok(r),
            // A kept-alive connection the server had closed: the request was not
            // seen, so sending it again on a fresh connection is safe.
            Err(Failure::BeforeResponse(_)) if reused => {
                self.conn = None;
                self.exchange(&head, &mut req.body)
                    .map_err(Failure::into_error)
            }
            Err(f) => Err(f.into_error()),
        }
    }

    /// Sends `req` on a fresh connection and reads the response's head; the
    /// body is then read from the returned stream.
    pub fn send_streaming(&mut self, mut req: Request<'_>) -> io::Result<StreamingResponse> {
        self.conn = None;
        self.connect()?;
        let mut conn = self.conn.take().expect("connected above");
        let head = req.head();
        let head =
            write_and_read_head(&mut conn, &head, &mut req.body).map_err(Failure::into_error)?;
        let body = head.body(conn);
        Ok(StreamingResponse { head, body })
    }

    fn exchange(&mut self, head: &[u8], body: &mut Body<'_>) -> Result<Response, Failure> {
        self.connect().map_err(Failure::BeforeResponse)?;
        let conn = self.conn.as_mut().expect("connected above");
        let result = write_and_read_head(conn, head, body)
            .and_then(|head| read_body(conn, head).map_err(Failure::During));
        match result {
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

/// Writes the request's head and body, then reads the response's head. When
/// writing fails, a response the server sent before it stopped reading (an
/// early refusal) is still read.
fn write_and_read_head(
    conn: &mut BufReader<Stream>,
    head: &[u8],
    body: &mut Body<'_>,
) -> Result<ResponseHead, Failure> {
    if let Err(e) = write_body(conn.get_mut(), head, body) {
        return read_head(conn).map_err(|_| Failure::BeforeResponse(e));
    }
    read_head(conn)
}

fn write_body(w: &mut Stream, head: &[u8], body: &mut Body<'_>) -> io::Result<()> {
    match body {
        Body::Empty => w.write_all(head),
        Body::Bytes(b) => {
            let mut bytes = Vec::with_capacity(head.len() + b.len());
            bytes.extend_from_slice(head);
            bytes.extend_from_slice(b);
            w.write_all(&bytes)
        }
        Body::Reader { reader, len } => {
            w.write_all(head)?;
            match *len {
                Some(n) => {
                    let sent = io::copy(&mut reader.take(n), w)?;
                    if sent < n {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("request body ended after {sent} of {n} bytes"),
                        ));
                    }
                }
                None => {
                    let mut buf = vec![0u8; CHUNK];
                    loop {
                        let n = match reader.read(&mut buf) {
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(e),
                        };
                        if n == 0 {
                            break;
                        }
                        let mut chunk = format!("{n:x}\r\n").into_bytes();
                        chunk.extend_from_slice(&buf[..n]);
                        chunk.extend_from_slice(b"\r\n");
                        w.write_all(&chunk)?;
                    }
                    w.write_all(b"0\r\n\r\n")?;
                }
            }
            w.flush()
        }
    }
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

/// Reads one response head; interim 1xx responses are skipped.
fn read_head<R: BufRead>(r: &mut R) -> Result<ResponseHead, Failure> {
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
    read_headers(r, status).map_err(Failure::During)
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

fn read_headers<R: BufRead>(r: &mut R, status: u16) -> io::Result<ResponseHead> {
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = false;
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?.ok_or_else(|| eof("in the headers"))?;
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        let Some((name, value)) = text.split_once(':') else {
            return Err(bad(format!("bad header line {text:?}")));
        };
        let (name, value) = (name.trim(), value.trim());
        match name.to_ascii_lowercase().as_str() {
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
        headers.push((name.to_string(), value.to_string()));
    }
    let framing = if status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        // No length: the body runs to the end of the connection.
        close = true;
        Framing::ToEnd
    };
    Ok(ResponseHead {
        status,
        headers,
        framing,
        close,
    })
}

/// Reads the body after `head` into a whole response; also says whether the
/// server closes the connection after it.
fn read_body<R: BufRead>(r: &mut R, head: ResponseHead) -> io::Result<(Response, bool)> {
    let mut body = match head.framing {
        // A hint only: a lying length must not allocate gigabytes up front.
        Framing::Length(n) => Vec::with_capacity(n.min(1 << 26) as usize),
        _ => Vec::new(),
    };
    head.body(&mut *r).read_to_end(&mut body)?;
    let response = Response {
        status: head.status,
        body,
        headers: head.headers,
    };
    Ok((response, head.close))
}

/// Reads one whole response off `r` (head and body).
pub fn read_response<R: BufRead>(r: &mut R) -> io::Result<Response> {
    let head = ResponseHead::read(r)?;
    read_body(r, head).map(|(resp, _)| resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A whole response and whether the connection closes after it.
    fn parse_full(mut bytes: &[u8]) -> Result<(Response, bool), Failure> {
        let head = read_head(&mut bytes)?;
        read_body(&mut bytes, head).map_err(Failure::During)
    }

    fn parse(bytes: &[u8]) -> (Response, bool) {
        parse_full(bytes).unwrap_or_else(|f| panic!("{}", f.into_error()))
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
    fn extra_headers_replace_the_default_content_type() {
        let req = Request::new("PUT", "/f?path=%2Fx")
            .header("Authorization", "Bearer t")
            .header("Content-Type", "application/octet-stream")
            .body(Body::Bytes(b"ab"));
        let text = String::from_utf8(req.head()).unwrap();
        assert!(text.contains("Authorization: Bearer t\r\n"), "{text}");
        assert!(
            !text.contains("application/json\r\nContent-Length"),
            "{text}"
        );
        assert_eq!(text.matches("Content-Type").count(), 1, "{text}");
        let req = Request::new("PUT", "/f").body(Body::Reader {
            reader: Box::new(&b"x"[..]),
            len: None,
        });
        let text = String::from_utf8(req.head()).unwrap();
        assert!(
            text.ends_with("Transfer-Encoding: chunked\r\n\r\n"),
            "{text}"
        );
    }

    #[test]
    fn bodies_by_length_chunks_and_none() {
        let (r, close) = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello");
        assert_eq!(
            (r.status, r.body.as_slice(), close),
            (200, &b"hello"[..], false)
        );
        assert_eq!(r.header("Content-Length"), Some("5"));
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
        assert!(matches!(parse_full(b""), Err(Failure::BeforeResponse(_))));
        assert!(matches!(
            parse_full(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"),
            Err(Failure::During(_))
        ));
        assert!(matches!(
            parse_full(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX"),
            Err(Failure::During(_))
        ));
    }

    #[test]
    fn a_chunked_body_streams_in_small_reads_and_leaves_the_next_response() {
        let bytes: &[u8] =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1\r\n!\r\n0\r\n\r\nHTTP/1.1 204 \r\n\r\n";
        let mut r = BufReader::with_capacity(3, bytes);
        let head = ResponseHead::read(&mut r).unwrap();
        let mut body = head.body(&mut r);
        let mut out = Vec::new();
        let mut one = [0u8; 2];
        loop {
            let n = body.read(&mut one).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&one[..n]);
        }
        assert!(body.is_done());
        assert_eq!(out, b"hello!");
        assert_eq!(read_response(&mut r).unwrap().status, 204);
    }

    #[test]
    fn endpoints_parse_from_urls_and_unix_paths() {
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:8080/").unwrap(),
            Endpoint::Tcp("127.0.0.1:8080".parse().unwrap())
        );
        assert!(matches!(
            Endpoint::parse("http://localhost:1").unwrap(),
            Endpoint::Tcp(a) if a.port() == 1
        ));
        assert_eq!(
            "unix:/run/a.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/a.sock".into())
        );
        assert_eq!(
            Endpoint::parse("unix:///run/a.sock").unwrap().to_string(),
            "unix:/run/a.sock"
        );
        // https:// needs a CA to check the daemon against.
        assert!(
            matches!(
                Endpoint::parse("https://a:1"),
                Err(EndpointError::Tls(TlsError::NoCa))
            ),
            "https without a CA"
        );
        for bad in [
            "127.0.0.1:80",
            "https://a",
            "http://a",
            "http://a:1/v1",
            "unix:rel",
        ] {
            assert!(
                matches!(Endpoint::parse(bad), Err(EndpointError::Form(_))),
                "{bad}"
            );
        }
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
