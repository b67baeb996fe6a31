//! The access log: one line per HTTP request on a listener with
//! `access_log = true`, written to `access_log_path` (`stdout`, the
//! default, or a file opened for append).
//!
//! ## The line
//!
//! | field | value |
//! | --- | --- |
//! | `time` | when the line was made (the response ended), RFC 3339 UTC, milliseconds |
//! | `listener` / `service` | the listener; the routed service, `-` when no route matched |
//! | `client` | the peer's `ip:port` (the TCP peer; a trusted proxy's client is in `X-Forwarded-For`) |
//! | `method` / `authority` / `path` | as the client sent them; `authority` is `Host` (or the HTTP/2 `:authority`), `-` when none; `path` includes the query string |
//! | `status` | the status the client got (the proxy's own 404/502/503/504 too) |
//! | `bytes_in` / `bytes_out` | request and response body bytes (not headers); for a streamed request body, what was read by the time the response ended |
//! | `instance` / `attempts` | the instance of the last attempt, `-` when none was tried (no route, no instance); attempts made, retries included |
//! | `duration_ms` | request head received → response body ended, milliseconds |
//! | `request_id` | the `X-Request-Id` the backend got and the client got back |
//! | `client_cert` | `https` with a client certificate only: its subject CN, else its first DNS name; absent otherwise |
//! | `outcome` | `complete`; `error` when the response body broke mid-way (the upstream reset); `client_gone` when the client went away before the body ended |
//!
//! The query string is logged: it is what operators need to replay a
//! request. Where queries carry secrets, keep the log where secrets may be.
//!
//! Human format (default): `time listener client "METHOD authority path"
//! status key=value…`, values with spaces or quotes quoted. With
//! `--log-format json`: one JSON object per line with the fields above.
//!
//! ## Cost
//!
//! **Off** (the default): the request path neither reads the clock, nor
//! counts bytes, nor allocates for the log; the only trace is an `Option`
//! that is `None`. **On**: at the request, one clock read and a few
//! reference-counted clones (method, authority, path, id); at the response
//! end, one more clock read and a non-blocking send of the record to a
//! bounded channel, which never wakes anyone (no system call). Formatting
//! and writing happen on a dedicated thread that looks for lines every
//! 10 ms (backing off to 160 ms when idle), writes them through a 64 KiB
//! buffer and flushes: a busy log costs one `write` per batch, not per
//! line, and a line is in the file about 10 ms after its response ended
//! (up to 160 ms after a quiet spell). When the channel is full
//! (the disk cannot keep up), the line is dropped and counted in
//! `datapunk_lb_access_log_dropped_total` instead of slowing requests.
//!
//! ## Reopen
//!
//! Every reload (SIGHUP) reopens the destination, so rotation is: rename the
//! file, SIGHUP. A destination that cannot be opened fails start-up, and
//! fails a reload (which then changes nothing).

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use datapunk_lb_core::{InstanceId, ServiceInstance};
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request};
use http_body_util::BodyExt;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tracing::warn;

use super::attempt::{Attempt, Class, Replay, Step};
use super::body::{BodyEnd, Watch, Watched};
use super::http::ProxyBody;
use super::request_body::ReqBody;
use super::tls::ClientIdentity;
use crate::config::{AccessLogPath, Config};
use crate::telemetry::LogFormat;

/// Lines waiting for the writer before new ones are dropped.
const CHANNEL_LINES: usize = 16 * 1024;

/// The writer's buffer.
const BUFFER_BYTES: usize = 64 * 1024;

/// How often the writer looks for lines under load: a line reaches the
/// destination within about this long.
const NAP_MIN: Duration = Duration::from_millis(10);

/// How often it looks when idle.
const NAP_MAX: Duration = Duration::from_millis(160);

/// What the writer thread is sent.
enum Msg {
    Line(Record),
    /// Write to this destination from now on.
    Reopen(Box<dyn Write + Send>),
}

/// An opened destination, not yet written to.
pub(crate) struct Destination(Box<dyn Write + Send>);

/// A handle to the writer: cheap to clone, one per logging listener.
#[derive(Clone)]
pub(crate) struct AccessLog {
    tx: SyncSender<Msg>,
    dropped: Counter,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog").finish_non_exhaustive()
    }
}

/// The server's access log: started when a listener first logs, reopened
/// on every reload, closed when no listener logs any more.
pub(crate) struct AccessLogs {
    log: Mutex<Option<AccessLog>>,
    dropped: Counter,
    format: LogFormat,
}

