//! Upstream HTTP/2 on the `h2` crate directly: the request's own task
//! sends the request and awaits its response; only the connection (and the
//! pipe of a streamed request body) runs in the connection's task.
//!
//! hyper's HTTP/2 client (`hyper::client::conn::http2`) sits on the same
//! crate, but hands every request through a dispatch channel to a client
//! task, which opens the stream, queues a `SendWhen` future on the
//! executor to wait for the response, and sends it back over a oneshot:
//! per request a channel message, a boxed future, a oneshot and two
//! wake-ups of other futures, ~6 % of the proxy's CPU in the h2c
//! in-and-out bench (`docs/benchmarks.md`, "Fourth pass").
//!
//! ## Rules (what hyper's client did, kept)
//!
//! - **Connection**: the builder takes hyper's client defaults (stream
//!   window 2 MiB, connection window 5 MiB, frames of 16 KiB, header list
//!   16 KiB, send buffer 1 MiB, 1024 locally reset streams, no push, no
//!   keep-alive pings: the pool never enabled them), and
//!   `initial_max_send_streams(1)`: one stream until the server's SETTINGS
//!   say how many, so a burst on a new connection never overruns a limit it
//!   has not heard yet. Its future runs in one task per connection
//!   ([`WithStreams`], with the request-body pipes); it ends, sending
//!   GOAWAY, once every [`H2Sender`] (the pool's and the requests') and
//!   every stream is gone.
//! - **Waiting for a stream**: past the server's
//!   `SETTINGS_MAX_CONCURRENT_STREAMS`, `h2` queues the stream as pending
//!   open and sends its HEADERS when one ends; the request waits (under
//!   its deadline, which the caller puts around the send) rather than open
//!   a second connection.
//! - **Unsent**: a connection that reports an error before the request was
//!   handed to it (GOAWAY received, closed) gives the request back
//!   ([`SendFailure::Unsent`]) for a new connection. Once `h2` has taken
//!   the head, an error is [`SendFailure::Sent`], except a stream the
//!   server says it did not process (RFC 9113 §8.7): one above the last
//!   stream id of a graceful GOAWAY (`NO_ERROR`; nginx sends one after
//!   `keepalive_requests`, 1,000 by default, refusing the streams in flight
//!   past it) or reset with `REFUSED_STREAM`: [`SendFailure::Refused`],
//!   which the pool sends once more (`pool.rs`) whatever its method, when the
//!   attempt can build it again.
//! - **Headers**: the caller has stripped the hop-by-hop headers
//!   (`headers.rs`, all of those HTTP/2 forbids; `TE: trailers` stays);
//!   `h2` refuses a request still carrying one. As hyper did, a body of
//!   known length gets a `Content-Length` when it has none (not for an empty
//!   GET, HEAD, DELETE or CONNECT).
//! - **Request body**: an empty body ends the stream with the HEADERS. A
//!   body that comes whole (buffered for replay: its first frame is all of
//!   it) goes out in one `send_data` with `END_STREAM`, from the request's
//!   task; `h2` sends it as the windows allow. Anything else is piped by a
//!   [`Pipe`] in the connection's task, one frame at a time, asking `h2`
//!   for capacity and waiting for it before taking the next frame (a
//!   stalled peer stops the reading of the client's body), trailers sent as
//!   trailers (gRPC), a body error resetting the stream.
//! - **Response body** ([`H2Body`]): data frames as they come, each one's
//!   bytes released to the flow-control window as it is handed on (so the
//!   server sends at the pace the client reads), then the trailers; a reset
//!   with `NO_ERROR` ends it early without an error (RFC 9113 §8.1). Its
//!   size hint is the remaining `Content-Length`.
//! - **Cancel**: a request dropped before its response (deadline, client
//!   gone) or a response body dropped before its end resets the stream
//!   (`CANCEL`): `h2` does it when the last handle of the stream goes, and a
//!   running pipe, which holds one, is told to reset and stop.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::header::CONTENT_LENGTH;
use http::{HeaderValue, Method, Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use hyper::rt::Executor as _;
use tokio::sync::oneshot;
use tracing::debug;

use super::request_body::UpstreamBody;
use super::stream_tasks::{StreamTasks, WithStreams};
use super::upstream_tls::UpstreamIo;
use super::BoxError;

/// hyper's client defaults (`proto/h2/client.rs`), so the wire does not
/// change with the client under it.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER_SIZE: usize = 1024 * 1024;
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// A handle on one upstream HTTP/2 connection: cheap to clone (one per
/// request), the connection closes when the last one and its streams are
/// gone.
#[derive(Clone)]
pub(crate) struct H2Sender {
    send: SendRequest<Bytes>,
    /// The connection's executor: streamed request bodies run there.
    tasks: StreamTasks,
    /// Set when the connection's future ended.
    ended: Arc<AtomicBool>,
}

impl std::fmt::Debug for H2Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Sender")
            .field("ended", &self.ended.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The HTTP/2 handshake over `io` (the client preface and SETTINGS are
/// written; the server's are read by the connection task); starts the
/// connection's task.
pub(crate) async fn handshake(io: UpstreamIo) -> Result<H2Sender, h2::Error> {
    let (send, conn) = h2::client::Builder::new()
        .initial_max_send_streams(1)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER_SIZE)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    let tasks = StreamTasks::default();
    let ended = Arc::new(AtomicBool::new(false));
    let flag = ended.clone();
    let conn = async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
        flag.store(true, Ordering::Relaxed);
    };
    tokio::spawn(WithStreams::new(conn, tasks.clone()));
    Ok(H2Sender { send, tasks, ended })
}

/// Why a send failed, and whether the request is back.
#[derive(Debug)]
pub(crate) enum SendFailure {
    /// The connection failed before it took the request: here it is, for
    /// another connection (boxed: a rare path, kept out of every send's
    /// result).
    Unsent(h2::Error, Box<Request<UpstreamBody>>),
    /// The connection took the request (it may have reached the server).
    Sent(h2::Error),
    /// The connection took the request and the server refused its stream
    /// unprocessed (module doc, **Unsent**).
    Refused(h2::Error),
}

impl SendFailure {
    /// An error after `h2` took the request: [`Refused`](Self::Refused)
    /// when the server says the stream was not processed, else
    /// [`Sent`](Self::Sent). `h2` gives a graceful GOAWAY's error (remote,
    /// `NO_ERROR`) only to the streams above its last stream id, and to
    /// requests sent after it: the streams up to it end or fail on their
    /// own (a close under them is an I/O error, an error GOAWAY carries
    /// its reason).
    fn after_send(e: h2::Error) -> Self {
        let refused = e.is_remote()
            && match e.reason() {
                Some(Reason::NO_ERROR) => e.is_go_away(),
                Some(Reason::REFUSED_STREAM) => e.is_reset(),
                _ => false,
            };
        if refused {
            SendFailure::Refused(e)
        } else {
            SendFailure::Sent(e)
        }
    }
}

impl H2Sender {
    /// Whether the connection can take no new stream: it ended, or a GOAWAY
    /// or an error reached it.
    pub(crate) fn is_closed(&mut self) -> bool {
        if self.ended.load(Ordering::Relaxed) {
            return true;
        }
        // A handle with no stream pending open is ready at once unless the
        // connection has an error; the waker is never needed.
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        matches!(self.send.poll_ready(&mut cx), Poll::Ready(Err(_)))
    }

    /// Sends `req` (absolute URI: its authority is the `:authority` sent)
    /// and waits for the response head.
    pub(crate) async fn send(
        mut self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<H2Body>, SendFailure> {
        if let Err(e) = poll_fn(|cx| self.send.poll_ready(cx)).await {
            return Err(SendFailure::Unsent(e, Box::new(req)));
        }
        let (head, mut body) = req.into_parts();
        let mut head = Request::from_parts(head, ());
        if let Some(len) = body.size_hint().exact() {
            if (len != 0 || has_payload_semantics(head.method()))
                && !head.headers().contains_key(CONTENT_LENGTH)
            {
                head.headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from(len));
            }
        }
        let eos = body.is_end_stream();
        let (response, mut stream) = self
            .send
            .send_request(head, eos)
            .map_err(SendFailure::after_send)?;
        let mut cancel = None;
        if !eos {
            // Polled once here: a buffered body gives all of itself at once.
            let first = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
            match first {
                Poll::Ready(Some(Ok(frame))) if frame.is_data() && body.is_end_stream() => {
                    let data = frame.into_data().unwrap_or_default();
                    stream
                        .send_data(data, true)
                        .map_err(SendFailure::after_send)?;
                }
                Poll::Ready(None) => {
                    stream
                        .send_data(Bytes::new(), true)
                        .map_err(SendFailure::after_send)?;
                }
                first => {
                    let (tx, rx) = oneshot::channel();
                    cancel = Some(CancelPipe(Some(tx)));
                    let peeked = match first {
                        Poll::Ready(Some(frame)) => Some(frame),
                        _ => None,
                    };
                    self.tasks.execute(Pipe {
                        body,
                        stream,
                        peeked,
                        waiting: None,
                        cancel: Some(rx),
                    });
                }
            }
        }
        // Dropped before the response (the deadline, the client gone), the
        // future drops `cancel`, which resets a piped stream; with no pipe,
        // the stream's last handle goes with `response`, which resets it.
        let resp = response.await.map_err(SendFailure::after_send)?;
        let (parts, recv) = resp.into_parts();
        let body = H2Body::new(recv, cancel).with_length(&parts.headers);
        Ok(Response::from_parts(parts, body))
    }
}

/// `hyper::headers::method_has_defined_payload_semantics`.
fn has_payload_semantics(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    )
}

