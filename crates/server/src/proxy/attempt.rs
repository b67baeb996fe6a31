//! The one attempt loop of HTTP and TCP: select, attempt, classify once,
//! decide once, report once.
//!
//! ## The loop
//!
//! 1. **Select inside the core** with `Service::select_within` (keyed by
//!    the request's `hash_key`, if the service has one), accepting an
//!    instance this request has not tried yet and that is under the
//!    service's `max_connections`. The limit is the core's `max_active`,
//!    checked on the instance's hot line; the "not tried" filter is given
//!    only on a retry, so a first attempt reads no member. None accepted →
//!    the request ends: counted as `over_limit` when some untried instance
//!    was refused for its limit, else as `no_instance` (HTTP answers 503;
//!    TCP closes the connection at once).
//! 2. **Attempt** through the protocol's [`Step`]: HTTP sends the request
//!    and awaits the response headers (under `request_timeout`, one deadline
//!    over all attempts, and `per_try_timeout` per attempt when set, so that
//!    a stalled instance leaves time to try another); TCP connects (under
//!    `connect_timeout`).
//! 3. **Classify** the attempt once, into a [`Class`]:
//!
//!    | class | when | reported to the core | retried when |
//!    | --- | --- | --- | --- |
//!    | `Success` | HTTP: headers with a status below 500; TCP: connected | success, latency = time to headers / to connect | never |
//!    | `ConnectFailed` | no connection (HTTP: its connect timeout too) | `Connect` | the request is replayable |
//!    | `ConnectTimedOut` | TCP: `connect_timeout` passed | `Timeout` | the request is replayable |
//!    | `Reset` | HTTP: the connection failed after the request went out | `Reset` | idempotent and replayable |
//!    | `Stale` | HTTP/1.1: a reused keep-alive connection the instance closed or reset before any byte of a response (its idle close racing the request); HTTP/2: a stream it refused unprocessed; either way not sent again within the attempt (`pool.rs`) | nothing: not the instance's failure | idempotent and replayable |
//!    | `TryTimedOut` | HTTP: `per_try_timeout` passed, `request_timeout` not yet | `Timeout` | idempotent and replayable |
//!    | `DeadlineExceeded` | HTTP: `request_timeout` passed | `Timeout` | never: no time is left |
//!    | `ServerError` | HTTP: a 5xx | `ServerError` | 502, 503 or 504, idempotent and replayable |
//!
//!    Idempotent: GET, HEAD, OPTIONS, TRACE, PUT, DELETE. Replayable: an
//!    HTTP body that was buffered (empty, or up to 64 KiB), or a streamed
//!    one nothing has read from yet (a send that reached no instance hands
//!    it back), whose head is at hand (an HTTP/2 attempt keeps a copy of the
//!    head only when the body is buffered, `upstream::HttpStep`; a request
//!    that never left comes back whole);
//!    a TCP stream before its connect (nothing of it has been read). A connect failure
//!    needs no idempotency: nothing reached the instance.
//! 4. **Decide** once ([`retry`]): retry when the class allows it, fewer
//!    than `retries` retries were made, and the service's
//!    [`RetryBudget`](super::RetryBudget) grants one. The budget is asked
//!    last, so a retry refused for another reason spends no token.
//! 5. **Report** here: a failure to the core (health score, breaker) and its
//!    events to metrics, at once; a success as a [`Held`] claim that the
//!    caller ends when the exchange ends (HTTP: the response body; TCP: the
//!    connection), so the instance's connection count covers it.
//!
//! When the loop stops without a success, the client gets the last answer
//! (a 5xx, forwarded as it is), else 504 after `DeadlineExceeded` or
//! `TryTimedOut`, else 502.
//!
//! The list of tried instances is filled only when a retry follows, so a
//! request that succeeds at once allocates nothing here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datapunk_lb_core::{FailureKind, InstanceId, Member, NoSelection, Selection, ServiceInstance};
use http::StatusCode;

