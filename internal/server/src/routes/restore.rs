//! Restores and snapshot browsing: `POST /api/v1/agents/{id}/restore` and
//! `GET /api/v1/agents/{id}/snapshots/{snapshot}/files?path=` (admin), and what agents call to get their tasks at
//! once instead of at the next heartbeat: the long-poll `GET /api/v1/agents/tasks?wait=&seen=` and the listing
//! answer `POST /api/v1/agents/tasks/{request_id}` (agent credential).
//!
//! The server never opens a repository: a listing is a task the agent runs (`restic ls`), held in memory while the
//! operator's request waits for it.

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use rm_fleet::restores::{
    CancelRefused, RestoreRefused, cancel_queued_operation, expire_queued_restores, queued_restores, request_restore,
    snapshot_for_agent,
};
use rm_protocol::backup::{OperationCreated, RunNow};
use rm_protocol::restore::{
    AgentTasks, CreateRestore, FileList, LsResult, LsTask, MAX_ENTRIES, MAX_TASKS_WAIT_SECS, check_path,
    is_snapshot_ref,
};
use rm_protocol::validate::{clean_text, is_printable};
use serde::Deserialize;

use super::operations::{as_agent, body, credential};
use crate::auth::{Admin, Peer};
use crate::tasks::{LsRefused, MAX_PENDING_LS_PER_AGENT, POLL_BUSY_RETRY_SECS};
use crate::{ApiError, AppState};

/// Largest listing answer an agent may post (10,000 entries with long names fit).
pub(crate) const LS_BODY_LIMIT: usize = 8 * 1024 * 1024;

fn refused(r: RestoreRefused) -> ApiError {
    let message = r.to_string();
    match r {
        RestoreRefused::Invalid(m) => ApiError::InvalidRequest(m),
        RestoreRefused::UnknownSourceAgent(_) | RestoreRefused::AmbiguousSnapshot(_) => {
            ApiError::InvalidRequest(message)
        }
        RestoreRefused::UnknownAgent(_) => ApiError::refused(StatusCode::NOT_FOUND, "agent_not_found", message),
        RestoreRefused::SnapshotNotFound(_) => ApiError::refused(StatusCode::NOT_FOUND, "snapshot_not_found", message),
        RestoreRefused::PlanGone { .. } => ApiError::refused(StatusCode::CONFLICT, "snapshot_plan_gone", message),
        RestoreRefused::RepositoryNotConfigured { .. } => {
            ApiError::refused(StatusCode::CONFLICT, "repository_not_configured", message)
        }
    }
}

/// An agent id from the path: printable and short, else a 404 like any unknown agent.
fn agent_param(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = path?;
    if !is_printable(&id, 128) {
        return Err(ApiError::refused(StatusCode::NOT_FOUND, "agent_not_found", "agent was not found"));
    }
    Ok(id)
}

/// `POST /api/v1/agents/{id}/restore` (admin): queues a restore on agent `{id}` and wakes it; 202 with the
/// operation id. Records `restore_requested`.
pub async fn create(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    spec: Result<Json<CreateRestore>, JsonRejection>,
) -> Result<Response, ApiError> {
    let agent_id = agent_param(path)?;
    let Json(spec) = spec?;
    let operation_id = request(&state, peer, &headers, &agent_id, spec).await?;
    Ok((StatusCode::ACCEPTED, Json(OperationCreated { operation_id })).into_response())
}

