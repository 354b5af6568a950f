//! Health, readiness, version, and the JSON fallbacks.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{StatusCode, Uri};
use serde_json::json;

use crate::{ApiError, AppState};

/// `GET /healthz`: the process is up and answering.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Below this much free space on the data volume the server reports not ready.
const MIN_FREE_BYTES: u64 = 1 << 20;

/// `GET /readyz`: the server can serve: not shutting down, the data dir is reachable, the data volume has room and
/// the database can write (a one-row write, so this also catches a read-only or broken database).
pub async fn readyz(State(state): State<AppState>) -> Response {
    if state.is_shutting_down() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "shutting_down"}))).into_response();
    }
    let probe = state.clone();
    let disk = tokio::task::spawn_blocking(move || {
        probe.store().check_data_dir().map_err(|e| format!("data dir unavailable: {e}"))?;
        match free_bytes(probe.store().data_dir()) {
            Ok(free) if free < MIN_FREE_BYTES => Err(format!("the data volume is full ({free} bytes free)")),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("cannot read the data volume's free space: {e}")),
        }
    })
    .await
    .unwrap_or_else(|e| Err(format!("readiness check failed: {e}")));
    let write = match disk {
        Ok(()) => state
            .fleet()
            .call(|c| rm_fleet::probe_write(c, rm_fleet::now()))
            .await
            .map_err(|e| format!("the database cannot write: {e}")),
        Err(e) => Err(e),
    };
    match write {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(reason) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not_ready", "reason": reason}))).into_response()
        }
    }
}

/// Bytes available to this (unprivileged) process on the file system holding `path`.
fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a zeroed out-parameter of the right type.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// `GET /tls/cert.pem`: the certificate chain this server presents (public, never gated), so an agent that was given
/// only the key pin can fetch it, check its key against the pin and anchor on it. 404 without TLS.
pub async fn tls_certificate(State(state): State<AppState>) -> Response {
    match state.tls() {
        Some(certs) => {
            let headers = [
                (http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-pem-file")),
                (http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache")),
            ];
            (headers, certs.chain_pem()).into_response()
        }
        None => ApiError::NotFound("a TLS certificate (this server speaks plain HTTP)".into()).into_response(),
    }
}

/// `GET /version`
pub async fn version() -> Json<rm_buildinfo::BuildInfo> {
    Json(rm_buildinfo::current())
}

pub async fn not_found(uri: Uri) -> ApiError {
    let path: String = uri.path().chars().take(200).collect();
    ApiError::NotFound(format!("path {path:?}"))
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
