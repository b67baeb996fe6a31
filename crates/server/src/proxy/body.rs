//! Response bodies that carry the attempt's [`Held`] claim until the last
//! byte, so the connection count covers the whole response and the outcome
//! (success, or a reset mid-body) is recorded when the body ends. The latency
//! reported is the time to the response headers, measured when they arrived:
//! the body's length and the client's reading speed say nothing about the
//! instance.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use datapunk_lb_core::FailureKind;
use hyper::body::{Body, Frame, SizeHint};

use super::attempt::Held;
use super::BoxError;

/// An upstream response body tracked by its attempt's claim.
pub(crate) struct TrackedBody<B> {
    inner: B,
    held: Option<Held>,
}

impl<B> TrackedBody<B> {
    /// Wraps `inner`; `held` is ended when the body ends.
    pub(crate) fn new(inner: B, held: Held) -> Self {
        Self {
            inner,
            held: Some(held),
        }
    }
}

impl<B> Body for TrackedBody<B>
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
            Poll::Ready(None) => {
                if let Some(h) = this.held.take() {
                    h.succeed();
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(h) = this.held.take() {
                    h.fail(FailureKind::Reset);
                }
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if this.inner.is_end_stream() {
                    if let Some(h) = this.held.take() {
                        h.succeed();
                    }
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
