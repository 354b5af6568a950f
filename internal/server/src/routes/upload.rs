//! Admin asset upload and removal: `PUT|DELETE /api/v1/assets/{agent-binaries|install}/<name>`.
//!
//! A PUT streams the body into a temporary file (`.upload-*`, a name no request can ever fetch) in the target
//! directory, enforcing the size limit before and while writing, verifies an optional `X-Checksum-Sha256`, fsyncs,
//! renames it over the target and fsyncs the directory. Any failure, including the client going away mid-body
//! (the handler future is dropped), drops the temporary file, which deletes it: the previous file is untouched.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode, header};
use rm_assets::platform::PLATFORMS;
use rm_assets::{AssetKind, NameError, Platform, validate_name};
use rm_fleet::model::{self, AuditEvent};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::auth::{Admin, Peer};
use crate::{ApiError, AppState, header_names};

/// Resolves `{kind}/{name}` to a target inside the data dir.
fn target(kind: &str, name: &str) -> Result<(AssetKind, Option<Platform>), ApiError> {
    match kind {
        "agent-binaries" => {
            PLATFORMS.iter().find(|p| p.file_name() == name).map(|p| (AssetKind::AgentBinary, Some(*p))).ok_or_else(
                || {
                    let allowed: Vec<_> = PLATFORMS.iter().map(|p| p.file_name()).collect();
                    ApiError::InvalidRequest(format!("agent binaries must be named one of: {}", allowed.join(", ")))
                },
            )
        }
        "install" => {
            validate_name(name)?;
            Ok((AssetKind::Install, None))
        }
        _ => Err(ApiError::NotFound(format!(
            "asset kind {:?} (use agent-binaries or install)",
            kind.chars().take(64).collect::<String>()
        ))),
    }
}

fn path_params(path: Result<Path<(String, String)>, PathRejection>) -> Result<(String, String), ApiError> {
    path.map(|Path(p)| p).map_err(|_| ApiError::InvalidName(NameError::BadCharacter))
}

fn expected_sha256(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header_names::CHECKSUM_SHA256) else { return Ok(None) };
    let value = value.to_str().unwrap_or_default().trim().to_ascii_lowercase();
    if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(Some(value))
    } else {
        Err(ApiError::InvalidRequest(format!("{} must be 64 hex digits", header_names::CHECKSUM_SHA256)))
    }
}

#[derive(Serialize)]
struct Uploaded {
    kind: &'static str,
    name: String,
    size: u64,
    sha256: String,
    replaced: bool,
}

/// Creates the directory if needed; refuses a symlinked one (the server would not serve from it anyway).
fn prepare_dir(dir: &std::path::Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    if !fs::symlink_metadata(dir)?.is_dir() {
        return Err(std::io::Error::other(format!("{} is not a plain directory", dir.display())));
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("upload task failed: {e}")))?
        .map_err(|e| ApiError::Internal(format!("writing the asset: {e}")))
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
    let (kind, platform) = target(&kind_text, &name)?;
    let expected = expected_sha256(&headers)?;
    let limit = state.settings().max_upload_bytes;
    let declared: Option<u64> =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }

    let dir: PathBuf = state.store().data_dir().join(kind.subdir());
    let tmp_dir = dir.clone();
    let (tmp, std_file) = blocking(move || {
        prepare_dir(&tmp_dir)?;
        let tmp = tempfile::Builder::new().prefix(".upload-").tempfile_in(&tmp_dir)?;
        let file = tmp.as_file().try_clone()?;
        Ok((tmp, file))
    })
    .await?;
    let mut file = tokio::fs::File::from_std(std_file);
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::UploadAborted(e.to_string()))?;
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
    file.sync_all().await.map_err(|e| ApiError::Internal(format!("fsync of the upload: {e}")))?;
    drop(file);
    let actual = hex::encode(hasher.finalize());
    if let Some(expected) = expected
        && expected != actual
    {
        return Err(ApiError::ChecksumMismatch { expected, actual });
    }

    let final_path = dir.join(&name);
    let mode = if kind == AssetKind::AgentBinary || name.ends_with(".sh") { 0o755 } else { 0o644 };
    let replaced = blocking(move || {
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode))?;
        let replaced = fs::symlink_metadata(&final_path).is_ok();
        tmp.persist(&final_path).map_err(|e| e.error)?;
        fs::File::open(&dir)?.sync_all()?;
        Ok(replaced)
    })
    .await?;

    let event = AuditEvent {
        platform: platform.map(|p| p.to_string()),
        sha256: Some(actual.clone()),
        source: Some("data-dir".into()),
        detail: Some(format!("{kind_text}/{name} size={size} replaced={replaced}")),
        ..super::audit_event("upload", peer, &headers)
    };
    state.fleet().call(move |c| model::record_audit(c, &event)).await?;
    tracing::info!(kind = kind_text, name, size, sha256 = actual, replaced, "asset uploaded");
    let status = if replaced { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(Uploaded { kind: kind.subdir(), name, size, sha256: actual, replaced })).into_response())
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
    let (kind, platform) = target(&kind_text, &name)?;
    let dir = state.store().data_dir().join(kind.subdir());
    let file = dir.join(&name);
    let removed = blocking(move || match fs::symlink_metadata(&file) {
        Ok(meta) if meta.is_dir() => Err(std::io::Error::other(format!("{} is a directory", file.display()))),
        Ok(_) => {
            fs::remove_file(&file)?;
            fs::File::open(&dir)?.sync_all()?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    })
    .await?;
    if !removed {
        return Err(ApiError::NotFound(format!("override {kind_text}/{name}")));
    }
    let event = AuditEvent {
        platform: platform.map(|p| p.to_string()),
        source: Some("data-dir".into()),
        detail: Some(format!("{kind_text}/{name}")),
        ..super::audit_event("delete", peer, &headers)
    };
    state.fleet().call(move |c| model::record_audit(c, &event)).await?;
    tracing::info!(kind = kind_text, name, "asset override removed");
    Ok(Json(serde_json::json!({"kind": kind_text, "name": name, "removed": true})).into_response())
}
