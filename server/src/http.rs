//! The operator's HTTP surface: `/health`, `/status` (JSON), `/metrics`
//! (Prometheus text), and the operator page (`/`, with `/api/inbox` and
//! `/api/conflicts/{id}/resolve`), on axum (hyper). It never touches the
//! database: it renders what [`StatusSource`] holds, and hands the page's
//! questions and actions to the task that owns the node's operator
//! connection ([`OperatorRequest`], over a channel).
//!
//! # Who may ask
//!
//! On a loopback address anyone on the machine may `GET`; on any other
//! address every request but `/health` and the page itself (`/`, which
//! holds no data) needs `Authorization: Bearer <[http] token>` (the config
//! refuses a non-loopback address without a token). A request that would
//! change state (any method but `GET` and `HEAD`) needs the token on every
//! address, a JSON body, and either no `Origin` (a script) or the server's
//! own (the operator page): a page of another site cannot reach it. On
//! loopback the `Host` must name the loopback (a DNS-rebinding page names
//! its own host). The page may not be framed (`frame-ancestors 'none'`).
//! Refusals are 401 (no or wrong token) and 403 (host or origin), never a
//! hint of the token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get as route_get, post as route_post};
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// Whether a sample only grows (since the daemon started) or goes up and down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only grows; its name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One Prometheus sample.
#[derive(Debug, Clone)]
pub struct Metric {
    /// Metric name (a counter's ends in `_total`).
    pub name: String,
    /// HELP text.
    pub help: String,
    /// Counter or gauge.
    pub kind: MetricKind,
    /// Label pairs.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: f64,
}

/// What the server shows.
pub trait StatusSource: Send + Sync {
    /// `/status` body.
    fn status_json(&self) -> serde_json::Value;
    /// `/metrics` samples.
    fn metrics(&self) -> Vec<Metric>;
    /// `/health`: 200 when true, 503 otherwise.
    fn healthy(&self) -> bool;
}

/// One scrape's samples, handed to `prometheus-client`'s encoder: families
/// in the order their first sample came, each with its HELP and TYPE once.
#[derive(Debug)]
struct Scrape(Vec<Metric>);

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType;
        let mut families: Vec<(&str, Vec<&Metric>)> = Vec::new();
        for m in &self.0 {
            match families.iter_mut().find(|(n, _)| *n == m.name) {
                Some((_, v)) => v.push(m),
                None => families.push((&m.name, vec![m])),
            }
        }
        for (name, samples) in families {
            let first = samples[0];
            let (name, kind) = match first.kind {
                // The encoder appends `_total` to a counter's name.
                MetricKind::Counter => (name.strip_suffix("_total").unwrap_or(name), MetricType::Counter),
                MetricKind::Gauge => (name, MetricType::Gauge),
            };
            let mut family = encoder.encode_descriptor(name, &first.help, None, kind)?;
            for m in samples {
                let mut sample = family.encode_family(&m.labels)?;
                // Whole numbers (most of ours: counts, bytes) print without
                // a fraction, as they always have.
                let whole = m.value.fract() == 0.0 && m.value.abs() < 9.0e15;
                match m.kind {
                    MetricKind::Counter if whole && m.value >= 0.0 => sample.encode_counter::<prometheus_client::encoding::NoLabelSet, _, f64>(&(m.value as u64), None)?,
                    MetricKind::Counter => sample.encode_counter::<prometheus_client::encoding::NoLabelSet, _, f64>(&m.value, None)?,
                    MetricKind::Gauge if whole => sample.encode_gauge(&(m.value as i64))?,
                    MetricKind::Gauge => sample.encode_gauge(&m.value)?,
                }
            }
        }
        Ok(())
    }
}

/// Renders samples in the Prometheus text format (version 0.0.4), with the
/// `prometheus-client` crate's encoder (names, escaping of label values).
pub fn render_metrics(ms: &[Metric]) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Scrape(ms.to_vec())));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "cannot render the metrics");
    }
    out
}

/// Who may ask what (see the module documentation).
#[derive(Clone, Default)]
pub struct HttpAccess {
    /// `[http] token`: required off loopback and for any state change.
    pub token: Option<String>,
}

