//! Thread per core (the default of `run --threads N` for N > 1): [`Workers`], N threads each driving its own
//! single-threaded tokio runtime, and `bind`, which gives every worker its
//! own `SO_REUSEPORT` socket on a listener's address.
//!
//! ## Rule
//!
//! `datapunk-lb run --threads N` (N defaults to the available cores)
//! starts N workers when N > 1 (at N = 1 one single-threaded runtime
//! serves everything, unless `--thread-per-core`; `--shared-runtime`
//! chooses one multi-threaded runtime instead). Every proxy listener is bound N times
//! on the same address with `SO_REUSEPORT`, one socket per worker, and each
//! worker runs the accept loop of its own socket: the kernel spreads new
//! connections over the sockets (by a hash of the 4-tuple), and a client
//! connection is served, start to end, by the worker that accepted it, with
//! no work stealing — the model of NGINX workers and HAProxy threads with
//! `SO_REUSEPORT`. Shared across workers: the core registry (whose per-pick
//! path writes no service-wide line, see `datapunk_lb_core::selection`), the
//! routing table (one `ArcSwap` load per request) and each listener's
//! connection limit and accept-error state (one `ListenerGate` per
//! listener, so `max_connections` and the log rate count across workers).
//! Kept per worker: each instance's upstream connections (the pool's slot
//! for the worker, see `proxy::pool`), so a request, its client connection
//! and its upstream connection are all served on one thread. `current()`
//! tells code which worker it runs on.
//!
//! The control plane (the control task, admin server, health checks,
//! discovery, reloads, signals) runs off the workers, on a multi-threaded
//! runtime of its own with two threads (`datapunk-control`, started in
//! `main.rs`), the main thread waiting for signals on it. Two, not the one
//! it had: a long control operation (a reload applying 50,000 changed
//! instances takes ~100 ms) then leaves the other thread to the health
//! checks and the admin endpoint, so they are not held behind it, and the
//! threads sleep when there is no control work, taking nothing from the
//! workers (`docs/benchmarks.md`, "Threads, second pass").
//!
//! ## Why it is the default
//!
//! Measured against one multi-threaded runtime of the same N threads
//! (`docs/benchmarks.md`, "Threads (issue 12)"), thread per core was not
//! faster while upstream connections were pooled across threads: a request
//! on worker A often rode a connection whose I/O task lived on worker B,
//! two cross-thread wake-ups per request. With the pools kept per worker it
//! serves 1.4–1.55× the requests per second of the shared runtime at 2
//! threads, at 0.8–1.0× its CPU per request (two runs, medians of
//! interleaved rounds on a busy machine), so it is the default above one
//! thread. The shared runtime stays (`--shared-runtime`): work stealing
//! evens out uneven connections (a few long-lived client connections that
//! the kernel's hash put on one worker), which thread per core does not.
//!
//! ## Reload and drain
//!
//! Unchanged by the model: a new listener's N sockets are bound before the
//! old listener's loops are told to stop (so a reload that moves a listener
//! fails before anything changes if the address is taken by another
//! process), every loop holds the server's drain tracker, and stopping a
//! listener stops its N loops. `SO_REUSEPORT` also lets a listener be
//! rebound on its own address (a renamed listener) while the old sockets
//! still accept; the kernel only joins sockets of the same user.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Pending connections the kernel queues per socket (tokio's default for
/// `TcpListener::bind`).
const BACKLOG: u32 = 1024;

thread_local! {
    /// This thread's worker index; `None` off the workers.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The most workers one [`Workers`] has started in this process.
static MOST_STARTED: AtomicUsize = AtomicUsize::new(0);

/// The index (`0..N`) of the worker running on this thread; `None` on any
/// other thread (the multi-threaded runtime's, the control plane's). State
/// kept per worker (the upstream pools' idle lists) is looked up by it, so
/// a worker touches only its own.
pub(crate) fn current() -> Option<usize> {
    WORKER.with(Cell::get)
}

/// The most workers any [`Workers`] has started in this process (0 when
/// none has): per-worker state created after the start is sized by it.
pub(crate) fn most_started() -> usize {
    MOST_STARTED.load(Ordering::Relaxed)
}

/// This thread's slot among `n` per-worker slots: 0 off the workers (the
/// multi-threaded runtime's threads share it), `i + 1` for worker `i`
/// (modulo `n`, for state made before more workers started).
pub(crate) fn slot(n: usize) -> usize {
    current().map_or(0, |i| (i + 1) % n)
}

/// A value on cache lines of its own (two: the adjacent-line prefetcher
/// pairs them), so writes to a neighbour never invalidate it.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Aligned<T>(pub(crate) T);

impl<T> std::ops::Deref for Aligned<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// Copies of one value, one `Arc` per worker slot ([`slot`]), for values
/// the request path clones: an `Arc` shared by every worker has one
/// reference count that every request's clone and drop write from every
/// core; a worker's own copy has a count only that worker writes.
/// Dereferences to slot 0's copy (reading needs no copy of one's own).
#[derive(Debug)]
pub(crate) struct PerWorker<T> {
    copies: Box<[Arc<Aligned<T>>]>,
}

impl<T: Clone> PerWorker<T> {
    /// `1 +` [`most_started`] copies of `value`.
    pub(crate) fn new(value: T) -> Self {
        Self {
            copies: (0..1 + most_started())
                .map(|_| Arc::new(Aligned(value.clone())))
                .collect(),
        }
    }
}

impl<T> PerWorker<T> {
    /// This thread's copy.
    pub(crate) fn local(&self) -> &Arc<Aligned<T>> {
        &self.copies[slot(self.copies.len())]
    }
}

impl<T> std::ops::Deref for PerWorker<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.copies[0]
    }
}

