//! Forwarding headers and `X-Request-Id` through the real binary: what the
//! backend sees from an untrusted client (forged headers replaced) and from
//! a trusted proxy (client appended), and the request id kept, generated or
//! replaced, the same on both sides.

use crate::support::{exchange, get, h2_client, unchecked_service, Lb, Recorder};

/// A listener `web` (with `listener_extra`) routing everything to `api`,
/// whose one instance is `backend`.
fn config(listener_extra: &str, backend: &Recorder) -> String {
    format!(
        r#"[[listener]]
name = "web"
listen = "127.0.0.1:0"
{listener_extra}
[[listener.route]]
service = "api"
{}"#,
        unchecked_service("api", "a", backend.addr.port())
    )
}

const FORGED: [(&str, &str); 5] = [
    ("host", "shop.example"),
    ("x-forwarded-for", "6.6.6.6"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "evil.example"),
    ("forwarded", "for=6.6.6.6;proto=https"),
];

fn is_generated(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test]
async fn an_untrusted_client_gets_its_forwarding_headers_replaced() {
    let backend = Recorder::start("ok").await;
    let lb = Lb::start(&config("", &backend));
    let (status, _, _) = exchange(lb.addr("web"), "GET", "/", &FORGED, "").await;
    assert_eq!(status, 200);
    assert_eq!(backend.last("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(backend.last("x-forwarded-proto"), ["http"]);
    assert_eq!(backend.last("x-forwarded-host"), ["shop.example"]);
    assert_eq!(backend.last("forwarded"), Vec::<String>::new());
    assert_eq!(backend.last("host"), ["shop.example"]);

    // Naming them in Connection does not get them dropped either.
    let mut headers = FORGED.to_vec();
    headers.push(("connection", "x-forwarded-for, x-request-id"));
    exchange(lb.addr("web"), "GET", "/", &headers, "").await;
    assert_eq!(backend.last("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(backend.last("x-request-id").len(), 1);
}

#[tokio::test]
async fn a_trusted_proxy_gets_the_client_appended() {
    let backend = Recorder::start("ok").await;
    let lb = Lb::start(&config(
        "trusted_proxies = [\"127.0.0.0/8\"]\nforwarded_header = true",
        &backend,
    ));
    let (status, _, _) = exchange(lb.addr("web"), "GET", "/", &FORGED, "").await;
    assert_eq!(status, 200);
    assert_eq!(backend.last("x-forwarded-for"), ["6.6.6.6, 127.0.0.1"]);
    assert_eq!(backend.last("x-forwarded-proto"), ["https"]);
    assert_eq!(backend.last("x-forwarded-host"), ["evil.example"]);
    assert_eq!(
        backend.last("forwarded"),
        ["for=6.6.6.6;proto=https, for=127.0.0.1;proto=http;host=\"shop.example\""]
    );
}

#[tokio::test]
async fn the_forwarded_header_is_set_when_switched_on() {
    let backend = Recorder::start("ok").await;
    let lb = Lb::start(&config("forwarded_header = true", &backend));
    exchange(lb.addr("web"), "GET", "/", &FORGED, "").await;
    assert_eq!(
        backend.last("forwarded"),
        ["for=127.0.0.1;proto=http;host=\"shop.example\""]
    );
}

#[tokio::test]
async fn request_ids_are_kept_when_valid_and_made_otherwise() {
    let backend = Recorder::start("ok").await;
    let lb = Lb::start(&config("", &backend));
    let web = lb.addr("web");

    // A valid id reaches the backend and comes back unchanged.
    let (_, resp, _) = exchange(web, "GET", "/", &[("x-request-id", "req-42:abc")], "").await;
    assert_eq!(backend.last("x-request-id"), ["req-42:abc"]);
    assert_eq!(resp["x-request-id"], "req-42:abc");

    // None sent: the generated one the backend got is the one returned.
    let (_, resp, _) = exchange(web, "GET", "/", &[], "").await;
    let sent = backend.last("x-request-id");
    assert_eq!(sent.len(), 1);
    assert!(is_generated(&sent[0]), "{sent:?}");
    assert_eq!(resp["x-request-id"], sent[0].as_str());

    // Invalid ones are replaced: a space, a comma, two lines, too long.
    let long = "x".repeat(129);
    for headers in [
        vec![("x-request-id", "has space")],
        vec![("x-request-id", "a,b")],
        vec![("x-request-id", "one"), ("x-request-id", "two")],
        vec![("x-request-id", long.as_str())],
    ] {
        let (_, resp, _) = exchange(web, "GET", "/", &headers, "").await;
        let sent = backend.last("x-request-id");
        assert_eq!(sent.len(), 1, "{headers:?}");
        assert!(is_generated(&sent[0]), "{headers:?} -> {sent:?}");
        assert_eq!(resp["x-request-id"], sent[0].as_str());
    }
}

#[tokio::test]
async fn the_proxys_own_errors_carry_the_request_id() {
    let backend = Recorder::start("ok").await;
    let lb = Lb::start(&config("", &backend).replace(
        "[[listener.route]]\nservice = \"api\"",
        "[[listener.route]]\nhost = \"api.example\"\nservice = \"api\"",
    ));
    let (status, resp, _) = exchange(
        lb.addr("web"),
        "GET",
        "/",
        &[("host", "other.example"), ("x-request-id", "lost-1")],
        "",
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(resp["x-request-id"], "lost-1");
}

#[tokio::test]
async fn an_http2_clients_authority_is_its_forwarded_host() {
    let backend = Recorder::start("ok").await;
    let lb = Lb::start(&config("", &backend));
    let web = lb.addr("web");
    let (status, _) = get(&h2_client(), web, "/").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(backend.last("x-forwarded-host"), [web.to_string()]);
    assert_eq!(backend.last("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(backend.last("x-request-id").len(), 1);
}

/// A backend that records each request head it reads, as raw bytes, and
/// answers it 503 (keeping the connection).
async fn failing_recorder() -> (u16, std::sync::Arc<parking_lot::Mutex<Vec<Vec<u8>>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let heads = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.lock().push(buf.drain(..end + 4).collect());
                        let reply =
                            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
                        if s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (port, heads)
}

/// The lines of a raw request head named `name`, their values.
fn values(head: &[u8], name: &str) -> Vec<String> {
    String::from_utf8_lossy(head)
        .split("\r\n")
        .filter_map(|l| l.split_once(": "))
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.to_owned())
        .collect()
}

#[tokio::test]
async fn a_retry_carries_the_same_forwarding_headers_and_request_id() {
    let trusted = "trusted_proxies = [\"127.0.0.0/8\"]\nforwarded_header = true";
    let with_id = [&FORGED[..], &[("x-request-id", "retry-1")]].concat();
    for (listener_extra, headers, xff, xfp) in [
        ("", &FORGED[..], "127.0.0.1", "http"),
        (trusted, &with_id[..], "6.6.6.6, 127.0.0.1", "https"),
    ] {
        let (a, heads_a) = failing_recorder().await;
        let (b, heads_b) = failing_recorder().await;
        let lb = Lb::start(&format!(
            r#"[[listener]]
name = "web"
listen = "127.0.0.1:0"
{listener_extra}
[[listener.route]]
service = "api"
[service.api]
retries = 1
[service.api.health_check]
kind = "none"
[[service.api.instance]]
id = "a"
address = "127.0.0.1"
port = {a}
[[service.api.instance]]
id = "b"
address = "127.0.0.1"
port = {b}
"#
        ));
        let (status, resp, _) = exchange(lb.addr("web"), "GET", "/r", headers, "").await;
        assert_eq!(status, 503, "{listener_extra}");
        let (a, b) = (heads_a.lock().clone(), heads_b.lock().clone());
        assert_eq!((a.len(), b.len()), (1, 1), "one attempt each");
        // The retry's head is the first attempt's, byte for byte.
        assert_eq!(
            String::from_utf8_lossy(&a[0]),
            String::from_utf8_lossy(&b[0])
        );
        let head = &a[0];
        assert_eq!(values(head, "x-forwarded-for"), [xff]);
        assert_eq!(values(head, "x-forwarded-proto"), [xfp]);
        let id = values(head, "x-request-id");
        assert_eq!(id.len(), 1, "{listener_extra}");
        assert_eq!(resp["x-request-id"], id[0].as_str());
        if !listener_extra.is_empty() {
            assert_eq!(id, ["retry-1"]);
            assert_eq!(
                values(head, "forwarded"),
                ["for=6.6.6.6;proto=https, for=127.0.0.1;proto=http;host=\"shop.example\""]
            );
        }
    }
}

/// An HTTP/2 upstream (the headers set in its request's map, not written
/// by the HTTP/1.1 encoder) gets the same forwarding headers and id.
#[tokio::test]
async fn an_h2c_upstream_gets_the_same_forwarding_headers() {
    let backend = Recorder::start("ok").await;
    for (listener_extra, xff, forwarded) in [
        ("", "127.0.0.1", None),
        (
            "trusted_proxies = [\"127.0.0.0/8\"]\nforwarded_header = true",
            "6.6.6.6, 127.0.0.1",
            Some("for=6.6.6.6;proto=https, for=127.0.0.1;proto=http;host=\"shop.example\""),
        ),
    ] {
        let lb = Lb::start(&config(listener_extra, &backend).replace(
            "[service.api]\n",
            "[service.api]\nupstream_protocol = \"h2c\"\n",
        ));
        let mut headers = FORGED.to_vec();
        headers.push(("x-request-id", "h2-1"));
        let (status, resp, _) = exchange(lb.addr("web"), "GET", "/", &headers, "").await;
        assert_eq!(status, 200);
        assert_eq!(backend.last("x-forwarded-for"), [xff]);
        let (xfp, xfh) = if forwarded.is_some() {
            ("https", "evil.example")
        } else {
            ("http", "shop.example")
        };
        assert_eq!(backend.last("x-forwarded-proto"), [xfp]);
        assert_eq!(backend.last("x-forwarded-host"), [xfh]);
        assert_eq!(backend.last("forwarded"), Vec::from_iter(forwarded));
        assert_eq!(backend.last("x-request-id"), ["h2-1"]);
        assert_eq!(resp["x-request-id"], "h2-1");
    }
}