impl AccessLogs {
    /// No writer yet; lines dropped will count in `dropped`.
    pub(crate) fn new(dropped: Counter, format: LogFormat) -> Self {
        Self {
            log: Mutex::new(None),
            dropped,
            format,
        }
    }

    /// Opens `config`'s destination when a listener logs: the fallible
    /// half of a reload, done before anything changes.
    pub(crate) fn open(config: &Config) -> io::Result<Option<Destination>> {
        if !config.listeners.iter().any(|l| l.access_log) {
            return Ok(None);
        }
        open(&config.access_log_path).map(|out| Some(Destination(out)))
    }

    /// Writes to `destination` from now on (`None`: no listener logs); the
    /// handle for the listeners that log.
    pub(crate) fn install(
        &self,
        destination: Option<Destination>,
    ) -> io::Result<Option<AccessLog>> {
        let mut log = self.log.lock();
        let Some(Destination(out)) = destination else {
            // The writer flushes and exits once the last request holding a
            // handle ends, closing the file.
            *log = None;
            return Ok(None);
        };
        let out = match &*log {
            // Blocks only while the channel is full: a reload may wait for
            // the writer, a request never does.
            Some(l) => match l.tx.send(Msg::Reopen(out)) {
                Ok(()) => return Ok(Some(l.clone())),
                // The writer thread is gone (it panicked): start another.
                Err(std::sync::mpsc::SendError(Msg::Reopen(out))) => out,
                Err(_) => return Ok(None),
            },
            None => out,
        };
        let l = self.spawn(out)?;
        *log = Some(l.clone());
        Ok(Some(l))
    }

    fn spawn(&self, out: Box<dyn Write + Send>) -> io::Result<AccessLog> {
        let (tx, rx) = sync_channel(CHANNEL_LINES);
        let format = self.format;
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&rx, out, format))?;
        Ok(AccessLog {
            tx,
            dropped: self.dropped.clone(),
        })
    }
}

fn open(path: &AccessLogPath) -> io::Result<Box<dyn Write + Send>> {
    Ok(match path {
        AccessLogPath::Stdout => Box::new(BufWriter::with_capacity(BUFFER_BYTES, io::stdout())),
        AccessLogPath::File(p) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
            Box::new(BufWriter::with_capacity(BUFFER_BYTES, f))
        }
    })
}

