//! Entry points for the fuzz targets in `fuzz/` (not an API: hidden from
//! the docs, no stability promise).
//!
//! The text-format targets (`hash_key`, `cidr`, `request_headers`) take the
//! raw fuzz input here, so their seeds are plain text files and the unit
//! tests below run the same decoding.
//!
//! The rule: each function runs the **same code** the server runs on that
//! input — the admin handlers' body parsers, the state file's `parse` that
//! `DynamicState::load` calls — because those items are crate-private and
//! a fuzz target is another crate. Each returns the error the server would
//! report, and panics only when an invariant the fuzz target exists to
//! check is broken (a panic is what libFuzzer records as a crash).

use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use datapunk_lb_core::{Registry, ServiceInstance};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Version};

use crate::admin::handlers::{parse_health, parse_spec, parse_strategy};
use crate::config::cidr::{self, Cidr, CidrError};
use crate::proxy::hash_key::HashKey;
use crate::proxy::headers::{set_forwarding, strip_hop_by_hop, Forwarding};
use crate::proxy::hygiene;
use crate::proxy::request_id::{self, request_id, X_REQUEST_ID};
use crate::state::DynamicState;

/// Which admin request body [`admin_body`] parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminBody {
    /// `PUT /v1/services/{svc}/instances/{id}`: `{address, port, weight?, zone?, tags?}`.
    Register,
    /// `POST /v1/services/{svc}/instances/{id}/health`: `{health_score}`.
    Health,
    /// `PUT /v1/services/{svc}/strategy`: `{strategy}`.
    Strategy,
}

/// Parses `body` as the admin handler for `kind` does and applies it, with
/// the names `service` and `id`, to a fresh core [`Registry`] as the control
/// task would. Returns the error text the API would answer.
///
/// # Panics
///
/// When an accepted change is not what the registry then reports (address,
/// port, weight, health score or strategy differ).
pub fn admin_body(kind: AdminBody, service: &str, id: &str, body: &[u8]) -> Result<(), String> {
    let body = Bytes::copy_from_slice(body);
    let registry = Registry::new();
    let e = |e: &dyn std::fmt::Display| e.to_string();
    match kind {
        AdminBody::Register => {
            let spec = parse_spec(&body).map_err(|x| e(&x))?;
            let instance = spec.to_instance(id).map_err(|x| e(&x))?;
            registry
                .register_instance(service, instance)
                .map_err(|x| e(&x))?;
            let st = registry.instance(service, id).map_err(|x| e(&x))?;
            assert_eq!(st.instance.address(), spec.address);
            assert_eq!(st.instance.port(), spec.port);
            assert_eq!(st.instance.weight().get(), spec.weight);
            assert_eq!(st.instance.zone(), spec.zone.as_deref());
        }
        AdminBody::Health => {
            let score = parse_health(&body).map_err(|x| e(&x))?;
            let instance = ServiceInstance::try_new(id, "127.0.0.1", 1).map_err(|x| e(&x))?;
            registry
                .register_instance(service, instance)
                .map_err(|x| e(&x))?;
            registry
                .update_instance_health(service, id, score)
                .map_err(|x| e(&x))?;
            let st = registry.instance(service, id).map_err(|x| e(&x))?;
            assert!(
                (st.health_score - score).abs() < 1e-9,
                "health {score} set, {} reported",
                st.health_score
            );
        }
        AdminBody::Strategy => {
            let kind = parse_strategy(&body).map_err(|x| e(&x))?;
            let instance = ServiceInstance::try_new("i-1", "127.0.0.1", 1).map_err(|x| e(&x))?;
            registry
                .register_instance(service, instance)
                .map_err(|x| e(&x))?;
            registry.set_strategy(service, kind).map_err(|x| e(&x))?;
            let status = registry
                .services()
                .into_iter()
                .find(|s| s.name == service)
                .ok_or_else(|| format!("service {service:?} vanished"))?;
            assert_eq!(status.strategy, kind);
        }
    }
    Ok(())
}

