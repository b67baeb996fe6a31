//! SNI passthrough: a `tcp` listener with `[[listener.sni_route]]` reads the
//! ClientHello without terminating TLS and splices the client to the
//! backend its server name picks. The backends are TLS echo servers with
//! their own certificates (a test CA, `support/pki.rs`), so the client
//! sees which backend it reached by the certificate it verified, and the
//! echo shows the bytes read before the connect were replayed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::support::pki::{Ca, Leaf};
use crate::support::{metric_sum, unchecked_service, Lb};

/// Echoes each chunk read as `{name}:{chunk}` until EOF.
async fn echo(mut s: impl AsyncRead + AsyncWrite + Unpin, name: &str) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            return;
        }
        let mut out = format!("{name}:").into_bytes();
        out.extend_from_slice(&buf[..n]);
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// A backend on a free port: TLS with `leaf` when the first byte is a TLS
/// handshake record, plain otherwise; either way an echo tagged `name`.
async fn backend(name: &'static str, leaf: &Leaf) -> u16 {
    let key = PrivateKeyDer::from_pem_file(&leaf.key_file).unwrap();
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der.clone()], key)
            .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if tcp.peek(&mut first).await.unwrap_or(0) == 0 {
                    return;
                }
                if first[0] == 0x16 {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        echo(tls, name).await;
                    }
                } else {
                    echo(tcp, name).await;
                }
            });
        }
    });
    port
}

/// A TLS client through `addr` verifying `verify` (test CA), sending SNI
/// only when `sni`: the leaf it got and the echo of `ping`.
async fn tls_ping(
    ca: &Ca,
    addr: SocketAddr,
    verify: &str,
    sni: bool,
) -> std::io::Result<(CertificateDer<'static>, String)> {
    let mut config = ca.client_config();
    config.enable_sni = sni;
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(verify.to_owned()).unwrap();
    let mut s = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let leaf = s.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    s.write_all(b"ping").await?;
    let mut buf = vec![0u8; 64];
    let n = s.read(&mut buf).await?;
    Ok((leaf, String::from_utf8_lossy(&buf[..n]).into_owned()))
}

/// Reads until EOF or 5 s: what a client the listener closes gets.
async fn read_to_close(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .is_ok();
    (got, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_passthrough_routes_by_server_name_with_a_default() {
    let ca = Ca::new("sni test ca");
    let (leaf_a, leaf_b, leaf_c) = (
        ca.leaf(&["a.example"], "a"),
        ca.leaf(&["b.example", "*.b.example"], "b"),
        ca.leaf(&["c.example"], "c"),
    );
    let (pa, pb, pc) = (
        backend("A", &leaf_a).await,
        backend("B", &leaf_b).await,
        backend("C", &leaf_c).await,
    );
    let lb = Lb::start(&format!(
        "[[listener]]\nname = \"pass\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nservice = \"c\"\n\
         [[listener.sni_route]]\nserver_names = [\"a.example\"]\nservice = \"a\"\n\
         [[listener.sni_route]]\nserver_names = [\"B.example\", \"*.b.example\"]\nservice = \"b\"\n\
         [[listener]]\nname = \"strict\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n\
         header_read_timeout = \"1s\"\n\
         [[listener.sni_route]]\nserver_names = [\"a.example\"]\nservice = \"a\"\n\
         {}{}{}",
        unchecked_service("a", "a1", pa),
        unchecked_service("b", "b1", pb),
        unchecked_service("c", "c1", pc),
    ));
    let pass = lb.addr("pass");

    // Each name reaches its backend, whose own certificate the client verified.
    let (leaf, echo) = tls_ping(&ca, pass, "a.example", true).await.unwrap();
    assert_eq!((leaf, echo.as_str()), (leaf_a.der.clone(), "A:ping"));
    let (leaf, echo) = tls_ping(&ca, pass, "b.example", true).await.unwrap();
    assert_eq!((leaf, echo.as_str()), (leaf_b.der.clone(), "B:ping"));
    let (leaf, echo) = tls_ping(&ca, pass, "x.b.example", true).await.unwrap();
    assert_eq!((leaf, echo.as_str()), (leaf_b.der.clone(), "B:ping"));

    // No SNI, and a name no route has: the default.
    let (leaf, echo) = tls_ping(&ca, pass, "c.example", false).await.unwrap();
    assert_eq!((leaf, echo.as_str()), (leaf_c.der.clone(), "C:ping"));
    let err = tls_ping(&ca, pass, "y.x.b.example", true)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("only valid for DnsName(\"c.example\")"),
        "the default's certificate is not for y.x.b.example: {err}"
    );

    // Plain text: to the default, the bytes read first replayed.
    let mut plain = TcpStream::connect(pass).await.unwrap();
    plain.write_all(b"hello, not tls").await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = plain.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"C:hello, not tls");

    // Without a default: plain text, a ClientHello without SNI or with an
    // unknown name are closed; a silent client after header_read_timeout.
    let strict = lb.addr("strict");
    let mut plain = TcpStream::connect(strict).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(read_to_close(&mut plain).await, (Vec::new(), true));
    assert!(tls_ping(&ca, strict, "c.example", false).await.is_err());
    assert!(tls_ping(&ca, strict, "b.example", true).await.is_err());
    let (_, echo) = tls_ping(&ca, strict, "a.example", true).await.unwrap();
    assert_eq!(echo, "A:ping");
    let t = Instant::now();
    let mut silent = TcpStream::connect(strict).await.unwrap();
    assert_eq!(read_to_close(&mut silent).await, (Vec::new(), true));
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "closed after {waited:?}, header_read_timeout is 1 s"
    );

    // Every ClientHello above, counted by listener and outcome.
    for (listener, outcome, want) in [
        ("pass", "server_name", 4.0),
        ("pass", "no_server_name", 1.0),
        ("pass", "not_tls", 1.0),
        ("pass", "incomplete", 0.0),
        ("strict", "server_name", 2.0),
        ("strict", "no_server_name", 1.0),
        ("strict", "not_tls", 1.0),
        ("strict", "incomplete", 1.0),
    ] {
        let labels = [
            &format!("listener=\"{listener}\"")[..],
            &format!("outcome=\"{outcome}\"")[..],
        ];
        assert_eq!(
            metric_sum(&lb, "datapunk_lb_sni_client_hellos_total", &labels).await,
            want,
            "{listener} {outcome}"
        );
    }
}

#[test]
fn check_names_bad_sni_routes() {
    let (code, text) = crate::support::check_config(
        "[[listener]]\nname = \"pass\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n\
         [[listener.sni_route]]\nserver_names = [\"a.example\", \"bad name\"]\nservice = \"a\"\n\
         [[listener.sni_route]]\nserver_names = [\"A.example\"]\nservice = \"nope\"\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\
         [[listener.route]]\nservice = \"a\"\n\
         [[listener.sni_route]]\nserver_names = [\"x.example\"]\nservice = \"a\"\n\
         [service.a]\n[[service.a.instance]]\nid = \"a1\"\naddress = \"127.0.0.1\"\nport = 1\n",
    );
    assert_eq!(code, Some(1), "{text}");
    for want in [
        "listener[0].sni_route[0].server_names[1]",
        "\"bad name\" is not a host name",
        "listener[0].sni_route[1].server_names[0]",
        "already routed",
        "listener[0].sni_route[1].service",
        "listener[1].sni_route",
        "needs protocol = \"tcp\"",
    ] {
        assert!(text.contains(want), "{want:?} missing in:\n{text}");
    }
}
