//! One HTTP/1.1 exchange with an upstream instance, driven inside the
//! request's own future: the request is written and the response read by
//! the task that proxies the client's request, with no connection task, no
//! channel between them and no wake-up of another task (what Pingora and
//! HAProxy do). [`H1Conn`] is the connection (socket, read buffer, write
//! buffer); [`H1Conn::send`] writes one request and reads the response
//! head; the response's [`H1Body`] reads the body from the socket as it is
//! polled and, once it ended cleanly, hands the connection back for reuse
//! ([`H1Body::take_reusable`]). The pool (`pool.rs`) keeps idle
//! connections; this module knows nothing of it.
//!
//! ## The request (RFC 9112 §3, §6; as hyper's client frames it)
//!
//! - Request line `METHOD origin-form HTTP/1.1` (the URI's path and query;
//!   `/` when it has none), then the headers as they are, encoded straight
//!   into the connection's write buffer.
//! - Body framing: a body that is empty and says so (`is_end_stream`) has
//!   none (its own `content-length`, if any, is kept); a `content-length`
//!   header present sets the length; else a body of known length gets a
//!   `content-length`; else a `GET`, `HEAD` or `CONNECT` sends no body (as
//!   hyper: those almost never have one), and any other method sends
//!   `transfer-encoding: chunked`. A request `transfer-encoding` header is
//!   never passed through (it is hop-by-hop; ours decides). A body longer
//!   than its length is cut at it; one shorter is an error (the connection
//!   is not reused). Request trailers go out (chunked only) when the request
//!   declared them in a `trailer` header, and only those declared.
//! - The head and the body frames ready at once (a buffered body: all of
//!   it, up to [`COALESCE_BYTES`]) go out in one `write`. A streamed body is
//!   written frame by frame as it comes, never buffered whole.
//! - A response that arrives while the body is still being sent (the
//!   server answered early, e.g. 413) ends the sending: it is returned as
//!   the answer and the connection is not reused (the server's reading
//!   position in the body is unknown).
//!
//! ## The response (RFC 9112 §4–§7)
//!
//! - Head parsed with `httparse`, with the server side's limits: at most
//!   [`MAX_HEADERS`] headers and [`MAX_HEADER_BYTES`] bytes of head; more
//!   is an error. 1xx responses other than 101 are read and skipped.
//! - Body framing (§6.3): a `HEAD` request, 1xx, 204 and 304 have none;
//!   `transfer-encoding` ending in `chunked` is decoded (chunk extensions
//!   ignored, trailers passed on as a trailers frame), with any other final
//!   coding the body runs to the close; else `content-length` (several
//!   equal values are one; differing or invalid values are an error, not a
//!   guess); else the body runs until the server closes.
//! - Reuse: the connection goes back only when the body ended cleanly with
//!   nothing after it, the response is HTTP/1.1 without `connection:
//!   close` (HTTP/1.0: only with `connection: keep-alive`), its framing was
//!   by length or chunks (not by close, nor `transfer-encoding` together
//!   with `content-length`), the request did not say `connection: close`,
//!   and the request was written whole. A body dropped before its end
//!   drops (closes) the connection; so does any error, and so does a
//!   future dropped mid-exchange (the client left, a deadline).
//! - An idle connection is checked before reuse ([`H1Conn::is_open`]): one
//!   the server closed, reset, or wrote to while idle is not used.
//!
//! No input from the backend can panic here: every length is checked, every
//! parse failure is an [`ExchangeError`].

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;

use super::http::{MAX_HEADERS, MAX_HEADER_BYTES};
use super::request_body::UpstreamBody;
use super::upstream_tls::UpstreamIo;
use super::BoxError;

