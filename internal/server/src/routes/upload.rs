//! Admin asset upload and removal: `PUT|DELETE /api/v1/assets/{agent-binaries|install|restic-binaries}/<name>`.
//!
//! HTTP only: the names are checked here, the body is streamed into a file staged by the asset store
//! ([`rm_assets::write`]) with the size limit enforced before and while writing, and an optional
//! `X-Checksum-Sha256` is verified before the store commits it. Any failure, including the client going away
//! mid-body (the handler future is dropped), drops the staged file, which deletes it: the previous file is untouched.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode, header};
use rm_assets::{AssetKind, NameError, WriteError, validate_name};
use rm_fleet::AuditEvent;
use rm_protocol::{PLATFORMS, Platform};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::auth::{Admin, Peer};
use crate::{ApiError, AppState, header_names};

/// Resolves `{kind}/{name}` to a target inside the data dir (the API's and the web page's checks alike).
pub(crate) fn target(kind: &str, name: &str) -> Result<(AssetKind, Option<Platform>), ApiError> {
    let kind: AssetKind = kind.parse().map_err(|e: rm_assets::UnknownKind| ApiError::NotFound(e.to_string()))?;
    match kind {
        AssetKind::AgentBinary => {
            let platform = PLATFORMS.iter().find(|p| p.file_name() == name).ok_or_else(|| {
                let allowed: Vec<_> = PLATFORMS.iter().map(|p| p.file_name()).collect();
                ApiError::InvalidRequest(format!("agent binaries must be named one of: {}", allowed.join(", ")))
            })?;
            Ok((kind, Some(*platform)))
        }
        AssetKind::Install => {
            validate_name(name)?;
            Ok((kind, None))
        }
        AssetKind::AgentBuild => Err(ApiError::NotFound("archived builds are not uploaded".into())),
        AssetKind::ResticBinary => {
            if name == rm_protocol::restic_dist::SIDECAR_NAME {
                return Ok((kind, None));
            }
            let platform = PLATFORMS.iter().find(|p| p.restic_file_name() == name).ok_or_else(|| {
                let mut allowed: Vec<_> = PLATFORMS.iter().map(|p| p.restic_file_name()).collect();
                allowed.push(rm_protocol::restic_dist::SIDECAR_NAME);
                ApiError::InvalidRequest(format!("restic binaries must be named one of: {}", allowed.join(", ")))
            })?;
            Ok((kind, Some(*platform)))
        }
    }
}

fn path_params(path: Result<Path<(String, String)>, PathRejection>) -> Result<(String, String), ApiError> {
    path.map(|Path(p)| p).map_err(|_| ApiError::InvalidName(NameError::BadCharacter))
}

fn expected_sha256(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header_names::CHECKSUM_SHA256) else { return Ok(None) };
    let value = value.to_str().unwrap_or_default().trim().to_ascii_lowercase();
    if rm_protocol::validate::is_sha256_hex(&value) {
        Ok(Some(value))
    } else {
        Err(ApiError::InvalidRequest(format!("{} must be 64 hex digits", header_names::CHECKSUM_SHA256)))
    }
}

#[derive(Serialize)]
pub(crate) struct Uploaded {
    pub kind: &'static str,
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub replaced: bool,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, WriteError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(format!("upload task failed: {e}")))?.map_err(
        |e| match e {
            // A directory holds the name: the operator's data dir conflicts with the request (409, not a 500).
            WriteError::IsDirectory { .. } => ApiError::Conflict(e.to_string()),
            WriteError::Io(e) => ApiError::Internal(format!("writing the asset: {e}")),
        },
    )
}

/// `PUT /api/v1/assets/{kind}/{name}`
pub async fn put_asset(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (kind_text, name) = path_params(path)?;
    target(&kind_text, &name)?; // a bad name is refused before a bad checksum header
    let expected = expected_sha256(&headers)?;
    let declared: Option<u64> =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let body = body.into_data_stream().map(|chunk| chunk.map_err(|e| ApiError::UploadAborted(e.to_string())));
    let uploaded = store_upload(&state, peer, &headers, &kind_text, &name, declared, expected, body).await?;
    let status = if uploaded.replaced { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(uploaded)).into_response())
}

