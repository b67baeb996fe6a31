//! Upstream TLS through the real binary (`[service.X.tls]`): TLS-only
//! backends reached over HTTP/1.1 and HTTP/2 by ALPN, mTLS to a backend
//! that requires a client certificate, a wrong CA or name as a connect
//! failure, health checks over TLS, `insecure_skip_verify`, session
//! resumption, `check`'s errors and SIGHUP. The backends are rustls servers
//! in this process; certificates are made here with rcgen.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{HandshakeKind, ServerConfig};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::support::pki::{Ca, Leaf};
use crate::support::{check_config, client, get, metric_sum, temp_path, Lb};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What one TLS connection to a [`TlsBackend`] was.
#[derive(Debug, Clone)]
struct Accepted {
    kind: Option<HandshakeKind>,
    alpn: Option<Vec<u8>>,
    client_cert: bool,
}

/// A backend that speaks only TLS (HTTP/1.1 and HTTP/2 by ALPN or
/// preface) and answers every path `200 tls <version>`.
struct TlsBackend {
    addr: SocketAddr,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    /// HTTP versions of the requests served.
    versions: Arc<Mutex<Vec<hyper::Version>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsBackend {
    /// Serves `leaf`; asks for a client certificate from `clients` when
    /// given (required); `close_each`: every HTTP/1.1 response closes its
    /// connection.
    async fn start(leaf: &Leaf, clients: Option<&Ca>, close_each: bool) -> TlsBackend {
        let acceptor = acceptor(leaf, clients);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let versions = Arc::new(Mutex::new(Vec::new()));
        let (acc, vers) = (accepted.clone(), versions.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, acc, vers) = (acceptor.clone(), acc.clone(), vers.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let c = tls.get_ref().1;
                    acc.lock().push(Accepted {
                        kind: c.handshake_kind(),
                        alpn: c.alpn_protocol().map(<[u8]>::to_vec),
                        client_cert: c.peer_certificates().is_some_and(|p| !p.is_empty()),
                    });
                    let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let v = req.version();
                        vers.lock().push(v);
                        let mut resp =
                            hyper::Response::new(Full::new(Bytes::from(format!("tls {v:?}"))));
                        if close_each && v == hyper::Version::HTTP_11 {
                            resp.headers_mut().insert(
                                hyper::header::CONNECTION,
                                hyper::header::HeaderValue::from_static("close"),
                            );
                        }
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsBackend {
            addr,
            accepted,
            versions,
            task,
        }
    }

    fn accepted(&self) -> Vec<Accepted> {
        self.accepted.lock().clone()
    }
}

/// A TLS acceptor serving `leaf` with ALPN `h2`, `http/1.1` (that order
/// of preference); requires a client certificate from `clients` if given.
fn acceptor(leaf: &Leaf, clients: Option<&Ca>) -> TlsAcceptor {
    let builder = ServerConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match clients {
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(ca.roots(), ring())
                .build()
                .unwrap(),
        ),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(
            vec![leaf.der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone())),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TlsAcceptor::from(Arc::new(config))
}

/// A TLS-only WebSocket echo backend; returns its address and the ALPN
/// protocol of each connection.
async fn tls_ws_echo_backend(leaf: &Leaf) -> (SocketAddr, Arc<Mutex<Vec<Option<Vec<u8>>>>>) {
    let acceptor = acceptor(leaf, None);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let alpns = Arc::new(Mutex::new(Vec::new()));
    let seen = alpns.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                seen.lock()
                    .push(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec));
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, alpns)
}

/// A listener `web` routing `/<svc>` to each service of `services`.
fn listener(services: &[&str]) -> String {
    let mut s = "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n".to_owned();
    for svc in services {
        s += &format!("[[listener.route]]\npath_prefix = \"/{svc}\"\nservice = \"{svc}\"\n");
    }
    s
}

/// `[service.NAME]` with one instance `NAME-1` at `backend`, `extra` keys
/// (in `[service.NAME]`), the TLS table `tls` and a health check `check`
/// (a `[service.NAME.health_check]` body).
fn service(name: &str, backend: SocketAddr, extra: &str, tls: &str, check: &str) -> String {
    format!(
        "[service.{name}]\n{extra}\n[service.{name}.tls]\n{tls}\n\
         [service.{name}.health_check]\n{check}\n\
         [[service.{name}.instance]]\nid = \"{name}-1\"\naddress = \"127.0.0.1\"\nport = {}\n",
        backend.port()
    )
}

