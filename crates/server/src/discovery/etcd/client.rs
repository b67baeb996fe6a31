//! A thin etcd v3 client over the generated stubs of [`super::pb`]: the
//! calls etcd discovery, the admin API's writes and the `register` sidecar
//! make (range, put, delete, watch, lease grant/keep-alive/revoke), and no
//! more. The e2e tests and the etcd bench use it too.
//!
//! Why our own: every etcd client crate generates its gRPC code in a build
//! script that needs `protoc`, so the default build (etcd included) failed
//! on a machine with only the Rust toolchain. The generated code is checked
//! in instead (`scripts/gen-etcd-proto.sh`), and this file is what the
//! crate gave us on top of it.
//!
//! One [`Client`] is one HTTP/2 connection to one member, connected eagerly
//! (an unreachable member fails at connect, not at the first call), with
//! HTTP/2 keep-alive pings every [`KEEP_ALIVE_EVERY`]. Which member, and
//! what to do when it fails, is the caller's rule (see [`super`]). Calls
//! carry no deadline here: the callers put one on each. Reads are
//! linearizable (etcd's default), which the quorum check of a quiet watch
//! relies on.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

use super::pb::etcdserverpb::kv_client::KvClient;
use super::pb::etcdserverpb::lease_client::LeaseClient;
use super::pb::etcdserverpb::watch_client::WatchClient;
use super::pb::etcdserverpb::watch_request::RequestUnion;
use super::pb::etcdserverpb::{
    DeleteRangeRequest, DeleteRangeResponse, LeaseGrantRequest, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseRevokeRequest, PutRequest, PutResponse, RangeRequest,
    RangeResponse, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use super::tls::{client_config, EtcdConnector};
use super::CALL_TIMEOUT;
use crate::config::EtcdTls;

/// Interval of the HTTP/2 keep-alive pings (a ping unanswered within
/// `CALL_TIMEOUT` closes the connection, so a half-open one is noticed).
pub const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(5);

/// Room for requests queued on a watch or keep-alive stream.
const STREAM_REQUESTS: usize = 16;

/// Why a call to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed, or the connection broke.
    #[error("transport error: {}", causes(.0))]
    Transport(#[from] tonic::transport::Error),
    /// etcd (or the gRPC layer) answered with an error status.
    #[error("grpc request error: {0}")]
    Status(#[from] tonic::Status),
    /// A keep-alive for a lease etcd no longer has (expired or revoked).
    #[error("lease {0:x} not found (expired or revoked)")]
    LeaseNotFound(i64),
    /// The TLS settings could not be loaded (the message names the file).
    #[error("tls: {0}")]
    Tls(String),
    /// etcd answered out of protocol, or a stream ended early.
    #[error("{0}")]
    Protocol(String),
}

/// The causes of `e` (tonic's transport error says only "transport error";
/// the reason, such as "Connection refused", is in its sources).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut next = e.source();
    while let Some(cause) = next {
        parts.push(cause.to_string());
        next = cause.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

/// The end of the key range holding every key that starts with `prefix`
/// (etcd's rule: the prefix with its last byte below 0xff incremented and
/// the 0xff bytes after it dropped; `\0`, "every key", when there is none).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The endpoint of `url` with the deadlines and keep-alives of every
/// connection.
fn endpoint(url: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(CALL_TIMEOUT)
        .http2_keep_alive_interval(KEEP_ALIVE_EVERY)
        .keep_alive_timeout(CALL_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// A connection to one etcd member.
#[derive(Debug, Clone)]
pub struct Client {
    kv: KvClient<Channel>,
    watch: WatchClient<Channel>,
    lease: LeaseClient<Channel>,
}

impl Client {
    /// Connects to the member at `url` (`http://host:port`), within
    /// `CALL_TIMEOUT`.
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Ok(Self::over(endpoint(url)?.connect().await?))
    }

    /// Connects to the member at `url` (`https://host:port`) over TLS with
    /// the settings of `tls` (files read now, see `etcd/tls.rs`), within
    /// `CALL_TIMEOUT`.
    pub async fn connect_tls(url: &str, tls: &EtcdTls) -> Result<Self, ClientError> {
        let config = client_config(tls).map_err(ClientError::Tls)?;
        let channel = endpoint(url)?
            .connect_with_connector(EtcdConnector::new(config))
            .await?;
        Ok(Self::over(channel))
    }

    fn over(channel: Channel) -> Self {
        Self {
            kv: KvClient::new(channel.clone()),
            watch: WatchClient::new(channel.clone()),
            lease: LeaseClient::new(channel),
        }
    }

    /// The key `key` (a linearizable read: it fails on a member cut off
    /// from the quorum).
    pub async fn get(&mut self, key: impl Into<Vec<u8>>) -> Result<RangeResponse, ClientError> {
        let request = RangeRequest {
            key: key.into(),
            ..RangeRequest::default()
        };
        Ok(self.kv.range(request).await?.into_inner())
    }

    /// Every key under `prefix`, at one revision (the header's).
    pub async fn get_prefix(&mut self, prefix: &str) -> Result<RangeResponse, ClientError> {
        let request = RangeRequest {
            key: prefix.into(),
            range_end: prefix_end(prefix.as_bytes()),
            ..RangeRequest::default()
        };
        Ok(self.kv.range(request).await?.into_inner())
    }

    /// Puts `key` = `value` under `lease` (0: none). The answer holds the
    /// previous value, if there was one.
    pub async fn put(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: i64,
    ) -> Result<PutResponse, ClientError> {
        let request = PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            prev_kv: true,
            ..PutRequest::default()
        };
        Ok(self.kv.put(request).await?.into_inner())
    }

    /// Deletes `key`; the answer says how many keys went (0 or 1).
    pub async fn delete(
        &mut self,
        key: impl Into<Vec<u8>>,
    ) -> Result<DeleteRangeResponse, ClientError> {
        let request = DeleteRangeRequest {
            key: key.into(),
            ..DeleteRangeRequest::default()
        };
        Ok(self.kv.delete_range(request).await?.into_inner())
    }

    /// Watches every key under `prefix` from `start_revision` on. Returns
    /// once etcd has created the watch.
    pub async fn watch_prefix(
        &mut self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<Watch, ClientError> {
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: prefix.into(),
                range_end: prefix_end(prefix.as_bytes()),
                start_revision,
                ..WatchCreateRequest::default()
            })),
        };
        // etcd answers (headers included) only once it has a request, so
        // the creation is queued before the call.
        let (requests, mut responses) = open_stream(create, |r| self.watch.watch(r)).await?;
        match responses.message().await? {
            Some(r) if r.canceled => Err(ClientError::Protocol(format!(
                "watch refused by etcd: {:?} (compact revision {})",
                r.cancel_reason, r.compact_revision
            ))),
            Some(r) if r.created => Ok(Watch {
                requests,
                responses,
            }),
            Some(_) => Err(ClientError::Protocol(
                "watch: etcd's first answer is not the creation".into(),
            )),
            None => Err(ClientError::Protocol(
                "watch: stream closed before the watch was created".into(),
            )),
        }
    }

    /// Grants a lease of `ttl_secs`; returns its id.
    pub async fn lease_grant(&mut self, ttl_secs: i64) -> Result<i64, ClientError> {
        let request = LeaseGrantRequest {
            ttl: ttl_secs,
            id: 0,
        };
        let r = self.lease.lease_grant(request).await?.into_inner();
        if r.error.is_empty() {
            Ok(r.id)
        } else {
            Err(ClientError::Protocol(format!("lease grant: {}", r.error)))
        }
    }

    /// Revokes lease `id`: its keys leave at once.
    pub async fn lease_revoke(&mut self, id: i64) -> Result<(), ClientError> {
        self.lease.lease_revoke(LeaseRevokeRequest { id }).await?;
        Ok(())
    }

    /// Opens a keep-alive stream for lease `id` and renews it once;
    /// [`ClientError::LeaseNotFound`] if etcd no longer has it.
    pub async fn lease_keep_alive(&mut self, id: i64) -> Result<KeepAlive, ClientError> {
        let first = LeaseKeepAliveRequest { id };
        let (requests, responses) = open_stream(first, |r| self.lease.lease_keep_alive(r)).await?;
        let mut keep = KeepAlive {
            id,
            requests,
            responses,
        };
        match keep.answer().await? {
            Some(ttl) if ttl > 0 => Ok(keep),
            Some(_) => Err(ClientError::LeaseNotFound(id)),
            None => Err(ClientError::Protocol(
                "lease keep-alive: stream closed before the first answer".into(),
            )),
        }
    }
}

