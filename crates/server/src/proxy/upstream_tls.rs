//! TLS to the instances of a service (`[service.X.tls]`): one rustls
//! `ClientConfig` per service, shared by every connection the pool and the
//! health checks open to its instances, and the stream they speak over.
//!
//! ## Rules
//!
//! - **Trust**: the certificates of `ca_file` (PEM bundle) when set, else
//!   the operating system's store (`rustls-native-certs`: on Linux the
//!   bundle OpenSSL would use, `SSL_CERT_FILE` / `SSL_CERT_DIR` honoured),
//!   read once per process. No `ca_file` and an empty system store is a
//!   config error naming the table: nothing could ever be verified.
//! - **Name** (`server_name`): the SNI sent and the name the certificate
//!   must carry; default the instance's address, so an IP instance is
//!   verified against the certificate's IP SANs (and sends no SNI, as RFC
//!   6066 forbids IP literals there).
//! - **Client certificate** (`cert_file` + `key_file`): sent whenever the
//!   server asks (mTLS); loaded by the listener code's loader, so a key that
//!   does not match its certificate is an error.
//! - **`insecure_skip_verify`**: any certificate and name are accepted (the
//!   handshake signature is still checked, so the peer holds the key of the
//!   certificate it showed); a warning is logged at start and on each reload.
//! - **ALPN** follows `upstream_protocol`: `http1` offers `http/1.1`, `h2c`
//!   offers `h2` (over TLS it is plain HTTP/2), `auto` offers both and the
//!   connection speaks what the server picked. A server that picks nothing
//!   gets what the key names (`auto`: HTTP/1.1, the RFC 7301 default).
//! - **Upgrades** (WebSocket) run over HTTP/1.1, so their connections offer
//!   only `http/1.1` whatever `upstream_protocol` says.
//! - **Resumption**: rustls' in-memory client session cache
//!   ([`SESSION_CACHE_ENTRIES`] server names), in the shared config, so a
//!   new connection to an instance already met resumes (TLS 1.3 tickets,
//!   TLS 1.2 ids) instead of a full handshake.
//! - **Handshake time**: bounded by the service's `connect_timeout`, like
//!   the TCP connect before it; a failure is a connect failure (nothing
//!   reached the instance).
//! - **Provider**: *ring*, as for the listeners (`proxy/tls.rs`); TLS 1.2
//!   and 1.3 with rustls' safe defaults.

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::maybe_tls::MaybeTls;
use super::tls::{certs, load_certificate, provider, TlsError};
use crate::config::{UpstreamProtocol, UpstreamTlsConfig};

/// Server names whose sessions the client cache keeps per service
/// (rustls' default is 256; one per instance when `server_name` is unset).
pub(crate) const SESSION_CACHE_ENTRIES: usize = 1024;

/// Why a service's upstream TLS could not be set up; [`Self::key`] names
/// the config key at fault.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamTlsError {
    /// `ca_file` unreadable, not PEM, or holding an unusable certificate.
    #[error("{0}")]
    CaFile(TlsError),
    /// No `ca_file` and nothing usable in the system store.
    #[error("no ca_file and no system root certificates could be loaded ({0}); set ca_file")]
    NoSystemRoots(String),
    /// `cert_file` / `key_file` unreadable, not PEM, or not a pair.
    #[error("{0}")]
    ClientCert(TlsError),
    /// `server_name` is neither a DNS name nor an IP address.
    #[error("{0:?} is not a DNS name or an IP address")]
    ServerName(String),
    /// rustls refused the settings.
    #[error("{0}")]
    Rustls(String),
}

impl UpstreamTlsError {
    /// The key of `[service.X.tls]` the error is about (`""`: the table).
    pub(crate) fn key(&self, cfg: &UpstreamTlsConfig) -> &'static str {
        match self {
            UpstreamTlsError::CaFile(_) => "ca_file",
            UpstreamTlsError::ServerName(_) => "server_name",
            UpstreamTlsError::ClientCert(e) => {
                let key_file = cfg.client_cert.as_ref().map(|c| &c.key_file);
                match e {
                    TlsError::Read { path, .. } | TlsError::Pem { path, .. }
                        if Some(path) == key_file =>
                    {
                        "key_file"
                    }
                    TlsError::Mismatch { .. } => "key_file",
                    _ => "cert_file",
                }
            }
            UpstreamTlsError::NoSystemRoots(_) | UpstreamTlsError::Rustls(_) => "",
        }
    }
}

/// One service's upstream TLS: its shared client config and name rule.
#[derive(Debug)]
pub(crate) struct UpstreamTls {
    /// Shared by every connection: its session cache is what resumes.
    config: Arc<ClientConfig>,
    /// The same, offering only `http/1.1` (same session cache), for
    /// HTTP/1.1 upgrades (WebSocket), which cannot run over h2.
    config_http1: Arc<ClientConfig>,
    /// `server_name`; `None`: each instance's address.
    server_name: Option<ServerName<'static>>,
    /// What a connection speaks when the server picks no ALPN protocol.
    h2_without_alpn: bool,
    /// Whether certificates go unverified (for the start-up warning).
    insecure: bool,
}

