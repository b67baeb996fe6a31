//! The request body: buffered when small enough to replay on a retry,
//! streamed once otherwise.

use bytes::Bytes;
use http::header;
use http::{Response, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Frame;

use super::client_limits::body_error_response;
use super::h1_server::BufferedBody;
use super::http::{ClientBody, ProxyBody};
use super::BoxError;

/// Largest request body buffered for retries.
pub(crate) const MAX_REPLAY_BODY: usize = 64 * 1024;

/// The body type sent upstream.
pub(crate) type UpstreamBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// The request body: replayable bytes, or the stream (sent once).
pub(crate) enum ReqBody {
    Replayable(Bytes),
    Stream(Option<UpstreamBody>),
}

impl ReqBody {
    pub(crate) fn take(&mut self) -> Option<UpstreamBody> {
        match self {
            ReqBody::Replayable(b) if b.is_empty() => {
                Some(Empty::new().map_err(|never| match never {}).boxed())
            }
            ReqBody::Replayable(b) => {
                Some(Full::new(b.clone()).map_err(|never| match never {}).boxed())
            }
            ReqBody::Stream(s) => s.take(),
        }
    }

    pub(crate) fn replayable(&self) -> bool {
        matches!(self, ReqBody::Replayable(_))
    }

    /// Puts back a body [`take`](Self::take) gave out and nothing read
    /// from (the send reached no instance): a stream can then go out with
    /// the next attempt. A buffered body has its bytes still; nothing to do.
    pub(crate) fn give_back(&mut self, body: UpstreamBody) {
        if let ReqBody::Stream(slot @ None) = self {
            *slot = Some(body);
        }
    }

    /// A streamed body still at hand: no attempt has taken it, or one gave
    /// it back unread, so it can be sent whole.
    pub(crate) fn unread_stream(&self) -> bool {
        matches!(self, ReqBody::Stream(Some(_)))
    }
}

/// Reads the request body for replay when it is small: bodies with a known
/// length up to [`MAX_REPLAY_BODY`], and HTTP/1.1 chunked bodies whose first
/// [`MAX_REPLAY_BODY`] bytes end the body. A malformed body (bad chunk
/// framing) is answered with 400 here, before any upstream sees it. HTTP/2
/// bodies without a length are streamed untouched: a gRPC stream may wait for
/// the response before sending more.
///
/// `waited` says whether reading awaited anything: `false` when the body
/// ended with the head (no body, `Content-Length: 0`, HTTP/2 `END_STREAM`
/// on the headers), so a clock read taken before is still "now".
pub(crate) async fn read_body(
    parts: &http::request::Parts,
    body: ClientBody,
) -> Result<ReadBody, Response<ProxyBody>> {
    use hyper::body::Body as _;
    if body.is_end_stream() {
        return Ok(ReadBody {
            body: ReqBody::Replayable(Bytes::new()),
            waited: false,
        });
    }
    // Read whole by the HTTP/1.1 fast path before the request began:
    // nothing to await, nothing to copy.
    if let ClientBody::Buffered(BufferedBody::Full(Some(bytes))) = body {
        return Ok(ReadBody {
            body: ReqBody::Replayable(bytes),
            waited: false,
        });
    }
    Ok(ReadBody {
        body: read_rest(parts, body).await?,
        waited: true,
    })
}

/// The request body as read before the first attempt.
pub(crate) struct ReadBody {
    pub(crate) body: ReqBody,
    /// Whether reading it awaited the client (see [`read_body`]).
    pub(crate) waited: bool,
}

/// [`read_body`] of a body that did not end with the head.
async fn read_rest(
    parts: &http::request::Parts,
    mut body: ClientBody,
) -> Result<ReqBody, Response<ProxyBody>> {
    let len = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let read_ahead = match len {
        Some(n) => n <= MAX_REPLAY_BODY,
        None => parts.version != Version::HTTP_2,
    };
    if !read_ahead {
        return Ok(ReqBody::Stream(Some(body.boxed())));
    }
    let mut prefix: Vec<Frame<Bytes>> = Vec::new();
    let mut size = 0usize;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Err(body_error_response(&e)),
            Some(Ok(frame)) => {
                size += frame.data_ref().map_or(0, |d| d.len());
                prefix.push(frame);
                if size > MAX_REPLAY_BODY {
                    // Too big to replay: send what we read, then the rest.
                    let chained = http_body_util::StreamBody::new(Chained {
                        prefix: prefix.into(),
                        rest: body,
                    });
                    return Ok(ReqBody::Stream(Some(chained.boxed())));
                }
            }
        }
    }
    let mut buf = bytes::BytesMut::with_capacity(size);
    for f in prefix {
        if let Ok(d) = f.into_data() {
            buf.extend_from_slice(&d);
        }
    }
    Ok(ReqBody::Replayable(buf.freeze()))
}

/// The frames already read, followed by the rest of the body.
struct Chained {
    prefix: std::collections::VecDeque<Frame<Bytes>>,
    rest: ClientBody,
}

impl futures_core::Stream for Chained {
    type Item = Result<Frame<Bytes>, BoxError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use hyper::body::Body as _;
        if let Some(f) = self.prefix.pop_front() {
            return std::task::Poll::Ready(Some(Ok(f)));
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }
}