/// Parses `text` as a state file read at start-up (the code
/// `DynamicState::load` runs once the file is read). On success, checks that
/// what `save` would write parses back to the same state.
///
/// # Panics
///
/// When an accepted state does not survive a save and load unchanged.
pub fn state_file(text: &str) -> Result<(), String> {
    let state = DynamicState::parse(text)?;
    let json = state.to_json().map_err(|e| e.to_string())?;
    let json = String::from_utf8(json).map_err(|e| e.to_string())?;
    let back = DynamicState::parse(&json);
    assert_eq!(back.as_ref(), Ok(&state), "save/load round trip of {json}");
    Ok(())
}

/// Reads `data` as a passthrough listener reads a ClientHello: `None`
/// while more bytes are needed, else `Some` of the server name it routes
/// by (`Some(None)`: no name, or not TLS).
///
/// # Panics
///
/// When a decision is not final (a shorter prefix decided differently, or
/// more bytes change it) or a server name is not a lowercase host name.
pub fn client_hello(data: &[u8]) -> Option<Option<String>> {
    use crate::proxy::sni::{parse_client_hello, Hello};
    let hello = parse_client_hello(data);
    // Prefixes at 1/16 steps (all of them on short inputs) and the last.
    let step = (data.len() / 16).max(1);
    for n in (0..data.len())
        .step_by(step)
        .chain(data.len().checked_sub(1))
    {
        let early = parse_client_hello(&data[..n]);
        assert!(
            early == Hello::NeedMore || early == hello,
            "{n} bytes decided {early:?}, {} bytes {hello:?}",
            data.len()
        );
    }
    match hello {
        Hello::NeedMore => None,
        Hello::ServerName(n) => {
            assert!(
                !n.is_empty()
                    && n.bytes().all(|b| b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || matches!(b, b'-' | b'_' | b'.')),
                "server name {n:?}"
            );
            Some(Some(n))
        }
        Hello::NoServerName | Hello::NotTls => Some(None),
    }
}

/// The lines of a fuzz input: split on `\n`, a trailing `\r` dropped, so
/// seed files are plain text.
fn lines(data: &[u8]) -> Vec<&[u8]> {
    data.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .collect()
}

/// A `name: value` line as a header, or `None` when hyper would have refused
/// it (an invalid name or value never reaches the proxy's code).
fn header_line(line: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    let i = line.iter().position(|&b| b == b':')?;
    let name = HeaderName::from_bytes(&line[..i]).ok()?;
    let value = HeaderValue::from_bytes(line[i + 1..].trim_ascii()).ok()?;
    Some((name, value))
}

fn peer_of(line: Option<&&[u8]>) -> SocketAddr {
    line.and_then(|l| std::str::from_utf8(l).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([192, 0, 2, 1], 40000)))
}

/// `hash_key`: line 1 is a `hash_key` spec as the config gives it, line 2 a
/// request target, line 3 the client's `ip:port`, the rest `name: value`
/// header lines. Runs the spec parser the config loader calls and, when it
/// accepts, the extraction every request goes through.
///
/// # Panics
///
/// When an accepted spec does not print back to itself, when the key of the
/// same request differs between two reads, or when a key is absent or
/// present against the rule of the `hash_key` module doc (`client_ip` and
/// `path` always present; `header:NAME` present iff its first line is not
/// empty).
pub fn hash_key(data: &[u8]) -> Result<(), String> {
    let lines = lines(data);
    let spec = std::str::from_utf8(lines.first().copied().unwrap_or_default())
        .map_err(|e| e.to_string())?;
    let key = HashKey::parse(spec)?;
    let printed = key.to_string();
    assert_eq!(
        HashKey::parse(&printed).as_ref(),
        Ok(&key),
        "{spec:?} prints as {printed:?}"
    );
    let target = lines.get(1).copied().unwrap_or(b"/");
    let mut req = Request::builder()
        .uri(target)
        .body(())
        .map_err(|e| e.to_string())?;
    for line in lines.iter().skip(3) {
        if let Some((n, v)) = header_line(line) {
            req.headers_mut().append(n, v);
        }
    }
    let peer = peer_of(lines.get(2));
    let (parts, ()) = req.into_parts();
    let digest = key.digest(&parts, peer);
    assert_eq!(
        digest,
        key.digest(&parts, peer),
        "the key of one request varies"
    );
    match &key {
        HashKey::ClientIp | HashKey::Path => assert!(digest.is_some(), "{key} is never absent"),
        HashKey::Header(name) => {
            let present = parts.headers.get(name).is_some_and(|v| !v.is_empty());
            assert_eq!(digest.is_some(), present, "{key}: {:?}", parts.headers);
        }
        HashKey::Cookie(_) | HashKey::Query(_) => {}
    }
    if key == HashKey::ClientIp {
        // IPv4-mapped IPv6 is the same client as its IPv4 address.
        let mapped = SocketAddr::new(cidr::canonical(peer.ip()), peer.port() ^ 1);
        assert_eq!(
            digest,
            key.digest(&parts, mapped),
            "client_ip depends on the port or the mapping"
        );
    }
    Ok(())
}

