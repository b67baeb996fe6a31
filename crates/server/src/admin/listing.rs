//! `GET /v1/services/{svc}` at any size: one page of instances, worst
//! first, with the service's totals by state.
//!
//! | query | meaning | default |
//! | --- | --- | --- |
//! | `limit` | instances per page, 1..=[`MAX_LIMIT`] | [`MAX_LIMIT`] |
//! | `cursor` | the `next_cursor` of the previous page (opaque) | first page |
//! | `state` | only `healthy`, `slow_start`, `half_open`, `ejected` or `draining` | all |
//! | `id_prefix` | only ids starting with it (the status page's search) | all |
//!
//! The answer keeps the old fields (`name`, `strategy`, `adaptive`,
//! `eligible`, `draining`, `panic`, `in_flight`, and `instances`, now one
//! page of them) and adds `total` (instances registered), `totals` (by
//! state, counted in the same pass, nothing listed), `matched` (instances
//! passing the filter, on this page and after it) and `next_cursor` (`null`
//! on the last page). Without `limit` a page holds up to 1,000, so a
//! service up to 1,000 instances (the default metrics series limit too)
//! still comes whole in one answer, as before pages existed; only the
//! order changed: health score ascending, then id (see [`crate::scan`] for
//! why a cursor and not an offset).
//!
//! A request costs one pass over the service's members and memory for one
//! page: at 100,000 instances see `docs/benchmarks.md`.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::AdminError;
use crate::scan::{self, Cursor, Filter, State, View};

/// Largest (and default) page.
pub(crate) const MAX_LIMIT: usize = 1_000;

/// The filter and page size of a query; 400 naming the parameter when one
/// is invalid.
pub(crate) fn parse_query(q: &HashMap<String, String>) -> Result<(Filter, usize), AdminError> {
    let limit = match q.get("limit") {
        None => MAX_LIMIT,
        Some(v) => match v.parse::<usize>() {
            Ok(n @ 1..=MAX_LIMIT) => n,
            _ => {
                return Err(AdminError::field(
                    "limit",
                    format!("must be an integer in 1..={MAX_LIMIT}, got {v:?}"),
                ))
            }
        },
    };
    let state = match q.get("state") {
        None => None,
        Some(v) => Some(State::parse(v).ok_or_else(|| {
            let names: Vec<_> = State::ALL.iter().map(|s| s.as_str()).collect();
            AdminError::field(
                "state",
                format!("expected one of {}, got {v:?}", names.join(", ")),
            )
        })?),
    };
    let after =
        match q.get("cursor") {
            None => None,
            Some(v) => Some(Cursor::parse(v).ok_or_else(|| {
                AdminError::field("cursor", "not a cursor this server handed out")
            })?),
        };
    let filter = Filter {
        state,
        id_prefix: q.get("id_prefix").filter(|p| !p.is_empty()).cloned(),
        after,
    };
    Ok((filter, limit))
}

/// `{"healthy": n, ...}` for every state.
pub(crate) fn totals_json(counts: &[usize; 5]) -> Value {
    let m: Map<String, Value> = State::ALL
        .iter()
        .map(|s| (s.as_str().to_owned(), Value::from(counts[s.index()])))
        .collect();
    Value::Object(m)
}

/// Adds the page of `view` that `filter` and `limit` select to `out` (the
/// service's JSON): `instances`, `total`, `totals`, `matched`,
/// `next_cursor`. `row` turns one instance into JSON.
pub(crate) fn add_page(
    out: &mut Value,
    view: &View,
    filter: &Filter,
    limit: usize,
    mut row: impl FnMut(&scan::Ranked) -> Value,
) {
    let page = scan::page(view, filter, limit);
    out["instances"] = Value::Array(page.items.iter().map(&mut row).collect());
    out["total"] = Value::from(view.len());
    out["totals"] = totals_json(&view.counts());
    out["matched"] = Value::from(page.matched);
    out["next_cursor"] = page.next.map_or(Value::Null, |c| Value::from(c.encode()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn bad_parameters_are_named_and_good_ones_parsed() {
        for (query, field) in [
            (q(&[("limit", "0")]), "limit"),
            (q(&[("limit", "1001")]), "limit"),
            (q(&[("limit", "ten")]), "limit"),
            (q(&[("state", "sick")]), "state"),
            (q(&[("cursor", "nope")]), "cursor"),
        ] {
            match parse_query(&query) {
                Err(AdminError::BadField { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{query:?}: {other:?}"),
            }
        }
        let (f, limit) = parse_query(&q(&[])).unwrap();
        assert_eq!(limit, MAX_LIMIT);
        assert!(f.state.is_none() && f.after.is_none() && f.id_prefix.is_none());
        let (f, limit) = parse_query(&q(&[("limit", "5"), ("state", "ejected")])).unwrap();
        assert_eq!((limit, f.state), (5, Some(State::Ejected)));
    }
}
