//! Retries on timeouts and resets against the real binary: an idempotent
//! request whose instance stalls past `per_try_timeout` is retried on
//! another and answered within the per-try timeout plus the fast answer; a
//! POST is never sent twice, whether its instance stalled or reset after
//! reading it; a GET that met a reset is retried elsewhere.

use std::time::{Duration, Instant};

use crate::support::*;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// `method /` on `lb`'s `web` listener with a small body for POST; the
/// status and body.
async fn send(lb: &Lb, method: &str) -> (u16, String) {
    let body = if method == "POST" { "data" } else { "" };
    request(lb.addr("web"), method, "/", &[], body.to_owned()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_get_is_retried_within_the_per_try_timeout_and_a_post_is_not() {
    let slow = Backend::start("slow").await;
    let fast = Backend::start("fast").await;
    slow.set_delay(Duration::from_secs(10));
    let config = raw_config(
        "",
        // The per-try timeout applies to the retry on `fast` too: 1 s, so a
        // loaded machine answering late does not time the retry out; still
        // far from the 5 s a GET would wait without it.
        "request_timeout = \"5s\"\nper_try_timeout = \"1s\"\nretries = 1\nerror_threshold = 100",
        &[("slow", slow.addr), ("fast", fast.addr)],
    );
    let lb = Lb::start(&config);
    // Round robin over both: every GET meets the stalled instance in turn.
    for i in 0..4 {
        let t = Instant::now();
        let (status, body) = send(&lb, "GET").await;
        let took = t.elapsed();
        assert_eq!((status, body.as_str()), (200, "fast"), "GET {i}");
        // Within the per-try timeout plus the fast answer, with slack for a
        // loaded machine; without the per-try timeout it would be the 5 s
        // request timeout (and a 504).
        assert!(took < Duration::from_millis(3500), "GET {i} took {took:?}");
    }
    let slow_gets = slow.state.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert!(slow_gets >= 1, "the stalled instance was never tried");

    // Two POSTs: one meets each instance; the one that stalls is not
    // resent, so it ends with 504 and the fast instance sees only its own.
    // A fresh balancer: round robin admits an instance in proportion to its
    // health score, which the stalled GETs lowered, so with this one the
    // second POST might skip the stalled instance.
    drop(lb);
    let lb = Lb::start(&config);
    let before = (
        slow.state.hits.load(std::sync::atomic::Ordering::SeqCst),
        fast.state.hits.load(std::sync::atomic::Ordering::SeqCst),
    );
    let mut statuses = vec![send(&lb, "POST").await.0, send(&lb, "POST").await.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 504]);
    let after = (
        slow.state.hits.load(std::sync::atomic::Ordering::SeqCst),
        fast.state.hits.load(std::sync::atomic::Ordering::SeqCst),
    );
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 1),
        "each POST was sent once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_after_the_body_retries_a_get_elsewhere_but_never_a_post() {
    let reset = RawBackend::start(None).await;
    let ok = RawBackend::start(Some(OK)).await;
    let config = raw_config(
        "",
        "retries = 1\nerror_threshold = 100",
        &[("reset", reset.addr), ("ok", ok.addr)],
    );
    let lb = Lb::start(&config);
    for i in 0..4 {
        let (status, body) = send(&lb, "GET").await;
        assert_eq!((status, body.as_str()), (200, "ok"), "GET {i}");
    }
    assert!(reset.hits() >= 1, "the resetting instance was never tried");
    // A fresh balancer, whose round robin meets each instance once (the
    // resets above lowered the resetting instance's share).
    drop(lb);
    let lb = Lb::start(&config);
    let before = (reset.hits(), ok.hits());
    let mut statuses = vec![send(&lb, "POST").await.0, send(&lb, "POST").await.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 502]);
    assert_eq!(
        (reset.hits() - before.0, ok.hits() - before.1),
        (1, 1),
        "each POST was sent once"
    );
    // The reset instance read the whole body before it closed.
    let heads = reset.heads.lock().clone();
    assert!(heads.last().is_some_and(|h| h.starts_with("POST")));
}
