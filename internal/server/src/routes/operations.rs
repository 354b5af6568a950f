//! Operations: what agents report about their runs (`POST /api/v1/agents/reports`), the repository run leases
//! (`POST /api/v1/agents/leases`, `DELETE /api/v1/agents/leases/{repository}`), and what the operator reads
//! (`GET /api/v1/operations`, `GET /api/v1/agents/{id}/snapshots`).
//!
//! Agent routes check the credential before the body, like the heartbeat: a caller without a valid credential learns
//! nothing about what the server accepts.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use rm_fleet::Connection;
use rm_fleet::{IngestError, Lease, MaintLease};
use rm_protocol::backup::{
    LeaseGranted, LeaseRequest, OperationPage, OperationQuery, ReportAck, ReportBatch, SnapshotList,
};
use serde::Deserialize;
use tracing::warn;

use crate::auth::{Admin, bearer};
use crate::{ApiError, AppState};

/// Largest report batch body: a report may list up to 10,000 snapshots.
pub(crate) const REPORTS_BODY_LIMIT: usize = 8 * 1024 * 1024;

pub(crate) fn credential(headers: &HeaderMap) -> Result<String, ApiError> {
    Ok(bearer(headers).ok_or(ApiError::Unauthorized("an agent credential is required"))?.to_owned())
}

/// Runs `op` for the agent whose credential this is, in one database operation; 401 when it is not valid.
pub(crate) async fn as_agent<T, F>(state: &AppState, credential: String, op: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&Connection, String) -> Result<Result<T, ApiError>, rm_fleet::DbError> + Send + 'static,
{
    state
        .fleet()
        .call(move |c| match rm_fleet::authenticate_agent(c, &credential)? {
            Some(id) => op(c, id),
            None => Ok(Err(ApiError::Unauthorized("the agent credential is not valid"))),
        })
        .await?
}

pub(crate) fn body<T>(body: Result<Json<T>, JsonRejection>, limit: usize) -> Result<T, ApiError> {
    body.map(|Json(v)| v).map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(limit as u64)
        } else {
            ApiError::from(rejection)
        }
    })
}

/// `POST /api/v1/agents/reports`: a batch of operation reports, stored all or nothing.
pub async fn reports(
    State(state): State<AppState>,
    headers: HeaderMap,
    batch: Result<Json<ReportBatch>, JsonRejection>,
) -> Result<Json<ReportAck>, ApiError> {
    let credential = credential(&headers)?;
    let batch = body(batch, REPORTS_BODY_LIMIT);
    let accepted = as_agent(&state, credential, move |c, agent_id| {
        let batch = match batch {
            Ok(batch) => batch,
            Err(refused) => return Ok(Err(refused)),
        };
        match rm_fleet::ingest_reports(c, rm_fleet::now(), &agent_id, &batch.reports) {
            Ok(n) => Ok(Ok(n)),
            Err(IngestError::Db(e)) => Err(e),
            Err(refused) => {
                warn!(agent_id, error = %refused, "operation reports refused");
                Ok(Err(match refused {
                    IngestError::ForeignOperation { .. } => ApiError::Conflict(refused.to_string()),
                    _ => ApiError::InvalidRequest(refused.to_string()),
                }))
            }
        }
    })
    .await?;
    Ok(Json(ReportAck { accepted }))
}

fn check_lease_names(repository: &str, operation_id: &str) -> Result<(), ApiError> {
    rm_protocol::validate::name("name", repository)
        .map_err(|e| ApiError::InvalidRequest(format!("repository: {e}")))?;
    if !rm_fleet::operations::is_operation_id(operation_id) {
        return Err(ApiError::InvalidRequest("operation_id must be op_ + 32 lowercase hex digits".into()));
    }
    Ok(())
}

