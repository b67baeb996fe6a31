//! HTTP/1.1 Upgrade through the proxy with a real WebSocket client and
//! backend (tokio-tungstenite): the handshake reaches the backend, 101 and
//! its headers come back, messages flow both ways, the instance counts the
//! tunnel as one connection, a refusal passes through, an idle tunnel is
//! closed, a drain waits for open tunnels, and ordinary requests keep
//! having `Upgrade` stripped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request as WsRequest};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::support::*;

type Ws = WebSocketStream<TcpStream>;

/// Request heads a backend received.
type Seen = Arc<Mutex<Vec<(Version, HeaderMap)>>>;

/// The listener `web` → service `api` with one instance `ws` on `port`,
/// no health checks (a WebSocket backend has no `/health`), and `extra` in
/// `[service.api]`.
fn config(port: u16, extra: &str) -> String {
    config_of(&[("ws", port)], extra)
}

/// [`config`] with an instance per `(id, port)`.
fn config_of(instances: &[(&str, u16)], extra: &str) -> String {
    let instances: String = instances
        .iter()
        .map(|(id, port)| {
            format!(
                "[[service.api.instance]]\nid = \"{id}\"\naddress = \"127.0.0.1\"\nport = {port}\n"
            )
        })
        .collect();
    format!(
        r#"drain_timeout = "5s"
{WEB_TO_API}
[service.api]
{extra}
[service.api.health_check]
kind = "none"

{instances}"#
    )
}

/// A WebSocket echo backend: every text or binary message comes back; the
/// handshake's request headers are recorded, and the 101 carries
/// `x-backend: ws-echo`. Returns its port.
async fn ws_echo_backend(seen: Seen) -> u16 {
    serve_each(move |stream| {
        let seen = seen.clone();
        async move {
            // tungstenite's callback type fixes the error type.
            #[allow(clippy::result_large_err)]
            let record = move |req: &WsRequest, mut resp: Response<()>| {
                seen.lock().push((req.version(), req.headers().clone()));
                resp.headers_mut()
                    .insert("x-backend", HeaderValue::from_static("ws-echo"));
                Ok::<_, ErrorResponse>(resp)
            };
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    break;
                }
            }
        }
    })
    .await
}

/// Listens on 127.0.0.1:0 and runs `serve` on each connection in its own
/// task; returns the port.
async fn serve_each<F, Fut>(serve: F) -> u16
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream));
            }
        }
    });
    port
}

/// A plain HTTP/1.1 backend that refuses every upgrade: a request with an
/// `Upgrade` header gets 403 and a body, any other 200 `plain`. Every
/// request head is recorded. Returns its port.
async fn refusing_backend(seen: Seen) -> u16 {
    serve_each(move |stream| {
        let seen = seen.clone();
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            seen.lock().push((req.version(), req.headers().clone()));
            let (status, body) = if req.headers().contains_key("upgrade") {
                (403, "websocket refused: sign in first")
            } else {
                (200, "plain")
            };
            let resp = Response::builder()
                .status(status)
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap();
            async move { Ok::<_, std::convert::Infallible>(resp) }
        });
        async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        }
    })
    .await
}

/// A WebSocket handshake to `/chat` through `addr` with `extra` headers.
async fn ws_connect(
    addr: SocketAddr,
    extra: &[(&'static str, &'static str)],
) -> (Ws, Response<Option<Vec<u8>>>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("ws://{addr}/chat").into_client_request().unwrap();
    for (k, v) in extra {
        req.headers_mut().insert(*k, HeaderValue::from_static(v));
    }
    tokio_tungstenite::client_async(req, stream).await.unwrap()
}

/// Sends `text` and expects it back.
async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("no echo within 5 s")
        .expect("the tunnel ended")
        .unwrap();
    assert_eq!(got, Message::text(text));
}

