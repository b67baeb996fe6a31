//! Client-side limits against the real binary on raw sockets: a head
//! trickled a byte a second is cut at `header_read_timeout`, on a new
//! connection and on a keep-alive one; an idle keep-alive connection is
//! closed at `idle_timeout` (and not earlier at the head timeout), an
//! HTTP/2 one gets GOAWAY then; a request in flight is cut by neither; a
//! response body that stops is cut at `response_idle_timeout`; a
//! stalled request body gets 408 at `request_body_timeout`; a listener's
//! `max_connections` closes the connection above it while those inside
//! are served; 10,000 idle connections do not slow new requests.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";

/// Reads from `s` until the peer closes (or errors); how long after
/// `since` that was, and what was read (as text, lossy). Gives up after
/// `limit`.
async fn closed_after(
    s: &mut (impl AsyncRead + Unpin),
    since: Instant,
    limit: Duration,
) -> (Duration, String) {
    let (took, got) = closed_after_bytes(s, since, limit).await;
    (took, String::from_utf8_lossy(&got).into_owned())
}

/// [`closed_after`] with the bytes as they came.
async fn closed_after_bytes(
    s: &mut (impl AsyncRead + Unpin),
    since: Instant,
    limit: Duration,
) -> (Duration, Vec<u8>) {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    (since.elapsed(), got)
}

/// The `OK` backend behind a proxy whose listener has `listener_extra`.
async fn ok_behind(listener_extra: &str) -> (RawBackend, Lb) {
    let b = RawBackend::start(Some(OK)).await;
    let lb = Lb::start(&raw_config(listener_extra, "", &[("b", b.addr)]));
    (b, lb)
}

/// Sends `GET` on a new connection to `addr` and reads until the proxy
/// closes it (at most 6 s); how long that took, and what was read.
async fn get_until_closed(addr: SocketAddr) -> (Duration, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(GET).await.unwrap();
    closed_after(&mut s, Instant::now(), Duration::from_secs(6)).await
}

/// Writes `GET` and reads one whole response (the `OK` backend's, 2 bytes
/// of body) on `s`.
async fn one_request(s: &mut TcpStream) {
    s.write_all(GET).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"\r\n\r\nok") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("a response within 5 s")
            .unwrap();
        assert!(n > 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"));
}

