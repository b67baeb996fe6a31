//! Health checks that scale, against the real binary: probes keep one
//! connection per instance, a probe budget below the demand stretches the
//! interval and says so, and an instance serving real traffic is not
//! probed while an idle one is.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::support::{client, get, metric_sum, Lb, WEB_TO_API};

/// A backend that counts the connections it accepted and the `/health`
/// requests it answered (200 "ok" to everything).
struct Counting {
    port: u16,
    accepts: Arc<AtomicUsize>,
    probes: Arc<AtomicUsize>,
}

impl Counting {
    async fn start() -> Counting {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (accepts, probes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, p) = (accepts.clone(), probes.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let p = p.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        if req.uri().path() == "/health" {
                            p.fetch_add(1, Ordering::SeqCst);
                        }
                        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok")))) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Counting {
            port,
            accepts,
            probes,
        }
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    fn probes(&self) -> usize {
        self.probes.load(Ordering::SeqCst)
    }
}

/// `[service.NAME]` with http checks every `interval`, `protocol` as its
/// `upstream_protocol`, and one instance per `(id, port)`.
fn service(name: &str, interval: &str, protocol: &str, instances: &[(String, u16)]) -> String {
    let mut s = format!(
        "[service.{name}]\nupstream_protocol = \"{protocol}\"\n[service.{name}.health_check]\n\
         kind = \"http\"\npath = \"/health\"\ninterval = \"{interval}\"\ntimeout = \"{interval}\"\n"
    );
    for (id, port) in instances {
        s.push_str(&format!(
            "[[service.{name}.instance]]\nid = \"{id}\"\naddress = \"127.0.0.1\"\nport = {port}\n"
        ));
    }
    s
}

async fn wait_for(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn probes_reuse_one_connection_per_instance() {
    for protocol in ["http1", "h2c"] {
        let b = Counting::start().await;
        let lb = Lb::start(&format!(
            "{WEB_TO_API}{}",
            service("api", "100ms", protocol, &[("a".to_owned(), b.port)])
        ));
        wait_for("15 probes", Duration::from_secs(30), || b.probes() >= 15).await;
        // A probe that outlives its timeout (= the interval) is a failed
        // probe, and its connection, busy with the unanswered request, is
        // dropped by design: on a loaded machine that happens. So every
        // connection after the first must follow a failed probe; with no
        // failure that is exactly one connection. Connections are read
        // before the failures, so a reconnect counted has its failure
        // counted too.
        let accepts = b.accepts();
        let failed = metric_sum(
            &lb,
            "datapunk_lb_health_checks_total",
            &[r#"result="failure""#],
        )
        .await as usize;
        assert!(
            accepts <= 1 + failed,
            "{protocol}: {} probes over {accepts} connections, {failed} failed probes",
            b.probes(),
        );
        drop(lb);
    }
}

#[tokio::test]
async fn a_budget_below_the_demand_stretches_the_interval_and_says_so() {
    // 20 instances every 100 ms need 200 probes/s; a budget of 50/s
    // stretches every interval 4×, to 400 ms.
    let b = Counting::start().await;
    let ids: Vec<(String, u16)> = (0..20).map(|i| (format!("i{i}"), b.port)).collect();
    let lb = Lb::start(&format!(
        "health_check_max_probes_per_second = 50\n{WEB_TO_API}{}",
        service("api", "100ms", "http1", &ids)
    ));
    let gauge = "datapunk_lb_health_check_interval_effective_seconds";
    let mut seen = 0.0;
    for _ in 0..100 {
        seen = metric_sum(&lb, gauge, &[r#"service="api""#]).await;
        if seen > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!((seen - 0.4).abs() < 1e-9, "{gauge} = {seen}");
    lb.wait_log("the behind warning", Duration::from_secs(5), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("health checks are behind"))
            && v["budget_per_second"] == 50.0
    })
    .await;
    // And the probes done follow the budget, not the demand.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = b.probes();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let done = b.probes() - before;
    assert!(
        (80..=120).contains(&done),
        "{done} probes in 2 s at a budget of 50/s (demand 200/s)"
    );
    let warnings = lb
        .log
        .lock()
        .iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("health checks are behind"))
        })
        .count();
    assert_eq!(warnings, 1, "at most one warning a minute");
}

#[tokio::test]
async fn an_instance_serving_real_traffic_is_not_probed_while_an_idle_one_is() {
    let busy = Counting::start().await;
    let idle = Counting::start().await;
    // `api` (routed, real traffic) and `spare` (no route): same checks.
    let lb = Lb::start(&format!(
        "{WEB_TO_API}{}{}",
        service("api", "200ms", "http1", &[("busy".to_owned(), busy.port)]),
        service("spare", "200ms", "http1", &[("idle".to_owned(), idle.port)]),
    ));
    let c = client();
    let web = lb.addr("web");
    // Traffic flows once the first probe made the instance eligible.
    let start = std::time::Instant::now();
    while get(&c, web, "/x").await.map(|r| r.0) != Ok(200) {
        assert!(start.elapsed() < Duration::from_secs(5), "api never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Real traffic to `busy` until `idle` has had 10 probes (2 s at 200 ms
    // on an idle machine; a loaded one stalls the checker, so wait for the
    // count rather than for a fixed 2 s).
    let (busy0, idle0) = (busy.probes(), idle.probes());
    let t = std::time::Instant::now();
    let mut answers = vec![t];
    while idle.probes() - idle0 < 10 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "idle probed {} times in 30 s",
            idle.probes() - idle0
        );
        assert_eq!(get(&c, web, "/x").await.unwrap().0, 200);
        answers.push(std::time::Instant::now());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t.elapsed();
    let (busy_n, idle_n) = (busy.probes() - busy0, idle.probes() - idle0);
    // A visit probes the busy instance only when no request succeeded
    // since the previous visit (200 ms before): the client's answers are
    // ~25 ms apart, but a loaded machine can stall them; each gap of g ms
    // between answers lets at most g / 200 visits pass without a success.
    let stalls: u128 = answers
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis() / 200)
        .sum();
    assert!(
        busy_n as u128 <= 1 + stalls,
        "{busy_n} probes to the busy instance in {took:?} (answers stalled for {stalls} visits)"
    );
    // And the idle one is not probed more often than its interval.
    assert!(
        idle_n as u128 <= took.as_millis() / 200 + 2,
        "{idle_n} probes to the idle instance in {took:?} at 200 ms"
    );
    // Once traffic stops, the busy one is probed again (3 probes: 600 ms
    // on an idle machine).
    let before = busy.probes();
    wait_for(
        "3 probes of busy once traffic stops",
        Duration::from_secs(15),
        || busy.probes() - before >= 3,
    )
    .await;
}

/// CPU seconds (user + system) the process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    let hz: f64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);
    ticks / hz
}

