//! `/api/v1/repositories` (admin): restic repositories defined on the server. Passwords and environment values go in
//! sealed under the data dir's secret key and never come out through the API: views say which secrets are set.
//! Create, update and delete are audited (kind `repository`) without secrets, in the same transaction as the change.
//! A repository that plans use cannot be deleted (409 `repository_in_use`, naming the plans).

use std::net::SocketAddr;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use rm_fleet::maintenance::RequestRefused;
use rm_fleet::{NewRepository, RepositoryChanges, RepositoryInfo, rfc3339};
use rm_protocol::admin::{CreateRepository, RepositoryList, RepositoryView, UpdateRepository};
use rm_protocol::maintenance::{MaintenanceRequested, RunMaintenance};

use crate::auth::{Admin, Peer};
use crate::{ApiError, AppState};

pub fn repository_view(info: RepositoryInfo) -> RepositoryView {
    RepositoryView {
        prune: info.prune,
        check: info.check,
        maintenance: None,
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

/// The view with the repository's maintenance health (API answers; the command line shows the stored fields).
fn with_health(
    info: RepositoryInfo,
    mut health: std::collections::HashMap<String, rm_protocol::maintenance::RepositoryHealth>,
) -> RepositoryView {
    let maintenance = health.remove(&info.name);
    RepositoryView { maintenance, ..repository_view(info) }
}

pub(crate) fn name_param(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(name) = path?;
    rm_protocol::validate::name("name", &name)
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
    let view = create_repository(&state, peer, &headers, r).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// Checks, stores and audits a new repository (the API and the web page): 400 for invalid input, 409 for a name
/// that is taken (nothing written either way).
pub(crate) async fn create_repository(
    state: &AppState,
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    r: CreateRepository,
) -> Result<RepositoryView, ApiError> {
    let new = NewRepository {
        prune: r.prune,
        check: r.check,
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
    let event = super::audit_event("repository", peer, headers);
    let created = state
        .fleet()
        .call(move |c| {
            let created = rm_fleet::create_repository(c, &key, now, &new, event)?.map_err(|_| new.name);
            Ok(created.map(|info| (info, rm_fleet::repository_health(c))))
        })
        .await?
        .map_err(|name| ApiError::Conflict(format!("a repository named {name:?} already exists")))?;
    let view = with_health(created.0, created.1?);
    tracing::info!(name = view.name, "repository created");
    Ok(view)
}

/// `GET /api/v1/repositories`: with each repository's health and last prune and check.
pub async fn list(_: Admin, State(state): State<AppState>) -> Result<Json<RepositoryList>, ApiError> {
    Ok(Json(RepositoryList { repositories: list_repositories(&state).await? }))
}

/// Every repository with its health and last prune and check (the API and the web page).
pub(crate) async fn list_repositories(state: &AppState) -> Result<Vec<RepositoryView>, ApiError> {
    let (rows, mut health) =
        state.fleet().call(|c| Ok((rm_fleet::list_repositories(c)?, rm_fleet::repository_health(c)?))).await?;
    Ok(rows
        .into_iter()
        .map(|info| {
            let maintenance = health.remove(&info.name);
            RepositoryView { maintenance, ..repository_view(info) }
        })
        .collect())
}

/// `POST /api/v1/repositories/{name}/maintenance` `{"kind": "prune"}`: the agents using the repository run its
/// prune or check once now (one of them, under the maintenance lease). 202 with the slot; 404 for an unknown
/// repository, 409 `no_maintenance_policy` when the repository has no policy of that kind.
pub async fn run_maintenance(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<RunMaintenance>, JsonRejection>,
) -> Result<Response, ApiError> {
    let name = name_param(path)?;
    let Json(RunMaintenance { kind }) = body?;
    let event = super::audit_event("maintenance", peer, &headers);
    let lookup = name.clone();
    let at = state
        .fleet()
        .call(move |c| rm_fleet::request_maintenance(c, rm_fleet::now(), &lookup, kind, event))
        .await?
        .map_err(|refused| match refused {
            RequestRefused::NoRepository(_) => ApiError::NotFound(refused.to_string()),
            RequestRefused::NoPolicy { .. } => {
                ApiError::refused(StatusCode::CONFLICT, "no_maintenance_policy", refused.to_string())
            }
        })?;
    tracing::info!(name, %kind, slot = at, "maintenance requested");
    let answer = MaintenanceRequested { repository: name, kind, requested_at: at };
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// `GET /api/v1/repositories/{name}`
pub async fn get(
    _: Admin,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<RepositoryView>, ApiError> {
    let name = name_param(path)?;
    let lookup = name.clone();
    let (row, mut health) = state
        .fleet()
        .call(move |c| Ok((rm_fleet::get_repository(c, &lookup)?, rm_fleet::repository_health(c)?)))
        .await?;
    let info = row.ok_or_else(|| ApiError::NotFound(format!("repository {name:?}")))?;
    let maintenance = health.remove(&info.name);
    Ok(Json(RepositoryView { maintenance, ..repository_view(info) }))
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
    Ok(Json(update_repository(&state, peer, &headers, name, r).await?))
}

/// Checks, applies and audits changes to a repository (the API and the web page): 400 for invalid or no changes,
/// 404 for an unknown repository (nothing written either way).
pub(crate) async fn update_repository(
    state: &AppState,
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    name: String,
    r: UpdateRepository,
) -> Result<RepositoryView, ApiError> {
    let changes = RepositoryChanges {
        url: r.url,
        password: r.password,
        env: r.env,
        ca_cert: r.ca_cert,
        auto_init: r.auto_init,
        min_restic_version: r.min_restic_version,
        prune: r.prune,
        check: r.check,
    };
    changes.validate().map_err(ApiError::InvalidRequest)?;
    if changes.is_empty() {
        return Err(ApiError::InvalidRequest("nothing to change: give at least one field".into()));
    }
    let event = super::audit_event("repository", peer, headers);
    let now = rm_fleet::now();
    let key = state.secret_key().clone();
    let lookup = name.clone();
    let updated = state
        .fleet()
        .call(move |c| {
            let updated = rm_fleet::update_repository(c, &key, now, &lookup, &changes, event)?;
            Ok(updated.map(|info| (info, rm_fleet::repository_health(c))))
        })
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("repository {name:?}")))?;
    tracing::info!(name, "repository updated");
    Ok(with_health(updated.0, updated.1?))
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
    delete_repository(&state, peer, &headers, &name).await?;
    Ok(Json(serde_json::json!({"name": name, "deleted": true})).into_response())
}

/// Deletes and audits a repository (the API and the web page): 409 `repository_in_use` naming the plans that use
/// it, 404 for an unknown one (nothing written either way).
pub(crate) async fn delete_repository(
    state: &AppState,
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    name: &str,
) -> Result<(), ApiError> {
    let event = super::audit_event("repository", peer, headers);
    let lookup = name.to_owned();
    let deleted =
        state.fleet().call(move |c| rm_fleet::delete_repository(c, &lookup, event)).await?.map_err(|in_use| {
            ApiError::refused(StatusCode::CONFLICT, "repository_in_use", in_use.to_string()).with("plans", in_use.plans)
        })?;
    if !deleted {
        return Err(ApiError::NotFound(format!("repository {name:?}")));
    }
    tracing::info!(name, "repository deleted");
    Ok(())
}
