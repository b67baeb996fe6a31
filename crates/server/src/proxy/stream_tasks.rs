//! HTTP/2 stream futures run inside their connection's task instead of as
//! tokio tasks of their own.
//!
//! hyper hands each HTTP/2 stream's future to the executor it was built
//! with: the server one per request (the request's whole exchange, its
//! response body included), the client one per request sent (the wait for
//! the response, and the pipe of a streamed request body). Spawned on tokio,
//! each is a task: an allocation, a lock of the runtime's task list when it
//! is spawned and again when it ends, the task state machine's atomic
//! transitions at every poll, and a trip through the run queue at every
//! wake-up: two tasks per request (three with hyper's client connection
//! driver per upstream connection). In the h2c in-and-out bench tokio was
//! 15.7 % of the proxy's CPU (`tokio::spawn` alone 4.9 %) before, 6.9 %
//! after, and the CPU per request fell by 0.84× over both sides ("Fourth
//! pass" in docs/benchmarks.md).
//!
//! The upstream HTTP/2 client (`h2_upstream.rs`) no longer goes through
//! hyper: its requests wait for their responses in their own tasks, and
//! only a streamed request body's pipe runs here, next to its connection.
//!
//! Here a [`StreamTasks`] executor queues each future for the connection it
//! belongs to (one executor per connection), and [`WithStreams`] runs the
//! connection and its queued streams in the connection's one task: each
//! poll runs the woken streams first (so what they queued for the
//! connection is written by the connection poll that follows), then the
//! connection, then any streams that poll opened, and so on until nothing
//! new was opened. A stream's wake-up wakes the connection's task
//! ([`FuturesUnordered`] polls only the woken ones).
//!
//! **Rule**: [`WithStreams`] ends when the connection has ended *and* every
//! stream has: a stream outlives its connection as a spawned task did (an
//! HTTP/2 connection ends only after its streams are closed anyway; after
//! an I/O error the streams see their own error). Dropping it (the
//! connection's watchdog giving up on a client) drops its streams, which
//! cancels their upstream requests: the client is gone.
//!
//! **Fairness**: one connection's streams share its task, as HAProxy and
//! NGINX run each connection's streams on one thread (with
//! `--shared-runtime` too: one HTTP/2 connection's streams no longer spread
//! over its worker threads; thread per core, the default, kept a
//! connection on its worker anyway). After
//! [`MAX_ROUNDS`] rounds without pause the task yields (wakes itself and
//! returns), so one busy connection does not hold its worker.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

/// A queued stream future.
type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Rounds (streams, then the connection) in one poll before the task
/// yields to its worker's other tasks.
pub(crate) const MAX_ROUNDS: usize = 16;

/// The executor of one connection: queues each stream future for the
/// [`WithStreams`] that runs the connection.
#[derive(Clone, Default)]
pub(crate) struct StreamTasks {
    shared: Arc<Shared>,
}

/// Lock-free but for the queue itself, so that a poll that opens no stream
/// pays a few atomic loads and stores. (Client HTTP/1.1 connections no
/// longer run under [`WithStreams`]: the listener picks HTTP/2 from the
/// preface, `http.rs`.)
#[derive(Default)]
struct Shared {
    /// Opened and not yet taken by the runner.
    opened: Mutex<Vec<StreamFuture>>,
    /// `opened` may be non-empty.
    any_opened: AtomicBool,
    /// The runner is inside its poll and looks at the queue before it
    /// returns: no wake-up needed.
    polling: AtomicBool,
    /// The runner's task, to wake for a stream opened outside its poll.
    waker: AtomicWaker,
}

impl std::fmt::Debug for StreamTasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTasks").finish_non_exhaustive()
    }
}

impl<F> hyper::rt::Executor<F> for StreamTasks
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let shared = &*self.shared;
        shared.opened.lock().push(Box::pin(fut));
        // SeqCst pairs with `finish`: either the runner sees this stream
        // or this sees the runner gone and wakes it.
        shared.any_opened.store(true, SeqCst);
        if !shared.polling.load(SeqCst) {
            shared.waker.wake();
        }
    }
}

/// A connection future and the streams its executor was given, run as one
/// future (module doc).
pub(crate) struct WithStreams<C: Future> {
    /// Dropped as soon as it ends: hyper's HTTP/2 client (no longer ours
    /// upstream, kept as the rule) ran the connection itself as one of the
    /// "streams" and closed it only when the dispatcher (`conn` there) was
    /// gone.
    conn: Option<Pin<Box<C>>>,
    /// The connection's output, once it ended.
    ended: Option<C::Output>,
    tasks: StreamTasks,
    streams: FuturesUnordered<StreamFuture>,
}

impl<C: Future> WithStreams<C> {
    /// Runs `conn` and the streams it hands to `tasks` (the executor it was
    /// built with).
    pub(crate) fn new(conn: C, tasks: StreamTasks) -> Self {
        Self {
            conn: Some(Box::pin(conn)),
            ended: None,
            tasks,
            streams: FuturesUnordered::new(),
        }
    }

    /// The connection while it runs, e.g. for a graceful shutdown.
    pub(crate) fn conn(&mut self) -> Option<Pin<&mut C>> {
        self.conn.as_mut().map(Pin::as_mut)
    }

