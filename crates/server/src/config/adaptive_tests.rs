//! `[service.NAME.adaptive]`: defaults are the core's constants, every key
//! is read, every bad value is reported at its key and line, and `check`
//! prints the effective values.

use std::time::Duration;

use datapunk_lb_core::strategy::adaptive::{
    CONCURRENCY_ENTER, CONCURRENCY_LEAVE, ERROR_ENTER, ERROR_LEAVE, EVAL_INTERVAL, MIN_DWELL,
    SPREAD_ENTER, SPREAD_LEAVE,
};

use super::knobs_tests::{api, error_of, with};
use super::*;

#[test]
fn defaults_equal_the_constants() {
    let a = api("").balancing.adaptive;
    assert_eq!(a, AdaptiveConfig::default());
    assert_eq!(
        (a.eval_interval, a.min_dwell),
        (EVAL_INTERVAL, MIN_DWELL),
        "1 s / 5 s"
    );
    assert_eq!(
        (a.spread_enter, a.spread_leave),
        (SPREAD_ENTER, SPREAD_LEAVE)
    );
    assert_eq!(
        (a.error_rate_enter, a.error_rate_leave),
        (ERROR_ENTER, ERROR_LEAVE)
    );
    assert_eq!(
        (a.concurrency_enter, a.concurrency_leave),
        (CONCURRENCY_ENTER, CONCURRENCY_LEAVE)
    );
    assert_eq!(
        (SPREAD_ENTER, ERROR_ENTER, CONCURRENCY_ENTER),
        (2.0, 0.05, 2.0)
    );
}

#[test]
fn every_adaptive_key_is_read() {
    let a = api(r#"[service.api.adaptive]
eval_interval = "500ms"
min_dwell = "10s"
spread_enter = 3.0
spread_leave = 2.5
error_rate_enter = 0.1
error_rate_leave = 0.05
concurrency_enter = 4.0
concurrency_leave = 3
"#)
    .balancing
    .adaptive;
    assert_eq!(
        a,
        AdaptiveConfig {
            eval_interval: Duration::from_millis(500),
            min_dwell: Duration::from_secs(10),
            spread_enter: 3.0,
            spread_leave: 2.5,
            error_rate_enter: 0.1,
            error_rate_leave: 0.05,
            concurrency_enter: 4.0,
            concurrency_leave: 3.0,
        }
    );
}

#[test]
fn each_bad_adaptive_key_is_reported_at_its_key_and_line() {
    let t = "[service.api.adaptive]\n";
    let cases: &[(&str, &str)] = &[
        (
            "eval_interval = \"0s\"\n",
            "line 8: service.api.adaptive.eval_interval: must be greater than 0",
        ),
        (
            "eval_interval = \"soon\"\n",
            "line 8: service.api.adaptive.eval_interval: invalid duration",
        ),
        (
            "min_dwell = \"often\"\n",
            "line 8: service.api.adaptive.min_dwell: invalid duration",
        ),
        (
            "eval_interval = \"2s\"\nmin_dwell = \"1s\"\n",
            "line 9: service.api.adaptive.min_dwell: 1s is shorter than eval_interval 2s",
        ),
        (
            // min_dwell left at 5 s: reported at the interval's line.
            "eval_interval = \"10s\"\n",
            "line 8: service.api.adaptive.min_dwell: 5s is shorter than eval_interval 10s",
        ),
        (
            "spread_enter = 1.0\n",
            "line 8: service.api.adaptive.spread_enter: must be greater than 1",
        ),
        (
            "spread_enter = 2.0\nspread_leave = 2.5\n",
            "line 9: service.api.adaptive.spread_leave: 2.5 is above spread_enter 2",
        ),
        (
            // spread_enter left at 2.0: reported at spread_leave's line.
            "spread_leave = 3.0\n",
            "line 8: service.api.adaptive.spread_leave: 3 is above spread_enter 2",
        ),
        (
            "error_rate_enter = 1.5\n",
            "line 8: service.api.adaptive.error_rate_enter: must be in (0, 1], got 1.5",
        ),
        (
            "error_rate_leave = 0.0\n",
            "line 8: service.api.adaptive.error_rate_leave: must be in (0, 1], got 0",
        ),
        (
            "error_rate_enter = nan\n",
            "line 8: service.api.adaptive.error_rate_enter: must be in (0, 1], got NaN",
        ),
        (
            "error_rate_enter = 0.01\n",
            "line 8: service.api.adaptive.error_rate_leave: 0.02 is above error_rate_enter 0.01",
        ),
        (
            "concurrency_enter = -1.0\n",
            "line 8: service.api.adaptive.concurrency_enter: must be greater than 0, got -1",
        ),
        (
            "concurrency_leave = inf\n",
            "line 8: service.api.adaptive.concurrency_leave: must be greater than 0, got inf",
        ),
        (
            "concurrency_enter = 1.0\nconcurrency_leave = 2.0\n",
            "line 9: service.api.adaptive.concurrency_leave: 2 is above concurrency_enter 1",
        ),
        (
            "spread_entry = 3.0\n",
            "line 8: spread_entry: unknown field",
        ),
        ("spread_enter = \"3\"\n", "line 8"),
    ];
    for (extra, want) in cases {
        let extra = format!("{t}{extra}");
        let e = error_of(&extra);
        assert!(e.contains(want), "{extra:?}: want {want:?}, got {e}");
    }
    // Every bad value at once, each at its own line.
    let e = error_of(&format!(
        "{t}eval_interval = \"0s\"\nspread_enter = 0.5\nerror_rate_leave = 2.0\nconcurrency_leave = 9.0\n"
    ));
    for want in [
        "line 8: service.api.adaptive.eval_interval",
        "line 9: service.api.adaptive.spread_enter",
        "line 10: service.api.adaptive.error_rate_leave",
        "line 11: service.api.adaptive.concurrency_leave",
    ] {
        assert!(e.contains(want), "want {want:?}, got {e}");
    }
}

#[test]
fn check_prints_the_effective_adaptive_values() {
    let out = match with("[service.api.adaptive]\nspread_enter = 3.0\nmin_dwell = \"10s\"\n") {
        Ok(c) => c.summary(),
        Err(e) => panic!("rejected: {e}"),
    };
    assert!(
        out.contains("adaptive: eval_interval 1s, min_dwell 10s, spread_enter 3, spread_leave 1.5, error_rate_enter 0.05, error_rate_leave 0.02, concurrency_enter 2, concurrency_leave 1"),
        "{out}"
    );
    // Not adaptive: the thresholds are not used, so not printed.
    let out = match with("strategy = \"p2c\"\n") {
        Ok(c) => c.summary(),
        Err(e) => panic!("rejected: {e}"),
    };
    assert!(!out.contains("adaptive:"), "{out}");
}