/// What the operator page asks of the node's database; the task that owns
/// the operator connection answers (JSON, or an error message for people).
#[derive(Debug)]
pub enum OperatorRequest {
    /// Unsettled conflict records (quarantined changes among them), newest
    /// first, with both versions; and the parked rows.
    Inbox { reply: oneshot::Sender<Result<serde_json::Value, String>> },
    /// Settle record `id`, keeping the local version or writing the remote
    /// one back (as `branchsync conflicts resolve`).
    Resolve { id: i64, keep_remote: bool, reply: oneshot::Sender<Result<serde_json::Value, String>> },
}

#[derive(Clone)]
struct AppState {
    source: Arc<dyn StatusSource>,
    access: HttpAccess,
    loopback: bool,
    operator: Option<mpsc::Sender<OperatorRequest>>,
}

/// The operator page: one HTML file, its script inline, no external
/// resource.
const PAGE: &str = include_str!("operator.html");

/// Compares two secrets in time independent of where they differ.
pub fn tokens_equal(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer_ok(headers: &HeaderMap, token: Option<&str>) -> bool {
    let Some(token) = token else { return false };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| tokens_equal(given.trim(), token))
}

/// The host part of a `Host` header (`[::1]:7071` → `::1`).
fn host_name(h: &str) -> &str {
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    h.rsplit_once(':').map_or(h, |(n, _)| n)
}

async fn guard(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    if st.loopback {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).map(host_name).unwrap_or("");
        if !matches!(host, "127.0.0.1" | "localhost" | "::1") {
            return (StatusCode::FORBIDDEN, "forbidden: the Host header must name the loopback address\n").into_response();
        }
    }
    let reads = req.method() == Method::GET || req.method() == Method::HEAD;
    if !reads {
        // Only a script (no Origin) or the operator page itself (this
        // server's own origin) may change state.
        let own = headers.get(header::HOST).and_then(|v| v.to_str().ok()).map(|h| format!("http://{h}"));
        if let Some(origin) = headers.get(header::ORIGIN) {
            if own.is_none_or(|own| origin.to_str().ok() != Some(own.as_str())) {
                return (StatusCode::FORBIDDEN, "forbidden: requests from web pages of other origins may not change state\n").into_response();
            }
        }
    }
    let open = matches!(req.uri().path(), "/health" | "/");
    let needs_token = !reads || (!st.loopback && !open);
    if needs_token && !bearer_ok(headers, st.access.token.as_deref()) {
        return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "unauthorized: send Authorization: Bearer <[http] token>\n").into_response();
    }
    next.run(req).await
}

async fn health(State(st): State<AppState>) -> Response {
    if st.source.healthy() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n").into_response()
    }
}

async fn status(State(st): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], st.source.status_json().to_string()).into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, prometheus_client::encoding::prometheus_text::CONTENT_TYPE)], render_metrics(&st.source.metrics())).into_response()
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

/// Hands a request to the operator task and waits for its answer.
async fn ask_operator(st: &AppState, make: impl FnOnce(oneshot::Sender<Result<serde_json::Value, String>>) -> OperatorRequest) -> Response {
    let Some(tx) = &st.operator else { return (StatusCode::NOT_FOUND, "this node serves no operator actions\n").into_response() };
    let (reply, rx) = oneshot::channel();
    if tx.send(make(reply)).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the node is stopping\n").into_response();
    }
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(Ok(v))) => ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response(),
        Ok(Ok(Err(e))) => (StatusCode::CONFLICT, [(header::CONTENT_TYPE, "application/json")], serde_json::json!({ "error": e }).to_string()).into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "the database did not answer in time\n").into_response(),
    }
}

async fn inbox(State(st): State<AppState>) -> Response {
    ask_operator(&st, |reply| OperatorRequest::Inbox { reply }).await
}

async fn resolve(State(st): State<AppState>, Path(id): Path<i64>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    // A JSON body: a cross-site form cannot send one without asking first.
    let json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    let keep = serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v.get("keep").and_then(|k| k.as_str()).map(str::to_string));
    let keep_remote = match (json, keep.as_deref()) {
        (true, Some("local")) => false,
        (true, Some("remote")) => true,
        _ => return (StatusCode::BAD_REQUEST, "send Content-Type: application/json and {\"keep\": \"local\"} or {\"keep\": \"remote\"}\n").into_response(),
    };
    ask_operator(&st, |reply| OperatorRequest::Resolve { id, keep_remote, reply }).await
}

