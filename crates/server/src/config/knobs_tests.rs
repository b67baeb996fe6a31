//! The tuning knobs of issue 15: defaults equal the old constants, every bad
//! value is reported at its key and line, and the parsed values drive the
//! core's breaker on a manual clock.

use std::time::Duration;

use datapunk_lb_core::breaker::Admission;
use datapunk_lb_core::{CircuitBreaker, CircuitState, Clock, ManualClock};

use super::*;

use super::tests::BASE;

/// `BASE` with `extra` lines right after `[service.api]` (line 7 onwards).
pub(super) fn with(extra: &str) -> Result<Config, ConfigErrors> {
    Config::parse(&BASE.replace("[service.api]\n", &format!("[service.api]\n{extra}")))
}

pub(super) fn api(extra: &str) -> ServiceConfig {
    match with(extra) {
        Ok(c) => c.services["api"].clone(),
        Err(e) => panic!("rejected: {e}"),
    }
}

pub(super) fn error_of(extra: &str) -> String {
    match with(extra) {
        Ok(_) => panic!("accepted: {extra}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_are_the_values_that_were_fixed_in_code() {
    let s = api("");
    let b = &s.balancing.breaker;
    assert_eq!(b, &BreakerConfig::default());
    assert_eq!(b.open_base, Duration::from_secs(5));
    assert_eq!(b.open_max, Duration::from_secs(120));
    assert_eq!(b.failure_rate_threshold, 0.5);
    assert_eq!(b.failure_rate_window, Duration::from_secs(10));
    assert_eq!(b.failure_rate_min_requests, 20);
    assert_eq!(b.half_open_max_probes, 1);
    assert_eq!(s.retry_budget.percent, 20);
    assert_eq!(s.retry_budget.min_per_second, 10);
    assert_eq!(
        s.health_check.backoff_max,
        Duration::from_secs(40),
        "8 × 5 s"
    );
    let HealthCheckKind::Http { host, expected, .. } = &s.health_check.kind else {
        panic!("http by default");
    };
    assert_eq!(host, &None);
    assert!(expected.contains(200) && expected.contains(299));
    assert!(!expected.contains(199) && !expected.contains(301));
    // The cap follows the interval: 8 × 10 s is over 60 s; 2 min is over both.
    let s = api("[service.api.health_check]\ninterval = \"10s\"\n");
    assert_eq!(s.health_check.backoff_max, Duration::from_secs(60));
    let s = api("[service.api.health_check]\ninterval = \"2m\"\ntimeout = \"1s\"\n");
    assert_eq!(s.health_check.backoff_max, Duration::from_secs(120));
}

#[test]
fn every_knob_is_read() {
    let s = api(r#"retry_budget_percent = 35
retry_budget_min_per_second = 4
metrics_instance_series_limit = 50
[service.api.breaker]
open_base = "2s"
open_max = "30s"
open_jitter = 0.1
failure_rate = 0.25
failure_rate_window = "20s"
min_requests = 7
half_open_probes = 3
[service.api.health_check]
backoff_max = "12s"
expected_statuses = ["200-299", "404"]
host = "api.internal"
"#);
    let b = &s.balancing.breaker;
    assert_eq!(
        (b.open_base, b.open_max, b.open_jitter),
        (Duration::from_secs(2), Duration::from_secs(30), 0.1)
    );
    assert_eq!(b.failure_rate_threshold, 0.25);
    assert_eq!(b.failure_rate_window, Duration::from_secs(20));
    assert_eq!(
        (b.failure_rate_min_requests, b.half_open_max_probes),
        (7, 3)
    );
    assert_eq!(
        (s.retry_budget.percent, s.retry_budget.min_per_second),
        (35, 4)
    );
    assert_eq!(s.metrics_instance_series_limit, 50);
    assert_eq!(
        api("").metrics_instance_series_limit,
        super::DEFAULT_METRICS_INSTANCE_SERIES_LIMIT
    );
    assert_eq!(s.health_check.backoff_max, Duration::from_secs(12));
    let HealthCheckKind::Http { host, expected, .. } = &s.health_check.kind else {
        panic!("http by default");
    };
    assert_eq!(host.as_deref(), Some("api.internal"));
    assert!(expected.contains(404) && expected.contains(204) && !expected.contains(403));
    assert_eq!(expected.to_string(), "200-299,404");
}

#[test]
fn each_bad_knob_is_reported_at_its_key_and_line() {
    // (lines after [service.api], expected "line N: key: ...")
    let cases: &[(&str, &str)] = &[
        (
            "retry_budget_percent = 101\n",
            "line 7: service.api.retry_budget_percent: must be in 0..=100",
        ),
        (
            "retry_budget_min_per_second = -1\n",
            "line 7: service.api.retry_budget_min_per_second",
        ),
        (
            "metrics_instance_series_limit = -5\n",
            "line 7: service.api.metrics_instance_series_limit: must be in 0..=10000000",
        ),
        (
            "[service.api.breaker]\nopen_base = \"0s\"\n",
            "line 8: service.api.breaker.open_base: must be greater than 0",
        ),
        (
            "[service.api.breaker]\nopen_base = \"soon\"\n",
            "line 8: service.api.breaker.open_base: invalid duration",
        ),
        (
            "[service.api.breaker]\nopen_base = \"1m\"\nopen_max = \"30s\"\n",
            "line 9: service.api.breaker.open_max: 30s is shorter than open_base 1m",
        ),
        (
            "[service.api.breaker]\nopen_base = \"5m\"\n",
            "line 8: service.api.breaker.open_max: 2m is shorter than open_base 5m",
        ),
        (
            "[service.api.breaker]\nopen_jitter = 1.0\n",
            "line 8: service.api.breaker.open_jitter: must be in [0, 1)",
        ),
        (
            "[service.api.breaker]\nfailure_rate = 0.0\n",
            "line 8: service.api.breaker.failure_rate: must be in (0, 1]",
        ),
        (
            "[service.api.breaker]\nfailure_rate = 1.5\n",
            "line 8: service.api.breaker.failure_rate",
        ),
        (
            "[service.api.breaker]\nfailure_rate = nan\n",
            "line 8: service.api.breaker.failure_rate",
        ),
        (
            "[service.api.breaker]\nfailure_rate_window = \"0s\"\n",
            "line 8: service.api.breaker.failure_rate_window: must be greater than 0",
        ),
        (
            "[service.api.breaker]\nmin_requests = 0\n",
            "line 8: service.api.breaker.min_requests: must be in 1..=1000000",
        ),
        (
            "[service.api.breaker]\nhalf_open_probes = 0\n",
            "line 8: service.api.breaker.half_open_probes: must be in 1..=1000",
        ),
        (
            "[service.api.breaker]\nerror_threshold = 3\n",
            "line 8: error_threshold: unknown field",
        ),
        (
            "[service.api.health_check]\nbackoff_max = \"1s\"\n",
            "line 8: service.api.health_check.backoff_max: 1s is shorter than the interval 5s",
        ),
        (
            "[service.api.health_check]\nexpected_statuses = []\n",
            "line 8: service.api.health_check.expected_statuses: must not be empty",
        ),
        (
            "[service.api.health_check]\nexpected_statuses = [\"2xx\"]\n",
            "line 8: service.api.health_check.expected_statuses: \"2xx\": expected a status code",
        ),
        (
            "[service.api.health_check]\nexpected_statuses = [\"399-200\"]\n",
            "line 8: service.api.health_check.expected_statuses: \"399-200\": range runs backwards",
        ),
        (
            "[service.api.health_check]\nexpected_statuses = [\"600\"]\n",
            "line 8: service.api.health_check.expected_statuses",
        ),
        (
            "[service.api.health_check]\nhost = \"a b\"\n",
            "line 8: service.api.health_check.host",
        ),
        (
            "[service.api.health_check]\nkind = \"tcp\"\nhost = \"a\"\n",
            "line 9: service.api.health_check.host: only for kind = \"http\"",
        ),
    ];
    for (extra, want) in cases {
        let e = error_of(extra);
        assert!(e.contains(want), "{extra:?}: want {want:?}, got {e}");
    }
}

/// The parsed windows reach the breaker: open for `open_base`, then
/// doubling up to `open_max`; the rate trips at `failure_rate` once
/// `min_requests` were seen; `half_open_probes` probes at once.
#[test]
fn parsed_breaker_knobs_drive_the_core_breaker_on_a_manual_clock() {
    let s = api(r#"error_threshold = 1000
[service.api.breaker]
open_base = "2s"
open_max = "6s"
open_jitter = 0.0
failure_rate = 0.25
failure_rate_window = "20s"
min_requests = 8
half_open_probes = 2
"#);
    let cfg = &s.balancing.breaker;
    let clock = ManualClock::new();

    // Outcomes older than failure_rate_window do not count.
    let mut b = CircuitBreaker::new();
    for _ in 0..7 {
        assert_eq!(
            b.on_failure(clock.now(), cfg, 0.0),
            None,
            "7 < min_requests"
        );
    }
    clock.advance(Duration::from_secs(20));
    assert_eq!(
        b.on_failure(clock.now(), cfg, 0.0),
        None,
        "a new window: 1 outcome"
    );

    let mut b = CircuitBreaker::new();
    // 6 successes + 1 failure: 7 outcomes, under min_requests.
    for _ in 0..6 {
        assert_eq!(b.on_success(clock.now(), cfg), None);
    }
    assert_eq!(
        b.on_failure(clock.now(), cfg, 0.0),
        None,
        "7 < min_requests"
    );
    // The 8th outcome, a failure: 2 of 8 = 25 % ≥ failure_rate.
    let t = b
        .on_failure(clock.now(), cfg, 0.0)
        .expect("2 of 8 failed: the rate trips");
    assert_eq!(t.to, CircuitState::Open);
    assert_eq!(t.open_for, Some(Duration::from_secs(2)), "open_base");

    let mut windows = vec![];
    for _ in 0..3 {
        let left = b.open_until().saturating_since(clock.now());
        clock.advance(left - Duration::from_millis(1));
        assert!(
            matches!(b.try_admit(clock.now(), cfg), Admission::Rejected),
            "still open 1 ms before the window ends"
        );
        clock.advance(Duration::from_millis(1));
        // Two probes are admitted at once, a third is not.
        for i in 0..2 {
            assert!(
                matches!(b.try_admit(clock.now(), cfg), Admission::Probe(_)),
                "probe {i} of half_open_probes = 2"
            );
        }
        assert!(matches!(b.try_admit(clock.now(), cfg), Admission::Rejected));
        b.release_probe();
        b.release_probe();
        let t = b
            .on_failure(clock.now(), cfg, 0.0)
            .expect("a failed probe reopens");
        windows.push(t.open_for);
    }
    let secs = |n| Some(Duration::from_secs(n));
    assert_eq!(
        windows,
        vec![secs(4), secs(6), secs(6)],
        "doubling, capped at open_max"
    );
}

#[test]
fn upgrade_idle_timeout_defaults_to_an_hour_and_rejects_zero_at_its_line() {
    assert_eq!(api("").upgrade_idle_timeout, Duration::from_secs(3600));
    assert_eq!(
        api("upgrade_idle_timeout = \"90s\"\n").upgrade_idle_timeout,
        Duration::from_secs(90)
    );
    for (value, want) in [
        ("\"0s\"", "must be greater than 0"),
        ("\"soon\"", "invalid duration"),
    ] {
        let err = error_of(&format!("upgrade_idle_timeout = {value}\n"));
        assert!(
            err.contains(&format!("line 7: service.api.upgrade_idle_timeout: {want}")),
            "{err}"
        );
    }
}

#[test]
fn upstream_protocol_and_host_header_parse_strictly() {
    let d = api("");
    assert_eq!(
        (d.upstream_protocol, d.host_header),
        (UpstreamProtocol::Http1, HostHeader::Preserve)
    );
    let s = api("upstream_protocol = \"h2c\"\nhost_header = \"instance\"\n");
    assert_eq!(
        (s.upstream_protocol, s.host_header),
        (UpstreamProtocol::H2c, HostHeader::Instance)
    );
    assert_eq!(
        api("upstream_protocol = \"auto\"\n").upstream_protocol,
        UpstreamProtocol::Auto
    );
    let e = error_of("upstream_protocol = \"http2\"\n");
    assert!(
        e.contains(
            "line 7: service.api.upstream_protocol: \"http2\" is not one of \"http1\", \"h2c\", \"auto\""
        ),
        "{e}"
    );
    let e = error_of("\nhost_header = \"Preserve\"\n");
    assert!(
        e.contains("line 8: service.api.host_header: \"Preserve\" is not one of \"preserve\", \"instance\""),
        "{e}"
    );
}