/// `POST /api/v1/agents/leases`: take or renew a repository's run lease, or (with `maintenance`) its maintenance
/// lease for one firing: 409 `maintenance_done` when a successful run already covered that slot.
pub async fn take_lease(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Result<Json<LeaseRequest>, JsonRejection>,
) -> Result<Json<LeaseGranted>, ApiError> {
    let credential = credential(&headers)?;
    let request = body(request, crate::JSON_BODY_LIMIT)
        .and_then(|r| check_lease_names(&r.repository, &r.operation_id).map(|()| r));
    let max_ttl = state.settings().max_lease_ttl.as_secs();
    let (request, lease) = as_agent(&state, credential, move |c, agent_id| {
        let request = match request {
            Ok(r) => r,
            Err(refused) => return Ok(Err(refused)),
        };
        let now = rm_fleet::now();
        let (repository, operation, ttl) = (&request.repository, &request.operation_id, request.ttl_secs);
        let lease = match &request.maintenance {
            None => match rm_fleet::take_lease_capped(c, now, &agent_id, repository, operation, ttl, max_ttl)? {
                Lease::Granted { expires_at } => {
                    let granted = (expires_at - now).max(0) as u64;
                    MaintLease::Granted { expires_at, ttl_secs: granted }
                }
                Lease::Busy { holder_agent, retry_after_secs, .. } => {
                    MaintLease::Busy { holder_agent, retry_after_secs }
                }
            },
            Some(m) => rm_fleet::take_maintenance_lease(c, now, &agent_id, repository, operation, ttl, max_ttl, m)?,
        };
        Ok(Ok((request, lease)))
    })
    .await?;
    match lease {
        MaintLease::Granted { expires_at, ttl_secs } => Ok(Json(LeaseGranted {
            repository: request.repository,
            operation_id: request.operation_id,
            expires_at,
            ttl_secs: Some(ttl_secs),
        })),
        MaintLease::Busy { holder_agent, retry_after_secs } => {
            Err(ApiError::RepositoryBusy { repository: request.repository, holder_agent, retry_after_secs })
        }
        MaintLease::Exhausted { failed_runs } => Err(ApiError::refused(
            StatusCode::CONFLICT,
            "maintenance_exhausted",
            format!(
                "runs of this slot of repository {} failed {failed_runs} times; it is given up until the next firing",
                request.repository
            ),
        )
        .with("repository", request.repository)
        .with("failed_runs", failed_runs)),
        MaintLease::NotUsed => Err(ApiError::refused(
            StatusCode::FORBIDDEN,
            "repository_not_used",
            format!(
                "no plan on repository {} applies to this agent: it does not run the repository's maintenance",
                request.repository
            ),
        )
        .with("repository", request.repository)),
        MaintLease::SlotAhead { latest } => Err(ApiError::refused(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("maintenance.slot: later than any firing can be now (latest accepted {latest}); is this host's clock right?"),
        )
        .with("field", "maintenance.slot")
        .with("latest", latest)),
        MaintLease::Done { done_slot } => Err(ApiError::refused(
            StatusCode::CONFLICT,
            rm_protocol::maintenance::MAINTENANCE_DONE,
            format!("a successful run already covered this slot of repository {}", request.repository),
        )
        .with("repository", request.repository)
        .with("done_slot", done_slot)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseQuery {
    operation_id: String,
}

/// `DELETE /api/v1/agents/leases/{repository}?operation_id=`: release the lease if this agent's operation holds it
/// (204 either way: a lease that lapsed or was taken over is not the caller's any more).
pub async fn release_lease(
    State(state): State<AppState>,
    headers: HeaderMap,
    repository: Result<Path<String>, PathRejection>,
    query: Result<Query<ReleaseQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let credential = credential(&headers)?;
    let checked = repository.map_err(ApiError::from).and_then(|Path(repository)| {
        let Query(q) = query?;
        check_lease_names(&repository, &q.operation_id)?;
        Ok((repository, q.operation_id))
    });
    as_agent(&state, credential, move |c, agent_id| {
        let (repository, operation_id) = match checked {
            Ok(names) => names,
            Err(refused) => return Ok(Err(refused)),
        };
        rm_fleet::release_lease(c, &agent_id, &repository, &operation_id)?;
        Ok(Ok(()))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /api/v1/operations?agent=&plan=&status=&before=&limit=`: newest first; follow `next_before`.
pub async fn list_operations(
    _: Admin,
    State(state): State<AppState>,
    query: Result<Query<OperationQuery>, QueryRejection>,
) -> Result<Json<OperationPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    if q.limit.is_some_and(|l| !(1..=rm_fleet::operations::MAX_PAGE).contains(&l)) {
        return Err(ApiError::InvalidRequest(format!(
            "limit must be between 1 and {}",
            rm_fleet::operations::MAX_PAGE
        )));
    }
    let (operations, next_before) = state.fleet().call(move |c| rm_fleet::list_operations(c, &q)).await?;
    Ok(Json(OperationPage { operations, next_before }))
}

/// `GET /api/v1/agents/{id}/snapshots`: what the agent last reported, newest first.
pub async fn list_snapshots(
    _: Admin,
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<SnapshotList>, ApiError> {
    let Path(agent_id) = id?;
    let lookup = agent_id.clone();
    let snapshots = state.fleet().call(move |c| rm_fleet::list_snapshots(c, &lookup)).await?;
    let snapshots = snapshots
        .ok_or_else(|| ApiError::NotFound(format!("agent {:?}", agent_id.chars().take(64).collect::<String>())))?;
    Ok(Json(SnapshotList { agent_id, snapshots }))
}
