//! The etcd process harness: finds the etcd binary, runs single-member etcd
//! servers on free ports with a temp data dir (stopped by pid, data dir
//! removed on drop), balancer nodes that discover from them, and the
//! `datapunk-lb register` sidecar.
//!
//! Without etcd installed, [`etcd_bin`] returns `None` and the test skips
//! with a printed reason (it fails instead under `DATAPUNK_LB_REQUIRE_ALL=1`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datapunk_lb::config::EtcdTls;
use datapunk_lb::discovery::etcd::client::Client;
use parking_lot::Mutex;
use serde_json::Value;

use super::{
    admin, client, get, lb_command, read_json_log, require, signal, temp_path, wait_exit, Backend,
    Lb, OneConnection, WEB_TO_API,
};

/// The key prefix the test nodes watch.
pub(crate) const PREFIX: &str = "/datapunk/services/";

/// The etcd binary, or `None` (the test skips) when it is not installed.
pub(crate) fn etcd_bin() -> Option<PathBuf> {
    require(
        "etcd",
        "/usr/bin/etcd",
        "etcd-server: apt-get install etcd-server",
    )
}

/// A loopback port free at the time of the call.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A single-member etcd: its data dir, ports and process.
pub(crate) struct Etcd {
    bin: PathBuf,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    tls: Option<ServerTls>,
}

/// An etcd serving its clients over TLS.
pub(crate) struct ServerTls {
    /// `--cert-file`.
    pub(crate) cert_file: PathBuf,
    /// `--key-file`.
    pub(crate) key_file: PathBuf,
    /// `--trusted-ca-file`, with `--client-cert-auth`: clients need a
    /// certificate from this CA.
    pub(crate) client_ca_file: PathBuf,
    /// What the harness connects with to see it healthy.
    pub(crate) client: EtcdTls,
}

impl Etcd {
    /// A new member on free ports and a fresh data dir.
    pub(crate) async fn start(bin: &Path) -> Etcd {
        let mut e = Etcd::not_started(bin);
        e.start_again().await;
        e
    }

    /// A new member serving clients on `https://127.0.0.1:port` with `tls`.
    pub(crate) async fn start_tls(bin: &Path, tls: ServerTls) -> Etcd {
        let mut e = Etcd::not_started(bin);
        e.tls = Some(tls);
        e.start_again().await;
        e
    }

    /// Ports and data dir chosen, nothing running yet.
    pub(crate) fn not_started(bin: &Path) -> Etcd {
        let dir = temp_path("etcd");
        std::fs::create_dir_all(&dir).unwrap();
        Etcd {
            bin: bin.to_owned(),
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
            tls: None,
        }
    }

    /// Starts (again) on the same data dir and ports.
    pub(crate) async fn start_again(&mut self) {
        assert!(self.child.is_none(), "etcd already running");
        self.child = Some(spawn_etcd(
            &self.bin,
            &self.dir,
            self.client_port,
            self.peer_port,
            self.tls.as_ref(),
        ));
        match &self.tls {
            Some(tls) => wait_healthy_tls(&self.url(), &tls.client).await,
            None => wait_healthy(self.client_port).await,
        }
    }

    /// The client URL.
    pub(crate) fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// SIGTERM by pid, then waits for the exit.
    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_by_pid(&mut c);
        }
    }

    /// Runs the same member (same data dir, same peer port) on another
    /// client port, which the balancers do not know: a way to change etcd
    /// while they cannot see it. Stopped by the returned guard's `stop`.
    pub(crate) async fn same_data_other_port(&self) -> (Child, u16) {
        assert!(self.child.is_none(), "stop the original first");
        let port = free_port();
        let c = spawn_etcd(&self.bin, &self.dir, port, self.peer_port, None);
        wait_healthy(port).await;
        (c, port)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.dir.with_extension("log"));
    }
}

/// The `datapunk-lb register` sidecar as a child process, JSON logs kept
/// with the time each line arrived.
pub(crate) struct Sidecar {
    child: Child,
    /// Each JSON log line with the time it arrived.
    pub(crate) log: Arc<Mutex<Vec<(Instant, Value)>>>,
}

impl Sidecar {
    /// Registers `backend` as `api/{id}` with a lease of `ttl`.
    pub(crate) fn start(etcd_url: &str, id: &str, backend: &Backend, ttl: &str) -> Sidecar {
        Sidecar::start_with(etcd_url, id, backend, ttl, &[])
    }

    /// As [`Sidecar::start`], with more flags (`--ca-file`, …).
    pub(crate) fn start_with(
        etcd_url: &str,
        id: &str,
        backend: &Backend,
        ttl: &str,
        more: &[&str],
    ) -> Sidecar {
        let port = backend.addr.port().to_string();
        let mut child = lb_command(&["register", "--etcd", etcd_url])
            .args(["--service", "api", "--id", id, "--address", "127.0.0.1"])
            .args(["--port", &port, "--ttl", ttl])
            .args(more)
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        read_json_log(&mut child, "register", move |v| {
            log2.lock().push((Instant::now(), v));
        });
        Sidecar { child, log }
    }

