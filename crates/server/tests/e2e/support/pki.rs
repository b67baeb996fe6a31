//! A test CA made with rcgen at run time (no certificates checked in): it
//! issues leaves written to temp files, for the etcd-over-TLS, SNI
//! passthrough and upstream TLS tests.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use super::temp_path;

/// A CA that issues leaves; its certificate is at `cert_file`.
pub(crate) struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate, PEM.
    pub(crate) cert_file: PathBuf,
}

/// A leaf on disk.
pub(crate) struct Leaf {
    /// The certificate, DER.
    pub(crate) der: CertificateDer<'static>,
    /// PEM certificate.
    pub(crate) cert_file: PathBuf,
    /// PEM key (PKCS#8).
    pub(crate) key_file: PathBuf,
    /// The key, PKCS#8 DER.
    pub(crate) key_der: Vec<u8>,
}

impl Ca {
    /// A new CA with common name `name`.
    pub(crate) fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let cert_file = temp_path("ca.pem");
        std::fs::write(&cert_file, cert.pem()).unwrap();
        Ca {
            cert,
            key,
            cert_file,
        }
    }

    /// A leaf for `names` (DNS names or IP addresses), common name `cn`.
    pub(crate) fn leaf(&self, names: &[&str], cn: &str) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let (cert_file, key_file) = (temp_path("leaf.pem"), temp_path("leaf.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        Leaf {
            der: cert.der().clone(),
            cert_file,
            key_file,
            key_der: key.serialize_der(),
        }
    }

    /// A root store holding this CA only.
    pub(crate) fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        Arc::new(roots)
    }

    /// A rustls client trusting this CA only, without a client certificate.
    pub(crate) fn client_config(&self) -> ClientConfig {
        let roots = self.roots();
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cert_file);
    }
}

impl Drop for Leaf {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cert_file);
        let _ = std::fs::remove_file(&self.key_file);
    }
}
