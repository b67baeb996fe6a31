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
//!   into the connection's write buffer; the proxy's forwarding headers and
//!   `X-Request-Id` ([`ProxyHeaders`], worked out once per request) are
//!   written after them, the client's lines of the names they replace
//!   skipped: the map is never changed, so every attempt encodes the same
//!   head.
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
//!   is an error. 1xx responses other than 101 are read and skipped. A
//!   reason phrase other than the status's standard one is passed on.
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
//!   the server closed, reset, or wrote to while idle is not used. A close
//!   or reset that arrives before any byte of a response is
//!   [`ExchangeError::Unanswered`]: on a reused connection that is the race
//!   with the server's idle close, which the pool tells apart (`pool.rs`,
//!   **HTTP/1.1**).
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
use http::{Method, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;

use super::headers::{is_hop_by_hop_name, name_is, write_header, write_line, ProxyHeaders};
use super::http::{MAX_HEADERS, MAX_HEADER_BYTES};
use super::raw_head::RawHeaders;
use super::request_body::UpstreamBody;
use super::spare_maps;
use super::upstream_tls::UpstreamIo;
use super::BoxError;

/// The head and the body frames ready with it are written together up to
/// this many bytes; larger bodies go out in several writes.
pub(crate) const COALESCE_BYTES: usize = 64 * 1024;
/// The read buffer grows by this much when it has less than
/// [`MIN_READ_SPACE`] free, at first (hyper's initial read size); doubled
/// after each read that filled the space it had, up to [`MAX_READ_SIZE`],
/// so a large body is read in fewer system calls.
const READ_SIZE: usize = 8 * 1024;
/// The largest read the buffer is grown for.
const MAX_READ_SIZE: usize = 64 * 1024;
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
    /// The instance closed or reset the connection before any byte of a
    /// response arrived (`None`: closed; else the reset's error).
    #[error("upstream closed the connection before any byte of a response{}", .0.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Unanswered(Option<io::Error>),
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
    /// How much the read buffer is grown by when it runs short.
    read_size: usize,
    /// The current exchange's [`RequestHead::raw_response`].
    raw_response: bool,
    /// A byte of the current exchange's response has been read.
    heard: bool,
    /// The current response's head kept as lines, until the writer takes
    /// it ([`H1Body::take_kept_head`]). Here, boxed with the connection,
    /// rather than in the body, which is moved a few times.
    kept_head: Option<RawHeaders>,
}

impl fmt::Debug for H1Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H1Conn")
            .field("buffered", &self.read_buf.len())
            .finish_non_exhaustive()
    }
}

/// The head of a request to send, borrowed from the caller.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestHead<'a> {
    pub(crate) method: &'a Method,
    /// Sent in origin form: its path and query.
    pub(crate) uri: &'a http::Uri,
    pub(crate) headers: &'a HeaderMap,
    /// Sent instead of the headers' Host (in its place; last when they
    /// have none).
    pub(crate) host: Option<&'a HeaderValue>,
    /// The response head may be kept as its lines
    /// ([`raw_head`](super::raw_head)): the client is answered by
    /// `h1_server`'s writer.
    pub(crate) raw_response: bool,
    /// The proxy's forwarding headers and request id, sent instead of the
    /// client's lines of those names, after the others (`headers.rs`).
    pub(crate) added: Option<&'a ProxyHeaders<'a>>,
}