/// `cidr`: line 1 is a `trusted_proxies` entry, line 2 an IP address.
///
/// # Panics
///
/// When an accepted network does not print back to itself or does not
/// contain its own address, when membership of an IPv4 address and of its
/// IPv4-mapped IPv6 form differ, or when the fix a "host bits set" error
/// suggests is itself refused or does not contain the address written.
pub fn cidr(data: &[u8]) -> Result<(), String> {
    let lines = lines(data);
    let text = std::str::from_utf8(lines.first().copied().unwrap_or_default())
        .map_err(|e| e.to_string())?;
    let ip: Option<IpAddr> = lines
        .get(1)
        .and_then(|l| std::str::from_utf8(l).ok())
        .and_then(|s| s.trim().parse().ok());
    let net = match text.parse::<Cidr>() {
        Ok(net) => net,
        Err(CidrError::HostBits(suggested)) => {
            let again = suggested.to_string().parse::<Cidr>();
            assert_eq!(
                again,
                Ok(suggested),
                "the suggestion for {text:?} is refused"
            );
            let addr = text
                .split('/')
                .next()
                .and_then(|a| a.parse::<IpAddr>().ok());
            let addr =
                addr.unwrap_or_else(|| panic!("host bits reported for {text:?}, no address"));
            // `contains` matches an IPv4-mapped address as IPv4, so an IPv6
            // network wider than the mapped range (`::/41`) never contains
            // one: the suggestion is checked within the family `contains`
            // sees the address in.
            let suggested_v4 = !suggested.to_string().contains(':');
            if suggested_v4 == cidr::canonical(addr).is_ipv4() {
                assert!(
                    suggested.contains(addr),
                    "{suggested} does not contain {addr}"
                );
            }
            return Err(CidrError::HostBits(suggested).to_string());
        }
        Err(e) => return Err(e.to_string()),
    };
    let printed = net.to_string();
    assert_eq!(
        printed.parse::<Cidr>(),
        Ok(net),
        "{text:?} prints as {printed:?}"
    );
    let own = printed
        .split('/')
        .next()
        .and_then(|a| a.parse::<IpAddr>().ok());
    let own = own.unwrap_or_else(|| panic!("{printed:?} has no address"));
    assert!(net.contains(own), "{net} does not contain its own address");
    if let Some(ip) = ip {
        if let IpAddr::V4(v4) = ip {
            let mapped = IpAddr::V6(v4.to_ipv6_mapped());
            assert_eq!(
                net.contains(ip),
                net.contains(mapped),
                "{net}: {ip} vs {mapped}"
            );
        }
        let _ = net.contains(ip);
    }
    Ok(())
}

