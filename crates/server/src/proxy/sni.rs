//! SNI passthrough: the server name of a TLS ClientHello, read without
//! terminating TLS (HAProxy's `req.ssl_sni`, NGINX's `ssl_preread`), and
//! the `[[listener.sni_route]]` it picks a service by.
//!
//! Rules:
//! - [`parse_client_hello`] is a pure function of the bytes read so far:
//!   [`Hello::NeedMore`], [`Hello::ServerName`] (the first `host_name` of
//!   the `server_name` extension, lowercased, trailing dot dropped),
//!   [`Hello::NoServerName`] (a ClientHello without one) or
//!   [`Hello::NotTls`] (the first record is not a TLS handshake, or the
//!   ClientHello is malformed). Any answer but `NeedMore` is final: more
//!   bytes never change it. A ClientHello split over several handshake
//!   records (allowed by RFC 8446 §5.1) is reassembled.
//! - The listener reads at most [`MAX_CLIENT_HELLO`] bytes (a ClientHello
//!   is a few hundred bytes; about 1.8 KiB with a post-quantum key share)
//!   and waits at most its `header_read_timeout`. A ClientHello still
//!   incomplete then is treated as one without a name.
//! - **Matching** ([`route`]): an exact name wins over a wildcard; `*.b.example`
//!   matches exactly one label more (`x.b.example`, not `b.example` nor
//!   `y.x.b.example`), as certificates do; among equals the earlier route
//!   wins. No name, no match, or not TLS: the listener's `service` (the
//!   default), or the connection is closed when there is none.
//! - The bytes read are written to the chosen instance first, then the
//!   two streams are spliced: the TLS session is the client's and the
//!   instance's, end to end.
//! - **Counted**: every decided ClientHello read by a listener with
//!   `sni_route`s, in `datapunk_lb_sni_client_hellos_total{listener,
//!   outcome}` ([`HELLO_OUTCOMES`]: `server_name`, `no_server_name`,
//!   `not_tls`, and `incomplete` for one cut by the time or size limit),
//!   so an operator sees clients arriving without SNI or without TLS
//!   before they wonder why the default service got them. A client gone
//!   before a decision is not counted.

use crate::config::SniRoute;

/// Most bytes read while looking for the ClientHello (16 KiB).
pub(crate) const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// What the bytes read so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hello {
    /// Not enough bytes to decide yet.
    NeedMore,
    /// A ClientHello naming this server (lowercase, no trailing dot).
    ServerName(String),
    /// A ClientHello without a server name.
    NoServerName,
    /// Not a TLS handshake, or a malformed ClientHello.
    NotTls,
}

/// The `outcome` label values of `datapunk_lb_sni_client_hellos_total`,
/// indexed by [`Hello::outcome`].
pub(crate) const HELLO_OUTCOMES: [&str; 4] =
    ["server_name", "no_server_name", "not_tls", "incomplete"];

impl Hello {
    /// Its index in [`HELLO_OUTCOMES`]; `NeedMore` when the listener
    /// stopped reading is `incomplete`.
    pub(crate) fn outcome(&self) -> usize {
        match self {
            Hello::ServerName(_) => 0,
            Hello::NoServerName => 1,
            Hello::NotTls => 2,
            Hello::NeedMore => 3,
        }
    }
}

/// TLS record type of handshake messages.
const HANDSHAKE: u8 = 22;
/// Handshake type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// Extension type of `server_name` (RFC 6066).
const SERVER_NAME: u16 = 0;
/// Largest TLS record payload (2^14, RFC 8446 §5.1).
const MAX_RECORD: usize = 1 << 14;