/// Opens a bidirectional stream whose first request is `first`.
async fn open_stream<Req, Resp, F, Fut>(
    first: Req,
    call: F,
) -> Result<(mpsc::Sender<Req>, Streaming<Resp>), ClientError>
where
    F: FnOnce(ReceiverStream<Req>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<Streaming<Resp>>, tonic::Status>>,
{
    let (requests, queued) = mpsc::channel(STREAM_REQUESTS);
    requests
        .try_send(first)
        .map_err(|_| ClientError::Protocol("request stream closed".into()))?;
    let responses = call(ReceiverStream::new(queued)).await?.into_inner();
    Ok((requests, responses))
}

/// Queues `request` on a stream's request side.
async fn send<T>(requests: &mpsc::Sender<T>, request: T, what: &str) -> Result<(), ClientError> {
    requests
        .send(request)
        .await
        .map_err(|_| ClientError::Protocol(format!("{what}: request stream closed")))
}

/// A created watch: its request side (for progress requests) and its
/// answers. Dropping it ends the stream.
#[derive(Debug)]
pub struct Watch {
    requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
}

impl Watch {
    /// Asks etcd for a progress answer (no events, the current revision).
    pub async fn request_progress(&mut self) -> Result<(), ClientError> {
        let request = WatchRequest {
            request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
        };
        send(&self.requests, request, "watch progress request").await
    }

    /// The next answer, or `None` when etcd closed the stream.
    pub async fn message(&mut self) -> Result<Option<WatchResponse>, ClientError> {
        Ok(self.responses.message().await?)
    }
}

/// An open keep-alive stream for one lease.
#[derive(Debug)]
pub struct KeepAlive {
    id: i64,
    requests: mpsc::Sender<LeaseKeepAliveRequest>,
    responses: Streaming<LeaseKeepAliveResponse>,
}

impl KeepAlive {
    /// Renews the lease: the TTL etcd gives it now (0 or less: the lease
    /// is gone), or `None` when etcd closed the stream.
    pub async fn renew(&mut self) -> Result<Option<i64>, ClientError> {
        let request = LeaseKeepAliveRequest { id: self.id };
        send(&self.requests, request, "lease keep-alive").await?;
        self.answer().await
    }

    async fn answer(&mut self) -> Result<Option<i64>, ClientError> {
        Ok(self.responses.message().await?.map(|r| r.ttl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_prefix_plus_one() {
        assert_eq!(prefix_end(b"/datapunk/services/"), b"/datapunk/services0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"a\xfe\xff\xff"), b"a\xff");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    #[tokio::test]
    async fn a_refused_connect_says_why() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let err = Client::connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Transport(_)), "{err:?}");
        let text = err.to_string();
        assert!(
            text.starts_with("transport error: ") && text.to_lowercase().contains("refused"),
            "{text}"
        );
    }
}
