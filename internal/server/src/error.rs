//! The one error type of the HTTP boundary: every failure a client can see, with its status and JSON body.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use rm_assets::NameError;
use rm_assets::store::StoreError;
use rm_fleet::{DbError, EnrollError};
use rm_protocol::{ErrorBody, PLATFORMS, Platform, PlatformError};
use tracing::error;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    UnsupportedPlatform(#[from] PlatformError),
    #[error("{0}")]
    InvalidRequest(String),
    /// A malformed `?os=&arch=` query: the answer lists the supported platforms.
    #[error("{0}")]
    InvalidPlatformQuery(String),
    #[error("invalid file name: {0}")]
    InvalidName(#[from] NameError),
    #[error("no agent binary is published for {0}")]
    BinaryNotPublished(Platform),
    #[error("no restic binary is published for {0}")]
    ResticNotPublished(Platform),
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
    #[error("the request did not complete within {} s", .0.as_secs())]
    Timeout(std::time::Duration),
    #[error("a precondition of the request (If-Match / If-Unmodified-Since) does not hold for the current file")]
    PreconditionFailed,
    #[error("the requested range is not satisfiable for a file of {0} bytes")]
    RangeNotSatisfiable(u64),
    #[error("{0}")]
    Conflict(String),
    /// Another agent's run holds the repository's lease.
    #[error("repository {repository:?} is in use by agent {holder_agent}; retry in {retry_after_secs} s")]
    RepositoryBusy { repository: String, holder_agent: String, retry_after_secs: u64 },
    #[error("internal error: {0}")]
    Internal(String),
    /// A refusal with its own error code (`plan_not_found`, `repository_in_use`, `secrets_need_tls` …) and details.
    #[error("{message}")]
    Refused {
        status: StatusCode,
        code: &'static str,
        message: String,
        details: serde_json::Map<String, serde_json::Value>,
    },
}

impl ApiError {
    /// A refusal with a specific status and error code.
    pub fn refused(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::Refused { status, code, message: message.into(), details: Default::default() }
    }

    /// Adds a detail field to a [`ApiError::Refused`] (other variants are returned unchanged).
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> ApiError {
        if let ApiError::Refused { details, .. } = &mut self {
            details.insert(key.to_owned(), value.into());
        }
        self
    }
}

impl ApiError {
    /// Status, extra headers and body of the answer.
    fn parts(&self) -> (StatusCode, Option<(header::HeaderName, HeaderValue)>, ErrorBody) {
        let message = self.to_string();
        let retry_later = Some((header::RETRY_AFTER, HeaderValue::from_static("1")));
        match self {
            ApiError::UnsupportedPlatform(e) => (
                StatusCode::BAD_REQUEST,
                None,
                ErrorBody::new("unsupported_platform", message)
                    .with("os", e.os.as_str())
                    .with("arch", e.arch.as_str())
                    .with("supported", supported()),
            ),
            ApiError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, None, ErrorBody::new("invalid_request", message)),
            ApiError::InvalidPlatformQuery(_) => (
                StatusCode::BAD_REQUEST,
                None,
                ErrorBody::new("invalid_request", message).with("supported", supported()),
            ),
            ApiError::InvalidName(_) => (StatusCode::BAD_REQUEST, None, ErrorBody::new("invalid_name", message)),
            ApiError::BinaryNotPublished(p) => (
                StatusCode::NOT_FOUND,
                None,
                ErrorBody::new("binary_not_published", message)
                    .with("os", p.os.as_str())
                    .with("arch", p.arch.as_str())
                    .with("file", p.file_name()),
            ),
            ApiError::ResticNotPublished(p) => (
                StatusCode::NOT_FOUND,
                None,
                ErrorBody::new("binary_not_published", message)
                    .with("os", p.os.as_str())
                    .with("arch", p.arch.as_str())
                    .with("file", p.restic_file_name()),
            ),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, None, ErrorBody::new("not_found", message)),
            ApiError::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, None, ErrorBody::new("method_not_allowed", message))
            }
            ApiError::Store(StoreError::Unstable { .. }) => {
                error!(error = %message, "asset changed in place on every hashing attempt");
                let body = ErrorBody::new("asset_unstable", "the file is being rewritten; retry shortly");
                (StatusCode::SERVICE_UNAVAILABLE, retry_later, body)
            }
            ApiError::Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                Some((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))),
                ErrorBody::new("unauthorized", message),
            ),
            ApiError::EnrollRefused(e) => (StatusCode::UNAUTHORIZED, None, ErrorBody::new(e.code(), message)),
            ApiError::PayloadTooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                ErrorBody::new("payload_too_large", message).with("limit", *limit),
            ),
            ApiError::ChecksumMismatch { expected, actual } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                None,
                ErrorBody::new("checksum_mismatch", message)
                    .with("expected", expected.as_str())
                    .with("actual", actual.as_str()),
            ),
            ApiError::UploadAborted(_) => (StatusCode::BAD_REQUEST, None, ErrorBody::new("upload_aborted", message)),
            ApiError::PreconditionFailed => {
                (StatusCode::PRECONDITION_FAILED, None, ErrorBody::new("precondition_failed", message))
            }
            ApiError::RangeNotSatisfiable(len) => (
                StatusCode::RANGE_NOT_SATISFIABLE,
                Some((header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes */{len}")).expect("digits"))),
                ErrorBody::new("range_not_satisfiable", message).with("size", *len),
            ),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, None, ErrorBody::new("conflict", message)),
            ApiError::Refused { status, code, details, .. } => {
                let mut body = ErrorBody::new(*code, message);
                body.details.extend(details.clone());
                (*status, None, body)
            }
            ApiError::RepositoryBusy { repository, holder_agent, retry_after_secs } => (
                StatusCode::CONFLICT,
                Some((header::RETRY_AFTER, HeaderValue::from(*retry_after_secs))),
                ErrorBody::new("repository_busy", message)
                    .with("repository", repository.as_str())
                    .with("holder_agent", holder_agent.as_str())
                    .with("retry_after_secs", *retry_after_secs),
            ),
            ApiError::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, None, ErrorBody::new("timeout", message)),
            // The database thread logs this once a minute; no log line per request.
            ApiError::Db(DbError::Full) => (
                StatusCode::INSUFFICIENT_STORAGE,
                None,
                ErrorBody::new("storage_full", "the server's data volume is full; free space on it and retry"),
            ),
            ApiError::Db(DbError::Busy) => (
                StatusCode::SERVICE_UNAVAILABLE,
                retry_later,
                ErrorBody::new("busy", "the server is overloaded; retry shortly"),
            ),
            ApiError::Store(_) | ApiError::Db(_) | ApiError::Internal(_) => {
                error!(error = %message, "request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, None, ErrorBody::new("internal", "internal server error"))
            }
        }
    }
}

impl ApiError {
    /// The status, error code and message this error answers with (the web page shows them as HTML).
    pub(crate) fn status_and_body(&self) -> (StatusCode, ErrorBody) {
        let (status, _, body) = self.parts();
        (status, body)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, extra, body) = self.parts();
        let mut response = (status, Json(body)).into_response();
        if let Some((name, value)) = extra {
            response.headers_mut().insert(name, value);
        }
        response
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

/// A path parameter that does not decode (`%ff`, not UTF-8) or does not fit its type. axum's own rejection answers
/// `text/plain`; errors are JSON.
impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::PathRejection) -> Self {
        ApiError::InvalidRequest(bounded(format!("path: {}", rejection.body_text())))
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::InvalidRequest(bounded(format!("query: {}", rejection.body_text())))
    }
}

/// Rejection texts can quote the request; keep what is echoed short.
fn bounded(text: String) -> String {
    text.chars().take(200).collect()
}

fn supported() -> Vec<String> {
    PLATFORMS.iter().map(|p| p.to_string()).collect()
}