/// `request_headers`: a request head through the proxy's own header code,
/// in the order `proxy::http::handle` runs it: the request id, the Host
/// hygiene checks, the hop-by-hop strip and the forwarding headers.
///
/// Input: line 1 `VERSION TARGET` (`1.0`, `1.1` or `2`), line 2 the
/// client's `ip:port`, line 3 the listener's `trusted_proxies` (comma
/// separated; entries that do not parse are left out), line 4 `1` for
/// `forwarded_header = true`, the rest `name: value` header lines.
///
/// # Panics
///
/// When the id is not valid or a valid client id is not kept; when a
/// request passes the checks with two `Host`s, without one on HTTP/1.1, or
/// with one that differs from the target's authority; when the forwarding
/// headers are not one line each ending in the client's address, or keep
/// anything an untrusted client sent.
pub fn request_headers(data: &[u8]) -> Result<(), String> {
    let lines = lines(data);
    let first = lines.first().copied().unwrap_or_default();
    let (version, target) = match first.iter().position(|&b| b == b' ') {
        Some(i) => (&first[..i], &first[i + 1..]),
        None => (first, &b"/"[..]),
    };
    let version = match version {
        b"1.0" => Version::HTTP_10,
        b"2" => Version::HTTP_2,
        _ => Version::HTTP_11,
    };
    let mut req = Request::builder()
        .version(version)
        .uri(target)
        .body(())
        .map_err(|e| e.to_string())?;
    for line in lines.iter().skip(4) {
        if let Some((n, v)) = header_line(line) {
            req.headers_mut().append(n, v);
        }
    }
    let peer = peer_of(lines.get(1));
    let trusted_proxies: Vec<Cidr> = lines
        .get(2)
        .and_then(|l| std::str::from_utf8(l).ok())
        .unwrap_or_default()
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let rules = Forwarding {
        trusted_proxies,
        forwarded_header: lines.get(3).is_some_and(|l| l.trim_ascii() == b"1"),
    };

    // The request id.
    let sent: Vec<HeaderValue> = req
        .headers()
        .get_all(&X_REQUEST_ID)
        .iter()
        .cloned()
        .collect();
    let id = request_id(req.headers());
    assert!(request_id::is_valid(id.as_bytes()), "invalid id {id:?}");
    if let [one] = sent.as_slice() {
        if request_id::is_valid(one.as_bytes()) {
            assert_eq!(&id, one, "a valid client id was replaced");
        }
    }

    // Hygiene.
    hygiene::check(&mut req).map_err(|e| e.to_string())?;
    let hosts: Vec<&HeaderValue> = req.headers().get_all(header::HOST).iter().collect();
    assert!(hosts.len() <= 1, "two Hosts passed: {hosts:?}");
    if version == Version::HTTP_11 {
        assert_eq!(hosts.len(), 1, "HTTP/1.1 without Host passed");
    }
    if let (Some(a), Some(h)) = (req.uri().authority(), hosts.first()) {
        let h = h.to_str().unwrap_or_default();
        assert!(
            a.as_str().eq_ignore_ascii_case(h),
            "Host {h:?} differs from the target's {a}"
        );
    }

    // Forwarding.
    let (mut parts, ()) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let ip = cidr::canonical(peer.ip());
    let trusted = rules.trusts(ip);
    let authority = parts.uri.authority().cloned();
    set_forwarding(&mut parts.headers, peer, "http", authority.as_ref(), &rules);
    // One line of a header this node wrote, as text. What a trusted proxy
    // sent is passed on as it came (several lines, bytes that are not
    // text), so only the headers this node sets are checked this way.
    let written = |name: &str| -> Option<String> {
        let mut all = parts.headers.get_all(name).iter();
        let first = all.next().map(|v| v.to_str().map(str::to_owned));
        assert!(all.next().is_none(), "more than one {name} line");
        first.map(|v| v.unwrap_or_else(|_| panic!("{name} is not text")))
    };
    let xff = written("x-forwarded-for").unwrap_or_else(|| panic!("no X-Forwarded-For"));
    let last = xff.rsplit(", ").next().unwrap_or_default();
    assert_eq!(
        last,
        ip.to_string(),
        "X-Forwarded-For {xff:?} must end with the client"
    );
    if !trusted {
        assert_eq!(xff, ip.to_string(), "an untrusted client's list was kept");
        assert_eq!(written("x-forwarded-proto").as_deref(), Some("http"));
        let host = parts.headers.get(header::HOST).cloned();
        let host = host.or_else(|| authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        assert_eq!(parts.headers.get("x-forwarded-host"), host.as_ref());
        let fwd = written("forwarded");
        match (&fwd, rules.forwarded_header) {
            (None, false) => {}
            (Some(f), true) => assert!(f.starts_with("for="), "Forwarded {f:?}"),
            (f, on) => panic!("Forwarded {f:?} with forwarded_header = {on}"),
        }
    }
    if rules.forwarded_header {
        let f = written("forwarded")
            .unwrap_or_else(|| panic!("forwarded_header = true and no Forwarded"));
        assert!(f.contains(";proto=http"), "Forwarded {f:?}");
    }
    Ok(())
}

/// `upstream_response`: an upstream's HTTP/1.1 response through the
/// proxy's own parser (`proxy::h1_exchange`): the head (1xx skipped, the
/// framing chosen) and the body decoded, fed to it in pieces as a socket
/// would. Input: byte 0 (`& 1`) says whether the request was `HEAD`, byte 1
/// the size of each piece fed (1–256); the rest is the response.
///
/// Returns the error the exchange would fail with (as text), or the body's
/// byte count.
///
/// # Panics
///
/// When the body holds more bytes than the input, or when the response fed
/// in one piece and in small pieces parses differently (other head, body
/// bytes or outcome): parsing must not depend on how reads split it. The
/// whole is parsed into a header map, the pieces with the head kept as its
/// lines (`proxy::raw_head`) where the rule allows: the two must give the
/// same headers (but the framing ones the writer sets itself).
pub fn upstream_response(data: &[u8]) -> Result<usize, String> {
    let head_request = data.first().is_some_and(|b| b & 1 == 1);
    let piece = usize::from(data.get(1).copied().unwrap_or(0)) + 1;
    let response = data.get(2..).unwrap_or_default();
    let whole = decode_response(response, response.len().max(1), head_request, false);
    let pieces = decode_response(response, piece, head_request, true);
    assert_eq!(whole, pieces, "pieces of {piece} bytes parse differently");
    let (_, _, body) = whole?;
    assert!(body.len() <= response.len(), "more body than input");
    Ok(body.len())
}

/// A decoded response: its status, headers (name, value) and body.
type Decoded = (u16, Vec<(String, Vec<u8>)>, Vec<u8>);

/// Feeds `response` to the upstream parser `piece` bytes at a time; the
/// final status, headers and body, or the error.
fn decode_response(
    response: &[u8],
    piece: usize,
    head_request: bool,
    raw_ok: bool,
) -> Result<Decoded, String> {
    use crate::proxy::h1_exchange::{take_head, Decoder, Step};
    let mut fed = response.chunks(piece);
    let mut buf = bytes::BytesMut::new();
    let mut kept = None;
    let head = loop {
        let keep = raw_ok.then_some(&mut kept);
        if let Some(head) = take_head(&mut buf, head_request, keep).map_err(|e| e.to_string())? {
            break head;
        }
        match fed.next() {
            Some(p) => buf.extend_from_slice(p),
            None => return Err("closed before a complete head".into()),
        }
    };
    let mut decoder = Decoder::for_head(&head);
    let mut body = Vec::new();
    loop {
        match decoder.step(&mut buf).map_err(|e| e.to_string())? {
            Step::Frame(f) => {
                if let Ok(d) = f.into_data() {
                    body.extend_from_slice(&d);
                }
            }
            Step::End => break,
            Step::More => match fed.next() {
                Some(p) => buf.extend_from_slice(p),
                None => {
                    decoder.eof().map_err(|e| e.to_string())?;
                    break;
                }
            },
        }
    }
    // The headers a client would be sent, the framing ones aside; by name
    // (a map groups a name's values, the lines keep the instance's order).
    let framing = |n: &str| matches!(n, "content-length" | "transfer-encoding" | "connection");
    let headers = match &kept {
        Some(raw) => raw
            .lines()
            .map(|(n, v)| (String::from_utf8_lossy(n).to_ascii_lowercase(), v.to_vec()))
            .filter(|(n, _)| !framing(n))
            .collect(),
        None => head
            .parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .filter(|(n, _)| !framing(n))
            .collect(),
    };
    let mut headers: Vec<(String, Vec<u8>)> = headers;
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((head.parts.status.as_u16(), headers, body))
}

/// `client_request`: the client-side HTTP/1.1 fast path's request-head
/// parse and its fast-path/hand-off decision (`proxy/h1_server.rs`,
/// `take_request`). `data[0]` sets the size of the pieces the input is fed
/// in (1 to 256 bytes); the rest is what a client sends. Heads are taken
/// one after the other as the serving loop takes them (each one's body
/// skipped), until the input ends or a head goes to hyper. Returns the
/// number of heads taken and whether the connection went to hyper.
///
/// # Panics
///
/// When the input fed whole and fed in pieces is decided differently
/// (other heads, another hand-off point or other bytes handed over): the
/// decision must not depend on how reads split it. When a hand-off changed
/// the buffer (hyper must see the request as it came), or a taken head
/// consumed anything but a prefix of the buffer.
pub fn client_request(data: &[u8]) -> (usize, bool) {
    let piece = usize::from(data.first().copied().unwrap_or(0)) + 1;
    let input = data.get(1..).unwrap_or_default();
    let whole = decode_requests(input, input.len().max(1));
    let pieces = decode_requests(input, piece);
    assert_eq!(whole, pieces, "pieces of {piece} bytes decide differently");
    (whole.0.len(), whole.1.is_some())
}

/// Feeds `input` to the client-side head parser `piece` bytes at a time;
/// each head taken (as text) and, on a hand-off, the bytes hyper gets.
fn decode_requests(input: &[u8], piece: usize) -> (Vec<String>, Option<Vec<u8>>) {
    use crate::proxy::h1_server::{take_request, Taken};
    let mut fed = input.chunks(piece);
    let mut buf = bytes::BytesMut::new();
    let mut heads = Vec::new();
    loop {
        let before = buf.to_vec();
        match take_request(&mut buf) {
            Taken::Head(h) => {
                assert!(
                    buf.len() < before.len() && before.ends_with(&buf),
                    "a head consumed more than a prefix"
                );
                heads.push(format!(
                    "{} {} {:?} {} {}",
                    h.parts.method, h.parts.uri, h.parts.headers, h.body_len, h.close
                ));
                while buf.len() < h.body_len {
                    match fed.next() {
                        Some(p) => buf.extend_from_slice(p),
                        None => return (heads, None),
                    }
                }
                let _ = buf.split_to(h.body_len);
            }
            Taken::HandOff => {
                assert_eq!(&buf[..], &before[..], "a hand-off changed the buffer");
                let mut rest = buf.to_vec();
                fed.for_each(|p| rest.extend_from_slice(p));
                return (heads, Some(rest));
            }
            Taken::Partial => match fed.next() {
                Some(p) => buf.extend_from_slice(p),
                None => return (heads, None),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn upstream_response_decodes_the_same_in_any_pieces() {
        let chunked = b"\x00\x02HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx: y\r\n\r\n";
        assert_eq!(upstream_response(chunked), Ok(3));
        let head = b"\x01\x00HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
        assert_eq!(upstream_response(head), Ok(0));
        let close = b"\x00\x00HTTP/1.0 200 OK\r\n\r\nuntil close";
        assert_eq!(upstream_response(close), Ok(11));
        let short = b"\x00\x05HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab";
        assert!(upstream_response(short).is_err());
        assert!(
            upstream_response(b"\x00\x00HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n").is_err()
        );
    }
    use super::*;

    #[test]
    fn client_hello_reads_the_checked_in_seeds() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/client_hello");
        let seed = |name: &str| std::fs::read(dir.join(name)).unwrap();
        let sni = seed("tls13-sni");
        assert_eq!(client_hello(&sni), Some(Some("api.example".into())));
        assert_eq!(client_hello(&sni[..sni.len() / 2]), None);
        assert_eq!(client_hello(&seed("tls12-ip-no-sni")), Some(None));
        assert_eq!(client_hello(&seed("plain-http")), Some(None));
    }

    #[test]
    fn admin_body_runs_the_handlers_parsers() {
        let ok = br#"{"address":"127.0.0.1","port":9001,"weight":3}"#;
        assert_eq!(admin_body(AdminBody::Register, "api", "a-1", ok), Ok(()));
        let e = admin_body(AdminBody::Register, "api", "a-1", br#"{"port":9001}"#);
        assert!(e.is_err_and(|e| e.contains("address")));
        let e = admin_body(AdminBody::Register, "api", "a/1", ok);
        assert!(e.is_err(), "an id with a slash is refused");
        let h = admin_body(AdminBody::Health, "api", "a-1", br#"{"health_score":1.5}"#);
        assert!(h.is_err_and(|e| e.contains("health")));
        let s = admin_body(AdminBody::Strategy, "api", "a-1", br#"{"strategy":"p2c"}"#);
        assert_eq!(s, Ok(()));
    }

    #[test]
    fn state_file_parses_what_load_reads() {
        assert_eq!(state_file(r#"{"version":1}"#), Ok(()));
        assert!(state_file(r#"{"version":2}"#).is_err_and(|e| e.contains("version")));
        assert!(state_file("{ not json").is_err());
    }

    #[test]
    fn hash_key_checks_specs_and_extraction() {
        assert_eq!(
            hash_key(b"header:X-User\n/a\n10.0.0.1:5\nx-user: alice"),
            Ok(())
        );
        assert_eq!(hash_key(b"header:X-User\n/a\n10.0.0.1:5\nx-user:"), Ok(()));
        assert_eq!(
            hash_key(b"cookie:sid\n/a\n10.0.0.1:5\ncookie: a=1; sid=\"x\""),
            Ok(())
        );
        assert_eq!(
            hash_key(b"query:u\n/a?u=1&v=2\n[::ffff:10.0.0.1]:5"),
            Ok(())
        );
        assert_eq!(hash_key(b"client_ip\n/\n[::ffff:10.0.0.1]:5"), Ok(()));
        assert!(hash_key(b"header:\n/").is_err_and(|e| e.contains("names no header")));
        assert!(hash_key(b"cookie:a b\n/").is_err());
    }

    #[test]
    fn cidr_checks_networks_and_suggestions() {
        assert_eq!(cidr(b"10.0.0.0/8\n10.1.2.3"), Ok(()));
        assert_eq!(cidr(b"::ffff:10.0.0.0/104\n10.1.2.3"), Ok(()));
        assert!(cidr(b"10.0.0.1/8\n10.0.0.1").is_err_and(|e| e.contains("10.0.0.0/8")));
        assert!(cidr(b"10.0.0.0/33").is_err());
        assert!(cidr(b"10.0.0.0/+8").is_err());
        // Found by the fuzz target: a mapped address under a prefix below 96
        // suggests an IPv6 network, which matches no mapped client (they
        // are matched as IPv4); not a contradiction.
        assert!(cidr(b"::ffff:17.0.0.1/41\n1.010").is_err_and(|e| e.contains("::/41")));
    }

    #[test]
    fn request_headers_runs_id_hygiene_and_forwarding() {
        let trusted = b"1.1 /x\n10.0.0.7:5\n10.0.0.0/8\n1\nhost: a.example\nx-forwarded-for: 203.0.113.9\nx-request-id: abc";
        assert_eq!(request_headers(trusted), Ok(()));
        let untrusted = b"1.1 http://a.example/x\n[2001:db8::1]:5\n10.0.0.0/8\n0\nhost: b.example\nforwarded: for=1.2.3.4\nconnection: x-forwarded-for";
        assert_eq!(request_headers(untrusted), Ok(()));
        assert_eq!(
            request_headers(b"2 http://a.example/x\n10.0.0.7:5\n\n1"),
            Ok(())
        );
        assert!(request_headers(b"1.1 /x\n10.0.0.7:5\n\n0").is_err_and(|e| e.contains("Host")));
        assert!(request_headers(b"1.1 /x\n\n\n\nhost: a\nhost: b").is_err());
        // Found by the fuzz target: a trusted proxy's `Forwarded` that is
        // not text, with forwarded_header off, is passed on as it came
        // (hyper accepted it); the model had required text.
        let opaque = b"1.1 /x\n10.0.0.7:5000\n0.0.0.0/0, ::/0\n0\nhost: a\nforwarded: for=\"[2001:db8::2\xaa\xdd\"\nforwarded: for=1.2.3.4\nx-forwarded-proto: \xffhttps";
        assert_eq!(request_headers(opaque), Ok(()));
    }

    #[test]
    fn client_requests_decide_the_same_whole_and_in_pieces() {
        let pipelined = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nPOST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n";
        for piece in [0u8, 1, 6, 255] {
            let mut data = vec![piece];
            data.extend_from_slice(pipelined);
            assert_eq!(client_request(&data), (2, true), "piece {piece}");
        }
        assert_eq!(client_request(b""), (0, false));
        assert_eq!(client_request(b"\x03GET / HTTP/1.1\r\nHo"), (0, false));
    }
}