const NO_CHECK: &str = "kind = \"none\"";
/// Fast HTTP checks (`/health`).
/// Checks often enough to count several in a few seconds, with a timeout a
/// loaded machine's TLS handshake stays within (the subject is checks over
/// TLS passing, not their timeout).
const FAST_CHECK: &str = "interval = \"250ms\"\ntimeout = \"250ms\"";

fn ca_file(ca: &Ca) -> String {
    format!("ca_file = {:?}", ca.cert_file)
}

#[tokio::test]
async fn a_tls_only_backend_answers_over_http1_and_h2_by_alpn_and_stays_healthy() {
    let ca = Ca::new("mesh ca");
    // No server_name: the instance address, verified against the IP SAN.
    let backend = TlsBackend::start(&ca.leaf(&["127.0.0.1"], "127.0.0.1"), None, false).await;
    let config = format!(
        "{}{}{}{}",
        listener(&["one", "two", "auto"]),
        service("one", backend.addr, "", &ca_file(&ca), FAST_CHECK),
        service(
            "two",
            backend.addr,
            "upstream_protocol = \"h2c\"",
            &ca_file(&ca),
            NO_CHECK
        ),
        service(
            "auto",
            backend.addr,
            "upstream_protocol = \"auto\"",
            &ca_file(&ca),
            NO_CHECK
        ),
    );
    let lb = Lb::start(&config);
    let web = lb.addr("web");
    let c = client();

    assert_eq!(
        get(&c, web, "/one").await.unwrap(),
        (200, "tls HTTP/1.1".into())
    );
    assert_eq!(
        get(&c, web, "/two").await.unwrap(),
        (200, "tls HTTP/2.0".into()),
        "h2c over TLS is HTTP/2 by ALPN h2"
    );
    // `auto`: the backend prefers h2, so an HTTP/1.1 client's request
    // goes out as HTTP/2 (twice: learnt once, then reused).
    for _ in 0..2 {
        assert_eq!(
            get(&c, web, "/auto").await.unwrap(),
            (200, "tls HTTP/2.0".into())
        );
    }
    let alpns: Vec<Option<Vec<u8>>> = backend.accepted().into_iter().map(|a| a.alpn).collect();
    assert!(alpns.contains(&Some(b"http/1.1".to_vec())), "{alpns:?}");
    assert!(alpns.contains(&Some(b"h2".to_vec())), "{alpns:?}");

    // Health checks over TLS: many probes, all passing, instance closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let ok = loop {
        let ok = metric_sum(
            &lb,
            "datapunk_lb_health_checks_total",
            &["service=\"one\"", "result=\"success\""],
        )
        .await;
        if ok >= 2.0 || std::time::Instant::now() > deadline {
            break ok;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let failed = metric_sum(
        &lb,
        "datapunk_lb_health_checks_total",
        &["service=\"one\"", "result=\"failure\""],
    )
    .await;
    assert!(
        ok >= 2.0 && failed == 0.0,
        "checks: {ok} ok, {failed} failed"
    );
    assert_eq!(
        metric_sum(&lb, "datapunk_lb_circuit_state", &["service=\"one\""]).await,
        0.0,
        "closed"
    );
    assert_eq!(get(&c, web, "/one").await.unwrap().0, 200);
}

#[tokio::test]
async fn mtls_backend_accepts_the_proxys_certificate_and_refuses_a_proxy_without_one() {
    let ca = Ca::new("mesh ca");
    let clients = Ca::new("clients ca");
    let lb_cert = clients.leaf(&["lb.test"], "lb.test");
    let backend =
        TlsBackend::start(&ca.leaf(&["127.0.0.1"], "127.0.0.1"), Some(&clients), false).await;
    let with_cert = format!(
        "{}\ncert_file = {:?}\nkey_file = {:?}",
        ca_file(&ca),
        lb_cert.cert_file,
        lb_cert.key_file
    );
    let config = format!(
        "{}{}{}",
        listener(&["mtls", "anon"]),
        service("mtls", backend.addr, "", &with_cert, FAST_CHECK),
        service("anon", backend.addr, "", &ca_file(&ca), FAST_CHECK),
    );
    let lb = Lb::start(&config);
    let web = lb.addr("web");
    let c = client();

    assert_eq!(
        get(&c, web, "/mtls").await.unwrap(),
        (200, "tls HTTP/1.1".into())
    );
    assert!(backend.accepted().iter().any(|a| a.client_cert));
    // Without a certificate the backend refuses (TLS 1.3: after the
    // client's handshake, on the first read): the request fails ...
    let (status, _) = get(&c, web, "/anon").await.unwrap();
    assert!(status == 502 || status == 503, "{status}");
    // ... and the checks eject the instance while the other stays in.
    let start = std::time::Instant::now();
    loop {
        let state = metric_sum(&lb, "datapunk_lb_circuit_state", &["service=\"anon\""]).await;
        if state == 2.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "anon's instance not ejected (state {state})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        metric_sum(
            &lb,
            "datapunk_lb_health_checks_total",
            &["service=\"anon\"", "result=\"failure\""],
        )
        .await
            >= 1.0
    );
    assert_eq!(
        metric_sum(&lb, "datapunk_lb_circuit_state", &["service=\"mtls\""]).await,
        0.0
    );
    assert_eq!(get(&c, web, "/mtls").await.unwrap().0, 200);
}

