//! An instance's response head passed to an HTTP/1.1 client as its lines,
//! without a header map in between.
//!
//! The common answer goes from one of our HTTP/1.1 parsers to the other:
//! the upstream exchange ([`h1_exchange`](super::h1_exchange)) parses it,
//! the client loop ([`h1_server`](super::h1_server)) writes it. In between
//! nothing reads its headers: the proxy only adds `X-Request-Id`. Building
//! a `HeaderMap` for it (each name lowercased and looked up, each value
//! checked, each entry hashed and placed, then the map walked and cleared)
//! cost ~1,100 of the ~24,500 user-space instructions of a steady request
//! (callgrind, docs/benchmarks.md "Ninth pass"). HAProxy keeps the head's
//! bytes too.
//!
//! ## The rule
//!
//! The exchange keeps a response head as [`RawHeaders`] (the head's bytes
//! and each header's name and value span) with its connection, where the
//! response's body hands it to the writer ([`KeptHead`]), and leaves its
//! map empty, only when all of these hold:
//!
//! - the request asked for it: it came through the client loop's fast path
//!   (`ClientBody::Buffered`), whose writer is the only one that reads
//!   [`RawHeaders`] (hyper's HTTP/1.1 and HTTP/2 servers get a map, as
//!   before);
//! - the response has a body to frame: not an answer to `HEAD`, not 1xx,
//!   204 or 304 (whose `Content-Length` the client must see as sent);
//! - no header is hop-by-hop but `Connection` naming only `close` or
//!   `keep-alive`, and `Transfer-Encoding`; and not both `Transfer-Encoding`
//!   and `Content-Length` (those heads keep the map path and its rules).
//!
//! The kept lines leave out `Connection`, `Content-Length` and
//! `Transfer-Encoding`: the exchange has read them already (framing,
//! reuse), and the writer frames the body itself from its exact length
//! (`content-length`) or as chunks, which is what the map path wrote for
//! the same response. What httparse accepted, `http` would have: a name of
//! token characters, a value of tab, visible ASCII, space and obs-text
//! (a test checks a DEL is refused by both).
//!
//! The writer writes the kept lines in their order, as `name: value`
//! (the name as the instance spelled it: HTTP/1.1 names are
//! case-insensitive), leaving out a line whose name the map has: what the
//! proxy put in the map replaces the instance's, as `HeaderMap::insert`
//! did. Then the request id (`X-Request-Id`, which replaces the instance's
//! lines of that name), then the map's own entries.
//!
//! The request id rides with the lines ([`RawHeaders::set_request_id`])
//! and the kept head's map stays empty, not taken from the spares: putting
//! the id in a map (hash, probe, place), walking the map for each line and
//! clearing it after cost ~450 instructions a request (callgrind), for
//! the same bytes on the wire.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

use super::body::Watched;
use super::client_limits::StallTimeout;
use super::h1_exchange::HeaderSpans;
use super::headers::{name_is, write_header, write_line};
use super::http::ResponseBody;
use super::pool::PooledBody;
use super::request_id::X_REQUEST_ID;

/// A response head's header lines, kept as the instance sent them (module
/// doc). Travels with the upstream connection, handed out by the
/// response's body ([`KeptHead`]).
#[derive(Clone)]
pub(crate) struct RawHeaders {
    /// The whole head, split off the connection's read buffer.
    head: Bytes,
    /// Each kept header's name and value within `head`.
    spans: HeaderSpans,
    /// The proxy's `X-Request-Id`, written after the lines instead of the
    /// instance's.
    request_id: Option<HeaderValue>,
}

impl std::fmt::Debug for RawHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.lines()).finish()
    }
}

impl RawHeaders {
    pub(crate) fn new(head: Bytes, spans: HeaderSpans) -> Self {
        Self {
            head,
            spans,
            request_id: None,
        }
    }

    /// Sends `id` as the response's `X-Request-Id`, in place of the
    /// instance's.
    pub(crate) fn set_request_id(&mut self, id: HeaderValue) {
        self.request_id = Some(id);
    }

    /// Each kept header, name and value, in the head's order.
    pub(crate) fn lines(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.spans
            .iter()
            .filter_map(|(ns, ne, vs, ve)| Some((self.head.get(ns..ne)?, self.head.get(vs..ve)?)))
    }

    /// Appends the kept lines but those whose name `map` has, then the
    /// request id (module doc), to `out`; whether one of the lines is
    /// `Date`.
    pub(crate) fn encode(&self, map: &HeaderMap, out: &mut Vec<u8>) -> bool {
        let mut has_date = false;
        for (name, value) in self.lines() {
            if self.request_id.is_some() && name_is(name, X_REQUEST_ID.as_str()) {
                continue;
            }
            if !map.is_empty()
                && map
                    .keys()
                    .any(|k| k.as_str().as_bytes().eq_ignore_ascii_case(name))
            {
                continue;
            }
            has_date |= name.eq_ignore_ascii_case(b"date");
            write_header(out, name, value);
        }
        if let Some(id) = &self.request_id {
            write_line(out, b"x-request-id: ", id.as_bytes());
        }
        has_date
    }

