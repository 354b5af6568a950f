//! The one error type of the HTTP boundary: every failure a client can see, with its status and JSON body.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use rm_assets::NameError;
use rm_assets::platform::{PLATFORMS, Platform, PlatformError};
use rm_assets::store::StoreError;
use rm_fleet::DbError;
use rm_fleet::model::EnrollError;
use serde_json::json;
use tracing::error;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    UnsupportedPlatform(#[from] PlatformError),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("invalid file name: {0}")]
    InvalidName(#[from] NameError),
    #[error("no agent binary is published for {0}")]
    BinaryNotPublished(Platform),
    #[error("{0} was not found")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    EnrollRefused(#[from] EnrollError),
    #[error("the body is larger than the limit of {0} bytes")]
    PayloadTooLarge(u64),
    #[error("the uploaded content has sha256 {actual}, not the expected {expected}")]
    ChecksumMismatch { expected: String, actual: String },
    #[error("the upload did not complete: {0}")]
    UploadAborted(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let (status, body) = match &self {
            ApiError::UnsupportedPlatform(e) => (
                StatusCode::BAD_REQUEST,
                json!({
                    "error": "unsupported_platform",
                    "message": message,
                    "os": e.os,
                    "arch": e.arch,
                    "supported": supported(),
                }),
            ),
            ApiError::InvalidRequest(_) => (
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_request", "message": message, "supported": supported()}),
            ),
            ApiError::InvalidName(_) => (StatusCode::BAD_REQUEST, json!({"error": "invalid_name", "message": message})),
            ApiError::BinaryNotPublished(p) => (
                StatusCode::NOT_FOUND,
                json!({
                    "error": "binary_not_published",
                    "message": message,
                    "os": p.os.as_str(),
                    "arch": p.arch.as_str(),
                    "file": p.file_name(),
                }),
            ),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, json!({"error": "not_found", "message": message})),
            ApiError::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, json!({"error": "method_not_allowed", "message": message}))
            }
            ApiError::Store(StoreError::Unstable { .. }) => {
                error!(error = %message, "asset kept changing while being read");
                let body = json!({"error": "asset_unstable", "message": "the file is being rewritten; retry shortly"});
                let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return response;
            }
            ApiError::Unauthorized(_) => {
                let body = json!({"error": "unauthorized", "message": message});
                let mut response = (StatusCode::UNAUTHORIZED, Json(body)).into_response();
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
            ApiError::EnrollRefused(e) => (StatusCode::UNAUTHORIZED, json!({"error": e.code(), "message": message})),
            ApiError::PayloadTooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": "payload_too_large", "message": message, "limit": limit}),
            ),
            ApiError::ChecksumMismatch { expected, actual } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"error": "checksum_mismatch", "message": message, "expected": expected, "actual": actual}),
            ),
            ApiError::UploadAborted(_) => {
                (StatusCode::BAD_REQUEST, json!({"error": "upload_aborted", "message": message}))
            }
            ApiError::Db(DbError::Busy) => {
                let body = json!({"error": "busy", "message": "the server is overloaded; retry shortly"});
                let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return response;
            }
            ApiError::Store(_) | ApiError::Db(_) | ApiError::Internal(_) => {
                error!(error = %message, "request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, json!({"error": "internal", "message": "internal server error"}))
            }
        };
        (status, Json(body)).into_response()
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(crate::JSON_BODY_LIMIT as u64)
        } else {
            ApiError::InvalidRequest(rejection.body_text())
        }
    }
}

fn supported() -> Vec<String> {
    PLATFORMS.iter().map(|p| p.to_string()).collect()
}
