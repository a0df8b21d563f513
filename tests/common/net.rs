//! Network set-up for the record tests: an in-process upstream for shapes no real server here
//! gives, the recorder started in-process, certificates, and real clients as child processes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use loadtape::record::{RecordConfig, RecordSummary, Recorder};
use sha2::Digest;
use tokio_util::sync::CancellationToken;

/// A JWT as Quay's /v2/auth issues them (issuer `quay`, one hour), throwaway.
pub const TOKEN: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJxdWF5IiwiaWF0IjoxNzk1NjQ1NTY5LCJleHAiOjE3OTU2NDkxNjl9.c2lnbmF0dXJl";

/// Fails the test, naming the Debian package, when a real client is not installed.
pub fn require(command: &str, package: &str) {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "test peer `{command}` is missing: install the Debian package `{package}` (bash .ci/test does)"
    );
}

/// Where `/presigned` redirects: an S3 URL whose signature and key id are credentials.
pub const PRESIGNED: &str = "https://s3.example.com/quay/sha256/ab?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAPRESIGNEDKEY%2F20261127&X-Amz-Expires=600&X-Amz-Signature=presigned0signature";

/// The in-process upstream:
/// `/json`, `/echo` (answers with what it received: headers, trailers, body length and sha256),
/// `/v2/` (a 401 whose token realm is at `quay.public.example`), `/v2/auth` (a token), `/sink` (takes a body of any size, answers its length), `/robot` (a
/// JSON body with a token), `/presigned` (a 307 to
/// [`PRESIGNED`]), `/status/N`, `/slow/MS`, `/bytes/N` (N bytes, streamed), `/ws` (a
/// protocol switch, then an echo).
pub struct Upstream {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Reply = http::Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>;

fn reply(status: u16, content_type: &str, body: impl Into<Bytes>) -> Reply {
    http::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).boxed())
        .unwrap()
}

