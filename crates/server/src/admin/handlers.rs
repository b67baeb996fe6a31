//! The admin API's handlers: parse and validate, send the change to the
//! control task and await its reply, answer JSON. Reads go to the registry.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use datapunk_lb_core::{InstanceStatus, ServiceStatus, StrategyKind};
use serde_json::{json, Map, Value};

use super::{AdminError, AdminState};
use crate::control::{Command, ControlError, Write};
use crate::scan::View;
use crate::state::InstanceSpec;

/// Default drain for `DELETE` without `?drain=`.
pub(crate) const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

fn service_json(s: &ServiceStatus) -> Value {
    json!({
        "name": s.name,
        "strategy": s.strategy.as_str(),
        "adaptive": s.adaptive.as_ref().map(|a| json!({
            "mode": a.mode.as_str(),
            "reason": a.reason,
            "latency_spread": a.signals.latency_spread,
            "error_rate": a.signals.error_rate,
            "concurrency": a.signals.concurrency,
        })),
        "instances": s.instances,
        "eligible": s.eligible,
        "draining": s.draining,
        "panic": s.panic,
        "in_flight": s.in_flight,
    })
}

impl From<ControlError> for AdminError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::UnknownService(_) => AdminError::NotFound(e.to_string()),
            ControlError::NoHashKey(_) => AdminError::field("strategy", e.to_string()),
            ControlError::Registry(r) => r.into(),
            ControlError::Service { .. }
            | ControlError::Persist(_)
            | ControlError::Store(_)
            | ControlError::Stopped
            | ControlError::Panicked(_) => AdminError::Internal(e.to_string()),
        }
    }
}

/// One instance as JSON.
pub(crate) fn instance_json(st: &InstanceStatus) -> Value {
    let i = &st.instance;
    json!({
        "id": i.id().as_str(),
        "address": i.address(),
        "port": i.port(),
        "weight": i.weight().get(),
        "zone": i.zone(),
        "tags": i.tags().collect::<Vec<_>>(),
        "effective_weight": st.effective_weight,
        "health_score": st.health_score,
        "circuit_state": st.circuit_state.as_str(),
        "active_connections": st.active_connections,
        "draining": st.draining,
        "eligible": st.eligible,
        "requests": st.requests,
        "errors": st.failures,
        "latency_ewma_ms": st.latency_ewma.as_secs_f64() * 1e3,
        "slow_start_factor": st.slow_start_factor,
    })
}

/// `GET /v1/services`.
pub(crate) async fn list_services(State(s): State<AdminState>) -> Json<Value> {
    let list: Vec<Value> = s.registry.services().iter().map(service_json).collect();
    Json(json!({ "services": list }))
}

/// `GET /v1/services/{svc}?limit=&cursor=&state=&id_prefix=`: the service
/// and one page of its instances, worst first (see [`super::listing`]).
pub(crate) async fn get_service(
    State(s): State<AdminState>,
    Path(svc): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, AdminError> {
    let (filter, limit) = super::listing::parse_query(&q)?;
    let view = View::of(&s.registry, &svc)
        .ok_or_else(|| AdminError::NotFound(format!("unknown service {svc:?}")))?;
    let mut v = service_json(&view.service().status());
    super::listing::add_page(&mut v, &view, &filter, limit, |r| {
        instance_json(&view.status(&r.member))
    });
    Ok(Json(v))
}

fn object(body: &Bytes) -> Result<Map<String, Value>, AdminError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(AdminError::BadJson("expected a JSON object".into())),
        Err(e) => Err(AdminError::BadJson(e.to_string())),
    }
}

fn reject_unknown(m: &Map<String, Value>, known: &[&str]) -> Result<(), AdminError> {
    match m.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(AdminError::field(
            k,
            format!("unknown field; expected one of {}", known.join(", ")),
        )),
        None => Ok(()),
    }
}

fn int_field(
    m: &Map<String, Value>,
    field: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, AdminError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let n = v.as_u64().ok_or_else(|| {
                AdminError::field(
                    field,
                    format!("must be an integer in {}..={}", range.start(), range.end()),
                )
            })?;
            if range.contains(&n) {
                Ok(Some(n))
            } else {
                Err(AdminError::field(
                    field,
                    format!("must be in {}..={}, got {n}", range.start(), range.end()),
                ))
            }
        }
    }
}