    /// Appends the kept lines but those whose name `map` has to `map`, for
    /// a writer that needs a map (the access log's boxed body hides the
    /// lines from `h1_server`'s writer). A line `http` refused would be
    /// left out; the parse refuses whatever `http` does (module doc).
    pub(crate) fn into_map(mut self, map: &mut HeaderMap) {
        if let Some(id) = self.request_id.take() {
            map.insert(X_REQUEST_ID, id);
        }
        let had: Vec<HeaderName> = map.keys().cloned().collect();
        for (name, value) in self.lines() {
            let Ok(name) = HeaderName::from_bytes(name) else {
                continue;
            };
            if had.contains(&name) {
                continue;
            }
            if let Ok(value) = HeaderValue::from_maybe_shared(self.head.slice_ref(value)) {
                map.append(name, value);
            }
        }
    }

    /// The kept lines as a header map.
    #[cfg(test)]
    pub(crate) fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        self.clone().into_map(&mut map);
        map
    }
}

/// A response body that may carry its head's kept lines: each body between
/// the upstream exchange and `h1_server`'s writer passes them on.
pub(crate) trait KeptHead {
    /// The kept lines, if the head was kept so (taken once).
    fn take_kept_head(&mut self) -> Option<RawHeaders>;

    /// The kept lines, left in place.
    fn kept_head_mut(&mut self) -> Option<&mut RawHeaders>;
}

impl KeptHead for PooledBody {
    fn take_kept_head(&mut self) -> Option<RawHeaders> {
        PooledBody::take_kept_head(self)
    }

    fn kept_head_mut(&mut self) -> Option<&mut RawHeaders> {
        PooledBody::kept_head_mut(self)
    }
}

impl<B: KeptHead> KeptHead for StallTimeout<B> {
    fn take_kept_head(&mut self) -> Option<RawHeaders> {
        self.inner_mut().take_kept_head()
    }

    fn kept_head_mut(&mut self) -> Option<&mut RawHeaders> {
        self.inner_mut().kept_head_mut()
    }
}

impl<B: KeptHead + hyper::body::Body, W: super::body::Watch> KeptHead for Watched<B, W> {
    fn take_kept_head(&mut self) -> Option<RawHeaders> {
        self.inner_mut().take_kept_head()
    }

    fn kept_head_mut(&mut self) -> Option<&mut RawHeaders> {
        self.inner_mut().kept_head_mut()
    }
}

impl KeptHead for ResponseBody {
    fn take_kept_head(&mut self) -> Option<RawHeaders> {
        match self {
            ResponseBody::Answer(b) => b.take_kept_head(),
            ResponseBody::Other(_) => None,
        }
    }

    fn kept_head_mut(&mut self) -> Option<&mut RawHeaders> {
        match self {
            ResponseBody::Answer(b) => b.kept_head_mut(),
            ResponseBody::Other(_) => None,
        }
    }
}

/// A boxed body hides what it wraps (h1_server's tests answer with one).
#[cfg(test)]
impl KeptHead for super::http::ProxyBody {
    fn take_kept_head(&mut self) -> Option<RawHeaders> {
        None
    }

