//! Helpers shared by the end-to-end tests: real backends on 127.0.0.1:0, the
//! real `datapunk-lb` binary as a child process, and clients; [`etcd`]:
//! the etcd process harness.

#[cfg(feature = "etcd")]
pub(crate) mod etcd;
pub(crate) mod pki;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A scriptable HTTP backend: answers every path with its name, `/health`
/// with 200 (or `status` when set), after `delay_ms`.
pub(crate) struct Backend {
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    pub(crate) state: Arc<BackendState>,
    task: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
pub(crate) struct BackendState {
    pub(crate) delay_ms: AtomicU64,
    /// 0 = normal; otherwise every response gets this status.
    pub(crate) status: AtomicU16,
    pub(crate) hits: AtomicUsize,
    pub(crate) versions: Mutex<Vec<hyper::Version>>,
}

impl Backend {
    pub(crate) async fn start(name: &str) -> Arc<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let b = Arc::new(Backend {
            name: name.to_owned(),
            addr,
            state: Arc::new(BackendState::default()),
            task: Mutex::new(None),
        });
        b.serve(listener);
        b
    }

    fn serve(&self, listener: TcpListener) {
        let (name, state) = (self.name.clone(), self.state.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (name, state) = (name.clone(), state.clone());
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (name, state) = (name.clone(), state.clone());
                        async move { Ok::<_, Infallible>(respond(&name, &state, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            // (the JoinSet is dropped with the task: aborting every connection)
        });
        *self.task.lock() = Some(task);
    }

    /// Closes the listener and every open connection (a crash).
    pub(crate) async fn kill(&self) {
        let task = self.task.lock().take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens again on the same port.
    pub(crate) async fn restart(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    pub(crate) fn set_delay(&self, d: Duration) {
        self.state
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }
}

async fn respond(
    name: &str,
    state: &BackendState,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    state.versions.lock().push(req.version());
    let is_health = req.uri().path() == "/health";
    if !is_health {
        state.hits.fetch_add(1, Ordering::SeqCst);
    }
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 && !is_health {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    // Drain the request body.
    let _ = req.into_body().collect().await;
    let mut r = Response::new(Full::new(Bytes::from(name.to_owned())));
    let status = state.status.load(Ordering::SeqCst);
    if status != 0 {
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    }
    r
}

/// Adds `[admin] listen = "127.0.0.1:0"` unless the config has an
/// `[admin]` table, so parallel tests never share the default admin port.
pub(crate) fn with_free_admin(config: &str) -> String {
    if config.contains("[admin]") {
        config.to_owned()
    } else {
        format!("{config}\n[admin]\nlisten = \"127.0.0.1:0\"\n")
    }
}

/// The `datapunk-lb run` child process.
pub(crate) struct Lb {
    pub(crate) child: Child,
    pub(crate) addrs: HashMap<String, SocketAddr>,
    pub(crate) config_path: std::path::PathBuf,
    pub(crate) log: Arc<Mutex<Vec<serde_json::Value>>>,
}

pub(crate) fn temp_path(name: &str) -> std::path::PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!(
        "datapunk-lb-test-{}-{n}-{name}",
        std::process::id()
    ))
}

impl Lb {
    /// Writes `config` to a file and runs the binary on it; waits until
    /// every listener logged its address.
    pub(crate) fn start(config: &str) -> Lb {
        Lb::start_with(config, &[])
    }

    /// [`Lb::start`] with more arguments to `run` (`--threads 2`, say).
    pub(crate) fn start_with(config: &str, run_args: &[&str]) -> Lb {
        let config_path = temp_path("lb.toml");
        let config = with_free_admin(config);
        std::fs::write(&config_path, &config).unwrap();
        // Every `[[listener]]`, then the admin endpoint (always started, last).
        let listeners = config.matches("[[listener]]").count() + 1;
        let mut child = lb_command(&["run"])
            .args(run_args)
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        read_json_log(&mut child, "lb", move |v| {
            if v["message"] == "listening" {
                let _ = tx.send((
                    v["listener"].as_str().unwrap_or("").to_owned(),
                    v["addr"]
                        .as_str()
                        .unwrap_or("")
                        .parse::<SocketAddr>()
                        .unwrap(),
                ));
            }
            log2.lock().push(v);
        });
        let mut addrs = HashMap::new();
        while addrs.len() < listeners {
            let (name, addr) = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("datapunk-lb did not report its listeners");
            addrs.insert(name, addr);
        }
        Lb {
            child,
            addrs,
            config_path,
            log,
        }
    }

    pub(crate) fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs[listener]
    }

    pub(crate) fn signal(&self, sig: &str) {
        signal(&self.child, sig);
    }

    /// Waits until a log line matching `pred` appears.
    pub(crate) async fn wait_log(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.log.lock().iter().any(&pred) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no log line for {what} within {timeout:?}");
    }

    /// Waits for the process to exit; returns its status.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        wait_exit(&mut self.child, "datapunk-lb", timeout)
    }
}

/// `datapunk-lb check` on the config text `config`: its exit code and
/// what it printed (stdout, then stderr).
pub(crate) fn check_config(config: &str) -> (Option<i32>, String) {
    let path = temp_path("check.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_datapunk-lb"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// The `datapunk-lb` binary with JSON logs on a piped stderr (read it with
/// [`read_json_log`]); `args` start with the subcommand.
pub(crate) fn lb_command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_datapunk-lb"));
    c.args(["--log-format", "json"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Reads `child`'s stderr on a thread until it closes: each JSON line goes
/// to `on_line`; any other line is echoed after `who: ` (a panic, say).
pub(crate) fn read_json_log(
    child: &mut Child,
    who: &'static str,
    mut on_line: impl FnMut(serde_json::Value) + Send + 'static,
) {
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str(&line) {
                Ok(v) => on_line(v),
                Err(_) => eprintln!("{who}: {line}"),
            }
        }
    });
}

/// Sends `sig` (`HUP`, `TERM`, …) to `child`.
pub(crate) fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for `child` (named `who` in the panic) to exit; returns its status.
pub(crate) fn wait_exit(
    child: &mut Child,
    who: &str,
    timeout: Duration,
) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            start.elapsed() < timeout,
            "{who} did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config_path);
    }
}

pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub(crate) fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub(crate) fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// GET `path` on `addr`; returns status and body.
pub(crate) async fn get(
    c: &HttpClient,
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, String), String> {
    let uri = format!("http://{addr}{path}");
    let resp = c
        .get(uri.parse().unwrap())
        .await
        .map_err(|e| format!("{e:?}"))?;
    status_and_body(resp).await
}

/// One HTTP/1.1 keep-alive connection. The proxy serves a connection on
/// one worker thread, so its requests follow that thread's rotation; a
/// pooled [`client`] may open a second connection (when the first is not
/// back in its pool yet), which the other worker may serve.
pub(crate) struct OneConnection {
    addr: SocketAddr,
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl OneConnection {
    pub(crate) async fn open(addr: SocketAddr) -> OneConnection {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        OneConnection { addr, send }
    }

    /// GET `path` on this connection; returns status and body.
    pub(crate) async fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        self.request("GET", path, "").await
    }

    /// `method` `path` with `body` on this connection; returns status and
    /// body.
    pub(crate) async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &'static str,
    ) -> Result<(u16, String), String> {
        self.send.ready().await.map_err(|e| format!("{e:?}"))?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let resp = self
            .send
            .send_request(req)
            .await
            .map_err(|e| format!("{e:?}"))?;
        status_and_body(resp).await
    }
}

