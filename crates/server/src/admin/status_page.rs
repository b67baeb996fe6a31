//! The live status page: `GET /status` serves one self-contained HTML page
//! (no external assets, so it works offline) that polls `GET /status/data`
//! every second and redraws every service: its counts by state, its worst
//! [`SHOWN`] instances (or, with the page's search box, the worst that
//! match an id prefix, searched here on the server), the last five minutes
//! of the service and of the shown instances that have history as small
//! charts, and the recent state changes as a timeline (kept by
//! [`crate::history`]; the page asks only for what is newer than what it
//! holds).
//!
//! ## Bounded whatever the instance count
//!
//! A poll carries at most [`SHOWN`] instances per service, counted and
//! picked in one pass that keeps only those (see [`crate::scan`]), so its
//! size depends on the number of services, not instances: ~8 KB per
//! service per poll, and a first load (full history) under 100 KB for one
//! service (measured at 100,000 instances in `docs/benchmarks.md`). The
//! counts cover every instance.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::handlers::instance_json;
use super::listing::add_page;
use super::AdminState;
use crate::scan::{Filter, View};

/// The page.
pub(crate) const PAGE: &str = include_str!("status.html");

/// `GET /status`.
pub(crate) async fn page() -> Response {
    Html(PAGE).into_response()
}

/// Instances shown per service: the worst (health score ascending, then id).
pub(crate) const SHOWN: usize = 20;

/// `GET /status/data?since=<seq>&changes=<id>&id_prefix=<text>`: every
/// service with its counts by state and its worst [`SHOWN`] instances
/// (only ids starting with `id_prefix`, if given), their history newer
/// than sample `since` (all 300 points without it) and the state changes
/// after `changes`. Values that do not parse count as absent: the page then
/// gets everything.
pub(crate) async fn data(
    State(s): State<AdminState>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<Value> {
    let num = |k: &str| q.get(k).and_then(|v| v.parse::<u64>().ok());
    let mut history = s.metrics.history().view(num("since"), num("changes"));
    let filter = Filter {
        id_prefix: q.get("id_prefix").filter(|p| !p.is_empty()).cloned(),
        ..Filter::default()
    };
    let reg = &s.registry;
    let services: Vec<Value> = reg
        .services()
        .iter()
        .filter_map(|svc| {
            let view = View::of(reg, &svc.name)?;
            let mut v = json!({
                "name": svc.name,
                "strategy": svc.strategy.as_str(),
                "mode": svc.adaptive.as_ref().map(|a| a.mode.as_str()),
                "reason": svc.adaptive.as_ref().map(|a| a.reason.clone()),
                "panic": svc.panic,
                "eligible": svc.eligible,
                "in_flight": svc.in_flight,
                "history": history.take_service(&svc.name),
            });
            add_page(&mut v, &view, &filter, SHOWN, |r| {
                let mut i = instance_json(&view.status(&r.member));
                let id = r.member.instance().id().as_str();
                if let Some(h) = history.take_instance(&svc.name, id) {
                    i["history"] = h;
                }
                i
            });
            // Paging is the admin API's: the page shows the first page only.
            if let Some(m) = v.as_object_mut() {
                m.remove("next_cursor");
            }
            Some(v)
        })
        .collect();
    Json(json!({ "services": services, "history": history.head }))
}