/// Trickles a request head a byte a second on `s` (in the background)
/// until the write fails.
fn trickle(s: TcpStream) -> (tokio::task::JoinHandle<()>, tokio::net::tcp::OwnedReadHalf) {
    let (r, mut w) = s.into_split();
    let task = tokio::spawn(async move {
        for b in b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n" {
            if w.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    (task, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_head_is_cut_at_the_header_timeout_and_idle_waits_for_the_idle_timeout() {
    let (b, lb) = ok_behind("header_read_timeout = \"2s\"\nidle_timeout = \"4s\"").await;
    let addr = lb.addr("web");

    // 1. A new connection trickling its head: cut 2 s after its first byte.
    let fresh = async {
        let s = TcpStream::connect(addr).await.unwrap();
        let t = Instant::now();
        let (task, mut r) = trickle(s);
        let took = closed_after(&mut r, t, Duration::from_secs(8)).await.0;
        task.abort();
        took
    };
    // 2. The same on a keep-alive connection after one good request.
    let kept = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        one_request(&mut s).await;
        let t = Instant::now();
        let (task, mut r) = trickle(s);
        let took = closed_after(&mut r, t, Duration::from_secs(8)).await.0;
        task.abort();
        took
    };
    // 3. An idle keep-alive connection: closed at the idle timeout (4 s),
    // not at the head timeout (2 s).
    let idle = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        one_request(&mut s).await;
        let t = Instant::now();
        closed_after(&mut s, t, Duration::from_secs(10)).await.0
    };
    // 4. A connection that never sends a byte: the idle rule too.
    let silent = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let t = Instant::now();
        closed_after(&mut s, t, Duration::from_secs(10)).await
    };
    let (fresh, kept, idle, (silent, said)) = tokio::join!(fresh, kept, idle, silent);
    let within = |d: Duration, lo: u64, hi: u64| {
        d >= Duration::from_millis(lo) && d <= Duration::from_millis(hi)
    };
    assert!(
        within(fresh, 1800, 3000),
        "new connection cut after {fresh:?}"
    );
    assert!(
        within(kept, 1800, 3000),
        "keep-alive connection cut after {kept:?}"
    );
    assert!(
        within(idle, 3800, 5000),
        "idle connection closed after {idle:?}"
    );
    assert!(
        within(silent, 3800, 5000),
        "silent connection closed after {silent:?}"
    );
    assert_eq!(
        said, "",
        "nothing is answered to a connection that sent nothing"
    );
    assert_eq!(
        b.hits(),
        2,
        "only the two complete requests reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_gets_408_at_the_body_timeout() {
    let (b, lb) = ok_behind("request_body_timeout = \"1s\"").await;
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
        .await
        .unwrap();
    let t = Instant::now();
    let (took, said) = closed_after(&mut s, t, Duration::from_secs(5)).await;
    assert!(said.starts_with("HTTP/1.1 408"), "{said:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "408 after {took:?}"
    );
    assert_eq!(
        b.hits(),
        0,
        "a request whose body never came reached the backend"
    );
    // A body that keeps coming, slower than nothing but faster than the
    // timeout, is fine: 4 chunks 500 ms apart.
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n")
        .await
        .unwrap();
    for c in b"abcd" {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.write_all(&[*c]).await.unwrap();
    }
    // The answer, however long a loaded machine takes to relay it (the
    // connection stays open: it is keep-alive).
    let said = response_head(&mut s, Duration::from_secs(5)).await;
    assert!(said.starts_with("HTTP/1.1 200"), "{said:?}");
}

/// Reads from `s` until a whole response head has arrived, the peer
/// closes, or `limit` passes; what was read.
async fn response_head(s: &mut TcpStream, limit: Duration) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_max_connections_a_connection_is_closed_and_those_inside_are_served() {
    let (b, lb) = ok_behind("max_connections = 2").await;
    let addr = lb.addr("web");
    let mut first = TcpStream::connect(addr).await.unwrap();
    let mut second = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The third: accepted by the kernel, closed by the proxy at once.
    let mut third = TcpStream::connect(addr).await.unwrap();
    let _ = third.write_all(GET).await;
    let (took, said) = closed_after(&mut third, Instant::now(), Duration::from_secs(5)).await;
    assert_eq!(said, "", "the refused connection gets no answer");
    assert!(took < Duration::from_millis(500), "closed after {took:?}");
    // The two inside are served.
    one_request(&mut first).await;
    one_request(&mut second).await;
    // One leaves: its place is free again.
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    one_request(&mut fourth).await;
    assert_eq!(b.hits(), 3);
}

/// The soft descriptor limit of this process raised to its hard limit
/// (children started later inherit it); the new soft limit.
fn raise_fd_limit() -> Option<u64> {
    let prlimit = require("prlimit", "/usr/bin/prlimit", "util-linux")?;
    let pid = std::process::id().to_string();
    let out = Command::new(&prlimit)
        .args([
            "--pid",
            &pid,
            "--nofile",
            "--raw",
            "--noheadings",
            "--output=HARD",
        ])
        .output()
        .ok()?;
    let hard: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    let status = Command::new(&prlimit)
        .args(["--pid", &pid, &format!("--nofile={hard}:{hard}")])
        .status()
        .ok()?;
    status.success().then_some(hard)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_do_not_slow_new_requests() {
    let Some(limit) = raise_fd_limit() else {
        return;
    };
    // The test process and the proxy each hold one descriptor per idle
    // connection; keep 2,000 spare for the rest of the test binary.
    let want = 10_000usize;
    let n = want.min(limit.saturating_sub(2_000) as usize);
    if n < want {
        eprintln!("descriptor limit {limit}: {n} idle connections instead of {want}");
    }
    let (b, lb) = ok_behind("").await;
    let addr = lb.addr("web");
    let idle = open_idle(addr, n).await;
    assert_eq!(idle.len(), n, "every idle connection was accepted");
    // New requests, each on a new connection, are served promptly.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        one_request(&mut s).await;
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(500),
        "slowest request {slowest:?}"
    );
    assert_eq!(b.hits(), 20, "every new request reached the backend");
    // The idle connections are still open (default idle_timeout 60 s).
    let mut probe = [0u8; 1];
    let still_open = idle
        .iter()
        .take(100)
        .filter(|s| matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock))
        .count();
    assert_eq!(still_open, 100);
}

/// Opens `n` connections to `addr` that send nothing, 200 at a time.
async fn open_idle(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut all = Vec::with_capacity(n);
    while all.len() < n {
        let batch = (n - all.len()).min(200);
        let conns = futures_join_all((0..batch).map(|_| TcpStream::connect(addr))).await;
        all.extend(conns.into_iter().map(Result::unwrap));
    }
    all
}

/// Awaits every future, in order (a tiny join_all over tokio tasks).
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_is_not_cut_by_the_client_timeouts() {
    // The backend takes longer than both client timeouts: a request in
    // flight is governed by the service's timeouts only.
    let slow = Backend::start("slow").await;
    slow.set_delay(Duration::from_millis(2500));
    let lb = Lb::start(&raw_config(
        "header_read_timeout = \"1s\"\nidle_timeout = \"1s\"",
        "",
        &[("slow", slow.addr)],
    ));
    let (took, said) = get_until_closed(lb.addr("web")).await;
    assert!(said.starts_with("HTTP/1.1 200"), "{said:?}");
    assert!(said.ends_with("slow"), "{said:?}");
    // Then idle: closed a second after the response.
    assert!(
        took > Duration::from_millis(3000) && took < Duration::from_millis(5000),
        "closed after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_stops_is_cut_and_charged_as_a_reset() {
    // Ten bytes promised, three sent, then nothing.
    let b = RawBackend::start(Some(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")).await;
    let lb = Lb::start(&raw_config(
        "",
        "response_idle_timeout = \"1s\"\nretries = 0",
        &[("b", b.addr)],
    ));
    let (took, said) = get_until_closed(lb.addr("web")).await;
    assert!(said.starts_with("HTTP/1.1 200"), "{said:?}");
    assert!(said.ends_with("\r\n\r\nabc"), "{said:?}");
    assert!(
        took > Duration::from_millis(900) && took < Duration::from_millis(2500),
        "cut after {took:?}"
    );
    let resets = metric_sum(
        &lb,
        "datapunk_lb_requests_total",
        &["instance=\"b\"", "outcome=\"reset\""],
    )
    .await;
    assert_eq!(resets, 1.0, "the stalled body counts as a reset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_gets_goaway_at_the_idle_timeout_only() {
    let (_b, lb) = ok_behind("header_read_timeout = \"1s\"\nidle_timeout = \"3s\"").await;
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    // The preface and an empty SETTINGS frame, then nothing: HTTP/2 frames
    // are not a request head, so only the idle rule applies.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let (took, got) = closed_after_bytes(&mut s, Instant::now(), Duration::from_secs(8)).await;
    assert!(
        // 3 s idle, plus at most the 1 s grace for a client that does not
        // answer the GOAWAY's PING (this one does not).
        took > Duration::from_millis(2800) && took < Duration::from_millis(5000),
        "closed after {took:?}"
    );
    assert!(has_goaway(&got), "no GOAWAY frame in {got:?}");
}

/// Whether the HTTP/2 frames in `bytes` include a GOAWAY (type 7).
fn has_goaway(mut bytes: &[u8]) -> bool {
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        if bytes[3] == 7 {
            return true;
        }
        bytes = bytes.get(9 + len..).unwrap_or(&[]);
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_closes_the_connection_above_its_limit_too() {
    let echo = echo_server().await;
    let lb = Lb::start(&format!(
        "[[listener]]\nname = \"raw\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n\
         service = \"echo\"\nmax_connections = 1\n\
         [service.echo]\n[service.echo.health_check]\nkind = \"none\"\n\
         [[service.echo.instance]]\nid = \"e\"\naddress = \"127.0.0.1\"\nport = {echo}\n"
    ));
    let addr = lb.addr("raw");
    let mut inside = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 5];
    inside.write_all(b"hello").await.unwrap();
    inside.read_exact(&mut buf).await.unwrap();
    let mut above = TcpStream::connect(addr).await.unwrap();
    let _ = above.write_all(b"hello").await;
    let (took, said) = closed_after(&mut above, Instant::now(), Duration::from_secs(5)).await;
    assert_eq!(said, "", "nothing is relayed above the limit");
    assert!(took < Duration::from_millis(500), "closed after {took:?}");
    // The connection inside still relays.
    inside.write_all(b"again").await.unwrap();
    inside.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"again");
}
