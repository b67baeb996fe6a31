//! The one attempt loop of HTTP and TCP: select, attempt, classify once,
//! decide once, report once.
//!
//! ## The loop
//!
//! 1. **Select inside the core** with `Service::select_with`, accepting an
//!    instance this request has not tried yet and that is under the
//!    service's `max_connections`. None accepted → the request ends: counted
//!    as `over_limit` when some instance was refused for its limit, else as
//!    `no_instance` (HTTP answers 503; TCP closes the connection at once).
//! 2. **Attempt** through the protocol's [`Step`]: HTTP sends the request
//!    and awaits the response headers (under `request_timeout`, one deadline
//!    over all attempts); TCP connects (under `connect_timeout`).
//! 3. **Classify** the attempt once, into a [`Class`]:
//!
//!    | class | when | reported to the core | retried when |
//!    | --- | --- | --- | --- |
//!    | `Success` | HTTP: headers with a status below 500; TCP: connected | success, latency = time to headers / to connect | never |
//!    | `ConnectFailed` | no connection (HTTP: its connect timeout too) | `Connect` | the request is replayable |
//!    | `ConnectTimedOut` | TCP: `connect_timeout` passed | `Timeout` | the request is replayable |
//!    | `Reset` | HTTP: the connection failed after the request went out | `Reset` | idempotent and replayable |
//!    | `DeadlineExceeded` | HTTP: `request_timeout` passed | `Timeout` | never: no time is left |
//!    | `ServerError` | HTTP: a 5xx | `ServerError` | 502, 503 or 504, idempotent and replayable |
//!
//!    Idempotent: GET, HEAD, OPTIONS, TRACE, PUT, DELETE. Replayable: an
//!    HTTP body that was buffered (empty, or up to 64 KiB); a TCP stream
//!    before its connect (nothing of it has been read). A connect failure
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
//! (a 5xx, forwarded as it is), else 504 after `DeadlineExceeded`, else 502.
//!
//! The list of tried instances is filled only when a retry follows, so a
//! request that succeeds at once allocates nothing here.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datapunk_lb_core::{FailureKind, InstanceId, Member, Selection, ServiceInstance};
use http::StatusCode;

use super::{ProxyError, Upstream};
use crate::metrics::ServiceMetrics;

/// How one attempt ended: the one classification (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// An answer that counts as success.
    Success,
    /// No answer; why.
    NoAnswer(NoAnswer),
    /// An HTTP answer with a 5xx status.
    ServerError(StatusCode),
}

/// Why an attempt got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAnswer {
    /// The connection could not be made.
    ConnectFailed,
    /// The connect did not finish within `connect_timeout` (TCP).
    ConnectTimedOut,
    /// The connection failed after the request went out (HTTP).
    Reset,
    /// `request_timeout` passed before the response headers (HTTP).
    DeadlineExceeded,
}

impl Class {
    /// The class of an HTTP answer with `status`.
    pub fn of_status(status: StatusCode) -> Self {
        if status.is_server_error() {
            Class::ServerError(status)
        } else {
            Class::Success
        }
    }

    /// What the core is told: `None` for a success.
    pub fn failure_kind(self) -> Option<FailureKind> {
        match self {
            Class::Success => None,
            Class::NoAnswer(NoAnswer::ConnectFailed) => Some(FailureKind::Connect),
            Class::NoAnswer(NoAnswer::ConnectTimedOut | NoAnswer::DeadlineExceeded) => {
                Some(FailureKind::Timeout)
            }
            Class::NoAnswer(NoAnswer::Reset) => Some(FailureKind::Reset),
            Class::ServerError(_) => Some(FailureKind::ServerError),
        }
    }