/// The head and the body frames ready with it are written together up to
/// this many bytes; larger bodies go out in several writes.
pub(crate) const COALESCE_BYTES: usize = 64 * 1024;
/// The read buffer grows by this much when it has less than
/// [`MIN_READ_SPACE`] free (hyper's initial read size).
const READ_SIZE: usize = 8 * 1024;
/// Free space below which the read buffer is grown before a read.
const MIN_READ_SPACE: usize = 1024;
/// The longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// Why an exchange failed. Every one of them closes the connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    /// Reading from or writing to the instance failed.
    #[error("upstream I/O: {0}")]
    Io(#[from] io::Error),
    /// The instance closed before a whole response head arrived.
    #[error("upstream closed the connection before a complete response head")]
    ClosedBeforeHead,
    /// The instance closed in the middle of a body framed by length or
    /// chunks.
    #[error("upstream closed the connection in the middle of the response body")]
    ClosedInBody,
    /// The response head is not HTTP/1.x.
    #[error("invalid upstream response head: {0}")]
    Head(&'static str),
    /// The response head is larger than the limits.
    #[error("upstream response head over {MAX_HEADER_BYTES} bytes or {MAX_HEADERS} headers")]
    HeadTooLarge,
    /// `content-length` invalid or conflicting.
    #[error("invalid upstream content-length")]
    ContentLength,
    /// Chunked framing broken.
    #[error("invalid upstream chunked body: {0}")]
    Chunk(&'static str),
    /// The request body failed while being sent.
    #[error("request body: {0}")]
    RequestBody(BoxError),
    /// The request body ended short of its `content-length`.
    #[error("request body shorter than its content-length")]
    RequestBodyShort,
}

/// An HTTP/1.1 connection to an instance: the socket and its buffers,
/// one exchange at a time.
pub(crate) struct H1Conn {
    io: UpstreamIo,
    /// Bytes read and not consumed yet.
    read_buf: BytesMut,
    /// The request being written (kept between requests: no allocation
    /// per request once it has grown).
    write_buf: Vec<u8>,
}

impl fmt::Debug for H1Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H1Conn")
            .field("buffered", &self.read_buf.len())
            .finish_non_exhaustive()
    }
}

/// How a request's body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendFraming {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked; trailers only if declared.
    Chunked,
}

/// How a response's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadFraming {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    /// `content-length`.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Until the server closes.
    Close,
}

/// A parsed response head: the response without a body, its framing and
/// whether it lets the connection be reused.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    /// Status, version and headers.
    pub(crate) parts: http::response::Parts,
    framing: ReadFraming,
    keep_alive: bool,
}

impl H1Conn {
    /// A connection over `io`, just opened.
    pub(crate) fn new(io: UpstreamIo) -> Self {
        Self {
            io,
            read_buf: BytesMut::new(),
            write_buf: Vec::new(),
        }
    }

    /// Whether an idle connection may take a request: the server has not
    /// closed or reset it and sent nothing while it was idle. Polls the
    /// socket once without waiting (no waker kept).
    pub(crate) fn is_open(&mut self) -> bool {
        if !self.read_buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        matches!(self.poll_read_more(&mut cx), Poll::Pending)
    }