impl<'a> RequestHead<'a> {
    /// The head of `parts`, its own Host kept.
    #[cfg(test)]
    pub(crate) fn of(parts: &'a http::request::Parts) -> Self {
        Self {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            host: None,
            raw_response: false,
            added: None,
        }
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
    /// A connection over `io`, just opened. Boxed once for its life: the
    /// request's future, the response body and the idle list move a
    /// pointer, not the socket and its buffers.
    pub(crate) fn new(io: UpstreamIo) -> Box<Self> {
        Box::new(Self {
            io,
            read_buf: BytesMut::new(),
            write_buf: Vec::new(),
            read_size: READ_SIZE,
            raw_response: false,
            heard: false,
            kept_head: None,
        })
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
            self.read_buf.reserve(self.read_size);
        }
        let space = self.read_buf.capacity() - self.read_buf.len();
        let read = tokio::io::AsyncReadExt::read_buf(&mut self.io, &mut self.read_buf);
        let polled = pin!(read).poll(cx);
        if let Poll::Ready(Ok(n)) = polled {
            self.heard |= n > 0;
            if n == space {
                self.read_size = (self.read_size * 2).min(MAX_READ_SIZE);
            }
        }
        polled
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
    #[cfg(test)]
    pub(crate) async fn send_request(
        self: Box<Self>,
        req: http::Request<UpstreamBody>,
    ) -> Result<Response<H1Body>, ExchangeError> {
        let (parts, body) = req.into_parts();
        self.send(RequestHead::of(&parts), body).await
    }

    /// Sends the request `head` with `body` and reads the response head;
    /// the response's body reads the rest from the connection, which it
    /// owns until it ends. The head is only borrowed: the caller keeps it
    /// (for a retry) without a copy.
    pub(crate) async fn send(
        mut self: Box<Self>,
        head: RequestHead<'_>,
        mut body: UpstreamBody,
    ) -> Result<Response<H1Body>, ExchangeError> {
        let head_request = head.method == Method::HEAD;
        self.raw_response = head.raw_response;
        self.heard = false;
        self.kept_head = None;
        let framing = send_framing(&head, &body);
        let declared = (framing == SendFraming::Chunked)
            .then(|| trailer_names(head.headers))
            .filter(|names| !names.is_empty());
        if self.write_buf.capacity() > 2 * COALESCE_BYTES {
            // A large body frame grew it; an idle connection keeps no more.
            self.write_buf = Vec::new();
        }
        self.write_buf.clear();
        let close_asked = encode_head(&head, framing, &mut self.write_buf);

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
        .await
        .map_err(|e| self.unanswered(e))?;
        drop(body);

        // A response before the request was sent whole: the server's place
        // in the request is unknown, so the connection is not reused.
        let sent_whole = early.is_none();
        let head = match early {
            Some(head) => head,
            None => std::future::poll_fn(|cx| self.poll_head(cx, head_request))
                .await
                .map_err(|e| self.unanswered(e))?,
        };
        let reusable = head.keep_alive && !close_asked && sent_whole;
        Ok(Response::from_parts(
            head.parts,
            H1Body::new(self, head.framing, reusable),
        ))
    }

    /// `e` as [`ExchangeError::Unanswered`] when it is a close or a reset
    /// and no byte of the response has arrived.
    fn unanswered(&self, e: ExchangeError) -> ExchangeError {
        if self.heard {
            return e;
        }
        match e {
            ExchangeError::ClosedBeforeHead => ExchangeError::Unanswered(None),
            ExchangeError::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionAborted
                ) =>
            {
                ExchangeError::Unanswered(Some(e))
            }
            e => e,
        }
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
                    if let Some(head) = take_head(
                        &mut self.read_buf,
                        head_request,
                        self.raw_response.then_some(&mut self.kept_head),
                    )? {
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
            // An empty buffer (the usual case right after the request went
            // out, and at the wake-up before the read) holds no head: no
            // parse.
            if !self.read_buf.is_empty() {
                if let Some(head) = take_head(
                    &mut self.read_buf,
                    head_request,
                    self.raw_response.then_some(&mut self.kept_head),
                )? {
                    return Poll::Ready(Ok(head));
                }
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
                                write_header(out, name.as_str().as_bytes(), value.as_bytes());
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
fn send_framing(parts: &RequestHead<'_>, body: &UpstreamBody) -> SendFraming {
    if body.is_end_stream() {
        return SendFraming::None;
    }
    if parts.headers.contains_key(header::CONTENT_LENGTH) {
        // Ours to trust: the client's body was framed by it (hyper's server
        // checked it), or we set it.
        if let Ok(Some(n)) = content_length(parts.headers) {
            return SendFraming::Length(n);
        }
    }
    if let Some(n) = body.size_hint().exact() {
        return SendFraming::Length(n);
    }
    match *parts.method {
        Method::GET | Method::HEAD | Method::CONNECT => SendFraming::None,
        _ => SendFraming::Chunked,
    }
}

/// Encodes the request line and headers of `parts` with `framing`'s
/// headers into `out`; returns whether a `connection` header names `close`
/// (read in the same pass over the headers: a lookup of `content-length`
/// and of `connection` fewer).
fn encode_head(parts: &RequestHead<'_>, framing: SendFraming, out: &mut Vec<u8>) -> bool {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    match parts.uri.path_and_query() {
        Some(pq) if !pq.as_str().is_empty() => out.extend_from_slice(pq.as_str().as_bytes()),
        _ => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_length = false;
    let mut close_asked = false;
    let mut host = parts.host;
    for (name, mut value) in parts.headers {
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::HOST && parts.host.is_some() {
            // The replacement, once, where the first Host stood.
            match host.take() {
                Some(h) => value = h,
                None => continue,
            }
        }
        if name == header::CONTENT_LENGTH {
            has_length = true;
            if framing == SendFraming::Chunked {
                continue;
            }
        }
        if name == header::CONNECTION && has_token(value, b"close") {
            close_asked = true;
        }
        let name = name.as_str();
        if parts.added.is_some_and(|a| a.replaces(name)) {
            continue;
        }
        write_header(out, name.as_bytes(), value.as_bytes());
    }
    if let Some(added) = parts.added {
        added.write_to(out);
    }
    if let Some(h) = host {
        write_line(out, b"host: ", h.as_bytes());
    }
    match framing {
        SendFraming::Length(n) if !has_length => {
            out.extend_from_slice(b"content-length: ");
            write_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        SendFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
    close_asked
}

/// Appends `n` in decimal (no allocation, unlike `to_string`).
fn write_decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends `n` in lowercase hex.
fn write_hex(out: &mut Vec<u8>, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(n >> (i * 4)) & 0xf]);
    }
}

/// Whether a `connection` header value names `token`.
fn has_token(value: &HeaderValue, token: &[u8]) -> bool {
    value
        .as_bytes()
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// The `content-length` of `headers`: `Ok(None)` without one, an error for
/// an invalid value or values that differ (RFC 9110 §8.6, RFC 9112 §6.3).
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ExchangeError> {
    content_length_of(
        headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .map(HeaderValue::as_bytes),
    )
}

/// [`content_length`] over the values of the `content-length` headers.
fn content_length_of<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<u64>, ExchangeError> {
    let mut length = None;
    for value in values {
        for part in value.split(|b| *b == b',') {
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
/// heads other than 101; `Ok(None)` while it is incomplete. With `kept`,
/// the head may be kept there as its lines, its map left empty
/// ([`raw_head`](super::raw_head)): an out-parameter rather than a field of
/// the head, which is moved out of each parse, complete or not.
pub(crate) fn take_head(
    buf: &mut BytesMut,
    head_request: bool,
    mut kept: Option<&mut Option<RawHeaders>>,
) -> Result<Option<ResponseHead>, ExchangeError> {
    loop {
        let Some(head) = parse_head(buf, head_request, kept.as_deref_mut())? else {
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
    kept: Option<&mut Option<RawHeaders>>,
) -> Result<Option<ResponseHead>, ExchangeError> {
    // Uninitialised slots: nothing to clear per parse (httparse's own
    // safe API for them).
    let mut slots = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEADER_BYTES => {
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
    // A reason phrase other than the status's own is passed on (hyper's
    // server writes it from this extension), as hyper's client did; an
    // empty one gets the standard phrase.
    let reason = parsed
        .reason
        .filter(|r| !r.is_empty() && Some(*r) != status.canonical_reason())
        .and_then(|r| hyper::ext::ReasonPhrase::try_from(r.as_bytes().to_vec()).ok());
    // `Connection` read here, off the parsed head: when it holds only
    // `close`/`keep-alive` (nginx's `keep-alive` on every response) it
    // names no other header and is not put in the map, where the response
    // path would only look it up and strip it (hop-by-hop) again.
    let connection = ConnectionTokens::of(parsed.headers);
    // The framing headers, likewise read before the map is built: three
    // lookups (hash and probe each) fewer per response.
    let named = |name: &'static str| {
        parsed
            .headers
            .iter()
            .filter(move |h| name_is(h.name.as_bytes(), name))
            .map(|h| h.value)
    };
    // Whether there is a `transfer-encoding`, and its last coding chunked.
    let transfer_encoding = named("transfer-encoding")
        .next_back()
        .map(final_coding_is_chunked);
    let content_length = named("content-length");
    let has_content_length = content_length.clone().next().is_some();
    let length = content_length_of(content_length);
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // Both framings: a smuggling shape, left to the map path's rules.
    let both_framings = transfer_encoding.is_some() && has_content_length;
    let other_hop_by_hop = || {
        parsed.headers.iter().any(|h| {
            is_hop_by_hop_name(h.name)
                && !name_is(h.name.as_bytes(), "connection")
                && !name_is(h.name.as_bytes(), "transfer-encoding")
        })
    };
    let keep_raw = kept.is_some()
        && !(bodiless || connection.names_others || both_framings)
        && !other_hop_by_hop();
    let spans = if keep_raw {
        // What the writer frames itself, and `Connection`, read above.
        HeaderSpans::of_matching(buf, parsed.headers, |h| {
            let name = h.name.as_bytes();
            !(name_is(name, "connection")
                || name_is(name, "content-length")
                || name_is(name, "transfer-encoding"))
        })
    } else if connection.names_others {
        HeaderSpans::of(buf, parsed.headers)
    } else {
        HeaderSpans::of_without(buf, parsed.headers, header::CONNECTION.as_str())
    };
    let count = spans.len();
    let head = buf.split_to(len).freeze();
    let headers = match kept {
        Some(kept) if keep_raw => {
            *kept = Some(RawHeaders::new(head, spans));
            // Kept as lines: the map stays empty (no spare taken; the
            // request id goes with the lines, `raw_head`).
            HeaderMap::new()
        }
        _ => {
            // A spare map (the last request's, `spare_maps`), with room
            // for a request's headers too: a client connection keeps this
            // map, once the response head is written, for the next request
            // it parses (to which an HTTP/2 attempt or an upgrade adds the
            // forwarding headers).
            let mut headers = spare_maps::take(count);
            spans
                .append_to(&head, &mut headers)
                .map_err(ExchangeError::Head)?;
            headers
        }
    };

    let framing = if bodiless {
        ReadFraming::Empty
    } else if let Some(chunked) = transfer_encoding {
        if chunked {
            ReadFraming::Chunked
        } else {
            ReadFraming::Close
        }
    } else {
        match length? {
            Some(n) => ReadFraming::Length(n),
            None => ReadFraming::Close,
        }
    };
    let keep_alive = match version {
        Version::HTTP_11 => !connection.close,
        _ => connection.keep_alive,
    } && status != StatusCode::SWITCHING_PROTOCOLS
        && framing != ReadFraming::Close
        // Both: a smuggling shape (RFC 9112 §6.3 item 3): never reused.
        && !(transfer_encoding.is_some() && has_content_length);
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    if let Some(reason) = reason {
        parts.extensions.insert(reason);
    }
    Ok(Some(ResponseHead {
        parts,
        framing,
        keep_alive,
    }))
}

/// What the `Connection` headers of a parsed head say.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
    /// A token other than those two (`upgrade`, a header name): the
    /// headers stay in the map for the hop-by-hop rules.
    names_others: bool,
}

impl ConnectionTokens {
    fn of(headers: &[httparse::Header<'_>]) -> Self {
        let mut tokens = Self::default();
        for h in headers
            .iter()
            .filter(|h| name_is(h.name.as_bytes(), "connection"))
        {
            for token in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    tokens.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    tokens.keep_alive = true;
                } else if !token.is_empty() {
                    tokens.names_others = true;
                }
            }
        }
        tokens
    }
}

/// Where each header of a parsed head lies in its buffer, kept across the
/// split that ends `httparse`'s borrow, so that the header values share
/// the head's bytes instead of each being copied (both directions: the
/// response heads here, the request heads of `h1_server`).
pub(crate) struct HeaderSpans {
    /// Name start and end, value start and end, per header.
    spans: Vec<Span>,
}

type Span = (u32, u32, u32, u32);

thread_local! {
    /// The spans' buffer, taken by each parse and given back at its drop:
    /// an array of `MAX_HEADERS` spans cleared and moved per head cost ~200
    /// instructions each way, a fresh `Vec` an allocation.
    static SPANS: std::cell::Cell<Vec<Span>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Drop for HeaderSpans {
    fn drop(&mut self) {
        let mut spans = std::mem::take(&mut self.spans);
        spans.clear();
        SPANS.set(spans);
    }
}

impl Clone for HeaderSpans {
    fn clone(&self) -> Self {
        Self {
            spans: self.spans.clone(),
        }
    }
}

impl HeaderSpans {
    /// Each header's name start and end, value start and end.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        self.spans
            .iter()
            .map(|&(ns, ne, vs, ve)| (ns as usize, ne as usize, vs as usize, ve as usize))
    }

    /// The spans of `headers`, parsed from `buf` (which they borrow).
    pub(crate) fn of(buf: &[u8], headers: &[httparse::Header<'_>]) -> Self {
        Self::of_matching(buf, headers, |_| true)
    }

    /// The spans of `headers` but those named `skip`.
    fn of_without(buf: &[u8], headers: &[httparse::Header<'_>], skip: &str) -> Self {
        Self::of_matching(buf, headers, |h| !name_is(h.name.as_bytes(), skip))
    }

    /// The spans of the `headers` that `keep` keeps.
    pub(crate) fn of_matching(
        buf: &[u8],
        headers: &[httparse::Header<'_>],
        keep: impl Fn(&httparse::Header<'_>) -> bool,
    ) -> Self {
        let base = buf.as_ptr() as usize;
        let mut spans = SPANS.take();
        spans.clear();
        // Within the head (at most `MAX_HEADER_BYTES`): fits a u32.
        let at = |i: usize| u32::try_from(i).unwrap_or(u32::MAX);
        for h in headers.iter().take(MAX_HEADERS).filter(|h| keep(h)) {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            spans.push((
                at(name),
                at(name + h.name.len()),
                at(value),
                at(value + h.value.len()),
            ));
        }
        Self { spans }
    }

    /// Appends the headers to `map`, their values slices of `head` (the
    /// buffer the spans were taken from, split off and frozen). Errs with
    /// what `http` refused.
    pub(crate) fn append_to(&self, head: &Bytes, map: &mut HeaderMap) -> Result<(), &'static str> {
        for &(ns, ne, vs, ve) in &self.spans {
            let (ns, ne, vs, ve) = (ns as usize, ne as usize, vs as usize, ve as usize);
            // In range (spans of the head just parsed); checked all the same.
            let (Some(name), Some(value)) = (head.get(ns..ne), head.get(vs..ve)) else {
                return Err("header span");
            };
            let name = HeaderName::from_bytes(name).map_err(|_| "header name")?;
            let value = HeaderValue::from_maybe_shared(head.slice_ref(value))
                .map_err(|_| "header value")?;
            map.append(name, value);
        }
        Ok(())
    }

    /// How many headers.
    pub(crate) fn len(&self) -> usize {
        self.spans.len()
    }
}

/// Whether the last coding of `codings` (the last `transfer-encoding`
/// value) is `chunked`.
fn final_coding_is_chunked(codings: &[u8]) -> bool {
    codings
        .rsplit(|b| *b == b',')
        .next()
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
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEADER_BYTES => {
                return Err(ExchangeError::Chunk("trailers too large"))
            }
            Ok(httparse::Status::Partial) => return Ok(Step::More),
            Err(_) => return Err(ExchangeError::Chunk("invalid trailers")),
        };
        if len > MAX_HEADER_BYTES {
            return Err(ExchangeError::Chunk("trailers too large"));
        }
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
    // At most 15 hex digits (checked above): fits a u64.
    std::str::from_utf8(&line[..digits])
        .ok()
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .ok_or(ExchangeError::Chunk("invalid size"))
}

/// A response body read from its connection as it is polled (in the
/// polling task). Once it ended cleanly, a reusable connection is handed
/// back by [`take_reusable`](Self::take_reusable); dropped earlier, it
/// closes the connection.
pub(crate) struct H1Body {
    /// `None` once handed back or dropped after an error.
    conn: Option<Box<H1Conn>>,
    decoder: Decoder,
    /// The response and request let the connection be reused.
    reusable: bool,
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
    fn new(conn: Box<H1Conn>, framing: ReadFraming, reusable: bool) -> Self {
        Self {
            conn: Some(conn),
            decoder: Decoder::new(framing),
            reusable,
        }
    }

    /// The connection, if the body ended cleanly and it may take another
    /// request (module doc, **Reuse**); taken once.
    pub(crate) fn take_reusable(&mut self) -> Option<Box<H1Conn>> {
        if !(self.decoder.is_done() && self.reusable) {
            return None;
        }
        let mut conn = self.conn.take()?;
        // An idle connection holds no head.
        conn.kept_head = None;
        // Bytes after the response: the server is out of step. Not reused.
        if !conn.read_buf.is_empty() {
            return None;
        }
        // An idle connection keeps no large read buffer (the write buffer
        // has the same rule, in `send`): the idle connections of every
        // instance would otherwise each hold up to twice MAX_READ_SIZE.
        // `read_size` is kept, so the next large body's first read gets
        // its size at once: one allocation for such a response; a small
        // response's buffer stays under the bound and is kept.
        if conn.read_buf.capacity() > 2 * READ_SIZE {
            conn.read_buf = BytesMut::new();
        }
        Some(conn)
    }

    /// The response head kept as lines, if it was (taken once).
    pub(crate) fn take_kept_head(&mut self) -> Option<RawHeaders> {
        self.conn.as_mut()?.kept_head.take()
    }

    /// The response head kept as lines, left in place.
    pub(crate) fn kept_head_mut(&mut self) -> Option<&mut RawHeaders> {
        self.conn.as_mut()?.kept_head.as_mut()
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
                Ok(Step::Frame(frame)) => return Poll::Ready(Some(Ok(frame))),
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
        match self.decoder.state {
            Decode::Length(left) => SizeHint::with_exact(left),
            Decode::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::time::Duration;

    use http::Request;
    use http_body_util::{BodyExt, Empty, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A backend that accepts one connection and, for each reply, reads
    /// until it has seen one more request head (`\r\n\r\n`) and writes the
    /// reply; then closes if `close`, else keeps reading. Returns the port
    /// and, when the client closed (or `close`), every byte it received
    /// with the size of its first read.
    async fn backend(
        replies: Vec<&'static [u8]>,
        close: bool,
    ) -> (u16, tokio::task::JoinHandle<(Vec<u8>, usize)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut first = 0;
            let mut buf = vec![0u8; 256 * 1024];
            for (i, reply) in replies.iter().enumerate() {
                while got.windows(4).filter(|w| *w == b"\r\n\r\n").count() <= i {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return (got, first);
                    }
                    if first == 0 {
                        first = n;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                s.write_all(reply).await.unwrap();
            }
            if !close {
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
            }
            (got, first)
        });
        (port, task)
    }

    async fn connect(port: u16) -> Box<H1Conn> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        H1Conn::new(UpstreamIo::Plain(tcp))
    }

    fn request(method: Method, body: UpstreamBody) -> Request<UpstreamBody> {
        let mut r = Request::new(body);
        *r.method_mut() = method;
        *r.uri_mut() = http::Uri::from_static("/p?q=1");
        r.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("x"));
        r
    }

    fn empty() -> UpstreamBody {
        Empty::new().map_err(|n| match n {}).boxed()
    }

    fn full(b: &'static [u8]) -> UpstreamBody {
        Full::new(Bytes::from_static(b))
            .map_err(|n| match n {})
            .boxed()
    }

    /// A body of unknown length: `frames`, then its end, or (with `stall`)
    /// pending for ever.
    struct Frames {
        frames: VecDeque<Frame<Bytes>>,
        stall: bool,
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.frames.pop_front() {
                Some(f) => Poll::Ready(Some(Ok(f))),
                None if self.stall => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    fn streamed(frames: Vec<Frame<Bytes>>, stall: bool) -> UpstreamBody {
        Frames {
            frames: frames.into(),
            stall,
        }
        .boxed()
    }

    /// Reads the whole body: its data and trailers, or its error.
    async fn read(body: &mut H1Body) -> Result<(Vec<u8>, Option<HeaderMap>), ExchangeError> {
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            match frame?.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        Ok((data, trailers))
    }

    /// Sends `req` on `conn`, reads the body, returns status, body, trailers
    /// and the connection if reusable.
    async fn exchange(
        conn: Box<H1Conn>,
        req: Request<UpstreamBody>,
    ) -> (StatusCode, Vec<u8>, Option<HeaderMap>, Option<Box<H1Conn>>) {
        let (parts, mut body) = conn.send_request(req).await.unwrap().into_parts();
        let (data, trailers) = read(&mut body).await.unwrap();
        (parts.status, data, trailers, body.take_reusable())
    }

    #[tokio::test]
    async fn a_content_length_body_is_read_and_the_connection_reused() {
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello";
        let (port, server) = backend(vec![ok, ok], false).await;
        let mut conn = connect(port).await;
        for _ in 0..2 {
            let (status, data, _, back) = exchange(conn, request(Method::GET, empty())).await;
            assert_eq!((status, &data[..]), (StatusCode::OK, &b"hello"[..]));
            conn = back.expect("reusable");
            assert!(conn.is_open(), "the server keeps it open");
        }
        drop(conn);
        let (got, _) = server.await.unwrap();
        let one = b"GET /p?q=1 HTTP/1.1\r\nhost: x\r\n\r\n";
        assert_eq!(
            got,
            [&one[..], &one[..]].concat(),
            "no framing for an empty GET"
        );
    }

    #[tokio::test]
    async fn a_chunked_body_is_decoded_with_its_trailers() {
        let (port, _server) = backend(
            vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n"],
            false,
        )
        .await;
        let (status, data, trailers, back) =
            exchange(connect(port).await, request(Method::GET, empty())).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&data[..], b"hello world");
        assert_eq!(trailers.expect("trailers")["x-t"], "1");
        assert!(back.is_some(), "a chunked body ends cleanly: reusable");
    }

    #[tokio::test]
    async fn head_204_304_have_no_body_and_1xx_are_skipped() {
        let (port, _server) = backend(
            vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\n\r\n",
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 7\r\n\r\n",
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: x\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            ],
            false,
        )
        .await;
        let mut conn = connect(port).await;
        for (method, status, body) in [
            (Method::HEAD, 200, &b""[..]),
            (Method::GET, 204, b""),
            (Method::GET, 304, b""),
            (Method::GET, 200, b"ok"),
        ] {
            let (got, data, _, back) = exchange(conn, request(method.clone(), empty())).await;
            assert_eq!(
                (got.as_u16(), &data[..]),
                (status, body),
                "{method} {status}"
            );
            conn = back.expect("reusable");
        }
    }

    #[test]
    fn a_reason_phrase_of_its_own_is_kept_and_the_standard_one_is_not() {
        let reason = |head: &[u8]| {
            let mut buf = BytesMut::from(head);
            let head = take_head(&mut buf, false, None).unwrap().unwrap();
            head.parts
                .extensions
                .get::<hyper::ext::ReasonPhrase>()
                .map(|r| r.as_bytes().to_vec())
        };
        assert_eq!(
            reason(b"HTTP/1.1 200 Fine Thanks\r\ncontent-length: 0\r\n\r\n"),
            Some(b"Fine Thanks".to_vec())
        );
        assert_eq!(
            reason(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            None
        );
        // None at all: the standard phrase is written.
        assert_eq!(reason(b"HTTP/1.1 404 \r\ncontent-length: 0\r\n\r\n"), None);
    }

    #[test]
    fn a_connection_of_close_or_keep_alive_only_is_read_and_left_out_of_the_map() {
        let head = |head: &[u8]| {
            let mut buf = BytesMut::from(head);
            take_head(&mut buf, false, None).unwrap().unwrap()
        };
        let connection = |h: &ResponseHead| {
            h.parts
                .headers
                .get_all(header::CONNECTION)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        let kept = head(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nx-a: 1\r\ncontent-length: 0\r\n\r\n",
        );
        assert!(kept.keep_alive);
        assert!(connection(&kept).is_empty());
        assert_eq!(kept.parts.headers.len(), 2, "x-a and content-length stay");
        let closed = head(b"HTTP/1.1 200 OK\r\nCONNECTION: Close\r\ncontent-length: 0\r\n\r\n");
        assert!(!closed.keep_alive);
        assert!(connection(&closed).is_empty());
        // HTTP/1.0 keeps the connection only when asked to.
        assert!(
            head(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n")
                .keep_alive
        );
        assert!(!head(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n").keep_alive);
        // Naming another header: every `Connection` stays for the
        // hop-by-hop rules, and `close` still counts.
        let named = head(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\nconnection: x-secret\r\ncontent-length: 0\r\n\r\n",
        );
        assert!(!named.keep_alive);
        assert_eq!(connection(&named), ["close", "x-secret"]);
    }

    #[tokio::test]
    async fn a_body_without_length_runs_to_the_close_and_is_not_reused() {
        let (port, _server) = backend(vec![b"HTTP/1.1 200 OK\r\n\r\nuntil the close"], true).await;
        let (_, data, _, back) = exchange(connect(port).await, request(Method::GET, empty())).await;
        assert_eq!(&data[..], b"until the close");
        assert!(back.is_none());
    }

    #[tokio::test]
    async fn invalid_or_conflicting_content_lengths_are_errors() {
        for (head, ok) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok"[..],
                false,
            ),
            (b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok", false),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 2x\r\n\r\nok", false),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nok", true),
        ] {
            let (port, _server) = backend(vec![head], false).await;
            let sent = connect(port)
                .await
                .send_request(request(Method::GET, empty()))
                .await;
            match sent {
                Ok(resp) => {
                    assert!(ok, "{head:?} accepted");
                    let mut body = resp.into_body();
                    assert_eq!(&read(&mut body).await.unwrap().0[..], b"ok");
                }
                Err(e) => {
                    assert!(!ok, "{head:?}: {e}");
                    assert!(matches!(e, ExchangeError::ContentLength), "{e}");
                }
            }
        }
    }

    #[tokio::test]
    async fn connection_close_from_either_side_and_http10_are_not_reused() {
        let cases: [(&'static [u8], bool, bool); 4] = [
            (
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
                false,
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                true,
                false,
            ),
            (
                b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
                false,
                false,
            ),
            (
                b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
                false,
                true,
            ),
        ];
        for (reply, client_close, reusable) in cases {
            let (port, _server) = backend(vec![reply], false).await;
            let mut req = request(Method::GET, empty());
            if client_close {
                req.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            let (_, data, _, back) = exchange(connect(port).await, req).await;
            assert_eq!(&data[..], b"ok");
            assert_eq!(
                back.is_some(),
                reusable,
                "{reply:?}, client close {client_close}"
            );
        }
    }

    #[tokio::test]
    async fn a_body_cut_short_or_badly_chunked_is_an_error() {
        for reply in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n",
        ] {
            let (port, _server) = backend(vec![reply], true).await;
            let resp = connect(port)
                .await
                .send_request(request(Method::GET, empty()))
                .await
                .unwrap();
            let mut body = resp.into_body();
            assert!(read(&mut body).await.is_err(), "{reply:?}");
            assert!(body.take_reusable().is_none());
        }
    }

    #[tokio::test]
    async fn a_head_over_the_limits_is_an_error() {
        let many: &'static [u8] = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\n{}content-length: 0\r\n\r\n",
                "x-h: 1\r\n".repeat(MAX_HEADERS)
            )
            .into_bytes()
            .into_boxed_slice(),
        );
        let big: &'static [u8] = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n",
                "a".repeat(MAX_HEADER_BYTES)
            )
            .into_bytes()
            .into_boxed_slice(),
        );
        for reply in [many, big] {
            let (port, _server) = backend(vec![reply], false).await;
            let sent = connect(port)
                .await
                .send_request(request(Method::GET, empty()))
                .await;
            assert!(matches!(sent, Err(ExchangeError::HeadTooLarge)), "{sent:?}");
        }
        let (port, _server) = backend(vec![b"HTTP/2 200 OK\r\n\r\n"], false).await;
        let sent = connect(port)
            .await
            .send_request(request(Method::GET, empty()))
            .await;
        assert!(matches!(sent, Err(ExchangeError::Head(_))), "{sent:?}");
    }

    #[tokio::test]
    async fn request_bodies_are_framed_as_hyper_frames_them() {
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        // A known length: content-length, head and body in one write.
        let (port, server) = backend(vec![ok], false).await;
        let (_, _, _, back) =
            exchange(connect(port).await, request(Method::POST, full(b"hello"))).await;
        drop(back);
        let (got, first) = server.await.unwrap();
        let want = b"POST /p?q=1 HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(got, want);
        assert_eq!(first, want.len(), "one write");

        // Unknown length: chunked, trailers only as declared.
        let (port, server) = backend(vec![ok], false).await;
        let mut trailers = HeaderMap::new();
        trailers.insert("x-declared", HeaderValue::from_static("1"));
        trailers.insert("x-other", HeaderValue::from_static("2"));
        let body = streamed(
            vec![
                Frame::data(Bytes::from_static(b"hello")),
                Frame::data(Bytes::from_static(&[b'z'; 20])),
                Frame::trailers(trailers),
            ],
            false,
        );
        let mut req = request(Method::PUT, body);
        req.headers_mut()
            .insert(header::TRAILER, HeaderValue::from_static("x-declared"));
        let (_, _, _, back) = exchange(connect(port).await, req).await;
        assert!(back.is_some());
        drop(back);
        let (got, _) = server.await.unwrap();
        let want = format!(
            "PUT /p?q=1 HTTP/1.1\r\nhost: x\r\ntrailer: x-declared\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n14\r\n{}\r\n0\r\nx-declared: 1\r\n\r\n",
            "z".repeat(20)
        );
        assert_eq!(String::from_utf8_lossy(&got), want);

        // A GET of unknown length sends no body.
        let (port, server) = backend(vec![ok], false).await;
        let body = streamed(vec![Frame::data(Bytes::from_static(b"dropped"))], false);
        let (_, _, _, back) = exchange(connect(port).await, request(Method::GET, body)).await;
        drop(back);
        assert_eq!(
            server.await.unwrap().0,
            b"GET /p?q=1 HTTP/1.1\r\nhost: x\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_response_before_the_body_ends_stops_the_sending_and_is_not_reused() {
        let (port, _server) = backend(
            vec![b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\n\r\n"],
            false,
        )
        .await;
        // The body sends one chunk, then never ends.
        let body = streamed(vec![Frame::data(Bytes::from_static(b"part"))], true);
        let sent = tokio::time::timeout(
            Duration::from_secs(5),
            connect(port)
                .await
                .send_request(request(Method::POST, body)),
        )
        .await
        .expect("answered without the body's end");
        let mut body = sent.unwrap().into_body();
        assert_eq!(read(&mut body).await.unwrap().0, b"");
        assert!(body.take_reusable().is_none());
    }

    /// A 200 with a body of 1 MiB of `x`.
    fn one_mib_response() -> &'static [u8] {
        Box::leak(
            [
                &b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n"[..],
                &vec![b'x'; 1 << 20],
            ]
            .concat()
            .into_boxed_slice(),
        )
    }

    #[tokio::test]
    async fn a_body_dropped_early_closes_the_connection() {
        let (port, server) = backend(vec![one_mib_response()], false).await;
        let conn = connect(port).await;
        let mut body = conn
            .send_request(request(Method::GET, empty()))
            .await
            .unwrap()
            .into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        drop(body);
        // The backend sees the close (its write fails or its read ends).
        let ended = tokio::time::timeout(Duration::from_secs(5), server).await;
        assert!(ended.is_ok(), "the connection was closed");
    }

    #[tokio::test]
    async fn a_large_body_is_read_in_growing_reads() {
        let (port, _server) = backend(vec![one_mib_response()], false).await;
        let conn = connect(port).await;
        let mut body = conn
            .send_request(request(Method::GET, empty()))
            .await
            .unwrap()
            .into_body();
        // Let the socket buffer fill, so that reads fill the space given.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (data, _) = read(&mut body).await.unwrap();
        assert_eq!(data.len(), 1 << 20);
        let grown = body.conn.as_ref().map(|c| c.read_size);
        assert_eq!(grown, Some(MAX_READ_SIZE), "grown to the largest read");
        // Idle, it keeps no more than a small response needs.
        let conn = body.take_reusable().expect("reusable");
        assert_eq!(conn.read_size, MAX_READ_SIZE, "the size is kept");
        assert!(
            conn.read_buf.capacity() <= 2 * READ_SIZE,
            "{}",
            conn.read_buf.capacity()
        );
    }

    #[tokio::test]
    async fn an_idle_connection_closed_or_written_to_is_not_open() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut conns = Vec::new();
        for _ in 0..3 {
            let conn = connect(port).await;
            conns.push((conn, listener.accept().await.unwrap().0));
        }
        let (mut open, _kept) = conns.remove(0);
        let (mut closed, server) = conns.remove(0);
        drop(server);
        let (mut written, mut server) = conns.remove(0);
        server
            .write_all(b"HTTP/1.1 408 Timeout\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(open.is_open());
        assert!(!closed.is_open(), "closed by the server");
        assert!(!written.is_open(), "bytes while idle");
    }

    #[test]
    fn chunk_sizes_parse_and_overflow_is_refused() {
        assert_eq!(chunk_size(b"1f\r").unwrap(), 31);
        assert_eq!(chunk_size(b"A ;ext=\"x\"\r").unwrap(), 10);
        assert!(chunk_size(b"1f").is_err(), "no CR");
        assert!(chunk_size(b"\r").is_err());
        assert!(chunk_size(b"1g\r").is_err());
        assert!(chunk_size(b"ffffffffffffffff\r").is_err(), "over 15 digits");
        let mut hex = Vec::new();
        write_hex(&mut hex, 0x1a2b);
        assert_eq!(hex, b"1a2b");
        for n in [0, 7, 10, 65_536, u64::MAX] {
            let mut dec = Vec::new();
            write_decimal(&mut dec, n);
            assert_eq!(dec, n.to_string().as_bytes());
        }
    }

    /// The lines of an encoded head after its request line, each name's
    /// lines in their order, the names sorted.
    fn lines_by_name(head: &[u8]) -> Vec<(String, String)> {
        let text = std::str::from_utf8(head).unwrap();
        let mut lines: Vec<(String, String)> = text
            .split("\r\n")
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(": ").unwrap();
                (n.to_owned(), v.to_owned())
            })
            .collect();
        lines.sort_by(|a, b| a.0.cmp(&b.0));
        lines
    }

    /// The forwarding headers and request id written by the encoder are
    /// the lines the instance got when they were set in the map (issue
    /// 12): the same lines of each name in the same order, for every rule
    /// (trusted or not, `Forwarded` on or off, IPv4 and IPv6 peers, Host or
    /// authority, a replaced Host) and whatever the client sent; without
    /// client lines of those names (the common request), the same bytes.
    /// Encoding again (a retry), or from a map they were applied to (the
    /// head back from an HTTP/2 attempt that never left), changes nothing.
    #[test]
    fn added_headers_encode_as_the_map_they_are_set_in() {
        use super::super::headers::{Forwarding, Peer, ProxyHeaders};
        let common: &[(&str, &str)] = &[("host", "shop.example"), ("accept", "*/*")];
        let forged: &[(&str, &str)] = &[
            ("host", "shop.example"),
            ("x-forwarded-for", "1.2.3.4"),
            ("accept", "*/*"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=1.2.3.4;proto=https"),
            ("x-request-id", "theirs"),
            ("content-length", "3"),
        ];
        let hostless: &[(&str, &str)] = &[
            ("x-forwarded-proto", "https"),
            ("x-request-id", "a"),
            ("x-request-id", "b"),
        ];
        let authority: http::uri::Authority = "[::1]:8080".parse().unwrap();
        let replaced_host = HeaderValue::from_static("backend:80");
        let mut cases = 0;
        for (client, is_common) in [(common, true), (forged, false), (hostless, false)] {
            let mut map = HeaderMap::new();
            for (k, v) in client {
                map.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            for peer in ["203.0.113.7:5", "10.1.2.3:5", "[2001:db8::1]:443"] {
                let peer = Peer::new(peer.parse().unwrap());
                for (trusted, forwarded_header, authority, host, scheme) in [
                    (false, false, None, None, "http"),
                    (false, true, Some(&authority), Some(&replaced_host), "https"),
                    (true, false, Some(&authority), None, "http"),
                    (true, true, None, Some(&replaced_host), "http"),
                ] {
                    let rules = Forwarding {
                        trusted_proxies: if trusted {
                            vec![
                                "10.0.0.0/8".parse().unwrap(),
                                "2001:db8::/32".parse().unwrap(),
                            ]
                        } else {
                            Vec::new()
                        },
                        forwarded_header,
                    };
                    let id = HeaderValue::from_static("ours-1");
                    let added =
                        ProxyHeaders::new(&map, &peer, scheme, authority, &rules, Some(&id));
                    let mut set = map.clone();
                    added.apply(&mut set);
                    let uri = http::Uri::from_static("/p?q=1");
                    let head = |headers: &HeaderMap, added: Option<&ProxyHeaders<'_>>| {
                        let head = RequestHead {
                            method: &Method::GET,
                            uri: &uri,
                            headers,
                            host,
                            raw_response: false,
                            added,
                        };
                        let mut out = Vec::new();
                        let close = encode_head(&head, SendFraming::Length(3), &mut out);
                        assert!(!close);
                        out
                    };
                    let before = head(&set, None);
                    let now = head(&map, Some(&added));
                    let case = format!("{client:?} {peer:?} {trusted} {forwarded_header} {host:?}");
                    assert_eq!(lines_by_name(&now), lines_by_name(&before), "{case}");
                    assert_eq!(&now[..20], &before[..20], "{case}");
                    if is_common {
                        assert_eq!(
                            String::from_utf8_lossy(&now),
                            String::from_utf8_lossy(&before),
                            "{case}"
                        );
                    }
                    assert_eq!(head(&map, Some(&added)), now, "{case}: again");
                    assert_eq!(
                        lines_by_name(&head(&set, Some(&added))),
                        lines_by_name(&before),
                        "{case}: applied already"
                    );
                    let mut twice = set.clone();
                    added.apply(&mut twice);
                    assert_eq!(twice, set, "{case}: applied twice");
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 36);
    }
}
