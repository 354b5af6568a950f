//! `/api/v1/repositories` (admin): restic repositories defined on the server. Passwords and environment values go in
//! sealed under the data dir's secret key and never come out through the API: views say which secrets are set.
//! Create, update and delete are audited (kind `repository`) without secrets, in the same transaction as the change.
//! A repository that plans use cannot be deleted (409 `repository_in_use`, naming the plans).

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use rm_fleet::{NewRepository, RepositoryChanges, RepositoryInfo, rfc3339};
use rm_protocol::admin::{CreateRepository, RepositoryList, RepositoryView, UpdateRepository};

use crate::auth::{Admin, Peer};
use crate::{ApiError, AppState};

pub fn repository_view(info: RepositoryInfo) -> RepositoryView {
    RepositoryView {
        name: info.name,
        url: info.url,
        // The column is NOT NULL: every stored repository has a password.
        password_set: true,
        env_names: info.env_names,
        ca_cert_set: info.ca_cert.is_some(),
        auto_init: info.auto_init,
        min_restic_version: info.min_restic_version,
        created: rfc3339(info.created_at),
        updated: rfc3339(info.updated_at),
    }
}

fn name_param(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(name) = path?;
    rm_fleet::repositories::validate_name(&name)
        .map_err(|_| ApiError::NotFound(format!("repository {:?}", name.chars().take(64).collect::<String>())))?;
    Ok(name)
}

/// `POST /api/v1/repositories`
pub async fn create(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Result<Json<CreateRepository>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(r) = body?;
    let new = NewRepository {
        name: r.name,
        url: r.url,
        password: r.password,
        env: r.env,
        ca_cert: r.ca_cert,
        auto_init: r.auto_init,
        min_restic_version: r.min_restic_version,
    };
    new.validate().map_err(ApiError::InvalidRequest)?;
    let now = rm_fleet::now();
    let key = state.secret_key().clone();
    let event = super::audit_event("repository", peer, &headers);
    let created = state
        .fleet()
        .call(move |c| Ok(rm_fleet::create_repository(c, &key, now, &new, event)?.map_err(|_| new.name)))
        .await?
        .map_err(|name| ApiError::Conflict(format!("a repository named {name:?} already exists")))?;
    tracing::info!(name = created.name, "repository created");
    Ok((StatusCode::CREATED, Json(repository_view(created))).into_response())
}

/// `GET /api/v1/repositories`
pub async fn list(_: Admin, State(state): State<AppState>) -> Result<Json<RepositoryList>, ApiError> {
    let rows = state.fleet().call(rm_fleet::list_repositories).await?;
    Ok(Json(RepositoryList { repositories: rows.into_iter().map(repository_view).collect() }))
}

/// `GET /api/v1/repositories/{name}`
pub async fn get(
    _: Admin,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<RepositoryView>, ApiError> {
    let name = name_param(path)?;
    let lookup = name.clone();
    let row = state.fleet().call(move |c| rm_fleet::get_repository(c, &lookup)).await?;
    Ok(Json(repository_view(row.ok_or_else(|| ApiError::NotFound(format!("repository {name:?}")))?)))
}

/// `PATCH /api/v1/repositories/{name}`
pub async fn update(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<UpdateRepository>, JsonRejection>,
) -> Result<Json<RepositoryView>, ApiError> {
    let name = name_param(path)?;
    let Json(r) = body?;
    let changes = RepositoryChanges {
        url: r.url,
        password: r.password,
        env: r.env,
        ca_cert: r.ca_cert,
        auto_init: r.auto_init,
        min_restic_version: r.min_restic_version,
    };
    changes.validate().map_err(ApiError::InvalidRequest)?;
    if changes.is_empty() {
        return Err(ApiError::InvalidRequest("nothing to change: give at least one field".into()));
    }
    let event = super::audit_event("repository", peer, &headers);
    let now = rm_fleet::now();
    let key = state.secret_key().clone();
    let lookup = name.clone();
    let updated = state
        .fleet()
        .call(move |c| rm_fleet::update_repository(c, &key, now, &lookup, &changes, event))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("repository {name:?}")))?;
    tracing::info!(name, "repository updated");
    Ok(Json(repository_view(updated)))
}

/// `DELETE /api/v1/repositories/{name}`
pub async fn delete(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let name = name_param(path)?;
    let event = super::audit_event("repository", peer, &headers);
    let lookup = name.clone();
    let deleted =
        state.fleet().call(move |c| rm_fleet::delete_repository(c, &lookup, event)).await?.map_err(|in_use| {
            ApiError::refused(StatusCode::CONFLICT, "repository_in_use", in_use.to_string()).with("plans", in_use.plans)
        })?;
    if !deleted {
        return Err(ApiError::NotFound(format!("repository {name:?}")));
    }
    tracing::info!(name, "repository deleted");
    Ok(Json(serde_json::json!({"name": name, "deleted": true})).into_response())
}