    /// Reads what the socket has into the read buffer: `Ok(0)` at its end.
    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read_buf.capacity() - self.read_buf.len() < MIN_READ_SPACE {
            self.read_buf.reserve(READ_SIZE);
        }
        let read = tokio::io::AsyncReadExt::read_buf(&mut self.io, &mut self.read_buf);
        pin!(read).poll(cx)
    }

    /// Writes the write buffer from `*written` on, as far as the socket
    /// takes it now; `Ready(Ok)` once all of it is written and flushed.
    fn poll_write_buf(
        &mut self,
        cx: &mut Context<'_>,
        written: &mut usize,
    ) -> Poll<io::Result<()>> {
        while *written < self.write_buf.len() {
            let n = match Pin::new(&mut self.io).poll_write(cx, &self.write_buf[*written..]) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        // TLS holds records until flushed; plain TCP flushes at once.
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Sends `req` and reads the response head; the response's body reads
    /// the rest from the connection, which it owns until it ends.
    pub(crate) async fn send(
        mut self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<H1Body>, ExchangeError> {
        let head_request = req.method() == Method::HEAD;
        let (parts, mut body) = req.into_parts();
        let close_asked = has_token(&parts.headers, b"close");
        let framing = send_framing(&parts, &body);
        let declared = (framing == SendFraming::Chunked)
            .then(|| trailer_names(&parts.headers))
            .filter(|names| !names.is_empty());
        self.write_buf.clear();
        encode_head(&parts, framing, &mut self.write_buf);
        drop(parts);

        let mut sender = BodySender {
            framing,
            left: match framing {
                SendFraming::Length(n) => n,
                _ => 0,
            },
            declared,
            done: framing == SendFraming::None,
            written: 0,
        };
        let mut early = None;
        std::future::poll_fn(|cx| {
            self.poll_send(cx, &mut body, &mut sender, head_request, &mut early)
        })
        .await?;
        drop(body);

        // A response before the request was sent whole: the server's place
        // in the request is unknown, so the connection is not reused.
        let sent_whole = early.is_none();
        let head = match early {
            Some(head) => head,
            None => std::future::poll_fn(|cx| self.poll_head(cx, head_request)).await?,
        };
        let reusable = head.keep_alive && !close_asked && sent_whole;
        Ok(Response::from_parts(
            head.parts,
            H1Body::new(self, head.framing, reusable),
        ))
    }

    /// Writes the request: what is buffered, then the body's frames as they
    /// come. While the socket or the body makes it wait, reads, so that a
    /// response sent early is seen ([`ExchangeError`] on a failure; `early`
    /// set when the response head came before the request was sent whole).
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        body: &mut UpstreamBody,
        sender: &mut BodySender,
        head_request: bool,
        early: &mut Option<ResponseHead>,
    ) -> Poll<Result<(), ExchangeError>> {
        loop {
            // Fill the write buffer with the frames ready now.
            let mut body_waits = false;
            while !sender.done && self.write_buf.len() - sender.written < COALESCE_BYTES {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Pending => {
                        body_waits = true;
                        break;
                    }
                    Poll::Ready(next) => sender.take(next, &mut self.write_buf)?,
                }
            }
            let flushed = self.poll_write_buf(cx, &mut sender.written)?;
            if flushed.is_ready() {
                self.write_buf.clear();
                sender.written = 0;
                if sender.done {
                    return Poll::Ready(Ok(()));
                }
                if !body_waits {
                    continue;
                }
            }
            // Waiting on the socket or the body: has the server answered?
            match self.poll_read_more(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(ExchangeError::ClosedBeforeHead)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Ready(Ok(_)) => {
                    if let Some(head) = take_head(&mut self.read_buf, head_request)? {
                        *early = Some(head);
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }

    /// Reads until a final response head is parsed.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
    ) -> Poll<Result<ResponseHead, ExchangeError>> {
        loop {
            if let Some(head) = take_head(&mut self.read_buf, head_request)? {
                return Poll::Ready(Ok(head));
            }
            match self.poll_read_more(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(ExchangeError::ClosedBeforeHead)),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

/// The sending side of a request body: framing and progress.
struct BodySender {
    framing: SendFraming,
    /// `Length`: bytes still owed.
    left: u64,
    /// Chunked: the names the `trailer` header declared, the only
    /// trailers sent.
    declared: Option<Vec<HeaderName>>,
    /// The body ended (or has none) and its end is encoded.
    done: bool,
    /// Bytes of the write buffer written already.
    written: usize,
}

impl BodySender {
    /// Encodes one polled body frame (or its end) into `out`.
    fn take(
        &mut self,
        next: Option<Result<Frame<Bytes>, BoxError>>,
        out: &mut Vec<u8>,
    ) -> Result<(), ExchangeError> {
        let frame = match next {
            None => {
                self.done = true;
                return match self.framing {
                    SendFraming::Length(_) if self.left > 0 => Err(ExchangeError::RequestBodyShort),
                    SendFraming::Chunked => {
                        out.extend_from_slice(b"0\r\n\r\n");
                        Ok(())
                    }
                    _ => Ok(()),
                };
            }
            Some(Err(e)) => return Err(ExchangeError::RequestBody(e)),
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                match self.framing {
                    SendFraming::None => {}
                    SendFraming::Length(_) => {
                        // Cut at the declared length, as hyper does.
                        let n = usize::try_from(self.left)
                            .unwrap_or(usize::MAX)
                            .min(data.len());
                        out.extend_from_slice(&data[..n]);
                        self.left -= n as u64;
                    }
                    SendFraming::Chunked if data.is_empty() => {}
                    SendFraming::Chunked => {
                        write_hex(out, data.len());
                        out.extend_from_slice(b"\r\n");
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                    }
                }
            }
            Err(frame) => {
                if let (Ok(trailers), SendFraming::Chunked) = (frame.into_trailers(), self.framing)
                {
                    out.extend_from_slice(b"0\r\n");
                    if let Some(declared) = &self.declared {
                        for (name, value) in &trailers {
                            if declared.contains(name) {
                                out.extend_from_slice(name.as_str().as_bytes());
                                out.extend_from_slice(b": ");
                                out.extend_from_slice(value.as_bytes());
                                out.extend_from_slice(b"\r\n");
                            }
                        }
                    }
                    out.extend_from_slice(b"\r\n");
                    self.done = true;
                }
            }
        }
        Ok(())
    }
}

/// The names the `trailer` headers of `headers` declare.
fn trailer_names(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut names = Vec::new();
    for value in headers.get_all(header::TRAILER) {
        for name in value.as_bytes().split(|b| *b == b',') {
            if let Ok(n) = HeaderName::from_bytes(name.trim_ascii()) {
                names.push(n);
            }
        }
    }
    names
}

/// The framing of a request with head `parts` and `body` (module doc).
fn send_framing(parts: &http::request::Parts, body: &UpstreamBody) -> SendFraming {
    if body.is_end_stream() {
        return SendFraming::None;
    }
    if parts.headers.contains_key(header::CONTENT_LENGTH) {
        // Ours to trust: the client's body was framed by it (hyper's server
        // checked it), or we set it.
        if let Ok(Some(n)) = content_length(&parts.headers) {
            return SendFraming::Length(n);
        }
    }
    if let Some(n) = body.size_hint().exact() {
        return SendFraming::Length(n);
    }
    match parts.method {
        Method::GET | Method::HEAD | Method::CONNECT => SendFraming::None,
        _ => SendFraming::Chunked,
    }
}

/// Encodes the request line and headers of `parts` with `framing`'s
/// headers into `out`.
fn encode_head(parts: &http::request::Parts, framing: SendFraming, out: &mut Vec<u8>) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    match parts.uri.path_and_query() {
        Some(pq) if !pq.as_str().is_empty() => out.extend_from_slice(pq.as_str().as_bytes()),
        _ => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let has_length = parts.headers.contains_key(header::CONTENT_LENGTH);
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONTENT_LENGTH && framing == SendFraming::Chunked {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        SendFraming::Length(n) if !has_length => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        SendFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in lowercase hex.
fn write_hex(out: &mut Vec<u8>, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(n >> (i * 4)) & 0xf]);
    }
}

/// Whether a `connection` header of `headers` names `token`.
fn has_token(headers: &HeaderMap, token: &[u8]) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    })
}

/// The `content-length` of `headers`: `Ok(None)` without one, an error for
/// an invalid value or values that differ (RFC 9110 §8.6, RFC 9112 §6.3).
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ExchangeError> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(ExchangeError::ContentLength);
            }
            let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            match length {
                Some(m) if m != n => return Err(ExchangeError::ContentLength),
                _ => length = Some(n),
            }
        }
    }
    Ok(length)
}

