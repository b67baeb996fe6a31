//! Upstream protocols (issue 10 item 1): `upstream_protocol` converts
//! between HTTP/2 and HTTP/1.1, `host_header` keeps or replaces the client's
//! authority, gRPC is refused at once where it cannot work, keep-alive
//! connections are reused and an idle close costs no request, and health
//! checks speak the service's protocol. Backends here speak exactly one
//! protocol (hyper's `http1` or `http2` server), so a request in the wrong
//! one fails.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// The one protocol a [`ProtoBackend`] speaks.
#[derive(Clone, Copy)]
enum Speaks {
    /// HTTP/1.1 only; `keep_alive: false` answers `Connection: close`;
    /// `idle_close` closes a connection idle that long.
    H1 {
        keep_alive: bool,
        idle_close: Option<Duration>,
    },
    /// HTTP/2 with prior knowledge only.
    H2,
}

const H1: Speaks = Speaks::H1 {
    keep_alive: true,
    idle_close: None,
};

/// One request as the backend saw it.
#[derive(Debug, Clone)]
struct Seen {
    version: Version,
    /// `:authority` (HTTP/2) or Host (HTTP/1.1).
    authority: String,
    path: String,
}

/// A backend that records what it saw and counts the connections it
/// accepted; answers `ok:<request body>`.
struct ProtoBackend {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl ProtoBackend {
    async fn start(speaks: Speaks) -> ProtoBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (acc, rec) = (accepts.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let rec = rec.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let rec = rec.clone();
                    async move {
                        let authority = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .or_else(|| {
                                req.headers()
                                    .get("host")
                                    .map(|h| h.to_str().unwrap().to_owned())
                            })
                            .unwrap_or_default();
                        rec.lock().push(Seen {
                            version: req.version(),
                            authority,
                            path: req.uri().path().to_owned(),
                        });
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let mut out = b"ok:".to_vec();
                        out.extend_from_slice(&body);
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            out,
                        ))))
                    }
                });
                let io = TokioIo::new(stream);
                tokio::spawn(async move {
                    let _ = match speaks {
                        Speaks::H1 {
                            keep_alive,
                            idle_close,
                        } => {
                            let mut b = hyper::server::conn::http1::Builder::new();
                            b.keep_alive(keep_alive);
                            if let Some(d) = idle_close {
                                // Also the wait for the next request on a kept-alive connection.
                                b.timer(TokioTimer::new()).header_read_timeout(d);
                            }
                            b.serve_connection(io, svc).await
                        }
                        Speaks::H2 => {
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, svc)
                                .await
                        }
                    };
                });
            }
        });
        ProtoBackend {
            addr,
            accepts,
            seen,
        }
    }

    fn last(&self) -> Seen {
        self.seen
            .lock()
            .last()
            .cloned()
            .expect("the backend saw a request")
    }
}

/// `[service.NAME]` (`extra` in its table) with one instance `p1` on
/// 127.0.0.1:`port`, checked by `check` (`none`, `tcp`, `http`).
fn service(name: &str, extra: &str, check: &str, port: u16) -> String {
    format!(
        r#"[service.{name}]
{extra}
[service.{name}.health_check]
kind = "{check}"
interval = "100ms"
timeout = "100ms"
[[service.{name}.instance]]
id = "p1"
address = "127.0.0.1"
port = {port}
"#
    )
}

/// A listener `web` to the service `api` on `backend`.
fn config(extra: &str, check: &str, backend: &ProtoBackend) -> String {
    format!(
        "{WEB_TO_API}{}",
        service("api", extra, check, backend.addr.port())
    )
}

/// Sends `req` over a fresh HTTP/2 prior-knowledge connection to `addr`
/// (like `curl --http2-prior-knowledge`): the URI's authority is the
/// `:authority` sent, whatever `addr` is.
async fn h2_send(addr: SocketAddr, req: Request<Full<Bytes>>) -> (u16, String) {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    read(send.send_request(req).await.unwrap()).await
}

/// Sends `req` over a fresh HTTP/1.1 connection to `addr`, headers as given.
async fn h1_send(addr: SocketAddr, req: Request<Full<Bytes>>) -> (u16, String) {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    read(send.send_request(req).await.unwrap()).await
}

