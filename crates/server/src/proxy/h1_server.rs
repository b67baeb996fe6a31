//! The client side of an HTTP/1.1 connection, served by our own loop for
//! the common request and handed to hyper for everything else.
//!
//! hyper's HTTP/1.1 server (its head parser, its dispatcher, its encoder)
//! was the largest item of the proxy's own CPU left in the steady bench
//! (docs/benchmarks.md, "Fifth pass: the HTTP/1.1 server loop"). The upstream side already runs its
//! own exchange on `httparse` ([`h1_exchange`](super::h1_exchange)); this
//! is the same for the client side, written for the one request shape that
//! is nearly all of the traffic, with hyper kept for every other one.
//!
//! ## What takes the fast path ([`take_request`])
//!
//! A complete request head, parsed by `httparse` with the limits hyper was
//! given ([`MAX_HEADER_BYTES`], [`MAX_HEADERS`]), that is:
//!
//! - `HTTP/1.1` (an HTTP/1.0 client's keep-alive rules are hyper's);
//! - a method other than `CONNECT`;
//! - without `Upgrade`, a `Connection` naming `upgrade`, `Expect`,
//!   `Transfer-Encoding` or `TE` (upgrades, `100-continue`, chunked uploads
//!   and the trailers a `TE: trailers` client may get stay hyper's);
//! - with no `Content-Length` or exactly one, of digits only, at most
//!   [`MAX_FAST_BODY`] (64 KiB, the size the proxy buffers for a retry
//!   anyway);
//! - whose method, target, header names and values `http` accepts.
//!
//! Its body is read here, each wait for more bytes bounded by
//! `request_body_timeout` (a stall hands the request on with a body that
//! fails as hyper's would, so the answer, 408, is the same), and the
//! request goes to the same handler as hyper's with the body buffered
//! ([`BufferedBody`]), URI and header values sharing the read buffer. One
//! difference in timing only: the handler (routing included) runs once the
//! body is in, so a request with no route whose body stalls gets its 404
//! after the body timeout rather than at once.
//!
//! ## Everything else goes to hyper, for the rest of the connection
//!
//! A head that is not the common case, or that our parse rejects or cannot
//! decide (malformed, over the limits, obs-fold, an invalid value, …), is
//! *not consumed*: [`serve`] returns [`Served::HandOff`] with it and any
//! bytes after it still in the read buffer, and the caller gives hyper's
//! HTTP/1.1 server the socket behind a [`Prefixed`] reader that replays
//! them. hyper then serves that request and every later one: its answers
//! (400, 431, an upgrade's tunnel, `100 Continue`) are the ones it always
//! gave, byte for byte. Going back from hyper to this loop is not possible
//! (hyper owns its read buffer), and not needed: such connections are rare.
//!
//! ## The response (as hyper 1 writes it for HTTP/1.1, `writev(false)`)
//!
//! Status line (a `ReasonPhrase` extension, passed on from the instance,
//! replaces the standard phrase), the headers in their order (an
//! instance's head kept as its lines, [`raw_head`](super::raw_head): those
//! lines as it spelled them, then the map's, which replace theirs), then the
//! framing: the response's `Content-Length` when its body has an exact
//! size or the value is valid; else `content-length` from the body's exact
//! size; else `transfer-encoding: chunked`. HEAD, 204 and 304 have no body
//! (the body is dropped unread, as hyper drops it); an empty body to
//! another request gets `content-length: 0`. `connection: close` is added
//! when the connection closes after this response; `date` (cached, changed
//! once a second, as hyper's) when the response has none. The head and the
//! body frames ready at once are copied into one buffer and written with
//! one `write` (up to [`COALESCE_BYTES`]). Response trailers are dropped:
//! hyper sends them to HTTP/1.1 clients only after `TE: trailers`, and
//! such requests are hyper's. A body that fails, or ends short of its
//! length, ends the connection (the client sees it cut), as with hyper.
//!
//! ## Keep-alive and drain (RFC 9112 §9)
//!
//! A client that closes its end while its request is being answered (the
//! read buffer empty) is gone: the request is dropped, cancelling its
//! upstream attempt, and the connection closed, as hyper (without
//! half-close) does.
//!
//! The connection stays open after a response unless the request said
//! `Connection: close`, the response did, the request body was not read to
//! its end, or a drain ([`Shutdown`]) was asked for. Bytes after a request
//! (pipelining) stay in the buffer for the next one. A drain closes an idle
//! connection at once and one mid-request after its response (with
//! `connection: close` when the head is still unwritten), as hyper's
//! `graceful_shutdown` does. The head and idle timeouts are the watchdog's
//! ([`client_limits`](super::client_limits)): it sees this loop's reads
//! through the same `WatchedSocket` and its requests through the same
//! guard.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use http::header;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::client_limits::{ConnWatch, StallTimeout};
use super::h1_exchange::HeaderSpans;
use super::headers::{name_is, write_header};
use super::http::{MAX_HEADERS, MAX_HEADER_BYTES};
use super::raw_head::{KeptHead, RawHeaders};
use super::spare_maps;
use super::BoxError;

