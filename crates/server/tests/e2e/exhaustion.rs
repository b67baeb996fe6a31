//! Resource exhaustion: the real process out of file descriptors (its
//! limit lowered with `prlimit --pid` once it is up) logs accept errors at
//! most once a second, does not spin, keeps serving the connections it has
//! already accepted, and serves new ones again once descriptors free up:
//! on an HTTP listener and on a TCP one (bytes to the same HTTP backend),
//! which share the accept loop.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// How long the flood lasts once the descriptors are exhausted.
const FLOOD: Duration = Duration::from_secs(3);
/// Descriptors the process may open beyond those it holds when limited.
const SLACK: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_listener_out_of_descriptors_logs_once_a_second_keeps_serving_and_resumes() {
    exhaust("web").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_out_of_descriptors_logs_once_a_second_keeps_serving_and_resumes() {
    exhaust("raw").await;
}

/// `run` under `prlimit --nofile=256:4096` (a shell's low soft limit):
/// the process raises its soft limit to the hard one before it listens,
/// logs it, and warns only when the listeners' `max_connections` may need
/// more (two descriptors a connection).
#[test]
fn run_raises_its_soft_open_file_limit_to_the_hard_one() {
    let Some(prlimit) = require("prlimit", "/usr/bin/prlimit", "util-linux") else {
        return;
    };
    for (max_connections, warns) in [(1_000, false), (4_000, true)] {
        let config_path = temp_path("nofile.toml");
        let config = WEB_TO_API.replace(
            "protocol = \"http\"\n",
            &format!("protocol = \"http\"\nmax_connections = {max_connections}\n"),
        );
        std::fs::write(
            &config_path,
            with_free_admin(&format!("{config}\n[service.api]\n")),
        )
        .unwrap();
        let mut child = Command::new(&prlimit)
            .arg("--nofile=256:4096")
            .arg(env!("CARGO_BIN_EXE_datapunk-lb"))
            .args(["--log-format", "json", "run", "--threads", "1", "--config"])
            .arg(&config_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        read_json_log(&mut child, "lb", move |v| {
            let _ = tx.send(v);
        });
        let mut lines = Vec::new();
        let t = Instant::now();
        while lines
            .iter()
            .filter(|v: &&serde_json::Value| v["message"] == "listening")
            .count()
            < 2
        {
            let left = Duration::from_secs(20).saturating_sub(t.elapsed());
            lines.push(rx.recv_timeout(left).expect("datapunk-lb did not listen"));
        }
        // prlimit execs the binary: the same process.
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&config_path);
        let open_files = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .split_whitespace()
            .skip(3)
            .take(2)
            .collect::<Vec<_>>();
        assert_eq!(open_files, ["4096", "4096"], "{limits}");
        let logged = lines
            .iter()
            .find(|v| v["message"] == "open file limit")
            .unwrap_or_else(|| panic!("no open file limit line: {lines:?}"));
        assert_eq!(
            (&logged["limit"], &logged["raised_from"]),
            (&4096.into(), &256.into())
        );
        let warned = lines.iter().any(|v| {
            v["level"] == "WARN"
                && v["message"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("open file limit")
        });
        assert_eq!(
            warned, warns,
            "max_connections {max_connections}: {lines:?}"
        );
    }
}

/// The scenario on `listener`: `web` (HTTP) or `raw` (TCP).
async fn exhaust(listener: &str) {
    let Some(prlimit) = require("prlimit", "/usr/bin/prlimit", "util-linux") else {
        return;
    };
    let a = Backend::start("a").await;
    // No active checks: a check needs a descriptor, and a failed one would
    // take the instance out; this test is about the listener.
    let lb = Lb::start(&format!(
        "drain_timeout = \"5s\"\n{WEB_TO_API}\n\
         [[listener]]\nname = \"raw\"\nlisten = \"127.0.0.1:0\"\n\
         protocol = \"tcp\"\nservice = \"api\"\n\
         [service.api]\n[service.api.health_check]\nkind = \"none\"\n\n{}",
        instances("api", &[&a], &[1])
    ));
    let addr = lb.addr(listener);
    let pid = lb.child.id();

    for l in ["web", "raw"] {
        assert_eq!(accept_errors(&lb, l).await, 0, "{l}: no counter at start");
    }
    // A keep-alive connection accepted before the flood; its first request
    // also leaves an upstream connection behind (pooled for HTTP, its own
    // for TCP).
    let mut kept = TcpStream::connect(addr).await.unwrap();
    assert_eq!(keep_alive_get(&mut kept).await.unwrap(), (200, "a".into()));

    // Lower the limit to what the process holds plus a few.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = open + SLACK;
    let status = Command::new(&prlimit)
        .args([
            &format!("--pid={pid}"),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .unwrap();
    assert!(status.success(), "prlimit failed");

    // The flood: more connections than descriptors at once, then one more
    // every 50 ms for FLOOD, while the kept connection sends a request
    // every 250 ms.
    let cpu_before = cpu_seconds(pid);
    let start = Instant::now();
    let mut flood = Vec::new();
    for _ in 0..SLACK * 3 {
        flood.extend(connect(addr).await);
    }
    let mut served = 0;
    let mut tick = 0u32;
    while start.elapsed() < FLOOD {
        flood.extend(connect(addr).await);
        if tick % 5 == 0 {
            let r = keep_alive_get(&mut kept).await;
            assert_eq!(
                r,
                Ok((200, "a".into())),
                "a request on an accepted connection failed during the flood"
            );
            served += 1;
        }
        tick += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = (cpu_seconds(pid) - cpu_before) / elapsed;
    // The loop's lines: errors and, between them, recoveries (a TCP
    // listener closes what it cannot connect upstream, so its descriptors
    // flap free and exhausted); both under the once-a-second limit.
    let lines: Vec<(String, u64, String)> = lb
        .log
        .lock()
        .iter()
        .filter(|v| {
            v["listener"] == listener
                && (v["message"] == "accept failed" || v["message"] == "accepting again")
        })
        .map(|v| {
            (
                v["message"].as_str().unwrap_or("").to_owned(),
                v["suppressed"].as_u64().unwrap_or(0),
                v["timestamp"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    eprintln!(
        "{listener}: flood {elapsed:.2} s: {} connections, {served} kept-alive requests served, \
         cpu {:.1} % of a core, {} lines (message, suppressed, time): {lines:?}",
        flood.len(),
        cpu * 100.0,
        lines.len()
    );
    assert!(
        lines.iter().any(|(m, _, _)| m == "accept failed"),
        "the descriptors were never exhausted"
    );
    assert!(lines.len() <= 5, "{} lines in {elapsed:.1} s", lines.len());
    let suppressed: u64 = lines.iter().map(|(_, n, _)| n).sum();
    assert!(suppressed > 0, "no error was suppressed: {lines:?}");
    assert!(
        cpu < 0.5,
        "the accept loop spins: {:.0} % of a core",
        cpu * 100.0
    );

    // Free the descriptors: new connections are served again.
    drop(flood);
    let resumed = Instant::now();
    let c = client();
    loop {
        if let Ok((200, body)) = get(&c, addr, "/").await {
            assert_eq!(body, "a");
            break;
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(10),
            "no new request served within 10 s of freeing the descriptors"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every error counted, logged or not (the scrape needs a descriptor:
    // it waits until now).
    let logged = lines.len() as u64 + suppressed;
    let counted = accept_errors(&lb, listener).await;
    assert!(counted >= logged, "{counted} counted < {logged} logged");
    lb.wait_log("accepting again", Duration::from_secs(5), |v| {
        v["message"] == "accepting again"
            && v["listener"] == listener
            && v["suppressed"].as_u64().is_some()
    })
    .await;
}

/// `datapunk_lb_accept_errors_total{listener}` from `/metrics`.
async fn accept_errors(lb: &Lb, listener: &str) -> u64 {
    let series = format!("datapunk_lb_accept_errors_total{{listener=\"{listener}\"}} ");
    let (status, text) = admin(lb.addr("admin"), "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series}in {text}"))
}

/// A connection to `addr`, or `None` when the connect does not finish in
/// 200 ms (the listener's backlog is full).
async fn connect(addr: SocketAddr) -> Option<TcpStream> {
    tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()
}

/// `GET /` on an open HTTP/1.1 connection, kept open: status and body (the
/// response must carry a `content-length`). Fails after 2 s.
async fn keep_alive_get(s: &mut TcpStream) -> Result<(u16, String), String> {
    let exchange = async {
        s.write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("closed after {buf:?}"));
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad status line: {head}"))?;
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .ok_or_else(|| format!("no content-length: {head}"))?;
            if body.len() >= len {
                return Ok((status, body[..len].to_owned()));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| "no response within 2 s".to_owned())?
}

/// User plus system CPU time of process `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses: state is
    // field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    let hz: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    ticks as f64 / hz
}