use super::{ProxyError, Upstream};
use crate::metrics::ServiceMetrics;
use crate::workers::Aligned;

/// How one attempt ended: the one classification (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// An answer that counts as success.
    Success,
    /// No answer; why.
    NoAnswer(NoAnswer),
    /// An HTTP answer with a 5xx status.
    ServerError(StatusCode),
}

/// Why an attempt got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoAnswer {
    /// The connection could not be made.
    ConnectFailed,
    /// The connect did not finish within `connect_timeout` (TCP).
    ConnectTimedOut,
    /// The connection failed after the request went out (HTTP).
    Reset,
    /// A reused HTTP/1.1 connection closed or reset by the instance before
    /// any byte of a response, or an HTTP/2 stream it refused unprocessed,
    /// and not sent again (module doc).
    Stale,
    /// `per_try_timeout` passed before the response headers, with time
    /// left before `request_timeout` (HTTP).
    TryTimedOut,
    /// `request_timeout` passed before the response headers (HTTP).
    DeadlineExceeded,
}

impl Class {
    /// The class of an HTTP answer with `status`.
    pub(crate) fn of_status(status: StatusCode) -> Self {
        if status.is_server_error() {
            Class::ServerError(status)
        } else {
            Class::Success
        }
    }

    /// What the core is told: `None` for a success.
    pub(crate) fn failure_kind(self) -> Option<FailureKind> {
        match self {
            Class::Success => None,
            Class::NoAnswer(NoAnswer::ConnectFailed) => Some(FailureKind::Connect),
            Class::NoAnswer(
                NoAnswer::ConnectTimedOut | NoAnswer::TryTimedOut | NoAnswer::DeadlineExceeded,
            ) => Some(FailureKind::Timeout),
            Class::NoAnswer(NoAnswer::Reset) => Some(FailureKind::Reset),
            Class::NoAnswer(NoAnswer::Stale) => None,
            Class::ServerError(_) => Some(FailureKind::ServerError),
        }
    }

    /// Whether this class allows a retry of a request like `replay`.
    pub(crate) fn allows_retry(self, replay: Replay) -> bool {
        match self {
            Class::Success | Class::NoAnswer(NoAnswer::DeadlineExceeded) => false,
            Class::NoAnswer(NoAnswer::ConnectFailed | NoAnswer::ConnectTimedOut) => {
                replay.replayable
            }
            // A timed-out try may have been acted on: like a reset.
            Class::NoAnswer(NoAnswer::Reset | NoAnswer::Stale | NoAnswer::TryTimedOut) => {
                replay.idempotent && replay.replayable
            }
            Class::ServerError(status) => {
                matches!(
                    status,
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                ) && replay.idempotent
                    && replay.replayable
            }
        }
    }
}

/// What a request allows to be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Replay {
    /// Sending it twice has the effect of sending it once.
    pub(crate) idempotent: bool,
    /// It can be sent again byte for byte.
    pub(crate) replayable: bool,
}

/// The one retry decision after failed attempt number `attempt` (0 = the
/// first): the class allows it, a retry is left of `retries`, and `budget`
/// grants one. `budget` is called only when everything else allows the
/// retry, since granting spends a token.
pub(crate) fn retry(
    class: Class,
    replay: Replay,
    attempt: u32,
    retries: u32,
    budget: impl FnOnce() -> bool,
) -> bool {
    class.allows_retry(replay) && attempt < retries && budget()
}

/// What one attempt produced, before classification.
#[derive(Debug)]
pub(crate) enum Attempt<A> {
    /// An answer: HTTP response headers, or a connected TCP stream.
    Answer(A),
    /// No answer.
    NoAnswer(NoAnswer),
    /// Nothing could be sent to this instance; the request ends with this
    /// error and the instance is not blamed.
    Unsendable(ProxyError),
}

/// The protocol-specific part of an attempt.
pub(crate) trait Step {
    /// What an answered attempt yields.
    type Answer;

