//! The admin endpoint (axum, on `admin.listen`, loopback by default):
//! the `/v1` JSON API, `/metrics`, the `/status` page, `/healthz` and
//! `/readyz`.
//!
//! | method and path | does |
//! | --- | --- |
//! | `GET /v1/services` | every service: strategy, adaptive mode in use and why, counts, panic mode |
//! | `GET /v1/services/{svc}?limit=&cursor=&state=&id_prefix=` | the service, its totals by state and one page of its instances with live state, worst first (see [`listing`]) |
//! | `PUT /v1/services/{svc}/instances/{id}` | register or update `{address, port, weight?, zone?, tags?}` |
//! | `DELETE /v1/services/{svc}/instances/{id}?drain=30s` | drain (default 30 s; `0s` removes at once), then remove |
//! | `POST /v1/services/{svc}/instances/{id}/health` | `{health_score}` in 0..=1 |
//! | `PUT /v1/services/{svc}/strategy` | `{strategy}` |
//! | `GET /metrics` | Prometheus (OpenMetrics) text; needs the token if `admin.metrics_auth` |
//! | `GET /status`, `GET /status/data` | the live status page and the JSON it polls |
//! | `GET /healthz`, `GET /readyz` | liveness; readiness (listeners bound, first discovery sync done) |
//!
//! Every `/v1` request needs `Authorization: Bearer <token>` (scheme in any
//! case, token compared in constant time); 401 otherwise, before any other
//! check and with nothing changed (see [`auth`]). Then: a body not sent as
//! `application/json` gets 415, bodies over 64 KiB get 413, invalid JSON or
//! fields get 400 naming the field. Changes apply to the
//! next request and, with `admin.state_file`, survive restarts.

pub(crate) mod auth;
pub(crate) mod error;
pub(crate) mod handlers;
pub(crate) mod listing;
pub(crate) mod status_page;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use arc_swap::ArcSwapOption;
use datapunk_lb_core::Registry;

pub(crate) use self::error::AdminError;
use crate::control::{ControlHandle, Readiness};
use crate::metrics::Metrics;

/// Largest admin request body.
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// What every admin handler gets: the control handle for changes, and
/// read-only views for everything else.
#[derive(Clone)]
pub(crate) struct AdminState {
    /// Where changes go.
    pub(crate) control: ControlHandle,
    /// The core registry, for reads.
    pub(crate) registry: Arc<Registry>,
    /// The metrics.
    pub(crate) metrics: Arc<Metrics>,
    /// `/readyz`.
    pub(crate) readiness: Readiness,
    /// Token and `/metrics` auth, as the last applied config set them.
    pub(crate) access: Arc<AdminAccess>,
}

/// Who may use the admin endpoint; the server updates it on each reload.
#[derive(Debug, Default)]
pub(crate) struct AdminAccess {
    /// The admin token, if one is configured.
    pub(crate) token: ArcSwapOption<String>,
    /// Whether `/metrics` needs the token.
    pub(crate) metrics_auth: std::sync::atomic::AtomicBool,
}

impl AdminState {
    /// The admin token, if one is configured.
    pub(crate) fn admin_token(&self) -> Option<Arc<String>> {
        self.access.token.load_full()
    }

    /// Whether `/metrics` needs the token.
    pub(crate) fn metrics_auth(&self) -> bool {
        self.access
            .metrics_auth
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The admin router.
pub(crate) fn router(state: AdminState) -> Router {
    let v1 = Router::new()
        .route("/v1/services", get(handlers::list_services))
        .route("/v1/services/{svc}", get(handlers::get_service))
        .route(
            "/v1/services/{svc}/instances/{id}",
            put(handlers::put_instance).delete(handlers::delete_instance),
        )
        .route(
            "/v1/services/{svc}/instances/{id}/health",
            post(handlers::post_health),
        )
        .route("/v1/services/{svc}/strategy", put(handlers::put_strategy))
        // Layers run outside in: the token first, then the content type;
        // the handlers check body size, JSON and fields after both.
        .route_layer(axum::middleware::from_fn(auth::require_json))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .merge(v1)
        .route("/metrics", get(handlers::metrics))
        .route("/status", get(status_page::page))
        .route("/status/data", get(status_page::data))
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Serves the admin endpoint on `listener` until `stop` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    state: AdminState,
    mut stop: watch::Receiver<bool>,
) {
    let app = router(state);
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "admin endpoint failed");
    }
}
