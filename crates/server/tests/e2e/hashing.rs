//! `consistent_hash` with a `hash_key` through the real binary: one key
//! keeps its backend, keys spread, a dead backend moves only its own keys;
//! cookie, query and TCP `client_ip` keys; `check` and the admin API refuse
//! `consistent_hash` without a key.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// The backend that answered a GET of `path` with `headers`.
async fn who(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> String {
    let (status, body) = request(addr, "GET", path, headers, String::new()).await;
    assert_eq!(status, 200, "{path} {headers:?}: {body}");
    body
}

/// The backends that answered `n` requests keyed `x-user: key`.
async fn backends_for(addr: SocketAddr, key: &str, n: usize) -> HashSet<String> {
    let mut seen = HashSet::new();
    for _ in 0..n {
        seen.insert(who(addr, "/", &[("x-user", key)]).await);
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_key_sticks_spreads_and_moves_only_with_its_backend() {
    let (a, b, c) = three_backends().await;
    let backends: HashMap<&str, &Arc<Backend>> = [("a", &a), ("b", &b), ("c", &c)].into();
    let lb = Lb::start(&http_config(
        "strategy = \"consistent_hash\"\nhash_key = \"header:x-user\"",
        &[&a, &b, &c],
        &[1, 1, 1],
    ));
    let addr = lb.addr("web");

    let one = backends_for(addr, "alice", 1000).await;
    assert_eq!(one.len(), 1, "1,000 requests of one key hit {one:?}");
    let alice = one.into_iter().next().unwrap();

    let mut placed: HashMap<String, String> = HashMap::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for i in 0..1000 {
        let key = format!("user-{i}");
        let got = who(addr, "/", &[("x-user", &key)]).await;
        *counts.entry(got.clone()).or_default() += 1;
        placed.insert(key, got);
    }
    for name in ["a", "b", "c"] {
        let n = counts.get(name).copied().unwrap_or(0);
        assert!(
            (250..=417).contains(&n),
            "{name} got {n} of 1,000 keys, want a third ± 25 %: {counts:?}"
        );
    }

    // Stop alice's backend; once its breaker is open, only its keys move.
    backends[alice.as_str()].kill().await;
    lb.wait_log(
        "the killed backend's breaker opening",
        Duration::from_secs(10),
        |v| v["instance"] == alice.as_str() && v["to"] == "open",
    )
    .await;
    let moved = backends_for(addr, "alice", 50).await;
    assert_eq!(
        moved.len(),
        1,
        "alice moves to one other backend: {moved:?}"
    );
    assert!(!moved.contains(&alice), "alice still on the dead {alice}");
    let (mut stayed, mut left) = (0, 0);
    for (key, before) in placed.iter().take(300) {
        let now = who(addr, "/", &[("x-user", key)]).await;
        if *before == alice {
            assert_ne!(now, alice, "{key} still on the dead backend");
            left += 1;
        } else {
            assert_eq!(&now, before, "{key} moved though its backend lives");
            stayed += 1;
        }
    }
    assert!(
        left > 0 && stayed > 0,
        "sample covers both: {left} / {stayed}"
    );
}

/// Two services on the three backends: `/q` hashed on the `user` query
/// parameter, `/` on the `sid` cookie; a third without a key.
fn cookie_and_query_config(backends: &[&Arc<Backend>]) -> String {
    format!(
        r#"[[listener]]
name = "web"
listen = "127.0.0.1:0"
[[listener.route]]
path_prefix = "/q"
service = "q"
[[listener.route]]
path_prefix = "/plain"
service = "plain"
[[listener.route]]
path_prefix = "/"
service = "c"
[service.q]
strategy = "consistent_hash"
hash_key = "query:user"
[service.q.health_check]
kind = "none"
[service.c]
strategy = "consistent_hash"
hash_key = "cookie:sid"
[service.c.health_check]
kind = "none"
[service.plain]
strategy = "round_robin"
[service.plain.health_check]
kind = "none"
{}{}{}"#,
        instances("q", backends, &[]),
        instances("c", backends, &[]),
        instances("plain", backends, &[]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_and_query_keys_stick_and_the_admin_api_needs_a_key() {
    let (a, b, c) = three_backends().await;
    let lb = Lb::start(&cookie_and_query_config(&[&a, &b, &c]));
    let addr = lb.addr("web");
    for (path, headers) in [
        ("/q/items?x=1&user=alice", vec![]),
        ("/cart", vec![("cookie", "theme=dark; sid=s-42")]),
    ] {
        let mut seen = HashSet::new();
        for _ in 0..60 {
            seen.insert(who(addr, path, &headers).await);
        }
        assert_eq!(seen.len(), 1, "{path} {headers:?} hit {seen:?}");
    }
    // Different keys of the same kind do reach different backends.
    let mut seen = HashSet::new();
    for i in 0..60 {
        seen.insert(who(addr, &format!("/q?user=u{i}"), &[]).await);
    }
    assert_eq!(seen.len(), 3, "60 query keys reach all three: {seen:?}");

    let admin_addr = lb.addr("admin");
    let body = Some(r#"{"strategy":"consistent_hash"}"#.to_owned());
    let (status, text) = admin(
        admin_addr,
        "PUT",
        "/v1/services/plain/strategy",
        None,
        body.clone(),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("hash_key"), "{text}");
    let (status, text) = admin(admin_addr, "PUT", "/v1/services/c/strategy", None, body).await;
    assert_eq!(status, 200, "a service with a hash_key may switch: {text}");
}

/// One HTTP/1.1 exchange over a fresh TCP connection; the body.
async fn tcp_who(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    resp.rsplit("\r\n\r\n").next().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_on_a_tcp_listener_keeps_one_client_on_one_backend() {
    let (a, b, c) = three_backends().await;
    let lb = Lb::start(&format!(
        r#"[[listener]]
name = "raw"
listen = "127.0.0.1:0"
protocol = "tcp"
service = "api"
[service.api]
strategy = "consistent_hash"
hash_key = "client_ip"
[service.api.health_check]
kind = "tcp"
{}"#,
        instances("api", &[&a, &b, &c], &[])
    ));
    let addr = lb.addr("raw");
    let mut seen = HashSet::new();
    for _ in 0..40 {
        seen.insert(tcp_who(addr).await);
    }
    assert_eq!(seen.len(), 1, "40 connections from 127.0.0.1 hit {seen:?}");
}

#[test]
fn check_refuses_consistent_hash_without_a_key_and_http_keys_on_tcp() {
    let base = "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nservice = \"api\"\n[service.api]\nstrategy = \"consistent_hash\"\n";
    let (code, stderr) = check_config(base);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("line 7: service.api.hash_key"), "{stderr}");

    let (code, stderr) = check_config(&format!("{base}hash_key = \"body:x\"\n"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("line 8: service.api.hash_key"), "{stderr}");

    let (code, stdout) = check_config(&format!("{base}hash_key = \"header:X-User\"\n"));
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("  hash_key header:x-user\n"), "{stdout}");

    let tcp = "[[listener]]\nname = \"raw\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nservice = \"api\"\n[service.api]\nstrategy = \"consistent_hash\"\nhash_key = \"header:x-user\"\n";
    let (code, stderr) = check_config(tcp);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("line 8: service.api.hash_key") && stderr.contains("client_ip"),
        "{stderr}"
    );
    let (code, stderr) = check_config(&tcp.replace("header:x-user", "client_ip"));
    assert_eq!(code, Some(0), "{stderr}");
}
