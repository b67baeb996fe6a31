//! `http_head`: HTTP/1.1 request heads sent to a running proxy over a real
//! socket. The proxy (started once per process with a tiny config and one
//! in-process backend) must answer or close, never crash and never keep a
//! half-closed connection open past `HANG`.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use datapunk_lb::config::Config;
use datapunk_lb::server::Server;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// Longer than anything the proxy should take with a local backend.
const HANG: Duration = Duration::from_secs(10);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

struct Proxy {
    rt: Runtime,
    addr: SocketAddr,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// A backend that answers every request head with a fixed response.
async fn backend() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("backend bind: {e}"));
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut seen = Vec::new();
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        seen.clear();
                        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(r).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    port
}

fn proxy() -> &'static Proxy {
    static PROXY: OnceLock<Proxy> = OnceLock::new();
    PROXY.get_or_init(|| {
        let rt = Runtime::new().unwrap_or_else(|e| panic!("runtime: {e}"));
        let (listen, admin) = (free_port(), free_port());
        let addr: SocketAddr = ([127, 0, 0, 1], listen).into();
        rt.block_on(async {
            let backend = backend().await;
            let src = format!(
                r#"
[admin]
listen = "127.0.0.1:{admin}"
[[listener]]
name = "web"
listen = "127.0.0.1:{listen}"
[[listener.route]]
path_prefix = "/"
service = "api"
[service.api]
request_timeout = "2s"
connect_timeout = "1s"
[[service.api.instance]]
id = "b1"
address = "127.0.0.1"
port = {backend}
"#
            );
            let config = Config::parse(&src).unwrap_or_else(|e| panic!("config: {e}"));
            let server = Server::start(config)
                .await
                .unwrap_or_else(|e| panic!("start: {e}"));
            // Kept for the life of the process.
            std::mem::forget(server);
        });
        Proxy { rt, addr }
    })
}

fuzz_target!(|data: &[u8]| {
    let p = proxy();
    p.rt.block_on(async {
        let run = async {
            let mut s = TcpStream::connect(p.addr).await?;
            s.write_all(data).await?;
            s.shutdown().await?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        match tokio::time::timeout(HANG, run).await {
            Err(_) => panic!("no answer and no close within {HANG:?}"),
            // A reset is a close.
            Ok(Err(_)) => {}
            Ok(Ok(out)) => {
                // After the h2 preface the proxy speaks HTTP/2 (h2c prior
                // knowledge): frames, not an HTTP/1 status line.
                if !out.is_empty() && !data.starts_with(H2_PREFACE) {
                    assert!(out.starts_with(b"HTTP/1."), "not an HTTP response: {out:?}");
                }
            }
        }
    });
});
