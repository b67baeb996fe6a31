//! `datapunk-lb demo`: health-aware balancing, live, in one command and
//! without any file.
//!
//! ## What it shows
//!
//! Four sample HTTP backends, `api-1` … `api-4`, run inside this process
//! behind a real balancer: the same [`Server`] that `datapunk-lb run` starts,
//! from a config built here and parsed by [`Config::parse`]. Each backend
//! answers with its name after 20 ms, like a small real service. About 200
//! requests a second go through the balancer. One backend, `api-3`, follows
//! a schedule that repeats every 35 s:
//!
//! | phase | lasts | what to watch |
//! | --- | --- | --- |
//! | healthy | 10 s | four equal shares (`adaptive` uses `weighted`) |
//! | slow: +300 ms per request, `/health` stays fast | 10 s | `adaptive` sees the latency spread and switches to `peak_ewma`: api-3's share falls to about 0 |
//! | failing: connection refused (listener and connections closed) | 15 s | health checks fail, the health score halves, the breaker opens; requests that still reach api-3 are retried on another instance, so clients see no errors; the probe at the end of each open window fails and re-opens it |
//! | back up, same port | – | the next probe succeeds: `half_open → closed`; the effective weight ramps up with slow start (5 s) and the recovering health score, and the share follows once the latency estimate has caught up |
//!
//! ## How
//!
//! Every second the view reads the live state from the balancer's
//! [`Registry`] (effective weight, health score, breaker, connections,
//! latency; the service's adaptive mode and panic mode) and the traffic
//! counts: each backend names itself in its response body, so the demo knows
//! who answered. A watcher polls the registry every 50 ms and lists breaker,
//! strategy and panic changes under "what happened", with the schedule's
//! phase changes. On a terminal the view is redrawn in place (ANSI); when
//! stdout is not a terminal it prints one plain line per second instead.
//!
//! Logs go to stderr as usual (breaker transitions are `warn` lines), so
//! `datapunk-lb demo 2>demo.log` keeps the live view clean.
//!
//! ## One setting the file format does not have
//!
//! A breaker's open window doubles on every trip (5 s, 10 s, 20 s, …, up to
//! `open_max`, default 120 s) and starts again from 5 s only after the
//! instance stayed closed for `open_max`. With the default, each cycle of
//! this 35 s schedule would keep api-3 out longer than the one before, so the
//! demo caps the window at 8 s ([`DEMO_OPEN_MAX`]) on the parsed config:
//! every cycle then looks like the first.
//!
//! Ctrl-C, or the end of `--seconds N`, stops traffic, drains the balancer,
//! stops the backends and prints a summary.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use datapunk_lb_core::{CircuitState, InstanceStatus, Registry, ServiceStatus, Timestamp};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::config::Config;
use crate::server::Server;

/// The service the demo balances.
const SERVICE: &str = "api";
/// The listener's name in the demo config.
const LISTENER: &str = "demo";
/// The sample backends; each answers with its name.
const BACKENDS: [&str; 4] = ["api-1", "api-2", "api-3", "api-4"];
/// Index in [`BACKENDS`] of the one that follows the schedule.
const FLAKY: usize = 2;
/// The schedule: healthy, then slow, then failing, then again.
const HEALTHY_FOR: Duration = Duration::from_secs(10);
/// See [`HEALTHY_FOR`].
const SLOW_FOR: Duration = Duration::from_secs(10);
/// See [`HEALTHY_FOR`].
const FAILING_FOR: Duration = Duration::from_secs(15);
/// What every request but `/health` takes, like a small real service. It
/// also keeps the demo's latencies independent of the build (a debug build's
/// proxy is much slower than a release build's) and of the machine.
const BASE_DELAY: Duration = Duration::from_millis(20);
/// Latency the slow phase adds to every request but `/health`.
const SLOW_DELAY: Duration = Duration::from_millis(300);
/// Cap on the breaker's open window; see the module docs.
pub const DEMO_OPEN_MAX: Duration = Duration::from_secs(8);
/// Offered load, spread over [`TRAFFIC_TASKS`] tasks.
const REQUESTS_PER_SECOND: u32 = 200;
/// Tasks generating traffic.
const TRAFFIC_TASKS: u32 = 4;
/// Requests in flight at most; beyond that a tick is counted as failed.
const MAX_IN_FLIGHT: u32 = 256;
/// A client gives up on a request after this long.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the watcher samples the registry for changes.
const WATCH_EVERY: Duration = Duration::from_millis(50);
/// Width of the share bar.
const BAR_WIDTH: usize = 24;
/// Lines of "what happened" on the live view.
const RECENT: usize = 8;
/// Journal entries kept.
const JOURNAL_CAP: usize = 64;