/// The writer thread: every [`NAP_MIN`] (backing off to [`NAP_MAX`] while
/// nothing comes) it formats and writes what is waiting and flushes; it ends
/// when every sender is gone. It never blocks in `recv`: a blocked receiver
/// would make every request's send a wake-up system call.
fn write_lines(rx: &Receiver<Msg>, mut out: Box<dyn Write + Send>, format: LogFormat) {
    let mut line = String::with_capacity(512);
    let mut failed = false;
    let mut nap = NAP_MIN;
    loop {
        let mut wrote = false;
        loop {
            match rx.try_recv() {
                Ok(Msg::Line(r)) => {
                    line.clear();
                    r.format(format, &mut line);
                    line.push('\n');
                    if let Err(e) = out.write_all(line.as_bytes()) {
                        warn_once(&mut failed, &e);
                    }
                    wrote = true;
                }
                Ok(Msg::Reopen(new)) => {
                    let _ = out.flush();
                    out = new;
                    failed = false;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if wrote {
            if let Err(e) = out.flush() {
                warn_once(&mut failed, &e);
            }
            nap = NAP_MIN;
        } else {
            nap = (nap * 2).min(NAP_MAX);
        }
        std::thread::sleep(nap);
    }
}

/// A full disk would otherwise log one warning per line.
fn warn_once(failed: &mut bool, e: &io::Error) {
    if !*failed {
        warn!(error = %e, "access log write failed; lines are lost until the next reopen (SIGHUP)");
        *failed = true;
    }
}

/// One request's line, filled in as the request goes.
#[derive(Debug)]
pub(crate) struct Entry {
    log: AccessLog,
    started: Instant,
    record: Record,
    /// A streamed request body's count, shared with its [`CountedBody`].
    streamed_in: Option<Arc<AtomicU64>>,
}

/// What a line says. Sent by value and its strings kept in one buffer: a
/// logged request allocates the buffer and the boxed body, nothing else.
#[derive(Debug)]
struct Record {
    time: SystemTime,
    listener: Arc<str>,
    client: SocketAddr,
    method: Method,
    /// authority, path, request id and service, back to back.
    text: String,
    /// Where the first three end in `text`.
    ends: [usize; 3],
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    instance: Option<InstanceId>,
    attempts: u32,
    duration_us: u64,
    outcome: &'static str,
    /// The verified client certificate's name (`https` only).
    client_cert: Option<Arc<str>>,
}

impl Record {
    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        let end = self.ends.get(i).copied().unwrap_or(self.text.len());
        self.text.get(start..end).unwrap_or("")
    }

    /// `Host` (or the URI's authority); `-` when none.
    fn authority(&self) -> &str {
        dash(self.part(0))
    }

    fn path(&self) -> &str {
        self.part(1)
    }

    fn request_id(&self) -> &str {
        self.part(2)
    }

    /// `-` when no route matched.
    fn service(&self) -> &str {
        dash(self.part(3))
    }

    fn instance(&self) -> &str {
        self.instance.as_ref().map_or("-", InstanceId::as_str)
    }
}

fn dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

impl Serialize for Record {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Record", 15)?;
        st.serialize_field(
            "time",
            &format_args!("{}", humantime::format_rfc3339_millis(self.time)),
        )?;
        st.serialize_field("listener", &*self.listener)?;
        st.serialize_field("service", self.service())?;
        st.serialize_field("client", &self.client)?;
        st.serialize_field("method", self.method.as_str())?;
        st.serialize_field("authority", self.authority())?;
        st.serialize_field("path", self.path())?;
        st.serialize_field("status", &self.status)?;
        st.serialize_field("bytes_in", &self.bytes_in)?;
        st.serialize_field("bytes_out", &self.bytes_out)?;
        st.serialize_field("instance", self.instance())?;
        st.serialize_field("attempts", &self.attempts)?;
        st.serialize_field("duration_ms", &(self.duration_us as f64 / 1e3))?;
        st.serialize_field("request_id", self.request_id())?;
        st.serialize_field("outcome", self.outcome)?;
        match &self.client_cert {
            Some(c) => st.serialize_field("client_cert", &**c)?,
            None => st.skip_field("client_cert")?,
        }
        st.end()
    }
}

impl AccessLog {
    /// Starts the line of `req`, received from `peer` on `listener` at
    /// `received` (the request's one clock read before its first attempt,
    /// shared with its deadline) and routed to `service`.
    pub(crate) fn entry<B>(
        &self,
        req: &Request<B>,
        peer: SocketAddr,
        listener: &Arc<str>,
        service: Option<&str>,
        request_id: &HeaderValue,
        received: Instant,
    ) -> Entry {
        // Copies: a slice would pin hyper's read buffer until the writer is
        // done with the line, making it allocate a new one.
        let path = req.uri().path_and_query().map_or("/", PathAndQuery::as_str);
        let service = service.unwrap_or("");
        let mut text = String::with_capacity(64 + path.len() + service.len());
        match req.headers().get(header::HOST) {
            Some(h) => text.push_str(&String::from_utf8_lossy(h.as_bytes())),
            None => text.push_str(req.uri().authority().map_or("", |a| a.as_str())),
        }
        let mut ends = [text.len(), 0, 0];
        text.push_str(path);
        ends[1] = text.len();
        text.push_str(&String::from_utf8_lossy(request_id.as_bytes()));
        ends[2] = text.len();
        text.push_str(service);
        Entry {
            log: self.clone(),
            started: received,
            record: Record {
                time: SystemTime::UNIX_EPOCH,
                listener: listener.clone(),
                client: peer,
                method: req.method().clone(),
                text,
                ends,
                status: 0,
                bytes_in: 0,
                bytes_out: 0,
                instance: None,
                attempts: 0,
                duration_us: 0,
                outcome: "complete",
                client_cert: req
                    .extensions()
                    .get::<ClientIdentity>()
                    .map(|c| c.0.clone()),
            },
            streamed_in: None,
        }
    }
}

impl Entry {
    /// Counts the request body: a buffered one now, a streamed one as it
    /// is read.
    pub(crate) fn count_request_body(&mut self, body: &mut ReqBody) {
        match body {
            ReqBody::Replayable(b) => self.record.bytes_in = b.len() as u64,
            ReqBody::Stream(s) => {
                if let Some(inner) = s.take() {
                    let n = Arc::new(AtomicU64::new(0));
                    self.streamed_in = Some(n.clone());
                    *s = Some(Watched::new(inner, CountIn(n)).boxed());
                }
            }
        }
    }

    /// The attempts of `step`, once the attempt loop is done with it.
    pub(crate) fn attempts<S>(&mut self, step: &Counted<'_, S>) {
        self.record.attempts = step.attempts;
        self.record.instance.clone_from(&step.instance);
    }

    /// Wraps the response body: the line is sent when it ends.
    pub(crate) fn respond<B>(mut self, resp: http::Response<B>) -> http::Response<ProxyBody>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Unpin + Send + Sync + 'static,
        B::Error: Into<super::BoxError>,
    {
        self.record.status = resp.status().as_u16();
        let (parts, inner) = resp.into_parts();
        http::Response::from_parts(parts, Watched::new(inner, self).boxed())
    }

    fn finish(mut self, outcome: &'static str) {
        let r = &mut self.record;
        r.duration_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        r.time = SystemTime::now();
        r.outcome = outcome;
        if let Some(n) = &self.streamed_in {
            r.bytes_in = n.load(Ordering::Relaxed);
        }
        match self.log.tx.try_send(Msg::Line(self.record)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.log.dropped.inc();
            }
        }
    }
}

