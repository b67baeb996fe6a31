//! TLS termination for `https` and `tls` listeners: the `[listener.tls]`
//! table turned into a rustls `ServerConfig`, the SNI choice of certificate,
//! and live reload.
//!
//! Rules:
//! - **Provider**: rustls 0.23 with *ring* (aws-lc-rs needs cmake and a much
//!   longer build on CI's 2 cores); PEM through `rustls-pki-types`; no
//!   OpenSSL. TLS 1.2 and 1.3, rustls' default suites; `min_version =
//!   "1.3"` drops 1.2.
//! - **SNI**: each certificate serves the names of `server_names`, default
//!   its DNS SANs; `*.example.com` matches one label. Exact names win over
//!   wildcards, earlier certificates over later ones. The first certificate
//!   answers when SNI is absent or matches nothing.
//! - **ALPN**: `https` offers `h2` then `http/1.1`; `tls` offers none.
//! - **Handshake**: in the connection's task (never on the accept loop),
//!   bounded by the listener's `header_read_timeout`.
//! - **Reload**: on SIGHUP (every file re-read, even with the config file
//!   unchanged) and when a certificate, key or CA file's mtime changes
//!   ([`POLL_INTERVAL`], one task for all listeners). A new `ServerConfig` is
//!   built whole and swapped in one store: new handshakes use it,
//!   connections in flight keep theirs. A file that cannot be read, bad PEM
//!   or a key that does not match its certificate rejects the reload with a
//!   logged reason naming the file; the old certificates keep serving.
//! - **Expiry**: `datapunk_lb_tls_certificate_expiry_seconds{listener,name}`
//!   is the leaf's not-after (Unix seconds), read by [`not_after`], a small
//!   DER walk (x509-parser would be a heavy dependency for one field).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::{error, info};

use super::maybe_tls::MaybeTls;
use crate::config::{ClientAuth, TlsCertificate, TlsListenerConfig, TlsVersion};
use crate::metrics::Metrics;

/// How often certificate, key and CA files are checked for a change.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Why a TLS setup could not be loaded; each names the file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// The file is not the PEM expected.
    #[error("{}: {what}", path.display())]
    Pem { path: PathBuf, what: String },
    /// The key does not belong to the certificate.
    #[error("{}: private key does not match the certificate {}", key.display(), cert.display())]
    Mismatch { key: PathBuf, cert: PathBuf },
    /// rustls refused the settings.
    #[error("{0}")]
    Rustls(String),
}

/// A certificate loaded from its files.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// Chain and signing key.
    pub(crate) key: Arc<CertifiedKey>,
    /// The DNS names of the leaf (its SANs).
    pub(crate) dns_names: Vec<String>,
    /// Leaf not-after, Unix seconds (`None` if the DER walk failed).
    pub(crate) not_after: Option<i64>,
}

