//! Client-side limits of an HTTP listener: how long a client may take to
//! send a request head, sit idle between requests, or pause inside a
//! request body; and how long an upstream response body may pause.
//!
//! ## Rules (per `[[listener]]`, defaults in brackets)
//!
//! - **`header_read_timeout` [10 s]** (HTTP/1.x): once the first byte of a
//!   request head arrives, the whole head must arrive within it, or the
//!   connection is closed without an answer (a slowloris client trickling
//!   its head a byte at a time holds nothing for longer). The clock starts
//!   at the first byte, not when the connection went idle, so a keep-alive
//!   connection is governed by `idle_timeout` while it waits and by this
//!   once the next request begins (NGINX's `client_header_timeout` /
//!   `keepalive_timeout` split). hyper's own `header_read_timeout` is not
//!   used: it starts when hyper begins waiting for a head, so it would
//!   close every idle keep-alive connection after 10 s.
//! - **`idle_timeout` [60 s]**: a connection with no request in flight (a
//!   request is in flight from its head until its response body has been
//!   sent) for that long is shut down gracefully: HTTP/1.1 closes, HTTP/2
//!   sends GOAWAY, and a client that has not closed 1 s later while still
//!   idle is cut (HTTP/2 waits for a PING ack a bad client never sends).
//!   HTTP/2 connections get only this rule (their frames are not request
//!   heads; the h2 library bounds its own frame reads).
//! - **`request_body_timeout` [30 s]**: the longest wait for the next chunk
//!   of a request body while the proxy is reading it. A body that stalls
//!   while it is being buffered gets 408; one that stalls while streamed
//!   upstream ends the upstream request with an error. Time the proxy spends
//!   waiting on the upstream (backpressure) does not count.
//! - **`max_connections` [100,000]** (HTTP and TCP): open client connections
//!   of the listener at most; see [`accept`](super::accept).
//! - **`response_idle_timeout` [5 min]** (per service): the longest pause
//!   inside an upstream response body while the client is reading it; the
//!   body is then cut (the client sees the connection end early) and the
//!   instance is charged a `Reset`. `request_timeout` still ends at the
//!   response headers. Time the client takes to read does not count.
//!
//! The timers are tokio's; a connection's state is one small mutex touched
//! by its own task (the HTTP/1.1 service runs on it) and its HTTP/2 streams.
//! The watchdog is never woken by a request: it finds the new state at its
//! next check ([`ConnWatch::next_check`]), which comes no later than any
//! deadline the state can reach meanwhile. The price is a check every
//! `min(header_read_timeout, idle_timeout)` [10 s] on an HTTP/1.x
//! connection (every `idle_timeout` on HTTP/2, which has no head rule)
//! instead of a wake-up, timer reset and extra poll of the connection's
//! task per request (what waking on a head's start cost, measured in
//! `docs/benchmarks.md`, "Third pass").

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use hyper::body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::http::{text, ProxyBody};
use super::BoxError;

pub(crate) use crate::config::ClientLimits;

/// The start of the HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Where a client connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request in flight since this instant.
    Idle(Instant),
    /// The first byte of a request head arrived at this instant.
    Head(Instant),
    /// Requests in flight.
    Busy,
}

/// What the watchdog does when a deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// No request for `idle_timeout`: graceful shutdown.
    Idle,
    /// A head not complete within `header_read_timeout`: close at once.
    Head,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    in_flight: usize,
    /// The connection speaks HTTP/2 (seen from its preface).
    h2: bool,
    /// Bytes have been read (the preface check is done).
    read_any: bool,
}

/// The shared state of one client connection: fed by its socket reads
/// ([`WatchedSocket`]) and its requests ([`ConnWatch::request_started`]), read by
/// the watchdog in the connection's task.
#[derive(Debug)]
pub(crate) struct ConnWatch {
    state: Mutex<State>,
}

