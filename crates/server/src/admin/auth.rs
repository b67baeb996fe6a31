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
pub async fn require_token(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    if let Some(token) = state.server.admin_token() {
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
