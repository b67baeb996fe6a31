//! TLS termination through the real binary: `https` listeners over HTTP/1.1
//! and HTTP/2 (ALPN), certificates chosen by SNI, `min_version`, client
//! certificates, a `tls` (TCP) listener, live reload from disk under
//! continuous load (no request fails), the expiry gauge and `check`'s
//! errors. Certificates are made here with rcgen: a test CA and leaves
//! written to temp files.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SerialNumber};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::support::{echo_server, metric_sum, temp_path, unchecked_service, Lb, Recorder};

/// A test CA that issues leaves.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A leaf written to disk.
struct Leaf {
    der: CertificateDer<'static>,
    cert_file: PathBuf,
    key_file: PathBuf,
    not_after: i64,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn roots(&self) -> RootCertStore {
        let mut r = RootCertStore::empty();
        r.add(self.cert.der().clone()).unwrap();
        r
    }

    /// A leaf for `names` with serial `serial`, not-after on `year`-06-01.
    fn issue(&self, names: &[&str], serial: u64, year: i32) -> (rcgen::Certificate, KeyPair) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut p = CertificateParams::new(names.clone()).unwrap();
        p.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        p.serial_number = Some(SerialNumber::from(serial));
        p.not_after = rcgen::date_time_ymd(year, 6, 1);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert, key)
    }

    /// Issues a leaf and writes it to `cert_file`/`key_file` (fresh temp
    /// paths when `None`).
    fn leaf_at(&self, names: &[&str], serial: u64, at: Option<(&PathBuf, &PathBuf)>) -> Leaf {
        let year = 2030 + i32::try_from(serial % 20).unwrap();
        let (cert, key) = self.issue(names, serial, year);
        let (cert_file, key_file) = match at {
            Some((c, k)) => (c.clone(), k.clone()),
            None => (temp_path("leaf.pem"), temp_path("leaf.key")),
        };
        write_atomically(&key_file, &key.serialize_pem());
        write_atomically(&cert_file, &cert.pem());
        let days = days_from_civil(i64::from(year), 6, 1);
        Leaf {
            der: cert.der().clone(),
            cert_file,
            key_file,
            not_after: days * 86_400,
        }
    }

    fn leaf(&self, names: &[&str], serial: u64) -> Leaf {
        self.leaf_at(names, serial, None)
    }
}

/// Renames into place, as an ACME client or a secret mount does.
fn write_atomically(path: &PathBuf, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

fn cert_entry(leaf: &Leaf) -> String {
    format!(
        "[[listener.tls.certificate]]\ncert_file = {:?}\nkey_file = {:?}\n",
        leaf.cert_file, leaf.key_file
    )
}

/// An `https` listener `web` with `tls` (a `[listener.tls]` body and its
/// certificates) routing to `backend`.
fn https_config(tls: &str, backend: &Recorder) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"https\"\n\
         [[listener.route]]\nservice = \"api\"\n[listener.tls]\n{tls}\n{}",
        unchecked_service("api", "a", backend.addr.port())
    )
}

fn client_config(ca: &Ca, alpn: &[&[u8]]) -> ClientConfig {
    let mut c =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(ca.roots())
            .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    c
}

/// A TLS connection to `addr`, verifying `name`; SNI sent only if `sni`.
async fn connect(
    addr: std::net::SocketAddr,
    mut config: ClientConfig,
    name: &str,
    sni: bool,
) -> std::io::Result<TlsStream<TcpStream>> {
    config.enable_sni = sni;
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_owned()).unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

