//! A tiny HTTP/1.1 server for `/health`, `/status` (JSON) and `/metrics`
//! (Prometheus text). One task per connection, a 5 s read timeout, 8 KiB of
//! request at most, `Connection: close` after every answer. It never
//! touches the database: it renders what [`StatusSource`] holds.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One Prometheus sample.
#[derive(Debug, Clone)]
pub struct Metric {
    /// Metric name.
    pub name: String,
    /// HELP text.
    pub help: String,
    /// "counter" or "gauge".
    pub kind: String,
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

/// Renders samples in the Prometheus text format (HELP/TYPE once per name).
pub fn render_metrics(ms: &[Metric]) -> String {
    let mut out = String::new();
    let mut seen = std::collections::HashSet::new();
    for m in ms {
        if seen.insert(m.name.clone()) {
            out.push_str(&format!("# HELP {} {}\n# TYPE {} {}\n", m.name, m.help, m.name, m.kind));
        }
        if m.labels.is_empty() {
            out.push_str(&format!("{} {}\n", m.name, m.value));
        } else {
            let l: Vec<String> = m
                .labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
                .collect();
            out.push_str(&format!("{}{{{}}} {}\n", m.name, l.join(","), m.value));
        }
    }
    out
}

/// Serves until `shutdown` turns true.
pub async fn serve(listener: TcpListener, state: Arc<dyn StatusSource>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            acc = listener.accept() => {
                let Ok((sock, _)) = acc else { continue };
                let state = state.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(5), handle(sock, state)).await;
                });
            }
        }
    }
}

async fn handle(mut sock: TcpStream, state: Arc<dyn StatusSource>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    while n < buf.len() {
        let r = sock.read(&mut buf[n..]).await?;
        if r == 0 {
            break;
        }
        n += r;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let req = String::from_utf8_lossy(&buf[..n]);
    let mut parts = req.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (code, ctype, body) = match (method, path) {
        ("GET", "/health") if state.healthy() => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/health") => ("503 Service Unavailable", "text/plain", "unhealthy\n".to_string()),
        ("GET", "/status") => ("200 OK", "application/json", state.status_json().to_string()),
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", render_metrics(&state.metrics())),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => ("400 Bad Request", "text/plain", "bad request\n".to_string()),
    };
    let resp = format!("HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    sock.write_all(resp.as_bytes()).await?;
    sock.shutdown().await
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
                Metric { name: "x_total".into(), help: "X.".into(), kind: "counter".into(), labels: vec![("peer".into(), "b\"1".into())], value: 3.0 },
                Metric { name: "x_total".into(), help: "X.".into(), kind: "counter".into(), labels: vec![("peer".into(), "b2".into())], value: 4.0 },
            ]
        }
        fn healthy(&self) -> bool {
            true
        }
    }

    async fn get(port: u16, path: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_status_metrics_health_and_404_then_stops() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(serve(l, Arc::new(Fixed), rx));
        assert!(get(port, "/health").await.starts_with("HTTP/1.1 200"));
        let st = get(port, "/status").await;
        assert!(st.contains("application/json") && st.ends_with("{\"node\":\"main\"}"), "{st}");
        let m = get(port, "/metrics").await;
        assert_eq!(m.matches("# TYPE x_total counter").count(), 1, "{m}");
        assert!(m.contains("x_total{peer=\"b\\\"1\"} 3"), "{m}");
        assert!(get(port, "/nope").await.starts_with("HTTP/1.1 404"));
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
    }
}

/// `GET path` of a daemon's HTTP server at `addr`: the body of a 200 answer.
/// Used by `branchsync status` and the scenario runner.
pub async fn get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind};
    let timed_out = |_| Error::new(ErrorKind::TimedOut, format!("no answer from {addr}"));
    let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await.map_err(timed_out)??;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.map_err(timed_out)??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| Error::new(ErrorKind::InvalidData, "malformed HTTP response"))?;
    if !(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200")) {
        return Err(Error::other(format!("daemon answered: {}", head.lines().next().unwrap_or(""))));
    }
    Ok(body.to_string())
}
