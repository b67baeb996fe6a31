//! The access log through the real binary (JSON lines, a file
//! destination): every field of a proxied request, matching what the
//! backend and the client saw; the proxy's own 503; nothing when off; a
//! rename + SIGHUP starts a new file.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{exchange, temp_path, unchecked_service, with_free_admin, Lb, Recorder};

/// `web` routes `/none` to `empty` (no instance) and everything else to
/// `api` (instance `a` = `backend`); `listener_extra` goes on the listener.
fn config(log: &Path, listener_extra: &str, backend: &Recorder) -> String {
    format!(
        r#"access_log_path = "{}"
[[listener]]
name = "web"
listen = "127.0.0.1:0"
{listener_extra}
[[listener.route]]
path_prefix = "/none"
service = "empty"
[[listener.route]]
service = "api"
[service.empty]
{}"#,
        log.display(),
        unchecked_service("api", "a", backend.addr.port())
    )
}

/// The log's lines, once it has `n` (waits up to 5 s: the writer flushes
/// when it runs idle).
async fn lines(log: &Path, n: usize) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let got: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        if got.len() >= n {
            return got;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{} of {n} lines in {}: {text}",
            got.len(),
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn each_request_is_logged_with_every_field() {
    let backend = Recorder::start("hello world").await;
    let log = temp_path("access.log");
    let lb = Lb::start(&config(&log, "access_log = true", &backend));
    let web = lb.addr("web");

    let (status, resp, body) = exchange(
        web,
        "POST",
        "/orders?x=1",
        &[("host", "shop.example")],
        "12345",
    )
    .await;
    assert_eq!((status, &body[..]), (200, &b"hello world"[..]));
    let line = lines(&log, 1).await.remove(0);
    let sent = backend.last("x-request-id");
    assert_eq!(line["request_id"], sent[0].as_str());
    assert_eq!(line["request_id"], resp["x-request-id"].to_str().unwrap());
    assert_eq!(backend.seen.lock()[0].body_len, 5);
    // The instance's own headers reach the client (the log's boxed body
    // takes a head kept as lines into the map: `raw_head`), its
    // `x-request-id` replaced by the proxy's.
    assert_eq!(
        resp.get_all("x-recorder").iter().collect::<Vec<_>>(),
        ["seen", "twice"]
    );
    assert_eq!(resp.get_all("x-request-id").iter().count(), 1);
    for (field, want) in [
        ("listener", Value::from("web")),
        ("service", "api".into()),
        ("method", "POST".into()),
        ("authority", "shop.example".into()),
        ("path", "/orders?x=1".into()),
        ("status", 200.into()),
        ("bytes_in", 5.into()),
        ("bytes_out", 11.into()),
        ("instance", "a".into()),
        ("attempts", 1.into()),
        ("outcome", "complete".into()),
    ] {
        assert_eq!(line[field], want, "{field} in {line}");
    }
    let client = line["client"].as_str().unwrap();
    assert!(client.starts_with("127.0.0.1:"), "{line}");
    let ms = line["duration_ms"].as_f64().unwrap();
    assert!(ms > 0.0 && ms < 5_000.0, "{line}");
    assert!(line["time"].as_str().unwrap().ends_with('Z'), "{line}");

    // The proxy's own 503: no instance tried.
    let (status, resp, _) = exchange(web, "GET", "/none", &[("host", "shop.example")], "").await;
    assert_eq!(status, 503);
    let line = lines(&log, 2).await.remove(1);
    for (field, want) in [
        ("service", Value::from("empty")),
        ("status", 503.into()),
        ("instance", "-".into()),
        ("attempts", 0.into()),
        ("bytes_in", 0.into()),
        ("path", "/none".into()),
    ] {
        assert_eq!(line[field], want, "{field} in {line}");
    }
    assert_eq!(line["request_id"], resp["x-request-id"].to_str().unwrap());
    assert_eq!(
        line["bytes_out"].as_u64().unwrap(),
        resp["content-length"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    );
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn with_the_log_off_nothing_is_written() {
    let backend = Recorder::start("ok").await;
    let log = temp_path("access-off.log");
    let lb = Lb::start(&config(&log, "", &backend));
    let (status, resp, _) = exchange(lb.addr("web"), "GET", "/", &[], "").await;
    assert_eq!(status, 200);
    // Without the log, the same headers (the head's lines written as they
    // came: `raw_head`).
    assert_eq!(
        resp.get_all("x-recorder").iter().collect::<Vec<_>>(),
        ["seen", "twice"]
    );
    let ids: Vec<_> = resp.get_all("x-request-id").iter().collect();
    assert_eq!(ids.len(), 1);
    assert_ne!(ids[0], "backend");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!log.exists(), "the log was created");
}

#[tokio::test]
async fn a_reload_reopens_the_file_for_rotation() {
    let backend = Recorder::start("ok").await;
    let log = temp_path("access-rot.log");
    let lb = Lb::start(&config(&log, "access_log = true", &backend));
    let web = lb.addr("web");
    exchange(web, "GET", "/first", &[], "").await;
    lines(&log, 1).await;
    let rotated = log.with_extension("1");
    std::fs::rename(&log, &rotated).unwrap();
    lb.signal("HUP");
    lb.wait_log("the reload", Duration::from_secs(5), |v| {
        v["message"] == "config reloaded"
    })
    .await;
    exchange(web, "GET", "/second", &[], "").await;
    let new = lines(&log, 1).await;
    assert_eq!(new.len(), 1);
    assert_eq!(new[0]["path"], "/second");
    let old = lines(&rotated, 1).await;
    assert_eq!(old.len(), 1);
    assert_eq!(old[0]["path"], "/first");
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&rotated);
}

#[tokio::test]
async fn a_streamed_request_body_is_counted() {
    let backend = Recorder::start("ok").await;
    let log = temp_path("access-stream.log");
    let lb = Lb::start(&config(&log, "access_log = true", &backend));
    // Over the 64 KiB replay limit: streamed, counted as it passes.
    let big = "x".repeat(200 * 1024);
    let (status, _, _) = exchange(lb.addr("web"), "POST", "/upload", &[], big.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(backend.seen.lock()[0].body_len, big.len());
    let line = lines(&log, 1).await.remove(0);
    assert_eq!(line["bytes_in"], big.len(), "{line}");
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn a_destination_that_cannot_be_opened_fails_start_up() {
    let backend = Recorder::start("ok").await;
    let log = Path::new("/nonexistent-datapunk-lb-dir/access.log");
    let config_path = temp_path("lb.toml");
    let config = with_free_admin(&config(log, "access_log = true", &backend));
    std::fs::write(&config_path, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_datapunk-lb"))
        .args(["run", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&config_path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("access_log_path: /nonexistent-datapunk-lb-dir/access.log"),
        "{stderr}"
    );
}