/// Parses a final response head off the front of `buf`, skipping 1xx
/// heads other than 101; `Ok(None)` while it is incomplete.
pub(crate) fn take_head(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<ResponseHead>, ExchangeError> {
    loop {
        let Some(head) = parse_head(buf, head_request)? else {
            return Ok(None);
        };
        let status = head.parts.status;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            continue;
        }
        return Ok(Some(head));
    }
}

/// Parses one response head off the front of `buf` (consumed when whole).
fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<ResponseHead>, ExchangeError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut slots);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEADER_BYTES => {
            return Err(ExchangeError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ExchangeError::HeadTooLarge),
        Err(e) => return Err(ExchangeError::Head(parse_error(e))),
    };
    if len > MAX_HEADER_BYTES {
        return Err(ExchangeError::HeadTooLarge);
    }
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        Some(1) => Version::HTTP_11,
        _ => return Err(ExchangeError::Head("version")),
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(ExchangeError::Head("status"))?;
    // Where each header lies in the head, so that the values can share
    // its bytes instead of each being copied.
    let base = buf.as_ptr() as usize;
    let mut spans = [(0usize, 0usize, 0usize, 0usize); MAX_HEADERS];
    let count = parsed.headers.len();
    for (span, h) in spans.iter_mut().zip(parsed.headers.iter()) {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        *span = (name, name + h.name.len(), value, value + h.value.len());
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for &(ns, ne, vs, ve) in &spans[..count] {
        let name = HeaderName::from_bytes(&head[ns..ne])
            .map_err(|_| ExchangeError::Head("header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
            .map_err(|_| ExchangeError::Head("header value"))?;
        headers.append(name, value);
    }

    let framing = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        ReadFraming::Empty
    } else if headers.contains_key(header::TRANSFER_ENCODING) {
        if final_coding_is_chunked(&headers) {
            ReadFraming::Chunked
        } else {
            ReadFraming::Close
        }
    } else {
        match content_length(&headers)? {
            Some(n) => ReadFraming::Length(n),
            None => ReadFraming::Close,
        }
    };
    let keep_alive = match version {
        Version::HTTP_11 => !has_token(&headers, b"close"),
        _ => has_token(&headers, b"keep-alive"),
    } && status != StatusCode::SWITCHING_PROTOCOLS
        && framing != ReadFraming::Close
        // Both: a smuggling shape (RFC 9112 §6.3 item 3): never reused.
        && !(headers.contains_key(header::TRANSFER_ENCODING)
            && headers.contains_key(header::CONTENT_LENGTH));
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(ResponseHead {
        parts,
        framing,
        keep_alive,
    }))
}