impl Loaded {
    /// The `name` label of the expiry metric: the first DNS SAN, else the
    /// certificate file's name.
    pub(crate) fn label(&self, cert_file: &Path) -> String {
        self.dns_names.first().cloned().unwrap_or_else(|| {
            cert_file
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The PEM certificates of `path` (at least one).
pub(crate) fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: format!("bad PEM certificate: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "no PEM certificate in the file".into(),
        });
    }
    Ok(certs)
}

/// Loads a PEM chain (leaf first) and its PEM key (PKCS#8, PKCS#1 or SEC1;
/// RSA, ECDSA or Ed25519), and checks that the key is the certificate's.
pub(crate) fn load_certificate(cert_file: &Path, key_file: &Path) -> Result<Loaded, TlsError> {
    let chain = certs(cert_file)?;
    let key_pem = read(key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        path: key_file.to_owned(),
        what: format!("bad PEM private key: {e}"),
    })?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Pem {
            path: key_file.to_owned(),
            what: format!("unsupported private key: {e}"),
        })?;
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::Mismatch {
                key: key_file.to_owned(),
                cert: cert_file.to_owned(),
            })
        }
        // A key whose public half rustls cannot derive: nothing to compare.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => {
            return Err(TlsError::Pem {
                path: cert_file.to_owned(),
                what: format!("bad certificate: {e}"),
            })
        }
    }
    let leaf = &certified.cert[0];
    let dns_names = webpki::EndEntityCert::try_from(leaf)
        .map(|c| c.valid_dns_names().map(str::to_owned).collect())
        .map_err(|e| TlsError::Pem {
            path: cert_file.to_owned(),
            what: format!("bad certificate: {e}"),
        })?;
    let not_after = not_after(leaf.as_ref());
    Ok(Loaded {
        key: Arc::new(certified),
        dns_names,
        not_after,
    })
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SNI choice of certificate.
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni.map(str::to_ascii_lowercase) else {
            return self.default.clone();
        };
        if let Some(k) = self.exact.get(&name) {
            return k.clone();
        }
        // One label only: `a.example.com` matches `*.example.com`, `b.a.example.com` does not.
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(parent) {
                return k.clone();
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// One listener's certificates as loaded, for the metric.
#[derive(Debug)]
struct Built {
    config: Arc<ServerConfig>,
    labels: Vec<(String, Option<i64>)>,
}

/// Builds the whole `ServerConfig` of a listener from its files.
fn build(tls: &TlsListenerConfig, alpn_http: bool) -> Result<Built, TlsError> {
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    let mut default = None;
    let mut labels = Vec::new();
    for c in &tls.certificates {
        let loaded = load_certificate(&c.cert_file, &c.key_file)?;
        labels.push((loaded.label(&c.cert_file), loaded.not_after));
        let names = if c.server_names.is_empty() {
            &loaded.dns_names
        } else {
            &c.server_names
        };
        for n in names {
            let n = n.to_ascii_lowercase();
            match n.strip_prefix("*.") {
                Some(parent) => wildcard.entry(parent.to_owned()),
                None => exact.entry(n),
            }
            .or_insert_with(|| loaded.key.clone());
        }
        default.get_or_insert_with(|| loaded.key.clone());
    }
    let default = default.ok_or_else(|| TlsError::Rustls("no certificate".into()))?;
    let resolver = Arc::new(SniResolver {
        exact,
        wildcard,
        default,
    });
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match (&tls.client_ca_file, tls.client_auth) {
        (Some(ca), ClientAuth::Optional | ClientAuth::Required) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c).map_err(|e| TlsError::Pem {
                    path: ca.clone(),
                    what: format!("bad CA certificate: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if tls.client_auth == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::Rustls(format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        // `none`; config refuses `optional` and `required` without a CA.
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    if alpn_http {
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    Ok(Built {
        config: Arc::new(config),
        labels,
    })
}

/// The files a listener's TLS reads, with their mtimes.
fn mtimes(tls: &TlsListenerConfig) -> Vec<Option<SystemTime>> {
    let files = tls
        .certificates
        .iter()
        .flat_map(|c: &TlsCertificate| [&c.cert_file, &c.key_file])
        .chain(tls.client_ca_file.as_ref());
    files
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

/// What a listener's last load read, and the expiry series it published.
#[derive(Debug)]
struct State {
    tls: TlsListenerConfig,
    /// The files' mtimes at the last load attempt.
    stamps: Vec<Option<SystemTime>>,
    /// `name` label and not-after of each certificate loaded.
    labels: Vec<(String, Option<i64>)>,
    /// The `name` labels set in the metric.
    published: Vec<String>,
}

/// The TLS side of one listener: the current `ServerConfig`, swapped on
/// reload.
#[derive(Debug)]
pub(crate) struct TlsListener {
    name: String,
    alpn_http: bool,
    current: ArcSwap<ServerConfig>,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

impl TlsListener {
    /// Loads `tls` for listener `name` (`alpn_http`: offer h2 and
    /// http/1.1). Nothing is published until [`TlsListener::publish`].
    pub(crate) fn load(
        name: &str,
        tls: &TlsListenerConfig,
        alpn_http: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TlsError> {
        let stamps = mtimes(tls);
        let built = build(tls, alpn_http)?;
        Ok(Self {
            name: name.to_owned(),
            alpn_http,
            current: ArcSwap::new(built.config),
            state: Mutex::new(State {
                tls: tls.clone(),
                stamps,
                labels: built.labels,
                published: Vec::new(),
            }),
            metrics,
        })
    }

    /// Sets the expiry series of the certificates loaded (and drops the
    /// ones no longer served).
    pub(crate) fn publish(&self) {
        let mut state = self.state.lock();
        for old in std::mem::take(&mut state.published) {
            self.metrics.remove_tls_expiry(&self.name, &old);
        }
        let labels = state.labels.clone();
        for (name, not_after) in labels {
            if let Some(t) = not_after {
                self.metrics.set_tls_expiry(&self.name, &name, t);
            }
            state.published.push(name);
        }
    }

    /// Takes `fresh`'s certificates and settings (a SIGHUP reload of a
    /// listener that keeps running): new handshakes use them.
    pub(crate) fn adopt(&self, fresh: TlsListener) {
        let loaded = fresh.state.into_inner();
        {
            let mut state = self.state.lock();
            state.tls = loaded.tls;
            state.stamps = loaded.stamps;
            state.labels = loaded.labels;
        }
        self.current.store(fresh.current.load_full());
        self.publish();
    }

    /// Re-reads every file if one's mtime changed since the last attempt.
    /// On error the old certificates keep serving and the reason is
    /// logged, once per change.
    fn poll(&self) {
        let tls = {
            let mut state = self.state.lock();
            let now = mtimes(&state.tls);
            if now == state.stamps {
                return;
            }
            state.stamps = now;
            state.tls.clone()
        };
        match Self::load(&self.name, &tls, self.alpn_http, self.metrics.clone()) {
            Ok(fresh) => {
                self.adopt(fresh);
                info!(
                    listener = self.name.as_str(),
                    "tls certificates reloaded: a file changed"
                );
            }
            Err(e) => {
                error!(listener = self.name.as_str(), error = %e, "tls reload rejected: the old certificates keep serving");
            }
        }
    }

    /// Drops this listener's expiry series (the listener stopped).
    pub(crate) fn retire(&self) {
        let mut state = self.state.lock();
        for old in std::mem::take(&mut state.published) {
            self.metrics.remove_tls_expiry(&self.name, &old);
        }
    }

    /// The TLS handshake of one client connection, bounded by `timeout`.
    pub(crate) async fn accept(
        &self,
        stream: TcpStream,
        timeout: Duration,
    ) -> io::Result<TlsStream<TcpStream>> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current.load_full());
        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "tls handshake timed out",
            )),
        }
    }
}

/// The TLS listeners running, polled for file changes by one task.
#[derive(Debug, Default, Clone)]
pub(crate) struct TlsListeners(Arc<Mutex<HashMap<String, Arc<TlsListener>>>>);

impl TlsListeners {
    /// The running listener `name`'s TLS, if any.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<TlsListener>> {
        self.0.lock().get(name).cloned()
    }

    /// Records `tls` as listener `name`'s.
    pub(crate) fn insert(&self, name: &str, tls: Arc<TlsListener>) {
        self.0.lock().insert(name.to_owned(), tls);
    }

    /// Keeps only the listeners `keep` says yes to.
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.0.lock().retain(|name, t| {
            let k = keep(name);
            if !k {
                t.retire();
            }
            k
        });
    }

    /// Polls every listener's files every [`POLL_INTERVAL`] until dropped
    /// by everyone else (the server owns the other handle).
    pub(crate) fn spawn_poller(&self) {
        let weak = Arc::downgrade(&self.0);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(map) = weak.upgrade() else { return };
                let all: Vec<Arc<TlsListener>> = map.lock().values().cloned().collect();
                drop(map);
                // File reads off the runtime's worker threads.
                let _ =
                    tokio::task::spawn_blocking(move || all.iter().for_each(|t| t.poll())).await;
            }
        });
    }
}

