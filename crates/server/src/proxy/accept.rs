//! The one accept loop of every proxy listener, HTTP and TCP alike: accept,
//! register the connection with the drain tracker, hand it to the
//! protocol's handler; stop when the listener's stop signal turns.
//!
//! ## Accept errors: logged at most once a second, backed off, resumed
//!
//! An accept error is almost always the process (EMFILE) or the system
//! (ENFILE) out of file descriptors, or out of memory for sockets. The
//! pending connection stays in the kernel's backlog and the listener stays
//! readable, so retrying at once fails again at once: a hot loop that burns
//! a core and floods the log exactly when the operator needs both. So:
//!
//! - **Count.** Every error counts in
//!   `datapunk_lb_accept_errors_total{listener}`.
//! - **Log rate.** One `accept failed` line per listener per second at most
//!   ([`LOG_INTERVAL`]), with `suppressed`: the errors not logged since the
//!   previous line. When accepting works again, one `accepting again` line
//!   (under the same limit) reports the errors suppressed since.
//! - **Backoff.** After an error the loop waits [`MIN_BACKOFF`], doubling
//!   while errors continue up to [`MAX_BACKOFF`], and back to the minimum on
//!   the next accepted connection. The stop signal ends the wait.
//! - **Resume.** Nothing is given up: once descriptors free up the next
//!   accept takes the connections waiting in the backlog.
//!
//! The decision is [`AcceptErrors`], plain state fed with `now`, so the rule
//! is tested without sleeping.
//!
//! ## The listener connection limit
//!
//! Each listener holds at most `max_connections` client connections
//! (default 100,000; `[[listener]] max_connections`). A connection accepted
//! above it is closed at once, before any byte is read: it costs one
//! accept and one close, and takes nothing from the connections already
//! accepted, each served by its own task. Closing rather than answering 503
//! keeps the refusal as cheap as the limit is meant to make overload: a 503
//! would need the request head read first, which is the work a flood of
//! connections (slowloris) makes expensive. Refusals are logged at most once
//! a second per listener, with the count since the last line.
//!
//! A listener served by several accept loops (one per worker thread, see
//! `crate::workers`) counts its connections once, across them: the server
//! hands every loop of the listener the same [`ListenerGate`] through the
//! drain tracker ([`ConnTracker::for_listener`]): one semaphore, one
//! refusal log, one accept-error log and backoff, so the limits above hold
//! per listener however many threads accept for it.
//!
//! Why 100,000: far above what one instance of the proxy serves in ordinary
//! use (each connection needs a descriptor, and the drain tracker counts up
//! to a million), yet low enough that a connection flood meets the limit
//! before the process runs out of descriptors or memory (a hyper connection
//! with its buffers is tens of KiB: 100,000 idle ones are a few GiB). The
//! per-upstream-instance limit is separate: `service.max_connections`,
//! enforced by the [attempt loop](super::attempt) per request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

/// At most one accept-error line per listener per this long.
pub(crate) const LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Wait after the first accept error of a run.
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(10);
/// Longest wait between accepts while errors continue.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// An accepted connection's place: in the drain tracker and under the
/// listener's limit. Hold it until the connection closes.
#[derive(Debug)]
pub(crate) struct ConnPermit {
    _drain: OwnedSemaphorePermit,
    _limit: OwnedSemaphorePermit,
}

/// The connection limit of one listener.
#[derive(Debug)]
pub(crate) struct Limit {
    permits: Arc<Semaphore>,
    /// Refusals since the last log line, and when that was.
    refusals: Mutex<(u64, Option<Instant>)>,
}

impl Limit {
    /// At most `max` open connections.
    pub(crate) fn new(max: u32) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max as usize)),
            refusals: Mutex::new((0, None)),
        }
    }

    /// A place under the limit, or `None` (counted for the log).
    fn enter(&self, name: &str) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            return Some(p);
        }
        let now = Instant::now();
        let mut refusals = self.refusals.lock();
        let (refused, last_line) = &mut *refusals;
        *refused += 1;
        if last_line.is_none_or(|t| now.saturating_duration_since(t) >= LOG_INTERVAL) {
            *last_line = Some(now);
            warn!(
                listener = name,
                refused = std::mem::take(refused),
                "connection limit reached: new connections closed"
            );
        }
        None
    }
}

/// What the accept loops of one listener share (one loop per worker
/// thread): the connection limit, and the accept-error state, so the log
/// and the backoff are the listener's, not each loop's.
#[derive(Debug)]
pub(crate) struct ListenerGate {
    limit: Limit,
    errors: Mutex<AcceptErrors>,
    /// `errors.pending()`, readable without the lock on every accept.
    errors_pending: AtomicBool,
}

