//! `/api/v1/plans` (admin): backup plans (what, where, when, on which agents) and run-now requests. Every change
//! bumps the fleet's configuration revision (agents refetch their plans) and records its audit event in the same
//! transaction (`plan_created`, `plan_updated`, `plan_deleted`, `plan_run_requested`).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use rm_fleet::{Labels, NewPlan, PlanInfo, PlanRefused, rfc3339};
use rm_protocol::backup::{CreatePlan, OperationCreated, PlanList, PlanView, RunPlan, UpdatePlan};

use crate::auth::{Admin, Peer};
use crate::{ApiError, AppState};

/// The API shape of a plan; `agents` are every enrolled agent's id and labels (for `applies_to`), `hostnames` their
/// hostnames (for `warnings`).
pub fn plan_view(info: PlanInfo, agents: &[(String, Labels)], hostnames: &BTreeMap<String, String>) -> PlanView {
    let applies_to = rm_fleet::plans::applies_to(&info, agents);
    let warnings = rm_fleet::plans::plan_warnings(&info, &applies_to, hostnames);
    let p = info.plan;
    PlanView {
        name: p.name,
        repository: p.repository,
        paths: p.paths,
        excludes: p.excludes,
        schedule: p.schedule,
        timezone: p.timezone,
        tags: p.tags,
        one_file_system: p.one_file_system,
        exclude_caches: p.exclude_caches,
        agents: p.agents,
        selector: p.selector,
        timeout_secs: p.timeout_secs,
        jitter_secs: p.jitter_secs,
        retention: p.retention,
        applies_to,
        created: rfc3339(info.created_at),
        updated: rfc3339(info.updated_at),
        warnings,
    }
}

fn refused(r: PlanRefused) -> ApiError {
    match r {
        PlanRefused::Invalid(message) => ApiError::InvalidRequest(message),
        PlanRefused::UnknownRepository(_) => ApiError::InvalidRequest(r.to_string()),
        PlanRefused::UnknownAgent(_) => ApiError::InvalidRequest(r.to_string()),
        PlanRefused::NameTaken(_) => ApiError::Conflict(r.to_string()),
        PlanRefused::NotFound(_) => ApiError::refused(StatusCode::NOT_FOUND, "plan_not_found", r.to_string()),
        PlanRefused::NotAssigned { .. } => ApiError::refused(StatusCode::CONFLICT, "plan_not_assigned", r.to_string()),
    }
}

fn not_found(name: &str) -> ApiError {
    refused(PlanRefused::NotFound(name.chars().take(64).collect()))
}

fn name_param(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(name) = path?;
    rm_fleet::repositories::validate_name(&name).map_err(|_| not_found(&name))?;
    Ok(name)
}

/// `POST /api/v1/plans` → 201 [`PlanView`]
pub async fn create(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Result<Json<CreatePlan>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(spec) = body?;
    let plan = NewPlan::validated(spec).map_err(ApiError::InvalidRequest)?;
    let event = super::audit_event("plan_created", peer, &headers);
    let now = rm_fleet::now();
    let (info, agents, hosts) = state
        .fleet()
        .call(move |c| {
            Ok(match rm_fleet::create_plan(c, now, &plan, event)? {
                Ok(info) => Ok((info, rm_fleet::plans::agent_labels(c)?, rm_fleet::plans::agent_hostnames(c)?)),
                Err(r) => Err(r),
            })
        })
        .await?
        .map_err(refused)?;
    tracing::info!(name = info.plan.name, "plan created");
    Ok((StatusCode::CREATED, Json(plan_view(info, &agents, &hosts))).into_response())
}

/// `GET /api/v1/plans`
pub async fn list(_: Admin, State(state): State<AppState>) -> Result<Json<PlanList>, ApiError> {
    let (plans, agents, hosts) = state
        .fleet()
        .call(|c| {
            Ok((rm_fleet::list_plans(c)?, rm_fleet::plans::agent_labels(c)?, rm_fleet::plans::agent_hostnames(c)?))
        })
        .await?;
    Ok(Json(PlanList { plans: plans.into_iter().map(|p| plan_view(p, &agents, &hosts)).collect() }))
}

