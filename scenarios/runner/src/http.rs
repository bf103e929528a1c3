//! The runner's HTTP client: `GET` of a daemon's `/status`, over hyper.
//!
//! The runner is a client of the sites like an operator's browser; it
//! reads what a daemon publishes and never its internals.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};

/// The body of a `200` answer to `GET path` from the daemon's HTTP server
/// at `addr` (`host:port`); an error for any other answer, or none within
/// five seconds.
pub(crate) async fn get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let uri: hyper::Uri = format!("http://{addr}{path}").parse().map_err(|e| Error::new(ErrorKind::InvalidInput, e))?;
    let answer = async {
        let resp = client.get(uri).await.map_err(Error::other)?;
        if !resp.status().is_success() {
            return Err(Error::other(format!("daemon answered: {}", resp.status())));
        }
        let body = resp.into_body().collect().await.map_err(Error::other)?.to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), answer).await.map_err(|_| Error::new(ErrorKind::TimedOut, format!("no answer from {addr}")))?
}
