//! TLS to etcd members: the rustls `ClientConfig` of an [`EtcdTls`] and
//! the connector tonic dials `https://` endpoints through.
//!
//! Why our own connector (through `Endpoint::connect_with_connector`)
//! rather than tonic's `tls` feature: the feature adds `rustls-pemfile` and
//! its own PEM handling, while everything needed is already built for the
//! listeners (rustls with *ring*, tokio-rustls, rustls-pki-types), so this
//! costs no new crate and loads PEM files one way across the binary.
//!
//! Rules:
//! - The server certificate is verified against `ca_file` only (no system
//!   roots), for the endpoint's host: a DNS name, or an IP address that
//!   must be in the certificate's IP SANs (what etcd's own tooling makes).
//! - The client certificate, when configured, is offered if etcd asks
//!   (`--client-cert-auth`).
//! - ALPN `h2`: gRPC-Go servers refuse TLS clients without it.
//! - The files are read at each connect ([`client_config`]), so a renewed
//!   client certificate or CA bundle is picked up at the next reconnect.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::EtcdTls;
use crate::proxy::tls::{certs, load_certificate};

/// The rustls client settings of `tls`, read from its files now; the error
/// names the file.
pub(crate) fn client_config(tls: &EtcdTls) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for c in certs(&tls.ca_file).map_err(|e| e.to_string())? {
        roots
            .add(c)
            .map_err(|e| format!("{}: bad CA certificate: {e}", tls.ca_file.display()))?;
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
    let mut config = match &tls.client {
        None => builder.with_no_client_auth(),
        Some((cert_file, key_file)) => {
            let loaded = load_certificate(cert_file, key_file).map_err(|e| e.to_string())?;
            builder.with_client_cert_resolver(Arc::new(ClientCertificate(loaded.key)))
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The one client certificate, offered whenever the server asks.
#[derive(Debug)]
struct ClientCertificate(Arc<CertifiedKey>);

impl ResolvesClientCert for ClientCertificate {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Dials `https://host:port` URIs: TCP, then a TLS handshake verifying the
/// host. A `tower_service::Service<Uri>` as tonic's connector wants.
#[derive(Clone)]
pub(crate) struct EtcdConnector {
    tls: TlsConnector,
}

impl EtcdConnector {
    /// A connector with `config`.
    pub(crate) fn new(config: Arc<ClientConfig>) -> Self {
        Self {
            tls: TlsConnector::from(config),
        }
    }
}

type Connecting = Pin<Box<dyn Future<Output = io::Result<TokioIo<TlsStream<TcpStream>>>> + Send>>;

impl tower_service::Service<Uri> for EtcdConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let invalid =
                |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: {what}"));
            let host = uri.host().ok_or_else(|| invalid("no host"))?;
            let port = uri.port_u16().ok_or_else(|| invalid("no port"))?;
            // `[::1]` in a URI, `::1` as an address and a server name.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| invalid(&format!("not a server name: {e}")))?;
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(name, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}