/// A [`Step`] that notes how many attempts were made and the last
/// instance, for the line; the attempt loop is unchanged.
pub(crate) struct Counted<'s, S> {
    inner: &'s mut S,
    attempts: u32,
    instance: Option<InstanceId>,
}

impl<'s, S> Counted<'s, S> {
    /// Counts the attempts of `inner`.
    pub(crate) fn new(inner: &'s mut S) -> Self {
        Self {
            inner,
            attempts: 0,
            instance: None,
        }
    }
}

impl<S: Step + Send> Step for Counted<'_, S> {
    type Answer = S::Answer;

    fn replay(&self) -> Replay {
        self.inner.replay()
    }

    fn attempt_started(&mut self) -> Instant {
        self.inner.attempt_started()
    }

    fn attempt(
        &mut self,
        instance: &ServiceInstance,
    ) -> impl std::future::Future<Output = Attempt<S::Answer>> + Send {
        self.attempts += 1;
        self.instance = Some(instance.id().clone());
        self.inner.attempt(instance)
    }

    fn classify(answer: &S::Answer) -> Class {
        S::classify(answer)
    }
}

/// Counts a streamed request body as it passes.
struct CountIn(Arc<AtomicU64>);

impl Watch for CountIn {
    fn data(&mut self, bytes: usize) {
        self.0.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn end(self, _: BodyEnd) {}
}

/// The response body's watch: counts it, sends the line when it ends.
impl Watch for Entry {
    fn data(&mut self, bytes: usize) {
        self.record.bytes_out += bytes as u64;
    }

    fn end(self, how: BodyEnd) {
        self.finish(match how {
            BodyEnd::Complete => "complete",
            BodyEnd::Error => "error",
            BodyEnd::Dropped => "client_gone",
        });
    }
}

// === the two formats ===

impl Record {
    fn format(&self, format: LogFormat, out: &mut String) {
        match format {
            LogFormat::Json => {
                // Serializing plain strings and numbers cannot fail.
                if let Ok(s) = serde_json::to_string(self) {
                    out.push_str(&s);
                }
            }
            LogFormat::Human => self.human(out),
        }
    }

