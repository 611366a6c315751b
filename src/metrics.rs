//! Prometheus metrics and health endpoints.
//!
//! The counters and histograms are recorded with the `metrics` facade all
//! over the crate (a no-op when no recorder is installed, as in `classify`);
//! `serve` installs the Prometheus recorder and answers on `[metrics] listen`:
//! `GET /metrics` (text exposition), `/healthz` (the process is alive),
//! `/readyz` (config and model loaded, listeners up).
//!
//! The HTTP side is deliberately tiny: one GET per connection, a bounded
//! request head, a read timeout and a connection cap, so a scraper gone wild
//! cannot hurt mail flow.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Names of every metric, in one place.
pub mod name {
    pub const MESSAGES: &str = "mailtriage_messages_total";
    pub const FAILED_OPEN: &str = "mailtriage_decisions_failed_total";
    pub const EXTRACT_SECONDS: &str = "mailtriage_extract_seconds";
    pub const QUEUE_WAIT_SECONDS: &str = "mailtriage_inference_queue_wait_seconds";
    pub const INFERENCE_SECONDS: &str = "mailtriage_inference_seconds";
    pub const DECISION_SECONDS: &str = "mailtriage_decision_seconds";
    pub const QUEUE_DEPTH: &str = "mailtriage_inference_queue_depth";
    pub const CONNECTIONS: &str = "mailtriage_connections_open";
    pub const INFO: &str = "mailtriage_info";
    /// Model decisions by how they were reached: `lexical` (the cascade's
    /// lexical head was sure), `cache` (same text seen before), `encoder`,
    /// `overload` (queue full or deadline passed: the lexical head decided).
    pub const MODEL_PATH: &str = "mailtriage_model_decisions_total";
    /// SMTP/LMTP front doors: messages relayed to the next hop, by result.
    pub const RELAY: &str = "mailtriage_relay_total";
    /// Corrections recorded, by department (as configured) and channel: the misroute rate.
    pub const FEEDBACK: &str = "mailtriage_feedback_corrections_total";
    /// Corrections refused (unknown department or priority), by channel.
    pub const FEEDBACK_REFUSED: &str = "mailtriage_feedback_refused_total";
    /// Retrainings by head and result (`promoted`, `refused`, `failed`).
    pub const RETRAIN: &str = "mailtriage_retrain_total";
    /// The version number of the head in use, per head (0: the configured file).
    pub const HEAD_VERSION: &str = "mailtriage_head_version";
    /// Estimated staff minutes saved: `[kpi] minutes_per_manual_triage` per
    /// message routed without review, less one per correction.
    pub const MINUTES_SAVED: &str = "mailtriage_staff_minutes_saved";
}

/// Latency buckets (seconds): sub-millisecond rules up to multi-second model waits.
const BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

const MAX_REQUEST_HEAD: usize = 8 * 1024;
const MAX_SCRAPERS: usize = 16;

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("installing the Prometheus recorder: {0}")]
    Install(String),
    #[error("cannot listen on {addr} for metrics")]
    Bind { addr: String, source: std::io::Error },
}

/// Installs the global Prometheus recorder. Call once, before anything records.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .map_err(|e| MetricsError::Install(e.to_string()))?
        .install_recorder()
        .map_err(|e| MetricsError::Install(e.to_string()))
}

/// Publishes what is running as `mailtriage_info{version,config_version,model} 1`,
/// and sets the series of the set it replaces (after a reload) to 0, so
/// exactly one series reads 1.
pub fn set_info(config_version: &str, model: &str, replaced: Option<(&str, &str)>) {
    let series = |c: &str, m: &str| {
        metrics::gauge!(
            name::INFO,
            "version" => env!("CARGO_PKG_VERSION"),
            "config_version" => c.to_string(),
            "model" => m.to_string()
        )
    };
    if let Some((c, m)) = replaced {
        series(c, m).set(0.0);
    }
    series(config_version, model).set(1.0);
}

/// Binds the metrics listener (so a bad address fails at start-up).
pub async fn bind(addr: &str) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr: addr.to_string(), source })
}

/// `POST /feedback`: a bearer token and what to do with the JSON body. The
/// handler (run off the reactor) returns the stored correction's id, or an
/// HTTP status and a message.
#[derive(Clone)]
pub struct FeedbackEndpoint {
    pub token: String,
    #[allow(clippy::type_complexity)]
    pub handler: Arc<dyn Fn(serde_json::Value) -> Result<i64, (u16, String)> + Send + Sync>,
}

/// The largest `POST /feedback` body accepted.
const MAX_BODY: usize = 8 * 1024;

