//! `X-Request-Id`: one id per request, forwarded to the backend, returned to
//! the client (on the proxy's own error responses too) and written in the
//! access log, so one request can be followed through every log. A
//! backend's own `X-Request-Id` on its response is replaced by it: the
//! client always gets back the id the backend was sent.
//!
//! A client's id is kept when it is valid: exactly one `X-Request-Id` line
//! of 1..=128 visible ASCII characters (`!`..=`~`) without a comma. Anything
//! else (absent, empty, too long, spaces, control or non-ASCII bytes, a
//! comma or a second line, which would make it a list) is replaced by a
//! generated id. Kept from any peer, not only `trusted_proxies`: the id is a
//! correlation handle chosen by the caller, not a fact about the client the
//! backend could rely on, and the validity rule keeps it from breaking a log
//! line. Do not use it for anything security related.
//!
//! A generated id is 128 random bits (`fastrand`, per-thread, seeded at
//! random) as 32 lowercase hex digits: unique in practice, no coordination
//! between nodes, and no clock or counter to read.
//!
//! The value is marked *sensitive*, which only HTTP/2 reads: HPACK then
//! sends it as a literal that is never indexed. A value unique to each
//! request gains nothing from the connection's header table, and indexing
//! it cost the most of any header: every new id was inserted (evicting the
//! entries that do repeat, which were then sent and inserted again) after a
//! walk over every earlier id still in the table, compared byte by byte
//! (HPACK's table search was ~10 % of the proxy's CPU with h2c on both sides,
//! `docs/benchmarks.md`, "HTTP/2 in and out (h2c)").

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// `x-request-id`.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client id kept.
pub(crate) const MAX_LEN: usize = 128;

/// The request's id: the client's when valid (module doc), else a new one.
/// Marked sensitive: never indexed by HPACK (module doc).
pub(crate) fn request_id(headers: &HeaderMap) -> HeaderValue {
    // A walk over the lines, not `get_all`: hashing the custom name cost
    // more than comparing the few names a request has (most of them
    // standard, told apart from a custom one without reading its bytes).
    let mut lines = headers
        .iter()
        .filter(|(name, _)| name.as_str() == X_REQUEST_ID.as_str())
        .map(|(_, v)| v);
    let mut id = match (lines.next(), lines.next()) {
        (Some(v), None) if is_valid(v.as_bytes()) => v.clone(),
        _ => generate(),
    };
    id.set_sensitive(true);
    id
}

/// 1..=[`MAX_LEN`] visible ASCII characters, no comma.
pub(crate) fn is_valid(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len()) && id.iter().all(|&b| b.is_ascii_graphic() && b != b',')
}

/// 128 random bits as 32 hex digits.
fn generate() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u128(..).to_be_bytes();
    let mut buf = [0u8; 32];
    // A byte at a time: shifting the `u128` per digit cost ~10
    // instructions a digit.
    for (pair, b) in buf.chunks_exact_mut(2).zip(n) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
    // Hex digits are always a valid header value.
    // One allocation, shared by its clones (the request's and the
    // response's copy): `from_bytes` would copy into a buffer whose first
    // clone allocates again.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_of(lines: &[&[u8]]) -> HeaderValue {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(X_REQUEST_ID, HeaderValue::from_bytes(l).unwrap());
        }
        request_id(&h)
    }

    fn is_generated(v: &HeaderValue) -> bool {
        v.len() == 32
            && v.as_bytes()
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    }

    #[test]
    fn a_valid_client_id_is_kept() {
        let long = [b'x'; MAX_LEN];
        for id in [&b"abc-123"[..], b"a", b"!~{}[]:;=+/", &long] {
            assert_eq!(id_of(&[id]).as_bytes(), id);
        }
    }

    #[test]
    fn an_invalid_or_missing_id_is_replaced_by_a_generated_one() {
        let long = [b'x'; MAX_LEN + 1];
        for lines in [
            &[][..],
            &[&b""[..]],
            &[&b"has space"[..]],
            &[&b"a,b"[..]],
            &[&b"tab\there"[..]],
            &[&b"caf\xc3\xa9"[..]],
            &[&long[..]],
            &[&b"one"[..], &b"two"[..]],
        ] {
            let got = id_of(lines);
            assert!(is_generated(&got), "{lines:?} gave {got:?}");
        }
    }

    #[test]
    fn kept_and_generated_ids_are_never_indexed_by_hpack() {
        let long = [b'x'; MAX_LEN + 1];
        for lines in [&[&b"abc-123"[..]][..], &[], &[&long[..]]] {
            assert!(id_of(lines).is_sensitive(), "{lines:?}");
        }
    }

    #[test]
    fn generated_ids_differ() {
        let a = generate();
        let b = generate();
        assert!(is_generated(&a) && is_generated(&b));
        assert_ne!(a, b);
    }
}