/// A WebSocket handshake's headers, for [`raw_request`].
const HANDSHAKE: [(&str, &str); 5] = [
    ("host", "chat.example"),
    ("connection", "Upgrade"),
    ("upgrade", "websocket"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

/// Closes `ws` with the close handshake, through to the server's end of
/// stream.
async fn close(ws: &mut Ws) {
    ws.close(None).await.unwrap();
    while let Some(m) = ws.next().await {
        if m.is_err() {
            break;
        }
    }
}

/// One HTTP/1.x request with exactly `headers` on a fresh connection:
/// status, response headers, body.
async fn raw_request(
    addr: SocketAddr,
    version: Version,
    headers: &[(&str, &str)],
) -> (u16, HeaderMap, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder().version(version).uri("/chat");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tx
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// The `api` instance `ws` as the admin API shows it.
async fn instance(adm: SocketAddr) -> Value {
    instance_named(adm, "ws").await
}

async fn instance_named(adm: SocketAddr, id: &str) -> Value {
    let (status, body) = admin(adm, "GET", "/v1/services/api", None, None).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let found = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id)
        .cloned();
    found.unwrap_or_else(|| panic!("no instance {id} in {v}"))
}

/// Waits until the instance's `active_connections` is `want`.
async fn wait_active(adm: SocketAddr, want: u64) {
    let start = Instant::now();
    loop {
        let got = instance(adm).await["active_connections"].as_u64();
        if got == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "active_connections {got:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn a_websocket_echoes_1000_messages_in_order_and_counts_as_one_connection() {
    let seen = Seen::default();
    let port = ws_echo_backend(seen.clone()).await;
    let lb = Lb::start(&config(port, ""));
    let adm = lb.addr("admin");
    let (mut ws, resp) = ws_connect(lb.addr("web"), &[("keep-alive", "timeout=5")]).await;
    assert_eq!(resp.status(), 101);
    // The backend's own 101 headers reach the client.
    assert_eq!(header(resp.headers(), "x-backend"), Some("ws-echo"));
    assert!(header(resp.headers(), "upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")));

    // The handshake reached the backend intact, forwarded like any request.
    {
        let seen = seen.lock();
        assert_eq!(seen.len(), 1);
        let (version, h) = &seen[0];
        assert_eq!(*version, Version::HTTP_11);
        assert!(header(h, "upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")));
        assert!(header(h, "connection").is_some_and(|c| c.eq_ignore_ascii_case("upgrade")));
        assert!(h.contains_key("sec-websocket-key"));
        assert_eq!(header(h, "x-forwarded-for"), Some("127.0.0.1"));
        assert!(
            !h.contains_key("keep-alive"),
            "a hop-by-hop header crossed: {h:?}"
        );
    }

    wait_active(adm, 1).await;
    // Sent back to back, then read: the order must survive the tunnel.
    for i in 0..1000 {
        ws.feed(Message::text(format!("message {i}")))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..1000 {
        let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo stalled")
            .expect("the tunnel ended")
            .unwrap();
        assert_eq!(got, Message::text(format!("message {i}")));
    }
    assert_eq!(instance(adm).await["active_connections"], 1);

    close(&mut ws).await;
    wait_active(adm, 0).await;
    let inst = instance(adm).await;
    assert_eq!(inst["errors"], 0, "{inst}");
}

#[tokio::test]
async fn a_refused_upgrade_passes_the_backends_answer_through() {
    let seen = Seen::default();
    let port = refusing_backend(seen.clone()).await;
    let lb = Lb::start(&config(port, ""));
    let (status, headers, body) = raw_request(lb.addr("web"), Version::HTTP_11, &HANDSHAKE).await;
    assert_eq!(
        (status, body.as_str()),
        (403, "websocket refused: sign in first")
    );
    assert!(!headers.contains_key("upgrade"), "{headers:?}");
    // The backend was asked to upgrade: the handshake was not stripped.
    let (_, h) = seen.lock()[0].clone();
    assert_eq!(header(&h, "upgrade"), Some("websocket"));
    assert_eq!(header(&h, "connection"), Some("upgrade"));
    assert_eq!(header(&h, "host"), Some("chat.example"));
    // A 403 is an answer: no failure, and the claim ended with the body.
    let adm = lb.addr("admin");
    wait_active(adm, 0).await;
    assert_eq!(instance(adm).await["errors"], 0);
}

/// What a request is, its version, its headers.
type Case<'a> = (&'a str, Version, Vec<(&'a str, &'a str)>);

#[tokio::test]
async fn ordinary_requests_still_have_upgrade_stripped() {
    let seen = Seen::default();
    let port = refusing_backend(seen.clone()).await;
    let lb = Lb::start(&config(port, ""));
    let addr = lb.addr("web");
    let host = ("host", "chat.example");
    let cases: [Case<'_>; 4] = [
        ("plain GET", Version::HTTP_11, vec![host]),
        (
            "Upgrade without Connection: upgrade",
            Version::HTTP_11,
            vec![host, ("connection", "keep-alive"), ("upgrade", "websocket")],
        ),
        (
            "HTTP/1.0",
            Version::HTTP_10,
            vec![host, ("connection", "upgrade"), ("upgrade", "websocket")],
        ),
        (
            "h2c upgrade",
            Version::HTTP_11,
            vec![
                host,
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", "h2c"),
                ("http2-settings", "AAMAAABkAAQAAP__"),
            ],
        ),
    ];
    for (what, version, headers) in &cases {
        let (status, _, body) = raw_request(addr, *version, headers).await;
        assert_eq!((status, body.as_str()), (200, "plain"), "{what}");
        let (_, h) = seen.lock().last().cloned().unwrap();
        for gone in ["upgrade", "http2-settings"] {
            assert!(
                !h.contains_key(gone),
                "{what}: {gone} reached the backend: {h:?}"
            );
        }
        assert!(
            header(&h, "connection").is_none_or(|c| !c.to_ascii_lowercase().contains("upgrade")),
            "{what}: {h:?}"
        );
    }
    assert_eq!(seen.lock().len(), cases.len());
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_after_the_idle_timeout_and_traffic_keeps_it_open() {
    let port = ws_echo_backend(Seen::default()).await;
    let lb = Lb::start(&config(port, "upgrade_idle_timeout = \"1s\""));
    let adm = lb.addr("admin");
    let (mut ws, _) = ws_connect(lb.addr("web"), &[]).await;
    // A message every 400 ms for 2.4 s: longer than the timeout, never idle.
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        echo(&mut ws, &format!("tick {i}")).await;
    }
    let idle_since = Instant::now();
    let next = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the idle tunnel was not closed");
    let waited = idle_since.elapsed();
    assert!(
        !matches!(next, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{next:?}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited <= Duration::from_secs(2),
        "closed after {waited:?} idle (timeout 1 s)"
    );
    wait_active(adm, 0).await;
}

#[tokio::test]
async fn a_drain_waits_for_an_open_tunnel_until_it_closes() {
    let port = ws_echo_backend(Seen::default()).await;
    let mut lb = Lb::start(&config(port, ""));
    let (mut ws, _) = ws_connect(lb.addr("web"), &[]).await;
    echo(&mut ws, "before").await;
    let t = Instant::now();
    lb.signal("TERM");
    lb.wait_log("the drain", Duration::from_secs(5), |v| {
        v["message"] == "listener stopped for drain"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Draining (drain_timeout 5 s): the tunnel still carries messages.
    echo(&mut ws, "during the drain").await;
    assert!(
        lb.child.try_wait().unwrap().is_none(),
        "exited with a tunnel open"
    );
    close(&mut ws).await;
    let status = lb.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status {status:?}");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "the drain took {:?}: it waited for drain_timeout, not the tunnel",
        t.elapsed()
    );
}

#[tokio::test]
async fn a_handshake_to_a_dead_instance_moves_to_a_live_one() {
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let live = ws_echo_backend(Seen::default()).await;
    let lb = Lb::start(&config_of(
        &[("dead", dead), ("ws", live)],
        "strategy = \"round_robin\"",
    ));
    // Round robin sends some of these to the dead instance first.
    for i in 0..4 {
        let (mut ws, resp) = ws_connect(lb.addr("web"), &[]).await;
        assert_eq!(resp.status(), 101);
        echo(&mut ws, &format!("via a retry {i}")).await;
    }
    let dead = instance_named(lb.addr("admin"), "dead").await;
    assert!(dead["errors"].as_u64().unwrap() >= 1, "never tried: {dead}");
}

#[tokio::test]
async fn open_tunnels_count_against_max_connections() {
    let port = ws_echo_backend(Seen::default()).await;
    let lb = Lb::start(&config(port, "max_connections = 1"));
    let addr = lb.addr("web");
    let (mut first, _) = ws_connect(addr, &[]).await;
    echo(&mut first, "holding the only connection").await;
    let (status, _, _) = raw_request(addr, Version::HTTP_11, &HANDSHAKE).await;
    assert_eq!(status, 503, "a second tunnel beyond max_connections");
    close(&mut first).await;
    wait_active(lb.addr("admin"), 0).await;
    let (mut second, _) = ws_connect(addr, &[]).await;
    echo(&mut second, "the slot is free again").await;
}

#[tokio::test]
async fn a_handshake_carries_the_host_that_host_header_names() {
    for rule in ["preserve", "instance"] {
        let seen = Seen::default();
        let port = ws_echo_backend(seen.clone()).await;
        let lb = Lb::start(&config(port, &format!("host_header = \"{rule}\"")));
        let (mut ws, resp) = ws_connect(lb.addr("web"), &[("host", "chat.example")]).await;
        assert_eq!(resp.status(), 101, "{rule}");
        echo(&mut ws, rule).await;
        // `preserve`: the client's; `instance`: the instance's address:port.
        let want = match rule {
            "preserve" => "chat.example".to_owned(),
            _ => format!("127.0.0.1:{port}"),
        };
        let host = header(&seen.lock()[0].1, "host").map(str::to_owned);
        assert_eq!(host.as_deref(), Some(want.as_str()), "host_header = {rule}");
        close(&mut ws).await;
    }
}