/// Queues a restore on `agent_id` (validated, audited as `restore_requested`) and wakes it; the API and the web
/// page's restore form both come here.
pub(crate) async fn request(
    state: &AppState,
    peer: Option<std::net::SocketAddr>,
    headers: &HeaderMap,
    agent_id: &str,
    spec: CreateRestore,
) -> Result<String, ApiError> {
    let event = super::audit_event("restore_requested", peer, headers);
    let now = rm_fleet::now();
    let agent = agent_id.to_owned();
    let outcome = state.fleet().call(move |c| request_restore(c, now, &agent, &spec, event)).await?;
    let (operation_id, snapshot) = outcome.map_err(refused)?;
    state.tasks().wake(agent_id);
    tracing::info!(agent_id, operation_id, snapshot = snapshot.id, "restore requested");
    Ok(operation_id)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesQuery {
    #[serde(default)]
    path: Option<String>,
}

/// How long a listing waits for the agent: two thirds of the API timeout (20 s of the default 30 s).
fn ls_wait(state: &AppState) -> Duration {
    state.settings().api_timeout * 2 / 3
}

/// `GET /api/v1/agents/{id}/snapshots/{snapshot}/files?path=/dir` (admin): one directory level of a snapshot, as
/// agent `{id}` (which must have the snapshot's repository) lists it with `restic ls`. 504 `agent_timeout` when the
/// agent does not answer in time (offline, or busy beyond the wait).
pub async fn files(
    _: Admin,
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<FilesQuery>, QueryRejection>,
) -> Result<Json<FileList>, ApiError> {
    let Path((agent_id, snapshot)) = path?;
    if !is_printable(&agent_id, 128) {
        return Err(ApiError::refused(StatusCode::NOT_FOUND, "agent_not_found", "agent was not found"));
    }
    let Query(q) = query.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let dir = q.path.unwrap_or_else(|| "/".into());
    check_path("path", &dir).map_err(ApiError::InvalidRequest)?;
    if !is_snapshot_ref(&snapshot) {
        return Err(ApiError::InvalidRequest("snapshot: must be a snapshot id (8 to 64 hex digits)".into()));
    }
    let agent = agent_id.clone();
    let found = state.fleet().call(move |c| snapshot_for_agent(c, &agent, &snapshot, None)).await?;
    let snapshot = found.map_err(refused)?;
    let task = LsTask {
        request_id: format!("ls_{}", &rm_fleet::plans::new_operation_id()[3..]),
        repository: snapshot.repository.clone(),
        snapshot: snapshot.id.clone(),
        path: dir.clone(),
    };
    let request_id = task.request_id.clone();
    let reply = match state.tasks().add_ls(&agent_id, task) {
        Ok(reply) => reply,
        Err(LsRefused::Fleet) => {
            return Err(ApiError::refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_listings",
                "too many snapshot listings are pending; retry shortly",
            ));
        }
        Err(LsRefused::Agent) => {
            return Err(ApiError::refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_listings",
                format!(
                    "{MAX_PENDING_LS_PER_AGENT} snapshot listings are pending for agent {agent_id} already; retry \
                     shortly"
                ),
            ));
        }
    };
    // Removed however this ends, also when the operator's connection goes away while it waits.
    let _pending = PendingGuard { state: &state, request_id: &request_id };
    let wait = ls_wait(&state);
    let answer = tokio::time::timeout(wait, reply).await;
    let result = match answer {
        Ok(Ok(result)) => result,
        _ => {
            return Err(ApiError::refused(
                StatusCode::GATEWAY_TIMEOUT,
                "agent_timeout",
                format!(
                    "agent {agent_id} did not list the snapshot within {} s: it is offline, or older than snapshot \
                     browsing, or busy",
                    wait.as_secs()
                ),
            ));
        }
    };
    if let Some(error) = result.error {
        let status = if result.not_found { StatusCode::NOT_FOUND } else { StatusCode::UNPROCESSABLE_ENTITY };
        let code = if result.not_found { "path_not_found" } else { "listing_failed" };
        return Err(ApiError::refused(status, code, clean_text(&error, 4096)));
    }
    let mut entries = result.entries;
    let truncated = result.truncated || entries.len() > MAX_ENTRIES;
    entries.truncate(MAX_ENTRIES);
    for e in &mut entries {
        e.name = clean_text(&e.name, 4096);
        e.kind = clean_text(&e.kind, 32);
        e.mtime = e.mtime.as_deref().map(|m| clean_text(m, 64));
    }
    Ok(Json(FileList { snapshot: snapshot.id, path: dir, entries, truncated }))
}

/// Drops a pending listing when its request ends.
struct PendingGuard<'a> {
    state: &'a AppState,
    request_id: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.state.tasks().remove_ls(self.request_id);
    }
}

#[derive(Debug, Deserialize)]
pub struct TasksQuery {
    #[serde(default)]
    wait: Option<u64>,
    #[serde(default)]
    seen: Option<u64>,
}