    /// Whether this class allows a retry of a request like `replay`.
    pub fn allows_retry(self, replay: Replay) -> bool {
        match self {
            Class::Success | Class::NoAnswer(NoAnswer::DeadlineExceeded) => false,
            Class::NoAnswer(NoAnswer::ConnectFailed | NoAnswer::ConnectTimedOut) => {
                replay.replayable
            }
            Class::NoAnswer(NoAnswer::Reset) => replay.idempotent && replay.replayable,
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
pub struct Replay {
    /// Sending it twice has the effect of sending it once.
    pub idempotent: bool,
    /// It can be sent again byte for byte.
    pub replayable: bool,
}

/// The one retry decision after failed attempt number `attempt` (0 = the
/// first): the class allows it, a retry is left of `retries`, and `budget`
/// grants one. `budget` is called only when everything else allows the
/// retry, since granting spends a token.
pub fn retry(
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
pub enum Attempt<A> {
    /// An answer: HTTP response headers, or a connected TCP stream.
    Answer(A),
    /// No answer.
    NoAnswer(NoAnswer),
    /// Nothing could be sent to this instance; the request ends with this
    /// error and the instance is not blamed.
    Unsendable(ProxyError),
}

/// The protocol-specific part of an attempt.
pub trait Step {
    /// What an answered attempt yields.
    type Answer;

    /// What the request allows to be sent again.
    fn replay(&self) -> Replay;

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
pub enum Ended<A> {
    /// A success: its claim on the instance, ended by the caller.
    Success(Held, A),
    /// A failed answer (an HTTP 5xx) that was not retried or whose retries
    /// got no answer: forwarded as it is. Already reported.
    Failed(A),
}

/// A successful attempt's claim on its instance: counts one connection
/// until it is ended, then reports the outcome to the core and metrics.
#[derive(Debug)]
pub struct Held {
    selection: Selection,
    latency: Duration,
    metrics: Arc<ServiceMetrics>,
}

impl Held {
    /// The exchange ended well: a success with the latency measured when
    /// the attempt was answered.
    pub fn succeed(self) {
        self.metrics.report(self.selection.success(self.latency));
    }

    /// The exchange broke after the answer (e.g. a reset mid-body).
    pub fn fail(self, kind: FailureKind) {
        self.metrics.report(self.selection.failure(kind));
    }
}

/// Runs attempts until one succeeds or the retry rule stops (module doc).
pub async fn run<S: Step>(up: &Upstream, step: &mut S) -> Result<Ended<S::Answer>, ProxyError> {
    let replay = step.replay();
    up.budget.deposit();
    // Instances that failed this request; filled only before a retry.
    let mut tried: Vec<InstanceId> = Vec::new();
    // The answer of the failed attempt before a retry (a 5xx), forwarded
    // when the retry finds no instance.
    let mut last: Option<S::Answer> = None;
    let mut attempt = 0;
    loop {
        let mut selection = match select(up, &tried) {
            Ok(s) => s,
            // Nothing new to try: the first attempt says why; a retry ends
            // with the failure before it.
            Err(e) if attempt == 0 => return Err(e),
            Err(_) => {
                return match last {
                    Some(answer) => Ok(Ended::Failed(answer)),
                    None => Err(ProxyError::Unreachable(up.name.clone())),
                }
            }
        };
        up.metrics.selected(selection.strategy());
        up.metrics.report(selection.take_events());
        let started = Instant::now();
        let (class, answer) = match step.attempt(selection.instance()).await {
            Attempt::Answer(answer) => {
                let latency = started.elapsed();
                up.metrics.observe(latency.as_secs_f64());
                let class = S::classify(&answer);
                if class == Class::Success {
                    let held = Held {
                        selection,
                        latency,
                        metrics: up.metrics.clone(),
                    };
                    return Ok(Ended::Success(held, answer));
                }
                (class, Some(answer))
            }
            Attempt::NoAnswer(why) => (Class::NoAnswer(why), None),
            Attempt::Unsendable(e) => return Err(e),
        };
        let retrying = retry(class, replay, attempt, up.retries, || {
            up.budget.try_withdraw()
        });
        if retrying {
            tried.push(selection.instance().id().clone());
        }
        if let Some(kind) = class.failure_kind() {
            up.metrics.report(selection.failure(kind));
        }
        if !retrying {
            return match answer {
                Some(answer) => Ok(Ended::Failed(answer)),
                None if class == Class::NoAnswer(NoAnswer::DeadlineExceeded) => {
                    Err(ProxyError::Timeout(up.name.clone()))
                }
                None => Err(ProxyError::Unreachable(up.name.clone())),
            };
        }
        up.metrics.retried();
        last = answer;
        attempt += 1;
    }
}

/// Selects an instance not in `tried` and under `max_connections`; when
/// none is accepted, counts why and says it.
fn select(up: &Upstream, tried: &[InstanceId]) -> Result<Selection, ProxyError> {
    let over_limit = Cell::new(false);
    let accept = |m: &Member| {
        if tried.contains(m.instance().id()) {
            return false;
        }
        if m.active_connections() >= up.max_connections {
            over_limit.set(true);
            return false;
        }
        true
    };
    if let Some(s) = up.service.select_with(None, accept) {
        return Ok(s);
    }
    if over_limit.get() {
        up.metrics.over_limit();
        Err(ProxyError::OverLimit(up.name.clone()))
    } else {
        up.metrics.no_instance();
        Err(ProxyError::NoEligibleInstance(up.name.clone()))
    }
}