#[tokio::test]
async fn a_wrong_ca_or_name_is_a_connect_failure_and_sighup_applies_a_fixed_table() {
    let ca = Ca::new("mesh ca");
    let stranger = Ca::new("other ca");
    let backend = TlsBackend::start(&ca.leaf(&["api.internal"], "api.internal"), None, false).await;
    let right = format!("{}\nserver_name = \"api.internal\"", ca_file(&ca));
    let wrong_ca = format!("{}\nserver_name = \"api.internal\"", ca_file(&stranger));
    let wrong_name = format!("{}\nserver_name = \"other.internal\"", ca_file(&ca));
    let config = |a: &str, b: &str| {
        format!(
            "{}{}{}",
            listener(&["a", "b"]),
            service("a", backend.addr, "retries = 0", a, NO_CHECK),
            service("b", backend.addr, "retries = 0", b, NO_CHECK),
        )
    };
    let lb = Lb::start(&config(&wrong_ca, &wrong_name));
    let web = lb.addr("web");
    let c = client();
    for svc in ["a", "b"] {
        let (status, body) = get(&c, web, &format!("/{svc}")).await.unwrap();
        assert_eq!(status, 502, "{svc}: {body}");
        assert_eq!(
            metric_sum(
                &lb,
                "datapunk_lb_requests_total",
                &[&format!("service=\"{svc}\""), "outcome=\"connect\""]
            )
            .await,
            1.0,
            "{svc}: counted as a connect failure of the instance"
        );
        let other_failures = metric_sum(
            &lb,
            "datapunk_lb_requests_total",
            &[&format!("service=\"{svc}\"")],
        )
        .await
            - 1.0;
        assert_eq!(other_failures, 0.0, "{svc}: nothing else counted");
    }
    assert!(backend.versions.lock().is_empty(), "no request reached it");
    lb.wait_log("the TLS failure", Duration::from_secs(5), |v| {
        v["message"] == "upstream TLS handshake failed"
            && v["error"]
                .as_str()
                .is_some_and(|e| e.contains("UnknownIssuer"))
    })
    .await;
    lb.wait_log("the name failure", Duration::from_secs(5), |v| {
        v["message"] == "upstream TLS handshake failed"
            && v["error"]
                .as_str()
                .is_some_and(|e| e.contains("not valid for name") || e.contains("NotValidForName"))
    })
    .await;

    // Fixed on disk, applied by SIGHUP: new connections verify.
    std::fs::write(&lb.config_path, config(&right, &right)).unwrap();
    lb.signal("HUP");
    lb.wait_log("reload", Duration::from_secs(10), |v| {
        v["message"] == "config reloaded"
    })
    .await;
    for svc in ["a", "b"] {
        assert_eq!(
            get(&c, web, &format!("/{svc}")).await.unwrap(),
            (200, "tls HTTP/1.1".into()),
            "{svc} after the reload"
        );
    }
}

#[tokio::test]
async fn insecure_skip_verify_accepts_any_certificate_and_warns() {
    let unknown = Ca::new("nobody's ca");
    let backend = TlsBackend::start(
        &unknown.leaf(&["whatever.test"], "whatever.test"),
        None,
        false,
    )
    .await;
    let lb = Lb::start(&format!(
        "{}{}",
        listener(&["api"]),
        service(
            "api",
            backend.addr,
            "",
            "insecure_skip_verify = true",
            FAST_CHECK
        )
    ));
    lb.wait_log("the warning", Duration::from_secs(5), |v| {
        v["level"] == "WARN"
            && v["service"] == "api"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("insecure_skip_verify"))
    })
    .await;
    assert_eq!(
        get(&client(), lb.addr("web"), "/api").await.unwrap(),
        (200, "tls HTTP/1.1".into())
    );
}