/// `GET /api/v1/agents/tasks?wait=25&seen=<generation>` (agent credential): everything pending for the agent
/// (run-now and restore requests, listings). Answered at once unless `seen` is the agent's current generation;
/// then when something new arrives, or after `wait` seconds (at most 25, and five sixths of the API timeout).
/// Long-polls held at once are capped at half the connection limit: past that, the agent is answered at once with
/// what is pending and `retry_after_secs` (it waits that long before asking again), so held long-polls never take
/// the room heartbeats, admin requests and `/healthz` need. Restores queued longer than a day are cancelled here
/// rather than handed out.
pub async fn tasks(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<TasksQuery>, QueryRejection>,
) -> Result<Json<AgentTasks>, ApiError> {
    let credential = credential(&headers)?;
    let agent_id = as_agent(&state, credential, |_, id| Ok(Ok(id))).await?;
    let Query(q) = query.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let mut rx = state.tasks().subscribe(&agent_id);
    let mut generation = *rx.borrow_and_update();
    let max_connections = state.settings().net.max_connections;
    let slot = state.tasks().hold_poll(|| crate::conn::max_connections(max_connections));
    let retry_after_secs = slot.is_none().then_some(POLL_BUSY_RETRY_SECS);
    if slot.is_some() && q.seen == Some(generation) {
        let cap = Duration::from_secs(MAX_TASKS_WAIT_SECS).min(state.settings().api_timeout * 5 / 6);
        let wait = Duration::from_secs(q.wait.unwrap_or(0)).min(cap);
        let deadline = tokio::time::Instant::now() + wait;
        // In one-second steps, so a server that is shutting down lets go of its long-polls.
        while !state.is_shutting_down() {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            let step = (deadline - now).min(Duration::from_secs(1));
            if let Ok(changed) = tokio::time::timeout(step, rx.changed()).await {
                if changed.is_ok() {
                    generation = *rx.borrow_and_update();
                }
                break;
            }
        }
    }
    drop(slot);
    let id = agent_id.clone();
    let now = rm_fleet::now();
    let (runs, restores) = state
        .fleet()
        .call(move |c| {
            expire_queued_restores(c, now, Some(&id))?;
            Ok((rm_fleet::queued_runs(c, &id)?, queued_restores(c, &id)?))
        })
        .await?;
    Ok(Json(AgentTasks {
        generation,
        run_now: runs.into_iter().map(|r| RunNow { operation_id: r.operation_id, plan: r.plan }).collect(),
        restore: restores,
        ls: state.tasks().pending_ls(&agent_id),
        retry_after_secs,
    }))
}

/// `POST /api/v1/operations/{id}/cancel` (admin): cancels an operation its agent has not taken yet (a queued restore
/// or run-now request); 204. 404 for an unknown id, 409 `not_queued` once the agent took it (or it ended). Records
/// `operation_cancelled`.
pub async fn cancel(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(id) = path?;
    if !is_printable(&id, 128) {
        return Err(ApiError::NotFound("operation".into()));
    }
    let event = super::audit_event("operation_cancelled", peer, &headers);
    let now = rm_fleet::now();
    let op = id.clone();
    let outcome = state.fleet().call(move |c| cancel_queued_operation(c, now, &op, event)).await?;
    match outcome {
        Ok(()) => {
            tracing::info!(operation_id = id, "queued operation cancelled");
            Ok(StatusCode::NO_CONTENT)
        }
        Err(e @ CancelRefused::NotFound(_)) => {
            Err(ApiError::refused(StatusCode::NOT_FOUND, "operation_not_found", e.to_string()))
        }
        Err(e @ CancelRefused::NotQueued { .. }) => {
            Err(ApiError::refused(StatusCode::CONFLICT, "not_queued", e.to_string()))
        }
    }
}

/// `POST /api/v1/agents/tasks/{request_id}` (agent credential): the agent's answer to a listing. 404 when no such
/// listing is pending for this agent (it timed out, or was answered already).
pub async fn answer(
    State(state): State<AppState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    result: Result<Json<LsResult>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let credential = credential(&headers)?;
    let agent_id = as_agent(&state, credential, |_, id| Ok(Ok(id))).await?;
    let Path(request_id) = path?;
    let result = body(result, LS_BODY_LIMIT)?;
    state.tasks().answer_ls(&agent_id, &request_id, result).map_err(|_| {
        ApiError::refused(StatusCode::NOT_FOUND, "request_not_found", "no such listing is pending for this agent")
    })?;
    Ok(StatusCode::NO_CONTENT)
}