/// N worker threads, each running a single-threaded tokio runtime until the
/// `Workers` is dropped.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    /// Dropping these ends the workers' runtimes.
    _stop: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `n` workers (at least one), named `datapunk-worker-{i}`.
    pub fn start(n: usize) -> io::Result<Workers> {
        let n = n.max(1);
        MOST_STARTED.fetch_max(n, Ordering::Relaxed);
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            thread::Builder::new()
                .name(format!("datapunk-worker-{i}"))
                .spawn(move || {
                    WORKER.set(Some(i));
                    // Runs the worker's tasks until `Workers` is dropped.
                    let _ = runtime.block_on(stopped);
                })?;
        }
        Ok(Workers {
            handles,
            _stop: stops,
        })
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (never: `start` makes at least one).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The workers' runtimes, in order.
    pub(crate) fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

/// One socket of a listener, and the worker runtime it is registered with
/// (`None`: the calling runtime).
pub(crate) type Socket = (Option<Handle>, TcpListener);

/// Binds `addr` once per worker with `SO_REUSEPORT` (the first socket
/// resolves port 0; the others bind the port it got), or once on the
/// calling runtime without workers. Each socket is registered with its
/// worker's reactor, so its accept loop must run there.
pub(crate) fn bind(addr: SocketAddr, workers: Option<&Workers>) -> io::Result<Vec<Socket>> {
    let Some(workers) = workers else {
        Handle::try_current().map_err(io::Error::other)?;
        return Ok(vec![(None, listen(addr, false)?)]);
    };
    let mut sockets = Vec::with_capacity(workers.len());
    let mut at = addr;
    for handle in workers.handles() {
        // `listen` registers the socket with the entered runtime's reactor.
        let _entered = handle.enter();
        let socket = listen(at, true)?;
        at = socket.local_addr()?;
        sockets.push((Some(handle.clone()), socket));
    }
    Ok(sockets)
}

/// A listening socket on `addr` (`SO_REUSEADDR` as `TcpListener::bind` sets
/// it; `SO_REUSEPORT` when `shared`).
fn listen(addr: SocketAddr, shared: bool) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    if shared {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn each_worker_accepts_on_its_own_socket_of_one_port() {
        let workers = Workers::start(2).unwrap();
        let sockets = bind("127.0.0.1:0".parse().unwrap(), Some(&workers)).unwrap();
        assert_eq!(sockets.len(), 2);
        let port = sockets[0].1.local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(sockets
            .iter()
            .all(|(_, s)| s.local_addr().unwrap().port() == port));
        // Each loop reports the name of the thread that accepted.
        let (tx, rx) = std::sync::mpsc::channel();
        for (handle, socket) in sockets {
            let tx = tx.clone();
            handle.unwrap().spawn(async move {
                while let Ok((mut s, _)) = socket.accept().await {
                    let name = thread::current().name().map(str::to_owned);
                    let _ = tx.send(name);
                    let _ = s.shutdown().await;
                }
            });
        }
        // Many connections from distinct source ports: the kernel's hash
        // spreads them, so both workers accept some (2^-63 odds otherwise).
        let mut names = std::collections::HashSet::new();
        for _ in 0..64 {
            let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let name = rx
                .recv_timeout(std::time::Duration::from_secs(5))
                .unwrap()
                .unwrap();
            assert!(name.starts_with("datapunk-worker-"), "{name}");
            names.insert(name);
        }
        assert_eq!(names.len(), 2, "both workers accepted: {names:?}");
    }

    #[test]
    fn a_taken_address_is_an_error_not_a_silent_share() {
        // A socket without SO_REUSEPORT (another program) keeps the port.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let workers = Workers::start(2).unwrap();
        let err = bind(taken.local_addr().unwrap(), Some(&workers)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
