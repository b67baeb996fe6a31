//! The client side's own HTTP/1.1 loop (`proxy/h1_server.rs`) and its
//! hand-off to hyper, against the real binary on raw sockets: a keep-alive
//! connection served by the loop goes on working when a request that is
//! not its own (`Expect: 100-continue`, a malformed head) moves it to
//! hyper, whose answers (`100 Continue`, 400) are unchanged; pipelined
//! requests are answered in order.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";

/// Reads one response head (and its `content-length` body, if any) from
/// `s`, keeping what follows in `rest`; the head as text and the body.
async fn response(s: &mut TcpStream, rest: &mut Vec<u8>) -> (String, Vec<u8>) {
    let read = async {
        let head_end = loop {
            if let Some(i) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before a response: {rest:?}");
            rest.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&rest[..head_end]).into_owned();
        rest.drain(..head_end);
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
        while rest.len() < len {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed in a body");
            rest.extend_from_slice(&chunk[..n]);
        }
        let body = rest.drain(..len).collect();
        (head, body)
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a response in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_moves_from_the_fast_path_to_hyper_and_keeps_working() {
    let b = RawBackend::start(Some(OK)).await;
    let lb = Lb::start(&raw_config("", "", &[("b", b.addr)]));
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    let mut rest = Vec::new();
    // Two pipelined requests in one write: the loop answers both, in order.
    s.write_all(&[GET, GET].concat()).await.unwrap();
    for _ in 0..2 {
        let (head, body) = response(&mut s, &mut rest).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\ndate: "), "{head}");
        assert_eq!(body, b"ok");
    }
    // `Expect: 100-continue` is hyper's: it asks for the body, and the
    // request goes through.
    s.write_all(
        b"POST /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, _) = response(&mut s, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 100 Continue\r\n"), "{head}");
    s.write_all(b"ab").await.unwrap();
    let (head, body) = response(&mut s, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body, b"ok");
    // The same connection, now hyper's, serves on, and answers a malformed
    // head with its own 400.
    s.write_all(GET).await.unwrap();
    let (head, _) = response(&mut s, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nNo colon here\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = response(&mut s, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
    assert_eq!(b.hits(), 4, "every well-formed request reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_head_after_a_fast_one_gets_hyper_400_in_order() {
    let b = RawBackend::start(Some(OK)).await;
    let lb = Lb::start(&raw_config("", "", &[("b", b.addr)]));
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    let mut rest = Vec::new();
    // One write: the first is answered by the loop, the second (obs-fold)
    // is handed over with its bytes intact and refused by hyper.
    s.write_all(&[GET, b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n"].concat())
        .await
        .unwrap();
    let (head, body) = response(&mut s, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body, b"ok");
    let (head, _) = response(&mut s, &mut rest).await;
    assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
    assert_eq!(b.hits(), 1);
}