impl UpstreamTls {
    /// Reads the files of `cfg` and builds the client config, ALPN from
    /// `protocol`.
    pub(crate) fn build(
        cfg: &UpstreamTlsConfig,
        protocol: UpstreamProtocol,
    ) -> Result<Self, UpstreamTlsError> {
        let server_name = cfg
            .server_name
            .as_ref()
            .map(|n| {
                ServerName::try_from(n.as_str())
                    .map(|s| s.to_owned())
                    .map_err(|_| UpstreamTlsError::ServerName(n.clone()))
            })
            .transpose()?;
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| UpstreamTlsError::Rustls(e.to_string()))?;
        let builder = if cfg.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
        } else {
            builder.with_root_certificates(roots(cfg)?)
        };
        let mut config = match &cfg.client_cert {
            Some(c) => {
                let loaded = load_certificate(&c.cert_file, &c.key_file)
                    .map_err(UpstreamTlsError::ClientCert)?;
                builder.with_client_cert_resolver(Arc::new(ClientCert(loaded.key)))
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = match protocol {
            UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
            UpstreamProtocol::H2c => vec![b"h2".to_vec()],
            UpstreamProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        config.resumption = Resumption::in_memory_sessions(SESSION_CACHE_ENTRIES);
        // A clone shares the session store (it is behind an `Arc`).
        let mut config_http1 = config.clone();
        config_http1.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            config_http1: Arc::new(config_http1),
            server_name,
            h2_without_alpn: protocol == UpstreamProtocol::H2c,
            insecure: cfg.insecure_skip_verify,
        })
    }

    /// Whether certificates go unverified (`insecure_skip_verify`).
    pub(crate) fn is_insecure(&self) -> bool {
        self.insecure
    }

    /// The TLS handshake over `tcp` to the instance at `address` (an IP
    /// or a host name, no brackets), within `timeout`.
    pub(crate) async fn handshake(
        &self,
        tcp: TcpStream,
        address: &str,
        timeout: Duration,
    ) -> io::Result<UpstreamIo> {
        self.handshake_with(&self.config, tcp, address, timeout)
            .await
    }

    /// [`Self::handshake`] offering only `http/1.1` by ALPN: for an
    /// HTTP/1.1 upgrade (WebSocket), whatever `upstream_protocol` says.
    pub(crate) async fn handshake_http1(
        &self,
        tcp: TcpStream,
        address: &str,
        timeout: Duration,
    ) -> io::Result<UpstreamIo> {
        self.handshake_with(&self.config_http1, tcp, address, timeout)
            .await
    }

    async fn handshake_with(
        &self,
        config: &Arc<ClientConfig>,
        tcp: TcpStream,
        address: &str,
        timeout: Duration,
    ) -> io::Result<UpstreamIo> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => ServerName::try_from(address)
                .map(|s| s.to_owned())
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{address:?} is not a DNS name or an IP address: set server_name"),
                    )
                })?,
        };
        let tls = tokio::time::timeout(
            timeout,
            TlsConnector::from(config.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(MaybeTls::Tls(Box::new(tls)))
    }

    /// Whether `io`, made by [`Self::handshake`], speaks HTTP/2: the
    /// server's ALPN choice, else what the service is configured for.
    pub(crate) fn speaks_h2(&self, io: &UpstreamIo) -> bool {
        io.negotiated_h2().unwrap_or(self.h2_without_alpn)
    }
}

/// The trust anchors of `cfg`: its `ca_file`, else the system's.
fn roots(cfg: &UpstreamTlsConfig) -> Result<RootCertStore, UpstreamTlsError> {
    let Some(ca) = &cfg.ca_file else {
        return system_roots().map(|r| (*r).clone());
    };
    let mut roots = RootCertStore::empty();
    for c in certs(ca).map_err(UpstreamTlsError::CaFile)? {
        roots.add(c).map_err(|e| {
            UpstreamTlsError::CaFile(TlsError::Pem {
                path: ca.clone(),
                what: format!("bad CA certificate: {e}"),
            })
        })?;
    }
    Ok(roots)
}

/// The system store, read once: it changes with OS updates, not config.
fn system_roots() -> Result<Arc<RootCertStore>, UpstreamTlsError> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "the store is empty".to_owned(), ToString::to_string);
                return Err(why);
            }
            Ok(Arc::new(roots))
        })
        .clone()
        .map_err(UpstreamTlsError::NoSystemRoots)
}

