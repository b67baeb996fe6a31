//! Request hygiene against the real binary, with raw sockets for the shapes
//! an HTTP client library would never send: a request without `Host`, with
//! two, or smuggled by its framing is refused with 400 and never reaches a
//! backend; an absolute-form target wins over `Host`; hop-by-hop headers
//! cross in neither direction; a backend answer with two lengths is a 502;
//! a head of more than 100 header lines gets 431.

use crate::support::*;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// The header `name` of a recorded request head, lower-cased lines.
fn header<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_hosts_and_smuggling_shapes_get_400_and_reach_no_backend() {
    let b = RawBackend::start(Some(OK)).await;
    let lb = Lb::start(&raw_config("", "", &[("b", b.addr)]));
    let addr = lb.addr("web");
    let refused: [(&str, &[u8]); 9] = [
        ("no Host", b"GET / HTTP/1.1\r\n\r\n"),
        (
            "no Host, absolute form",
            b"GET http://a.example/ HTTP/1.1\r\n\r\n",
        ),
        ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        (
            "two equal Hosts",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
        ),
        (
            "conflicting Content-Lengths",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        ),
        (
            "unknown transfer coding",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabcd",
        ),
        (
            "obs-fold",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
        ),
        ("bare CR", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n"),
        ("NUL", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\0c\r\n\r\n"),
    ];
    for (what, request) in refused {
        let r = raw_exchange(addr, request).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{what}: {r:?}");
    }
    assert_eq!(b.hits(), 0, "a refused request reached the backend");
    // The same connection shapes done right are served.
    let r = raw_exchange(addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r:?}");
    // HTTP/1.0 may omit Host: routed with no host.
    let r = raw_exchange(addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.0 200"),
        "HTTP/1.0 without Host: {r:?}"
    );
    assert_eq!(b.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_is_routed_and_forwarded_by_its_authority() {
    let b = RawBackend::start(Some(OK)).await;
    // Only a.example is routed: a request for b.example would get 404.
    let config = raw_config("", "", &[("b", b.addr)]).replace(
        "[[listener.route]]\n",
        "[[listener.route]]\nhost = \"a.example\"\n",
    );
    let lb = Lb::start(&config);
    let addr = lb.addr("web");
    let r = raw_exchange(
        addr,
        b"GET http://a.example/x HTTP/1.1\r\nHost: b.example\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r:?}");
    let r = raw_exchange(addr, b"GET /x HTTP/1.1\r\nHost: b.example\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r:?}");
    let heads = b.heads.lock().clone();
    assert_eq!(heads.len(), 1);
    assert_eq!(header(&heads[0], "host"), ["a.example"], "{}", heads[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_cross_in_neither_direction() {
    let answer: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\
        Connection: X-Resp-Private\r\nX-Resp-Private: 1\r\nKeep-Alive: timeout=5\r\n\
        Proxy-Authenticate: Basic\r\nX-Resp-Normal: yes\r\n\r\nok";
    let b = RawBackend::start(Some(answer)).await;
    let lb = Lb::start(&raw_config("", "", &[("b", b.addr)]));
    let r = raw_exchange(
        lb.addr("web"),
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: X-Req-Private, keep-alive\r\n\
          X-Req-Private: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic eA==\r\n\
          TE: gzip\r\nProxy-Connection: keep-alive\r\nX-Req-Normal: yes\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r:?}");
    // Response: the named header and every hop-by-hop one are gone.
    assert_eq!(header(&r, "x-resp-normal"), ["yes"], "{r}");
    for gone in ["x-resp-private", "keep-alive", "proxy-authenticate"] {
        assert!(
            header(&r, gone).is_empty(),
            "{gone} reached the client: {r}"
        );
    }
    assert!(
        !r.to_ascii_lowercase().contains("x-resp-private"),
        "Connection naming it reached the client: {r}"
    );
    // Request: the same on the way in.
    let heads = b.heads.lock().clone();
    let head = &heads[0];
    assert_eq!(header(head, "x-req-normal"), ["yes"], "{head}");
    for gone in [
        "x-req-private",
        "keep-alive",
        "proxy-authorization",
        "te",
        "proxy-connection",
    ] {
        assert!(
            header(head, gone).is_empty(),
            "{gone} reached the backend: {head}"
        );
    }
    assert!(
        !head.to_ascii_lowercase().contains("x-req-private"),
        "Connection naming it reached the backend: {head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_answer_with_two_lengths_is_a_502() {
    let b = RawBackend::start(Some(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    ))
    .await;
    let lb = Lb::start(&raw_config("", "retries = 0", &[("b", b.addr)]));
    let r = raw_exchange(lb.addr("web"), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 502"), "{r:?}");
    assert!(!r.contains("abc"), "the smuggled body must not pass: {r:?}");
    assert_eq!(b.hits(), 1);
}

/// A request head of `Host` plus `extra` header lines.
fn head_with_lines(extra: usize) -> Vec<u8> {
    let mut r = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
    for i in 0..extra {
        r.push_str(&format!("X-Line-{i}: v\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_of_more_than_100_header_lines_gets_431_and_reaches_no_backend() {
    let b = RawBackend::start(Some(OK)).await;
    let lb = Lb::start(&raw_config("", "", &[("b", b.addr)]));
    let addr = lb.addr("web");
    // 100 lines (Host + 99) is the limit (HAProxy's default is 101).
    let r = raw_exchange(addr, &head_with_lines(99)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "100 header lines: {r:?}");
    assert_eq!(b.hits(), 1);
    let r = raw_exchange(addr, &head_with_lines(100)).await;
    assert!(r.starts_with("HTTP/1.1 431"), "101 header lines: {r:?}");
    assert_eq!(b.hits(), 1, "a refused head reached the backend");
}