/// Reads the ClientHello at the start of `data` (see the module rules).
pub(crate) fn parse_client_hello(data: &[u8]) -> Hello {
    // Reassemble the handshake message from the records.
    let mut message = Vec::new();
    let mut rest = data;
    let needed = loop {
        let Some(header) = rest.get(..5) else {
            // A partial header can still be checked.
            if rest.first().is_some_and(|t| *t != HANDSHAKE) || rest.get(1).is_some_and(|v| *v != 3)
            {
                return Hello::NotTls;
            }
            return Hello::NeedMore;
        };
        if header[0] != HANDSHAKE || header[1] != 3 {
            return Hello::NotTls;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Hello::NotTls;
        }
        let Some(fragment) = rest.get(5..5 + len) else {
            // Use what has arrived to decide early when it can.
            message.extend_from_slice(rest.get(5..).unwrap_or_default());
            return match early_verdict(&message) {
                Some(v) => v,
                None => Hello::NeedMore,
            };
        };
        message.extend_from_slice(fragment);
        rest = &rest[5 + len..];
        if let Some(v) = early_verdict(&message) {
            return v;
        }
        let total = handshake_len(&message);
        if let Some(total) = total {
            if message.len() >= total {
                break total;
            }
        }
    };
    client_hello(message.get(4..needed).unwrap_or_default())
}

/// The length (header included) of the handshake message at the start of
/// `m`, once its header is there.
fn handshake_len(m: &[u8]) -> Option<usize> {
    let h = m.get(..4)?;
    Some(4 + (usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3])))
}

/// `NotTls` as soon as the handshake header shows it is not a ClientHello.
fn early_verdict(m: &[u8]) -> Option<Hello> {
    match m.first() {
        Some(&t) if t != CLIENT_HELLO => Some(Hello::NotTls),
        _ if handshake_len(m).is_some_and(|n| n < 4 + 38) => Some(Hello::NotTls),
        _ => None,
    }
}

/// A cursor over a ClientHello body; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// A vector with a `len_bytes`-byte length prefix.
    fn vec(&mut self, len_bytes: usize) -> Option<&'a [u8]> {
        let n = match len_bytes {
            1 => self.u8()?,
            _ => self.u16()?,
        };
        self.take(n)
    }
}

/// The ClientHello body (after the 4-byte handshake header).
fn client_hello(body: &[u8]) -> Hello {
    let mut r = Reader(body);
    let fields = (|| {
        r.take(2 + 32)?; // legacy_version, random
        let session_id = r.vec(1)?;
        let suites = r.vec(2)?;
        let compression = r.vec(1)?;
        Some(
            session_id.len() <= 32
                && suites.len() >= 2
                && suites.len() % 2 == 0
                && !compression.is_empty(),
        )
    })();
    match fields {
        Some(true) => {}
        _ => return Hello::NotTls,
    }
    if r.0.is_empty() {
        // No extensions at all (TLS 1.0-era clients).
        return Hello::NoServerName;
    }
    let Some(extensions) = r.vec(2) else {
        return Hello::NotTls;
    };
    if !r.0.is_empty() {
        return Hello::NotTls;
    }
    let mut e = Reader(extensions);
    let mut name = None;
    while !e.0.is_empty() {
        let (Some(kind), Some(data)) = (e.u16(), e.vec(2)) else {
            return Hello::NotTls;
        };
        if kind == usize::from(SERVER_NAME) && name.is_none() {
            match server_name(data) {
                Some(n) => name = Some(n),
                None => return Hello::NotTls,
            }
        }
    }
    match name {
        Some(Some(n)) => Hello::ServerName(n),
        _ => Hello::NoServerName,
    }
}

/// The `server_name` extension: `Some(Some(name))` for its first
/// `host_name`, `Some(None)` when it has none, `None` when malformed.
fn server_name(data: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(data);
    let list = r.vec(2)?;
    if !r.0.is_empty() {
        return None;
    }
    let mut l = Reader(list);
    while !l.0.is_empty() {
        let kind = l.u8()?;
        let name = l.vec(2)?;
        if kind == 0 {
            return host_name(name).map(Some);
        }
    }
    Some(None)
}

/// A DNS host name: 1–253 bytes of letters, digits, `-`, `_` and `.`,
/// lowercased, a trailing dot dropped.
fn host_name(raw: &[u8]) -> Option<String> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    let ok = !raw.is_empty()
        && raw.len() <= 253
        && raw
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !raw.starts_with(b".")
        && !raw.windows(2).any(|w| w == b"..");
    ok.then(|| String::from_utf8_lossy(raw).to_ascii_lowercase())
}