impl ListenerGate {
    fn new(limit: Limit) -> Self {
        Self {
            limit,
            errors: Mutex::new(AcceptErrors::default()),
            errors_pending: AtomicBool::new(false),
        }
    }
}

/// Accepts connections on `listener` (named `name` in logs) until `stop`
/// turns true or its sender goes away. Each accepted connection gets
/// TCP_NODELAY, a permit of `tracker` (so a drain can wait for it) and one
/// of `limit`, then goes to `handle`, which must not block (it spawns).
/// Once the drain has begun, or above the limit, a new connection is closed
/// at once. Accept errors count in `errors_total`.
pub(crate) async fn serve(
    listener: TcpListener,
    name: &str,
    mut stop: watch::Receiver<bool>,
    tracker: ConnTracker,
    limit: Limit,
    errors_total: Counter,
    mut handle: impl FnMut(TcpStream, SocketAddr, ConnPermit),
) {
    // The listener's loops share one gate; a lone loop gets its own.
    let gate = match &tracker.listener {
        Some(gate) => gate.clone(),
        None => Arc::new(ListenerGate::new(limit)),
    };
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Only after errors: no clock read or lock per connection
                // otherwise.
                if gate.errors_pending.load(Ordering::Relaxed) {
                    let mut errors = gate.errors.lock();
                    if let Some(suppressed) = errors.accepted(Instant::now()) {
                        info!(listener = name, suppressed, "accepting again");
                    }
                    gate.errors_pending
                        .store(errors.pending(), Ordering::Relaxed);
                }
                let Some(drain) = tracker.enter() else {
                    continue;
                };
                // Dropping the stream closes it: nothing read, nothing owed.
                let Some(limit) = gate.limit.enter(name) else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let permit = ConnPermit {
                    _drain: drain,
                    _limit: limit,
                };
                handle(stream, peer, permit);
            }
            Err(e) => {
                errors_total.inc();
                let (log, pause) = {
                    let mut errors = gate.errors.lock();
                    let decision = errors.failed(Instant::now());
                    gate.errors_pending.store(true, Ordering::Relaxed);
                    decision
                };
                if let Some(suppressed) = log {
                    warn!(
                        listener = name,
                        error = %e,
                        suppressed,
                        backoff_ms = pause.as_millis() as u64,
                        "accept failed"
                    );
                }
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }
}

/// The log-rate and backoff state of one accept loop.
#[derive(Debug)]
pub(crate) struct AcceptErrors {
    /// When the last line (error or recovery) was logged.
    last_line: Option<Instant>,
    /// Errors since the last line that were not logged.
    suppressed: u64,
    /// Errors happened and no recovery line was logged since.
    unresolved: bool,
    /// The wait after the next error.
    backoff: Duration,
}

impl Default for AcceptErrors {
    fn default() -> Self {
        Self {
            last_line: None,
            suppressed: 0,
            unresolved: false,
            backoff: MIN_BACKOFF,
        }
    }
}

impl AcceptErrors {
    /// An accept failed at `now`: whether to log it (with the count of
    /// errors suppressed since the last line) and how long to wait before
    /// accepting again.
    pub(crate) fn failed(&mut self, now: Instant) -> (Option<u64>, Duration) {
        self.unresolved = true;
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        if self.may_log(now) {
            (Some(self.line(now)), pause)
        } else {
            self.suppressed += 1;
            (None, pause)
        }
    }

    /// A connection was accepted at `now`: the backoff starts over, and
    /// after errors, `Some(suppressed)` asks for the recovery line once the
    /// log interval allows it.
    pub(crate) fn accepted(&mut self, now: Instant) -> Option<u64> {
        self.backoff = MIN_BACKOFF;
        if !self.unresolved || !self.may_log(now) {
            return None;
        }
        self.unresolved = false;
        Some(self.line(now))
    }

    /// Whether an accepted connection has anything to reset or report:
    /// errors happened since the last recovery, or the backoff grew.
    pub(crate) fn pending(&self) -> bool {
        self.unresolved || self.backoff != MIN_BACKOFF
    }

    fn may_log(&self, now: Instant) -> bool {
        self.last_line
            .is_none_or(|t| now.saturating_duration_since(t) >= LOG_INTERVAL)
    }