/// The per-probe CPU cost of the balancer: `DATAPUNK_LB_PROBE_INSTANCES`
/// (default 2,000) instances over 4 local backends, HTTP checks every
/// `DATAPUNK_LB_PROBE_INTERVAL` (default 1 s), no traffic; after 3 s of
/// warm-up, 10 s of probes/s done (counted at the backends) vs needed and
/// the balancer's CPU time from `/proc/PID/stat`. `DATAPUNK_LB_BIN` runs
/// another build (say, the one before this change) on the same config;
/// `DATAPUNK_LB_PROBE_BUDGET` sets `health_check_max_probes_per_second`.
///
/// `cargo test --release -p datapunk-lb --test e2e measure_probe_cost -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run in release with --ignored --nocapture"]
async fn measure_probe_cost() {
    use std::fmt::Write;
    let env = |k: &str| std::env::var(k).ok();
    let n: usize = env("DATAPUNK_LB_PROBE_INSTANCES").map_or(2_000, |v| v.parse().unwrap());
    let interval: f64 = env("DATAPUNK_LB_PROBE_INTERVAL").map_or(1.0, |v| v.parse().unwrap());
    let bin = env("DATAPUNK_LB_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_datapunk-lb").into());
    let mut backends = Vec::new();
    for _ in 0..4 {
        backends.push(Counting::start().await);
    }
    let mut cfg = String::new();
    if let Some(b) = env("DATAPUNK_LB_PROBE_BUDGET") {
        let _ = writeln!(cfg, "health_check_max_probes_per_second = {b}");
    }
    let _ = write!(
        cfg,
        "{WEB_TO_API}[admin]\nlisten = \"127.0.0.1:0\"\n[service.api]\n[service.api.health_check]\n\
         kind = \"http\"\npath = \"/health\"\ninterval = \"{interval}s\"\ntimeout = \"{interval}s\"\n"
    );
    for i in 0..n {
        let _ = write!(
            cfg,
            "[[service.api.instance]]\nid = \"i{i:06}\"\naddress = \"127.0.0.1\"\nport = {}\n",
            backends[i % 4].port
        );
    }
    let path = crate::support::temp_path("probe-cost.toml");
    std::fs::write(&path, cfg).unwrap();
    let mut child = std::process::Command::new(&bin)
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let probes = || backends.iter().map(Counting::probes).sum::<usize>();
    let accepts = || backends.iter().map(Counting::accepts).sum::<usize>();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu0, p0, a0) = (cpu_seconds(pid), probes(), accepts());
    let wall = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let secs = wall.elapsed().as_secs_f64();
    let (cpu, done, conns) = (cpu_seconds(pid) - cpu0, probes() - p0, accepts() - a0);
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "{bin}: {n} instances every {interval} s: needed {:.0} probes/s, done {:.0}/s; \
         {:.0} % of a core; {:.1} µs CPU per probe; {:.0} new connections/s",
        n as f64 / interval,
        done as f64 / secs,
        100.0 * cpu / secs,
        1e6 * cpu / done.max(1) as f64,
        conns as f64 / secs
    );
}
