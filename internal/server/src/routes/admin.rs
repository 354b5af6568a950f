//! Admin API (`Authorization: Bearer <admin token>`): enrollment tokens, the fleet view, the audit log.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use rm_assets::Platform;
use rm_fleet::model::{self, AgentRecord, AuditEvent, NewToken, TokenInfo};
use serde::{Deserialize, Serialize};

use crate::auth::Admin;
use crate::routes::assets::{PlatformEntry, entries};
use crate::{ApiError, AppState};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// How many enrollments the token allows (unlimited when absent).
    pub uses: Option<u32>,
    /// Lifetime such as `24h` or `30m` (no expiry when absent).
    pub expires_in: Option<String>,
    #[serde(default)]
    pub note: String,
}

#[derive(Debug, Serialize)]
pub struct TokenView {
    #[serde(flatten)]
    pub info: TokenInfo,
    pub status: &'static str,
    pub created: String,
    pub expires: Option<String>,
}

impl TokenView {
    pub fn new(info: TokenInfo, now: model::Timestamp) -> TokenView {
        TokenView {
            status: info.status(now),
            created: model::rfc3339(info.created_at),
            expires: info.expires_at.map(model::rfc3339),
            info,
        }
    }
}

/// `POST /api/v1/tokens`
pub async fn create_token(
    _: Admin,
    State(state): State<AppState>,
    body: Result<Json<CreateToken>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body?;
    let expires_in = request
        .expires_in
        .as_deref()
        .map(humantime::parse_duration)
        .transpose()
        .map_err(|e| ApiError::InvalidRequest(format!("expires_in: {e}")))?;
    let now = model::now();
    let new = NewToken::validated(request.uses, expires_in, request.note, now).map_err(ApiError::InvalidRequest)?;
    let (info, token) = state.fleet().call(move |c| model::create_token(c, now, &new)).await?;
    #[derive(Serialize)]
    struct Created {
        #[serde(flatten)]
        view: TokenView,
        token: String,
    }
    Ok((StatusCode::CREATED, Json(Created { view: TokenView::new(info, now), token })).into_response())
}

/// `GET /api/v1/tokens`
pub async fn list_tokens(_: Admin, State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let now = model::now();
    let tokens = state.fleet().call(model::list_tokens).await?;
    let views: Vec<_> = tokens.into_iter().map(|t| TokenView::new(t, now)).collect();
    Ok(Json(serde_json::json!({ "tokens": views })))
}

/// `DELETE /api/v1/tokens/{id}`: revoke.
pub async fn revoke_token(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    let now = model::now();
    let lookup = id.clone();
    let info = state.fleet().call(move |c| model::revoke_token(c, now, &lookup)).await?;
    let info = info
        .ok_or_else(|| ApiError::NotFound(format!("enrollment token {:?}", id.chars().take(64).collect::<String>())))?;
    Ok(Json(TokenView::new(info, now)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Runs the build this server serves for its platform.
    Current,
    /// Runs a different build than the one served.
    OutOfDate,
    /// No heartbeat within the stale window.
    Stale,
    /// Nothing is served for its platform, or the served build cannot be compared.
    Unknown,
}

#[derive(Debug, Serialize)]
pub struct AgentView {
    #[serde(flatten)]
    pub record: AgentRecord,
    pub state: AgentState,
    pub last_seen: String,
    pub served_sha256: Option<String>,
}

/// Classifies an agent against the served builds.
pub fn classify(
    agent: &AgentRecord,
    served: &[PlatformEntry],
    now: model::Timestamp,
    stale_after: Duration,
) -> AgentState {
    if now.saturating_sub(agent.last_seen_at) > stale_after.as_secs() as i64 {
        return AgentState::Stale;
    }
    let Ok(platform) = Platform::parse(&agent.os, &agent.arch) else { return AgentState::Unknown };
    let Some(entry) = served.iter().find(|e| e.platform == platform && e.published) else {
        return AgentState::Unknown;
    };
    let same = match (&agent.binary_sha256, &entry.sha256, &entry.agent) {
        (Some(running), Some(served), _) => running == served,
        (None, _, Some(build)) => build.version == agent.agent_version && build.commit == agent.agent_commit,
        _ => return AgentState::Unknown,
    };
    if same { AgentState::Current } else { AgentState::OutOfDate }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFilter {
    pub state: Option<AgentState>,
}

/// `GET /api/v1/agents[?state=current|out_of_date|stale|unknown]`
pub async fn list_agents(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    filter: Result<Query<AgentFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(filter) = filter.map_err(|e| {
        ApiError::InvalidRequest(format!("{}; state is one of current, out_of_date, stale, unknown", e.body_text()))
    })?;
    let served = entries(&state, &headers).await?;
    let agents = state.fleet().call(model::list_agents).await?;
    let now = model::now();
    let stale_after = state.settings().stale_after;
    let mut counts: BTreeMap<AgentState, usize> = BTreeMap::new();
    let views: Vec<AgentView> = agents
        .into_iter()
        .map(|record| {
            let st = classify(&record, &served, now, stale_after);
            *counts.entry(st).or_default() += 1;
            let served_sha256 = Platform::parse(&record.os, &record.arch)
                .ok()
                .and_then(|p| served.iter().find(|e| e.platform == p))
                .and_then(|e| e.sha256.clone());
            AgentView { last_seen: model::rfc3339(record.last_seen_at), record, state: st, served_sha256 }
        })
        .filter(|v| filter.state.is_none_or(|s| s == v.state))
        .collect();
    Ok(Json(serde_json::json!({ "agents": views, "counts": counts, "stale_after_secs": stale_after.as_secs() })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub kind: Option<String>,
    pub before: Option<i64>,
    pub limit: Option<u32>,
}

/// `GET /api/v1/audit[?kind=&before=&limit=]`: newest first; follow `next_before` for the next page.
pub async fn list_audit(
    _: Admin,
    State(state): State<AppState>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::InvalidRequest("limit must be between 1 and 1000".into()));
    }
    let kind = q.kind.clone();
    let events: Vec<AuditEvent> =
        state.fleet().call(move |c| model::list_audit(c, kind.as_deref(), q.before, limit)).await?;
    let next_before = (events.len() == limit as usize).then(|| events.last().map(|e| e.id)).flatten();
    Ok(Json(serde_json::json!({ "events": events, "next_before": next_before })))
}
