//! TLS to etcd: the endpoints' scheme and the `ca_file` / `cert_file` /
//! `key_file` of `[discovery]` (and the same flags of `datapunk-lb
//! register`), checked here for both so that they follow one rule.
//!
//! Rules:
//! - An endpoint is `host:port`, `http://host:port` or `https://host:port`.
//!   A bare `host:port` is `https` when `ca_file` is set, else `http`.
//! - `https` needs `ca_file` (the CA that signed etcd's certificate; there
//!   is no system root store in the binary, and etcd clusters run on a
//!   private CA). With `ca_file` set every endpoint must be `https`: a mix
//!   of `http` and `https` is an error, never a silent plain-text member.
//! - `cert_file` and `key_file` (a client certificate, for etcd's
//!   `--client-cert-auth`) come together, and only with `ca_file`.
//! - The files are read here, so a missing file, bad PEM or a key that
//!   does not match its certificate is an error naming the key. The etcd
//!   client reads them again at each connect (`discovery/etcd/tls.rs`), so
//!   a renewed client certificate is used from the next reconnect on.

use std::path::PathBuf;

use crate::proxy::tls::{certs, load_certificate, TlsError};

/// TLS to etcd: `[discovery] ca_file`, `cert_file`, `key_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM bundle of the CA(s) etcd's server certificate is verified against.
    pub ca_file: PathBuf,
    /// The client certificate (PEM chain, leaf first) and its key, sent when
    /// etcd asks (`--client-cert-auth`).
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Which setting an [`EtcdIssue`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdField {
    /// The endpoint at this index.
    Endpoint(usize),
    /// `ca_file`.
    CaFile,
    /// `cert_file`.
    CertFile,
    /// `key_file`.
    KeyFile,
}

/// One problem with the etcd connection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdIssue {
    /// The setting.
    pub field: EtcdField,
    /// What is wrong.
    pub message: String,
}

/// The etcd connection settings as written.
#[derive(Debug, Clone, Copy, Default)]
pub struct EtcdSettings<'a> {
    /// Endpoints as written.
    pub endpoints: &'a [&'a str],
    /// `ca_file`.
    pub ca_file: Option<&'a str>,
    /// `cert_file`.
    pub cert_file: Option<&'a str>,
    /// `key_file`.
    pub key_file: Option<&'a str>,
}

/// Checks `s`: the endpoints as URLs (`http://host:port` or
/// `https://host:port`) and the TLS settings, or every problem found.
pub fn check_etcd(s: &EtcdSettings<'_>) -> Result<(Vec<String>, Option<EtcdTls>), Vec<EtcdIssue>> {
    let mut issues = Vec::new();
    let mut issue = |field, message: String| issues.push(EtcdIssue { field, message });
    let tls = s.ca_file.is_some();
    let mut urls = Vec::with_capacity(s.endpoints.len());
    for (i, e) in s.endpoints.iter().enumerate() {
        match etcd_url(e, tls) {
            Ok(u) if u.starts_with("https://") && !tls => issue(
                EtcdField::Endpoint(i),
                format!("{e:?}: an https endpoint needs ca_file (the CA that signed etcd's certificate)"),
            ),
            Ok(u) if u.starts_with("http://") && tls => issue(
                EtcdField::Endpoint(i),
                format!("{e:?}: plain http while ca_file is set; every endpoint must be https (no mixing)"),
            ),
            Ok(u) => urls.push(u),
            Err(why) => issue(EtcdField::Endpoint(i), why),
        }
    }
    let ca_file = s.ca_file.map(PathBuf::from);
    if let Some(ca) = &ca_file {
        if let Err(e) = certs(ca) {
            issue(EtcdField::CaFile, e.to_string());
        }
    }
    let client = match (s.cert_file, s.key_file) {
        (None, None) => None,
        (Some(_), None) => {
            issue(EtcdField::CertFile, "needs key_file too".into());
            None
        }
        (None, Some(_)) => {
            issue(EtcdField::KeyFile, "needs cert_file too".into());
            None
        }
        (Some(c), Some(k)) => {
            let (cert_file, key_file) = (PathBuf::from(c), PathBuf::from(k));
            if ca_file.is_none() {
                issue(
                    EtcdField::CertFile,
                    "a client certificate needs ca_file (and https endpoints)".into(),
                );
            }
            if let Err(e) = load_certificate(&cert_file, &key_file) {
                let field = match &e {
                    TlsError::Read { path, .. } | TlsError::Pem { path, .. }
                        if *path == key_file =>
                    {
                        EtcdField::KeyFile
                    }
                    TlsError::Mismatch { .. } => EtcdField::KeyFile,
                    _ => EtcdField::CertFile,
                };
                issue(field, e.to_string());
            }
            Some((cert_file, key_file))
        }
    };
    if !issues.is_empty() {
        return Err(issues);
    }
    Ok((urls, ca_file.map(|ca_file| EtcdTls { ca_file, client })))
}

