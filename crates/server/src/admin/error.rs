//! [`AdminError`]: what an admin request gets when it is refused, as JSON
//! `{"error": "...", "field": "..."}` with the right status. Bad client
//! input is logged at debug, not error: it is the client's mistake.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use datapunk_lb_core::RegistryError;

/// A refused admin request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdminError {
    /// Missing or wrong bearer token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// A body that is not declared as JSON.
    #[error("the body must be sent with Content-Type: application/json")]
    UnsupportedMediaType,
    /// A field is missing or invalid.
    #[error("{field}: {message}")]
    BadField {
        /// The field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The body is not JSON.
    #[error("invalid JSON: {0}")]
    BadJson(String),
    /// Unknown service or instance.
    #[error("{0}")]
    NotFound(String),
    /// The change could not be saved.
    #[error("{0}")]
    Internal(String),
}

impl AdminError {
    /// A bad field.
    pub(crate) fn field(field: &str, message: impl Into<String>) -> Self {
        AdminError::BadField {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

impl From<RegistryError> for AdminError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::UnknownService(_) | RegistryError::UnknownInstance { .. } => {
                AdminError::NotFound(e.to_string())
            }
            RegistryError::HealthScore(h) => AdminError::field("health_score", h.to_string()),
            RegistryError::Instance(i) => AdminError::field(i.field(), i.to_string()),
            RegistryError::Config(c) => AdminError::field(c.field, c.reason),
            RegistryError::EmptyServiceName => AdminError::field("service", e.to_string()),
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = match &self {
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::BadField { .. } | AdminError::BadJson(_) => StatusCode::BAD_REQUEST,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AdminError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "admin request failed");
        } else {
            tracing::debug!(error = %self, "admin request refused");
        }
        let mut body = serde_json::json!({ "error": self.to_string() });
        if let AdminError::BadField { field, .. } = &self {
            body["field"] = serde_json::Value::String(field.clone());
        }
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
