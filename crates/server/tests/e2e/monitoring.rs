//! What an operator runs the balancer with, tested for real: the Grafana
//! dashboard and the alert rules of `docs/monitoring/` against a real
//! Prometheus scraping a real balancer, the systemd unit of `packaging/`
//! through `systemd-analyze verify`, and `datapunk-lb --version`.
//!
//! The Prometheus test reads the committed files themselves (every `expr`
//! of the dashboard JSON; `alerts.yml` as the rule file), so a query that
//! names a metric or label the balancer does not expose fails here. The one
//! change to the rules is in a copy: every `for:` becomes 1 s, or the alerts
//! would take minutes to fire.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{client, get, http_config, require, temp_path, Backend, Lb, Load};

/// The repository root (this crate is `crates/server`).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A Prometheus server on a free port, with its config and storage in a
/// temporary directory; killed and the directory removed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts `bin` with `rules` as its rule file, scraping `target`'s
    /// `/metrics` every second and evaluating the rules every second;
    /// waits until it is ready.
    async fn start(bin: &Path, target: SocketAddr, rules: &str) -> Prometheus {
        let dir = temp_path("prometheus");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("alerts.yml"), rules).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: datapunk-lb\n    static_configs:\n      - targets: ['{target}']\n",
            rules = dir.join("alerts.yml").display(),
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        // The port is free when we look; if another process takes it before
        // Prometheus binds, Prometheus exits and we try another.
        for _ in 0..3 {
            let addr = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap();
            let child = Command::new(bin)
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let mut p = Prometheus {
                child,
                addr,
                dir: dir.clone(),
            };
            if p.wait_ready(Duration::from_secs(20)).await {
                return p;
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
            // The directory serves the next try: this guard must not remove it.
            p.dir = PathBuf::new();
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("prometheus did not become ready (see its log above)");
    }

    /// Whether `/-/ready` answered 200 within `timeout` (false once the
    /// process exited).
    async fn wait_ready(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if let Ok((200, _)) = get(&client(), self.addr, "/-/ready").await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// `GET path` on the HTTP API; the JSON body's `data` (panics unless
    /// the API says `success`).
    async fn api(&self, path: &str) -> serde_json::Value {
        let (status, body) = get(&client(), self.addr, path)
            .await
            .unwrap_or_else(|e| panic!("prometheus {path}: {e}"));
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("prometheus {path}: {e}: {body}"));
        assert!(
            status == 200 && v["status"] == "success",
            "prometheus {path}: {status} {body}"
        );
        v["data"].clone()
    }

    /// The result vector of an instant query.
    async fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let data = self
            .api(&format!("/api/v1/query?query={}", form_encode(expr)))
            .await;
        data["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Percent-encodes `s` for a URL query value.
fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `targets[].expr` of the dashboard's panels (rows included), with
/// the template variables replaced as Grafana would: `$service` by
/// `service`, `$__rate_interval` by `rate_interval`.
fn dashboard_queries(service: &str, rate_interval: &str) -> Vec<(String, String)> {
    let path = repo().join("docs/monitoring/datapunk-lb.dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((title.to_owned(), e.to_owned()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut raw = Vec::new();
    walk(&dash["panels"], &mut raw);
    raw.into_iter()
        .map(|(title, e)| {
            let e = e
                .replace("$__rate_interval", rate_interval)
                .replace("${service}", service)
                .replace("$service", service);
            assert!(
                !e.contains('$'),
                "{title}: a template variable this test does not substitute: {e}"
            );
            (title, e)
        })
        .collect()
}

/// Whether an instant-query result has a sample with a finite value.
fn has_finite_sample(result: &[serde_json::Value]) -> bool {
    result.iter().any(|r| {
        r["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

/// The firing alerts: (alertname, labels).
async fn firing(prom: &Prometheus) -> Vec<(String, serde_json::Value)> {
    let data = prom.api("/api/v1/alerts").await;
    data["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["state"] == "firing")
        .map(|a| {
            (
                a["labels"]["alertname"].as_str().unwrap_or("").to_owned(),
                a["labels"].clone(),
            )
        })
        .collect()
}

/// One of two instances dead (its breaker opens), `min_healthy_percent` 75
/// (1 of 2 eligible is under it: panic mode), a little traffic, then a
/// rejected reload; Prometheus scrapes it all. Every dashboard query returns a finite
/// value, and the ejection, panic and reload alerts fire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_return_data_and_alerts_fire_in_a_real_prometheus() {
    let Some(bin) = require(
        "prometheus",
        "/usr/bin/prometheus",
        "the prometheus package",
    ) else {
        return;
    };
    let rules = std::fs::read_to_string(repo().join("docs/monitoring/alerts.yml")).unwrap();
    let mut shortened = 0;
    let rules: String = rules
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for:") {
            Some(_) => {
                shortened += 1;
                let indent = &l[..l.len() - l.trim_start().len()];
                format!("{indent}for: 1s\n")
            }
            None => format!("{l}\n"),
        })
        .collect();
    assert!(shortened >= 2, "alerts.yml: no `for:` lines to shorten");

    let good = Backend::start("good").await;
    let bad = Backend::start("bad").await;
    bad.kill().await;
    let lb = Lb::start(&http_config(
        "min_healthy_percent = 75",
        &[&good, &bad],
        &[],
    ));
    let load = Load::start(lb.addr("web"), 2, Duration::from_millis(20));
    let prom = Prometheus::start(&bin, lb.addr("admin"), &rules).await;

    // Each query until it returns a finite value: rates need two scrapes
    // inside their window, and series such as a failure outcome appear with
    // their first event.
    let queries = dashboard_queries("api", "10s");
    assert!(
        queries.len() >= 10,
        "too few dashboard queries: {queries:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut missing = queries.clone();
    while !missing.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for (title, q) in missing {
            if !has_finite_sample(&prom.query(&q).await) {
                still.push((title, q));
            }
        }
        missing = still;
        if !missing.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert!(
        missing.is_empty(),
        "dashboard queries without data after 40 s: {missing:#?}"
    );

    // A rejected reload, after Prometheus has scraped the counter at 0:
    // `increase` sees no rise in a series whose first sample is already 1.
    std::fs::write(&lb.config_path, "not = [valid").unwrap();
    lb.signal("HUP");

    // The alerts, with the labels their annotations use.
    let wanted = [
        ("DatapunkLbInstanceEjected", "exported_instance", "bad"),
        ("DatapunkLbPanicMode", "service", "api"),
        ("DatapunkLbConfigReloadFailed", "job", "datapunk-lb"),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = firing(&prom).await;
        let not_yet: Vec<_> = wanted
            .iter()
            .filter(|(name, label, value)| {
                !now.iter()
                    .any(|(n, labels)| n == name && labels[label] == *value)
            })
            .collect();
        if not_yet.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alerts not firing: {not_yet:?}; firing: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The healthy instance is never reported ejected.
    assert!(!firing(&prom)
        .await
        .iter()
        .any(|(n, l)| n == "DatapunkLbInstanceEjected" && l["exported_instance"] == "good"));
    load.stop().await;
}

/// `packaging/datapunk-lb.service` passes `systemd-analyze verify` without
/// a warning (an unknown or misspelt key is only a warning there). The
/// binary path is the one just built: verify checks that it exists.
#[test]
fn systemd_unit_verifies() {
    let Some(analyze) = require("systemd-analyze", "/usr/bin/systemd-analyze", "systemd") else {
        return;
    };
    let unit = std::fs::read_to_string(repo().join("packaging/datapunk-lb.service")).unwrap();
    for line in [
        "ExecStart=/usr/local/bin/datapunk-lb run --config /etc/datapunk-lb/lb.toml --log-format json",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "Restart=on-failure",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
    }
    // Stop must outlast the default drain_timeout.
    let stop = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| humantime::parse_duration(v).ok())
        .expect("TimeoutStopSec");
    assert!(
        stop > datapunk_lb::config::DEFAULT_DRAIN_TIMEOUT,
        "{stop:?}"
    );
    // Two descriptors per connection a default listener admits: the hard
    // limit `run` raises its soft limit to.
    let nofile: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .and_then(|v| v.parse().ok())
        .expect("LimitNOFILE");
    assert!(
        nofile >= 2 * u64::from(datapunk_lb::config::DEFAULT_LISTENER_MAX_CONNECTIONS),
        "LimitNOFILE={nofile}"
    );

    let dir = temp_path("unit");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("datapunk-lb.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/datapunk-lb",
            env!("CARGO_BIN_EXE_datapunk-lb"),
        ),
    )
    .unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Messages about other units on this machine are not ours.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("datapunk-lb.service"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

/// `--version`: the version, the commit the binary was built from (the
/// checkout's HEAD when there is one), the enabled features.
#[test]
fn version_prints_the_commit_and_the_features() {
    let out = Command::new(env!("CARGO_BIN_EXE_datapunk-lb"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(concat!("datapunk-lb ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    let commit = lines
        .iter()
        .find_map(|l| l.strip_prefix("commit: "))
        .unwrap_or_else(|| panic!("no commit line: {text}"));
    let head = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match head {
        Some(head) => assert_eq!(commit, head, "{text}"),
        None => assert!(
            commit == "unknown" || commit.chars().all(|c| c.is_ascii_hexdigit()),
            "{text}"
        ),
    }
    let features: Vec<&str> = lines
        .iter()
        .find_map(|l| l.strip_prefix("features: "))
        .unwrap_or_else(|| panic!("no features line: {text}"))
        .split(',')
        .collect();
    assert_eq!(features.contains(&"etcd"), cfg!(feature = "etcd"), "{text}");
}