/// What to watch, in one line.
const LEGEND: &str =
    "Watch api-3: slow → its share falls · refusing connections → its breaker opens \
· back → half_open → closed, its weight ramps up";
/// What the columns mean.
const COLUMNS: &str =
    "weight = configured weight × health × slow start · latency = peak-EWMA as of \
the last response\nbreaker: closed serves, open is ejected, half_open probes · failed = non-2xx or \
error seen by the client";

const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const RED: &str = "\x1b[31m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";
const CLEAR: &str = "\x1b[2J\x1b[H";

/// Runs the demo until Ctrl-C or for `seconds`.
pub async fn run(seconds: Option<u64>) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let journal = Arc::new(Journal::new(started));
    let tally = Arc::new(Tally::default());

    let mut backends = Vec::with_capacity(BACKENDS.len());
    for name in BACKENDS {
        backends.push(Backend::start(name).await?);
    }
    let ports: Vec<u16> = backends.iter().map(|b| b.addr.port()).collect();
    let mut config = Config::parse(&config_text(&ports))
        .map_err(|e| anyhow::anyhow!("the demo's own config is invalid (a bug):\n{e}"))?;
    if let Some(svc) = config.services.get_mut(SERVICE) {
        svc.balancing.breaker.open_max = DEMO_OPEN_MAX;
    }
    let registry = Arc::new(Registry::new());
    let server = Server::start_with(config, registry.clone())
        .await
        .context("starting the balancer")?;
    let addr = server
        .listener_addrs()
        .get(LISTENER)
        .copied()
        .context("the demo listener did not start")?;

    let flaky = backends
        .get(FLAKY)
        .cloned()
        .context("the scheduled backend is missing")?;
    let schedule = tokio::spawn(schedule(flaky, journal.clone()));
    let watcher = tokio::spawn(watch_changes(
        registry.clone(),
        journal.clone(),
        tally.clone(),
    ));
    let traffic = Traffic::start(addr, tally.clone())?;
    let mut view = View::new(addr, server.admin_addr(), started);

    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let ctrl_c = async {
        // Without a handler, Ctrl-C still ends the process the default way.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let limit = async {
        match seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(ctrl_c, limit);
    let mut out = std::io::stdout();
    let _ = view.start(&mut out);
    let why = loop {
        tokio::select! {
            _ = tick.tick() => {
                let frame = view.frame(&registry, &tally, &journal);
                if out.write_all(frame.as_bytes()).and_then(|()| out.flush()).is_err() {
                    break "stdout closed";
                }
            }
            () = &mut ctrl_c => break "Ctrl-C",
            () = &mut limit => break "time limit",
        }
    };

    traffic.stop().await;
    schedule.abort();
    watcher.abort();
    let drained = server.drain().await;
    for b in &backends {
        b.stop();
    }
    let _ = out
        .write_all(view.summary(why, drained, &tally).as_bytes())
        .and_then(|()| out.flush());
    Ok(ExitCode::SUCCESS)
}

