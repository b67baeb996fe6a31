//! Request and response headers: the hop-by-hop headers that never cross
//! the proxy, and the forwarding headers it adds.
//!
//! ## Forwarding headers ([`set_forwarding`])
//!
//! Every request forwarded gets `X-Forwarded-For` (the client's IP),
//! `X-Forwarded-Proto` (the scheme the client spoke to the listener: `http`
//! until TLS listeners exist) and `X-Forwarded-Host` (the client's `Host`,
//! or the HTTP/2 `:authority`); with the listener's `forwarded_header =
//! true`, also RFC 7239 `Forwarded: for=…;proto=…;host="…"` (an IPv6 `for`
//! is quoted and bracketed, `host` is always quoted).
//!
//! Whose incoming forwarding headers count is the listener's
//! `trusted_proxies` (CIDRs; none by default):
//! - from a **trusted** peer (a proxy in front of this one), the client
//!   address is appended to the `X-Forwarded-For` and `Forwarded` lists it
//!   sent, and the `X-Forwarded-Proto` / `X-Forwarded-Host` it sent are kept
//!   (it saw the client; this node only saw the proxy);
//! - from **anyone else**, every incoming `X-Forwarded-For`,
//!   `X-Forwarded-Proto`, `X-Forwarded-Host` and `Forwarded` is removed and
//!   replaced by what this node saw: otherwise any client could forge its
//!   address for the backend.
//!
//! `trusted_proxies` is per listener because listeners face different
//! networks: an internal listener behind a CDN trusts the CDN, a public one
//! trusts nobody. The functions are pure over the header map and the
//! listener's facts, so the HTTP path and the WebSocket upgrade share them.
//!
//! ## Where they are set ([`ProxyHeaders`])
//!
//! What the four headers (and `X-Request-Id`) must be is worked out once
//! per request, from its headers after the hop-by-hop strip. An HTTP/1.1
//! attempt writes them as it encodes the head, after the client's other
//! headers, skipping the client's lines they replace; an HTTP/2 attempt
//! and an upgrade set them in the map (what [`set_forwarding`] does). The
//! instance gets the same lines either way; on HTTP/1.1 ours come last
//! instead of where a client's replaced line stood. Inserting four custom
//! names into every request's map hashed each name and grew the map:
//! ~1,000 of the proxy's ~24,500 instructions per request (issue 12,
//! `docs/benchmarks.md`).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;

use super::request_id::X_REQUEST_ID;
use crate::config::cidr::{canonical, Cidr};

/// Names, not strings: removing by a `&str` parses the name again on
/// every call, twice per proxied request. A `static`: a `const` array is
/// built anew (and dropped) at every use.
static HOP_BY_HOP: [HeaderName; HOP_BY_HOP_LEN] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const HOP_BY_HOP_LEN: usize = 8;
const TE_INDEX: usize = 5;

/// The lengths of [`HOP_BY_HOP`]'s names, one bit each: most names are
/// ruled out by their length alone, before the eight comparisons (a test
/// checks it against the list).
const HOP_BY_HOP_LENGTHS: u64 = 1 << 2 | 1 << 7 | 1 << 10 | 1 << 16 | 1 << 17 | 1 << 18 | 1 << 19;

/// Whether `name` is one of [`HOP_BY_HOP`], and which.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    let len = name.as_str().len();
    if len >= 64 || HOP_BY_HOP_LENGTHS & (1 << len) == 0 {
        return None;
    }
    HOP_BY_HOP.iter().position(|h| h == name)
}

/// Whether the header name `name`, as httparse parsed it (any case), is
/// one of [`HOP_BY_HOP`].
pub(crate) fn is_hop_by_hop_name(name: &str) -> bool {
    let len = name.len();
    len < 64
        && HOP_BY_HOP_LENGTHS & (1 << len) != 0
        && HOP_BY_HOP
            .iter()
            .any(|h| name_is(name.as_bytes(), h.as_str()))
}