/// Checks `{kind}/{name}`, streams `body` into a staged file (at most the upload limit; `declared`, when known, must
/// be the size that arrives, and `expected` the SHA-256), commits it over the data-dir override and audits the
/// upload. Any error leaves the previous file as it was. The API's `PUT` and the web page's upload form both store
/// through here.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn store_upload(
    state: &AppState,
    peer: Option<std::net::SocketAddr>,
    headers: &HeaderMap,
    kind_text: &str,
    name: &str,
    declared: Option<u64>,
    expected: Option<String>,
    body: impl futures_util::Stream<Item = Result<bytes::Bytes, ApiError>>,
) -> Result<Uploaded, ApiError> {
    let (kind, platform) = target(kind_text, name)?;
    let limit = state.settings().max_upload_bytes;
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }

    let stage_state = state.clone();
    let stage_name = name.to_owned();
    let (staged, std_file) = blocking(move || {
        let staged = stage_state.store().stage(kind, &stage_name)?;
        let file = staged.file()?;
        Ok((staged, file))
    })
    .await?;
    let mut file = tokio::fs::File::from_std(std_file);
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut stream = std::pin::pin!(body);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(|e| ApiError::Internal(format!("writing the upload: {e}")))?;
    }
    if declared.is_some_and(|n| n != size) {
        return Err(ApiError::UploadAborted(format!("received {size} of {} bytes", declared.unwrap_or_default())));
    }
    file.flush().await.map_err(|e| ApiError::Internal(e.to_string()))?;
    drop(file);
    let actual = hex::encode(hasher.finalize());
    if let Some(expected) = expected
        && expected != actual
    {
        return Err(ApiError::ChecksumMismatch { expected, actual });
    }

    let replaced = blocking(move || staged.commit()).await?;

    let event = AuditEvent {
        platform: platform.map(|p| p.to_string()),
        sha256: Some(actual.clone()),
        source: Some("data-dir".into()),
        detail: Some(format!("{kind_text}/{name} size={size} replaced={replaced}")),
        ..super::audit_event("upload", peer, headers)
    };
    state.fleet().call(move |c| rm_fleet::record_audit(c, &event)).await?;
    tracing::info!(kind = kind_text, name, size, sha256 = actual, replaced, "asset uploaded");
    Ok(Uploaded { kind: kind.subdir(), name: name.to_owned(), size, sha256: actual, replaced })
}

/// `DELETE /api/v1/assets/{kind}/{name}`: removes the data-dir override, so the bundled copy is served again.
pub async fn delete_asset(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (kind_text, name) = path_params(path)?;
    remove_override(&state, peer, &headers, &kind_text, &name).await?;
    Ok(Json(serde_json::json!({"kind": kind_text, "name": name, "removed": true})).into_response())
}

/// Checks `{kind}/{name}`, removes its data-dir override (404 when there is none) and audits it (the API's `DELETE`
/// and the web page's "Remove override" alike).
pub(crate) async fn remove_override(
    state: &AppState,
    peer: Option<std::net::SocketAddr>,
    headers: &HeaderMap,
    kind_text: &str,
    name: &str,
) -> Result<(), ApiError> {
    let (kind, platform) = target(kind_text, name)?;
    let remove_state = state.clone();
    let remove_name = name.to_owned();
    let removed = blocking(move || remove_state.store().remove(kind, &remove_name)).await?;
    if !removed {
        return Err(ApiError::NotFound(format!("override {kind_text}/{name}")));
    }
    let event = AuditEvent {
        platform: platform.map(|p| p.to_string()),
        source: Some("data-dir".into()),
        detail: Some(format!("{kind_text}/{name}")),
        ..super::audit_event("delete", peer, headers)
    };
    state.fleet().call(move |c| rm_fleet::record_audit(c, &event)).await?;
    tracing::info!(kind = kind_text, name, "asset override removed");
    Ok(())
}
