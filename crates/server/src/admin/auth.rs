//! Bearer-token authentication for `/v1`, and the JSON content-type check
//! that runs after it.
//!
//! The rule: a `/v1` request without the right token gets 401 before
//! anything else about it is looked at (content type, body size, JSON,
//! fields, whether the service exists), so an unauthenticated caller learns
//! nothing about validation. [`super::router`] layers [`require_token`]
//! outside [`require_json`], and both run before any handler extracts the
//! body (where the 64 KiB limit, the JSON and the fields are checked).
//!
//! `Authorization: Bearer <token>`: the scheme is matched case-insensitively
//! (RFC 9110 §11.1), the token exactly and in constant time.

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AdminError, AdminState};

/// The auth scheme, lower case.
const SCHEME: &[u8] = b"bearer";

/// `a == b` in time that depends only on the lengths, not on where they
/// differ (so a wrong token reveals nothing about the right one).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `header` (the `Authorization` value) carries `token` under the
/// `Bearer` scheme, in any letter case.
pub(crate) fn authorized(header: Option<&[u8]>, token: &str) -> bool {
    let Some(h) = header else { return false };
    let Some((scheme, rest)) = h.split_at_checked(SCHEME.len()) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case(SCHEME) || rest.first() != Some(&b' ') {
        return false;
    }
    constant_time_eq(rest.trim_ascii(), token.as_bytes())
}

/// Middleware, outermost on `/v1`: 401 unless the request carries the
/// configured token. With no token configured (allowed only on a loopback
/// address) every request passes.
pub(crate) async fn require_token(
    State(state): State<AdminState>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(token) = state.admin_token() {
        let header = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
        if !authorized(header, &token) {
            return AdminError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Middleware, inside [`require_token`]: a request with a body (`POST`,
/// `PUT`) must say `Content-Type: application/json`, else 415. A web page
/// can send a cross-origin `text/plain` POST without a CORS preflight, but
/// not a JSON one, so this closes the door to cross-site requests against a
/// token-less loopback admin API.
pub(crate) async fn require_json(req: Request, next: Next) -> Response {
    let has_body = matches!(*req.method(), Method::POST | Method::PUT);
    if has_body && !is_json(req.headers().get(CONTENT_TYPE).map(|v| v.as_bytes())) {
        return AdminError::UnsupportedMediaType.into_response();
    }
    next.run(req).await
}

/// Whether a `Content-Type` value is `application/json` (parameters such as
/// `charset` allowed; the media type is case-insensitive).
fn is_json(content_type: Option<&[u8]>) -> bool {
    const JSON: &[u8] = b"application/json";
    content_type
        .map(<[u8]>::trim_ascii_start)
        .and_then(|v| v.get(..JSON.len()))
        .is_some_and(|v| v.eq_ignore_ascii_case(JSON))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(authorized(Some(b"Bearer s3cret"), "s3cret"));
        assert!(!authorized(Some(b"Bearer s3cre"), "s3cret"));
        assert!(!authorized(Some(b"Bearer s3cres"), "s3cret"));
        assert!(!authorized(Some(b"Basic s3cret"), "s3cret"));
        assert!(!authorized(None, "s3cret"));
    }

    #[test]
    fn the_scheme_matches_in_any_case_and_the_token_only_exactly() {
        for h in [
            &b"bearer s3cret"[..],
            b"BEARER s3cret",
            b"bEaReR s3cret",
            b"Bearer   s3cret ",
        ] {
            assert!(authorized(Some(h), "s3cret"), "{}", h.escape_ascii());
        }
        for h in [
            &b"Bearer S3CRET"[..],
            b"bearer S3cret",
            b"Bearers3cret",
            b"Bearers s3cret",
            b"Bearer",
            b"Bearer ",
            b"bear s3cret",
            b"",
            b" Bearer s3cret",
        ] {
            assert!(!authorized(Some(h), "s3cret"), "{}", h.escape_ascii());
        }
    }

    #[test]
    fn json_is_recognised_with_parameters_and_in_any_case() {
        for ct in [
            &b"application/json"[..],
            b"application/json; charset=utf-8",
            b"Application/JSON",
            b" application/json",
        ] {
            assert!(is_json(Some(ct)), "{}", ct.escape_ascii());
        }
        for ct in [&b"text/plain"[..], b"application/jso", b"text/json", b""] {
            assert!(!is_json(Some(ct)), "{}", ct.escape_ascii());
        }
        assert!(!is_json(None));
    }
}