/// Whether the header name `name`, as httparse parsed it, is `lower` (a
/// lowercase name of letters, digits and `-`), in any case. Eight bytes at
/// a time: setting bit 5 of each byte lowercases an ASCII letter and
/// leaves a digit or `-` as it is, and the only other byte it maps onto
/// one of those is CR (onto `-`), which httparse lets into no name. A
/// byte-by-byte `eq_ignore_ascii_case` per name and head was ~1,000
/// instructions a request (callgrind).
pub(crate) fn name_is(name: &[u8], lower: &str) -> bool {
    let lower = lower.as_bytes();
    if name.len() != lower.len() {
        return false;
    }
    let word = |b: &[u8]| {
        let mut w = [0u8; 8];
        w[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(w)
    };
    let mut names = name.chunks(8);
    let mut lowers = lower.chunks(8);
    loop {
        match (names.next(), lowers.next()) {
            (Some(n), Some(l)) => {
                if word(n) | 0x2020_2020_2020_2020 != word(l) | 0x2020_2020_2020_2020 {
                    return false;
                }
            }
            _ => return true,
        }
    }
}

/// Removes the hop-by-hop headers: those of [`HOP_BY_HOP`] and those named
/// in `Connection` (a `TE: trailers` stays). One pass over the names first:
/// most requests carry none of them (and most responses only
/// `Connection`), and a comparison with a standard name is one integer,
/// where each `remove` hashes and probes.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = [false; HOP_BY_HOP_LEN];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present[i] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    // Only `Connection` can name others.
    if present[0] {
        remove_connection_named(headers);
    }
    let keep_te_trailers = present[TE_INDEX]
        && headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for (h, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(h);
    }
    if keep_te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Removes the headers that `Connection` names (but the hop-by-hop ones,
/// removed anyway).
fn remove_connection_named(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too. `close` and
    // `keep-alive` (the usual values) name no other header: no list then.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.eq_ignore_ascii_case("close") && !n.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for n in named {
        if !HOP_BY_HOP.contains(&n) {
            headers.remove(n);
        }
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// A listener's forwarding rules, resolved once per config.
#[derive(Debug, Clone, Default)]
pub(crate) struct Forwarding {
    /// Peers whose forwarding headers are kept and appended to.
    pub(crate) trusted_proxies: Vec<Cidr>,
    /// Also set RFC 7239 `Forwarded`.
    pub(crate) forwarded_header: bool,
}

impl Forwarding {
    /// Whether `peer` is a trusted proxy.
    pub(crate) fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(peer))
    }
}

/// A client connection's peer, with its address as `X-Forwarded-For`
/// writes it: formatted once per connection, so each request's value is a
/// shared copy (no allocation, no formatting per request).
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    /// The socket address the connection came from.
    pub(crate) addr: SocketAddr,
    /// Its IP, IPv4-mapped IPv6 as IPv4.
    ip: IpAddr,
    /// `ip` as a header value.
    ip_value: Option<HeaderValue>,
}

impl Peer {
    /// The peer at `addr`.
    pub(crate) fn new(addr: SocketAddr) -> Self {
        let ip = canonical(addr.ip());
        Self {
            addr,
            ip,
            ip_value: ip_value(ip),
        }
    }
}

/// Sets the forwarding headers of a request from `peer` that spoke
/// `scheme` (see the module doc). `authority` is the request URI's (HTTP/2
/// `:authority`, absolute form), used when there is no `Host` header.
/// Run after [`strip_hop_by_hop`], so a client cannot name these headers in
/// `Connection` to have them dropped.
pub(crate) fn set_forwarding(
    headers: &mut HeaderMap,
    peer: SocketAddr,
    scheme: &'static str,
    authority: Option<&Authority>,
    rules: &Forwarding,
) {
    set_forwarding_from(headers, &Peer::new(peer), scheme, authority, rules);
}

/// [`set_forwarding`] for a [`Peer`] made once per connection.
pub(crate) fn set_forwarding_from(
    headers: &mut HeaderMap,
    peer: &Peer,
    scheme: &'static str,
    authority: Option<&Authority>,
    rules: &Forwarding,
) {
    ProxyHeaders::new(headers, peer, scheme, authority, rules, None).set_in(headers);
}

/// What one forwarding header of the request the instance gets is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    /// The client's lines, as they are (a trusted proxy's).
    Keep,
    /// Ours instead of every line of the client's; `None`: no line.
    Set(Option<HeaderValue>),
}

