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