impl ConnWatch {
    /// A new connection, idle since `now`.
    pub(crate) fn new(now: Instant) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                phase: Phase::Idle(now),
                in_flight: 0,
                h2: false,
                read_any: false,
            }),
        })
    }

    /// `data` was read from the client; `now` is asked only when the read
    /// starts a request head (no clock read per socket read otherwise). No
    /// wake-up: the watchdog's next check is due before the head's deadline
    /// ([`next_check`](Self::next_check)).
    fn read(&self, data: &[u8], now: impl FnOnce() -> Instant) {
        let mut s = self.state.lock();
        if !s.read_any {
            s.read_any = true;
            let n = data.len().min(H2_PREFACE.len());
            s.h2 = data[..n] == H2_PREFACE[..n];
        }
        if !s.h2 && matches!(s.phase, Phase::Idle(_)) {
            s.phase = Phase::Head(now());
        }
    }

    /// A request head was parsed: in flight until the guard drops (move it
    /// into the response body).
    pub(crate) fn request_started(self: &Arc<Self>) -> RequestGuard {
        let mut s = self.state.lock();
        s.in_flight += 1;
        s.phase = Phase::Busy;
        RequestGuard(self.clone())
    }

    /// The next deadline and what it ends, under `limits`.
    pub(crate) fn deadline(&self, limits: &ClientLimits) -> Option<(Instant, Expiry)> {
        Self::deadline_of(self.state.lock().phase, limits)
    }

    fn deadline_of(phase: Phase, limits: &ClientLimits) -> Option<(Instant, Expiry)> {
        match phase {
            Phase::Idle(since) => Some((since + limits.idle_timeout, Expiry::Idle)),
            Phase::Head(since) => Some((since + limits.header_read_timeout, Expiry::Head)),
            Phase::Busy => None,
        }
    }

    /// When the watchdog looks next, at `now`: the deadline, but no later
    /// than `now + min(header_read_timeout, idle_timeout)` (HTTP/2:
    /// `now + idle_timeout`). The state changes without waking it (a head
    /// starts at `t ≥ now`: due at `t + header_read_timeout`; a request
    /// starts: no deadline; the last one ends at `t ≥ now`: idle until
    /// `t + idle_timeout`), so it must look before any deadline the state
    /// can reach that way: each is at least the bound after `now`. No
    /// wake-up and no timer reset per request; a connection with nothing
    /// due looks once per bound.
    pub(crate) fn next_check(&self, limits: &ClientLimits, now: Instant) -> Instant {
        let s = self.state.lock();
        let bound = if s.h2 {
            limits.idle_timeout
        } else {
            limits.idle_timeout.min(limits.header_read_timeout)
        };
        let check = now + bound;
        Self::deadline_of(s.phase, limits).map_or(check, |(at, _)| at.min(check))
    }

    /// Whether no request is in flight.
    pub(crate) fn idle(&self) -> bool {
        self.state.lock().in_flight == 0
    }

    /// What is due now under `limits`, if anything.
    pub(crate) fn expired(&self, limits: &ClientLimits) -> Option<Expiry> {
        self.deadline(limits)
            .filter(|(at, _)| *at <= Instant::now())
            .map(|(_, why)| why)
    }
}

/// A response body that keeps its request in flight until it is dropped;
/// frames, end and size pass through, so a body of known length keeps its
/// `Content-Length`.
pub(crate) struct InFlight<B> {
    inner: B,
    _guard: RequestGuard,
}

impl<B> InFlight<B> {
    /// `inner`, holding `guard` until the body is dropped.
    pub(crate) fn new(inner: B, guard: RequestGuard) -> Self {
        Self {
            inner,
            _guard: guard,
        }
    }
}

impl<B: Body + Unpin> Body for InFlight<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request in flight; ends when dropped (it rides in the response body,
/// so the request stays in flight until its body has been sent).
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<ConnWatch>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut s = self.0.state.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 {
            // No wake-up: the idle deadline is later than any check the
            // watchdog has armed ([`ConnWatch::next_check`]).
            s.phase = Phase::Idle(Instant::now());
        }
    }
}

/// The client socket, reporting what it reads to its [`ConnWatch`].
pub(crate) struct WatchedSocket<IO> {
    io: IO,
    watch: Arc<ConnWatch>,
}