/// Largest request body read by the loop (a `Content-Length` above it goes
/// to hyper, which streams it).
pub(crate) const MAX_FAST_BODY: usize = 64 * 1024;
/// The response head and the body frames ready with it are written
/// together up to this many bytes.
const COALESCE_BYTES: usize = 64 * 1024;
/// The read buffer grows by this much when it has less than
/// [`MIN_READ_SPACE`] free (hyper's initial read size).
const READ_SIZE: usize = 8 * 1024;
/// Free space below which the read buffer is grown before a read.
const MIN_READ_SPACE: usize = 1024;
/// A write buffer larger than this after a response is not kept.
const KEEP_WRITE_BUF: usize = 2 * COALESCE_BYTES;

/// A drain or idle close asked of a client connection: the watchdog asks
/// ([`request`](Self::request)), the connection's serving loop (ours, or
/// the one around hyper's connection) acts on it. A flag and the one
/// waiter's waker: waiting for it costs two atomic operations per idle
/// wait, not the lock of a `tokio::sync::Notify` (~1 % of the steady
/// bench's CPU when it was one).
#[derive(Debug, Default)]
pub(crate) struct Shutdown {
    requested: AtomicBool,
    waker: AtomicWaker,
}

impl Shutdown {
    /// Asks for a graceful close.
    pub(crate) fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Whether a close was asked for.
    pub(crate) fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Resolves once a close was asked for.
    pub(crate) fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            if self.requested() {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // Asked between the check and the registration: seen here.
            if self.requested() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

/// The request body as the loop hands it over: all of it, or the error
/// that ended reading it (first frame).
#[derive(Debug)]
pub(crate) enum BufferedBody {
    /// The whole body (`None` once taken, or when empty).
    Full(Option<Bytes>),
    /// Reading it failed: stalled past `request_body_timeout`, or the
    /// client closed in the middle.
    Failed(Option<BoxError>),
}

impl Body for BufferedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(match self.get_mut() {
            BufferedBody::Full(b) => b.take().map(|b| Ok(Frame::data(b))),
            BufferedBody::Failed(e) => e.take().map(Err),
        })
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, BufferedBody::Full(None) | BufferedBody::Failed(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            BufferedBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            BufferedBody::Failed(_) => SizeHint::default(),
        }
    }
}

/// The client closed the connection in the middle of a request body.
#[derive(Debug, thiserror::Error)]
#[error("client closed the connection in the middle of the request body")]
pub(crate) struct ClosedInBody;

/// A request head taken off the read buffer for the fast path.
#[derive(Debug)]
pub(crate) struct RequestHead {
    /// Method, URI, version and headers (the body is read after).
    pub(crate) parts: http::request::Parts,
    /// The body's length (`Content-Length`, else 0).
    pub(crate) body_len: usize,
    /// The client asked to close after this request.
    pub(crate) close: bool,
}

/// What [`take_request`] found at the front of the read buffer.
// Not boxed: made and matched once per request, where a box would be an
// allocation per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Taken {
    /// Not a whole head yet (and under the limit): read more.
    Partial,
    /// Not ours: hyper serves the connection from here (buffer untouched).
    HandOff,
    /// A fast-path head, consumed from the buffer.
    Head(RequestHead),
}

/// Parses the request head at the front of `buf` and decides (module doc):
/// consumed only when it is a [`Taken::Head`]. The headers go into a
/// spare map of the thread's (`spare_maps`: the last response's).
pub(crate) fn take_request(buf: &mut BytesMut) -> Taken {
    let mut slots = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEADER_BYTES => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEADER_BYTES => return Taken::Partial,
        // Too large, too many headers, malformed: hyper's answer.
        _ => return Taken::HandOff,
    };
    if parsed.version != Some(1) {
        return Taken::HandOff;
    }
    let (Some(method), Some(path)) = (parsed.method, parsed.path) else {
        return Taken::HandOff;
    };
    if method == "CONNECT" {
        return Taken::HandOff;
    }
    let mut body_len = None;
    let mut close = false;
    for h in parsed.headers.iter() {
        let name = h.name.as_bytes();
        if name_is(name, "content-length") {
            if body_len.is_some() {
                return Taken::HandOff;
            }
            match content_length(h.value) {
                Some(n) if n <= MAX_FAST_BODY => body_len = Some(n),
                _ => return Taken::HandOff,
            }
        } else if name_is(name, "connection") {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return Taken::HandOff;
                }
            }
        } else if name_is(name, "upgrade")
            || name_is(name, "expect")
            || name_is(name, "transfer-encoding")
            || name_is(name, "te")
        {
            return Taken::HandOff;
        }
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Taken::HandOff;
    };
    // Where the target and each header lie in the head, so that they can
    // share its bytes once it is split off.
    let path_span = (path.as_ptr() as usize - buf.as_ptr() as usize, path.len());
    let spans = HeaderSpans::of(buf, parsed.headers);
    let head = buf.split_to(len).freeze();
    match build(&head, method, path_span, &spans) {
        Some(parts) => Taken::Head(RequestHead {
            parts,
            body_len: body_len.unwrap_or(0),
            close,
        }),
        None => {
            // Rare (a target or header `http` refuses): the head goes back
            // in front of what followed it, for hyper.
            let mut all = BytesMut::with_capacity(head.len() + buf.len());
            all.extend_from_slice(&head);
            all.extend_from_slice(buf);
            *buf = all;
            Taken::HandOff
        }
    }
}