    /// What the request allows to be sent again, now: asked after each
    /// failed attempt (an HTTP request sent without a copy of its head is
    /// no longer replayable once it went out).
    fn replay(&self) -> Replay;

    /// When the next attempt starts (its latency is measured from here),
    /// asked right before it. A step that read the clock a moment ago for
    /// the same purpose may hand that reading to its first attempt, one
    /// clock read less per request ([`HttpStep`](super::upstream::HttpStep):
    /// the request's deadline read, when nothing was awaited since).
    fn attempt_started(&mut self) -> Instant {
        Instant::now()
    }

    /// Runs one attempt against `instance`.
    fn attempt(
        &mut self,
        instance: &ServiceInstance,
    ) -> impl std::future::Future<Output = Attempt<Self::Answer>> + Send;

    /// The class of an answer.
    fn classify(answer: &Self::Answer) -> Class;
}

/// How the loop ended, when the client gets something from an instance.
#[derive(Debug)]
pub(crate) enum Ended<A> {
    /// A success: its claim on the instance, ended by the caller.
    Success(Held, A),
    /// A failed answer (an HTTP 5xx) that was not retried or whose retries
    /// got no answer: forwarded as it is. Already reported.
    Failed(A),
}

/// A successful attempt's claim on its instance: counts one connection
/// until it is ended, then reports the outcome to the core and metrics.
#[derive(Debug)]
pub(crate) struct Held {
    selection: Selection,
    latency: Duration,
    metrics: Arc<Aligned<ServiceMetrics>>,
}

impl Held {
    /// The exchange ended well: a success with the latency measured when
    /// the attempt was answered.
    pub(crate) fn succeed(self) {
        self.metrics.report(self.selection.success(self.latency));
    }

    /// The exchange broke after the answer (e.g. a reset mid-body).
    pub(crate) fn fail(self, kind: FailureKind) {
        self.metrics.report(self.selection.failure(kind));
    }
}

/// Runs attempts until one succeeds or the retry rule stops (module doc).
/// `key` is the request's hash key (a digest, see
/// [`hash_key`](super::hash_key); `None`: `consistent_hash` picks at
/// random), which every selection of the request uses, retries included: a
/// retry walks the key's table order past the instances already tried.
pub(crate) async fn run<S: Step>(
    up: &Upstream,
    step: &mut S,
    key: Option<&[u8]>,
) -> Result<Ended<S::Answer>, ProxyError> {
    up.budget.deposit();
    // Instances that failed this request; filled only before a retry.
    let mut tried: Vec<InstanceId> = Vec::new();
    // The failed attempt before a retry: how the request ends if the retry
    // finds no instance.
    let mut last: Option<(Class, Option<S::Answer>)> = None;
    let mut attempt = 0;
    loop {
        let mut selection = match (select(up, &tried, key), last) {
            (Ok(s), _) => s,
            (Err(e), None) => return Err(e),
            (Err(_), Some((class, answer))) => return give_up(up, class, answer),
        };
        up.metrics.selected(selection.strategy());
        up.metrics.report(selection.take_events());
        let started = step.attempt_started();
        let (class, answer) = match step.attempt(selection.instance()).await {
            Attempt::Answer(answer) => {
                let latency = started.elapsed();
                up.metrics.observe(latency.as_secs_f64());
                let class = S::classify(&answer);
                if class == Class::Success {
                    let held = Held {
                        selection,
                        latency,
                        metrics: up.metrics.local().clone(),
                    };
                    return Ok(Ended::Success(held, answer));
                }
                (class, Some(answer))
            }
            Attempt::NoAnswer(why) => (Class::NoAnswer(why), None),
            Attempt::Unsendable(e) => return Err(e),
        };
        let retrying = retry(class, step.replay(), attempt, up.retries, || {
            up.budget.try_withdraw()
        });
        let failed = retrying.then(|| selection.instance().id().clone());
        // Always a failure here: a success returned above.
        if let Some(kind) = class.failure_kind() {
            up.metrics.report(selection.failure(kind));
        }
        let Some(failed) = failed else {
            return give_up(up, class, answer);
        };
        up.metrics.retried();
        tried.push(failed);
        last = Some((class, answer));
        attempt += 1;
    }
}