/// The headers the proxy sets on one request ([`set_forwarding`]'s, and
/// `X-Request-Id` when given), worked out once from the request's headers
/// as they are after [`strip_hop_by_hop`]: either [applied](Self::apply) to
/// the map (HTTP/2 upstream, upgrades, [`set_forwarding`]), or, for an
/// HTTP/1.1 upstream, written by the head's encoder, which skips the
/// client's lines [replaced](Self::replaces) and [writes](Self::write_to)
/// ours after the others (module doc). The same value encodes every
/// attempt of the request the same way.
/// Kept small, borrowing what it can: it lives in every request's future,
/// which HTTP/2 moves a few times.
#[derive(Debug, Clone)]
pub(crate) struct ProxyHeaders<'a> {
    trusted: bool,
    /// `X-Forwarded-For`: always ours (a trusted proxy's list with the
    /// client appended).
    xff: Option<HeaderValue>,
    /// `X-Forwarded-Proto`: the scheme, or `None` to keep the client's.
    xfp: Option<&'static str>,
    xfh: Line,
    forwarded: Line,
    request_id: Option<&'a HeaderValue>,
    /// One bit per length of a name whose client lines are dropped: most
    /// names are ruled out by their length alone.
    replaced_lengths: u32,
}

impl<'a> ProxyHeaders<'a> {
    /// The headers for a request with `headers` from `peer` that spoke
    /// `scheme` (see the module doc and [`set_forwarding`]), and
    /// `request_id` as its `X-Request-Id`.
    pub(crate) fn new(
        headers: &HeaderMap,
        peer: &Peer,
        scheme: &'static str,
        authority: Option<&Authority>,
        rules: &Forwarding,
        request_id: Option<&'a HeaderValue>,
    ) -> Self {
        let ip = peer.ip;
        let trusted = rules.trusts(ip);
        let host = headers
            .get(header::HOST)
            .cloned()
            .or_else(|| authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        let xff = if trusted {
            let mut xff = joined(headers, &X_FORWARDED_FOR);
            if !xff.is_empty() {
                xff.push_str(", ");
            }
            let _ = write!(xff, "{ip}");
            // Only kept text went in, so this cannot fail; never forward
            // a stale value if it does.
            HeaderValue::from_str(&xff).ok()
        } else {
            peer.ip_value.clone()
        };
        let xfp = if trusted && headers.contains_key(&X_FORWARDED_PROTO) {
            None
        } else {
            Some(scheme)
        };
        let xfh = if trusted && headers.contains_key(&X_FORWARDED_HOST) {
            Line::Keep
        } else {
            Line::Set(host.clone())
        };
        let forwarded = if rules.forwarded_header {
            let mut fwd = if trusted {
                joined(headers, &header::FORWARDED)
            } else {
                String::new()
            };
            if !fwd.is_empty() {
                fwd.push_str(", ");
            }
            forwarded_element(&mut fwd, ip, scheme, host.as_ref());
            Line::Set(HeaderValue::from_str(&fwd).ok())
        } else if trusted {
            Line::Keep
        } else {
            Line::Set(None)
        };
        let mut replaced_lengths = 1 << X_FORWARDED_FOR.as_str().len();
        if xfp.is_some() {
            replaced_lengths |= 1 << X_FORWARDED_PROTO.as_str().len();
        }
        for (line, name) in [(&xfh, &X_FORWARDED_HOST), (&forwarded, &header::FORWARDED)] {
            if *line != Line::Keep {
                replaced_lengths |= 1 << name.as_str().len();
            }
        }
        if request_id.is_some() {
            replaced_lengths |= 1 << X_REQUEST_ID.as_str().len();
        }
        Self {
            trusted,
            xff,
            xfp,
            xfh,
            forwarded,
            request_id,
            replaced_lengths,
        }
    }

    /// Sets them in `headers`, the map they were worked out from (as
    /// [`set_forwarding`] always did, then `X-Request-Id`), keeping them for
    /// more. Applying them again changes nothing.
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        self.clone().set_in(headers);
    }

    /// [`apply`](Self::apply), the values moved into the map.
    pub(crate) fn set_in(self, headers: &mut HeaderMap) {
        set(headers, X_FORWARDED_FOR, Line::Set(self.xff));
        if let Some(scheme) = self.xfp {
            headers.insert(X_FORWARDED_PROTO, scheme_value(scheme));
        }
        set(headers, X_FORWARDED_HOST, self.xfh);
        if !self.trusted {
            headers.remove(header::FORWARDED);
        }
        if let Line::Set(Some(v)) = self.forwarded {
            headers.insert(header::FORWARDED, v);
        }
        if let Some(id) = self.request_id {
            headers.insert(X_REQUEST_ID, id.clone());
        }
    }

