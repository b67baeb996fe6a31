//! The client-side limits of a listener and the per-try and response
//! timeouts of a service: defaults, every key read, bad values reported at
//! their key and line, and `check` prints them.

use std::time::Duration;

use super::knobs_tests::{api, error_of, with};
use super::tests::BASE;
use super::*;

/// `BASE` with `extra` lines right after `listen = …` of the listener (line
/// 4 onwards).
fn listener(extra: &str) -> Result<Config, ConfigErrors> {
    Config::parse(&BASE.replace(
        "listen = \"127.0.0.1:8080\"\n",
        &format!("listen = \"127.0.0.1:8080\"\n{extra}"),
    ))
}

#[test]
fn defaults_and_every_key_read() {
    let c = listener("").unwrap();
    let l = &c.listeners[0].limits;
    assert_eq!(l.header_read_timeout, Duration::from_secs(10));
    assert_eq!(l.idle_timeout, Duration::from_secs(60));
    assert_eq!(l.request_body_timeout, Duration::from_secs(30));
    assert_eq!(l.max_connections, 100_000);
    let s = api("");
    assert_eq!(s.per_try_timeout, None);
    assert_eq!(s.response_idle_timeout, Duration::from_secs(300));

    let c = listener(
        "header_read_timeout = \"2s\"\nidle_timeout = \"3s\"\nrequest_body_timeout = \"4s\"\nmax_connections = 5\n",
    )
    .unwrap();
    let l = &c.listeners[0].limits;
    assert_eq!(
        (
            l.header_read_timeout,
            l.idle_timeout,
            l.request_body_timeout,
            l.max_connections
        ),
        (
            Duration::from_secs(2),
            Duration::from_secs(3),
            Duration::from_secs(4),
            5
        )
    );
    let s = api("per_try_timeout = \"250ms\"\nresponse_idle_timeout = \"7s\"\n");
    assert_eq!(s.per_try_timeout, Some(Duration::from_millis(250)));
    assert_eq!(s.response_idle_timeout, Duration::from_secs(7));
}

#[test]
fn bad_values_are_reported_at_their_key_and_line() {
    for (extra, want) in [
        (
            "header_read_timeout = \"0s\"\n",
            "line 4: listener[0].header_read_timeout: must be greater than 0",
        ),
        (
            "idle_timeout = \"later\"\n",
            "line 4: listener[0].idle_timeout: invalid duration",
        ),
        (
            "request_body_timeout = \"0ms\"\n",
            "line 4: listener[0].request_body_timeout: must be greater than 0",
        ),
        (
            "max_connections = 0\n",
            "line 4: listener[0].max_connections: must be in 1..=1000000",
        ),
    ] {
        let e = listener(extra).unwrap_err().to_string();
        assert!(e.contains(want), "{extra}: {e}");
    }
    for (extra, want) in [
        (
            "per_try_timeout = \"0s\"\n",
            "line 7: service.api.per_try_timeout: must be greater than 0",
        ),
        (
            "response_idle_timeout = \"0s\"\n",
            "line 7: service.api.response_idle_timeout: must be greater than 0",
        ),
        (
            "per_try_timeout = \"x\"\n",
            "line 7: service.api.per_try_timeout: invalid duration",
        ),
    ] {
        let e = error_of(extra);
        assert!(e.contains(want), "{extra}: {e}");
    }
    assert!(with("per_try_timeout = \"1s\"\n").is_ok());
}

#[test]
fn a_tcp_listener_takes_max_connections_but_not_the_http_timeouts() {
    let tcp = |extra: &str| {
        Config::parse(&format!(
            "[[listener]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nservice = \"api\"\n{extra}[service.api]\n"
        ))
    };
    assert_eq!(
        tcp("max_connections = 7\n").unwrap().listeners[0]
            .limits
            .max_connections,
        7
    );
    let e = tcp("idle_timeout = \"5s\"\n").unwrap_err().to_string();
    assert!(
        e.contains("line 6: listener[0].idle_timeout: only for an http listener"),
        "{e}"
    );
    // Plain TCP has no head to time; a `tls` listener's handshake and a
    // passthrough's ClientHello do (the e2e `tls` and `sni` tests).
    let e = tcp("header_read_timeout = \"5s\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("line 6: listener[0].header_read_timeout: only for an http listener"),
        "{e}"
    );
}

#[test]
fn check_prints_the_limits_in_effect() {
    let s = listener("").unwrap().summary();
    assert!(
        s.contains("  header_read_timeout 10s, idle_timeout 1m, request_body_timeout 30s, max_connections 100000"),
        "{s}"
    );
    assert!(
        s.contains("  per_try_timeout none, response_idle_timeout 5m"),
        "{s}"
    );
    let s = with("per_try_timeout = \"500ms\"\n").unwrap().summary();
    assert!(s.contains("  per_try_timeout 500ms,"), "{s}");
}