/// A response's status and its body read whole.
async fn status_and_body(resp: Response<Incoming>) -> Result<(u16, String), String> {
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// An `[[service.NAME.instance]]` block per backend.
pub(crate) fn instances(service: &str, backends: &[&Arc<Backend>], weights: &[u32]) -> String {
    backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "[[service.{service}.instance]]\nid = \"{}\"\naddress = \"127.0.0.1\"\nport = {}\nweight = {}\n",
                b.name,
                b.addr.port(),
                weights.get(i).copied().unwrap_or(1)
            )
        })
        .collect()
}

/// The listener most tests use: `web`, http on a free port, every path
/// routed to the service `api`.
pub(crate) const WEB_TO_API: &str = r#"[[listener]]
name = "web"
listen = "127.0.0.1:0"
protocol = "http"
[[listener.route]]
path_prefix = "/"
service = "api"
"#;

/// A config with [`WEB_TO_API`] and the service `api`: `service_extra`,
/// active http checks every 100 ms, an instance per backend.
pub(crate) fn http_config(
    service_extra: &str,
    backends: &[&Arc<Backend>],
    weights: &[u32],
) -> String {
    format!(
        r#"drain_timeout = "5s"
{WEB_TO_API}
[service.api]
{service_extra}
[service.api.health_check]
kind = "http"
path = "/health"
interval = "100ms"
timeout = "100ms"

{}"#,
        instances("api", backends, weights)
    )
}

/// `config` (from [`http_config`]) with its active checks off: for tests
/// whose assertion needs every health score to stay 1 (an exact split, an
/// unchanged state), which a probe timing out (100 ms) on a loaded machine
/// would halve.
pub(crate) fn without_checks(config: &str) -> String {
    let checks = "kind = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\n";
    assert!(config.contains(checks), "not an http_config: {config}");
    config.replace(checks, "kind = \"none\"\n")
}

