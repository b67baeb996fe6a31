//! Entry points for the fuzz targets in `fuzz/` (not an API: hidden from
//! the docs, no stability promise).
//!
//! The rule: each function runs the **same code** the server runs on that
//! input — the admin handlers' body parsers, the state file's `parse` that
//! `DynamicState::load` calls — because those items are crate-private and
//! a fuzz target is another crate. Each returns the error the server would
//! report, and panics only when an invariant the fuzz target exists to
//! check is broken (a panic is what libFuzzer records as a crash).

use axum::body::Bytes;
use datapunk_lb_core::{Registry, ServiceInstance};

use crate::admin::handlers::{parse_health, parse_spec, parse_strategy};
use crate::state::DynamicState;

/// Which admin request body [`admin_body`] parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminBody {
    /// `PUT /v1/services/{svc}/instances/{id}`: `{address, port, weight?, zone?, tags?}`.
    Register,
    /// `POST /v1/services/{svc}/instances/{id}/health`: `{health_score}`.
    Health,
    /// `PUT /v1/services/{svc}/strategy`: `{strategy}`.
    Strategy,
}

/// Parses `body` as the admin handler for `kind` does and applies it, with
/// the names `service` and `id`, to a fresh core [`Registry`] as the control
/// task would. Returns the error text the API would answer.
///
/// # Panics
///
/// When an accepted change is not what the registry then reports (address,
/// port, weight, health score or strategy differ).
pub fn admin_body(kind: AdminBody, service: &str, id: &str, body: &[u8]) -> Result<(), String> {
    let body = Bytes::copy_from_slice(body);
    let registry = Registry::new();
    let e = |e: &dyn std::fmt::Display| e.to_string();
    match kind {
        AdminBody::Register => {
            let spec = parse_spec(&body).map_err(|x| e(&x))?;
            let instance = spec.to_instance(id).map_err(|x| e(&x))?;
            registry
                .register_instance(service, instance)
                .map_err(|x| e(&x))?;
            let st = registry.instance(service, id).map_err(|x| e(&x))?;
            assert_eq!(st.instance.address(), spec.address);
            assert_eq!(st.instance.port(), spec.port);
            assert_eq!(st.instance.weight().get(), spec.weight);
            assert_eq!(st.instance.zone(), spec.zone.as_deref());
        }
        AdminBody::Health => {
            let score = parse_health(&body).map_err(|x| e(&x))?;
            let instance = ServiceInstance::try_new(id, "127.0.0.1", 1).map_err(|x| e(&x))?;
            registry
                .register_instance(service, instance)
                .map_err(|x| e(&x))?;
            registry
                .update_instance_health(service, id, score)
                .map_err(|x| e(&x))?;
            let st = registry.instance(service, id).map_err(|x| e(&x))?;
            assert!(
                (st.health_score - score).abs() < 1e-9,
                "health {score} set, {} reported",
                st.health_score
            );
        }
        AdminBody::Strategy => {
            let kind = parse_strategy(&body).map_err(|x| e(&x))?;
            let instance = ServiceInstance::try_new("i-1", "127.0.0.1", 1).map_err(|x| e(&x))?;
            registry
                .register_instance(service, instance)
                .map_err(|x| e(&x))?;
            registry.set_strategy(service, kind).map_err(|x| e(&x))?;
            let status = registry
                .services()
                .into_iter()
                .find(|s| s.name == service)
                .ok_or_else(|| format!("service {service:?} vanished"))?;
            assert_eq!(status.strategy, kind);
        }
    }
    Ok(())
}

/// Parses `text` as a state file read at start-up (the code
/// `DynamicState::load` runs once the file is read). On success, checks that
/// what `save` would write parses back to the same state.
///
/// # Panics
///
/// When an accepted state does not survive a save and load unchanged.
pub fn state_file(text: &str) -> Result<(), String> {
    let state = DynamicState::parse(text)?;
    let json = state.to_json().map_err(|e| e.to_string())?;
    let json = String::from_utf8(json).map_err(|e| e.to_string())?;
    let back = DynamicState::parse(&json);
    assert_eq!(back.as_ref(), Ok(&state), "save/load round trip of {json}");
    Ok(())
}

/// Reads `data` as a passthrough listener reads a ClientHello: `None`
/// while more bytes are needed, else `Some` of the server name it routes
/// by (`Some(None)`: no name, or not TLS).
///
/// # Panics
///
/// When a decision is not final (a shorter prefix decided differently, or
/// more bytes change it) or a server name is not a lowercase host name.
pub fn client_hello(data: &[u8]) -> Option<Option<String>> {
    use crate::proxy::sni::{parse_client_hello, Hello};
    let hello = parse_client_hello(data);
    // Prefixes at 1/16 steps (all of them on short inputs) and the last.
    let step = (data.len() / 16).max(1);
    for n in (0..data.len())
        .step_by(step)
        .chain(data.len().checked_sub(1))
    {
        let early = parse_client_hello(&data[..n]);
        assert!(
            early == Hello::NeedMore || early == hello,
            "{n} bytes decided {early:?}, {} bytes {hello:?}",
            data.len()
        );
    }
    match hello {
        Hello::NeedMore => None,
        Hello::ServerName(n) => {
            assert!(
                !n.is_empty()
                    && n.bytes().all(|b| b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || matches!(b, b'-' | b'_' | b'.')),
                "server name {n:?}"
            );
            Some(Some(n))
        }
        Hello::NoServerName | Hello::NotTls => Some(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hello_reads_the_checked_in_seeds() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/client_hello");
        let seed = |name: &str| std::fs::read(dir.join(name)).unwrap();
        let sni = seed("tls13-sni");
        assert_eq!(client_hello(&sni), Some(Some("api.example".into())));
        assert_eq!(client_hello(&sni[..sni.len() / 2]), None);
        assert_eq!(client_hello(&seed("tls12-ip-no-sni")), Some(None));
        assert_eq!(client_hello(&seed("plain-http")), Some(None));
    }

    #[test]
    fn admin_body_runs_the_handlers_parsers() {
        let ok = br#"{"address":"127.0.0.1","port":9001,"weight":3}"#;
        assert_eq!(admin_body(AdminBody::Register, "api", "a-1", ok), Ok(()));
        let e = admin_body(AdminBody::Register, "api", "a-1", br#"{"port":9001}"#);
        assert!(e.is_err_and(|e| e.contains("address")));
        let e = admin_body(AdminBody::Register, "api", "a/1", ok);
        assert!(e.is_err(), "an id with a slash is refused");
        let h = admin_body(AdminBody::Health, "api", "a-1", br#"{"health_score":1.5}"#);
        assert!(h.is_err_and(|e| e.contains("health")));
        let s = admin_body(AdminBody::Strategy, "api", "a-1", br#"{"strategy":"p2c"}"#);
        assert_eq!(s, Ok(()));
    }

    #[test]
    fn state_file_parses_what_load_reads() {
        assert_eq!(state_file(r#"{"version":1}"#), Ok(()));
        assert!(state_file(r#"{"version":2}"#).is_err_and(|e| e.contains("version")));
        assert!(state_file("{ not json").is_err());
    }
}
