//! The status page in a real headless Chromium, driven over WebDriver
//! (chromedriver): it lists every instance and shows a breaker opening
//! live, without a reload; its charts gain a point every second, the
//! breaker transition shows on the timeline, the service summary counts the
//! instance as ejected, and the search box narrows the table to the ids it
//! matches (searched on the server).
//!
//! Skipped (saying why) when chromium or chromedriver is missing, unless
//! `DATAPUNK_LB_REQUIRE_ALL=1`. With `DATAPUNK_LB_SCREENSHOT=1` it also
//! writes `docs/status.png`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};

use crate::support::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const INSTALL: &str = "chromium and chromium-driver";

/// The chromedriver child process and the throwaway Chromium profile;
/// dropping it kills chromedriver and removes the profile.
struct Driver {
    child: Child,
    addr: SocketAddr,
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// One headless Chromium session. Dropping it without [`Browser::close`]
/// (a failed test) still ends the session, so no Chromium outlives the test.
struct Browser {
    client: Client,
    session: Option<String>,
    // Dropped after `Browser::drop` has ended the session.
    driver: Driver,
}

impl Browser {
    async fn start(chromium: &Path, chromedriver: &Path) -> Browser {
        let profile = temp_path("chromium-profile");
        std::fs::create_dir_all(&profile).unwrap();
        let (child, addr) = spawn_chromedriver(chromedriver).await;
        let driver = Driver {
            child,
            addr,
            profile,
        };
        let mut caps = fantoccini::wd::Capabilities::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    format!("--user-data-dir={}", driver.profile.display()),
                ],
            }),
        );
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://{addr}"))
            .await
            .unwrap_or_else(|e| panic!("no Chromium session from chromedriver: {e}"));
        let session = client.session_id().await.unwrap();
        Browser {
            client,
            session,
            driver,
        }
    }

    /// Ends the session cleanly (Chromium exits).
    async fn close(mut self) {
        if self.session.take().is_some() {
            let _ = self.client.clone().close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Reached with a session only when the test failed, maybe with the
        // runtime gone: end the session with a blocking request of our own.
        if let Some(id) = self.session.take() {
            delete_session_blocking(self.driver.addr, &id);
        }
    }
}