fn leaf_of(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// One GET over an established TLS stream; HTTP/2 when ALPN chose it.
async fn get_over(s: TlsStream<TcpStream>, host: &str) -> (u16, String) {
    let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(s);
    let uri = format!("https://{host}/");
    let req = hyper::Request::get(&uri)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn https_serves_http1_and_h2_by_alpn_to_an_http1_backend() {
    let ca = Ca::new("test ca");
    let leaf = ca.leaf(&["api.test"], 1);
    let backend = Recorder::start("hello").await;
    let lb = Lb::start(&https_config(&cert_entry(&leaf), &backend));
    let addr = lb.addr("web");

    let s = connect(addr, client_config(&ca, &[b"http/1.1"]), "api.test", true)
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(get_over(s, "api.test").await, (200, "hello".into()));
    assert_eq!(backend.last("x-forwarded-proto"), ["https"]);

    let s = connect(
        addr,
        client_config(&ca, &[b"h2", b"http/1.1"]),
        "api.test",
        true,
    )
    .await
    .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(get_over(s, "api.test").await, (200, "hello".into()));
    assert_eq!(backend.last("x-forwarded-proto"), ["https"]);

    // Plain HTTP on the TLS port gets no answer.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("hello"));
}

#[tokio::test]
async fn sni_picks_the_certificate_and_the_first_is_the_default() {
    let ca = Ca::new("test ca");
    let a = ca.leaf(&["a.test"], 11);
    let b = ca.leaf(&["*.b.test"], 12);
    let backend = Recorder::start("ok").await;
    let lb = Lb::start(&https_config(
        &format!("{}{}", cert_entry(&a), cert_entry(&b)),
        &backend,
    ));
    let addr = lb.addr("web");
    let cfg = || client_config(&ca, &[b"http/1.1"]);

    let s = connect(addr, cfg(), "a.test", true).await.unwrap();
    assert_eq!(leaf_of(&s), a.der);
    let s = connect(addr, cfg(), "x.b.test", true).await.unwrap();
    assert_eq!(leaf_of(&s), b.der);
    assert_eq!(get_over(s, "x.b.test").await.0, 200);
    // A wildcard covers one label only: the default answers (and fails
    // verification for that name, so look without verifying the name).
    let s = connect(addr, cfg(), "a.test", false).await.unwrap();
    assert_eq!(leaf_of(&s), a.der, "no SNI: the first certificate");
    let err = connect(addr, cfg(), "y.x.b.test", true).await;
    assert!(
        err.is_err(),
        "y.x.b.test gets the default a.test certificate"
    );
}

#[tokio::test]
async fn min_version_13_refuses_a_tls12_client() {
    let ca = Ca::new("test ca");
    let leaf = ca.leaf(&["api.test"], 2);
    let backend = Recorder::start("ok").await;
    let lb = Lb::start(&https_config(
        &format!("min_version = \"1.3\"\n{}", cert_entry(&leaf)),
        &backend,
    ));
    let tls12 = |ca: &Ca| {
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(ca.roots())
            .with_no_client_auth()
    };
    assert!(connect(lb.addr("web"), tls12(&ca), "api.test", true)
        .await
        .is_err());
    let s = connect(lb.addr("web"), client_config(&ca, &[]), "api.test", true)
        .await
        .unwrap();
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );

    // Without min_version, 1.2 is accepted.
    let lb12 = Lb::start(&https_config(&cert_entry(&leaf), &backend));
    let s = connect(lb12.addr("web"), tls12(&ca), "api.test", true)
        .await
        .unwrap();
    assert_eq!(get_over(s, "api.test").await.0, 200);
}

#[tokio::test]
async fn client_auth_required_needs_a_certificate_from_the_client_ca() {
    let ca = Ca::new("server ca");
    let clients = Ca::new("clients ca");
    let other = Ca::new("other ca");
    let leaf = ca.leaf(&["api.test"], 3);
    let ca_file = temp_path("clients-ca.pem");
    std::fs::write(&ca_file, clients.cert.pem()).unwrap();
    let backend = Recorder::start("ok").await;
    let log = temp_path("access.log");
    let config = https_config(
        &format!(
            "client_auth = \"required\"\nclient_ca_file = {ca_file:?}\n{}",
            cert_entry(&leaf)
        ),
        &backend,
    )
    .replacen(
        "protocol = \"https\"\n",
        "protocol = \"https\"\naccess_log = true\n",
        1,
    );
    let lb = Lb::start(&format!("access_log_path = {log:?}\n{config}"));
    let with_cert = |by: &Ca| {
        let (cert, key) = by.issue(&["client.test"], 99, 2040);
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(ca.roots())
            .with_client_auth_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap()
    };
    // TLS 1.3: the refusal arrives after the client's handshake ends, on
    // the first read.
    async fn answers(r: std::io::Result<TlsStream<TcpStream>>) -> bool {
        let Ok(mut s) = r else { return false };
        if s.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
            .await
            .is_err()
        {
            return false;
        }
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.is_ok() && buf.starts_with(b"HTTP/1.1 200")
    }
    let addr = lb.addr("web");
    assert!(!answers(connect(addr, client_config(&ca, &[]), "api.test", true).await).await);
    assert!(!answers(connect(addr, with_cert(&other), "api.test", true).await).await);
    assert!(answers(connect(addr, with_cert(&clients), "api.test", true).await).await);

    // The access log names the verified client (its subject CN).
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let names: Vec<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["client_cert"].as_str().map(str::to_owned))
            .collect();
        if !names.is_empty() {
            assert_eq!(names, ["client.test"]);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_tls_listener_terminates_and_carries_tcp() {
    let ca = Ca::new("test ca");
    let leaf = ca.leaf(&["echo.test"], 4);
    let port = echo_server().await;
    let lb = Lb::start(&format!(
        "[[listener]]\nname = \"echo\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tls\"\n\
         service = \"echo\"\n[listener.tls]\n{}\n{}",
        cert_entry(&leaf),
        unchecked_service("echo", "e", port)
    ));
    let mut s = connect(lb.addr("echo"), client_config(&ca, &[]), "echo.test", true)
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), None);
    s.write_all(b"ping over tls").await.unwrap();
    let mut buf = [0u8; 13];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping over tls");
}