/// The client certificate, offered whenever the server asks.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `insecure_skip_verify`: any certificate for any name, but the handshake
/// signature must still be valid for the certificate shown.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A connection to an instance: plain TCP (no `[service.X.tls]`), or TLS
/// over it.
pub(crate) type UpstreamIo = MaybeTls<TlsStream<TcpStream>>;

impl UpstreamIo {
    /// The protocol the server chose by ALPN: `Some(true)` for `h2`,
    /// `Some(false)` for another; `None` when it chose none or the
    /// connection is plain (the caller's configured protocol decides).
    pub(crate) fn negotiated_h2(&self) -> Option<bool> {
        match self {
            MaybeTls::Plain(_) => None,
            MaybeTls::Tls(s) => s.get_ref().1.alpn_protocol().map(|p| p == b"h2"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use datapunk_lb_core::ServiceInstance;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper_util::rt::TokioIo;
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::*;
    use crate::config::ClientCertFiles;
    use crate::proxy::pool::Pool;

    fn temp(name: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("dplb-uptls-{}-{n}-{name}", std::process::id()))
    }

    /// A self-signed certificate for `names`, written to disk.
    struct SelfSigned {
        cert: rcgen::Certificate,
        key: rcgen::KeyPair,
        cert_file: PathBuf,
        key_file: PathBuf,
    }

    fn self_signed(names: &[&str]) -> SelfSigned {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_file, key_file) = (temp("cert.pem"), temp("key.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        SelfSigned {
            cert,
            key,
            cert_file,
            key_file,
        }
    }

    fn trusting(ca: &SelfSigned) -> UpstreamTlsConfig {
        UpstreamTlsConfig {
            ca_file: Some(ca.cert_file.clone()),
            server_name: None,
            client_cert: None,
            insecure_skip_verify: false,
        }
    }

    /// A TLS server offering only `http/1.1`, answering `ok`; returns its
    /// port and the number of connections it accepted.
    async fn http1_only_server(leaf: &SelfSigned) -> (u16, Arc<AtomicUsize>) {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key.serialize_der())),
            )
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepts = Arc::new(AtomicUsize::new(0));
        let n = accepts.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        (port, accepts)
    }

    #[tokio::test]
    async fn auto_learns_http1_by_alpn_and_the_learning_connection_carries_the_request() {
        let leaf = self_signed(&["127.0.0.1"]);
        let (port, accepts) = http1_only_server(&leaf).await;
        let tls = UpstreamTls::build(&trusting(&leaf), UpstreamProtocol::Auto).unwrap();
        let pool = Pool::new(Duration::from_secs(1), Some(Arc::new(tls)), None);
        let to = pool
            .instance(&ServiceInstance::try_new("a", "127.0.0.1", port).unwrap())
            .unwrap();
        assert!(
            !pool.alpn_h2(&to).await.unwrap(),
            "the server offers only http/1.1"
        );
        assert!(!pool.alpn_h2(&to).await.unwrap(), "remembered");
        for _ in 0..3 {
            let mut req = hyper::Request::new(Empty::new().map_err(|n| match n {}).boxed());
            *req.uri_mut() = http::Uri::from_static("/");
            req.headers_mut()
                .insert(http::header::HOST, http::HeaderValue::from_static("x"));
            let resp = pool.send_h1_request(&to, req).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            // Let the connection go back to the idle list.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            accepts.load(Ordering::SeqCst),
            1,
            "the connection that learnt the protocol is the one reused"
        );
    }

    #[test]
    fn each_setup_error_names_its_key() {
        let ca = self_signed(&["api.internal"]);
        let other = self_signed(&["other.internal"]);
        let key = |cfg: &UpstreamTlsConfig| {
            let e = UpstreamTls::build(cfg, UpstreamProtocol::Http1).unwrap_err();
            (e.key(cfg), e.to_string())
        };
        let mut cfg = trusting(&ca);
        cfg.ca_file = Some(temp("missing.pem"));
        assert_eq!(key(&cfg).0, "ca_file");
        let mut cfg = trusting(&ca);
        cfg.server_name = Some("no spaces allowed".into());
        assert_eq!(key(&cfg).0, "server_name");
        let mut cfg = trusting(&ca);
        cfg.client_cert = Some(ClientCertFiles {
            cert_file: ca.cert_file.clone(),
            key_file: other.key_file.clone(),
        });
        let (k, why) = key(&cfg);
        assert_eq!(k, "key_file", "{why}");
        assert!(why.contains("does not match"), "{why}");
        cfg.client_cert = Some(ClientCertFiles {
            cert_file: temp("missing-cert.pem"),
            key_file: ca.key_file.clone(),
        });
        assert_eq!(key(&cfg).0, "cert_file");
        cfg.client_cert = Some(ClientCertFiles {
            cert_file: ca.cert_file.clone(),
            key_file: ca.key_file.clone(),
        });
        assert!(UpstreamTls::build(&cfg, UpstreamProtocol::Http1).is_ok());
    }
}