/// How a request ends after its last failed attempt, of `class`: its
/// answer (a 5xx) as it is, else a timeout after the deadline or a timed
/// out try, else unreachable.
fn give_up<A>(up: &Upstream, class: Class, answer: Option<A>) -> Result<Ended<A>, ProxyError> {
    match answer {
        Some(answer) => Ok(Ended::Failed(answer)),
        None if matches!(
            class,
            Class::NoAnswer(NoAnswer::DeadlineExceeded | NoAnswer::TryTimedOut)
        ) =>
        {
            Err(ProxyError::Timeout(up.name.clone()))
        }
        None => Err(ProxyError::Unreachable(up.name.clone())),
    }
}

/// Selects an instance for `key` not in `tried` and under
/// `max_connections`; when none is accepted, counts why and says it.
fn select(
    up: &Upstream,
    tried: &[InstanceId],
    key: Option<&[u8]>,
) -> Result<Selection, ProxyError> {
    let untried = untried(tried);
    let accept = untried.as_ref().map(|f| f as &dyn Fn(&Member) -> bool);
    match up.service.select_within(key, up.max_connections, accept) {
        Ok(s) => Ok(s),
        Err(NoSelection::OverLimit) => {
            up.metrics.over_limit();
            Err(ProxyError::OverLimit(up.name.clone()))
        }
        Err(NoSelection::NoneAcceptable) => {
            up.metrics.no_instance();
            Err(ProxyError::NoEligibleInstance(up.name.clone()))
        }
    }
}