    /// When the sidecar logged that its key is in etcd.
    pub(crate) async fn registered(&self) -> Instant {
        let t = Instant::now();
        loop {
            if let Some((at, _)) = self
                .log
                .lock()
                .iter()
                .find(|(_, v)| v["message"] == "register: instance registered")
            {
                return *at;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "sidecar did not register"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Sends `sig` to the sidecar.
    pub(crate) fn signal(&self, sig: &str) {
        signal(&self.child, sig);
    }

    /// Waits (up to 10 s) for the sidecar to exit.
    pub(crate) fn wait_exit(&mut self) -> std::process::ExitStatus {
        wait_exit(&mut self.child, "sidecar", Duration::from_secs(10))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts one member on `dir`, logging to `dir.log`.
fn spawn_etcd(bin: &Path, dir: &Path, client: u16, peer: u16, tls: Option<&ServerTls>) -> Child {
    let peer_url = format!("http://127.0.0.1:{peer}");
    let scheme = if tls.is_some() { "https" } else { "http" };
    let client_url = format!("{scheme}://127.0.0.1:{client}");
    let tls_args: Vec<String> = tls.map_or_else(Vec::new, |t| {
        vec![
            format!("--cert-file={}", t.cert_file.display()),
            format!("--key-file={}", t.key_file.display()),
            format!("--trusted-ca-file={}", t.client_ca_file.display()),
            "--client-cert-auth".to_owned(),
        ]
    });
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.with_extension("log"))
        .unwrap();
    Command::new(bin)
        .arg("--name=t")
        .arg(format!("--data-dir={}", dir.join("data").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=t={peer_url}"))
        .args(tls_args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// SIGTERM by pid, then waits up to 10 s for the exit (then SIGKILL).
pub(crate) fn stop_by_pid(c: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// Waits until etcd's `/health` on `port` says it is healthy.
async fn wait_healthy(port: u16) {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let c = client();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if let Ok((200, body)) = get(&c, addr, "/health").await {
            if body.contains("true") {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("etcd on port {port} did not become healthy");
}

/// Waits until a TLS client with `tls` can read from the etcd at `url`.
async fn wait_healthy_tls(url: &str, tls: &EtcdTls) {
    let t = Instant::now();
    let mut last = String::new();
    while t.elapsed() < Duration::from_secs(20) {
        match Client::connect_tls(url, tls).await {
            Ok(mut c) => match c.get("health").await {
                Ok(_) => return,
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("etcd at {url} did not answer over TLS: {last}");
}

/// A client of the etcd at `url` (the one discovery uses).
pub(crate) async fn etcd_client(url: &str) -> Client {
    Client::connect(url).await.unwrap()
}

/// The etcd value registering `b` with `weight`.
pub(crate) fn value(b: &Backend, weight: u32) -> String {
    format!(
        r#"{{"address":"127.0.0.1","port":{},"weight":{weight}}}"#,
        b.addr.port()
    )
}

/// A node: [`WEB_TO_API`], `api` round robin with no active checks and
/// one static instance `base`, etcd discovery.
pub(crate) fn node_config(base: &Backend, etcd_url: &str) -> String {
    format!(
        r#"drain_timeout = "2s"
{WEB_TO_API}
[service.api]
strategy = "round_robin"
slow_start = "0s"
[service.api.health_check]
kind = "none"
[[service.api.instance]]
id = "base"
address = "127.0.0.1"
port = {}

[discovery]
kind = "etcd"
endpoints = ["{etcd_url}"]
prefix = "{PREFIX}"
"#,
        base.addr.port()
    )
}

/// Starts a node on [`node_config`]; returns once it is ready (its first
/// discovery sync done).
pub(crate) async fn start_node(base: &Backend, etcd_url: &str) -> Lb {
    let lb = Lb::start(&node_config(base, etcd_url));
    let t = Instant::now();
    while admin(lb.addr("admin"), "GET", "/readyz", None, None)
        .await
        .0
        != 200
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "node not ready after its first sync"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lb
}

/// The backends `n` requests through `lb` reached, on one connection (so
/// one worker's rotation: see [`OneConnection`]).
pub(crate) async fn bodies(lb: &Lb, n: usize) -> Vec<String> {
    let mut c = OneConnection::open(lb.addr("web")).await;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        match c.get("/").await {
            Ok((200, body)) => v.push(body),
            other => v.push(format!("{other:?}")),
        }
    }
    v
}

/// Polls until some request through `lb` reaches `who` (or never does,
/// when `present` is false: then `n` requests in a row miss it). Returns
/// the time it took, or panics after `limit`.
pub(crate) async fn until_routes(lb: &Lb, who: &str, present: bool, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let seen = bodies(lb, if present { 2 } else { 8 }).await;
        let hit = seen.iter().any(|b| b == who);
        if hit == present {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "{}: {who} still {} after {limit:?} (last: {seen:?})",
            lb.addr("web"),
            if present { "not routed" } else { "routed" },
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