impl<IO> WatchedSocket<IO> {
    pub(crate) fn new(io: IO, watch: Arc<ConnWatch>) -> Self {
        Self { io, watch }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WatchedSocket<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.read(&buf.filled()[before..], Instant::now);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WatchedSocket<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A body paused longer than its limit.
#[derive(Debug, thiserror::Error)]
#[error("{what} paused longer than {limit:?}")]
pub(crate) struct Stalled {
    what: &'static str,
    limit: Duration,
}

/// A body whose every wait for the next frame is bounded by `limit`: the
/// request body (`request_body_timeout`) and the upstream response body
/// (`response_idle_timeout`). The timer runs only while the body is polled
/// and pending, so a reader that stops polling is not charged.
pub(crate) struct StallTimeout<B> {
    inner: B,
    limit: Duration,
    what: &'static str,
    /// Allocated at the first wait; reset at each later one.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The sleep measures the current wait.
    armed: bool,
}

impl<B> StallTimeout<B> {
    /// `inner`, cut after a pause of `limit`; `what` names it in the error.
    pub(crate) fn new(inner: B, limit: Duration, what: &'static str) -> Self {
        Self {
            inner,
            limit,
            what,
            sleep: None,
            armed: false,
        }
    }

    /// The wrapped body.
    pub(crate) fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

impl<B> Body for StallTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.armed = false;
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                // The clock is read when a wait begins, not at every
                // wake-up during it.
                let sleep = match (&mut this.sleep, this.armed) {
                    (Some(sleep), true) => sleep,
                    (Some(sleep), false) => {
                        sleep.as_mut().reset(Instant::now() + this.limit);
                        sleep
                    }
                    (slot @ None, _) => slot.insert(Box::pin(tokio::time::sleep(this.limit))),
                };
                this.armed = true;
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Stalled {
                        what: this.what,
                        limit: this.limit,
                    })))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The answer to a request whose body could not be read: 408 when it
