//! Request hygiene: the checks a request passes before it is routed, so
//! the proxy and the backend never disagree about which host a request is
//! for (RFC 9112 §3.2, RFC 9113 §8.3.1).
//!
//! ## Rules
//!
//! - **More than one `Host`** → 400, any version.
//! - **A `Host` that is not a valid authority** (`host[:port]`, no
//!   userinfo) → 400.
//! - **HTTP/1.1 without `Host`** → 400 (RFC 9112 §3.2: "A server MUST
//!   respond with a 400"), even with an absolute-form target, which the
//!   same section still requires a `Host` for.
//! - **HTTP/1.0 without `Host`** is allowed (HTTP/1.0 predates the header
//!   and RFC 9112 requires it of 1.1 only): it is routed with no host, so
//!   only routes without a `host` match it.
//! - **HTTP/2 without `:authority` and without `Host`** → 400: there is
//!   nothing to route by and nothing to tell the backend.
//! - **The target's authority wins.** With an absolute-form target
//!   (`GET http://a.example/x HTTP/1.1`, RFC 9112 §3.2.2) or an HTTP/2
//!   `:authority` (RFC 9113 §8.3.1), a `Host` that differs is replaced by
//!   that authority: routing already uses it, and the backend gets the same.
//! - **Userinfo in the target's authority** (`http://u@a.example/`) → 400:
//!   RFC 9110 §4.2.4 forbids it, and it is a classic way to make two parsers
//!   disagree on the host.
//!
//! What hyper already refuses with 400 before a request gets here (and the
//! end-to-end tests in `tests/e2e/hygiene.rs` pin): conflicting
//! `Content-Length`s, a `Transfer-Encoding` that does not end in chunked,
//! obs-fold, bare CR and NUL in the head.

use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Request, Version};

/// Why a request was refused; the text of its 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("invalid Host header")]
    InvalidHost,
    #[error("missing Host header")]
    MissingHost,
    #[error("userinfo in the request target")]
    Userinfo,
}

/// Checks `req` under the rules above and makes its `Host` agree with the
/// target's authority.
pub(crate) fn check<B>(req: &mut Request<B>) -> Result<(), Refused> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refused::DuplicateHost);
    }
    if let Some(h) = host {
        if !valid_host(h.as_bytes()) {
            return Err(Refused::InvalidHost);
        }
    }
    let target = req.uri().authority();
    if target.is_some_and(|a| a.as_str().contains('@')) {
        return Err(Refused::Userinfo);
    }
    let required = match req.version() {
        Version::HTTP_09 | Version::HTTP_10 => false,
        Version::HTTP_11 => true,
        // HTTP/2 and later: `:authority` stands in for Host.
        _ => target.is_none(),
    };
    if required && host.is_none() {
        return Err(Refused::MissingHost);
    }
    let rewrite = match (target, host) {
        (Some(a), Some(h)) if !a.as_str().eq_ignore_ascii_case(h.to_str().unwrap_or("")) => {
            HeaderValue::from_str(a.as_str()).ok()
        }
        _ => None,
    };
    if let Some(v) = rewrite {
        req.headers_mut().insert(header::HOST, v);
    }
    Ok(())
}