/// Tells a request-body [`Pipe`] to reset its stream when dropped unless
/// disarmed: held by the request until its response, then by the response
/// body until its end.
#[derive(Debug)]
struct CancelPipe(Option<oneshot::Sender<()>>);

impl CancelPipe {
    /// The stream ended well: the pipe may finish the body.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelPipe {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Pipes a streamed request body into its stream, in the connection's task
/// (module doc: **Request body**).
struct Pipe {
    body: UpstreamBody,
    stream: SendStream<Bytes>,
    /// A frame read before the pipe started.
    peeked: Option<Result<Frame<Bytes>, BoxError>>,
    /// A data frame read and waiting for capacity, and whether it ends the
    /// body.
    waiting: Option<(Bytes, bool)>,
    /// Fired when the request or its response body is dropped early.
    cancel: Option<oneshot::Receiver<()>>,
}

impl Future for Pipe {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if let Some(rx) = &mut this.cancel {
            match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(())) => {
                    debug!("upstream request body cancelled; resetting its stream");
                    this.stream.send_reset(Reason::CANCEL);
                    return Poll::Ready(());
                }
                // Disarmed: the response ended well; the body may finish.
                Poll::Ready(Err(_)) => this.cancel = None,
                Poll::Pending => {}
            }
        }
        match this.pipe(cx) {
            Poll::Ready(Err(e)) => {
                debug!(error = %e, "upstream request body not sent whole");
                Poll::Ready(())
            }
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Pipe {
    fn pipe(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            // A reset from the server ends the pipe (and wakes it while it
            // waits for the body or for capacity).
            if let Poll::Ready(reason) = self.stream.poll_reset(cx) {
                return Poll::Ready(Err(format!("stream reset: {reason:?}").into()));
            }
            if let Some((data, eos)) = self.waiting.take() {
                while self.stream.capacity() == 0 {
                    match self.stream.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                        Poll::Ready(None) => return Poll::Ready(Err("stream closed".into())),
                        Poll::Pending => {
                            self.waiting = Some((data, eos));
                            return Poll::Pending;
                        }
                    }
                }
                // The chunk goes whole: `h2` buffers what exceeds the
                // capacity and sends it as the window opens.
                self.stream.send_data(data, eos)?;
                if eos {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let frame = match self.peeked.take() {
                Some(frame) => Some(frame),
                None => match Pin::new(&mut self.body).poll_frame(cx) {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => return Poll::Pending,
                },
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = self.body.is_end_stream();
                        if data.is_empty() {
                            self.stream.send_data(data, eos)?;
                            if eos {
                                return Poll::Ready(Ok(()));
                            }
                            continue;
                        }
                        // A claim of one byte, not the chunk: a whole-chunk
                        // claim pins connection window a peer may release
                        // only when it is spent (hyper #4003); `send_data`
                        // raises it to what is buffered.
                        self.stream.reserve_capacity(1);
                        self.waiting = Some((data, eos));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.stream.reserve_capacity(0);
                            self.stream.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                        // An unknown frame kind: skipped.
                    }
                },
                Some(Err(e)) => {
                    self.stream.send_reset(Reason::INTERNAL_ERROR);
                    return Poll::Ready(Err(e));
                }
                None => {
                    self.stream.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// An upstream HTTP/2 response body (module doc: **Response body**).
pub(crate) struct H2Body {
    recv: RecvStream,
    /// The data frames have ended; the trailers are next.
    data_done: bool,
    /// The body has ended (trailers or none read).
    ended: bool,
    /// What `Content-Length` says is left, if it said.
    remaining: Option<u64>,
    /// A streamed request body still being piped: reset when this body is
    /// dropped before its end.
    cancel: Option<CancelPipe>,
}

impl std::fmt::Debug for H2Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Body")
            .field("data_done", &self.data_done)
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl H2Body {
    fn new(recv: RecvStream, cancel: Option<CancelPipe>) -> Self {
        Self {
            recv,
            data_done: false,
            ended: false,
            remaining: None,
            cancel,
        }
    }

    /// Sets the size hint from the response's `Content-Length` (every value
    /// the same, as hyper reads it); an ended stream with none has 0 left.
    fn with_length(mut self, headers: &http::HeaderMap) -> Self {
        let mut values = headers.get_all(CONTENT_LENGTH).iter();
        let first = values
            .next()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        self.remaining = first.filter(|n| {
            values.all(|v| v.to_str().ok().and_then(|v| v.trim().parse().ok()) == Some(*n))
        });
        if self.remaining.is_none() && self.recv.is_end_stream() {
            self.remaining = Some(0);
        }
        self
    }

    fn end(&mut self) {
        self.ended = true;
        if let Some(c) = &mut self.cancel {
            c.disarm();
        }
    }
}

impl Drop for H2Body {
    fn drop(&mut self) {
        // Read to its end, or the server ended it before a read: the pipe
        // may finish the request body. Else the cancel resets the stream.
        if self.recv.is_end_stream() {
            if let Some(c) = &mut self.cancel {
                c.disarm();
            }
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match this.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    // Handed on: the server may send as much again.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(n) = &mut this.remaining {
                        *n = n.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => {
                    if e.reason() == Some(Reason::NO_ERROR) {
                        this.end();
                        return Poll::Ready(None);
                    }
                    this.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => this.data_done = true,
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(trailers)) => {
                this.end();
                Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
            }
            Poll::Ready(Err(e)) => {
                if e.reason() == Some(Reason::NO_ERROR) {
                    this.end();
                    return Poll::Ready(None);
                }
                this.ended = true;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use h2::server::SendResponse;
    use http::HeaderMap;
    use http_body_util::BodyExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    /// The response to a send spawned by a test, within `WAIT`.
    async fn answered(
        send: tokio::task::JoinHandle<Result<Response<H2Body>, SendFailure>>,
    ) -> Response<H2Body> {
        tokio::time::timeout(WAIT, send)
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    }

    /// A request as an `h2` server took it.
    type Taken = (Request<RecvStream>, SendResponse<Bytes>);

    /// A real `h2` server on a free local port, one connection; the
    /// requests it takes come out of the channel. Its windows are the
    /// protocol's defaults (64 KiB), released only as the test reads.
    async fn server() -> (u16, mpsc::UnboundedReceiver<Taken>) {
        let (port, taken, _) = server_task().await;
        (port, taken)
    }

    /// [`server`], and its task: aborted, it closes the connection.
    async fn server_task() -> (
        u16,
        mpsc::UnboundedReceiver<Taken>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(socket).await.unwrap();
            while let Some(Ok(taken)) = conn.accept().await {
                if tx.send(taken).is_err() {
                    return;
                }
            }
        });
        (port, rx, task)
    }

    async fn client(port: u16) -> H2Sender {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        handshake(UpstreamIo::Plain(tcp)).await.unwrap()
    }

    /// A GET with no body.
    fn get(uri: &str) -> Request<UpstreamBody> {
        let empty = http_body_util::Empty::new().map_err(|never| match never {});
        Request::get(uri).body(empty.boxed()).unwrap()
    }

    fn request(body: UpstreamBody) -> Request<UpstreamBody> {
        Request::builder()
            .method(Method::POST)
            .uri("http://api.test/upload")
            .body(body)
            .unwrap()
    }

    /// A streamed body (never "whole": no end known until its last frame
    /// is taken) that counts the frames taken from it; a `None` frame is
    /// one that never comes.
    struct Frames {
        left: VecDeque<Option<Frame<Bytes>>>,
        taken: Arc<AtomicUsize>,
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.left.pop_front() {
                Some(Some(frame)) => {
                    self.taken.fetch_add(1, Ordering::SeqCst);
                    Poll::Ready(Some(Ok(frame)))
                }
                Some(None) => {
                    self.left.push_front(None);
                    Poll::Pending
                }
                None => Poll::Ready(None),
            }
        }
    }

    fn frames(
        left: impl IntoIterator<Item = Option<Frame<Bytes>>>,
    ) -> (UpstreamBody, Arc<AtomicUsize>) {
        let taken = Arc::new(AtomicUsize::new(0));
        let body = Frames {
            left: left.into_iter().collect(),
            taken: taken.clone(),
        };
        (BodyExt::boxed(body), taken)
    }

    #[tokio::test]
    async fn a_large_body_is_piped_as_the_servers_window_allows() {
        const CHUNK: usize = 16 * 1024;
        const CHUNKS: usize = 64;
        let (port, mut taken) = server().await;
        let sender = client(port).await;
        let (body, polled) =
            frames((0..CHUNKS).map(|i| Some(Frame::data(Bytes::from(vec![i as u8; CHUNK])))));
        let send = tokio::spawn(sender.send(request(body)));
        let (req, mut respond) = tokio::time::timeout(WAIT, taken.recv())
            .await
            .unwrap()
            .unwrap();
        // The server reads nothing yet: its 64 KiB windows hold the pipe
        // to four chunks sent, one more waiting for capacity (and one
        // more in flight at most). A pipe that ignored flow control would
        // take all 64 into `h2`'s buffer.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let early = polled.load(Ordering::SeqCst);
        assert!(
            early <= 6,
            "{early} chunks taken before the server read any"
        );
        let mut recv = req.into_body();
        let mut got = Vec::new();
        while let Some(data) = tokio::time::timeout(WAIT, recv.data()).await.unwrap() {
            let data = data.unwrap();
            recv.flow_control().release_capacity(data.len()).unwrap();
            got.extend_from_slice(&data);
        }
        assert_eq!(got.len(), CHUNK * CHUNKS, "the whole body arrived");
        assert!(
            got.chunks(CHUNK)
                .enumerate()
                .all(|(i, c)| c.iter().all(|b| *b == i as u8)),
            "in order"
        );
        respond.send_response(Response::new(()), true).unwrap();
        let resp = answered(send).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(polled.load(Ordering::SeqCst), CHUNKS);
    }

    #[tokio::test]
    async fn a_whole_body_goes_with_its_length_and_ends_the_stream() {
        let (port, mut taken) = server().await;
        let sender = client(port).await;
        let body = http_body_util::Full::new(Bytes::from_static(b"hello"))
            .map_err(|never| match never {})
            .boxed();
        let send = tokio::spawn(sender.send(request(body)));
        let (req, mut respond) = tokio::time::timeout(WAIT, taken.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(req.headers()[CONTENT_LENGTH], "5", "a known length is sent");
        let mut recv = req.into_body();
        assert_eq!(recv.data().await.unwrap().unwrap(), "hello");
        assert!(recv.is_end_stream(), "the one DATA frame ended the stream");
        respond.send_response(Response::new(()), true).unwrap();
        let resp = answered(send).await;
        assert!(resp.body().is_end_stream());
    }

    #[tokio::test]
    async fn trailers_pass_both_ways() {
        let (port, mut taken) = server().await;
        let sender = client(port).await;
        let mut sent_trailers = HeaderMap::new();
        sent_trailers.insert("x-checksum", HeaderValue::from_static("abc"));
        let (body, _) = frames([
            Some(Frame::data(Bytes::from_static(b"ping"))),
            Some(Frame::trailers(sent_trailers)),
        ]);
        let send = tokio::spawn(sender.send(request(body)));
        let (req, mut respond) = tokio::time::timeout(WAIT, taken.recv())
            .await
            .unwrap()
            .unwrap();
        let mut recv = req.into_body();
        assert_eq!(recv.data().await.unwrap().unwrap(), "ping");
        assert!(recv.data().await.is_none());
        let trailers = recv.trailers().await.unwrap().expect("request trailers");
        assert_eq!(trailers["x-checksum"], "abc");
        let mut stream = respond.send_response(Response::new(()), false).unwrap();
        stream
            .send_data(Bytes::from_static(b"pong"), false)
            .unwrap();
        let mut status = HeaderMap::new();
        status.insert("grpc-status", HeaderValue::from_static("0"));
        stream.send_trailers(status).unwrap();
        let resp = answered(send).await;
        let got = tokio::time::timeout(WAIT, resp.into_body().collect())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            got.trailers().expect("response trailers")["grpc-status"],
            "0"
        );
        assert_eq!(got.to_bytes(), "pong");
    }

    #[tokio::test]
    async fn a_response_body_dropped_early_resets_its_stream() {
        let (port, mut taken) = server().await;
        let sender = client(port).await;
        let get = get("http://api.test/stream");
        let send = tokio::spawn(sender.send(get));
        let (_req, mut respond) = tokio::time::timeout(WAIT, taken.recv())
            .await
            .unwrap()
            .unwrap();
        let mut stream = respond.send_response(Response::new(()), false).unwrap();
        stream
            .send_data(Bytes::from_static(b"first"), false)
            .unwrap();
        let resp = answered(send).await;
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "first");
        drop(body);
        let reason = tokio::time::timeout(WAIT, poll_fn(|cx| stream.poll_reset(cx)))
            .await
            .expect("the stream was reset")
            .unwrap();
        assert_eq!(reason, Reason::CANCEL);
    }

    #[tokio::test]
    async fn a_request_dropped_while_its_body_streams_resets_its_stream() {
        let (port, mut taken) = server().await;
        let sender = client(port).await;
        // One chunk, then a body that never goes on.
        let (body, _) = frames([Some(Frame::data(Bytes::from_static(b"part"))), None]);
        let send = tokio::spawn(sender.send(request(body)));
        let (req, _respond) = tokio::time::timeout(WAIT, taken.recv())
            .await
            .unwrap()
            .unwrap();
        let mut recv = req.into_body();
        assert_eq!(recv.data().await.unwrap().unwrap(), "part");
        // The request gives up (its deadline) before any response.
        send.abort();
        let after = tokio::time::timeout(WAIT, recv.data())
            .await
            .expect("the stream was reset")
            .expect("an error, not an end");
        assert_eq!(after.unwrap_err().reason(), Some(Reason::CANCEL));
    }

    #[tokio::test]
    async fn a_closed_connection_gives_the_request_back_unsent() {
        let (port, mut taken, task) = server_task().await;
        let mut sender = client(port).await;
        let first = get("http://api.test/");
        let send = tokio::spawn(sender.clone().send(first));
        let (_req, mut respond) = tokio::time::timeout(WAIT, taken.recv())
            .await
            .unwrap()
            .unwrap();
        respond.send_response(Response::new(()), true).unwrap();
        answered(send).await;
        // The server goes away (its task ends: the socket closes).
        task.abort();
        tokio::time::timeout(WAIT, async {
            while !sender.is_closed() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the handle sees its connection closed");
        let again = get("http://api.test/again");
        match sender.send(again).await {
            Err(SendFailure::Unsent(_, back)) => assert_eq!(back.uri().path(), "/again"),
            other => panic!("expected the request back, got {other:?}"),
        }
    }
}