/// Runs `chromedriver --port=N` on a free port; waits until it answers.
async fn spawn_chromedriver(chromedriver: &Path) -> (Child, SocketAddr) {
    for _ in 0..3 {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut child = Command::new(chromedriver)
            .arg(format!("--port={}", addr.port()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if child.try_wait().unwrap().is_some() {
                break; // port taken meanwhile, most likely: try another
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return (child, addr);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("chromedriver did not start");
}

fn delete_session_blocking(driver: SocketAddr, id: &str) {
    let Ok(mut s) = TcpStream::connect_timeout(&driver, Duration::from_secs(2)) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        s,
        "DELETE /session/{id} HTTP/1.1\r\nHost: {driver}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    // chromedriver answers once Chromium has quit (and may keep the
    // connection open): the response head is all we wait for.
    let (mut got, mut buf) = (Vec::new(), [0u8; 1024]);
    while let Ok(n @ 1..) = s.read(&mut buf) {
        got.extend_from_slice(&buf[..n]);
        if got.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
}

/// `(instance, breaker cell class)` of every row on the page, read in one
/// script call, so a redraw between reads cannot mix two polls.
async fn rows(c: &Client) -> Vec<(String, String)> {
    let v = c
        .execute(
            "return Array.from(document.querySelectorAll('tr[data-instance]'), r => {
               const b = r.querySelector('td.breaker');
               return [r.dataset.instance, b ? b.className : ''];
             });",
            vec![],
        )
        .await
        .unwrap();
    serde_json::from_value(v).unwrap()
}

/// Polls the page until `pred` holds for its rows; returns them and when.
async fn wait_rows(
    c: &Client,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let start = Instant::now();
    loop {
        let r = rows(c).await;
        if pred(&r) {
            return r;
        }
        assert!(
            start.elapsed() < timeout,
            "the page did not show {what} within {timeout:?}; it shows {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `probe` until it is `Ok`, for at most 3 s; the `Err` says what
/// the page showed instead.
async fn within<T, F>(what: &str, mut probe: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(shown) => assert!(
                start.elapsed() < Duration::from_secs(3),
                "the page did not show {what} within 3 s: {shown}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `(sequence number, value)` of the last point of a service's chart, and
/// how many points it draws.
async fn last_point(c: &Client, service: &str, chart: &str) -> (u64, Option<f64>, u64) {
    let v = c
        .execute(
            "const s = Array.from(document.querySelectorAll('section[data-service]'))
                 .find(e => e.dataset.service === arguments[0]);
             const g = s && s.querySelector('.tiles svg[data-chart=\"' + arguments[1] + '\"]');
             return g ? [Number(g.dataset.seq), g.dataset.last === '' ? null : Number(g.dataset.last),
                         Number(g.dataset.points)]
                      : [0, null, 0];",
            vec![json!(service), json!(chart)],
        )
        .await
        .unwrap();
    (
        v[0].as_u64().unwrap_or(0),
        v[1].as_f64(),
        v[2].as_u64().unwrap_or(0),
    )
}

/// `"<kind> <from> <to>"` of every timeline entry of `instance`.
async fn timeline(c: &Client, instance: &str) -> Vec<String> {
    let v = c
        .execute(
            "return Array.from(document.querySelectorAll('#timeline li'))
                 .filter(li => li.dataset.instance === arguments[0])
                 .map(li => [li.dataset.kind, li.dataset.from, li.dataset.to].join(' '));",
            vec![json!(instance)],
        )
        .await
        .unwrap();
    serde_json::from_value(v).unwrap()
}

/// The service summary: instances by state, and how many the table shows
/// of how many match.
async fn summary(c: &Client, service: &str) -> Value {
    c.execute(
        "const s = Array.from(document.querySelectorAll('section[data-service]'))
             .find(e => e.dataset.service === arguments[0]);
         if (!s) return null;
         const out = {};
         for (const e of s.querySelectorAll('.counts [data-state]')) out[e.dataset.state] = Number(e.dataset.n);
         const shown = s.querySelector('.counts .shown');
         out.shown = shown ? Number(shown.dataset.shown) : null;
         out.matched = shown ? Number(shown.dataset.matched) : null;
         return out;",
        vec![json!(service)],
    )
    .await
    .unwrap()
}

fn breaker<'a>(rows: &'a [(String, String)], id: &str) -> Option<&'a str> {
    rows.iter()
        .find(|(i, _)| i == id)
        .map(|(_, class)| class.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_a_breaker_opening_live() {
    let Some(chromedriver) = require("chromedriver", CHROMEDRIVER, INSTALL) else {
        return;
    };
    let Some(chromium) = require("chromium", CHROMIUM, INSTALL) else {
        return;
    };
    let t0 = Instant::now();
    let ids = ["api-1", "api-2", "api-3"];
    let backends = [
        Backend::start(ids[0]).await,
        Backend::start(ids[1]).await,
        Backend::start(ids[2]).await,
    ];
    let lb = Lb::start(&http_config(
        "",
        &[&backends[0], &backends[1], &backends[2]],
        &[2, 1, 1],
    ));
    let (web, admin) = (lb.addr("web"), lb.addr("admin"));

    let browser = Browser::start(&chromium, &chromedriver).await;
    let c = browser.client.clone();
    c.set_window_size(1180, 400).await.unwrap();
    c.goto(&format!("http://{admin}/status")).await.unwrap();
    assert_eq!(c.title().await.unwrap(), "datapunk-lb status");

    let all_closed = wait_rows(&c, "three closed breakers", Duration::from_secs(10), |r| {
        r.len() == 3 && r.iter().all(|(_, class)| class == "breaker closed")
    })
    .await;
    let mut listed: Vec<&str> = all_closed.iter().map(|(i, _)| i.as_str()).collect();
    listed.sort_unstable();
    assert_eq!(listed, ids);

    // Traffic, so passive health sees the dead instance at once.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let _ = get(&c, web, "/").await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Let the page draw a few rates before the kill.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The service's requests/s chart gains a new last point, with traffic.
    let (seq0, _, _) = last_point(&c, "api", "rps").await;
    let moved = Instant::now();
    let (seq1, last) = within("the rps chart's last point to move", || async {
        let (seq, last, points) = last_point(&c, "api", "rps").await;
        if seq > seq0 && last.is_some_and(|v| v > 0.0) {
            // The service has a point for every sample since the start: the
            // page's incremental reads neither lost nor repeated one.
            assert_eq!(points, seq, "points drawn vs samples taken");
            Ok((seq, last))
        } else {
            Err(format!("seq {seq0} -> {seq}, last {last:?}"))
        }
    })
    .await;
    eprintln!(
        "rps chart: point {seq0} -> {seq1} ({last:?}/s) after {:?}",
        moved.elapsed()
    );
    // Marks this document: a reload would lose it.
    c.execute("window.datapunkNoReload = 1;", vec![])
        .await
        .unwrap();
    let victim = ids[2];
    backends[2].kill().await;
    let killed = Instant::now();
    let shown = wait_rows(
        &c,
        "the killed instance's breaker open",
        Duration::from_secs(3),
        |r| breaker(r, victim) == Some("breaker open"),
    )
    .await;
    let seen_after = killed.elapsed();
    eprintln!("breaker shown open {seen_after:?} after the kill");
    assert!(seen_after <= Duration::from_secs(3), "{seen_after:?}");
    for id in &ids[..2] {
        assert_eq!(breaker(&shown, id), Some("breaker closed"), "{shown:?}");
    }
    within(
        "the summary counting the dead instance as ejected",
        || async {
            let s = summary(&c, "api").await;
            let n = |k: &str| s[k].as_u64().unwrap_or(u64::MAX);
            if n("ejected") == 1 && n("healthy") + n("slow_start") == 2 && n("shown") == 3 {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    let same_document = c
        .execute("return window.datapunkNoReload === 1;", vec![])
        .await
        .unwrap();
    assert_eq!(same_document, Value::Bool(true), "the page was reloaded");
    within("the breaker transition on the timeline", || async {
        let moves = timeline(&c, victim).await;
        if moves.iter().any(|m| m == "breaker closed open") {
            Ok(())
        } else {
            Err(format!("{victim}'s changes: {moves:?}"))
        }
    })
    .await;
    eprintln!(
        "transition on the timeline {:?} after the kill",
        killed.elapsed()
    );

    if std::env::var("DATAPUNK_LB_SCREENSHOT").as_deref() == Ok("1") {
        // A picture worth looking at: a minute of history with a slow
        // instance and the dead one coming back.
        tokio::time::sleep(Duration::from_secs(20)).await;
        backends[0].set_delay(Duration::from_millis(40));
        tokio::time::sleep(Duration::from_secs(15)).await;
        backends[2].restart().await;
        backends[0].set_delay(Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(25)).await;
        // Fit the window to the page, so the picture has no scroll bar.
        let fit = c
            .execute(
                "return window.outerHeight - window.innerHeight
                        + document.documentElement.scrollHeight;",
                vec![],
            )
            .await
            .unwrap();
        c.set_window_size(1180, fit.as_u64().unwrap() as u32)
            .await
            .unwrap();
        let png = c.screenshot().await.unwrap();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/status.png");
        std::fs::write(&path, png).unwrap();
        eprintln!("wrote {}", path.display());
    }

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();

    // Zones (like addresses and tags) are text from the admin API or
    // discovery: the page must show them, not run them. (Ids are limited to
    // a safe character set since issue 9, so markup goes in the zone.)
    let hostile = "hostile";
    let req = hyper::Request::put(format!(
        "http://{admin}/v1/services/api/instances/{hostile}"
    ))
    .header("content-type", "application/json")
    .body(http_body_util::Full::new(bytes::Bytes::from(
        r#"{"address": "127.0.0.1", "port": 9, "zone": "<img src=x onerror=\"window.datapunkPwned=1\"><b>z</b>"}"#,
    )))
    .unwrap();
    let status = client().request(req).await.unwrap().status();
    assert!(status.is_success(), "{status}");
    wait_rows(&c, "the hostile id as text", Duration::from_secs(3), |r| {
        breaker(r, hostile).is_some()
    })
    .await;
    let injected = c
        .execute(
            "return [window.datapunkPwned === undefined,
                     document.querySelectorAll('#services img, #services b').length];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        injected,
        json!([true, 0]),
        "markup from the data was rendered"
    );
    let anywhere = c
        .execute("return document.querySelectorAll('img, b').length;", vec![])
        .await
        .unwrap();
    assert_eq!(anywhere, json!(0), "markup rendered outside #services");

    // The search box: typed text goes to the server as an id prefix, the
    // table shows only what matches, the summary still counts all.
    let search = c.find(fantoccini::Locator::Css("#search")).await.unwrap();
    search.send_keys("api-2").await.unwrap();
    wait_rows(&c, "only the searched id", Duration::from_secs(3), |r| {
        r.len() == 1 && r[0].0 == "api-2"
    })
    .await;
    let s = summary(&c, "api").await;
    assert_eq!(
        (s["matched"].as_u64(), s["shown"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
    let all: u64 = ["healthy", "slow_start", "half_open", "ejected", "draining"]
        .iter()
        .map(|k| s[*k].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(all, 4, "the summary counts every instance: {s}");
    c.execute(
        "const s = document.getElementById('search'); s.value = '';
         s.dispatchEvent(new Event('input'));",
        vec![],
    )
    .await
    .unwrap();
    wait_rows(&c, "every instance again", Duration::from_secs(3), |r| {
        r.len() == 4
    })
    .await;
    browser.close().await;
    eprintln!("status page test took {:?}", t0.elapsed());
}
