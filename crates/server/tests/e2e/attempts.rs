//! The one attempt loop seen from a TCP listener: retries onto another
//! instance, `max_connections`, and the retry budget (HTTP's rules are
//! covered by `proxy.rs` and `failover.rs`).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// A port that refuses connections: bound, then closed.
async fn refusing_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

/// A TCP listener `raw` in front of service `echo` with `instances`
/// (id, port). No health checks and a breaker that does not open (neither
/// by consecutive failures nor by failure rate), so only
/// the attempt loop decides where connections go.
fn tcp_config(service_extra: &str, instances: &[(&str, u16)]) -> String {
    let blocks: String = instances
        .iter()
        .map(|(id, port)| {
            format!(
                "[[service.echo.instance]]\nid = \"{id}\"\naddress = \"127.0.0.1\"\nport = {port}\n"
            )
        })
        .collect();
    format!(
        r#"[[listener]]
name = "raw"
listen = "127.0.0.1:0"
protocol = "tcp"
service = "echo"
[service.echo]
strategy = "round_robin"
error_threshold = 1000
{service_extra}
[service.echo.breaker]
min_requests = 1000
[service.echo.health_check]
kind = "none"
{blocks}"#
    )
}

/// Sends `msg` on `s` and reads it back.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .expect("echo within 5 s")
        .unwrap();
    back
}

