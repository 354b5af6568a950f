//! `/api/v1/plans` (admin): backup plans (what, where, when, on which agents) and run-now requests. Every change
//! bumps the fleet's configuration revision (agents refetch their plans) and records its audit event in the same
//! transaction (`plan_created`, `plan_updated`, `plan_deleted`, `plan_run_requested`).

use std::collections::BTreeMap;
use std::net::SocketAddr;

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

pub(crate) fn name_param(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(name) = path?;
    rm_protocol::validate::name("name", &name).map_err(|_| not_found(&name))?;
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
    let view = create_plan(&state, peer, &headers, spec).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// Checks, stores and audits a new plan (the API and the web page): 400 for invalid input or an unknown repository
/// or agent, 409 for a name that is taken (nothing written either way).
pub(crate) async fn create_plan(
    state: &AppState,
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    spec: CreatePlan,
) -> Result<PlanView, ApiError> {
    let plan = NewPlan::validated(spec).map_err(ApiError::InvalidRequest)?;
    let event = super::audit_event("plan_created", peer, headers);
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
    Ok(plan_view(info, &agents, &hosts))
}

/// `GET /api/v1/plans`
pub async fn list(_: Admin, State(state): State<AppState>) -> Result<Json<PlanList>, ApiError> {
    let plans = state.fleet().call(plan_views).await?;
    Ok(Json(PlanList { plans }))
}

/// Every plan as the API shows it (the API and the web page).
pub(crate) fn plan_views(c: &rm_fleet::Connection) -> Result<Vec<PlanView>, rm_fleet::DbError> {
    let (plans, agents, hosts) =
        (rm_fleet::list_plans(c)?, rm_fleet::plans::agent_labels(c)?, rm_fleet::plans::agent_hostnames(c)?);
    Ok(plans.into_iter().map(|p| plan_view(p, &agents, &hosts)).collect())
}

/// `GET /api/v1/plans/{name}`
pub async fn get(
    _: Admin,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<PlanView>, ApiError> {
    let name = name_param(path)?;
    Ok(Json(get_plan(&state, name).await?))
}

/// One plan as the API shows it; 404 `plan_not_found` (the API and the web page).
pub(crate) async fn get_plan(state: &AppState, name: String) -> Result<PlanView, ApiError> {
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
    Ok(plan_view(plan.ok_or_else(|| not_found(&name))?, &agents, &hosts))
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
    Ok(Json(update_plan(&state, peer, &headers, name, changes).await?))
}

/// Checks, applies and audits changes to a plan (the API and the web page): 400 for invalid or no changes, 404 for
/// an unknown plan (nothing written either way).
pub(crate) async fn update_plan(
    state: &AppState,
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    name: String,
    changes: UpdatePlan,
) -> Result<PlanView, ApiError> {
    if rm_fleet::plans::is_empty_update(&changes) {
        return Err(ApiError::InvalidRequest("nothing to change: give at least one field".into()));
    }
    let event = super::audit_event("plan_updated", peer, headers);
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
    Ok(plan_view(info, &agents, &hosts))
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
    delete_plan(&state, peer, &headers, &name).await?;
    Ok(Json(serde_json::json!({"name": name, "deleted": true})).into_response())
}

/// Deletes and audits a plan, cancelling its queued run-now requests (the API and the web page); 404 for an unknown
/// one.
pub(crate) async fn delete_plan(
    state: &AppState,
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    name: &str,
) -> Result<(), ApiError> {
    let event = super::audit_event("plan_deleted", peer, headers);
    let now = rm_fleet::now();
    let lookup = name.to_owned();
    if !state.fleet().call(move |c| rm_fleet::delete_plan(c, now, &lookup, event)).await? {
        return Err(not_found(name));
    }
    tracing::info!(name, "plan deleted");
    Ok(())
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