#[tokio::test]
async fn a_tls_listener_closes_a_stalled_handshake_at_its_header_read_timeout() {
    let ca = Ca::new("test ca");
    let leaf = ca.leaf(&["echo.test"], 5);
    let port = echo_server().await;
    let lb = Lb::start(&format!(
        "[[listener]]\nname = \"echo\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tls\"\n\
         service = \"echo\"\nheader_read_timeout = \"1s\"\n[listener.tls]\n{}\n{}",
        cert_entry(&leaf),
        unchecked_service("echo", "e", port)
    ));
    // A client that connects and never says hello: closed at 1 s, not at
    // the 10 s default.
    let mut stalled = TcpStream::connect(lb.addr("echo")).await.unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(8), stalled.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "not closed within 8 s: {read:?}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "closed before its timeout: {:?}",
        t.elapsed()
    );
    // A client that says hello in time still gets through.
    let mut s = connect(lb.addr("echo"), client_config(&ca, &[]), "echo.test", true)
        .await
        .unwrap();
    s.write_all(b"in time").await.unwrap();
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"in time");
}

#[tokio::test]
async fn certificates_reload_from_disk_and_a_broken_one_keeps_the_old() {
    let ca = Ca::new("test ca");
    let first = ca.leaf(&["api.test"], 5);
    let backend = Recorder::start("ok").await;
    let lb = Lb::start(&https_config(&cert_entry(&first), &backend));
    let addr = lb.addr("web");
    let cfg = || client_config(&ca, &[b"http/1.1"]);
    let gauge = || {
        metric_sum(
            &lb,
            "datapunk_lb_tls_certificate_expiry_seconds",
            &["listener=\"web\"", "name=\"api.test\""],
        )
    };
    assert_eq!(gauge().await, first.not_after as f64);

    // An open connection (HTTP/1.1 keep-alive) across the reload.
    let open = connect(addr, cfg(), "api.test", true).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(open))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = || {
        hyper::Request::get("/")
            .header("host", "api.test")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    assert_eq!(send.send_request(req()).await.unwrap().status(), 200);

    // Continuous load across every change below: back to back, a new TLS
    // connection (a full handshake) and one request on it; none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, config) = (stop.clone(), cfg());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let config = config.clone();
                // Its own task: a failed exchange (get_over panics) is counted.
                let one = tokio::spawn(async move {
                    let s = connect(addr, config, "api.test", true).await.ok()?;
                    (get_over(s, "api.test").await.0 == 200).then_some(())
                });
                match one.await {
                    Ok(Some(())) => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        })
    };

    let second = ca.leaf_at(&["api.test"], 6, Some((&first.cert_file, &first.key_file)));
    let start = Instant::now();
    loop {
        let s = connect(addr, cfg(), "api.test", true).await.unwrap();
        if leaf_of(&s) == second.der {
            break;
        }
        assert_eq!(leaf_of(&s), first.der);
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "the new certificate within the poll interval + 2 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(gauge().await, second.not_after as f64);
    let resp = send.send_request(req()).await.unwrap();
    assert_eq!(resp.status(), 200, "the open connection keeps working");

    // Garbage in the cert file: logged, and the second keeps serving.
    write_atomically(
        &first.cert_file,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
    );
    let cert_name = first.cert_file.display().to_string();
    lb.wait_log("the rejected reload", Duration::from_secs(5), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("tls reload rejected"))
            && v["error"].as_str().is_some_and(|e| e.contains(&cert_name))
    })
    .await;
    let s = connect(addr, cfg(), "api.test", true).await.unwrap();
    assert_eq!(leaf_of(&s), second.der);

    // SIGHUP re-reads the files even with the config unchanged. The third
    // certificate is written with the old mtimes, so the poller cannot see
    // it: only the SIGHUP can bring it in.
    let stamp = |p: &PathBuf| std::fs::metadata(p).unwrap().modified().unwrap();
    let (cert_t, key_t) = (stamp(&first.cert_file), stamp(&first.key_file));
    let third = ca.leaf_at(&["api.test"], 7, Some((&first.cert_file, &first.key_file)));
    for (p, t) in [(&first.cert_file, cert_t), (&first.key_file, key_t)] {
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = connect(addr, cfg(), "api.test", true).await.unwrap();
    assert_eq!(leaf_of(&s), second.der, "no change seen by the poller");
    lb.signal("HUP");
    let start = Instant::now();
    loop {
        let s = connect(addr, cfg(), "api.test", true).await.unwrap();
        if leaf_of(&s) == third.der {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(4));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert_eq!(
        failed, 0,
        "requests failed across the reloads ({ok} served)"
    );
    assert!(ok >= 20, "the load ran: {ok} requests");
}

/// `datapunk-lb check --config path`.
fn check(path: &PathBuf) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_datapunk-lb"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn check_names_the_missing_key_file_and_its_line() {
    let ca = Ca::new("test ca");
    let leaf = ca.leaf(&["api.test"], 8);
    let missing = temp_path("missing.key");
    let config = format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"https\"\n\
         [[listener.route]]\nservice = \"api\"\n[listener.tls]\n\
         [[listener.tls.certificate]]\ncert_file = {:?}\nkey_file = {missing:?}\n{}",
        leaf.cert_file,
        unchecked_service("api", "a", 9)
    );
    let path = temp_path("tls-check.toml");
    std::fs::write(&path, &config).unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 10: listener[0].tls.certificate[0].key_file"),
        "{stderr}"
    );

    // A key that is not the certificate's.
    let other = ca.leaf(&["other.test"], 9);
    std::fs::write(
        &path,
        config.replace(&format!("{missing:?}"), &format!("{:?}", other.key_file)),
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listener[0].tls.certificate[0].key_file")
            && stderr.contains("does not match"),
        "{stderr}"
    );

    // `required` without a CA.
    std::fs::write(
        &path,
        config
            .replace(
                "[listener.tls]\n",
                "[listener.tls]\nclient_auth = \"required\"\n",
            )
            .replace(&format!("{missing:?}"), &format!("{:?}", leaf.key_file)),
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 8: listener[0].tls.client_auth"),
        "{stderr}"
    );

    // An expired certificate: a warning, not an error.
    let (cert, key) = ca.issue(&["old.test"], 10, 2001);
    let (cf, kf) = (temp_path("old.pem"), temp_path("old.key"));
    std::fs::write(&cf, cert.pem()).unwrap();
    std::fs::write(&kf, key.serialize_pem()).unwrap();
    std::fs::write(
        &path,
        config
            .replace(&format!("{:?}", leaf.cert_file), &format!("{cf:?}"))
            .replace(&format!("{missing:?}"), &format!("{kf:?}")),
    )
    .unwrap();
    let out = check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("warning: certificate") && stdout.contains("expired"),
        "{stdout}"
    );
}