/// An etcd client endpoint as a URL: `http://` and `https://` kept, a bare
/// `host:port` given `https` when `tls`, else `http`.
pub fn etcd_url(e: &str, tls: bool) -> Result<String, String> {
    let (scheme, rest) = if let Some(r) = e.strip_prefix("http://") {
        ("http", r)
    } else if let Some(r) = e.strip_prefix("https://") {
        ("https", r)
    } else if e.contains("://") {
        return Err(format!(
            "{e:?}: expected host:port, http://host:port or https://host:port"
        ));
    } else {
        (if tls { "https" } else { "http" }, e)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let bad = || format!("{e:?} is not host:port, http://host:port or https://host:port");
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains('/') || host.contains(char::is_whitespace) {
        return Err(bad());
    }
    Ok(format!("{scheme}://{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(endpoints: &[&str], ca: Option<&str>) -> Result<Vec<String>, Vec<EtcdIssue>> {
        check_etcd(&EtcdSettings {
            endpoints,
            ca_file: ca,
            ..EtcdSettings::default()
        })
        .map(|(u, _)| u)
    }

    #[test]
    fn bare_endpoints_take_the_scheme_of_the_tls_settings() {
        assert_eq!(etcd_url("h:2379", false).unwrap(), "http://h:2379");
        assert_eq!(etcd_url("h:2379", true).unwrap(), "https://h:2379");
        assert_eq!(
            etcd_url("https://h:2379/", false).unwrap(),
            "https://h:2379"
        );
        assert_eq!(etcd_url("http://h:2379", true).unwrap(), "http://h:2379");
        assert!(etcd_url("unix://h:1", false).is_err());
        assert!(etcd_url("https://h", false).is_err());
        assert!(etcd_url("https://:1", false).is_err());
    }

    #[test]
    fn https_without_ca_file_is_an_error_naming_the_endpoint() {
        let issues = check(&["http://a:1", "https://b:1"], None).unwrap_err();
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].field, EtcdField::Endpoint(1));
        assert!(issues[0].message.contains("needs ca_file"), "{issues:?}");
    }

    #[test]
    fn a_missing_ca_file_and_mixed_schemes_are_errors() {
        let issues =
            check(&["https://a:1", "http://b:1"], Some("/nonexistent/ca.pem")).unwrap_err();
        let fields: Vec<_> = issues.iter().map(|i| i.field).collect();
        assert_eq!(
            fields,
            [EtcdField::Endpoint(1), EtcdField::CaFile],
            "{issues:?}"
        );
        assert!(issues[0].message.contains("no mixing"), "{issues:?}");
        assert!(
            issues[1]
                .message
                .contains("/nonexistent/ca.pem: cannot read"),
            "{issues:?}"
        );
    }

    #[test]
    fn a_certificate_needs_its_key_and_a_ca() {
        let issues = check_etcd(&EtcdSettings {
            endpoints: &["a:1"],
            cert_file: Some("/nonexistent/c.pem"),
            ..EtcdSettings::default()
        })
        .unwrap_err();
        assert_eq!(issues[0].field, EtcdField::CertFile);
        assert!(issues[0].message.contains("needs key_file"), "{issues:?}");
        let issues = check_etcd(&EtcdSettings {
            endpoints: &["a:1"],
            cert_file: Some("/nonexistent/c.pem"),
            key_file: Some("/nonexistent/c.key"),
            ..EtcdSettings::default()
        })
        .unwrap_err();
        assert!(
            issues
                .iter()
                .any(|i| i.field == EtcdField::CertFile && i.message.contains("needs ca_file")),
            "{issues:?}"
        );
    }

    #[test]
    fn plain_endpoints_without_tls_pass() {
        assert_eq!(
            check(&["a:1", "http://b:2"], None).unwrap(),
            ["http://a:1", "http://b:2"]
        );
    }
}