/// Whether the last `transfer-encoding` coding is `chunked`.
fn final_coding_is_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().rsplit(|b| *b == b',').next())
        .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "header name",
        httparse::Error::HeaderValue => "header value",
        httparse::Error::NewLine => "line ending",
        httparse::Error::Status => "status",
        httparse::Error::Token => "token",
        httparse::Error::Version => "version",
        httparse::Error::TooManyHeaders => "too many headers",
    }
}

/// Where a body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decode {
    /// `content-length` bytes still to come.
    Length(u64),
    /// Expecting a chunk-size line.
    ChunkSize,
    /// Inside a chunk, this many data bytes left.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: trailers and the final CRLF.
    Trailers,
    /// Until the server closes.
    Close,
    /// Ended cleanly.
    Done,
    /// Failed (or dropped its connection).
    Failed,
}

/// What one decoding step found in the buffer.
#[derive(Debug)]
pub(crate) enum Step {
    /// A frame to pass on.
    Frame(Frame<Bytes>),
    /// Need more bytes (never at `Done`).
    More,
    /// The body ended.
    End,
}

/// The decoder of a response body from its framing (sans I/O: the body
/// feeds it the bytes it read).
#[derive(Debug)]
pub(crate) struct Decoder {
    state: Decode,
}

impl Decoder {
    fn new(framing: ReadFraming) -> Self {
        let state = match framing {
            ReadFraming::Empty | ReadFraming::Length(0) => Decode::Done,
            ReadFraming::Length(n) => Decode::Length(n),
            ReadFraming::Chunked => Decode::ChunkSize,
            ReadFraming::Close => Decode::Close,
        };
        Self { state }
    }

    /// The decoder for the body of the response `head`.
    pub(crate) fn for_head(head: &ResponseHead) -> Self {
        Self::new(head.framing)
    }

    /// Whether the body ended cleanly.
    pub(crate) fn is_done(&self) -> bool {
        self.state == Decode::Done
    }

    /// The body's end at the server's close: the end of a body that runs to
    /// the close, an error otherwise.
    pub(crate) fn eof(&mut self) -> Result<(), ExchangeError> {
        match self.state {
            Decode::Close | Decode::Done => {
                self.state = Decode::Done;
                Ok(())
            }
            _ => {
                self.state = Decode::Failed;
                Err(ExchangeError::ClosedInBody)
            }
        }
    }

    /// Decodes from the front of `buf` what it can.
    pub(crate) fn step(&mut self, buf: &mut BytesMut) -> Result<Step, ExchangeError> {
        let stepped = self.step_inner(buf);
        if stepped.is_err() {
            self.state = Decode::Failed;
        }
        stepped
    }