/// Whether `pattern` (a name or `*.parent`, lowercase) matches `name`.
fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(parent) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => pattern == name,
    }
}

/// The service of the first route naming `name` exactly, else of the first
/// whose wildcard matches it; `None` without a name or a match (the
/// listener's default applies).
pub(crate) fn route<'a>(routes: &'a [SniRoute], name: Option<&str>) -> Option<&'a str> {
    let name = name?;
    let exact = routes.iter().find(|r| {
        r.server_names
            .iter()
            .any(|p| !p.starts_with("*.") && p == name)
    });
    exact
        .or_else(|| {
            routes.iter().find(|r| {
                r.server_names
                    .iter()
                    .any(|p| p.starts_with("*.") && matches(p, name))
            })
        })
        .map(|r| r.service.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello record with `extensions` (each `(type, data)`), or
    /// none at all when `None`.
    fn hello(extensions: Option<&[(u16, Vec<u8>)]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]); // random
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one suite
        body.extend([1, 0]); // null compression
        if let Some(exts) = extensions {
            let mut e = Vec::new();
            for (t, d) in exts {
                e.extend(t.to_be_bytes());
                e.extend(u16::try_from(d.len()).unwrap().to_be_bytes());
                e.extend(d);
            }
            body.extend(u16::try_from(e.len()).unwrap().to_be_bytes());
            body.extend(e);
        }
        let mut hs = vec![CLIENT_HELLO];
        hs.extend(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        hs.extend(body);
        record(&hs)
    }

    fn record(payload: &[u8]) -> Vec<u8> {
        let mut r = vec![HANDSHAKE, 3, 1];
        r.extend(u16::try_from(payload.len()).unwrap().to_be_bytes());
        r.extend(payload);
        r
    }

    fn sni(name: &[u8]) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend(u16::try_from(name.len()).unwrap().to_be_bytes());
        entry.extend(name);
        let mut d = u16::try_from(entry.len()).unwrap().to_be_bytes().to_vec();
        d.extend(entry);
        (SERVER_NAME, d)
    }

    #[test]
    fn the_server_name_is_found_among_other_extensions() {
        let h = hello(Some(&[
            (10, vec![0, 2, 0, 29]),
            sni(b"API.Example."),
            (16, vec![0, 3, 2, b'h', b'2']),
        ]));
        assert_eq!(
            parse_client_hello(&h),
            Hello::ServerName("api.example".into())
        );
        // Bytes after the ClientHello (the client's next records) change nothing.
        let mut more = h.clone();
        more.extend(b"\x14\x03\x03\x00\x01\x01");
        assert_eq!(
            parse_client_hello(&more),
            Hello::ServerName("api.example".into())
        );
    }

    #[test]
    fn every_strict_prefix_needs_more() {
        let h = hello(Some(&[sni(b"a.example")]));
        for n in 0..h.len() {
            assert_eq!(parse_client_hello(&h[..n]), Hello::NeedMore, "prefix {n}");
        }
    }

    #[test]
    fn a_hello_split_over_records_is_reassembled() {
        let h = hello(Some(&[sni(b"split.example")]));
        let payload = &h[5..];
        let mut two = record(&payload[..10]);
        two.extend(record(&payload[10..]));
        assert_eq!(
            parse_client_hello(&two),
            Hello::ServerName("split.example".into())
        );
        assert_eq!(parse_client_hello(&two[..20]), Hello::NeedMore);
    }

    #[test]
    fn no_extension_or_no_sni_is_no_server_name() {
        assert_eq!(parse_client_hello(&hello(None)), Hello::NoServerName);
        assert_eq!(
            parse_client_hello(&hello(Some(&[(10, vec![0, 2, 0, 29])]))),
            Hello::NoServerName
        );
    }

    #[test]
    fn plain_text_and_other_records_are_not_tls() {
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse_client_hello(b"G"), Hello::NotTls);
        assert_eq!(parse_client_hello(b"\x16\x02"), Hello::NotTls);
        // An alert record, a ServerHello, an empty record.
        assert_eq!(
            parse_client_hello(b"\x15\x03\x03\x00\x02\x02\x28"),
            Hello::NotTls
        );
        assert_eq!(
            parse_client_hello(b"\x16\x03\x03\x00\x04\x02\x00\x00\x26"),
            Hello::NotTls
        );
        assert_eq!(parse_client_hello(b"\x16\x03\x03\x00\x00"), Hello::NotTls);
        // A record longer than TLS allows.
        assert_eq!(parse_client_hello(b"\x16\x03\x03\x40\x01"), Hello::NotTls);
    }

    #[test]
    fn malformed_hellos_are_not_tls() {
        let good = hello(Some(&[sni(b"a.example")]));
        // Extensions length one too long for the body.
        let mut bad = good.clone();
        let ext_len_at = 5 + 4 + 2 + 32 + 1 + 4 + 2;
        bad[ext_len_at + 1] += 1;
        assert_eq!(parse_client_hello(&bad), Hello::NotTls);
        // A name with a space, an empty name.
        assert_eq!(
            parse_client_hello(&hello(Some(&[sni(b"a b")]))),
            Hello::NotTls
        );
        assert_eq!(parse_client_hello(&hello(Some(&[sni(b"")]))), Hello::NotTls);
    }

    fn routes() -> Vec<SniRoute> {
        vec![
            SniRoute {
                server_names: vec!["*.b.example".into()],
                service: "wild".into(),
            },
            SniRoute {
                server_names: vec!["a.example".into(), "x.b.example".into()],
                service: "a".into(),
            },
        ]
    }

    #[test]
    fn exact_names_win_over_wildcards_which_match_one_label() {
        let r = routes();
        assert_eq!(route(&r, Some("a.example")), Some("a"));
        assert_eq!(route(&r, Some("x.b.example")), Some("a"));
        assert_eq!(route(&r, Some("y.b.example")), Some("wild"));
        assert_eq!(route(&r, Some("b.example")), None);
        assert_eq!(route(&r, Some("z.y.b.example")), None);
        assert_eq!(route(&r, Some("other.example")), None);
        assert_eq!(route(&r, None), None);
    }

    /// The first flight of a rustls client to `name` (an IP address: no
    /// SNI), with `alpn`, TLS 1.3 and 1.2 or 1.2 only.
    fn rustls_hello(name: &str, alpn: &[&[u8]], tls12_only: bool) -> Vec<u8> {
        use std::sync::Arc;
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    /// Real ClientHellos: the name rustls sent, none for an IP address.
    /// With `DATAPUNK_LB_WRITE_FUZZ_SEEDS=1` they are also written to
    /// `fuzz/corpus/client_hello/` (how the checked-in seeds were made).
    #[test]
    fn rustls_client_hellos_give_their_server_name() {
        type Case = (
            &'static str,
            &'static str,
            &'static [&'static [u8]],
            bool,
            Hello,
        );
        let cases: [Case; 4] = [
            (
                "tls13-sni",
                "api.example",
                &[b"h2", b"http/1.1"],
                false,
                Hello::ServerName("api.example".into()),
            ),
            (
                "tls12-sni",
                "Deep.Sub.B.Example",
                &[],
                true,
                Hello::ServerName("deep.sub.b.example".into()),
            ),
            (
                "tls13-ip-no-sni",
                "127.0.0.1",
                &[],
                false,
                Hello::NoServerName,
            ),
            (
                "tls12-ip-no-sni",
                "10.0.0.1",
                &[b"http/1.1"],
                true,
                Hello::NoServerName,
            ),
        ];
        let write = std::env::var_os("DATAPUNK_LB_WRITE_FUZZ_SEEDS").is_some();
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/client_hello");
        for (file, name, alpn, tls12, want) in cases {
            let h = rustls_hello(name, alpn, tls12);
            assert_eq!(parse_client_hello(&h), want, "{file}");
            assert_eq!(
                parse_client_hello(&h[..h.len() - 1]),
                Hello::NeedMore,
                "{file}"
            );
            if write {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(file), &h).unwrap();
            }
        }
        if write {
            std::fs::write(
                dir.join("plain-http"),
                b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
            )
            .unwrap();
        }
    }
}