/// Finds an external program a test needs: `path` if it is an executable
/// file, else `tool` on `PATH`. When it is missing the test should return
/// early: this says why on the terminal (past the test harness's capture)
/// and returns `None` — unless `DATAPUNK_LB_REQUIRE_ALL=1`, where a missing
/// tool fails the test instead (CI, where every tool must be installed).
///
/// `install` says how to get it, e.g. `"chromium and chromium-driver"`.
pub(crate) fn require(tool: &str, path: &str, install: &str) -> Option<PathBuf> {
    let found = std::iter::once(PathBuf::from(path))
        .chain(
            std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .map(|dir| dir.join(tool)),
        )
        .find(|p| is_executable(p));
    if found.is_some() {
        return found;
    }
    let reason = format!("{tool} not found at {path} or on PATH (install {install})");
    if std::env::var("DATAPUNK_LB_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!("{reason}; DATAPUNK_LB_REQUIRE_ALL=1 forbids skipping");
    }
    // Written to the real stderr, not through eprintln!, which the harness
    // swallows for passing tests: a skip must be visible.
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    let _ = writeln!(std::io::stderr(), "{test}: skipping: {reason}");
    None
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// An admin API request; returns status and body. A body is sent as
/// `Content-Type: application/json`; for any other headers, [`request`].
pub(crate) async fn admin(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = Vec::new();
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    if body.is_some() {
        headers.push(("content-type", "application/json"));
    }
    request(addr, method, path, &headers, body.unwrap_or_default()).await
}

/// An HTTP request with exactly `headers`; returns status and body.
pub(crate) async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
) -> (u16, String) {
    let (status, _, body) = exchange(addr, method, path, headers, body).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Continuous load: `clients` tasks sending `GET /` back to back (with
/// `pause` between requests), recording who answered and what failed.
pub(crate) struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    failed: Arc<AtomicUsize>,
    /// (ms since start, body) of every 200.
    seen: Arc<Mutex<Vec<(u128, String)>>>,
    tasks: Vec<JoinHandle<()>>,
    /// The origin of the times in `seen`.
    t0: Instant,
}

impl Load {
    pub(crate) fn start(addr: SocketAddr, clients: usize, pause: Duration) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let failed = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let tasks = (0..clients)
            .map(|_| {
                let (stop, failed, seen) = (stop.clone(), failed.clone(), seen.clone());
                tokio::spawn(async move {
                    let c = client();
                    while !stop.load(Ordering::Relaxed) {
                        match get(&c, addr, "/").await {
                            Ok((200, body)) => seen.lock().push((t0.elapsed().as_millis(), body)),
                            other => {
                                eprintln!("failed request: {other:?}");
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            failed,
            seen,
            tasks,
            t0,
        }
    }

    /// Now, in the ms of the times in `seen`.
    pub(crate) fn elapsed_ms(&self) -> u128 {
        self.t0.elapsed().as_millis()
    }

    /// Every 200 (time, body) so far, while the load goes on.
    pub(crate) fn seen_so_far(&self) -> Vec<(u128, String)> {
        self.seen.lock().clone()
    }

    /// Whether `body` has answered a request so far.
    pub(crate) fn has_seen(&self, body: &str) -> bool {
        self.seen.lock().iter().any(|(_, b)| b == body)
    }

    /// Stops the load; returns every 200 (time, body) and the failure count.
    pub(crate) async fn stop(self) -> (Vec<(u128, String)>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let seen = std::mem::take(&mut *self.seen.lock());
        (seen, self.failed.load(Ordering::Relaxed))
    }
}

/// A TCP echo server on 127.0.0.1:0 (every connection gets its bytes
/// back); returns its port.
pub(crate) async fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// A tonic gRPC health server on a free port, `datapunk.Ok` serving;
/// returns the port.
pub(crate) async fn grpc_health_backend() -> u16 {
    let (mut reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("datapunk.Ok", tonic_health::ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    port
}

/// A backend on raw sockets, for shapes a hyper server would not send: it
/// reads each request head (and its `Content-Length` body), records the
/// head, then writes `answer` as it is and reads the next request on the
/// same connection, or, with no answer, closes the connection (a reset
/// after the request was read).
pub(crate) struct RawBackend {
    pub(crate) addr: SocketAddr,
    /// Every request head received, in order, as text.
    pub(crate) heads: Arc<Mutex<Vec<String>>>,
}

impl RawBackend {
    pub(crate) async fn start(answer: Option<&'static [u8]>) -> RawBackend {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(end) = read_head(&mut s, &mut buf).await else {
                            return;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        let len = content_length(&head);
                        buf.drain(..end);
                        while buf.len() < len {
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..len);
                        seen.lock().push(head);
                        match answer {
                            Some(a) => {
                                if s.write_all(a).await.is_err() {
                                    return;
                                }
                            }
                            None => return,
                        }
                    }
                });
            }
        });
        RawBackend { addr, heads }
    }

    /// Requests received so far.
    pub(crate) fn hits(&self) -> usize {
        self.heads.lock().len()
    }
}

/// Reads from `s` into `buf` until it holds a whole head; its length with
/// the blank line, or `None` when the connection ends first.
async fn read_head(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The `Content-Length` of a request head, 0 without one.
fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A config with listener `web` (`listener_extra` added to it) routing
/// every path to service `api` (`service_extra` added; no active health
/// checks, so raw backends need not answer `/health`) with an instance per
/// `(id, addr)`.
pub(crate) fn raw_config(
    listener_extra: &str,
    service_extra: &str,
    instances: &[(&str, SocketAddr)],
) -> String {
    let instances: String = instances
        .iter()
        .map(|(id, a)| {
            format!(
                "[[service.api.instance]]\nid = \"{id}\"\naddress = \"127.0.0.1\"\nport = {}\n",
                a.port()
            )
        })
        .collect();
    format!(
        "drain_timeout = \"1s\"\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n{listener_extra}\n\
         [[listener.route]]\npath_prefix = \"/\"\nservice = \"api\"\n\
         [service.api]\nstrategy = \"round_robin\"\n{service_extra}\n\
         [service.api.health_check]\nkind = \"none\"\n{instances}"
    )
}

/// Sends `request` on a new connection and reads until the response head
/// is complete, the connection closes, or 5 s pass; returns what was read.
pub(crate) async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), read_head(&mut s, &mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// The sum of the `/metrics` samples of `name` (a counter's `_total` too)
/// whose labels include every one of `labels`; 0 when there is none.
pub(crate) async fn metric_sum(lb: &Lb, name: &str, labels: &[&str]) -> f64 {
    let (status, text) = admin(lb.addr("admin"), "GET", "/metrics", None, None).await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| l.split('{').next() == Some(name))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
/// The share of `who` among the answers in `seen` (from [`Load::stop`])
/// timed in `from..to` ms.
pub(crate) fn share_in(seen: &[(u128, String)], who: &str, from: u128, to: u128) -> f64 {
    let (mine, all) = seen
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .fold((0usize, 0usize), |(m, a), (_, w)| {
            (m + usize::from(w == who), a + 1)
        });
    mine as f64 / all.max(1) as f64
}

/// Backends named `a`, `b` and `c`.
pub(crate) async fn three_backends() -> (Arc<Backend>, Arc<Backend>, Arc<Backend>) {
    (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    )
}

/// What a [`Recorder`] saw of one request.
pub(crate) struct Seen {
    pub(crate) headers: hyper::HeaderMap,
    pub(crate) body_len: usize,
}

/// A backend that records every request's headers and body length and
/// answers 200 with `body`: for the forwarding header and access log tests.
pub(crate) struct Recorder {
    pub(crate) addr: SocketAddr,
    pub(crate) seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    pub(crate) async fn start(body: &'static str) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let headers = req.headers().clone();
                            let got = req.into_body().collect().await.map(|b| b.to_bytes());
                            let body_len = got.map_or(0, |b| b.len());
                            seen.lock().push(Seen { headers, body_len });
                            // Headers of its own, and an id the proxy replaces.
                            let mut resp = Response::new(Full::new(Bytes::from(body)));
                            let h = resp.headers_mut();
                            h.insert("x-recorder", http::HeaderValue::from_static("seen"));
                            h.append("x-recorder", http::HeaderValue::from_static("twice"));
                            h.insert("x-request-id", http::HeaderValue::from_static("backend"));
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Recorder { addr, seen }
    }

    /// Every value of `name` in the last request seen.
    pub(crate) fn last(&self, name: &str) -> Vec<String> {
        let seen = self.seen.lock();
        let last = seen.last().expect("the backend saw a request");
        last.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }
}

/// `method path` to `addr` with exactly `headers` (in order, names may
/// repeat; `host` included when given) and `body`; returns the status, the
/// response headers and the body.
pub(crate) async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (u16, hyper::HeaderMap, Bytes) {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let resp = client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

/// `[service.NAME]` with one instance `id` on 127.0.0.1:`port` and no
/// health checks: the instance is eligible from the start.
pub(crate) fn unchecked_service(service: &str, id: &str, port: u16) -> String {
    format!(
        "[service.{service}]\n[service.{service}.health_check]\nkind = \"none\"\n\
         [[service.{service}.instance]]\nid = \"{id}\"\naddress = \"127.0.0.1\"\nport = {port}\n"
    )
}

/// How many workers a `datapunk-lb run` started by [`Lb::start`] serves
/// with, each with its own upstream connections (issue 12): one per core,
/// unless `DATAPUNK_LB_SHARED_RUNTIME=true` runs one shared runtime (one
/// set of connections).
pub(crate) fn proxy_workers() -> usize {
    if std::env::var("DATAPUNK_LB_SHARED_RUNTIME").is_ok_and(|v| v == "true") {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}
