//! TCP listeners: bytes both ways, one instance chosen per connection.
//!
//! A connect failure is reported to the core and the next instance is tried
//! (up to `retries`); a successful connect is a success whose latency is the
//! connect time, recorded when the connection closes so the connection count
//! covers its whole life.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use datapunk_lb_core::{FailureKind, InstanceId};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::http::ConnTracker;
use super::Routing;

/// Accepts connections until `stop` turns true; open connections are
/// tracked by `tracker` so a drain can wait for them (a TCP stream has no
/// graceful end, so it runs until either side closes or the drain times out).
pub async fn serve(
    listener: TcpListener,
    name: Arc<str>,
    routing: Arc<ArcSwap<Routing>>,
    mut stop: watch::Receiver<bool>,
    tracker: ConnTracker,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => break,
        };
        let (client, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(listener = &*name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let routing = routing.clone();
        let name = name.clone();
        let Some(permit) = tracker.enter() else {
            continue;
        };
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = proxy(client, &name, &routing).await {
                debug!(listener = &*name, %peer, error = %e, "tcp connection ended");
            }
        });
    }
}

async fn proxy(
    mut client: TcpStream,
    name: &str,
    routing: &ArcSwap<Routing>,
) -> std::io::Result<()> {
    let Some(up) = routing.load().tcp_upstream(name).cloned() else {
        return Ok(());
    };
    let mut tried: Vec<InstanceId> = Vec::new();
    for _ in 0..=up.retries {
        let Some(sel) = up.service.select(None) else {
            break;
        };
        if tried.contains(sel.instance().id()) {
            continue;
        }
        tried.push(sel.instance().id().clone());
        let addr = (sel.instance().address().to_owned(), sel.instance().port());
        let started = Instant::now();
        match tokio::time::timeout(up.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(mut upstream)) => {
                let connect_time = started.elapsed();
                let _ = upstream.set_nodelay(true);
                let r = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                up.metrics.report(sel.success(connect_time));
                return r.map(|_| ());
            }
            Ok(Err(_)) => up.metrics.report(sel.failure(FailureKind::Connect)),
            Err(_) => up.metrics.report(sel.failure(FailureKind::Timeout)),
        }
    }
    Ok(())
}