/// The filter of a selection after the instances `tried`: not one of
/// them. `None` when nothing was tried (a first attempt), so the pick
/// reads no member.
fn untried(tried: &[InstanceId]) -> Option<impl Fn(&Member) -> bool + '_> {
    (!tried.is_empty()).then_some(move |m: &Member| !tried.contains(m.instance().id()))
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use datapunk_lb_core::{ManualClock, Registry, StrategyKind};

    use super::*;
    use crate::proxy::upstream::UpstreamClients;
    use crate::proxy::RetryBudget;
    use crate::workers::PerWorker;

    const GET: Replay = Replay {
        idempotent: true,
        replayable: true,
    };
    const POST: Replay = Replay {
        idempotent: false,
        replayable: true,
    };

    fn status(code: u16) -> StatusCode {
        StatusCode::from_u16(code).unwrap()
    }

    fn no_answer(why: NoAnswer) -> Class {
        Class::NoAnswer(why)
    }

    #[test]
    fn statuses_below_500_are_successes_and_5xx_server_errors() {
        for (code, class) in [
            (200, Class::Success),
            (204, Class::Success),
            (304, Class::Success),
            (404, Class::Success),
            (499, Class::Success),
            (500, Class::ServerError(status(500))),
            (502, Class::ServerError(status(502))),
            (503, Class::ServerError(status(503))),
            (504, Class::ServerError(status(504))),
            (599, Class::ServerError(status(599))),
        ] {
            assert_eq!(Class::of_status(status(code)), class, "status {code}");
        }
    }

    #[test]
    fn each_class_maps_to_one_core_outcome() {
        for (class, kind) in [
            (Class::Success, None),
            (
                no_answer(NoAnswer::ConnectFailed),
                Some(FailureKind::Connect),
            ),
            (
                no_answer(NoAnswer::ConnectTimedOut),
                Some(FailureKind::Timeout),
            ),
            (no_answer(NoAnswer::Reset), Some(FailureKind::Reset)),
            (no_answer(NoAnswer::Stale), None),
            (no_answer(NoAnswer::TryTimedOut), Some(FailureKind::Timeout)),
            (
                no_answer(NoAnswer::DeadlineExceeded),
                Some(FailureKind::Timeout),
            ),
            (
                Class::ServerError(status(500)),
                Some(FailureKind::ServerError),
            ),
            (
                Class::ServerError(status(503)),
                Some(FailureKind::ServerError),
            ),
        ] {
            assert_eq!(class.failure_kind(), kind, "{class:?}");
        }
    }

    /// Which requests each class may retry, by (idempotent, replayable) in
    /// the order (no, no), (no, yes), (yes, no), (yes, yes).
    fn class_rules() -> Vec<(Class, [bool; 4])> {
        let connect = [false, true, false, true];
        let idempotent_and_replayable = [false, false, false, true];
        let never = [false; 4];
        vec![
            (Class::Success, never),
            (no_answer(NoAnswer::ConnectFailed), connect),
            (no_answer(NoAnswer::ConnectTimedOut), connect),
            (no_answer(NoAnswer::Reset), idempotent_and_replayable),
            (no_answer(NoAnswer::Stale), idempotent_and_replayable),
            (no_answer(NoAnswer::TryTimedOut), idempotent_and_replayable),
            (no_answer(NoAnswer::DeadlineExceeded), never),
            (Class::ServerError(status(500)), never),
            (Class::ServerError(status(501)), never),
            (Class::ServerError(status(502)), idempotent_and_replayable),
            (Class::ServerError(status(503)), idempotent_and_replayable),
            (Class::ServerError(status(504)), idempotent_and_replayable),
            (Class::ServerError(status(505)), never),
        ]
    }

    #[test]
    fn retry_decision_over_every_class_request_budget_and_attempt() {
        let requests = [(false, false), (false, true), (true, false), (true, true)];
        // (attempt, retries, a retry is left)
        let counts = [
            (0, 0, false),
            (0, 1, true),
            (1, 1, false),
            (1, 2, true),
            (2, 2, false),
        ];
        for (class, allowed) in class_rules() {
            for (i, (idempotent, replayable)) in requests.into_iter().enumerate() {
                let replay = Replay {
                    idempotent,
                    replayable,
                };
                for (attempt, retries, left) in counts {
                    for granted in [false, true] {
                        let asked = Cell::new(false);
                        let got = retry(class, replay, attempt, retries, || {
                            asked.set(true);
                            granted
                        });
                        let case = format!(
                            "{class:?} {replay:?} attempt {attempt} of retries {retries}, budget {granted}"
                        );
                        assert_eq!(got, allowed[i] && left && granted, "{case}");
                        // The budget is asked only when all else allows: a
                        // refused retry spends no token.
                        assert_eq!(asked.get(), allowed[i] && left, "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_budget_that_refuses_stops_the_retry_of_a_connect_failure() {
        let budget = RetryBudget::default();
        while budget.try_withdraw() {}
        let class = no_answer(NoAnswer::ConnectFailed);
        assert!(!retry(class, GET, 0, 2, || budget.try_withdraw()));
        assert!(retry(class, GET, 0, 2, || true));
    }

    /// What the scripted instance with an id answers.
    type Script = dyn Fn(&str) -> Attempt<StatusCode> + Send + Sync;

    /// A step that answers from a script by instance id, recording each
    /// instance it was sent to: no sockets.
    struct Scripted {
        replay: Replay,
        script: Box<Script>,
        sent_to: Vec<String>,
    }

    impl Step for Scripted {
        type Answer = StatusCode;

        fn replay(&self) -> Replay {
            self.replay
        }

        async fn attempt(&mut self, instance: &ServiceInstance) -> Attempt<StatusCode> {
            self.sent_to.push(instance.id().as_str().to_owned());
            (self.script)(instance.id().as_str())
        }

        fn classify(answer: &StatusCode) -> Class {
            Class::of_status(*answer)
        }
    }

    fn scripted(
        replay: Replay,
        script: impl Fn(&str) -> Attempt<StatusCode> + Send + Sync + 'static,
    ) -> Scripted {
        Scripted {
            replay,
            script: Box::new(script),
            sent_to: Vec::new(),
        }
    }

    /// Service `api` with instances `ids` (round robin, in order).
    fn upstream(ids: &[&str], retries: u32, max_connections: u32) -> (Registry, Upstream) {
        let registry = Registry::builder()
            .clock(Arc::new(ManualClock::new()))
            .build()
            .unwrap();
        // One batch: none of them slow-starts, so the rotation is plain.
        registry
            .register_instances(
                "api",
                ids.iter()
                    .map(|id| ServiceInstance::try_new(id, "127.0.0.1", 9).unwrap()),
            )
            .unwrap();
        registry
            .set_strategy("api", StrategyKind::RoundRobin)
            .unwrap();
        let up = Upstream {
            name: "api".to_owned(),
            service: registry.service("api").unwrap(),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            per_try_timeout: None,
            response_idle_timeout: Duration::from_secs(1),
            retries,
            max_connections,
            budget: Arc::new(RetryBudget::default()),
            clients: UpstreamClients::new(
                Duration::from_secs(1),
                Default::default(),
                Default::default(),
                None,
                None,
            ),
            metrics: PerWorker::new(ServiceMetrics::disabled()),
            upgrade_idle_timeout: Duration::from_secs(1),
            hash_key: None,
        };
        (registry, up)
    }

    /// Failures the core recorded for instance `id`, by kind.
    fn failures(registry: &Registry, id: &str) -> Vec<FailureKind> {
        let st = registry.instance("api", id).unwrap();
        FailureKind::ALL
            .into_iter()
            .flat_map(|k| std::iter::repeat_n(k, st.failures_by_kind[k.index()] as usize))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_failure_moves_to_an_untried_instance_and_is_reported_once() {
        let (registry, up) = upstream(&["a", "b", "c"], 2, 100);
        let mut step = scripted(POST, |id| match id {
            "a" => Attempt::NoAnswer(NoAnswer::ConnectFailed),
            _ => Attempt::Answer(StatusCode::OK),
        });
        let Ok(Ended::Success(held, answer)) = run(&up, &mut step, None).await else {
            panic!("b answers");
        };
        assert_eq!(answer, StatusCode::OK);
        assert_eq!(step.sent_to, ["a", "b"]);
        assert_eq!(failures(&registry, "a"), [FailureKind::Connect]);
        // The success is held: b counts the connection until it ends.
        assert_eq!(registry.instance("api", "b").unwrap().active_connections, 1);
        assert_eq!(registry.instance("api", "b").unwrap().requests, 0);
        held.succeed();
        let b = registry.instance("api", "b").unwrap();
        assert_eq!((b.active_connections, b.requests, b.failures), (0, 1, 0));
    }

    /// Sends a `replay` request whose every attempt is answered `status`;
    /// asserts that the last answer is forwarded and returns the instances
    /// it was sent to.
    async fn forwarded(up: &Upstream, replay: Replay, status: StatusCode) -> Vec<String> {
        let mut step = scripted(replay, move |_| Attempt::Answer(status));
        match run(up, &mut step, None).await {
            Ok(Ended::Failed(answer)) => assert_eq!(answer, status),
            other => panic!("{status} must be forwarded, got {other:?}"),
        }
        step.sent_to
    }

    #[tokio::test(start_paused = true)]
    async fn retried_503s_stop_after_retries_and_the_last_one_is_forwarded() {
        let (registry, up) = upstream(&["a", "b", "c", "d"], 2, 100);
        let sent_to = forwarded(&up, GET, StatusCode::SERVICE_UNAVAILABLE).await;
        assert_eq!(sent_to, ["a", "b", "c"], "first attempt + 2 retries");
        for id in ["a", "b", "c"] {
            assert_eq!(failures(&registry, id), [FailureKind::ServerError], "{id}");
        }
        assert_eq!(failures(&registry, "d"), []);
    }

    #[tokio::test(start_paused = true)]
    async fn a_503_to_a_post_and_a_500_to_a_get_are_forwarded_without_a_retry() {
        let (_registry, up) = upstream(&["a", "b"], 2, 100);
        let sent_to = forwarded(&up, POST, StatusCode::SERVICE_UNAVAILABLE).await;
        assert_eq!(sent_to, ["a"]);
        let sent_to = forwarded(&up, GET, StatusCode::INTERNAL_SERVER_ERROR).await;
        assert_eq!(sent_to, ["b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_502_whose_retry_finds_no_untried_instance_is_forwarded() {
        let (_registry, up) = upstream(&["a"], 2, 100);
        let sent_to = forwarded(&up, GET, StatusCode::BAD_GATEWAY).await;
        assert_eq!(sent_to, ["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_ends_the_request_with_a_timeout_and_no_retry() {
        let (registry, up) = upstream(&["a", "b"], 2, 100);
        let mut step = scripted(GET, |_| Attempt::NoAnswer(NoAnswer::DeadlineExceeded));
        let r = run(&up, &mut step, None).await;
        assert_eq!(r.err(), Some(ProxyError::Timeout("api".into())));
        assert_eq!(step.sent_to, ["a"]);
        assert_eq!(failures(&registry, "a"), [FailureKind::Timeout]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_try_is_retried_for_a_get_and_ends_504_for_a_post() {
        let script = |id: &str| match id {
            "a" => Attempt::NoAnswer(NoAnswer::TryTimedOut),
            _ => Attempt::Answer(StatusCode::OK),
        };
        let (registry, up) = upstream(&["a", "b"], 2, 100);
        let mut step = scripted(GET, script);
        let Ok(Ended::Success(held, StatusCode::OK)) = run(&up, &mut step, None).await else {
            panic!("b answers the retry");
        };
        held.succeed();
        assert_eq!(step.sent_to, ["a", "b"]);
        assert_eq!(failures(&registry, "a"), [FailureKind::Timeout]);

        let (registry, up) = upstream(&["a", "b"], 2, 100);
        let mut step = scripted(POST, script);
        let r = run(&up, &mut step, None).await;
        assert_eq!(r.err(), Some(ProxyError::Timeout("api".into())));
        assert_eq!(step.sent_to, ["a"], "a POST is not sent twice");
        assert_eq!(failures(&registry, "a"), [FailureKind::Timeout]);
    }

    #[tokio::test(start_paused = true)]
    async fn connect_failures_everywhere_end_unreachable() {
        let (registry, up) = upstream(&["a", "b"], 5, 100);
        let mut step = scripted(POST, |_| Attempt::NoAnswer(NoAnswer::ConnectTimedOut));
        let r = run(&up, &mut step, None).await;
        assert_eq!(r.err(), Some(ProxyError::Unreachable("api".into())));
        assert_eq!(step.sent_to, ["a", "b"], "each instance once");
        assert_eq!(failures(&registry, "b"), [FailureKind::Timeout]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_budget_stops_retries() {
        let (registry, up) = upstream(&["a", "b"], 2, 100);
        while up.budget.try_withdraw() {}
        let mut step = scripted(GET, |_| Attempt::NoAnswer(NoAnswer::ConnectFailed));
        let r = run(&up, &mut step, None).await;
        assert_eq!(r.err(), Some(ProxyError::Unreachable("api".into())));
        assert_eq!(step.sent_to, ["a"]);
        assert_eq!(failures(&registry, "b"), []);
    }

    #[tokio::test(start_paused = true)]
    async fn instances_at_max_connections_are_skipped_and_all_full_is_over_limit() {
        let (registry, up) = upstream(&["a", "b"], 0, 1);
        let mut step = scripted(GET, |_| Attempt::Answer(StatusCode::OK));
        let Ok(Ended::Success(first, _)) = run(&up, &mut step, None).await else {
            panic!("a answers");
        };
        let Ok(Ended::Success(second, _)) = run(&up, &mut step, None).await else {
            panic!("b answers: a is at its limit");
        };
        assert_eq!(step.sent_to, ["a", "b"]);
        let r = run(&up, &mut step, None).await;
        assert_eq!(r.err(), Some(ProxyError::OverLimit("api".into())));
        assert_eq!(step.sent_to.len(), 2, "nothing sent over the limit");
        first.succeed();
        second.succeed();
        assert_eq!(registry.instance("api", "a").unwrap().requests, 1);
    }

    /// The limit is the core's, checked on the hot line: on the common
    /// case of `random`, `p2c` and `peak_ewma` as on the general path of
    /// the others, an instance at `max_connections` is skipped and all at
    /// it end the request `OverLimit`.
    #[tokio::test(start_paused = true)]
    async fn every_strategy_skips_instances_at_the_limit_and_all_full_is_over_limit() {
        for kind in StrategyKind::ALL {
            let (registry, up) = upstream(&["a", "b"], 0, 1);
            registry.set_strategy("api", kind).unwrap();
            let mut step = scripted(GET, |_| Attempt::Answer(StatusCode::OK));
            let key = Some(&b"user-1"[..]);
            let mut held = Vec::new();
            for _ in 0..2 {
                let Ok(Ended::Success(h, _)) = run(&up, &mut step, key).await else {
                    panic!("{kind}: an instance under the limit answers");
                };
                held.push(h);
            }
            let mut sent_to = step.sent_to.clone();
            sent_to.sort();
            assert_eq!(sent_to, ["a", "b"], "{kind}: each once");
            let r = run(&up, &mut step, key).await;
            assert_eq!(r.err(), Some(ProxyError::OverLimit("api".into())), "{kind}");
            assert_eq!(step.sent_to.len(), 2, "{kind}: nothing sent over the limit");
            held.into_iter().for_each(Held::succeed);
        }
    }

    /// On a retry: an untried instance at the limit makes `OverLimit`; a
    /// tried one at the limit does not (the filter refuses it first, as
    /// before the limit moved into the core).
    #[tokio::test(start_paused = true)]
    async fn a_retry_counts_over_limit_only_for_untried_instances() {
        let (registry, up) = upstream(&["a", "b"], 0, 1);
        let ids = |s: &[&str]| -> Vec<InstanceId> {
            s.iter()
                .map(|id| registry.instance("api", id).unwrap().instance.id().clone())
                .collect()
        };
        let first = select(&up, &[], None).unwrap();
        let tried_first = ids(&[first.instance().id().as_str()]);
        // The other one, untried, under the limit.
        let second = select(&up, &tried_first, None).unwrap();
        assert_ne!(second.instance().id(), first.instance().id());
        // Both at the limit: the untried one was refused for it.
        let r = select(&up, &tried_first, None).err();
        assert_eq!(r, Some(ProxyError::OverLimit("api".into())));
        // Both tried: refused as tried, not for the limit.
        let r = select(&up, &ids(&["a", "b"]), None).err();
        assert_eq!(r, Some(ProxyError::NoEligibleInstance("api".into())));
        drop((first, second));
        assert!(untried(&[]).is_none(), "a first attempt has no filter");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unsendable_request_ends_at_once_and_blames_no_instance() {
        let (registry, up) = upstream(&["a", "b"], 2, 100);
        let mut step = scripted(GET, |_| {
            Attempt::Unsendable(ProxyError::Unreachable("api".into()))
        });
        let r = run(&up, &mut step, None).await;
        assert_eq!(r.err(), Some(ProxyError::Unreachable("api".into())));
        assert_eq!(step.sent_to, ["a"]);
        assert_eq!(failures(&registry, "a"), []);
        assert_eq!(registry.instance("api", "a").unwrap().active_connections, 0);
    }
}
