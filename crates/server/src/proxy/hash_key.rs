//! `hash_key`: what a service's `consistent_hash` hashes, taken from each
//! request (or TCP connection).
//!
//! ## Rule
//!
//! | spec | the key | absent when |
//! | --- | --- | --- |
//! | `"header:NAME"` | the value of the first `NAME` header (name in any case) | no such header, or an empty value |
//! | `"cookie:NAME"` | the value of cookie `NAME` (case-sensitive name, RFC 6265) in any `Cookie` header, without surrounding quotes | no such cookie, or an empty value |
//! | `"client_ip"` | the client's IP address (4 bytes for IPv4, IPv4-mapped IPv6 counted as IPv4; 16 for IPv6), never its port | never |
//! | `"path"` | the request path, without the query | never |
//! | `"query:NAME"` | the raw (not percent-decoded) value of the first `NAME=` parameter | no such parameter, or an empty value |
//!
//! The spec is parsed once, at config load ([`HashKey::parse`]); a bad spec
//! is a config error naming the key and line. A service behind a TCP
//! listener can only use `"client_ip"`: a stream has no headers, cookies,
//! path or query ([`HashKey::fits_tcp`]), and `check` says so.
//!
//! **A request without its key is placed at random** (the `consistent_hash`
//! rule for a pick without a key): there is nothing to be sticky to, and
//! sending every key-less request to one instance would overload it. An
//! empty value counts as absent for the same reason.
//!
//! The key is read from the request by borrowing (no allocation) and
//! reduced to its stable 64-bit [`key_hash`] at once; those 8 bytes are
//! what the core's `consistent_hash` hashes. So the key owns no part of the
//! request, which the attempt then takes, and the mapping is the same on
//! every balancer node. Strategies other than `consistent_hash` ignore it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use datapunk_lb_core::strategy::key_hash;
use http::header::{HeaderName, COOKIE};
use http::request::Parts;

/// The key a request is hashed on: its 64-bit digest, owned.
pub(crate) type KeyDigest = [u8; 8];

/// A parsed `hash_key` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// `header:NAME`.
    Header(HeaderName),
    /// `cookie:NAME`.
    Cookie(String),
    /// `client_ip`.
    ClientIp,
    /// `path`.
    Path,
    /// `query:NAME`.
    Query(String),
}

impl HashKey {
    /// Parses a spec; the error says what is wrong and what is expected.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let expected =
            "expected \"header:NAME\", \"cookie:NAME\", \"client_ip\", \"path\" or \"query:NAME\"";
        match spec {
            "client_ip" => return Ok(HashKey::ClientIp),
            "path" => return Ok(HashKey::Path),
            _ => {}
        }
        let Some((kind, name)) = spec.split_once(':') else {
            return Err(format!("unknown hash key {spec:?}; {expected}"));
        };
        if name.is_empty() {
            return Err(format!("{spec:?} names no {kind}; {expected}"));
        }
        match kind {
            "header" => HeaderName::from_bytes(name.as_bytes())
                .map(HashKey::Header)
                .map_err(|_| format!("{name:?} is not a valid header name")),
            "cookie" if is_token(name) => Ok(HashKey::Cookie(name.to_owned())),
            "cookie" => Err(format!("{name:?} is not a valid cookie name")),
            "query" if !name.contains(['&', '=', '#', ' ']) => Ok(HashKey::Query(name.to_owned())),
            "query" => Err(format!("{name:?} is not a valid query parameter name")),
            _ => Err(format!("unknown hash key kind {kind:?}; {expected}")),
        }
    }

    /// Whether a TCP listener can supply this key (only `client_ip`).
    pub fn fits_tcp(&self) -> bool {
        *self == HashKey::ClientIp
    }

    /// The key of an HTTP request from `peer`, or `None` when it has none.
    pub(crate) fn digest(&self, parts: &Parts, peer: SocketAddr) -> Option<KeyDigest> {
        let digest = |b: &[u8]| key_hash(b).to_le_bytes();
        match self {
            HashKey::ClientIp => Some(client_ip_digest(peer)),
            HashKey::Path => Some(digest(parts.uri.path().as_bytes())),
            HashKey::Header(name) => parts
                .headers
                .get(name)
                .map(|v| v.as_bytes())
                .filter(|v| !v.is_empty())
                .map(digest),
            HashKey::Cookie(name) => parts
                .headers
                .get_all(COOKIE)
                .iter()
                .find_map(|v| cookie(v.as_bytes(), name.as_bytes()))
                .map(digest),
            HashKey::Query(name) => parts
                .uri
                .query()
                .and_then(|q| query_param(q.as_bytes(), name.as_bytes()))
                .map(digest),
        }
    }
}