/// stalled past `request_body_timeout`, else 400.
pub(crate) fn body_error_response(e: &BoxError) -> http::Response<ProxyBody> {
    if e.is::<Stalled>() {
        text(StatusCode::REQUEST_TIMEOUT, "request body timed out")
    } else {
        text(StatusCode::BAD_REQUEST, "invalid request body")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ClientLimits {
        ClientLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ..ClientLimits::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_check_comes_before_any_deadline_reached_without_a_wake_up() {
        // A head timeout longer than the idle one: the case where looking
        // at the head's deadline alone would miss the idle close.
        let l = ClientLimits {
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(5),
            ..ClientLimits::default()
        };
        let t0 = Instant::now();
        let w = ConnWatch::new(t0);
        assert_eq!(
            w.next_check(&l, t0),
            t0 + l.idle_timeout,
            "idle: its deadline"
        );
        w.read(b"G", || t0);
        assert_eq!(
            w.next_check(&l, t0),
            t0 + l.idle_timeout,
            "a head: no later than an idle deadline of a request ending now"
        );
        let guard = w.request_started();
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(w.next_check(&l, t1), t1 + l.idle_timeout, "busy");
        tokio::time::advance(Duration::from_secs(3)).await;
        drop(guard);
        let ended = Instant::now();
        assert_eq!(w.next_check(&l, ended), ended + l.idle_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_starts_unannounced_is_caught_at_its_deadline() {
        // The defaults: a head timeout shorter than the idle one.
        let l = limits();
        let t0 = Instant::now();
        let w = ConnWatch::new(t0);
        let armed = w.next_check(&l, t0);
        assert_eq!(armed, t0 + l.header_read_timeout, "idle: the bound");
        // A head starts after the check was armed, without a wake-up.
        let t1 = t0 + Duration::from_secs(7);
        tokio::time::advance(Duration::from_secs(7)).await;
        w.read(b"GE", || t1);
        tokio::time::advance(armed - Instant::now()).await;
        assert_eq!(w.expired(&l), None, "the armed check: not due yet");
        let next = w.next_check(&l, Instant::now());
        assert_eq!(next, t1 + l.header_read_timeout, "re-armed at its deadline");
        tokio::time::advance(next - Instant::now()).await;
        assert_eq!(w.expired(&l), Some(Expiry::Head));
        // HTTP/2 has no heads: it looks once per idle timeout.
        let h2 = ConnWatch::new(t0);
        h2.read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", || t0);
        let now = Instant::now();
        assert_eq!(h2.next_check(&l, now), t0 + l.idle_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_then_head_then_busy_then_idle_again() {
        let t0 = Instant::now();
        let w = ConnWatch::new(t0);
        let l = limits();
        assert_eq!(w.deadline(&l), Some((t0 + l.idle_timeout, Expiry::Idle)));
        // The first byte of a head: the head clock starts there.
        let t1 = t0 + Duration::from_secs(5);
        w.read(b"G", || t1);
        assert_eq!(
            w.deadline(&l),
            Some((t1 + l.header_read_timeout, Expiry::Head))
        );
        // More bytes of the same head do not move it.
        w.read(b"ET / HTTP/1.1\r\n", || t1 + Duration::from_secs(3));
        assert_eq!(
            w.deadline(&l),
            Some((t1 + l.header_read_timeout, Expiry::Head))
        );
        let guard = w.request_started();
        assert_eq!(w.deadline(&l), None, "no deadline while in flight");
        // A watchdog woken by the head's old deadline finds nothing due.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(w.expired(&l), None, "a request in flight is never cut");
        // Body bytes while busy do not start a head.
        w.read(b"body", || t1 + Duration::from_secs(4));
        assert_eq!(w.deadline(&l), None);
        let second = w.request_started();
        drop(guard);
        assert_eq!(w.deadline(&l), None, "one request still in flight");
        drop(second);
        let now = Instant::now();
        assert_eq!(w.deadline(&l), Some((now + l.idle_timeout, Expiry::Idle)));
        assert_eq!(w.expired(&l), None);
        tokio::time::advance(l.idle_timeout).await;
        assert_eq!(w.expired(&l), Some(Expiry::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_connection_has_only_the_idle_rule() {
        let t0 = Instant::now();
        let w = ConnWatch::new(t0);
        let l = limits();
        w.read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", || t0);
        assert_eq!(w.deadline(&l), Some((t0 + l.idle_timeout, Expiry::Idle)));
        w.read(b"\0\0\x04\x08", || t0 + Duration::from_secs(1));
        assert_eq!(w.deadline(&l), Some((t0 + l.idle_timeout, Expiry::Idle)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_after_its_limit_and_a_flowing_one_never() {
        use http_body_util::BodyExt;
        let (mut tx, rx) = futures_channel_body();
        let mut body = StallTimeout::new(rx, Duration::from_secs(2), "request body");
        // Chunks every second: never a stall.
        let feeder = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).await;
            }
            // Then nothing for longer than the limit (tx kept alive).
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(tx);
        });
        for _ in 0..5 {
            let f = body.frame().await.unwrap().unwrap();
            assert_eq!(f.into_data().unwrap(), "x");
        }
        let t = Instant::now();
        let e = body.frame().await.unwrap().unwrap_err();
        assert!(e.is::<Stalled>(), "{e}");
        assert_eq!(t.elapsed(), Duration::from_secs(2));
        assert_eq!(
            body_error_response(&e).status(),
            StatusCode::REQUEST_TIMEOUT
        );
        feeder.abort();
    }

    type Chan = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

    /// A body fed through a channel.
    fn futures_channel_body() -> (ChanSender, http_body_util::StreamBody<ChanStream>) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        (
            ChanSender(tx),
            http_body_util::StreamBody::new(ChanStream(rx)),
        )
    }

    struct ChanSender(Chan);

    impl ChanSender {
        async fn send(&mut self, f: Result<Frame<Bytes>, BoxError>) -> Result<(), ()> {
            self.0.send(f).await.map_err(|_| ())
        }
    }

    struct ChanStream(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>);

    impl futures_core::Stream for ChanStream {
        type Item = Result<Frame<Bytes>, BoxError>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0.poll_recv(cx)
        }
    }
}
