//! The daemon's HTTP side on `[metrics] listen`: `GET /metrics` (Prometheus
//! text), `/healthz` (the process is alive), `/readyz` (config and model
//! loaded, listeners up, not draining), and when a token is configured
//! `POST /feedback` (a correction by Message-ID) and `POST /forget`
//! (erasure on request).
//!
//! Deliberately tiny: one request per connection, a bounded request head, a
//! read timeout and a connection cap, so a scraper gone wild cannot hurt mail
//! flow.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

const MAX_REQUEST_HEAD: usize = 8 * 1024;
const MAX_SCRAPERS: usize = 16;

#[derive(Debug, Error)]
#[error("cannot listen on {addr} for metrics")]
pub struct BindError {
    addr: String,
    source: std::io::Error,
}

/// Binds the metrics listener (so a bad address fails at start-up).
pub async fn bind(addr: &str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError { addr: addr.to_string(), source })
}

/// What a `POST` endpoint does with the JSON body (run off the reactor): a
/// JSON answer, or an HTTP status and a message.
pub type Handler = Arc<dyn Fn(serde_json::Value) -> Result<serde_json::Value, (u16, String)> + Send + Sync>;

/// The token-protected `POST` endpoints: one bearer token, and per path
/// (`/feedback`, `/forget`) its handler.
#[derive(Clone)]
pub struct PostEndpoints {
    pub token: String,
    pub routes: Vec<(&'static str, Handler)>,
}

impl PostEndpoints {
    fn route(&self, path: &str) -> Option<&Handler> {
        self.routes.iter().find(|(p, _)| *p == path).map(|(_, h)| h)
    }
}

/// The paths [`PostEndpoints`] may serve: any other method on them is a 405.
const POST_PATHS: [&str; 2] = ["/feedback", "/forget"];

/// The largest `POST` body accepted.
const MAX_BODY: usize = 8 * 1024;

/// Serves /metrics, /healthz, /readyz (and the `POST` endpoints when given)
/// until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    ready: Arc<AtomicBool>,
    posts: Option<PostEndpoints>,
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
        let (handle, ready, posts) = (handle.clone(), ready.clone(), posts.clone());
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
                ("POST", path) if POST_PATHS.contains(&path) => {
                    match posts.as_ref().and_then(|p| Some((p, p.route(path)?.clone()))) {
                        Some((p, handler)) => post(&p.token, handler, &req).await,
                        None => {
                            refused_at(path, "not_configured");
                            text("404 Not Found", "not configured: set [feedback] http_token_file\n")
                        }
                    }
                }
                (_, path) if POST_PATHS.contains(&path) => {
                    refused_at(path, "method_not_allowed");
                    text("405 Method Not Allowed", "use POST\n")
                }
                _ => text("404 Not Found", "not found\n"),
            };
            // A 503 is temporary (the store is down, the daemon not ready yet).
            let retry = if status.starts_with("503") { "Retry-After: 30\r\n" } else { "" };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n{retry}Connection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

async fn post(token: &str, handler: Handler, req: &Request) -> (&'static str, String, &'static str) {
    let json = "application/json";
    let err = |status: &'static str, msg: &str| (status, serde_json::json!({ "error": msg }).to_string() + "\n", json);
    let presented = req.header("authorization").and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    if !constant_time_eq(presented.trim().as_bytes(), token.as_bytes()) {
        refused_at(&req.path, "unauthorized");
        return err("401 Unauthorized", "missing or wrong bearer token");
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
        refused_at(&req.path, "bad_request");
        return err("400 Bad Request", "the body must be a JSON object");
    };
    match tokio::task::spawn_blocking(move || handler(value)).await {
        Ok(Ok(answer)) => ("200 OK", answer.to_string() + "\n", json),
        Ok(Err((code, msg))) => {
            let status = match code {
                400 => "400 Bad Request",
                404 => "404 Not Found",
                422 => "422 Unprocessable Entity",
                500 => "500 Internal Server Error",
                _ => "503 Service Unavailable",
            };
            err(status, &msg)
        }
        Err(_) => {
            refused_at(&req.path, "failed");
            err("500 Internal Server Error", "handler failed")
        }
    }
}