/// Serves until `shutdown` turns true; in-flight requests finish first.
/// `operator`: where the page's questions and actions go (none: the page
/// shows the status only).
pub async fn serve(listener: TcpListener, source: Arc<dyn StatusSource>, access: HttpAccess, operator: Option<mpsc::Sender<OperatorRequest>>, mut shutdown: watch::Receiver<bool>) {
    let loopback = listener.local_addr().is_ok_and(|a: SocketAddr| a.ip().is_loopback());
    let st = AppState { source, access, loopback, operator };
    let app = Router::new()
        .route("/", route_get(page))
        .route("/api/inbox", route_get(inbox))
        .route("/api/conflicts/{id}/resolve", route_post(resolve))
        .route("/health", route_get(health))
        .route("/status", route_get(status))
        .route("/metrics", route_get(metrics))
        .layer(axum::middleware::from_fn_with_state(st.clone(), guard))
        .with_state(st);
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
        tracing::error!(error = %e, "the HTTP server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl StatusSource for Fixed {
        fn status_json(&self) -> serde_json::Value {
            serde_json::json!({"node": "main"})
        }
        fn metrics(&self) -> Vec<Metric> {
            vec![
                Metric { name: "x_total".into(), help: "X.".into(), kind: MetricKind::Counter, labels: vec![("peer".into(), "b\"1".into())], value: 3.0 },
                Metric { name: "y".into(), help: "Y.".into(), kind: MetricKind::Gauge, labels: vec![], value: 0.5 },
                Metric { name: "x_total".into(), help: "X.".into(), kind: MetricKind::Counter, labels: vec![("peer".into(), "b2".into())], value: 4.0 },
            ]
        }
        fn healthy(&self) -> bool {
            true
        }
    }

    async fn get(port: u16, path: &str) -> String {
        request(port, &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")).await
    }

    async fn request(port: u16, text: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(text.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_status_metrics_health_and_404_then_stops() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(serve(l, Arc::new(Fixed), HttpAccess::default(), None, rx));
        assert!(get(port, "/health").await.starts_with("HTTP/1.1 200"));
        let st = get(port, "/status").await;
        assert!(st.contains("application/json") && st.ends_with("{\"node\":\"main\"}"), "{st}");
        // DNS rebinding: a page of another host reaching the loopback.
        let rebound = request(port, &format!("GET /status HTTP/1.1\r\nHost: evil.example:{port}\r\nConnection: close\r\n\r\n")).await;
        assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
        // A state change without the token, on loopback.
        let post = request(port, &format!("POST /status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")).await;
        assert!(post.starts_with("HTTP/1.1 401"), "{post}");
        // The operator page's own origin is let through to the token check;
        // any other origin is refused before it.
        let own = request(port, &format!("POST /api/conflicts/1/resolve HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")).await;
        assert!(own.starts_with("HTTP/1.1 401"), "{own}");
        let other = request(port, &format!("POST /api/conflicts/1/resolve HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:9\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")).await;
        assert!(other.starts_with("HTTP/1.1 403"), "{other}");
        // The page itself: HTML that may not be framed.
        let page = get(port, "/").await;
        assert!(page.starts_with("HTTP/1.1 200") && page.contains("frame-ancestors 'none'") && page.contains("<title>branchsync</title>"), "{page}");
        let m = get(port, "/metrics").await;
        assert_eq!(m.matches("# TYPE x_total counter").count(), 1, "{m}");
        assert!(m.contains("x_total{peer=\"b\\\"1\"} 3"), "{m}");
        assert!(m.contains("x_total{peer=\"b2\"} 4\n"), "{m}");
        assert!(m.contains("# TYPE y gauge\ny 0.5\n"), "{m}");
        assert!(get(port, "/nope").await.starts_with("HTTP/1.1 404"));
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
    }
}

/// `GET path` of a daemon's HTTP server at `addr`: the body of a 200 answer.
/// Used by `branchsync status` and the scenario runner.
pub async fn get(addr: &str, path: &str) -> std::io::Result<String> {
    get_with_token(addr, path, None).await
}

/// [`get`] with `Authorization: Bearer <token>` when a token is given.
pub async fn get_with_token(addr: &str, path: &str, token: Option<&str>) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind};
    let timed_out = |_| Error::new(ErrorKind::TimedOut, format!("no answer from {addr}"));
    let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await.map_err(timed_out)??;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.map_err(timed_out)??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| Error::new(ErrorKind::InvalidData, "malformed HTTP response"))?;
    if !(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200")) {
        return Err(Error::other(format!("daemon answered: {}", head.lines().next().unwrap_or(""))));
    }
    Ok(body.to_string())
}