    fn kept_head_mut(&mut self) -> Option<&mut RawHeaders> {
        None
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use http::header::{self, HeaderValue};

    use super::*;
    use crate::proxy::h1_exchange::take_head;

    /// `head` parsed as an answer that may be kept as lines.
    fn parse(head: &[u8], head_request: bool) -> (http::response::Parts, Option<RawHeaders>) {
        let mut buf = BytesMut::from(head);
        let mut kept = None;
        let head = take_head(&mut buf, head_request, Some(&mut kept))
            .unwrap()
            .unwrap();
        (head.parts, kept)
    }

    fn lines(raw: &RawHeaders) -> Vec<(String, String)> {
        raw.lines()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn a_plain_answer_keeps_its_lines_but_the_framing_ones_and_no_map() {
        let (parts, raw) = parse(
            b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: d\r\nContent-Type: text/plain\r\n\
              Content-Length: 2\r\nConnection: keep-alive\r\nX-A: 1\r\nx-a: 2\r\n\r\nok",
            false,
        );
        assert!(parts.headers.is_empty());
        let raw = raw.expect("kept as lines");
        assert_eq!(
            lines(&raw),
            [
                ("Server", "nginx"),
                ("Date", "d"),
                ("Content-Type", "text/plain"),
                ("X-A", "1"),
                ("x-a", "2"),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
        );
        // The same headers the map path gives, but the framing ones.
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: d\r\nContent-Type: text/plain\r\n\
              Content-Length: 2\r\nConnection: keep-alive\r\nX-A: 1\r\nx-a: 2\r\n\r\nok"[..],
        );
        let mut map = take_head(&mut buf, false, None)
            .unwrap()
            .unwrap()
            .parts
            .headers;
        map.remove(header::CONTENT_LENGTH);
        assert_eq!(raw.to_map(), map);

        let (parts, raw) = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nx-b: 3\r\n\r\n",
            false,
        );
        assert!(parts.headers.is_empty());
        assert_eq!(lines(&raw.unwrap()), [("x-b".to_owned(), "3".to_owned())]);
    }

    #[test]
    fn heads_the_rule_leaves_out_get_a_map_as_before() {
        for (head, head_request, why) in [
            (&b"HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n"[..], true, "HEAD"),
            (b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n", false, "204"),
            (b"HTTP/1.1 304 Not Modified\r\nx-a: 1\r\n\r\n", false, "304"),
            (
                b"HTTP/1.1 200 OK\r\nconnection: x-secret\r\nx-secret: 1\r\ncontent-length: 0\r\n\r\n",
                false,
                "Connection naming a header",
            ),
            (
                b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\ncontent-length: 0\r\n\r\n",
                false,
                "another hop-by-hop header",
            ),
            (
                b"HTTP/1.1 200 OK\r\nupgrade: h2c\r\ncontent-length: 0\r\n\r\n",
                false,
                "Upgrade",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
                false,
                "both framings",
            ),
        ] {
            let (parts, raw) = parse(head, head_request);
            assert!(raw.is_none(), "{why}");
            assert!(!parts.headers.is_empty(), "{why}: the map path");
        }
        // Not asked for: a map.
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 0\r\n\r\n"[..]);
        let head = take_head(&mut buf, false, None).unwrap().unwrap();
        assert_eq!(head.parts.headers["x-a"], "1");
    }

    #[test]
    fn the_lines_are_written_but_those_the_map_replaces() {
        let (mut parts, raw) = parse(
            b"HTTP/1.1 200 OK\r\nX-Request-Id: theirs\r\nServer: s\r\nDATE: d\r\n\
              content-length: 0\r\n\r\n",
            false,
        );
        parts
            .headers
            .insert("x-request-id", HeaderValue::from_static("ours"));
        let mut out = Vec::new();
        let has_date = raw.unwrap().encode(&parts.headers, &mut out);
        assert!(has_date);
        assert_eq!(out, b"Server: s\r\nDATE: d\r\n");
        let (_, raw) = parse(
            b"HTTP/1.1 200 OK\r\nServer: s\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        let mut out = Vec::new();
        assert!(!raw.unwrap().encode(&HeaderMap::new(), &mut out));
        assert_eq!(out, b"Server: s\r\n");
    }

    #[test]
    fn the_request_id_replaces_the_instances_after_the_lines_in_the_map_too() {
        let head = b"HTTP/1.1 200 OK\r\nx-request-id: theirs\r\nServer: s\r\n\
                     X-REQUEST-ID: again\r\ncontent-length: 0\r\n\r\n";
        let (parts, raw) = parse(head, false);
        assert!(parts.headers.is_empty() && parts.headers.capacity() == 0);
        let mut raw = raw.unwrap();
        raw.set_request_id(HeaderValue::from_static("ours"));
        let mut out = Vec::new();
        assert!(!raw.encode(&parts.headers, &mut out));
        assert_eq!(out, b"Server: s\r\nx-request-id: ours\r\n");
        // The access log's path: the same headers, as a map.
        let map = raw.to_map();
        assert_eq!(map.len(), 2);
        assert_eq!(map["x-request-id"], "ours");
        assert_eq!(map["server"], "s");
        // Without an id the instance's lines stay.
        let (_, raw) = parse(head, false);
        let mut out = Vec::new();
        raw.unwrap().encode(&HeaderMap::new(), &mut out);
        assert_eq!(
            out,
            b"x-request-id: theirs\r\nServer: s\r\nX-REQUEST-ID: again\r\n"
        );
    }

    #[test]
    fn what_http_refuses_in_a_head_the_parse_refuses_too() {
        // The lines skip `http`'s checks: httparse's must be as strict.
        for bad in [
            &b"HTTP/1.1 200 OK\r\nx: a\x7fb\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nx: a\x00b\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx: a\x1bb\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx\x01: 1\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx(y): 1\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx y: 1\r\ncontent-length: 0\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(
                take_head(&mut buf, false, Some(&mut None)).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(HeaderValue::from_bytes(b"a\x7fb").is_err());
        // Tab, obs-text: both accept.
        let (_, raw) = parse(
            b"HTTP/1.1 200 OK\r\nx: a\tb\xffc\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        assert!(HeaderValue::from_bytes(b"a\tb\xffc").is_ok());
        assert_eq!(raw.unwrap().lines().next().unwrap().1, b"a\tb\xffc");
    }
}