/// The request parts from a head split off the buffer; `None` when `http`
/// refuses the target or a header.
fn build(
    head: &Bytes,
    method: Method,
    (path_at, path_len): (usize, usize),
    spans: &HeaderSpans,
) -> Option<http::request::Parts> {
    let uri = Uri::from_maybe_shared(head.slice(path_at..path_at + path_len)).ok()?;
    let mut headers = spare_maps::take(spans.len());
    spans.append_to(head, &mut headers).ok()?;
    let mut parts = Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    parts.headers = headers;
    Some(parts)
}

/// A `Content-Length` value: digits only (no sign, no list), no overflow.
fn content_length(value: &[u8]) -> Option<usize> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// How [`serve`] ended.
#[derive(Debug)]
pub(crate) enum Served {
    /// The connection is done (closed by either side, or drained).
    Closed,
    /// A request that is not ours is at the front of the buffer: hyper
    /// serves the connection from there.
    HandOff,
}

/// Serves requests on `io` while they take the fast path (module doc).
/// `buf` holds bytes already read (the protocol sniff); on
/// [`Served::HandOff`] it holds the request hyper must start with and
/// everything after it. `respond` answers one request, which is in flight
/// for `watch` until its response is written.
pub(crate) async fn serve<IO, F, Fut, B>(
    io: &mut IO,
    buf: &mut BytesMut,
    watch: &std::sync::Arc<ConnWatch>,
    shutdown: &Shutdown,
    body_timeout: Duration,
    mut respond: F,
) -> io::Result<Served>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<BufferedBody>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + KeptHead + Unpin,
    B::Error: Into<BoxError>,
{
    let mut out: Vec<u8> = Vec::new();
    loop {
        // The next head: from what is buffered, else read (idle: a drain
        // or idle close ends the connection here).
        let head = loop {
            if !buf.is_empty() {
                match take_request(buf) {
                    Taken::Head(head) => break head,
                    Taken::HandOff => return Ok(Served::HandOff),
                    Taken::Partial => {}
                }
            } else if shutdown.requested() {
                return Ok(Served::Closed);
            }
            let read = if buf.is_empty() {
                tokio::select! {
                    r = read_more(io, buf) => r?,
                    () = shutdown.wait() => return Ok(Served::Closed),
                }
            } else {
                read_more(io, buf).await?
            };
            if read == 0 {
                // Closed between requests, or in a head (hyper answers no
                // partial head either).
                return Ok(Served::Closed);
            }
        };
        let guard = watch.request_started();
        let RequestHead {
            parts,
            body_len,
            mut close,
        } = head;
        let body = match read_body(io, buf, body_len, body_timeout).await {
            Ok(body) => BufferedBody::Full(body),
            Err(e) => {
                // Its framing is lost: the connection ends after the answer.
                close = true;
                BufferedBody::Failed(Some(e))
            }
        };
        let head_request = parts.method == Method::HEAD;
        // Pinned where it is made: the future is a few KB, and a second
        // binding of it cost a copy per request.
        let mut respond = pin!(respond(Request::from_parts(parts, body)));
        // The response stays in this slot until it is written, and the
        // request in flight until then (the guard is held here, not carried
        // in a wrapper of the body): each move of the ~300-byte response
        // was a `memcpy` (a select's output, a `break`, the wrapper, the
        // writer's argument and its parts; ~800 instructions a request
        // less in all, callgrind).
        let mut slot = None;
        // Watch for the client leaving while the answer is prepared, as
        // hyper does (no half-close): its end of stream drops the request,
        // and with it the upstream attempt. Bytes instead are the next
        // request (pipelined): kept, and no more watching. A socket with
        // nothing to read costs no system call here (tokio knows it is
        // drained). Bytes buffered already: no watching.
        let mut watching = buf.is_empty();
        let client_left = std::future::poll_fn(|cx| {
            if let Poll::Ready(resp) = respond.as_mut().poll(cx) {
                slot = Some(resp);
                return Poll::Ready(Ok(false));
            }
            if watching {
                match poll_read_more(io, buf, cx) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(true)),
                    Poll::Ready(Ok(_)) => watching = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await?;
        let Some(resp) = slot.as_mut().filter(|_| !client_left) else {
            return Ok(Served::Closed);
        };
        close |= shutdown.requested();
        let written = write_response(io, &mut out, resp, head_request, close).await;
        // The map goes round again for the next request (hyper does the
        // same): one allocation less per request.
        spare_maps::give_back(std::mem::take(resp.headers_mut()));
        // The request leaves the connection's in-flight count with its
        // response written (as with a guard riding in its body).
        drop(slot);
        drop(guard);
        let keep_alive = written?;
        if out.capacity() > KEEP_WRITE_BUF {
            out = Vec::new();
        }
        if !keep_alive || shutdown.requested() {
            let _ = io.shutdown().await;
            return Ok(Served::Closed);
        }
    }
}

/// Reads into `buf`, growing it first when it is nearly full; the bytes
/// read (0: closed).
async fn read_more<IO: AsyncRead + Unpin>(io: &mut IO, buf: &mut BytesMut) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_more(io, buf, cx)).await
}