    /// A line is logged at `now`: returns the suppressed count it reports.
    fn line(&mut self, now: Instant) -> u64 {
        self.last_line = Some(now);
        std::mem::take(&mut self.suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn errors_are_logged_at_most_once_a_second_with_the_suppressed_count() {
        let mut e = AcceptErrors::default();
        let t0 = Instant::now();
        // An error every 10 ms for 2.5 s: lines at 0, 1 s and 2 s only.
        let logged: Vec<(u64, u64)> = (0..250u64)
            .filter_map(|i| e.failed(t0 + ms(i * 10)).0.map(|s| (i * 10, s)))
            .collect();
        assert_eq!(logged, [(0, 0), (1000, 99), (2000, 99)]);
    }

    #[test]
    fn backoff_doubles_to_a_second_and_starts_over_on_success() {
        let mut e = AcceptErrors::default();
        let t0 = Instant::now();
        let pauses: Vec<u128> = (0..9).map(|_| e.failed(t0).1.as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        let _ = e.accepted(t0);
        assert_eq!(e.failed(t0).1, MIN_BACKOFF);
    }

    #[test]
    fn a_listener_accepted_by_two_workers_holds_its_limit_across_them() {
        use crate::workers::{bind, Workers};
        let workers = Workers::start(2).unwrap();
        let sockets = bind("127.0.0.1:0".parse().unwrap(), Some(&workers)).unwrap();
        let addr = sockets[0].1.local_addr().unwrap();
        let tracker = ConnTracker::default().for_listener(2);
        let held = Arc::new(Mutex::new(Vec::new()));
        let (_stop, stop_rx) = watch::channel(false);
        for (runtime, socket) in sockets {
            let (held, tracker, stop_rx) = (held.clone(), tracker.clone(), stop_rx.clone());
            runtime.unwrap().spawn(async move {
                // Each loop's own limit would admit 2 more: it must not count.
                let own = Limit::new(2);
                serve(
                    socket,
                    "t",
                    stop_rx,
                    tracker,
                    own,
                    Counter::default(),
                    |s, _, p| {
                        held.lock().push((s, p));
                    },
                )
                .await;
            });
        }
        // 16 connections from distinct ports: both sockets get some (the
        // kernel hashes the 4-tuple), so per-loop limits would hold 3 or 4.
        let clients: Vec<_> = (0..16)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        // Every connection is either held or closed by the server (EOF).
        let mut closed = 0;
        for mut c in clients {
            use std::io::Read;
            c.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            if matches!(c.read(&mut [0u8; 1]), Ok(0)) {
                closed += 1;
            }
        }
        assert_eq!(held.lock().len(), 2, "held across both workers");
        assert_eq!(closed, 14, "the rest closed at once");
    }

    #[test]
    fn recovery_is_logged_once_under_the_same_limit() {
        let mut e = AcceptErrors::default();
        let t0 = Instant::now();
        assert_eq!(e.accepted(t0), None, "no errors, no recovery line");
        assert_eq!(e.failed(t0).0, Some(0));
        assert_eq!(e.failed(t0 + ms(100)).0, None);
        assert_eq!(e.failed(t0 + ms(200)).0, None);
        // Descriptors flap free and exhausted: no line within the second.
        assert_eq!(e.accepted(t0 + ms(300)), None);
        assert_eq!(e.failed(t0 + ms(400)).0, None);
        // The interval has passed: one recovery line with every error since.
        assert_eq!(e.accepted(t0 + ms(1000)), Some(3));
        assert_eq!(e.accepted(t0 + ms(3000)), None);
        assert_eq!(e.failed(t0 + ms(3000)).0, Some(0));
    }
}

/// Tracks open client connections for a drain: each holds a permit, and
/// the drain flag asks them to finish.
#[derive(Debug, Clone)]
pub(crate) struct ConnTracker {
    permits: Arc<tokio::sync::Semaphore>,
    drain: watch::Sender<bool>,
    /// The gate of the listener this copy was made for, shared by all its
    /// accept loops; `None`: each loop makes its own.
    listener: Option<Arc<ListenerGate>>,
}

/// Connections tracked at most (a drain acquires all permits).
const MAX_TRACKED: u32 = 1 << 20;

impl Default for ConnTracker {
    fn default() -> Self {
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_TRACKED as usize)),
            drain: watch::channel(false).0,
            listener: None,
        }
    }
}

impl ConnTracker {
    /// This tracker, for the accept loops of one listener holding at most
    /// `max_connections` connections across all of them.
    pub(crate) fn for_listener(&self, max_connections: u32) -> Self {
        Self {
            listener: Some(Arc::new(ListenerGate::new(Limit::new(max_connections)))),
            ..self.clone()
        }
    }

    /// Registers a connection; `None` once draining.
    pub(crate) fn enter(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if *self.drain.borrow() {
            return None;
        }
        self.permits.clone().try_acquire_owned().ok()
    }

    /// A receiver that turns true when the drain begins.
    pub(crate) fn draining(&self) -> watch::Receiver<bool> {
        self.drain.subscribe()
    }

    /// Starts the drain and waits until every tracked connection closed.
    pub(crate) async fn drain(&self) {
        let _ = self.drain.send(true);
        let _ = self.permits.acquire_many(MAX_TRACKED).await;
    }
}
