//! `[service.X.tls]`: TLS (and mTLS) to a service's instances. The keys
//! are checked here, and the files read and the client config built by the
//! same code `run` uses (`proxy/upstream_tls.rs`, which states the rules),
//! so a missing file, bad PEM, a key that does not match its certificate
//! or an unusable `server_name` is a config error naming the key and its
//! line, reported by `check` and refused by a reload.
//!
//! Defaults: `ca_file` the system store, `server_name` each instance's
//! address, no client certificate, `insecure_skip_verify = false`.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{Checker, UpstreamProtocol};
use crate::proxy::upstream_tls::UpstreamTls;

/// `[service.X.tls]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstreamTls {
    pub ca_file: Option<Spanned<String>>,
    pub server_name: Option<Spanned<String>>,
    pub cert_file: Option<Spanned<String>>,
    pub key_file: Option<Spanned<String>>,
    pub insecure_skip_verify: Option<Spanned<bool>>,
}

/// The client certificate of mTLS to the instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertFiles {
    /// PEM chain, leaf first.
    pub cert_file: PathBuf,
    /// Its PEM key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// `[service.X.tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTlsConfig {
    /// CA bundle instance certificates must chain to; `None`: the system
    /// store.
    pub ca_file: Option<PathBuf>,
    /// SNI and verification name; `None`: each instance's address.
    pub server_name: Option<String>,
    /// Sent when an instance asks for a client certificate.
    pub client_cert: Option<ClientCertFiles>,
    /// Accept any certificate (a warning is logged at start).
    pub insecure_skip_verify: bool,
}

impl UpstreamTlsConfig {
    /// `check`'s line for this table.
    pub(super) fn write_summary(&self, s: &mut String) {
        use std::fmt::Write;
        let ca = if self.insecure_skip_verify {
            "insecure_skip_verify: certificates NOT verified".to_owned()
        } else {
            self.ca_file.as_ref().map_or_else(
                || "ca system store".to_owned(),
                |f| format!("ca_file {}", f.display()),
            )
        };
        let _ = writeln!(
            s,
            "  tls: {ca}, server_name {}{}",
            self.server_name.as_deref().unwrap_or("(instance address)"),
            self.client_cert
                .as_ref()
                .map_or_else(String::new, |c| format!(
                    ", client certificate {} key {}",
                    c.cert_file.display(),
                    c.key_file.display()
                )),
        );
    }
}

/// Checks `[service.X.tls]` of service `key` (`service.X`), reading its
/// files; `None` when it has issues (recorded in `ck`).
pub(super) fn service_tls(
    key: &str,
    tls: &Spanned<FileUpstreamTls>,
    protocol: UpstreamProtocol,
    ck: &mut Checker<'_>,
) -> Option<UpstreamTlsConfig> {
    let key = format!("{key}.tls");
    let t = tls.get_ref();
    let before = ck.issues.len();
    let path = |v: &Option<Spanned<String>>| v.as_ref().map(|p| PathBuf::from(p.get_ref()));
    let client_cert = match (&t.cert_file, &t.key_file) {
        (Some(c), Some(k)) => Some(ClientCertFiles {
            cert_file: PathBuf::from(c.get_ref()),
            key_file: PathBuf::from(k.get_ref()),
        }),
        (Some(c), None) => {
            ck.issue(
                format!("{key}.key_file"),
                c,
                "missing: cert_file needs key_file",
            );
            None
        }
        (None, Some(k)) => {
            ck.issue(
                format!("{key}.cert_file"),
                k,
                "missing: key_file needs cert_file",
            );
            None
        }
        (None, None) => None,
    };
    let insecure_skip_verify = t
        .insecure_skip_verify
        .as_ref()
        .is_some_and(|v| *v.get_ref());
    if let (true, Some(ca)) = (insecure_skip_verify, &t.ca_file) {
        ck.issue(
            format!("{key}.ca_file"),
            ca,
            "ca_file has no effect with insecure_skip_verify = true: remove one of them",
        );
    }
    if ck.issues.len() > before {
        return None;
    }
    let cfg = UpstreamTlsConfig {
        ca_file: path(&t.ca_file),
        server_name: t.server_name.as_ref().map(|n| n.get_ref().clone()),
        client_cert,
        insecure_skip_verify,
    };
    if let Err(e) = UpstreamTls::build(&cfg, protocol) {
        let at = e.key(&cfg);
        let spanned = match at {
            "ca_file" => t.ca_file.as_ref(),
            "server_name" => t.server_name.as_ref(),
            "cert_file" => t.cert_file.as_ref(),
            "key_file" => t.key_file.as_ref(),
            _ => None,
        };
        let full = if at.is_empty() {
            key.clone()
        } else {
            format!("{key}.{at}")
        };
        match spanned {
            Some(v) => ck.issue(full, v, e.to_string()),
            None => ck.issue(full, tls, e.to_string()),
        }
        return None;
    }
    Some(cfg)
}