/// [`read_more`] as a poll.
fn poll_read_more<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < MIN_READ_SPACE {
        buf.reserve(READ_SIZE);
    }
    let read = io.read_buf(buf);
    pin!(read).poll(cx)
}

/// Reads a body of `len` bytes (some may be buffered already), each wait
/// bounded by `timeout`; `None` when empty.
async fn read_body<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    len: usize,
    timeout: Duration,
) -> Result<Option<Bytes>, BoxError> {
    if len == 0 {
        return Ok(None);
    }
    if buf.len() < len {
        buf.reserve(len - buf.len());
        // The same rule and error as a body read through hyper.
        let body = StallTimeout::new(Reader { io, buf, len }, timeout, "request body");
        let mut body = pin!(body);
        while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            frame?;
        }
    }
    Ok(Some(buf.split_to(len).freeze()))
}

/// A body view of reading into `buf` until it holds `len` bytes: yields an
/// empty frame per read, ends when `buf` is full enough (for
/// [`StallTimeout`]).
struct Reader<'a, IO> {
    io: &'a mut IO,
    buf: &'a mut BytesMut,
    len: usize,
}

impl<IO: AsyncRead + Unpin> Body for Reader<'_, IO> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.buf.len() >= this.len {
            return Poll::Ready(None);
        }
        let read = poll_read_into(this.io, this.buf, cx);
        match read {
            Poll::Ready(Ok(0)) => Poll::Ready(Some(Err(Box::new(ClosedInBody)))),
            Poll::Ready(Ok(_)) => Poll::Ready(Some(Ok(Frame::data(Bytes::new())))),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// One `poll_read` into the spare capacity of `buf`; the bytes read.
fn poll_read_into<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() == buf.len() {
        buf.reserve(READ_SIZE);
    }
    let read = io.read_buf(buf);
    pin!(read).poll(cx)
}

/// How the response body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// None at all (HEAD, 204, 304, 1xx, or empty).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked.
    Chunked,
}

/// Writes `resp` (module doc); whether the connection may carry another
/// request. Borrowed, not moved: the caller keeps it where it landed (its
/// header map goes back for reuse, its body drops with it). A body not
/// written (HEAD, 204, 304) is left unread, as hyper leaves it.
async fn write_response<IO, B>(
    io: &mut IO,
    out: &mut Vec<u8>,
    resp: &mut Response<B>,
    head_request: bool,
    mut close: bool,
) -> io::Result<bool>
where
    IO: AsyncWrite + Unpin,
    B: Body<Data = Bytes> + KeptHead + Unpin,
    B::Error: Into<BoxError>,
{
    // First: the body may hand its connection back once it has ended.
    let raw = resp.body_mut().take_kept_head();
    let length = if resp.body().is_end_stream() {
        None
    } else {
        Some(resp.body().size_hint().exact())
    };
    out.clear();
    let Some(framing) = encode_head(out, resp, length, head_request, &mut close, raw) else {
        // A response hyper would not write either (an invalid length).
        return Err(io::Error::other("invalid content-length in a response"));
    };
    let body = (framing != Framing::Empty).then(|| Pin::new(resp.body_mut()));
    let mut sent: u64 = 0;
    if let Some(mut body) = body {
        loop {
            // What is ready now joins the buffer; only a wait flushes it.
            let polled = std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await;
            let frame = match polled {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    flush(io, out).await?;
                    std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
                }
            };
            let data = match frame {
                None => break,
                Some(Err(e)) => {
                    let e: BoxError = e.into();
                    let _ = flush(io, out).await;
                    return Err(io::Error::other(e));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    // Trailers: not for this client (module doc).
                    Err(_) => continue,
                },
            };
            if data.is_empty() {
                continue;
            }
            let n = data.len() as u64;
            match framing {
                Framing::Chunked => {
                    write_chunk_size(out, n);
                    append(io, out, data).await?;
                    out.extend_from_slice(b"\r\n");
                }
                Framing::Length(len) => {
                    if sent + n > len {
                        let _ = flush(io, out).await;
                        return Err(io::Error::other("response body longer than its length"));
                    }
                    append(io, out, data).await?;
                }
                Framing::Empty => {}
            }
            sent += n;
            if out.len() >= COALESCE_BYTES {
                flush(io, out).await?;
            }
        }
    }
    match framing {
        Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
        Framing::Length(len) if sent < len => {
            let _ = flush(io, out).await;
            return Err(io::Error::other("response body shorter than its length"));
        }
        _ => {}
    }
    flush(io, out).await?;
    Ok(!close)
}