/// The config the demo serves: the TOML format of `datapunk-lb run`.
fn config_text(ports: &[u16]) -> String {
    let mut s = String::from(
        r#"# built by `datapunk-lb demo`
drain_timeout = "5s"

# Port 0: clear of a datapunk-lb running on the default 9901. The status
# page and /metrics need no token; /v1 would, and none is set.
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "demo"
listen = "127.0.0.1:0"

[[listener.route]]
path_prefix = "/"
service = "api"

[service.api]
strategy = "adaptive"
slow_start = "5s"
request_timeout = "2s"

[service.api.health_check]
kind = "http"
path = "/health"
interval = "500ms"
timeout = "250ms"
"#,
    );
    for (name, port) in BACKENDS.iter().zip(ports) {
        let _ = write!(
            s,
            "\n[[service.api.instance]]\nid = \"{name}\"\naddress = \"127.0.0.1\"\nport = {port}\n"
        );
    }
    s
}

// === sample backends ===

/// A sample backend: answers every path with its name after [`BASE_DELAY`],
/// `/health` with `ok` at once.
struct Backend {
    name: &'static str,
    addr: SocketAddr,
    /// Slow phase: every request but `/health` waits [`SLOW_DELAY`].
    slow: AtomicBool,
    /// Set while listening; sending `true` closes the listener and every
    /// connection.
    stop: Mutex<Option<watch::Sender<bool>>>,
}

impl Backend {
    async fn start(name: &'static str) -> anyhow::Result<Arc<Backend>> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .await
            .with_context(|| format!("starting sample backend {name}"))?;
        let addr = listener
            .local_addr()
            .with_context(|| format!("sample backend {name}: local address"))?;
        let b = Arc::new(Backend {
            name,
            addr,
            slow: AtomicBool::new(false),
            stop: Mutex::new(None),
        });
        b.serve(listener);
        Ok(b)
    }

    fn serve(self: &Arc<Self>, listener: TcpListener) {
        let (tx, rx) = watch::channel(false);
        if let Some(old) = self.stop.lock().replace(tx) {
            let _ = old.send(true);
        }
        tokio::spawn(accept(self.clone(), listener, rx));
    }

    /// Closes the listener and every open connection: connects are refused.
    fn stop(&self) {
        if let Some(tx) = self.stop.lock().take() {
            let _ = tx.send(true);
        }
    }

    /// Listens again on the same port.
    fn listen_again(self: &Arc<Self>) -> std::io::Result<()> {
        let socket = TcpSocket::new_v4()?;
        // Connections closed by the backend linger in TIME_WAIT on this port.
        socket.set_reuseaddr(true)?;
        socket.bind(self.addr)?;
        let listener = socket.listen(1024)?;
        self.serve(listener);
        Ok(())
    }
}