pub(crate) fn parse_spec(body: &Bytes) -> Result<InstanceSpec, AdminError> {
    let m = object(body)?;
    reject_unknown(&m, &["address", "port", "weight", "zone", "tags"])?;
    let address = match m.get("address") {
        Some(Value::String(a)) if !a.is_empty() => a.clone(),
        Some(_) => return Err(AdminError::field("address", "must be a non-empty string")),
        None => return Err(AdminError::field("address", "missing field")),
    };
    let port = int_field(&m, "port", 1..=65535)?
        .ok_or_else(|| AdminError::field("port", "missing field"))? as u16;
    let weight = int_field(&m, "weight", 1..=1000)?.unwrap_or(1) as u16;
    let zone = match m.get("zone") {
        None | Some(Value::Null) => None,
        Some(Value::String(z)) => Some(z.clone()),
        Some(_) => return Err(AdminError::field("zone", "must be a string")),
    };
    let tags = match m.get("tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| t.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| AdminError::field("tags", "must be an array of strings"))?,
        Some(_) => return Err(AdminError::field("tags", "must be an array of strings")),
    };
    Ok(InstanceSpec {
        address,
        port,
        weight,
        zone,
        tags,
    })
}

/// The body of `POST .../health`: `{"health_score": <number>}` (the range
/// is the registry's to check).
pub(crate) fn parse_health(body: &Bytes) -> Result<f64, AdminError> {
    let m = object(body)?;
    reject_unknown(&m, &["health_score"])?;
    match m.get("health_score") {
        Some(v) => v
            .as_f64()
            .ok_or_else(|| AdminError::field("health_score", "must be a number in 0..=1")),
        None => Err(AdminError::field("health_score", "missing field")),
    }
}

/// The body of `PUT .../strategy`: `{"strategy": "<name>"}`.
pub(crate) fn parse_strategy(body: &Bytes) -> Result<StrategyKind, AdminError> {
    let m = object(body)?;
    reject_unknown(&m, &["strategy"])?;
    match m.get("strategy") {
        Some(Value::String(k)) => k
            .parse::<StrategyKind>()
            .map_err(|e| AdminError::field("strategy", e.to_string())),
        Some(_) => Err(AdminError::field("strategy", "must be a string")),
        None => Err(AdminError::field("strategy", "missing field")),
    }
}

/// `PUT /v1/services/{svc}/instances/{id}`.
pub(crate) async fn put_instance(
    State(s): State<AdminState>,
    Path((svc, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, AdminError> {
    let spec = parse_spec(&body)?;
    spec.to_instance(&id)
        .map_err(datapunk_lb_core::RegistryError::from)?;
    let write = Write::Register {
        service: svc.clone(),
        id: id.clone(),
        spec,
    };
    let added = s.control.write(write).await?;
    let status = if added {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let st = s.registry.instance(&svc, &id)?;
    Ok((status, Json(instance_json(&st))).into_response())
}

/// `DELETE /v1/services/{svc}/instances/{id}?drain=30s`.
pub(crate) async fn delete_instance(
    State(s): State<AdminState>,
    Path((svc, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, AdminError> {
    let drain = match q.get("drain") {
        None => DEFAULT_DRAIN,
        Some(d) => humantime::parse_duration(d)
            .map_err(|e| AdminError::field("drain", format!("invalid duration {d:?}: {e}")))?,
    };
    let write = Write::Remove {
        service: svc.clone(),
        id: id.clone(),
        drain,
    };
    s.control.write(write).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(
            json!({ "service": svc, "instance": id, "draining_for_ms": drain.as_millis() as u64 }),
        ),
    )
        .into_response())
}

/// `POST /v1/services/{svc}/instances/{id}/health`.
pub(crate) async fn post_health(
    State(s): State<AdminState>,
    Path((svc, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, AdminError> {
    let score = parse_health(&body)?;
    s.control
        .send(Command::SetHealth {
            service: svc.clone(),
            id: id.clone(),
            score,
        })
        .await?;
    let st = s.registry.instance(&svc, &id)?;
    Ok(Json(instance_json(&st)))
}

/// `PUT /v1/services/{svc}/strategy`.
pub(crate) async fn put_strategy(
    State(s): State<AdminState>,
    Path(svc): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, AdminError> {
    let kind = parse_strategy(&body)?;
    s.control
        .send(Command::SetStrategy {
            service: svc.clone(),
            kind,
        })
        .await?;
    Ok(Json(json!({ "service": svc, "strategy": kind.as_str() })))
}

/// `GET /metrics`.
pub(crate) async fn metrics(
    State(s): State<AdminState>,
    headers: HeaderMap,
) -> Result<Response, AdminError> {
    if s.metrics_auth() {
        if let Some(token) = s.admin_token() {
            let h = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
            if !super::auth::authorized(h, &token) {
                return Err(AdminError::Unauthorized);
            }
        }
    }
    let body = s.metrics.encode();
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

/// `GET /healthz`: the process is alive.
pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: listeners bound and first discovery sync done.
pub(crate) async fn readyz(State(s): State<AdminState>) -> Response {
    if s.readiness.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}