async fn read(resp: Response<Incoming>) -> (u16, String) {
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// `(requests, errors)` the instance `id` of `service` recorded.
async fn recorded(lb: &Lb, service: &str, id: &str) -> (u64, u64) {
    let (status, body) = admin(
        lb.addr("admin"),
        "GET",
        &format!("/v1/services/{service}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let i = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id)
        .unwrap_or_else(|| panic!("no instance {id} in {v}"));
    (
        i["requests"].as_u64().unwrap(),
        i["errors"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_client_reaches_an_http1_only_backend_as_http11_with_its_authority() {
    let b = ProtoBackend::start(H1).await;
    let lb = Lb::start(&config("", "tcp", &b));
    let web = lb.addr("web");
    let get = Request::get("http://api.example:1234/v1/users?page=2")
        .body(Full::default())
        .unwrap();
    assert_eq!(h2_send(web, get).await, (200, "ok:".to_owned()));
    let seen = b.last();
    assert_eq!(seen.version, Version::HTTP_11, "{seen:?}");
    assert_eq!(seen.authority, "api.example:1234", "{seen:?}");
    assert_eq!(seen.path, "/v1/users");
    // A body from an HTTP/2 client (no length: HTTP/1.1 chunked upstream).
    let post = Request::post("http://api.example:1234/upload")
        .body(Full::new(Bytes::from("payload")))
        .unwrap();
    assert_eq!(h2_send(web, post).await, (200, "ok:payload".to_owned()));
    assert_eq!(b.last().version, Version::HTTP_11);
    assert_eq!(
        recorded(&lb, "api", "p1").await,
        (2, 0),
        "no failure blamed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_client_reaches_an_h2c_backend_as_http2_with_its_host() {
    let b = ProtoBackend::start(Speaks::H2).await;
    let lb = Lb::start(&config("upstream_protocol = \"h2c\"", "none", &b));
    let req = Request::post("/orders")
        .header("host", "api.example:1234")
        .body(Full::new(Bytes::from("order")))
        .unwrap();
    assert_eq!(
        h1_send(lb.addr("web"), req).await,
        (200, "ok:order".to_owned())
    );
    let seen = b.last();
    assert_eq!(seen.version, Version::HTTP_2, "{seen:?}");
    assert_eq!(seen.authority, "api.example:1234", "{seen:?}");
    assert_eq!(recorded(&lb, "api", "p1").await, (1, 0));
    // Every request shares the one multiplexed connection (of its worker:
    // thread per core keeps one per worker).
    let c = client();
    for _ in 0..20 {
        assert_eq!(get(&c, lb.addr("web"), "/").await.unwrap().0, 200);
    }
    let accepts = b.accepts.load(Ordering::SeqCst);
    assert!(
        (1..=proxy_workers()).contains(&accepts),
        "one h2 connection per worker: {accepts}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_instance_sends_the_instance_address() {
    for (speaks, protocol) in [(H1, "http1"), (Speaks::H2, "h2c")] {
        let b = ProtoBackend::start(speaks).await;
        let lb = Lb::start(&config(
            &format!("upstream_protocol = \"{protocol}\"\nhost_header = \"instance\""),
            "none",
            &b,
        ));
        let req = Request::get("/")
            .header("host", "api.example")
            .body(Full::default())
            .unwrap();
        assert_eq!(h1_send(lb.addr("web"), req).await.0, 200);
        assert_eq!(
            b.last().authority,
            format!("127.0.0.1:{}", b.addr.port()),
            "{protocol}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_are_reused_and_idle_closes_fail_nothing() {
    let b = ProtoBackend::start(H1).await;
    let lb = Lb::start(&config("", "none", &b));
    let c = client();
    for _ in 0..100 {
        assert_eq!(get(&c, lb.addr("web"), "/").await.unwrap().0, 200);
    }
    let accepts = b.accepts.load(Ordering::SeqCst);
    assert!(
        accepts <= 2,
        "100 sequential requests opened {accepts} connections"
    );

    // `Connection: close` on every answer, and a server that closes a
    // connection idle for 100 ms: no POST (never retried) may fail.
    for speaks in [
        Speaks::H1 {
            keep_alive: false,
            idle_close: None,
        },
        Speaks::H1 {
            keep_alive: true,
            idle_close: Some(Duration::from_millis(100)),
        },
    ] {
        let b = ProtoBackend::start(speaks).await;
        let lb = Lb::start(&config("", "none", &b));
        for i in 0..6 {
            let req = Request::post(format!("http://{}/pay", lb.addr("web")))
                .body(Full::new(Bytes::from(format!("n{i}"))))
                .unwrap();
            let resp = c.request(req).await.unwrap();
            assert_eq!(read(resp).await, (200, format!("ok:n{i}")), "POST {i}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(recorded(&lb, "api", "p1").await, (6, 0));
        assert_eq!(
            b.accepts.load(Ordering::SeqCst),
            6,
            "each connection was closed"
        );
    }
}

/// A backend that answers the first request of its first connection
/// (`first`, kept alive), then reads the second request and closes without
/// a byte, as a server closing an idle connection that a request raced
/// (nginx short of `worker_connections`); later connections answer
/// `again` and stay open. Returns its address and the requests it read.
async fn closes_the_second_request_unanswered() -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// Reads one request (head, then a `content-length` body); false at
    /// the end of the stream.
    async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
        loop {
            let text = String::from_utf8_lossy(buf).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    buf.drain(..end + 4 + len);
                    return true;
                }
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut s, _)) = listener.accept().await {
            let (answer, then_close) = if std::mem::take(&mut first) {
                ("first", true)
            } else {
                ("again", false)
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while read_request(&mut s, &mut buf).await {
                    seen.fetch_add(1, Ordering::SeqCst);
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                        answer.len()
                    );
                    if s.write_all(format!("{head}{answer}").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if then_close {
                        // The next request arrives, and the connection
                        // closes under it.
                        if read_request(&mut s, &mut buf).await {
                            seen.fetch_add(1, Ordering::SeqCst);
                        }
                        return;
                    }
                }
            });
        }
    });
    (addr, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_closed_under_a_request_resends_only_what_may_be_resent() {
    // A GET: sent again on a new connection, once, within the attempt; the
    // instance is not charged (one instance and retries = 0: no retry of
    // the attempt table could have saved it).
    let (addr, requests) = closes_the_second_request_unanswered().await;
    let lb = Lb::start(&raw_config("", "retries = 0", &[("p1", addr)]));
    let mut one = OneConnection::open(lb.addr("web")).await;
    assert_eq!(one.get("/").await.unwrap(), (200, "first".to_owned()));
    assert_eq!(one.get("/").await.unwrap(), (200, "again".to_owned()));
    assert_eq!(requests.load(Ordering::SeqCst), 3, "the GET went out twice");
    assert_eq!(recorded(&lb, "api", "p1").await, (2, 0));

    // A POST may have been acted on: 502, sent once; the instance's idle
    // close is not its failure, so nothing is charged (nor counted).
    let (addr, requests) = closes_the_second_request_unanswered().await;
    let lb = Lb::start(&raw_config("", "retries = 0", &[("p1", addr)]));
    let mut one = OneConnection::open(lb.addr("web")).await;
    assert_eq!(
        one.request("POST", "/pay", "n1").await.unwrap(),
        (200, "first".to_owned())
    );
    assert_eq!(one.request("POST", "/pay", "n2").await.unwrap().0, 502);
    assert_eq!(requests.load(Ordering::SeqCst), 2, "the POST went out once");
    assert_eq!(recorded(&lb, "api", "p1").await, (1, 0));
}

/// An HTTP/2 backend (`h2` directly) that resets its second stream with
/// `REFUSED_STREAM` (RFC 9113 §8.7: not processed) and answers every other
/// with `ok`. Returns its address and the streams it took.
async fn refuses_the_second_stream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let streams = Arc::new(AtomicUsize::new(0));
    let taken = streams.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let taken = taken.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if taken.fetch_add(1, Ordering::SeqCst) == 1 {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let resp = Response::builder().status(200).body(()).unwrap();
                    if let Ok(mut body) = respond.send_response(resp, false) {
                        let _ = body.send_data(Bytes::from_static(b"ok"), true);
                    }
                }
            });
        }
    });
    (addr, streams)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_refused_unprocessed_is_sent_again() {
    let (addr, streams) = refuses_the_second_stream().await;
    // retries = 0: the attempt table retries nothing; one instance.
    let lb = Lb::start(&raw_config(
        "",
        "upstream_protocol = \"h2c\"\nretries = 0",
        &[("p1", addr)],
    ));
    let mut one = OneConnection::open(lb.addr("web")).await;
    for i in 0..3 {
        assert_eq!(
            one.get("/").await.unwrap(),
            (200, "ok".to_owned()),
            "GET {i}"
        );
    }
    assert_eq!(
        streams.load(Ordering::SeqCst),
        4,
        "the refused GET went out twice"
    );
    assert_eq!(recorded(&lb, "api", "p1").await, (3, 0), "nothing charged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_speak_the_service_protocol() {
    let b = ProtoBackend::start(Speaks::H2).await;
    let port = b.addr.port();
    // Checks every second with a 1 s timeout: the subject is the protocol
    // a probe speaks, not its timeout, so a probe slowed by a loaded
    // machine must not count as a failure of the h2c check.
    let relaxed = |s: String| {
        s.replace(
            "interval = \"100ms\"\ntimeout = \"100ms\"",
            "interval = \"1s\"\ntimeout = \"1s\"",
        )
    };
    let config = format!(
        "{WEB_TO_API}{}{}",
        relaxed(service("api", "upstream_protocol = \"h2c\"", "http", port)),
        relaxed(service("old", "", "http", port))
    );
    let lb = Lb::start(&config);
    let count = |text: &str, service: &str, result: &str| -> f64 {
        text.lines()
            .find(|l| {
                l.starts_with("datapunk_lb_health_checks_total{")
                    && l.contains(&format!("service=\"{service}\""))
                    && l.contains(&format!("result=\"{result}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0.0, |v| v.parse().unwrap())
    };
    // Poll until both services have been probed enough, then compare.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let (_, text) = request(lb.addr("admin"), "GET", "/metrics", &[], String::new()).await;
        let probed = count(&text, "api", "success") + count(&text, "api", "failure") >= 2.0
            && count(&text, "old", "success") + count(&text, "old", "failure") >= 1.0;
        if probed || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(count(&text, "api", "success") >= 2.0, "{text}");
    assert_eq!(
        count(&text, "api", "failure"),
        0.0,
        "h2c checks pass: {text}"
    );
    assert!(
        count(&text, "old", "failure") >= 1.0,
        "HTTP/1.1 checks fail: {text}"
    );
    assert_eq!(count(&text, "old", "success"), 0.0, "{text}");
    assert_eq!(
        h1_send(
            lb.addr("web"),
            Request::get("/")
                .header("host", "x")
                .body(Full::default())
                .unwrap()
        )
        .await
        .0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_passes_over_h2c_and_is_refused_at_once_over_http1() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let port = grpc_health_backend().await;
    let config = format!(
        r#"[[listener]]
name = "h2c"
listen = "127.0.0.1:0"
[[listener.route]]
service = "grpc"
[[listener]]
name = "h1"
listen = "127.0.0.1:0"
[[listener.route]]
service = "plain"
{}{}"#,
        service("grpc", "upstream_protocol = \"h2c\"", "tcp", port),
        service("plain", "", "tcp", port)
    );
    let lb = Lb::start(&config);
    let channel = |listener: &str| {
        tonic::transport::Channel::from_shared(format!("http://{}", lb.addr(listener)))
            .unwrap()
            .connect_lazy()
    };
    let check = |name: &str| HealthCheckRequest {
        service: name.into(),
    };
    let mut grpc = HealthClient::new(channel("h2c"));
    assert!(grpc.check(check("datapunk.Ok")).await.is_ok());
    let err = grpc.check(check("no.such.Service")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "trailers pass: {err:?}");

    let mut plain = HealthClient::new(channel("h1"));
    let started = Instant::now();
    let err = plain.check(check("datapunk.Ok")).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("service plain")
            && err.message().contains("upstream_protocol = \"h2c\""),
        "{err:?}"
    );
    assert_eq!(
        recorded(&lb, "plain", "p1").await,
        (0, 0),
        "no instance charged"
    );
    let (requests, errors) = recorded(&lb, "grpc", "p1").await;
    assert!(requests >= 1 && errors == 0, "{requests} {errors}");
}
