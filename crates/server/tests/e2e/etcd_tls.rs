//! etcd over TLS: a real etcd serving `https` with `--cert-file`,
//! `--key-file`, `--trusted-ca-file` and `--client-cert-auth`, certificates
//! made here by a test CA (`support/pki.rs`). A node discovers over TLS
//! with a client certificate and routes to an instance the `register`
//! sidecar put over TLS; a client without a certificate, or trusting
//! another CA, is refused. Skips with a printed reason without etcd (fails
//! under `DATAPUNK_LB_REQUIRE_ALL=1`).

use std::time::{Duration, Instant};

use datapunk_lb::config::EtcdTls;
use datapunk_lb::discovery::etcd::client::Client;

use crate::support::etcd::*;
use crate::support::pki::{Ca, Leaf};
use crate::support::*;

/// A CA, etcd's server certificate for 127.0.0.1 and a client certificate.
struct Pki {
    ca: Ca,
    server: Leaf,
    client: Leaf,
}

impl Pki {
    fn new() -> Pki {
        let ca = Ca::new("etcd test ca");
        let server = ca.leaf(&["127.0.0.1", "localhost"], "etcd");
        let client = ca.leaf(&["datapunk-lb"], "datapunk-lb");
        Pki { ca, server, client }
    }

    fn client_tls(&self) -> EtcdTls {
        EtcdTls {
            ca_file: self.ca.cert_file.clone(),
            client: Some((self.client.cert_file.clone(), self.client.key_file.clone())),
        }
    }

    fn server_tls(&self) -> ServerTls {
        ServerTls {
            cert_file: self.server.cert_file.clone(),
            key_file: self.server.key_file.clone(),
            client_ca_file: self.ca.cert_file.clone(),
            client: self.client_tls(),
        }
    }
}

/// Connects with `tls` and reads a key: the first call is where a TLS 1.3
/// server's refusal of the client certificate shows.
async fn read_with(url: &str, tls: &EtcdTls) -> Result<(), String> {
    let mut c = Client::connect_tls(url, tls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(5), c.get("/x"))
        .await
        .map_err(|_| "no answer in 5 s".to_owned())?
        .map(drop)
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_discovers_a_sidecar_registration_with_client_certificates() {
    let Some(bin) = etcd_bin() else { return };
    let pki = Pki::new();
    let etcd = Etcd::start_tls(&bin, pki.server_tls()).await;
    let url = etcd.url();
    assert!(url.starts_with("https://"), "{url}");

    let base = Backend::start("base").await;
    let side = Backend::start("side-1").await;
    let config = format!(
        "{}ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
        node_config(&base, &url),
        pki.ca.cert_file,
        pki.client.cert_file,
        pki.client.key_file
    );
    let lb = Lb::start(&config);
    let t = Instant::now();
    while admin(lb.addr("admin"), "GET", "/readyz", None, None)
        .await
        .0
        != 200
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "node not ready: no first sync over TLS"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The sidecar over TLS, a bare host:port made https by --ca-file.
    let bare = url.trim_start_matches("https://");
    let ca = pki.ca.cert_file.to_str().unwrap();
    let (cert, key) = (
        pki.client.cert_file.to_str().unwrap(),
        pki.client.key_file.to_str().unwrap(),
    );
    let sidecar = Sidecar::start_with(
        bare,
        "side-1",
        &side,
        "5s",
        &["--ca-file", ca, "--cert-file", cert, "--key-file", key],
    );
    sidecar.registered().await;
    until_routes(&lb, "side-1", true, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_refuses_a_client_without_a_certificate_or_the_ca() {
    let Some(bin) = etcd_bin() else { return };
    let pki = Pki::new();
    let etcd = Etcd::start_tls(&bin, pki.server_tls()).await;
    let url = etcd.url();

    // The right certificate reads (so the refusals below are about TLS).
    read_with(&url, &pki.client_tls()).await.unwrap();

    let anonymous = EtcdTls {
        ca_file: pki.ca.cert_file.clone(),
        client: None,
    };
    let err = read_with(&url, &anonymous).await.unwrap_err();
    assert!(!err.is_empty());

    let other = Ca::new("another ca");
    let stranger = EtcdTls {
        ca_file: other.cert_file.clone(),
        client: Some((pki.client.cert_file.clone(), pki.client.key_file.clone())),
    };
    let err = read_with(&url, &stranger).await.unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.to_lowercase().contains("certificate"),
        "{err}"
    );

    // The sidecar without --cert-file never registers, and says why.
    let side = Backend::start("side-x").await;
    let ca = pki.ca.cert_file.to_str().unwrap();
    let sidecar = Sidecar::start_with(&url, "side-x", &side, "5s", &["--ca-file", ca]);
    let t = Instant::now();
    loop {
        let logged = sidecar
            .log
            .lock()
            .iter()
            .any(|(_, v)| v["message"] == "register: etcd unreachable; retrying");
        if logged {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no retry logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!sidecar
        .log
        .lock()
        .iter()
        .any(|(_, v)| v["message"] == "register: instance registered"));
}

#[test]
fn check_names_the_etcd_tls_keys() {
    let (code, text) = crate::support::check_config(
        "[discovery]\nkind = \"etcd\"\nendpoints = [\"https://127.0.0.1:2379\", \"http://127.0.0.1:2380\"]\n\
         ca_file = \"/nonexistent/ca.pem\"\ncert_file = \"/nonexistent/c.pem\"\n",
    );
    assert_eq!(code, Some(1), "{text}");
    for want in [
        "discovery.endpoints[1]",
        "no mixing",
        "discovery.ca_file",
        "/nonexistent/ca.pem: cannot read",
        "discovery.cert_file",
        "needs key_file",
    ] {
        assert!(text.contains(want), "{want:?} missing in:\n{text}");
    }
}