/// Counts a `POST /feedback` this layer refused before its handler ran (or
/// because it failed): the handler counts its own refusals, so each
/// refusal, whatever its status, is counted once.
fn refused_at(path: &str, reason: &'static str) {
    if path == "/feedback" {
        crate::record::recorder::Recorder::refused("http", reason);
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
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Arc::new(AtomicBool::new(false));
        let feedback: Handler = Arc::new(|v: serde_json::Value| match v.get("message_id").and_then(|m| m.as_str()) {
            Some("known@x") => Ok(serde_json::json!({ "recorded": 7 })),
            Some("down@x") => Err((503, "store down".into())),
            _ => Err((404, "no recent decision".into())),
        });
        let posts = PostEndpoints { token: "s3cret".into(), routes: vec![("/feedback", feedback)] };
        tokio::spawn(serve(listener, handle, ready.clone(), Some(posts)));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready.store(true, Ordering::Relaxed);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/metrics").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "/feedback").await.starts_with("HTTP/1.1 405"));
        assert!(get(addr, "/forget").await.starts_with("HTTP/1.1 405"));
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
        let down = post("s3cret", r#"{"message_id":"down@x"}"#).await;
        assert!(down.starts_with("HTTP/1.1 503") && down.contains("Retry-After: 30\r\n"), "{down}");
        // A client that never finishes its request is dropped, not served.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&vec![b'a'; MAX_REQUEST_HEAD + 10]).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn every_feedback_request_this_layer_refuses_is_counted() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // The server's tasks run on this (current-thread) runtime's thread.
        let _local = metrics::set_default_local_recorder(&recorder);
        let serve_on = |posts: Option<PostEndpoints>| async move {
            let listener = bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let handle = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
            tokio::spawn(serve(listener, handle, Arc::new(AtomicBool::new(true)), posts));
            addr
        };
        let request = |addr: std::net::SocketAddr, head: String| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let post = |path: &str, token: &str, body: &str| {
            format!(
                "POST {path} HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let ok: Handler = Arc::new(|_| Ok(serde_json::json!({ "recorded": 1 })));
        let posts = PostEndpoints { token: "s3cret".into(), routes: vec![("/feedback", ok.clone()), ("/forget", ok)] };
        let with = serve_on(Some(posts)).await;
        let without = serve_on(None).await;
        assert!(request(with, post("/feedback", "wrong!", "{}")).await.starts_with("HTTP/1.1 401"));
        assert!(request(with, post("/feedback", "s3cret", "not json")).await.starts_with("HTTP/1.1 400"));
        assert!(request(with, "GET /feedback HTTP/1.1\r\n\r\n".into()).await.starts_with("HTTP/1.1 405"));
        assert!(request(without, post("/feedback", "s3cret", "{}")).await.starts_with("HTTP/1.1 404"));
        // Not corrections: a refused erasure, and an accepted correction.
        assert!(request(with, post("/forget", "wrong!", "{}")).await.starts_with("HTTP/1.1 401"));
        assert!(request(with, post("/feedback", "s3cret", "{}")).await.starts_with("HTTP/1.1 200"));
        let text = handle.render();
        let counted: Vec<&str> =
            text.lines().filter(|l| l.starts_with(crate::record::metrics::name::FEEDBACK_REFUSED)).collect();
        assert_eq!(counted.len(), 4, "{text}");
        for reason in ["unauthorized", "bad_request", "method_not_allowed", "not_configured"] {
            assert!(counted.iter().any(|l| l.contains(&format!("reason=\"{reason}\"")) && l.ends_with(" 1")), "{text}");
        }
    }
}
