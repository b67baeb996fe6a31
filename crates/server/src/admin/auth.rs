//! Bearer-token authentication for `/v1`, compared in constant time.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AdminError, AdminState};

/// `a == b` in time that depends only on the lengths, not on where they
/// differ (so a wrong token reveals nothing about the right one).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `header` (the `Authorization` value) carries `token`.
pub fn authorized(header: Option<&[u8]>, token: &str) -> bool {
    let Some(h) = header else { return false };
    let Some(given) = h.strip_prefix(b"Bearer ") else {
        return false;
    };
    constant_time_eq(given.trim_ascii(), token.as_bytes())
}

/// Middleware: 401 unless the request carries the configured token. With no
/// token configured (allowed only on a loopback address) every request passes.
///
/// A request with a body must also say `Content-Type: application/json`
/// (else 415): a web page can send a cross-origin `text/plain` POST without
/// a CORS preflight, but not a JSON one, so this closes the door to
/// cross-site requests against a token-less loopback admin API.
pub async fn require_token(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let has_body = matches!(
        *req.method(),
        axum::http::Method::POST | axum::http::Method::PUT
    );
    if has_body {
        let json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/json")
            });
        if !json {
            return AdminError::UnsupportedMediaType.into_response();
        }
    }
    if let Some(token) = state.admin_token() {
        let header = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
        if !authorized(header, &token) {
            return AdminError::Unauthorized.into_response();
        }
    }
    next.run(req).await
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
}
