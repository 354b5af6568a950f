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

/// `GET /readyz`: the server can serve: not shutting down and the data dir is reachable.
pub async fn readyz(State(state): State<AppState>) -> Response {
    if state.is_shutting_down() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "shutting_down"}))).into_response();
    }
    let probe = state.clone();
    match tokio::task::spawn_blocking(move || probe.store().check_data_dir()).await {
        Ok(Ok(())) => Json(json!({"status": "ready"})).into_response(),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": format!("data dir unavailable: {e}")})),
        )
            .into_response(),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
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