/// `GET /api/v1/plans/{name}`
pub async fn get(
    _: Admin,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<PlanView>, ApiError> {
    let name = name_param(path)?;
    let lookup = name.clone();
    let (plan, agents, hosts) = state
        .fleet()
        .call(move |c| {
            Ok((
                rm_fleet::get_plan(c, &lookup)?,
                rm_fleet::plans::agent_labels(c)?,
                rm_fleet::plans::agent_hostnames(c)?,
            ))
        })
        .await?;
    Ok(Json(plan_view(plan.ok_or_else(|| not_found(&name))?, &agents, &hosts)))
}

/// `PATCH /api/v1/plans/{name}`: each field present replaces the stored one.
pub async fn update(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<UpdatePlan>, JsonRejection>,
) -> Result<Json<PlanView>, ApiError> {
    let name = name_param(path)?;
    let Json(changes) = body?;
    if rm_fleet::plans::is_empty_update(&changes) {
        return Err(ApiError::InvalidRequest("nothing to change: give at least one field".into()));
    }
    let event = super::audit_event("plan_updated", peer, &headers);
    let now = rm_fleet::now();
    let lookup = name.clone();
    let (info, agents, hosts) = state
        .fleet()
        .call(move |c| {
            Ok(match rm_fleet::update_plan(c, now, &lookup, &changes, event)? {
                Ok(info) => Ok((info, rm_fleet::plans::agent_labels(c)?, rm_fleet::plans::agent_hostnames(c)?)),
                Err(r) => Err(r),
            })
        })
        .await?
        .map_err(refused)?;
    tracing::info!(name, "plan updated");
    Ok(Json(plan_view(info, &agents, &hosts)))
}

/// `DELETE /api/v1/plans/{name}`: queued run-now requests of the plan are cancelled.
pub async fn delete(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let name = name_param(path)?;
    let event = super::audit_event("plan_deleted", peer, &headers);
    let now = rm_fleet::now();
    let lookup = name.clone();
    if !state.fleet().call(move |c| rm_fleet::delete_plan(c, now, &lookup, event)).await? {
        return Err(not_found(&name));
    }
    tracing::info!(name, "plan deleted");
    Ok(Json(serde_json::json!({"name": name, "deleted": true})).into_response())
}

/// `POST /api/v1/plans/{name}/run` `{"agent": ID}` → 202 [`OperationCreated`]: the run rides the agent's next
/// heartbeat answers until the agent reports it.
pub async fn run(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<RunPlan>, JsonRejection>,
) -> Result<Response, ApiError> {
    let name = name_param(path)?;
    let Json(RunPlan { agent }) = body?;
    let operation_id = request_run(&state, peer, &headers, &name, &agent).await?;
    Ok((StatusCode::ACCEPTED, Json(OperationCreated { operation_id })).into_response())
}

/// Queues a run of plan `name` on `agent` (audited as `plan_run_requested`) and wakes the agent; the API and the
/// web page's "Back up now" both come here.
pub(crate) async fn request_run(
    state: &AppState,
    peer: Option<std::net::SocketAddr>,
    headers: &HeaderMap,
    name: &str,
    agent: &str,
) -> Result<String, ApiError> {
    let event = super::audit_event("plan_run_requested", peer, headers);
    let now = rm_fleet::now();
    let (plan, agent_id) = (name.to_owned(), agent.to_owned());
    let outcome = state.fleet().call(move |c| rm_fleet::request_run(c, now, &plan, &agent_id, event)).await?;
    let operation_id = outcome.map_err(|r| match r {
        PlanRefused::UnknownAgent(_) => {
            ApiError::NotFound(format!("agent {:?}", agent.chars().take(64).collect::<String>()))
        }
        other => refused(other),
    })?;
    state.tasks().wake(agent);
    tracing::info!(plan = name, agent_id = agent, operation_id, "run requested");
    Ok(operation_id)
}