#[tokio::test]
async fn a_second_connection_resumes_the_session() {
    let ca = Ca::new("mesh ca");
    // Each response closes its connection: every request opens one.
    let backend = TlsBackend::start(&ca.leaf(&["127.0.0.1"], "127.0.0.1"), None, true).await;
    let lb = Lb::start(&format!(
        "{}{}",
        listener(&["api"]),
        service("api", backend.addr, "", &ca_file(&ca), NO_CHECK)
    ));
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, lb.addr("web"), "/api").await.unwrap().0, 200);
        // Let the close land before the next request.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kinds: Vec<Option<HandshakeKind>> =
        backend.accepted().into_iter().map(|a| a.kind).collect();
    assert_eq!(
        kinds,
        [
            Some(HandshakeKind::Full),
            Some(HandshakeKind::Resumed),
            Some(HandshakeKind::Resumed)
        ],
        "one full handshake, then resumed sessions"
    );
}

#[tokio::test]
async fn a_websocket_upgrade_reaches_a_tls_only_backend_over_http1_alpn() {
    let ca = Ca::new("mesh ca");
    let (backend, alpns) = tls_ws_echo_backend(&ca.leaf(&["127.0.0.1"], "127.0.0.1")).await;
    // `h2c` offers h2 to requests; an upgrade must still get HTTP/1.1.
    let lb = Lb::start(&format!(
        "{}{}",
        listener(&["ws"]),
        service(
            "ws",
            backend,
            "upstream_protocol = \"h2c\"",
            &ca_file(&ca),
            NO_CHECK
        )
    ));
    let web = lb.addr("web");
    let tcp = tokio::net::TcpStream::connect(web).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{web}/ws"), tcp)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("over tls")).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(back, Message::text("over tls"));
    assert_eq!(*alpns.lock(), [Some(b"http/1.1".to_vec())]);
}

#[test]
fn check_names_the_upstream_tls_key_at_fault() {
    let ca = Ca::new("mesh ca");
    let leaf = ca.leaf(&["lb.test"], "lb.test");
    let other = ca.leaf(&["other.test"], "other.test");
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let with = |tls: &str| {
        format!(
            "{}{}",
            listener(&["api"]),
            service("api", addr, "", tls, NO_CHECK)
        )
    };
    let missing = temp_path("missing-ca.pem");
    let garbage = temp_path("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    for (tls, key, why) in [
        (
            format!("ca_file = {missing:?}"),
            "service.api.tls.ca_file",
            "cannot read",
        ),
        (
            format!("ca_file = {garbage:?}"),
            "service.api.tls.ca_file",
            "no PEM certificate",
        ),
        (
            format!("{}\ncert_file = {:?}", ca_file(&ca), leaf.cert_file),
            "service.api.tls.key_file",
            "cert_file needs key_file",
        ),
        (
            format!(
                "{}\ncert_file = {:?}\nkey_file = {:?}",
                ca_file(&ca),
                leaf.cert_file,
                other.key_file
            ),
            "service.api.tls.key_file",
            "does not match",
        ),
        (
            format!("{}\nserver_name = \"not a name!\"", ca_file(&ca)),
            "service.api.tls.server_name",
            "not a DNS name",
        ),
        (
            "insecure_skip_verify = true\nunknown_key = 1".to_owned(),
            "unknown_key",
            "unknown field",
        ),
    ] {
        let (code, out) = check_config(&with(&tls));
        assert_eq!(code, Some(1), "{tls}: {out}");
        assert!(out.contains(key) && out.contains(why), "{tls}: {out}");
    }
    // The line of the key is named.
    let (_, out) = check_config(&with(&format!("ca_file = {missing:?}")));
    let line = with(&format!("ca_file = {missing:?}"))
        .lines()
        .position(|l| l.starts_with("ca_file"))
        .unwrap()
        + 1;
    assert!(
        out.contains(&format!("line {line}: service.api.tls.ca_file")),
        "{out}"
    );

    // A good table passes and is summarised.
    let (code, out) = check_config(&with(&format!(
        "{}\ncert_file = {:?}\nkey_file = {:?}",
        ca_file(&ca),
        leaf.cert_file,
        leaf.key_file
    )));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("tls: ca_file"), "{out}");
}
