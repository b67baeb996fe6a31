//! The live status page: `GET /status` serves one self-contained HTML page
//! (no external assets, so it works offline) that polls `GET /status/data`
//! every second and redraws every service and instance.

use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::handlers::instance_json;
use super::AdminState;

/// The page.
pub(crate) const PAGE: &str = include_str!("status.html");

/// `GET /status`.
pub(crate) async fn page() -> Response {
    Html(PAGE).into_response()
}

/// `GET /status/data`: every service with its instances.
pub(crate) async fn data(State(s): State<AdminState>) -> Json<Value> {
    let reg = &s.registry;
    let services: Vec<Value> = reg
        .services()
        .iter()
        .map(|svc| {
            let instances: Vec<Value> = reg
                .instances(&svc.name)
                .unwrap_or_default()
                .iter()
                .map(instance_json)
                .collect();
            json!({
                "name": svc.name,
                "strategy": svc.strategy.as_str(),
                "mode": svc.adaptive.as_ref().map(|a| a.mode.as_str()),
                "reason": svc.adaptive.as_ref().map(|a| a.reason.clone()),
                "panic": svc.panic,
                "eligible": svc.eligible,
                "in_flight": svc.in_flight,
                "instances": instances,
            })
        })
        .collect();
    Json(json!({ "services": services }))
}
