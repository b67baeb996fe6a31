//! Response bodies watched to their end: [`Watched`] tells a [`Watch`] the
//! data bytes as they pass and, once, how the body ended.
//!
//! Two watches use it. The attempt's [`Held`] claim (an `Option`: a failed
//! answer has none) rides in the answer's body until the last byte, so the
//! connection count covers the whole response and the outcome (success, or
//! a reset mid-body) is recorded when the body ends. The latency reported is the time to the response headers, measured
//! when they arrived: the body's length and the client's reading speed say
//! nothing about the instance. The access log's body
//! ([`access_log`](super::access_log)) counts bytes and writes its line.
//!
//! A body that is empty from the start (a 204, a `Content-Length: 0`) may
//! be dropped by hyper without a single poll: dropped at its end counts as
//! ended ([`BodyEnd::Complete`]), dropped before it as
//! [`BodyEnd::Dropped`] (the client went away).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use datapunk_lb_core::FailureKind;
use hyper::body::{Body, Frame, SizeHint};

use super::attempt::Held;
use super::BoxError;

/// How a watched body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyEnd {
    /// Its last frame was read (or it was dropped at its end).
    Complete,
    /// The inner body failed (the upstream connection broke mid-body).
    Error,
    /// It was dropped before its end: the client went away.
    Dropped,
}

/// What a [`Watched`] body reports to.
pub(crate) trait Watch {
    /// `bytes` of data passed.
    fn data(&mut self, _bytes: usize) {}

    /// The body ended; called once.
    fn end(self, how: BodyEnd);
}

/// A body whose bytes and end are reported to a [`Watch`].
pub(crate) struct Watched<B: Body, W: Watch> {
    inner: B,
    watch: Option<W>,
}

impl<B: Body, W: Watch> Watched<B, W> {
    /// Wraps `inner`; `watch` hears of it until it ends.
    pub(crate) fn new(inner: B, watch: W) -> Self {
        Self {
            inner,
            watch: Some(watch),
        }
    }

    /// The wrapped body.
    pub(crate) fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    fn end(&mut self, how: BodyEnd) {
        if let Some(w) = self.watch.take() {
            w.end(how);
        }
    }
}

impl Watch for Held {
    fn end(self, how: BodyEnd) {
        match how {
            BodyEnd::Complete => self.succeed(),
            BodyEnd::Error => self.fail(FailureKind::Reset),
            // The instance answered; the client left. Not the instance's
            // outcome: the claim ends without one.
            BodyEnd::Dropped => {}
        }
    }
}

/// A failed answer (a 5xx forwarded as it is) has no claim: nothing to end.
impl Watch for Option<Held> {
    fn end(self, how: BodyEnd) {
        if let Some(held) = self {
            held.end(how);
        }
    }
}

impl<B, W> Body for Watched<B, W>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    W: Watch + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.end(BodyEnd::Complete);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.end(BodyEnd::Error);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(d), Some(w)) = (frame.data_ref(), this.watch.as_mut()) {
                    w.data(d.len());
                }
                if this.inner.is_end_stream() {
                    this.end(BodyEnd::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body, W: Watch> Drop for Watched<B, W> {
    fn drop(&mut self) {
        let how = if self.inner.is_end_stream() {
            BodyEnd::Complete
        } else {
            BodyEnd::Dropped
        };
        self.end(how);
    }
}