/// Whether the proxy closed `s` within `within` without sending a byte.
async fn closed_at_once(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(within, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// The sum of the samples of `/metrics` whose line starts with `name{` and
/// contains every one of `labels`; 0 when there is none.
async fn metric(lb: &Lb, name: &str, labels: &[&str]) -> f64 {
    let (status, text) = admin(lb.addr("admin"), "GET", "/metrics", None, None).await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next())
        .map(|v| v.parse::<f64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_retries_a_connect_failure_onto_another_instance() {
    let (dead, live) = (refusing_port().await, echo_server().await);
    let lb = Lb::start(&tcp_config(
        "retries = 1",
        &[("dead", dead), ("live", live)],
    ));
    // Round robin's rotation starts at the dead instance; after that it is
    // admitted less often as its health score falls (round robin is health
    // aware), so it sees at least the first attempt.
    for i in 0..6u8 {
        let mut s = TcpStream::connect(lb.addr("raw")).await.unwrap();
        assert_eq!(round_trip(&mut s, &[i; 8]).await, [i; 8], "connection {i}");
    }
    let refused = metric(
        &lb,
        "datapunk_lb_requests_total",
        &["instance=\"dead\"", "outcome=\"connect\""],
    )
    .await;
    let retries = metric(&lb, "datapunk_lb_retries_total", &["service=\"echo\""]).await;
    assert!(refused >= 1.0, "the dead instance refused {refused} times");
    assert_eq!(retries, refused, "each refusal was retried once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_over_max_connections_is_closed_at_once_and_counted() {
    let live = echo_server().await;
    let lb = Lb::start(&tcp_config("max_connections = 1", &[("live", live)]));
    let mut first = TcpStream::connect(lb.addr("raw")).await.unwrap();
    assert_eq!(round_trip(&mut first, b"one").await, b"one");

    let mut second = TcpStream::connect(lb.addr("raw")).await.unwrap();
    let t = Instant::now();
    assert!(
        closed_at_once(&mut second, Duration::from_secs(2)).await,
        "the second connection is over the limit"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    let over = metric(
        &lb,
        "datapunk_lb_requests_total",
        &["service=\"echo\"", "outcome=\"over_limit\""],
    )
    .await;
    assert_eq!(over, 1.0);

    // The first stays up, and its end frees the slot.
    assert_eq!(round_trip(&mut first, b"two").await, b"two");
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut third = TcpStream::connect(lb.addr("raw")).await.unwrap();
        if third.write_all(b"three").await.is_ok() {
            let mut back = [0u8; 5];
            let read = tokio::time::timeout(Duration::from_secs(2), third.read_exact(&mut back));
            if matches!(read.await, Ok(Ok(_))) {
                assert_eq!(&back, b"three");
                break;
            }
        }
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_retries_stop_when_the_retry_budget_is_spent() {
    let (a, b) = (refusing_port().await, refusing_port().await);
    let lb = Lb::start(&tcp_config("retries = 1", &[("a", a), ("b", b)]));
    const CONNECTIONS: usize = 100;
    let t = Instant::now();
    for i in 0..CONNECTIONS {
        let mut s = TcpStream::connect(lb.addr("raw")).await.unwrap();
        assert!(
            closed_at_once(&mut s, Duration::from_secs(2)).await,
            "connection {i} is closed: nothing answers"
        );
    }
    let secs = t.elapsed().as_secs_f64();
    let retries = metric(&lb, "datapunk_lb_retries_total", &["service=\"echo\""]).await;
    let refused = metric(&lb, "datapunk_lb_requests_total", &["outcome=\"connect\""]).await;
    // The budget: a floor of 10, 0.2 per connection, 10 per second while
    // below the floor. Without it every connection would retry once.
    let bound = 10.0 + 0.2 * CONNECTIONS as f64 + 10.0 * secs + 1.0;
    assert!(
        bound < CONNECTIONS as f64,
        "too slow ({secs:.1} s) to tell the budget apart"
    );
    assert!(
        (10.0..=bound).contains(&retries),
        "{retries} retries for {CONNECTIONS} connections in {secs:.2} s (bound {bound:.0})"
    );
    assert_eq!(
        refused,
        CONNECTIONS as f64 + retries,
        "every connection and every retry reached an instance"
    );
}

/// A body too large to buffer for a replay is streamed, sent once; but a
/// connect failure read nothing from it, so it still goes, whole, to
/// another instance (HAProxy retries a refused connect too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_post_with_a_streamed_body_whose_connect_fails_reaches_another_instance_whole() {
    // Over the 64 KiB replay limit: streamed, not buffered.
    posts_past_a_refusing_instance(&"x".repeat(100 * 1024)).await;
}

/// Issue 12: a POST is sent without a copy of its head (no retry may follow
/// once it reached an instance), yet a connect failure still moves it,
/// whole, to another instance: the head comes back from the unsent request,
/// Host and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_post_whose_connect_fails_reaches_another_instance_whole() {
    posts_past_a_refusing_instance("hello").await;
}

/// Six POSTs of `body` to a service of a refusing instance and a live one,
/// one retry allowed: each reaches the live instance once, whole, with
/// the client's Host, and the refusing one was tried.
async fn posts_past_a_refusing_instance(body: &str) {
    let dead = refusing_port().await;
    let live = Recorder::start("ok").await;
    let lb = Lb::start(&with_free_admin(&raw_config(
        "",
        "retries = 1\nerror_threshold = 1000\n[service.api.breaker]\nmin_requests = 1000",
        &[("dead", ([127, 0, 0, 1], dead).into()), ("live", live.addr)],
    )));
    for i in 0..6 {
        let (status, _, answer) = exchange(
            lb.addr("web"),
            "POST",
            "/submit",
            &[("host", "api.test"), ("x-order", &i.to_string())],
            body.to_owned(),
        )
        .await;
        assert_eq!((status, &answer[..]), (200, &b"ok"[..]), "POST {i}");
        assert_eq!(
            live.last("host"),
            ["api.test"],
            "POST {i}: the client's Host"
        );
        assert_eq!(live.last("x-order"), [i.to_string()], "POST {i}");
        assert_eq!(
            live.seen.lock().last().unwrap().body_len,
            body.len(),
            "POST {i}: the whole body"
        );
    }
    let refused = metric(
        &lb,
        "datapunk_lb_requests_total",
        &["instance=\"dead\"", "outcome=\"connect\""],
    )
    .await;
    assert!(refused >= 1.0, "the dead instance refused {refused} times");
    assert_eq!(
        live.seen.lock().len(),
        6,
        "each POST reached the live instance once"
    );
}
