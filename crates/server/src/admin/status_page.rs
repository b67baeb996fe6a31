//! The live status page: `GET /status` serves one self-contained HTML page
//! (no external assets, so it works offline) that polls `GET /status/data`
//! every second and redraws every service and instance, with the last five
//! minutes of each as small charts and the recent state changes as a
//! timeline (kept by [`crate::history`]; the page asks only for what is
//! newer than what it holds).

use std::collections::HashMap;

use axum::extract::{Query, State};
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

/// `GET /status/data?since=<seq>&changes=<id>`: every service with its
/// instances, their history newer than sample `since` (all 300 points
/// without it) and the state changes after `changes`. Values that do not
/// parse count as absent: the page then gets everything.
pub(crate) async fn data(
    State(s): State<AdminState>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<Value> {
    let num = |k: &str| q.get(k).and_then(|v| v.parse::<u64>().ok());
    let mut history = s.metrics.history().view(num("since"), num("changes"));
    let reg = &s.registry;
    let services: Vec<Value> = reg
        .services()
        .iter()
        .map(|svc| {
            let instances: Vec<Value> = reg
                .instances(&svc.name)
                .unwrap_or_default()
                .iter()
                .map(|st| {
                    let mut v = instance_json(st);
                    if let Some(h) = history.take_instance(&svc.name, st.instance.id().as_str()) {
                        v["history"] = h;
                    }
                    v
                })
                .collect();
            json!({
                "name": svc.name,
                "strategy": svc.strategy.as_str(),
                "mode": svc.adaptive.as_ref().map(|a| a.mode.as_str()),
                "reason": svc.adaptive.as_ref().map(|a| a.reason.clone()),
                "panic": svc.panic,
                "eligible": svc.eligible,
                "in_flight": svc.in_flight,
                "history": history.take_service(&svc.name),
                "instances": instances,
            })
        })
        .collect();
    Json(json!({ "services": services, "history": history.head }))
}
