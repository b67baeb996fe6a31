//! Proxying: shares, HTTP/2 and gRPC, TCP, error statuses, bad requests.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_splits_exactly_and_weights_hold() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    // No active checks: a probe timing out on a loaded machine would halve
    // an instance's health score, and round robin admits in proportion to
    // it. The split is what is tested here, not the checks.
    let config = without_checks(&http_config(
        "strategy = \"round_robin\"",
        &[&a, &b, &c],
        &[1, 1, 1],
    ));
    let exact = HashMap::from([("a".into(), 100), ("b".into(), 100), ("c".into(), 100)]);
    // One connection is served by one worker thread, whose rotation is
    // exact.
    let lb = Lb::start(&config);
    let mut one = OneConnection::open(lb.addr("web")).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        let (status, body) = one.get("/x").await.unwrap();
        assert_eq!(status, 200);
        *counts.entry(body).or_default() += 1;
    }
    assert_eq!(counts, exact, "one connection");

    // A connection per request, spread by the kernel over two workers that
    // rotate each on its own: every instance within T·(n − 1)/n = 4/3 of
    // its exact share (the bound in the core's `round_robin` doc), so
    // 99-101 (a random pick would miss that by ~8).
    let lb = Lb::start_with(&config, &["--threads", "2"]);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        let (status, body) = OneConnection::open(lb.addr("web"))
            .await
            .get("/x")
            .await
            .unwrap();
        assert_eq!(status, 200);
        *counts.entry(body).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        counts.values().all(|&k| (99..=101).contains(&k)),
        "a connection each over two workers: {counts:?}"
    );

    let client = client();
    let (d, e) = (Backend::start("d").await, Backend::start("e").await);
    let lb = Lb::start(&without_checks(&http_config(
        "strategy = \"weighted\"",
        &[&d, &e],
        &[3, 1],
    )));
    let mut d_count = 0;
    let n = 400;
    for _ in 0..n {
        let (_, body) = get(&client, lb.addr("web"), "/").await.unwrap();
        d_count += usize::from(body == "d");
    }
    let share = d_count as f64 / n as f64;
    assert!((share - 0.75).abs() <= 0.03, "weights 3:1 gave {share}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_reaches_the_backend_as_http2() {
    let a = Backend::start("a").await;
    let lb = Lb::start(&http_config("upstream_protocol = \"auto\"", &[&a], &[1]));
    let (status, body) = get(&h2_client(), lb.addr("web"), "/h2").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "a"));
    let versions = a.state.versions.lock().clone();
    assert!(
        versions.contains(&hyper::Version::HTTP_2),
        "backend saw {versions:?}"
    );
    // And HTTP/1.1 stays HTTP/1.1.
    get(&client(), lb.addr("web"), "/h1").await.unwrap();
    assert_eq!(
        a.state.versions.lock().last(),
        Some(&hyper::Version::HTTP_11)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_call_passes_status_trailers() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let port = grpc_health_backend().await;
    let config = format!(
        r#"[[listener]]
name = "web"
listen = "127.0.0.1:0"
[[listener.route]]
service = "grpc"
[service.grpc]
upstream_protocol = "h2c"
[service.grpc.health_check]
kind = "tcp"
[[service.grpc.instance]]
id = "g1"
address = "127.0.0.1"
port = {port}
"#
    );
    let lb = Lb::start(&config);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", lb.addr("web")))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let ok = client
        .check(HealthCheckRequest {
            service: "datapunk.Ok".into(),
        })
        .await
        .unwrap();
    assert_eq!(ok.into_inner().status, ServingStatus::Serving as i32);
    let err = client
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::NotFound,
        "grpc-status from the backend's trailers: {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_echoes_one_mebibyte_intact() {
    let port = echo_server().await;
    let config = format!(
        r#"[[listener]]
name = "raw"
listen = "127.0.0.1:0"
protocol = "tcp"
service = "echo"
[service.echo]
[service.echo.health_check]
kind = "tcp"
[[service.echo.instance]]
id = "e1"
address = "127.0.0.1"
port = {port}
"#
    );
    let lb = Lb::start(&config);
    let data: Vec<u8> = (0..1024 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    let stream = TcpStream::connect(lb.addr("raw")).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let payload = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_unreachable_and_limits_get_504_502_503() {
    let slow = Backend::start("slow").await;
    slow.set_delay(Duration::from_secs(3));
    let extra = "request_timeout = \"300ms\"\nretries = 0\nmax_connections = 1";
    let lb = Lb::start(&http_config(extra, &[&slow], &[1]));
    let c = client();
    let t = Instant::now();
    let (status, body) = get(&c, lb.addr("web"), "/").await.unwrap();
    assert_eq!(status, 504, "{body}");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "504 took {:?}",
        t.elapsed()
    );

    // max_connections = 1: the second concurrent request gets 503 at once.
    // A node whose request timeout leaves the first request room on a
    // loaded machine (it has 300 ms above, its answer takes 1 s here), and
    // the second sent once the backend has the first, not after a guess.
    let lb = Lb::start(&http_config(
        "request_timeout = \"10s\"\nretries = 0\nmax_connections = 1",
        &[&slow],
        &[1],
    ));
    slow.set_delay(Duration::from_millis(1000));
    let addr = lb.addr("web");
    let hits = slow.state.hits.load(std::sync::atomic::Ordering::SeqCst);
    let first = tokio::spawn(async move { get(&client(), addr, "/first").await });
    let t = Instant::now();
    while slow.state.hits.load(std::sync::atomic::Ordering::SeqCst) == hits {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "/first never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    let (status, body) = get(&c, addr, "/second").await.unwrap();
    let took = t.elapsed();
    assert_eq!(status, 503, "{body}");
    // Not queued behind the first (whose answer takes 1 s).
    assert!(took < Duration::from_millis(900), "503 took {took:?}");
    assert_eq!(first.await.unwrap().unwrap().0, 200);

    // All instances down → 502 (before the breaker opens) or 503 (after).
    let gone = Backend::start("gone").await;
    gone.kill().await;
    let lb = Lb::start(&http_config("", &[&gone], &[1]));
    let (status, body) = get(&c, lb.addr("web"), "/").await.unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("could be reached"), "{body}");
}

async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_or_431_and_the_proxy_keeps_serving() {
    let a = Backend::start("a").await;
    let lb = Lb::start(&http_config("", &[&a], &[1]));
    let addr = lb.addr("web");
    let r = raw(addr, b"GARBAGE\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 400"),
        "malformed request line: {r:?}"
    );
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let r = raw(addr, huge.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431"), "oversized headers: {r:?}");
    let r = raw(
        addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 400"),
        "invalid chunked encoding: {r:?}"
    );
    let (status, body) = get(&client(), addr, "/").await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "a"),
        "the proxy keeps serving"
    );
}