    fn step_inner(&mut self, buf: &mut BytesMut) -> Result<Step, ExchangeError> {
        loop {
            match self.state {
                Decode::Done | Decode::Failed => return Ok(Step::End),
                Decode::Length(left) | Decode::ChunkData(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    self.state = match self.state {
                        Decode::Length(_) if left == 0 => Decode::Done,
                        Decode::Length(_) => Decode::Length(left),
                        _ if left == 0 => Decode::ChunkEnd,
                        _ => Decode::ChunkData(left),
                    };
                    return Ok(Step::Frame(Frame::data(data)));
                }
                Decode::Close => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Frame(Frame::data(buf.split().freeze())));
                }
                Decode::ChunkSize => {
                    let Some(eol) = buf.iter().position(|b| *b == b'\n') else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(ExchangeError::Chunk("size line too long"));
                        }
                        return Ok(Step::More);
                    };
                    if eol > MAX_CHUNK_LINE {
                        return Err(ExchangeError::Chunk("size line too long"));
                    }
                    let size = chunk_size(&buf[..eol])?;
                    let _ = buf.split_to(eol + 1);
                    self.state = if size == 0 {
                        Decode::Trailers
                    } else {
                        Decode::ChunkData(size)
                    };
                }
                Decode::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ExchangeError::Chunk("no CRLF after chunk data"));
                    }
                    let _ = buf.split_to(2);
                    self.state = Decode::ChunkSize;
                }
                Decode::Trailers => return self.trailers(buf),
            }
        }
    }

    /// The trailer section and the empty line that ends a chunked body.
    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Step, ExchangeError> {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let (len, fields) = match httparse::parse_headers(buf, &mut slots) {
            Ok(httparse::Status::Complete((len, fields))) => (len, fields),
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEADER_BYTES => {
                return Err(ExchangeError::Chunk("trailers too large"))
            }
            Ok(httparse::Status::Partial) => return Ok(Step::More),
            Err(_) => return Err(ExchangeError::Chunk("invalid trailers")),
        };
        let mut trailers = HeaderMap::with_capacity(fields.len());
        for f in fields.iter() {
            let name = HeaderName::from_bytes(f.name.as_bytes())
                .map_err(|_| ExchangeError::Chunk("invalid trailer name"))?;
            let value = HeaderValue::from_bytes(f.value)
                .map_err(|_| ExchangeError::Chunk("invalid trailer value"))?;
            trailers.append(name, value);
        }
        let _ = buf.split_to(len);
        self.state = Decode::Done;
        if trailers.is_empty() {
            Ok(Step::End)
        } else {
            Ok(Step::Frame(Frame::trailers(trailers)))
        }
    }
}

/// The size of a chunk-size line (`line` without its LF): hex digits, then
/// optional whitespace and extensions, then CR.
fn chunk_size(line: &[u8]) -> Result<u64, ExchangeError> {
    let line = line
        .strip_suffix(b"\r")
        .ok_or(ExchangeError::Chunk("no CR before LF"))?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ExchangeError::Chunk("no size"));
    }
    if digits > 15 {
        return Err(ExchangeError::Chunk("size too large"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest.starts_with(b";")) {
        return Err(ExchangeError::Chunk("invalid size"));
    }
    let mut size = 0u64;
    for d in &line[..digits] {
        // Hex digits only (checked above): the fallback is never taken.
        size = size * 16 + u64::from(char::from(*d).to_digit(16).unwrap_or(0));
    }
    Ok(size)
}

/// A response body read from its connection as it is polled (in the
/// polling task). Once it ended cleanly, a reusable connection is handed
/// back by [`take_reusable`](Self::take_reusable); dropped earlier, it
/// closes the connection.
pub(crate) struct H1Body {
    /// `None` once handed back or dropped after an error.
    conn: Option<H1Conn>,
    decoder: Decoder,
    /// The response and request let the connection be reused.
    reusable: bool,
    size: SizeHint,
}

impl fmt::Debug for H1Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H1Body")
            .field("decoder", &self.decoder)
            .field("reusable", &self.reusable)
            .finish_non_exhaustive()
    }
}

impl H1Body {
    fn new(conn: H1Conn, framing: ReadFraming, reusable: bool) -> Self {
        let size = match framing {
            ReadFraming::Empty => SizeHint::with_exact(0),
            ReadFraming::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        };
        Self {
            conn: Some(conn),
            decoder: Decoder::new(framing),
            reusable,
            size,
        }
    }

    /// The connection, if the body ended cleanly and it may take another
    /// request (module doc, **Reuse**); taken once.
    pub(crate) fn take_reusable(&mut self) -> Option<H1Conn> {
        if !(self.decoder.is_done() && self.reusable) {
            return None;
        }
        let conn = self.conn.take()?;
        // Bytes after the response: the server is out of step. Not reused.
        conn.read_buf.is_empty().then_some(conn)
    }

    fn fail(&mut self, e: ExchangeError) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        self.conn = None;
        self.decoder.state = Decode::Failed;
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.step(&mut conn.read_buf) {
                Ok(Step::Frame(frame)) => {
                    if let (Some(data), Some(left)) = (frame.data_ref(), this.size.upper()) {
                        this.size.set_exact(left.saturating_sub(data.len() as u64));
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(Step::End) => return Poll::Ready(None),
                Err(e) => return this.fail(e),
                Ok(Step::More) => {}
            }
            match conn.poll_read_more(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    // Its end by close: the connection cannot be reused.
                    this.reusable = false;
                    if let Err(e) = this.decoder.eof() {
                        return this.fail(e);
                    }
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.fail(e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.size.clone()
    }
}