/// Adds `data` to the write buffer, or writes it straight after the buffer
/// when the two would pass [`COALESCE_BYTES`] (the kernel copies a large
/// body anyway).
async fn append<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    out: &mut Vec<u8>,
    mut data: Bytes,
) -> io::Result<()> {
    if out.len() + data.len() <= COALESCE_BYTES {
        out.extend_from_slice(&data);
        return Ok(());
    }
    flush(io, out).await?;
    while data.has_remaining() {
        let n = io.write(&data).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data.advance(n);
    }
    Ok(())
}

/// Writes and empties the write buffer.
async fn flush<IO: AsyncWrite + Unpin>(io: &mut IO, out: &mut Vec<u8>) -> io::Result<()> {
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    io.flush().await
}

/// Writes the status line and headers (module doc); the body's framing, or
/// `None` for a `Content-Length` that is not a number. `length`: `None`
/// when the body is empty and says so, else its exact size if known.
/// Sets `close` when the response says `Connection: close` or is a 1xx.
fn encode_head<B>(
    out: &mut Vec<u8>,
    parts: &Response<B>,
    length: Option<Option<u64>>,
    head_request: bool,
    close: &mut bool,
    raw: Option<RawHeaders>,
) -> Option<Framing> {
    let status = parts.status();
    let reason = parts.extensions().get::<hyper::ext::ReasonPhrase>();
    if status == StatusCode::OK && reason.is_none() {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        match reason {
            Some(r) => out.extend_from_slice(r.as_bytes()),
            None => {
                out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
    }
    // hyper's rules (`can_chunked`, `can_have_content_length`).
    let informational = status.is_informational();
    let bodiless_status =
        informational || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let may_have_body = !(head_request || bodiless_status);
    if informational {
        // A 101 (the only 1xx a handler makes) ends HTTP here.
        *close = true;
    }
    let mut framing: Option<Framing> = None;
    // An instance's head kept as its lines (`raw_head`): those first, then
    // the map's (which replace theirs).
    let mut wrote_date = match raw {
        Some(raw) => raw.encode(parts.headers(), out),
        None => false,
    };
    let mut said_close = false;
    for (name, value) in parts.headers() {
        match *name {
            header::CONTENT_LENGTH => {
                match length {
                    Some(Some(n)) => {
                        if framing.is_some() {
                            continue;
                        }
                        framing = Some(Framing::Length(n));
                    }
                    Some(None) => {
                        let n = content_length(value.as_bytes())? as u64;
                        match framing {
                            Some(Framing::Length(m)) if m == n => continue,
                            Some(_) => return None,
                            None => framing = Some(Framing::Length(n)),
                        }
                    }
                    // An empty body: the header only on HEAD; else the
                    // implicit `content-length: 0` below.
                    None if head_request => {
                        if framing.is_some() {
                            continue;
                        }
                        framing = Some(Framing::Empty);
                    }
                    None => continue,
                }
            }
            // Ours to decide.
            header::TRANSFER_ENCODING => continue,
            header::CONNECTION if has_close(value.as_bytes()) => {
                *close = true;
                said_close = true;
            }
            header::DATE => wrote_date = true,
            header::TRAILER if !may_have_body => continue,
            _ => {}
        }
        write_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let framing = match framing {
        Some(f) => f,
        None => match length {
            Some(None) if may_have_body => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
            Some(None) => Framing::Empty,
            None | Some(Some(0)) => {
                if may_have_body {
                    out.extend_from_slice(b"content-length: 0\r\n");
                }
                Framing::Empty
            }
            Some(Some(n)) => {
                if !bodiless_status {
                    out.extend_from_slice(b"content-length: ");
                    out.extend_from_slice(itoa_u64(n, &mut [0; 20]));
                    out.extend_from_slice(b"\r\n");
                }
                Framing::Length(n)
            }
        },
    };
    if *close && !said_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        DATE.with(|d| out.extend_from_slice(&d.borrow_mut().now()));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Some(if may_have_body {
        framing
    } else {
        Framing::Empty
    })
}

/// Whether a `Connection` value lists `close`.
fn has_close(value: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// `n` in decimal, in `buf`.
fn itoa_u64(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// A chunk's size line.
fn write_chunk_size(out: &mut Vec<u8>, n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = HEX[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// The `Date` value, formatted once a second per thread (as hyper does).
struct CachedDate {
    value: [u8; 29],
    /// The second it shows (Unix time).
    second: u64,
}

impl CachedDate {
    fn now(&mut self) -> [u8; 29] {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second {
            let text = httpdate::fmt_http_date(now);
            if let Ok(value) = <[u8; 29]>::try_from(text.as_bytes()) {
                self.value = value;
                self.second = second;
            }
        }
        self.value
    }
}

thread_local! {
    static DATE: RefCell<CachedDate> = const {
        RefCell::new(CachedDate { value: *b"Thu, 01 Jan 1970 00:00:00 GMT", second: 0 })
    };
}

/// A socket with bytes already read from it put back in front: what the
/// protocol sniff or the fast path read before handing the connection on.
pub(crate) struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Prefixed<IO> {
    /// `io`, whose next reads return `prefix` first.
    pub(crate) fn new(prefix: Bytes, io: IO) -> Self {
        Self { prefix, io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use http::header::HeaderValue;
    use std::sync::Arc;

    use parking_lot::Mutex;

    use http_body_util::{BodyExt, Full, StreamBody};
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// What the handler saw of one request.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Seen {
        method: String,
        uri: String,
        body: Result<Vec<u8>, String>,
    }

    type Log = Arc<Mutex<Vec<Seen>>>;

    /// The answer the scripted handler gives.
    #[derive(Clone, Copy)]
    enum Answer {
        /// 200 with `hello` (exact size).
        Hello,
        /// 200 with `ab`, `cd` and no size: chunked.
        Streamed,
    }

    type TestBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

    fn answer(a: Answer) -> Response<TestBody> {
        match a {
            Answer::Hello => Response::new(
                Full::new(Bytes::from_static(b"hello"))
                    .map_err(|n| match n {})
                    .boxed(),
            ),
            Answer::Streamed => {
                let frames = futures_util::stream::iter(vec![
                    Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"ab"))),
                    Ok(Frame::data(Bytes::from_static(b"cd"))),
                ]);
                Response::new(StreamBody::new(frames).boxed())
            }
        }
    }

    /// Serves the server end of a pipe with the scripted handler until the
    /// loop returns; what it returned and what was left in its buffer.
    async fn serve_pipe(
        mut server: DuplexStream,
        log: Log,
        a: Answer,
        shutdown: Arc<Shutdown>,
        body_timeout: Duration,
    ) -> (io::Result<Served>, BytesMut) {
        let watch = ConnWatch::new(tokio::time::Instant::now());
        let mut buf = BytesMut::new();
        let served = serve(
            &mut server,
            &mut buf,
            &watch,
            &shutdown,
            body_timeout,
            |req: Request<BufferedBody>| {
                let log = log.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes().to_vec())
                        .map_err(|e| e.to_string());
                    log.lock().push(Seen {
                        method: parts.method.to_string(),
                        uri: parts.uri.to_string(),
                        body,
                    });
                    answer(a)
                }
            },
        )
        .await;
        (served, buf)
    }

    /// Writes `input` in `piece`-byte writes, closes, and reads everything
    /// the loop wrote; the output, how the loop ended and its buffer.
    async fn exchange(
        input: &[u8],
        piece: usize,
        a: Answer,
    ) -> (String, Served, BytesMut, Vec<Seen>) {
        let (mut client, server) = duplex(1 << 20);
        let log = Log::default();
        let task = tokio::spawn(serve_pipe(
            server,
            log.clone(),
            a,
            Arc::default(),
            Duration::from_secs(30),
        ));
        // Write errors: the loop may hand off (and drop its end) before
        // reading all of it.
        for p in input.chunks(piece.max(1)) {
            if client.write_all(p).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let _ = client.shutdown().await;
        let (served, buf) = task.await.unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        let seen = log.lock().clone();
        (String::from_utf8(out).unwrap(), served.unwrap(), buf, seen)
    }

    /// The response heads and bodies in `out`, with the date taken out.
    fn without_date(out: &str) -> String {
        out.split("\r\n")
            .filter(|l| !l.starts_with("date: "))
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    const GET: &[u8] = b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n";
    const HELLO: &str = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";

    #[tokio::test]
    async fn keep_alive_and_pipelined_requests_are_answered_in_order() {
        let mut input = GET.repeat(2);
        input.extend_from_slice(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n");
        for piece in [input.len(), 7, 1] {
            let (out, served, buf, seen) = exchange(&input, piece, Answer::Hello).await;
            assert_eq!(without_date(&out), HELLO.repeat(3), "piece {piece}");
            assert!(out.contains("\r\ndate: "), "a date is added");
            assert!(matches!(served, Served::Closed));
            assert!(buf.is_empty());
            let uris: Vec<_> = seen.iter().map(|s| s.uri.as_str()).collect();
            assert_eq!(uris, ["/a?x=1", "/a?x=1", "/b"]);
        }
    }

    #[tokio::test]
    async fn connection_close_ends_the_connection_after_its_response() {
        let mut input =
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Close\r\n\r\n".to_vec();
        input.extend_from_slice(GET);
        let (out, served, _, seen) = exchange(&input, input.len(), Answer::Hello).await;
        assert_eq!(
            without_date(&out),
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello"
        );
        assert!(matches!(served, Served::Closed));
        assert_eq!(seen.len(), 1, "the request after it is not served");
    }

    #[tokio::test]
    async fn a_small_body_is_read_whole_however_it_arrives() {
        let mut input =
            b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world".to_vec();
        input.extend_from_slice(GET);
        for piece in [input.len(), 3, 1] {
            let (out, _, _, seen) = exchange(&input, piece, Answer::Hello).await;
            assert_eq!(without_date(&out), HELLO.repeat(2), "piece {piece}");
            assert_eq!(seen[0].method, "POST");
            assert_eq!(seen[0].body, Ok(b"hello world".to_vec()));
            assert_eq!(seen[1].body, Ok(Vec::new()));
        }
    }

    #[tokio::test]
    async fn a_head_response_has_the_length_and_no_body() {
        let mut input = b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n".to_vec();
        input.extend_from_slice(GET);
        let (out, _, _, seen) = exchange(&input, input.len(), Answer::Hello).await;
        assert_eq!(
            without_date(&out),
            format!("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n{HELLO}"),
            "no body after the HEAD's head: the next response follows"
        );
        assert_eq!(seen.len(), 2);
    }

    #[tokio::test]
    async fn a_body_without_a_known_length_is_chunked() {
        let (out, _, _, _) = exchange(GET, GET.len(), Answer::Streamed).await;
        assert_eq!(
            without_date(&out),
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn requests_that_are_not_ours_go_to_hyper_with_their_bytes_intact() {
        let big = format!(
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n",
            MAX_FAST_BODY + 1
        );
        let cases: [&[u8]; 10] = [
            b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nab",
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nTE: trailers\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: h\r\n\r\n",
            b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            b"G@T / HTTP/1.1\r\nHost: h\r\n\r\n",
            big.as_bytes(),
        ];
        for case in cases {
            let mut input = GET.to_vec();
            input.extend_from_slice(case);
            input.extend_from_slice(GET);
            // One write: all of it is in the buffer when the loop decides.
            let (out, served, buf, seen) = exchange(&input, input.len(), Answer::Hello).await;
            let case_text = String::from_utf8_lossy(case);
            assert!(matches!(served, Served::HandOff), "{case_text}");
            assert_eq!(without_date(&out), HELLO, "only the first: {case_text}");
            assert_eq!(seen.len(), 1);
            let mut rest = case.to_vec();
            rest.extend_from_slice(GET);
            assert_eq!(&buf[..], &rest[..], "handed over untouched: {case_text}");
        }
        // A head over the limit goes too (hyper answers 431).
        let mut huge = b"GET / HTTP/1.1\r\nHost: h\r\nX: ".to_vec();
        huge.resize(MAX_HEADER_BYTES + 10, b'a');
        let (out, served, buf, _) = exchange(&huge, 4096, Answer::Hello).await;
        assert!(matches!(served, Served::HandOff));
        assert_eq!(out, "");
        assert_eq!(&buf[..], &huge[..buf.len()]);
        assert!(buf.len() >= MAX_HEADER_BYTES);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_reaches_the_handler_as_its_error_and_closes() {
        let (mut client, server) = duplex(1 << 16);
        let log = Log::default();
        let task = tokio::spawn(serve_pipe(
            server,
            log.clone(),
            Answer::Hello,
            Arc::default(),
            Duration::from_secs(2),
        ));
        client
            .write_all(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\n\r\nabc")
            .await
            .unwrap();
        let t = tokio::time::Instant::now();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        assert_eq!(t.elapsed(), Duration::from_secs(2), "at the body timeout");
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("connection: close\r\n"), "{out}");
        let (served, _) = task.await.unwrap();
        assert!(matches!(served.unwrap(), Served::Closed));
        let seen = log.lock().clone();
        let err = seen[0].body.clone().unwrap_err();
        assert!(err.contains("paused longer than"), "{err}");
    }

    #[tokio::test]
    async fn a_drain_closes_an_idle_connection_and_a_busy_one_after_its_response() {
        // Idle: closed at once.
        let (mut client, server) = duplex(1 << 16);
        let shutdown = Arc::new(Shutdown::default());
        let task = tokio::spawn(serve_pipe(
            server,
            Log::default(),
            Answer::Hello,
            shutdown.clone(),
            Duration::from_secs(30),
        ));
        client.write_all(GET).await.unwrap();
        let mut head = [0u8; 17];
        client.read_exact(&mut head).await.unwrap();
        shutdown.request();
        let (served, _) = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("closed at once")
            .unwrap();
        assert!(matches!(served.unwrap(), Served::Closed));
        // Asked while the request is in flight: answered with
        // `connection: close`, then closed though the client keeps it open.
        let (mut client, server) = duplex(1 << 16);
        let shutdown = Arc::new(Shutdown::default());
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let go = Arc::new(tokio::sync::Mutex::new(Some(go_rx)));
        let watch = ConnWatch::new(tokio::time::Instant::now());
        let s = shutdown.clone();
        let task = tokio::spawn(async move {
            let mut server = server;
            let mut buf = BytesMut::new();
            serve(
                &mut server,
                &mut buf,
                &watch,
                &s,
                Duration::from_secs(30),
                |_req| {
                    let go = go.clone();
                    async move {
                        if let Some(rx) = go.lock().await.take() {
                            let _ = rx.await;
                        }
                        answer(Answer::Hello)
                    }
                },
            )
            .await
        });
        client.write_all(GET).await.unwrap();
        tokio::task::yield_now().await;
        shutdown.request();
        go_tx.send(()).unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out))
            .await
            .expect("closed after the response")
            .unwrap();
        assert_eq!(
            without_date(&String::from_utf8(out).unwrap()),
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello"
        );
        assert!(matches!(task.await.unwrap().unwrap(), Served::Closed));
    }

    #[test]
    fn the_head_encoding_follows_hyper() {
        let enc = |status: u16, head: bool, length: Option<Option<u64>>, cl: Option<&str>| {
            let mut resp = Response::new(());
            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
            if let Some(v) = cl {
                resp.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from_str(v).unwrap());
            }
            resp.headers_mut()
                .insert(header::DATE, HeaderValue::from_static("d"));
            let mut out = Vec::new();
            let mut close = false;
            let framing = encode_head(&mut out, &resp, length, head, &mut close, None);
            (String::from_utf8(out).unwrap(), framing)
        };
        // An empty body: `content-length: 0`, except on HEAD, 204 and 304.
        assert_eq!(
            enc(200, false, None, None),
            (
                "HTTP/1.1 200 OK\r\ndate: d\r\ncontent-length: 0\r\n\r\n".into(),
                Some(Framing::Empty)
            )
        );
        assert_eq!(
            enc(204, false, None, None),
            (
                "HTTP/1.1 204 No Content\r\ndate: d\r\n\r\n".into(),
                Some(Framing::Empty)
            )
        );
        // HEAD keeps the instance's length.
        assert_eq!(
            enc(200, true, None, Some("42")),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 42\r\ndate: d\r\n\r\n".into(),
                Some(Framing::Empty)
            )
        );
        // A length from the header when the body does not know its own.
        assert_eq!(
            enc(200, false, Some(None), Some("7")).1,
            Some(Framing::Length(7))
        );
        assert_eq!(
            enc(200, false, Some(None), Some("x7")).1,
            None,
            "not a number"
        );
        // 304 with a known size: no length written, no body.
        assert_eq!(
            enc(304, false, Some(Some(5)), None),
            (
                "HTTP/1.1 304 Not Modified\r\ndate: d\r\n\r\n".into(),
                Some(Framing::Empty)
            )
        );
        assert_eq!(
            enc(404, false, Some(Some(12)), None).0,
            "HTTP/1.1 404 Not Found\r\ndate: d\r\ncontent-length: 12\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_request_drops_it() {
        // A handler that never answers, and tells when it is dropped.
        struct Dropped(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let (mut client, mut server) = duplex(1 << 16);
        let flag = dropped.clone();
        let task = tokio::spawn(async move {
            let watch = ConnWatch::new(tokio::time::Instant::now());
            let mut buf = BytesMut::new();
            serve(
                &mut server,
                &mut buf,
                &watch,
                &Shutdown::default(),
                Duration::from_secs(30),
                |_req| {
                    let mark = Dropped(flag.clone());
                    async move {
                        let _mark = mark;
                        std::future::pending::<()>().await;
                        answer(Answer::Hello)
                    }
                },
            )
            .await
        });
        client.write_all(GET).await.unwrap();
        tokio::task::yield_now().await;
        assert!(!dropped.load(Ordering::SeqCst), "still being answered");
        drop(client);
        let served = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the loop ends when the client leaves")
            .unwrap();
        assert!(matches!(served.unwrap(), Served::Closed));
        assert!(dropped.load(Ordering::SeqCst), "the request was dropped");
    }
}