/// The key of a connection from `peer` under `client_ip`.
pub(crate) fn client_ip_digest(peer: SocketAddr) -> KeyDigest {
    let h = match peer.ip().to_canonical() {
        IpAddr::V4(ip) => key_hash(&ip.octets()),
        IpAddr::V6(ip) => key_hash(&ip.octets()),
    };
    h.to_le_bytes()
}

/// The non-empty value of cookie `name` in one `Cookie` header value
/// (`a=1; b="2"`), without quotes.
fn cookie<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let (n, v) = split_once(pair, b'=')?;
        if n.trim_ascii() != name {
            return None;
        }
        let v = v.trim_ascii();
        let v = v
            .strip_prefix(b"\"")
            .and_then(|v| v.strip_suffix(b"\""))
            .unwrap_or(v);
        (!v.is_empty()).then_some(v)
    })
}

/// The raw value of the first `name=` parameter of a query, if not empty.
fn query_param<'a>(query: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    query
        .split(|&b| b == b'&')
        .find_map(|pair| {
            let (n, v) = split_once(pair, b'=')?;
            (n == name).then_some(v)
        })
        .filter(|v| !v.is_empty())
}

fn split_once(s: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|&b| b == sep)?;
    Some((&s[..i], &s[i + 1..]))
}

/// An RFC 7230 token: what a cookie name may be.
fn is_token(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl FromStr for HashKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashKey::Header(n) => write!(f, "header:{n}"),
            HashKey::Cookie(n) => write!(f, "cookie:{n}"),
            HashKey::ClientIp => f.write_str("client_ip"),
            HashKey::Path => f.write_str("path"),
            HashKey::Query(n) => write!(f, "query:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn peer(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn key(spec: &str, p: &Parts) -> Option<KeyDigest> {
        HashKey::parse(spec)
            .unwrap()
            .digest(p, peer("10.0.0.1:5000"))
    }

    fn of(b: &str) -> Option<KeyDigest> {
        Some(key_hash(b.as_bytes()).to_le_bytes())
    }

    #[test]
    fn specs_parse_and_print_back_and_bad_ones_say_why() {
        for spec in [
            "header:x-user",
            "cookie:sid",
            "client_ip",
            "path",
            "query:user",
        ] {
            assert_eq!(HashKey::parse(spec).unwrap().to_string(), spec);
        }
        assert_eq!(
            HashKey::parse("header:X-User").unwrap().to_string(),
            "header:x-user"
        );
        for (bad, why) in [
            ("", "unknown hash key"),
            ("ip", "unknown hash key"),
            ("header:", "names no header"),
            ("header:x user", "not a valid header name"),
            ("cookie:a=b", "not a valid cookie name"),
            ("query:a&b", "not a valid query parameter"),
            ("body:x", "unknown hash key kind"),
        ] {
            let err = HashKey::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        assert!(HashKey::ClientIp.fits_tcp());
        assert!(!HashKey::Path.fits_tcp());
    }

    #[test]
    fn each_kind_reads_its_part_of_the_request() {
        let p = parts(
            "/a/b?x=1&user=alice&y=",
            &[
                ("X-User", "bob"),
                ("x-user", "second"),
                ("cookie", "theme=dark"),
                ("cookie", "a=1; sid=\"s-42\" ; other=2"),
            ],
        );
        assert_eq!(key("header:x-user", &p), of("bob"));
        assert_eq!(key("cookie:sid", &p), of("s-42"));
        assert_eq!(key("cookie:theme", &p), of("dark"));
        assert_eq!(key("query:user", &p), of("alice"));
        assert_eq!(key("path", &p), of("/a/b"));
        assert_eq!(key("client_ip", &p), of_ip(&[10, 0, 0, 1]));
    }

    fn of_ip(octets: &[u8]) -> Option<KeyDigest> {
        Some(key_hash(octets).to_le_bytes())
    }

    #[test]
    fn missing_or_empty_keys_are_absent() {
        let p = parts(
            "/?user=&other=1",
            &[("x-user", ""), ("cookie", "sid=; sidx=1")],
        );
        for spec in [
            "header:x-user",
            "header:x-none",
            "cookie:sid",
            "cookie:si",
            "query:user",
            "query:use",
        ] {
            assert_eq!(key(spec, &p), None, "{spec}");
        }
        assert_eq!(key("query:user", &parts("/", &[])), None);
    }

    #[test]
    fn the_client_ip_ignores_the_port_and_maps_v4_in_v6() {
        let a = client_ip_digest(peer("192.0.2.7:1"));
        assert_eq!(a, client_ip_digest(peer("192.0.2.7:2")));
        assert_eq!(a, client_ip_digest(peer("[::ffff:192.0.2.7]:3")));
        assert_ne!(a, client_ip_digest(peer("192.0.2.8:1")));
        assert_ne!(a, client_ip_digest(peer("[2001:db8::7]:1")));
    }
}
