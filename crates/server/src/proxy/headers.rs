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

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;

use crate::config::cidr::{canonical, Cidr};

/// Names, not strings: removing by a `&str` parses the name again on
/// every call, twice per proxied request.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let keep_te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
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
        headers.remove(n);
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    if keep_te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
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
    let ip = canonical(peer.ip());
    let trusted = rules.trusts(ip);
    let host = headers
        .get(header::HOST)
        .cloned()
        .or_else(|| authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()));

    if trusted {
        let mut xff = joined(headers, &X_FORWARDED_FOR);
        if !xff.is_empty() {
            xff.push_str(", ");
        }
        let _ = write!(xff, "{ip}");
        insert(headers, X_FORWARDED_FOR, &xff);
    } else {
        match ip_value(ip) {
            Some(v) => headers.insert(X_FORWARDED_FOR, v),
            None => headers.remove(X_FORWARDED_FOR),
        };
    }

    if !trusted || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    }
    if !trusted || !headers.contains_key(&X_FORWARDED_HOST) {
        match &host {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST, h.clone());
            }
            None => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
    }

    if !trusted {
        headers.remove(header::FORWARDED);
    }
    if rules.forwarded_header {
        let mut fwd = if trusted {
            joined(headers, &header::FORWARDED)
        } else {
            String::new()
        };
        if !fwd.is_empty() {
            fwd.push_str(", ");
        }
        forwarded_element(&mut fwd, ip, scheme, host.as_ref());
        insert(headers, header::FORWARDED, &fwd);
    }
}

/// Every value of `name`, joined as one list (a header may come on several
/// lines); values that are not text are skipped.
/// `ip` as a header value, formatted in place: one allocation (the common,
/// untrusted case of every request), shared by the value's clones (one per
/// attempt that may be retried).
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

/// Sets `name` to `value`, replacing every earlier line of it.
fn insert(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    match HeaderValue::from_str(value) {
        Ok(v) => {
            headers.insert(name, v);
        }
        // Only kept text went in, so this cannot happen; never forward a
        // stale value if it does.
        Err(_) => {
            headers.remove(name);
        }
    }
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
    fn quotes_in_the_host_are_escaped_in_forwarded() {
        let mut out = String::new();
        let host = HeaderValue::from_static("a\"b\\c");
        forwarded_element(&mut out, "192.0.2.1".parse().unwrap(), "http", Some(&host));
        assert_eq!(out, r#"for=192.0.2.1;proto=http;host="a\"b\\c""#);
    }
}
