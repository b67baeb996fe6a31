//! [`ProxyError`]: why a request got no upstream response, and what the
//! client sees (502 / 503 / 504 with a short plain-text body).

use http::StatusCode;

/// A request that could not be served by an upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProxyError {
    /// No route matched the request.
    #[error("no route for this host and path")]
    NoRoute,
    /// The service has no eligible instance.
    #[error("no eligible instance for service {0}")]
    NoEligibleInstance(String),
    /// Every candidate instance is at its `max_connections`.
    #[error("service {0} is over its connection limit")]
    OverLimit(String),
    /// No instance could be reached (connect errors, resets).
    #[error("no instance of service {0} could be reached")]
    Unreachable(String),
    /// The upstream did not answer within `request_timeout`.
    #[error("service {0} did not answer in time")]
    Timeout(String),
}

impl ProxyError {
    /// The status the client gets.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::NoEligibleInstance(_) | ProxyError::OverLimit(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Unreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The label for logs and metrics.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::NoEligibleInstance(_) => "no_instance",
            ProxyError::OverLimit(_) => "over_limit",
            ProxyError::Unreachable(_) => "unreachable",
            ProxyError::Timeout(_) => "timeout",
        }
    }
}