    /// Whether the client's lines named `name` (lowercase, as a map's
    /// names are) are dropped for ours.
    pub(crate) fn replaces(&self, name: &str) -> bool {
        let len = name.len();
        if len >= 32 || self.replaced_lengths & (1 << len) == 0 {
            return false;
        }
        let line = match name {
            "x-forwarded-for" => return true,
            "x-request-id" => return self.request_id.is_some(),
            "x-forwarded-proto" => return self.xfp.is_some(),
            "x-forwarded-host" => &self.xfh,
            "forwarded" => &self.forwarded,
            _ => return false,
        };
        *line != Line::Keep
    }

    /// Appends our lines, `name: value\r\n` each, in the order
    /// [`apply`](Self::apply) adds them to a map without them.
    pub(crate) fn write_to(&self, out: &mut Vec<u8>) {
        // One call per name, each a literal: its copy is a fixed-size move.
        if let Some(v) = &self.xff {
            write_line(out, b"x-forwarded-for: ", v.as_bytes());
        }
        if let Some(scheme) = self.xfp {
            write_line(out, b"x-forwarded-proto: ", scheme.as_bytes());
        }
        if let Some(v) = self.xfh.ours() {
            write_line(out, b"x-forwarded-host: ", v.as_bytes());
        }
        if let Some(v) = self.forwarded.ours() {
            write_line(out, b"forwarded: ", v.as_bytes());
        }
        if let Some(v) = self.request_id {
            write_line(out, b"x-request-id: ", v.as_bytes());
        }
    }
}

impl Line {
    /// The line we send, if any.
    fn ours(&self) -> Option<&HeaderValue> {
        match self {
            Line::Set(v) => v.as_ref(),
            Line::Keep => None,
        }
    }
}

/// Appends `name` (with its `": "`), `value` and CRLF, growing `out` at
/// most once. Always inlined: a literal `name`'s copy is then a fixed-size
/// move, not a call to `memcpy`.
#[inline(always)]
pub(crate) fn write_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 2);
    out.extend_from_slice(name);
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `name: value\r\n` for a name known only at run time, growing
/// `out` at most once (a literal name goes through [`write_line`]).
#[inline]
pub(crate) fn write_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `scheme` as a header value: the two schemes without checking their
/// bytes again per request.
fn scheme_value(scheme: &'static str) -> HeaderValue {
    const HTTP: HeaderValue = HeaderValue::from_static("http");
    const HTTPS: HeaderValue = HeaderValue::from_static("https");
    match scheme {
        "http" => HTTP,
        "https" => HTTPS,
        other => HeaderValue::from_static(other),
    }
}

/// Sets `name` as `line` says, replacing every earlier line of it.
fn set(headers: &mut HeaderMap, name: HeaderName, line: Line) {
    match line {
        Line::Keep => {}
        Line::Set(Some(v)) => {
            headers.insert(name, v);
        }
        Line::Set(None) => {
            headers.remove(name);
        }
    }
}

/// `ip` as a header value, formatted in place: one allocation per
/// connection ([`Peer`]), shared by the value's clones (one per request,
/// and per attempt that may be retried).
fn ip_value(ip: IpAddr) -> Option<HeaderValue> {
    let mut text = IpText {
        buf: [0; IpText::CAP],
        len: 0,
    };
    let mut rest = &mut text.buf[..];
    std::io::Write::write_fmt(&mut rest, format_args!("{ip}")).ok()?;
    text.len = IpText::CAP - rest.len();
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text)).ok()
}

/// An IP address's text, inline.
struct IpText {
    buf: [u8; IpText::CAP],
    len: usize,
}

impl IpText {
    /// The longest IPv6 text is 45 bytes.
    const CAP: usize = 48;
}