async fn route(mut req: http::Request<Incoming>) -> Result<Reply, Infallible> {
    let path = req.uri().path().to_string();
    let mut seg = path.trim_start_matches('/').splitn(2, '/');
    let (first, arg) = (seg.next().unwrap_or(""), seg.next().unwrap_or(""));
    Ok(match first {
        "json" => reply(200, "application/json", r#"{"ok": true}"#),
        // A session cookie set by the server.
        "login" => {
            let mut r = reply(200, "text/plain", "welcome\n");
            r.headers_mut().insert(
                "set-cookie",
                http::HeaderValue::from_static("session=server-issued-secret; HttpOnly"),
            );
            r
        }
        // A protocol switch, then an echo of whatever bytes come.
        "ws" => {
            let upgraded = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(io) = upgraded.await {
                    let (mut r, mut w) = tokio::io::split(TokioIo::new(io));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            http::Response::builder()
                .status(101)
                .header("upgrade", "websocket")
                .header("connection", "upgrade")
                .body(Full::new(Bytes::new()).boxed())
                .unwrap()
        }
        // A registry's ping: a challenge naming its token realm at its public name.
        "v2" if arg.is_empty() => {
            let mut r = reply(401, "application/json", r#"{"errors": []}"#);
            r.headers_mut().insert(
                "www-authenticate",
                http::HeaderValue::from_static(
                    r#"Bearer realm="https://quay.public.example/v2/auth",service="quay.public.example""#,
                ),
            );
            r
        }
        "v2" if arg == "auth" => reply(
            200,
            "application/json",
            format!(r#"{{"token": "{TOKEN}"}}"#),
        ),
        // An upload taken and forgotten piece by piece (`/echo` collects it whole).
        "sink" => {
            let mut body = req.into_body();
            let mut len = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                len += frame.data_ref().map_or(0, |d| d.len());
            }
            reply(200, "application/json", format!(r#"{{"len": {len}}}"#))
        }
        // Quay creating a robot account: its token, in JSON.
        "robot" => reply(
            201,
            "application/json",
            r#"{"name": "org+bot", "token": "ROBOT0SECRET0TOKEN0VALUE0123456789"}"#,
        ),
        // A blob GET on Quay with S3 storage: a redirect to a presigned URL.
        "presigned" => {
            let mut r = reply(307, "text/plain", "");
            r.headers_mut()
                .insert("location", http::HeaderValue::from_static(PRESIGNED));
            r
        }
        "status" => reply(arg.parse().unwrap_or(500), "text/plain", "status\n"),
        "slow" => {
            tokio::time::sleep(Duration::from_millis(arg.parse().unwrap_or(100))).await;
            reply(200, "text/plain", "slow\n")
        }
        "bytes" => {
            let total: usize = arg.parse().unwrap_or(0);
            http::Response::builder()
                .header("content-type", "application/octet-stream")
                .body(Chunks { sent: 0, total }.boxed())
                .unwrap()
        }
        "echo" => {
            let version = format!("{:?}", req.version());
            // Every field, where `headers` keeps one value per name.
            let fields = req.headers().len();
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").into()))
                .collect();
            let collected = req.into_body().collect().await.ok();
            let trailers: serde_json::Map<String, serde_json::Value> = collected
                .as_ref()
                .and_then(|c| c.trailers())
                .into_iter()
                .flatten()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").into()))
                .collect();
            let body = collected.map(|c| c.to_bytes()).unwrap_or_default();
            let json = serde_json::json!({
                "version": version,
                "headers": headers,
                "trailers": trailers,
                "fields": fields,
                "len": body.len(),
                "sha256": hex(&sha2::Sha256::digest(&body)),
            });
            reply(200, "application/json", json.to_string())
        }
        _ => reply(404, "text/plain", "no such route\n"),
    })
}

/// The bytes `/bytes/N` serves from `offset`: a pattern, so that digests are checkable.
pub fn pattern(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `total` pattern bytes, 64 KiB a frame: a body that is streamed, never whole in memory.
struct Chunks {
    sent: usize,
    total: usize,
}

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let len = (self.total - self.sent).min(65536);
        if len == 0 {
            return std::task::Poll::Ready(None);
        }
        let data = Bytes::from(pattern(self.sent, len));
        self.sent += len;
        std::task::Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

pub async fn upstream() -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                a = listener.accept() => a.unwrap(),
                _ = stopped.cancelled() => return,
            };
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service_fn(route))
                    .await;
            });
        }
    });
    Upstream { addr, stop }
}

/// A recorder running in-process.
pub struct Running {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<RecordSummary>>,
    /// A test that fails before `stop` still stops the recorder: its threads would otherwise
    /// keep the test's runtime from shutting down, and the failure would show as a hang.
    _stop_on_drop: tokio_util::sync::DropGuard,
}

impl Running {
    /// Tells it to stop, as SIGTERM would, without waiting: it drains.
    pub fn cancel(&self) {
        self.stop.cancel();
    }

    /// Stops it as SIGTERM would, and waits for the tape to be closed.
    pub async fn stop(self) -> RecordSummary {
        self.stop.cancel();
        self.handle.await.unwrap().unwrap()
    }
}

/// A configuration forwarding to `upstream`, recording into `out`.
pub fn config(upstream: SocketAddr, out: &Path) -> RecordConfig {
    RecordConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        format!("http://{upstream}").parse().unwrap(),
        out.to_path_buf(),
    )
}

pub async fn start(config: RecordConfig) -> Running {
    let recorder = Recorder::bind(config).await.unwrap();
    let addr = recorder.local_addr();
    let admin = recorder.admin_addr();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(recorder.run(stop.clone()));
    Running {
        addr,
        admin,
        _stop_on_drop: stop.clone().drop_guard(),
        stop,
        handle,
    }
}

/// A self-signed certificate for `localhost`, written as PEM files.
pub fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

/// Runs curl with `args`; returns its stdout, failing the test on a non-zero exit.
pub async fn curl(args: &[&str]) -> String {
    require("curl", "curl");
    let out = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "30"])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