/// Serves /metrics, /healthz, /readyz (and `POST /feedback` when given)
/// until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    ready: Arc<AtomicBool>,
    feedback: Option<FeedbackEndpoint>,
) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            // EMFILE and friends: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // over the cap: drop the connection
        };
        let (handle, ready, feedback) = (handle.clone(), ready.clone(), feedback.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Some(req)) = tokio::time::timeout(Duration::from_secs(5), read_request(&mut stream)).await else {
                return;
            };
            let text = |s: &'static str, b: &str| (s, b.to_string(), "text/plain");
            let (status, body, kind) = match (req.method.as_str(), req.path.as_str()) {
                ("GET", "/metrics") => {
                    handle.run_upkeep();
                    ("200 OK", handle.render(), "text/plain; version=0.0.4")
                }
                ("GET", "/healthz") => text("200 OK", "ok\n"),
                ("GET", "/readyz") if ready.load(Ordering::Relaxed) => text("200 OK", "ready\n"),
                ("GET", "/readyz") => text("503 Service Unavailable", "not ready\n"),
                ("POST", "/feedback") => match feedback {
                    Some(f) => post_feedback(&f, &req).await,
                    None => text("404 Not Found", "feedback over HTTP is not configured\n"),
                },
                (_, "/feedback") => text("405 Method Not Allowed", "use POST\n"),
                _ => text("404 Not Found", "not found\n"),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

async fn post_feedback(f: &FeedbackEndpoint, req: &Request) -> (&'static str, String, &'static str) {
    let json = "application/json";
    let err = |status: &'static str, msg: &str| (status, serde_json::json!({ "error": msg }).to_string() + "\n", json);
    let presented = req.header("authorization").and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    if !constant_time_eq(presented.trim().as_bytes(), f.token.as_bytes()) {
        return err("401 Unauthorized", "missing or wrong bearer token");
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
        return err("400 Bad Request", "the body must be a JSON object");
    };
    let handler = f.handler.clone();
    match tokio::task::spawn_blocking(move || handler(value)).await {
        Ok(Ok(id)) => ("200 OK", serde_json::json!({ "recorded": id }).to_string() + "\n", json),
        Ok(Err((code, msg))) => {
            let status = match code {
                400 => "400 Bad Request",
                404 => "404 Not Found",
                422 => "422 Unprocessable Entity",
                _ => "503 Service Unavailable",
            };
            err(status, &msg)
        }
        Err(_) => err("500 Internal Server Error", "feedback handler failed"),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && !b.is_empty() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A request: method, path (without query), headers, body.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Reads a bounded request head, then a body of at most [`MAX_BODY`] bytes.
async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Request> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() + n > MAX_REQUEST_HEAD + MAX_BODY {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST_HEAD && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return None;
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let mut lines = head.lines();
    let mut parts = lines.next()?.split(' ');
    let (method, target) = (parts.next()?.to_string(), parts.next()?);
    let path = target.split('?').next().unwrap_or(target).to_string();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_string(), v.trim().to_string())).collect();
    let mut req = Request { method, path, headers, body: buf[head_end..].to_vec() };
    let length: usize = req.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    if length > MAX_BODY {
        return None;
    }
    while req.body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        req.body.extend_from_slice(&chunk[..n]);
    }
    req.body.truncate(length);
    Some(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn endpoints_answer_and_readiness_follows_the_flag() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Arc::new(AtomicBool::new(false));
        let feedback = FeedbackEndpoint {
            token: "s3cret".into(),
            handler: Arc::new(|v: serde_json::Value| match v.get("message_id").and_then(|m| m.as_str()) {
                Some("known@x") => Ok(7),
                _ => Err((404, "no recent decision".into())),
            }),
        };
        tokio::spawn(serve(listener, handle, ready.clone(), Some(feedback)));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready.store(true, Ordering::Relaxed);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/metrics").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "/feedback").await.starts_with("HTTP/1.1 405"));
        let post = |token: &'static str, body: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!(
                "POST /feedback HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = post("s3cret", r#"{"message_id":"known@x","department":"billing"}"#).await;
        assert!(ok.starts_with("HTTP/1.1 200") && ok.contains(r#"{"recorded":7}"#), "{ok}");
        assert!(post("wrong!", r#"{"message_id":"known@x"}"#).await.starts_with("HTTP/1.1 401"));
        assert!(post("s3cret", r#"{"message_id":"other@x"}"#).await.starts_with("HTTP/1.1 404"));
        assert!(post("s3cret", "not json").await.starts_with("HTTP/1.1 400"));
        // A client that never finishes its request is dropped, not served.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&vec![b'a'; MAX_REQUEST_HEAD + 10]).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        assert!(out.is_empty());
    }
}
