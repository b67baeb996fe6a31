//! `[listener.tls]` of `https` and `tls` listeners: the settings, checked
//! here, and the certificate files, loaded here too so that a missing file,
//! bad PEM or a key that does not match its certificate is a config error
//! naming the key and its line (the rules of termination are in
//! `proxy/tls.rs`). An expired certificate is a warning in `check`'s
//! summary, not an error: the balancer still starts.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::Checker;
use crate::proxy::tls::{load_certificate, TlsError};

/// `[listener.tls]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    pub min_version: Option<Spanned<String>>,
    pub client_auth: Option<Spanned<String>>,
    pub client_ca_file: Option<Spanned<String>>,
    #[serde(default)]
    pub certificate: Vec<FileTlsCertificate>,
}

/// `[[listener.tls.certificate]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTlsCertificate {
    pub cert_file: Spanned<String>,
    pub key_file: Spanned<String>,
    pub server_names: Option<Vec<String>>,
}

/// Lowest TLS version accepted (`min_version`, default `"1.2"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    V1_2,
    /// TLS 1.3 only.
    V1_3,
}

impl TlsVersion {
    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        }
    }
}

/// Client certificates (`client_auth`, default `"none"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Not asked for.
    None,
    /// Verified against `client_ca_file` when sent.
    Optional,
    /// Required and verified against `client_ca_file`.
    Required,
}

impl ClientAuth {
    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::None => "none",
            ClientAuth::Optional => "optional",
            ClientAuth::Required => "required",
        }
    }
}

/// `[[listener.tls.certificate]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsCertificate {
    /// PEM chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// SNI names served; empty: the certificate's DNS names.
    pub server_names: Vec<String>,
    /// The leaf's not-after (Unix seconds) when the config was read, for
    /// `check`.
    pub not_after: Option<i64>,
}

/// `[listener.tls]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsListenerConfig {
    /// Lowest version accepted.
    pub min_version: TlsVersion,
    /// Client certificates.
    pub client_auth: ClientAuth,
    /// CA bundle client certificates are verified against.
    pub client_ca_file: Option<PathBuf>,
    /// Certificates, chosen by SNI; the first is the default.
    pub certificates: Vec<TlsCertificate>,
}

impl TlsListenerConfig {
    /// `check`'s lines for this table, with a warning per expired
    /// certificate.
    pub(super) fn write_summary(&self, s: &mut String, now: i64) {
        use std::fmt::Write;
        let _ = writeln!(
            s,
            "  tls min_version {}, client_auth {}{}",
            self.min_version.as_str(),
            self.client_auth.as_str(),
            self.client_ca_file
                .as_ref()
                .map_or_else(String::new, |f| format!(" (ca {})", f.display()))
        );
        for c in &self.certificates {
            let _ = writeln!(
                s,
                "  certificate {} key {}{}",
                c.cert_file.display(),
                c.key_file.display(),
                if c.server_names.is_empty() {
                    String::new()
                } else {
                    format!(" server_names [{}]", c.server_names.join(", "))
                }
            );
            if c.not_after.is_some_and(|t| t <= now) {
                let _ = writeln!(
                    s,
                    "  warning: certificate {} has expired",
                    c.cert_file.display()
                );
            }
        }
    }
}

/// Checks `[listener.tls]` of listener `key` (`listener[i]`); `protocol`
/// is the listener's protocol as written (`https`/`tls` need the table,
/// the others refuse it).
pub(super) fn listener_tls(
    key: &str,
    name: &Spanned<String>,
    tls_protocol: bool,
    tls: Option<&FileTls>,
    ck: &mut Checker<'_>,
) -> Option<TlsListenerConfig> {
    let Some(tls) = tls else {
        if tls_protocol {
            ck.issue(
                format!("{key}.tls"),
                name,
                "an https or tls listener needs [listener.tls] with a [[listener.tls.certificate]]",
            );
        }
        return None;
    };
    let key = format!("{key}.tls");
    if !tls_protocol {
        ck.issue(
            key,
            name,
            "[listener.tls] needs protocol = \"https\" or \"tls\"",
        );
        return None;
    }
    let min_version = ck.choice(
        &format!("{key}.min_version"),
        &tls.min_version,
        (TlsVersion::V1_2, &[TlsVersion::V1_2, TlsVersion::V1_3]),
        TlsVersion::as_str,
    );
    let client_auth = ck.choice(
        &format!("{key}.client_auth"),
        &tls.client_auth,
        (
            ClientAuth::None,
            &[ClientAuth::None, ClientAuth::Optional, ClientAuth::Required],
        ),
        ClientAuth::as_str,
    );
    let client_ca_file = tls.client_ca_file.as_ref().map(|f| {
        let path = PathBuf::from(f.get_ref());
        if let Err(e) = std::fs::metadata(&path) {
            ck.issue(
                format!("{key}.client_ca_file"),
                f,
                format!("{}: cannot read: {e}", path.display()),
            );
        }
        path
    });
    if client_auth != ClientAuth::None && client_ca_file.is_none() {
        if let Some(a) = &tls.client_auth {
            ck.issue(
                format!("{key}.client_auth"),
                a,
                format!(
                    "client_auth = {:?} needs client_ca_file",
                    client_auth.as_str()
                ),
            );
        }
    }
    if tls.certificate.is_empty() {
        ck.issue(
            format!("{key}.certificate"),
            name,
            "[listener.tls] needs at least one [[listener.tls.certificate]]",
        );
    }
    let mut certificates = Vec::new();
    for (j, c) in tls.certificate.iter().enumerate() {
        let ckey = format!("{key}.certificate[{j}]");
        let cert_file = PathBuf::from(c.cert_file.get_ref());
        let key_file = PathBuf::from(c.key_file.get_ref());
        let not_after = match load_certificate(&cert_file, &key_file) {
            Ok(l) => l.not_after,
            Err(e) => {
                // Point at the file the error is about.
                let at = match &e {
                    TlsError::Read { path, .. } | TlsError::Pem { path, .. }
                        if *path == cert_file =>
                    {
                        ("cert_file", &c.cert_file)
                    }
                    TlsError::Rustls(_) => ("cert_file", &c.cert_file),
                    _ => ("key_file", &c.key_file),
                };
                ck.issue(format!("{ckey}.{}", at.0), at.1, e.to_string());
                None
            }
        };
        certificates.push(TlsCertificate {
            cert_file,
            key_file,
            server_names: c.server_names.clone().unwrap_or_default(),
            not_after,
        });
    }
    Some(TlsListenerConfig {
        min_version,
        client_auth,
        client_ca_file,
        certificates,
    })
}
