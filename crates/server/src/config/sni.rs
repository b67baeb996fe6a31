//! `[[listener.sni_route]]` of a `tcp` listener: TLS passthrough routed by
//! the ClientHello's server name (the rules of reading it and matching are
//! in `proxy/sni.rs`).
//!
//! ```toml
//! [[listener]]
//! name = "passthrough"
//! listen = "0.0.0.0:443"
//! protocol = "tcp"
//! service = "fallback"            # optional: no SNI, no match, not TLS
//! [[listener.sni_route]]
//! server_names = ["a.example", "*.b.example"]
//! service = "a"
//! ```
//!
//! Checked here: only on `protocol = "tcp"` (a `tls` listener terminates
//! and so has the name already); `server_names` non-empty, each a host name
//! or `*.` and a host name, unique across the listener's routes; the
//! service defined.

use serde::Deserialize;
use toml::Spanned;

use super::Checker;

/// `[[listener.sni_route]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSniRoute {
    pub server_names: Spanned<Vec<Spanned<String>>>,
    pub service: Spanned<String>,
}

/// `[[listener.sni_route]]`: connections whose ClientHello names one of
/// `server_names` go to `service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniRoute {
    /// Lowercase host names; `*.parent` matches one label under `parent`.
    pub server_names: Vec<String>,
    /// The service.
    pub service: String,
}

/// Whether `name` is a host name, or `*.` and one (letters, digits, `-`,
/// `_`, dots between non-empty labels).
fn valid_pattern(name: &str) -> bool {
    let host = name.strip_prefix("*.").unwrap_or(name);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Checks the `sni_route`s of listener `key` (`listener[i]`); `tcp` says
/// whether its protocol is `tcp`. Each route's service is checked by the
/// caller's `known`, given the key and the name as written.
pub(super) fn sni_routes(
    key: &str,
    name: &Spanned<String>,
    tcp: bool,
    routes: &[FileSniRoute],
    ck: &mut Checker<'_>,
    mut known: impl FnMut(&mut Checker<'_>, String, &Spanned<String>),
) -> Vec<SniRoute> {
    if routes.is_empty() {
        return Vec::new();
    }
    if !tcp {
        ck.issue(
            format!("{key}.sni_route"),
            name,
            "[[listener.sni_route]] needs protocol = \"tcp\" (passthrough; a tls listener terminates)",
        );
        return Vec::new();
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(routes.len());
    for (j, r) in routes.iter().enumerate() {
        let rk = format!("{key}.sni_route[{j}]");
        known(ck, format!("{rk}.service"), &r.service);
        if r.server_names.get_ref().is_empty() {
            ck.issue(
                format!("{rk}.server_names"),
                &r.server_names,
                "must not be empty",
            );
        }
        let mut names = Vec::new();
        for (k, n) in r.server_names.get_ref().iter().enumerate() {
            let lower = n.get_ref().to_ascii_lowercase();
            let lower = lower.strip_suffix('.').unwrap_or(&lower).to_owned();
            if !valid_pattern(&lower) {
                ck.issue(
                    format!("{rk}.server_names[{k}]"),
                    n,
                    format!("{:?} is not a host name or *.host.name", n.get_ref()),
                );
            } else if !seen.insert(lower.clone()) {
                ck.issue(
                    format!("{rk}.server_names[{k}]"),
                    n,
                    format!(
                        "{:?} is already routed by an earlier sni_route",
                        n.get_ref()
                    ),
                );
            } else {
                names.push(lower);
            }
        }
        out.push(SniRoute {
            server_names: names,
            service: r.service.get_ref().clone(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::valid_pattern;

    #[test]
    fn patterns_are_host_names_or_one_leading_wildcard() {
        for ok in ["a.example", "*.b.example", "localhost", "x-1.y_2.example"] {
            assert!(valid_pattern(ok), "{ok}");
        }
        for bad in [
            "",
            "*.",
            "*",
            "a..b",
            ".a",
            "a.*.b",
            "**.a",
            "a b",
            "*a.example",
        ] {
            assert!(!valid_pattern(bad), "{bad}");
        }
    }
}
