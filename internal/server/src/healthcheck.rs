//! `restic-manager-server healthcheck`: probes `/healthz` over plain HTTP (the image has no curl). Uses hyper's client
//! connection API, already a dependency through axum, instead of adding an HTTP client crate.

use std::time::Duration;

use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// Probes `url` and returns `Ok(())` only for a 2xx answer within `timeout`.
pub async fn probe(url: &str, timeout: Duration) -> Result<(), String> {
    tokio::time::timeout(timeout, probe_inner(url))
        .await
        .map_err(|_| format!("no answer from {url} within {timeout:?}"))?
}

async fn probe_inner(url: &str) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url:?}: only http:// URLs can be probed"));
    }
    let authority = uri.authority().ok_or_else(|| format!("{url:?} has no host"))?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let stream =
        tokio::net::TcpStream::connect((host, port)).await.map_err(|e| format!("connecting to {authority}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {authority}: {e}"))?;
    tokio::spawn(connection);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::USER_AGENT, "restic-manager-healthcheck")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| format!("request to {url}: {e}"))?;
    let status = response.status();
    let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{url} answered {status}: {}", String::from_utf8_lossy(&body).trim()))
    }
}