/// Whether `host` is an authority without userinfo. The last `Host` this
/// thread found valid is remembered: a keep-alive client sends the same one
/// on every request, and `Authority`'s parse copies the value into a new
/// allocation to check it (~340 instructions a request).
fn valid_host(host: &[u8]) -> bool {
    thread_local! {
        static LAST_VALID: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    // Longer ones are checked every time, not copied.
    const REMEMBERED_LEN: usize = 256;
    LAST_VALID.with(|last| {
        let Ok(mut last) = last.try_borrow_mut() else {
            return parses_as_host(host);
        };
        if !last.is_empty() && last.as_slice() == host {
            return true;
        }
        let valid = parses_as_host(host);
        if valid && host.len() <= REMEMBERED_LEN {
            last.clear();
            last.extend_from_slice(host);
        }
        valid
    })
}

fn parses_as_host(host: &[u8]) -> bool {
    std::str::from_utf8(host)
        .ok()
        .and_then(|s| s.parse::<Authority>().ok())
        .is_some_and(|a| !a.as_str().contains('@'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap()
    }

    fn host_after(version: Version, uri: &str, hosts: &[&str]) -> Result<Option<String>, Refused> {
        let mut r = req(version, uri, hosts);
        check(&mut r)?;
        let hosts: Vec<_> = r.headers().get_all(header::HOST).iter().collect();
        assert!(hosts.len() <= 1);
        Ok(hosts.first().map(|h| h.to_str().unwrap().to_owned()))
    }

    #[test]
    fn the_remembered_host_answers_only_for_itself() {
        let hosts: [&[u8]; 9] = [
            b"a.example",
            b"a.example",
            b"a.example:8080",
            b"u@a.example",
            b"a.example",
            b"a example",
            b"",
            b"[::1]:80",
            b"a.example\xff",
        ];
        // Twice over: the second pass meets each after the one before it
        // was remembered.
        for h in hosts.iter().chain(hosts.iter()) {
            assert_eq!(valid_host(h), parses_as_host(h), "{h:?}");
        }
        assert!(valid_host(b"a.example"));
        assert!(!valid_host(b"u@a.example"));
        assert!(!valid_host(b""));
    }

    #[test]
    fn http11_needs_exactly_one_valid_host() {
        use Version as V;
        type Case = (Version, &'static str, &'static [&'static str], Want);
        type Want = Result<Option<&'static str>, Refused>;
        let cases: [Case; 10] = [
            (V::HTTP_11, "/x", &["a.example"], Ok(Some("a.example"))),
            (
                V::HTTP_11,
                "/x",
                &["a.example:8080"],
                Ok(Some("a.example:8080")),
            ),
            (V::HTTP_11, "/x", &[], Err(Refused::MissingHost)),
            (V::HTTP_11, "/x", &["a", "a"], Err(Refused::DuplicateHost)),
            (V::HTTP_11, "/x", &["a", "b"], Err(Refused::DuplicateHost)),
            (
                V::HTTP_11,
                "/x",
                &["u@a.example"],
                Err(Refused::InvalidHost),
            ),
            (V::HTTP_11, "/x", &["a b"], Err(Refused::InvalidHost)),
            (V::HTTP_11, "/x", &[""], Err(Refused::InvalidHost)),
            (V::HTTP_10, "/x", &[], Ok(None)),
            (V::HTTP_10, "/x", &["a", "b"], Err(Refused::DuplicateHost)),
        ];
        for (v, uri, hosts, want) in cases {
            let want = want.map(|h| h.map(str::to_owned));
            assert_eq!(host_after(v, uri, hosts), want, "{v:?} {uri} {hosts:?}");
        }
    }

    #[test]
    fn the_target_authority_wins_over_host() {
        use Version as V;
        // Absolute form: the URI's authority becomes the Host.
        assert_eq!(
            host_after(V::HTTP_11, "http://a.example/x", &["b.example"]),
            Ok(Some("a.example".to_owned()))
        );
        assert_eq!(
            host_after(V::HTTP_11, "http://A.example:81/x", &["a.EXAMPLE:81"]),
            Ok(Some("a.EXAMPLE:81".to_owned())),
            "equal but for case: left as sent"
        );
        assert_eq!(
            host_after(V::HTTP_11, "http://a.example/x", &[]),
            Err(Refused::MissingHost),
            "HTTP/1.1 needs Host even in absolute form"
        );
        assert_eq!(
            host_after(V::HTTP_11, "http://u:p@a.example/x", &["a.example"]),
            Err(Refused::Userinfo)
        );
        // HTTP/2: :authority wins; it alone is enough; neither is refused.
        assert_eq!(
            host_after(V::HTTP_2, "http://a.example/x", &["b.example"]),
            Ok(Some("a.example".to_owned()))
        );
        assert_eq!(host_after(V::HTTP_2, "http://a.example/x", &[]), Ok(None));
        assert_eq!(
            host_after(V::HTTP_2, "/x", &["b.example"]),
            Ok(Some("b.example".to_owned()))
        );
        assert_eq!(host_after(V::HTTP_2, "/x", &[]), Err(Refused::MissingHost));
    }
}
