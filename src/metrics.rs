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

/// Serves /metrics, /healthz and /readyz until the task is dropped.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, ready: Arc<AtomicBool>) {
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
        let (handle, ready) = (handle.clone(), ready.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Some(path)) = tokio::time::timeout(Duration::from_secs(5), read_request_path(&mut stream)).await
            else {
                return;
            };
            let (status, body, kind) = match path.as_str() {
                "/metrics" => {
                    handle.run_upkeep();
                    ("200 OK", handle.render(), "text/plain; version=0.0.4")
                }
                "/healthz" => ("200 OK", "ok\n".to_string(), "text/plain"),
                "/readyz" if ready.load(Ordering::Relaxed) => ("200 OK", "ready\n".to_string(), "text/plain"),
                "/readyz" => ("503 Service Unavailable", "not ready\n".to_string(), "text/plain"),
                _ => ("404 Not Found", "not found\n".to_string(), "text/plain"),
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

/// The path of a `GET` request, reading at most the bounded head.
async fn read_request_path(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() + n > MAX_REQUEST_HEAD {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = std::str::from_utf8(&buf).ok()?.lines().next()?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) => Some(target.split('?').next().unwrap_or(target).to_string()),
        _ => None,
    }
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
        tokio::spawn(serve(listener, handle, ready.clone()));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready.store(true, Ordering::Relaxed);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/metrics").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        // A client that never finishes its request is dropped, not served.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&vec![b'a'; MAX_REQUEST_HEAD + 10]).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        assert!(out.is_empty());
    }
}