async fn accept(backend: Arc<Backend>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        let _ = stream.set_nodelay(true);
        let (backend, mut stop) = (backend.clone(), stop.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let backend = backend.clone();
                async move { Ok::<_, Infallible>(respond(&backend, req).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            // Stopping drops the connection: the peer sees it close.
            tokio::select! {
                _ = conn => {}
                _ = stopped(&mut stop) => {}
            }
        });
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn respond(backend: &Backend, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/health" {
        return Response::new(Full::new(Bytes::from_static(b"ok\n")));
    }
    let delay = if backend.slow.load(Ordering::Relaxed) {
        BASE_DELAY + SLOW_DELAY
    } else {
        BASE_DELAY
    };
    tokio::time::sleep(delay).await;
    Response::new(Full::new(Bytes::from_static(backend.name.as_bytes())))
}

/// api-3's schedule, forever (the task is aborted at the end).
async fn schedule(backend: Arc<Backend>, journal: Arc<Journal>) {
    let name = backend.name;
    let secs = |d: Duration| d.as_secs();
    journal.note(format!(
        "{name}: healthy; turns slow in {} s",
        secs(HEALTHY_FOR)
    ));
    loop {
        tokio::time::sleep(HEALTHY_FOR).await;
        backend.slow.store(true, Ordering::Relaxed);
        journal.note(format!(
            "{name}: slow: +{} ms per request (/health stays fast); fails in {} s",
            SLOW_DELAY.as_millis(),
            secs(SLOW_FOR)
        ));
        tokio::time::sleep(SLOW_FOR).await;
        backend.slow.store(false, Ordering::Relaxed);
        backend.stop();
        journal.note(format!(
            "{name}: failing: connection refused; back in {} s",
            secs(FAILING_FOR)
        ));
        tokio::time::sleep(FAILING_FOR).await;
        while let Err(e) = backend.listen_again() {
            journal.note(format!(
                "{name}: cannot listen on {} again yet ({e}); retrying",
                backend.addr
            ));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        journal.note(format!(
            "{name}: back up (healthy); turns slow again in {} s",
            secs(HEALTHY_FOR)
        ));
    }
}

// === traffic ===

/// Responses seen by the clients, per second (the view takes them), and
/// breaker trips seen by the watcher.
#[derive(Debug, Default)]
struct Tally {
    /// 2xx responses per backend, by index in [`BACKENDS`].
    ok: [AtomicU64; 4],
    /// Non-2xx, errors, timeouts, unattributable bodies.
    failed: AtomicU64,
    /// Times each backend's breaker went to open.
    opens: [AtomicU64; 4],
}

impl Tally {
    /// Counts one response: its body when it was a 2xx, else `None`.
    fn record(&self, body: Option<Bytes>) {
        let who = body
            .as_deref()
            .map(<[u8]>::trim_ascii)
            .and_then(|b| BACKENDS.iter().position(|n| n.as_bytes() == b))
            .and_then(|i| self.ok.get(i));
        match who {
            Some(c) => c.fetch_add(1, Ordering::Relaxed),
            None => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

type DemoClient = Client<HttpConnector, Empty<Bytes>>;

/// The traffic generators.
struct Traffic {
    stop: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
    in_flight: Arc<Semaphore>,
}

impl Traffic {
    fn start(addr: SocketAddr, tally: Arc<Tally>) -> anyhow::Result<Traffic> {
        let uri: Uri = format!("http://{addr}/")
            .parse()
            .context("the balancer's address as a URI")?;
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        let client: DemoClient = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(conn);
        let (stop, stop_rx) = watch::channel(false);
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize));
        let period = Duration::from_secs(1) * TRAFFIC_TASKS / REQUESTS_PER_SECOND;
        let now = tokio::time::Instant::now();
        let workers = (0..TRAFFIC_TASKS)
            .map(|i| {
                // Staggered, so the tasks do not fire together.
                let first = now + period * i / TRAFFIC_TASKS;
                tokio::spawn(generate(
                    client.clone(),
                    uri.clone(),
                    tally.clone(),
                    in_flight.clone(),
                    first,
                    period,
                    stop_rx.clone(),
                ))
            })
            .collect();
        Ok(Traffic {
            stop,
            workers,
            in_flight,
        })
    }

    /// Stops sending and waits (a little) for requests in flight.
    async fn stop(self) {
        let _ = self.stop.send(true);
        for w in self.workers {
            let _ = w.await;
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(3),
            self.in_flight.acquire_many(MAX_IN_FLIGHT),
        )
        .await;
    }
}

/// One generator: a request every `period`, each in its own task so a slow
/// answer does not hold the next one back (open-loop load).
async fn generate(
    client: DemoClient,
    uri: Uri,
    tally: Arc<Tally>,
    in_flight: Arc<Semaphore>,
    first: tokio::time::Instant,
    period: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval_at(first, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped(&mut stop) => return,
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            // The balancer is not answering at all: that is a failure too.
            tally.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (client, uri, tally) = (client.clone(), uri.clone(), tally.clone());
        tokio::spawn(async move {
            let _permit = permit;
            tally.record(send(&client, uri).await);
        });
    }
}

/// One GET; the body if the answer was a 2xx.
async fn send(client: &DemoClient, uri: Uri) -> Option<Bytes> {
    let exchange = async {
        let resp = client.get(uri).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.into_body().collect().await.ok().map(|b| b.to_bytes())
    };
    tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .ok()
        .flatten()
}

// === what happened ===

/// Phase changes and state changes, with the time since the demo started.
struct Journal {
    started: Instant,
    entries: Mutex<JournalEntries>,
}

#[derive(Default)]
struct JournalEntries {
    next_seq: u64,
    recent: VecDeque<Entry>,
}

#[derive(Clone)]
struct Entry {
    seq: u64,
    at: Duration,
    text: String,
}

impl Journal {
    fn new(started: Instant) -> Self {
        Self {
            started,
            entries: Mutex::new(JournalEntries::default()),
        }
    }

    fn note(&self, text: impl Into<String>) {
        let at = self.started.elapsed();
        let mut e = self.entries.lock();
        let seq = e.next_seq;
        e.next_seq += 1;
        e.recent.push_back(Entry {
            seq,
            at,
            text: text.into(),
        });
        while e.recent.len() > JOURNAL_CAP {
            e.recent.pop_front();
        }
    }

    /// The last `n` entries, oldest first.
    fn last(&self, n: usize) -> Vec<Entry> {
        let e = self.entries.lock();
        e.recent
            .iter()
            .skip(e.recent.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// Entries numbered `seq` or later, and the next number.
    fn since(&self, seq: u64) -> (Vec<Entry>, u64) {
        let e = self.entries.lock();
        let v = e.recent.iter().filter(|x| x.seq >= seq).cloned().collect();
        (v, e.next_seq)
    }
}

/// What the watcher remembers of an instance between samples.
struct Seen {
    state: CircuitState,
    last_used: Option<Timestamp>,
}

/// Samples the registry every [`WATCH_EVERY`] and notes breaker, strategy
/// and panic changes. Half-open is short-lived (a probe takes a
/// millisecond), so a sample may see `open` on both sides of a failed probe:
/// a selection while open (outside panic mode) can only be a probe, so a
/// changed `last_used` tells.
async fn watch_changes(registry: Arc<Registry>, journal: Arc<Journal>, tally: Arc<Tally>) {
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut mode = None;
    let mut panic = false;
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(svc) = registry.service(SERVICE) else {
            continue;
        };
        let status = svc.status();
        if let Some(a) = &status.adaptive {
            if let Some(before) = mode.filter(|m| *m != a.mode) {
                journal.note(format!("adaptive: {before} → {}: {}", a.mode, a.reason));
            }
            mode = Some(a.mode);
        }
        if status.panic != panic {
            journal.note(if status.panic {
                format!(
                    "panic mode: only {}/{} eligible, spreading load over all",
                    status.eligible, status.instances
                )
            } else {
                "panic mode over".to_owned()
            });
            panic = status.panic;
        }
        for st in svc.instances() {
            let id = st.instance.id().as_str();
            let now = Seen {
                state: st.circuit_state,
                last_used: st.last_used,
            };
            if let Some(before) = seen.get(id) {
                let probed = !panic && before.last_used != now.last_used;
                if let Some(text) = breaker_change(id, before.state, now.state, probed) {
                    journal.note(text);
                }
                let opened = now.state == CircuitState::Open
                    && (before.state != CircuitState::Open || probed);
                if opened {
                    if let Some(c) = BACKENDS
                        .iter()
                        .position(|n| *n == id)
                        .and_then(|i| tally.opens.get(i))
                    {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            seen.insert(id.to_owned(), now);
        }
    }
}

fn breaker_change(
    id: &str,
    before: CircuitState,
    now: CircuitState,
    probed: bool,
) -> Option<String> {
    use CircuitState::{Closed, HalfOpen, Open};
    let what = match (before, now) {
        (Closed, Open) => "closed → open: ejected until its open window ends",
        (Open, Open) if probed => "open → half_open → open: the probe failed; open again",
        (Open, HalfOpen) => "open → half_open: probing with a real request",
        (HalfOpen, Open) => "half_open → open: the probe failed; open again",
        (HalfOpen, Closed) => "half_open → closed: probes succeeded; weight ramps up (slow start)",
        (Open, Closed) => {
            "open → half_open → closed: probes succeeded; weight ramps up (slow start)"
        }
        (Closed, HalfOpen) => "closed → half_open",
        _ => return None,
    };
    Some(format!("{id} breaker: {what}"))
}

// === the view ===

struct View {
    addr: SocketAddr,
    /// The admin endpoint, for the status page.
    admin: Option<SocketAddr>,
    started: Instant,
    /// Redraw in place with colors, or one plain line per second.
    tty: bool,
    /// Whether logs land on the same terminal.
    stderr_tty: bool,
    /// Plain mode: journal entries printed so far.
    printed: u64,
    /// 2xx answers per backend since the start.
    total_ok: [u64; 4],
    total_failed: u64,
}

impl View {
    fn new(addr: SocketAddr, admin: Option<SocketAddr>, started: Instant) -> Self {
        Self {
            addr,
            admin,
            started,
            tty: std::io::stdout().is_terminal(),
            stderr_tty: std::io::stderr().is_terminal(),
            printed: 0,
            total_ok: [0; 4],
            total_failed: 0,
        }
    }

    /// Where the balancer and its status page are.
    fn whereabouts(&self) -> String {
        let mut s = format!("balancer http://{}/", self.addr);
        if let Some(admin) = self.admin {
            let _ = write!(s, " · status page http://{admin}/status");
        }
        s.push_str(" · Ctrl-C stops");
        s
    }

    /// What is printed before the first second has passed.
    fn start(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let head = format!(
            "datapunk-lb demo · {}\n{LEGEND}\n{COLUMNS}\n",
            self.whereabouts()
        );
        let text = if self.tty {
            format!("{CLEAR}{head}starting…\n")
        } else {
            head
        };
        out.write_all(text.as_bytes())?;
        out.flush()
    }

    /// One refresh: takes the last second's counts.
    fn frame(&mut self, registry: &Registry, tally: &Tally, journal: &Journal) -> String {
        let ok: [u64; 4] =
            std::array::from_fn(|i| tally.ok.get(i).map_or(0, |c| c.swap(0, Ordering::Relaxed)));
        let failed = tally.failed.swap(0, Ordering::Relaxed);
        for (t, n) in self.total_ok.iter_mut().zip(ok) {
            *t += n;
        }
        self.total_failed += failed;
        let svc = registry.service(SERVICE);
        let status = svc.as_ref().map(|s| s.status());
        let instances = svc.map(|s| s.instances()).unwrap_or_default();
        let sample = Sample {
            elapsed: self.started.elapsed(),
            ok,
            failed,
            status,
            instances,
        };
        if self.tty {
            self.redraw(&sample, journal)
        } else {
            self.line(&sample, journal)
        }
    }

    fn paint(&self, color: &str, text: &str) -> String {
        if self.tty {
            format!("{color}{text}{RESET}")
        } else {
            text.to_owned()
        }
    }

    fn breaker(&self, state: CircuitState, width: usize) -> String {
        let color = match state {
            CircuitState::Closed => GREEN,
            CircuitState::HalfOpen => YELLOW,
            CircuitState::Open => RED,
        };
        // Pad before painting, so escape codes do not upset the columns.
        self.paint(color, &format!("{:<width$}", state.as_str()))
    }

    /// The service's state and its strategy, as two lines of text.
    fn service_lines(&self, s: Option<&ServiceStatus>) -> (String, String) {
        let Some(s) = s else {
            return (format!("\"{SERVICE}\" is not registered"), "-".to_owned());
        };
        let panic = if s.panic {
            self.paint(RED, "ON: spreading load over every instance")
        } else {
            "off".to_owned()
        };
        let state = format!(
            "\"{SERVICE}\" (4 sample backends in this process) · eligible {}/{} · panic mode {panic} \
             · in flight {}",
            s.eligible, s.instances, s.in_flight
        );
        let strategy = match &s.adaptive {
            Some(a) => format!("adaptive, using {}: {}", a.mode, a.reason),
            None => s.strategy.to_string(),
        };
        (state, strategy)
    }

    fn redraw(&self, s: &Sample, journal: &Journal) -> String {
        let total: u64 = s.ok.iter().sum();
        let mut f = String::with_capacity(4096);
        f.push_str(CLEAR);
        let _ = writeln!(
            f,
            "{BOLD}datapunk-lb demo{RESET} · {} s · {}",
            s.elapsed.as_secs(),
            self.whereabouts()
        );
        let _ = writeln!(f, "{LEGEND}\n");
        let _ = writeln!(
            f,
            "{BOLD}{:<8} {:>5}  {:<BAR_WIDTH$}  {:>6}  {:<9}  {:>6}  {:<10}  {:>5}  {:>8}{RESET}",
            "INSTANCE",
            "SHARE",
            "of 2xx, last second",
            "HEALTH",
            "BREAKER",
            "WEIGHT",
            "SLOW START",
            "CONNS",
            "LATENCY"
        );
        for st in &s.instances {
            let n = answered(&s.ok, st);
            let share = if total > 0 {
                n as f64 / total as f64
            } else {
                0.0
            };
            let _ = writeln!(
                f,
                "{:<8} {:>4.0}%  {}  {:>6.2}  {}  {:>6.2}  {:<10}  {:>5}  {:>8}",
                st.instance.id().as_str(),
                share * 100.0,
                bar(share),
                st.health_score,
                self.breaker(st.circuit_state, 9),
                st.effective_weight,
                ramp(st),
                st.active_connections,
                latency(st)
            );
        }
        let _ = writeln!(f, "\n{COLUMNS}\n");
        let (state, strategy) = self.service_lines(s.status.as_ref());
        let _ = writeln!(f, "{BOLD}service{RESET}   {state}");
        let _ = writeln!(f, "{BOLD}strategy{RESET}  {strategy}");
        let failed = if s.failed > 0 {
            self.paint(RED, &format!("{} failed", s.failed))
        } else {
            "0 failed".to_owned()
        };
        let _ = writeln!(
            f,
            "{BOLD}traffic{RESET}   last second: {total} ok, {failed} · since the start: {} ok, {} failed",
            thousands(self.total_ok.iter().sum()),
            thousands(self.total_failed)
        );
        let _ = writeln!(f, "\n{BOLD}what happened{RESET}");
        for e in journal.last(RECENT) {
            let _ = writeln!(f, "  {:>6.1} s  {}", e.at.as_secs_f64(), e.text);
        }
        if self.stderr_tty {
            let _ = writeln!(
                f,
                "\n(logs go to stderr; `datapunk-lb demo 2>demo.log` keeps this view clean)"
            );
        }
        f
    }

    fn line(&mut self, s: &Sample, journal: &Journal) -> String {
        let mut f = String::new();
        let (entries, next) = journal.since(self.printed);
        self.printed = next;
        for e in entries {
            let _ = writeln!(f, "{:>6.1}s  * {}", e.at.as_secs_f64(), e.text);
        }
        let total: u64 = s.ok.iter().sum();
        let mode = match s.status.as_ref() {
            Some(st) => match &st.adaptive {
                Some(a) => format!("adaptive:{}", a.mode),
                None => st.strategy.to_string(),
            },
            None => "-".to_owned(),
        };
        let panic = if s.status.as_ref().is_some_and(|st| st.panic) {
            " PANIC"
        } else {
            ""
        };
        let _ = write!(
            f,
            "{:>5}s  {total} ok {} failed  {mode}{panic}",
            s.elapsed.as_secs(),
            s.failed
        );
        for st in &s.instances {
            let n = answered(&s.ok, st);
            let share = if total > 0 {
                n as f64 / total as f64 * 100.0
            } else {
                0.0
            };
            let _ = write!(
                f,
                " | {} {:.0}% health {:.2} {} weight {:.2} conns {} latency {}",
                st.instance.id().as_str(),
                share,
                st.health_score,
                st.circuit_state.as_str(),
                st.effective_weight,
                st.active_connections,
                latency(st).replace(' ', "")
            );
        }
        f.push('\n');
        f
    }

    fn summary(&self, why: &str, drained: bool, tally: &Tally) -> String {
        let mut f = String::new();
        let ok: u64 = self.total_ok.iter().sum();
        let _ = writeln!(
            f,
            "\ndatapunk-lb demo stopped after {} s ({why}).",
            self.started.elapsed().as_secs()
        );
        let per: Vec<String> = BACKENDS
            .iter()
            .zip(self.total_ok)
            .map(|(name, n)| format!("{name} {}", thousands(n)))
            .collect();
        let _ = writeln!(
            f,
            "  answered: {} ({}); failed: {} (non-2xx or errors seen by the client)",
            thousands(ok),
            per.join(" · "),
            thousands(self.total_failed)
        );
        for (name, opens) in BACKENDS.iter().zip(&tally.opens) {
            let n = opens.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(
                    f,
                    "  {name}'s breaker opened {n} time{}",
                    if n == 1 { "" } else { "s" }
                );
            }
        }
        let _ = writeln!(
            f,
            "  drain: {}",
            if drained {
                "every request finished"
            } else {
                "timed out; remaining connections closed"
            }
        );
        f
    }
}

/// One second's worth of what the view shows.
struct Sample {
    elapsed: Duration,
    ok: [u64; 4],
    failed: u64,
    status: Option<ServiceStatus>,
    instances: Vec<InstanceStatus>,
}

/// 2xx answers from `st`'s backend in `ok`.
fn answered(ok: &[u64; 4], st: &InstanceStatus) -> u64 {
    BACKENDS
        .iter()
        .position(|n| *n == st.instance.id().as_str())
        .and_then(|i| ok.get(i).copied())
        .unwrap_or(0)
}

fn bar(share: f64) -> String {
    let filled = ((share.clamp(0.0, 1.0) * BAR_WIDTH as f64).round() as usize).min(BAR_WIDTH);
    let mut s = "█".repeat(filled);
    s.push_str(&"·".repeat(BAR_WIDTH - filled));
    s
}

fn ramp(st: &InstanceStatus) -> String {
    if st.slow_start_factor < 1.0 {
        format!("ramp {:>3.0}%", st.slow_start_factor * 100.0)
    } else {
        String::new()
    }
}

fn latency(st: &InstanceStatus) -> String {
    if st.requests == 0 {
        return "–".to_owned();
    }
    let ms = st.latency_ewma.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_config_parses() {
        let c = Config::parse(&config_text(&[1001, 1002, 1003, 1004])).unwrap();
        let svc = &c.services[SERVICE];
        assert_eq!(svc.instances.len(), 4);
        assert_eq!(svc.balancing.slow_start, Duration::from_secs(5));
        assert_eq!(svc.request_timeout, Duration::from_secs(2));
        assert_eq!(c.listeners[0].name, LISTENER);
    }

    #[test]
    fn tally_attributes_bodies() {
        let t = Tally::default();
        t.record(Some(Bytes::from_static(b"api-3")));
        t.record(Some(Bytes::from_static(b"api-3\n")));
        t.record(Some(Bytes::from_static(b"nobody")));
        t.record(None);
        assert_eq!(t.ok[2].load(Ordering::Relaxed), 2);
        assert_eq!(t.failed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn numbers_and_bars() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(bar(0.0).chars().count(), BAR_WIDTH);
        assert_eq!(bar(1.0), "█".repeat(BAR_WIDTH));
        assert_eq!(
            bar(0.5).chars().filter(|c| *c == '█').count(),
            BAR_WIDTH / 2
        );
    }
}