    /// `time listener client "METHOD authority path" status key=value…`
    fn human(&self, out: &mut String) {
        let _ = write!(
            out,
            "{} {} {} \"{} {} {}\" {}",
            humantime::format_rfc3339_millis(self.time),
            self.listener,
            self.client,
            self.method,
            Escaped(self.authority()),
            Escaped(self.path()),
            self.status
        );
        let _ = write!(
            out,
            " bytes_in={} bytes_out={} service={} instance={} attempts={} duration_ms={}.{:03} request_id={} outcome={}",
            self.bytes_in,
            self.bytes_out,
            Value(self.service()),
            Value(self.instance()),
            self.attempts,
            self.duration_us / 1000,
            self.duration_us % 1000,
            Value(self.request_id()),
            self.outcome,
        );
        if let Some(c) = &self.client_cert {
            let _ = write!(out, " client_cert={}", Value(c));
        }
    }
}

/// Inside quotes: `"` and `\` escaped, control characters as `\xNN`.
struct Escaped<'a>(&'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Mostly nothing to escape: one write.
        if !self.0.contains(needs_escape) {
            return f.write_str(self.0);
        }
        for c in self.0.chars() {
            match c {
                '"' | '\\' => write!(f, "\\{c}")?,
                c if c.is_control() || c == ' ' => write!(f, "\\x{:02x}", u32::from(c))?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

fn needs_escape(c: char) -> bool {
    c == '"' || c == '\\' || c == ' ' || c.is_control()
}

/// A `key=value` value: quoted when it holds a space, quote or `=`.
struct Value<'a>(&'a str);

impl std::fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty()
            || self.0.contains([' ', '"', '=', '\\'])
            || self.0.contains(char::is_control)
        {
            write!(f, "\"{}\"", Escaped(self.0))
        } else {
            f.write_str(self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        record_for("shop.example")
    }

    fn record_for(host: &'static str) -> Record {
        let log = log(1).0;
        let req = Request::post("/a?b=c")
            .header("host", host)
            .body(())
            .unwrap();
        let peer = "127.0.0.1:5000".parse().unwrap();
        let id = HeaderValue::from_static("rid-1");
        let mut r = log
            .entry(
                &req,
                peer,
                &Arc::from("web"),
                Some("api"),
                &id,
                Instant::now(),
            )
            .record;
        r.time = humantime::parse_rfc3339("2026-11-29T19:00:00.000Z").unwrap();
        r.status = 201;
        r.bytes_in = 3;
        r.bytes_out = 12;
        r.duration_us = 1500;
        r
    }

    /// A log whose writer never reads: its lines stay in `rx`.
    fn log(capacity: usize) -> (AccessLog, Receiver<Msg>, Counter) {
        let (tx, rx) = sync_channel(capacity);
        let dropped = Counter::default();
        let log = AccessLog {
            tx,
            dropped: dropped.clone(),
        };
        (log, rx, dropped)
    }

    fn entry(log: &AccessLog) -> Entry {
        let req = Request::get("http://shop.example/x?y=1").body(()).unwrap();
        let peer = "127.0.0.1:9".parse().unwrap();
        log.entry(
            &req,
            peer,
            &Arc::from("web"),
            None,
            &HeaderValue::from_static("id-1"),
            Instant::now(),
        )
    }

    fn response(body: &'static str) -> http::Response<ProxyBody> {
        http::Response::new(
            http_body_util::Full::new(bytes::Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )
    }

    fn next_record(rx: &Receiver<Msg>) -> Record {
        match rx.try_recv() {
            Ok(Msg::Line(r)) => r,
            Ok(Msg::Reopen(_)) => panic!("a reopen"),
            Err(e) => panic!("no line: {e}"),
        }
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_is_logged_once_with_its_bytes() {
        let (log, rx, _) = log(8);
        let resp = entry(&log).respond(response("hello"));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello");
        let r = next_record(&rx);
        assert_eq!((r.bytes_out, r.outcome, r.status), (5, "complete", 200));
        assert_eq!((r.authority(), r.path()), ("shop.example", "/x?y=1"));
        assert_eq!((r.request_id(), r.service()), ("id-1", "-"));
        assert!(rx.try_recv().is_err(), "logged twice");
    }

    #[test]
    fn a_body_dropped_before_its_end_is_logged_as_client_gone() {
        let (log, rx, _) = log(8);
        drop(entry(&log).respond(response("hello")));
        let r = next_record(&rx);
        assert_eq!((r.bytes_out, r.outcome), (0, "client_gone"));
        // An empty body dropped unpolled ended: complete.
        drop(entry(&log).respond(response("")));
        assert_eq!(next_record(&rx).outcome, "complete");
    }

    #[test]
    fn lines_over_the_channel_are_dropped_and_counted() {
        let (log, rx, dropped) = log(1);
        for _ in 0..3 {
            drop(entry(&log).respond(response("")));
        }
        assert_eq!(dropped.get(), 2);
        next_record(&rx);
        // A gone writer drops (and counts) too; the request never waits.
        drop(rx);
        drop(entry(&log).respond(response("")));
        assert_eq!(dropped.get(), 3);
    }

    #[test]
    fn the_human_line_has_every_field_and_escapes_spaces_and_quotes() {
        let r = record_for("a \"b");
        let mut s = String::new();
        r.format(LogFormat::Human, &mut s);
        assert_eq!(
            s,
            "2026-11-29T19:00:00.000Z web 127.0.0.1:5000 \"POST a\\x20\\\"b /a?b=c\" 201 \
             bytes_in=3 bytes_out=12 service=api instance=- attempts=0 duration_ms=1.500 \
             request_id=rid-1 outcome=complete"
        );
    }

    #[test]
    fn the_json_line_names_every_field() {
        let mut s = String::new();
        record().format(LogFormat::Json, &mut s);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["authority"], "shop.example");
        assert_eq!(v["path"], "/a?b=c");
        assert_eq!(v["instance"], "-");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["request_id"], "rid-1");
        assert_eq!(v["status"], 201);
    }
}