impl AsRef<[u8]> for IpText {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Every value of `name`, joined as one list (a header may come on several
/// lines); values that are not text are skipped.
fn joined(headers: &HeaderMap, name: &HeaderName) -> String {
    let mut out = String::new();
    for v in headers.get_all(name) {
        let Ok(v) = v.to_str() else { continue };
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(v);
    }
    out
}

/// One RFC 7239 element: `for=192.0.2.1;proto=http;host="example.com"`.
fn forwarded_element(out: &mut String, ip: IpAddr, scheme: &str, host: Option<&HeaderValue>) {
    let _ = match ip {
        IpAddr::V4(v4) => write!(out, "for={v4}"),
        IpAddr::V6(v6) => write!(out, "for=\"[{v6}]\""),
    };
    let _ = write!(out, ";proto={scheme}");
    if let Some(h) = host.and_then(|h| h.to_str().ok()) {
        out.push_str(";host=\"");
        for c in h.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_is_agrees_with_eq_ignore_ascii_case_on_token_names() {
        // Every token byte (what httparse lets into a name) in every place
        // of every name it is asked about, in both cases.
        let tchar: Vec<u8> = (0u8..=255)
            .filter(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
            .collect();
        let mut names: Vec<&str> = HOP_BY_HOP.iter().map(|h| h.as_str()).collect();
        names.extend(["content-length", "expect", "x-request-id", "a", "abcdefgh"]);
        for lower in names {
            let upper = lower.to_ascii_uppercase();
            assert!(name_is(upper.as_bytes(), lower), "{upper}");
            for at in 0..lower.len() {
                for &b in &tchar {
                    let mut name = lower.as_bytes().to_vec();
                    name[at] = b;
                    assert_eq!(
                        name_is(&name, lower),
                        name.eq_ignore_ascii_case(lower.as_bytes()),
                        "{:?} against {lower}",
                        String::from_utf8_lossy(&name)
                    );
                }
            }
            assert!(!name_is(&lower.as_bytes()[1..], lower));
            assert!(!name_is(format!("{lower}x").as_bytes(), lower));
        }
    }

    #[test]
    fn the_hop_by_hop_lengths_and_te_index_match_the_list() {
        let mask = HOP_BY_HOP
            .iter()
            .fold(0u64, |m, h| m | 1 << h.as_str().len());
        assert_eq!(mask, HOP_BY_HOP_LENGTHS);
        assert_eq!(HOP_BY_HOP[TE_INDEX], header::TE);
        for (i, h) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(h), Some(i));
        }
        assert_eq!(
            hop_by_hop_index(&header::USER_AGENT),
            None,
            "a length of the list"
        );
        assert_eq!(hop_by_hop_index(&header::HOST), None);
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn all(h: &HeaderMap, name: &str) -> Vec<String> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    fn rules(trusted: &[&str], forwarded_header: bool) -> Forwarding {
        Forwarding {
            trusted_proxies: trusted.iter().map(|c| c.parse().unwrap()).collect(),
            forwarded_header,
        }
    }

    fn forged() -> HeaderMap {
        map(&[
            ("host", "shop.example"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=1.2.3.4;proto=https"),
        ])
    }

    #[test]
    fn an_untrusted_peer_has_every_forwarding_header_replaced() {
        for forwarded_header in [false, true] {
            let mut h = forged();
            let peer: SocketAddr = "203.0.113.7:5555".parse().unwrap();
            set_forwarding(
                &mut h,
                peer,
                "http",
                None,
                &rules(&["10.0.0.0/8"], forwarded_header),
            );
            assert_eq!(all(&h, "x-forwarded-for"), ["203.0.113.7"]);
            assert_eq!(all(&h, "x-forwarded-proto"), ["http"]);
            assert_eq!(all(&h, "x-forwarded-host"), ["shop.example"]);
            let want: &[&str] = if forwarded_header {
                &["for=203.0.113.7;proto=http;host=\"shop.example\""]
            } else {
                &[]
            };
            assert_eq!(all(&h, "forwarded"), want);
        }
    }

    #[test]
    fn a_trusted_peer_has_the_client_appended_and_its_proto_and_host_kept() {
        let mut h = forged();
        let peer: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        set_forwarding(&mut h, peer, "http", None, &rules(&["10.0.0.0/8"], true));
        assert_eq!(all(&h, "x-forwarded-for"), ["1.2.3.4, 5.6.7.8, 10.1.2.3"]);
        assert_eq!(all(&h, "x-forwarded-proto"), ["https"]);
        assert_eq!(all(&h, "x-forwarded-host"), ["evil.example"]);
        assert_eq!(
            all(&h, "forwarded"),
            ["for=1.2.3.4;proto=https, for=10.1.2.3;proto=http;host=\"shop.example\""]
        );
    }

    #[test]
    fn a_trusted_peer_without_headers_gets_them_set() {
        let mut h = map(&[("host", "shop.example:8080")]);
        let peer: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        set_forwarding(&mut h, peer, "http", None, &rules(&["10.0.0.0/8"], false));
        assert_eq!(all(&h, "x-forwarded-for"), ["10.1.2.3"]);
        assert_eq!(all(&h, "x-forwarded-proto"), ["http"]);
        assert_eq!(all(&h, "x-forwarded-host"), ["shop.example:8080"]);
        // The switch is off: a trusted proxy's Forwarded would pass as it
        // is, but none is made up.
        assert!(h.get("forwarded").is_none());
    }

    #[test]
    fn ipv6_peers_are_plain_in_xff_and_quoted_bracketed_in_forwarded() {
        let mut h = map(&[("x-forwarded-for", "2001:db8::9")]);
        let peer: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let authority: Authority = "[::1]:8080".parse().unwrap();
        set_forwarding(
            &mut h,
            peer,
            "http",
            Some(&authority),
            &rules(&["2001:db8::/32"], true),
        );
        assert_eq!(all(&h, "x-forwarded-for"), ["2001:db8::9, 2001:db8::1"]);
        assert_eq!(all(&h, "x-forwarded-host"), ["[::1]:8080"]);
        assert_eq!(
            all(&h, "forwarded"),
            ["for=\"[2001:db8::1]\";proto=http;host=\"[::1]:8080\""]
        );
    }

    #[test]
    fn an_ipv4_mapped_peer_is_its_ipv4_address() {
        let mut h = map(&[("x-forwarded-for", "1.2.3.4")]);
        let peer: SocketAddr = "[::ffff:10.0.0.5]:80".parse().unwrap();
        set_forwarding(&mut h, peer, "http", None, &rules(&["10.0.0.0/8"], false));
        assert_eq!(all(&h, "x-forwarded-for"), ["1.2.3.4, 10.0.0.5"]);
    }

    #[test]
    fn with_no_host_no_forwarded_host_is_kept() {
        let mut h = map(&[("x-forwarded-host", "evil.example")]);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        set_forwarding(&mut h, peer, "http", None, &Forwarding::default());
        assert!(h.get("x-forwarded-host").is_none());
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut h = map(&[
            ("host", "shop.example"),
            ("connection", "keep-alive, x-secret, te"),
            ("connection", "upgrade"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authorization", "Basic eA=="),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
            ("x-kept", "2"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<(String, String)> = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        left.sort();
        // `TE: trailers` is end to end (gRPC needs it), even when named.
        let want = [
            ("host", "shop.example"),
            ("te", "trailers"),
            ("x-kept", "2"),
        ];
        assert_eq!(left, want.map(|(k, v)| (k.to_owned(), v.to_owned())));

        let mut h = map(&[("te", "gzip"), ("x-kept", "2")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "a TE other than trailers goes");
        let clean = map(&[("host", "a"), ("accept", "*/*"), ("x-kept", "2")]);
        let mut h = clean.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, clean);
    }

    #[test]
    fn a_peer_made_once_sets_the_same_headers_as_its_address() {
        for (addr, trusted) in [
            ("203.0.113.7:5555", false),
            ("[::ffff:10.0.0.5]:80", true),
            ("[2001:db8::1]:443", false),
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let peer = Peer::new(addr);
            let r = rules(if trusted { &["10.0.0.0/8"] } else { &[] }, true);
            for _ in 0..2 {
                let (mut a, mut b) = (forged(), forged());
                set_forwarding(&mut a, addr, "http", None, &r);
                set_forwarding_from(&mut b, &peer, "http", None, &r);
                assert_eq!(a, b, "{addr}");
            }
        }
    }

    #[test]
    fn quotes_in_the_host_are_escaped_in_forwarded() {
        let mut out = String::new();
        let host = HeaderValue::from_static("a\"b\\c");
        forwarded_element(&mut out, "192.0.2.1".parse().unwrap(), "http", Some(&host));
        assert_eq!(out, r#"for=192.0.2.1;proto=http;host="a\"b\\c""#);
    }
}