/// A client connection, plain or TLS.
pub(crate) type ClientStream = MaybeTls<TlsStream<TcpStream>>;

/// Reads one DER TLV at the start of `d`: (tag, contents, rest).
fn tlv(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, d) = d.split_first()?;
    let (&first, d) = d.split_first()?;
    let (len, d) = if first < 0x80 {
        (usize::from(first), d)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || d.len() < n {
            return None;
        }
        let len = d[..n]
            .iter()
            .fold(0usize, |a, b| (a << 8) | usize::from(*b));
        (len, &d[n..])
    };
    if d.len() < len {
        return None;
    }
    Some((tag, &d[..len], &d[len..]))
}

/// The not-after of an X.509 certificate (DER), Unix seconds: Certificate
/// → tbsCertificate → [version], serial, signature, issuer, validity →
/// notAfter (UTCTime or GeneralizedTime, `Z` form as RFC 5280 requires).
pub(crate) fn not_after(der: &[u8]) -> Option<i64> {
    let (0x30, validity, _) = tlv(tbs_field(der, 3)?)? else {
        return None;
    };
    let (_, _, after) = tlv(validity)?;
    let (tag, time, _) = tlv(after)?;
    let s = std::str::from_utf8(time).ok()?;
    let (year, s) = match tag {
        0x17 => {
            let yy: i64 = s.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
        }
        0x18 => (s.get(..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    if s.len() != 11 || !s.ends_with('Z') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (month, day) = (num(0..2)?, num(2..4)?);
    let (h, m, sec) = (num(4..6)?, num(6..8)?, num(8..10)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
}

/// The tbsCertificate of `der` from its field `n` on (0: serial,
/// 1: signature algorithm, 2: issuer, 3: validity, 4: subject).
fn tbs_field(der: &[u8], n: usize) -> Option<&[u8]> {
    let (0x30, cert, _) = tlv(der)? else {
        return None;
    };
    let (0x30, tbs, _) = tlv(cert)? else {
        return None;
    };
    let mut rest = tbs;
    // Optional explicit [0] version.
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2;
    }
    for _ in 0..n {
        rest = tlv(rest)?.2;
    }
    Some(rest)
}

/// The subject's common name (the first CN) of a certificate (DER).
fn common_name(der: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let (0x30, mut rdns, _) = tlv(tbs_field(der, 4)?)? else {
        return None;
    };
    while !rdns.is_empty() {
        let (_, set, rest) = tlv(rdns)?;
        rdns = rest;
        let mut atvs = set;
        while !atvs.is_empty() {
            let (_, atv, rest) = tlv(atvs)?;
            atvs = rest;
            let (0x06, oid, value) = tlv(atv)? else {
                return None;
            };
            if oid == CN {
                let (_, v, _) = tlv(value)?;
                return std::str::from_utf8(v).ok().map(str::to_owned);
            }
        }
    }
    None
}

/// A verified client certificate's identity, for the access log: its
/// subject CN, else its first DNS name. Rides in request extensions.
#[derive(Debug, Clone)]
pub(crate) struct ClientIdentity(pub(crate) Arc<str>);

impl ClientIdentity {
    /// The identity of the client certificate of `stream`, if one was sent
    /// (and so verified: rustls fails the handshake otherwise).
    pub(crate) fn of(stream: &TlsStream<TcpStream>) -> Option<Self> {
        let leaf = stream.get_ref().1.peer_certificates()?.first()?;
        let name = common_name(leaf.as_ref()).or_else(|| {
            webpki::EndEntityCert::try_from(leaf)
                .ok()?
                .valid_dns_names()
                .next()
                .map(str::to_owned)
        })?;
        Some(Self(Arc::from(name)))
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2038, 1, 19), 24_855);
    }

    #[test]
    fn not_after_of_generated_certificates() {
        for (y, m, d) in [(2031, 7, 9), (2049, 12, 31), (2051, 1, 2)] {
            let mut p = rcgen::CertificateParams::new(vec!["a.test".into()]).unwrap();
            p.not_after = rcgen::date_time_ymd(y, m, d);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = p.self_signed(&key).unwrap();
            let want = days_from_civil(i64::from(y), i64::from(m), i64::from(d)) * 86_400;
            assert_eq!(not_after(cert.der()), Some(want), "{y}-{m}-{d}");
        }
    }

    #[test]
    fn common_name_of_generated_certificates() {
        let mut p = rcgen::CertificateParams::new(vec!["a.test".into()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Datapunk");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "client-7");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        assert_eq!(common_name(cert.der()).as_deref(), Some("client-7"));
        let p = rcgen::CertificateParams::new(vec!["a.test".into()]).unwrap();
        let mut p = p;
        p.distinguished_name = rcgen::DistinguishedName::new();
        let cert = p.self_signed(&key).unwrap();
        assert_eq!(common_name(cert.der()), None);
    }

    #[test]
    fn not_after_refuses_garbage() {
        assert_eq!(not_after(b""), None);
        assert_eq!(not_after(&[0x30, 0x82, 0xff]), None);
        assert_eq!(not_after(&[0x30, 0x03, 0x30, 0x01, 0x02]), None);
    }
}