    /// Moves the streams opened since the last look into the running set,
    /// inside a poll; whether there were any.
    fn take_opened(&mut self) -> bool {
        let shared = &*self.tasks.shared;
        if !shared.any_opened.load(SeqCst) {
            return false;
        }
        let mut opened = shared.opened.lock();
        shared.any_opened.store(false, SeqCst);
        self.streams.extend(opened.drain(..));
        true
    }

    /// Ends a poll: `false` when nothing was opened meanwhile (streams
    /// opened from now on wake the task), else takes them (`true`: poll
    /// on).
    fn finish(&mut self) -> bool {
        self.tasks.shared.polling.store(false, SeqCst);
        if self.take_opened() {
            self.tasks.shared.polling.store(true, SeqCst);
            return true;
        }
        false
    }
}

impl<C: Future> Unpin for WithStreams<C> {}

impl<C: Future> Future for WithStreams<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = &mut *self;
        this.tasks.shared.waker.register(cx.waker());
        this.tasks.shared.polling.store(true, SeqCst);
        this.take_opened();
        for _ in 0..MAX_ROUNDS {
            // The woken streams first: what they queued for the connection
            // (a response, a request) goes out with the connection's poll.
            if !this.streams.is_empty() {
                while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {}
            }
            if let Some(conn) = &mut this.conn {
                if let Poll::Ready(out) = conn.as_mut().poll(cx) {
                    this.ended = Some(out);
                    this.conn = None;
                }
            }
            if this.take_opened() || this.finish() {
                continue;
            }
            if this.streams.is_empty() {
                if let Some(out) = this.ended.take() {
                    return Poll::Ready(out);
                }
            }
            return Poll::Pending;
        }
        // Busy: let the worker's other tasks run, then carry on (what was
        // opened meanwhile is polled then).
        this.take_opened();
        this.tasks.shared.polling.store(false, SeqCst);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper::rt::Executor;
    use tokio::sync::oneshot;

    use super::*;

    #[tokio::test]
    async fn streams_opened_during_the_connection_poll_run_and_are_waited_for() {
        let tasks = StreamTasks::default();
        let ran = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = oneshot::channel::<()>();
        let exec = tasks.clone();
        let counter = ran.clone();
        // A "connection" that opens one stream and ends at once; the stream
        // waits for `rx`, so the whole must wait for it.
        let conn = async move {
            exec.execute(async move {
                let _ = rx.await;
                counter.fetch_add(1, Ordering::SeqCst);
            });
            "conn done"
        };
        let mut run = tokio::spawn(WithStreams::new(conn, tasks));
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert!(
            futures_util::FutureExt::now_or_never(&mut run).is_none(),
            "a stream still runs: not done"
        );
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        tx.send(()).unwrap();
        let out = tokio::time::timeout(std::time::Duration::from_secs(5), run)
            .await
            .expect("done once its stream is");
        assert_eq!(out.unwrap(), "conn done");
        assert_eq!(ran.load(Ordering::SeqCst), 1, "the stream ran to its end");
    }

    #[tokio::test]
    async fn the_connection_is_dropped_when_it_ends_though_streams_run_on() {
        // Ends at once but holds `_gone` until dropped, as hyper's HTTP/2
        // client dispatcher holds what tells its connection to close.
        struct EndsHolding {
            _held: oneshot::Sender<()>,
        }
        impl Future for EndsHolding {
            type Output = ();
            fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
                Poll::Ready(())
            }
        }
        let tasks = StreamTasks::default();
        let (gone_tx, gone_rx) = oneshot::channel::<()>();
        // The "connection" stream: runs until the dispatcher is dropped.
        tasks.execute(async move {
            let _ = gone_rx.await;
        });
        let run = WithStreams::new(EndsHolding { _held: gone_tx }, tasks);
        tokio::time::timeout(std::time::Duration::from_secs(5), run)
            .await
            .expect("the ended connection was dropped, so its stream ended too");
    }

    #[tokio::test]
    async fn a_stream_opened_from_outside_the_poll_wakes_the_runner() {
        let tasks = StreamTasks::default();
        let (open_tx, open_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let exec = tasks.clone();
        // The connection stays open until told; a stream is queued by
        // another task meanwhile and must run without the connection waking.
        let (end_tx, end_rx) = oneshot::channel::<()>();
        let run = tokio::spawn(WithStreams::new(
            async move {
                let _ = end_rx.await;
            },
            tasks,
        ));
        tokio::spawn(async move {
            let _ = open_rx.await;
            exec.execute(async move {
                let _ = done_tx.send(());
            });
        });
        tokio::task::yield_now().await;
        open_tx.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), done_rx)
            .await
            .expect("the queued stream ran")
            .unwrap();
        end_tx.send(()).unwrap();
        run.await.unwrap();
    }

    #[tokio::test]
    async fn a_busy_connection_yields_to_other_tasks() {
        // A connection that opens a stream at every poll and never ends.
        struct Busy(StreamTasks);
        impl Future for Busy {
            type Output = ();
            fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
                self.0.execute(async {});
                Poll::Pending
            }
        }
        let tasks = StreamTasks::default();
        let busy = tokio::spawn(WithStreams::new(Busy(tasks.clone()), tasks));
        // On this current-thread runtime the other task runs only if the
        // busy one yields.
        let other = tokio::spawn(async { 7 });
        assert_eq!(
            tokio::time::timeout(std::time::Duration::from_secs(5), other)
                .await
                .expect("the other task ran")
                .unwrap(),
            7
        );
        busy.abort();
    }
}
