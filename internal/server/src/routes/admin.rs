//! Admin API (`Authorization: Bearer <admin token>`): enrollment tokens, the fleet view, the audit log. Bodies are
//! `rm_protocol::admin`'s; the database rows of `rm_fleet` are turned into them here and never serialised directly.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use rm_fleet::{AuditEvent, NewToken, Timestamp, TokenInfo, rfc3339};
use rm_protocol::admin::{
    AgentFilter, AgentList, AuditEntry, AuditPage, AuditQuery, CreateToken, TokenCreated, TokenList, TokenView,
};
use rm_protocol::backup::SetLabels;

use crate::auth::{Admin, Peer};
use crate::public_url::BaseUrl;
use crate::{ApiError, AppState, catalog};

fn token_view(info: TokenInfo, now: Timestamp) -> TokenView {
    TokenView {
        status: info.status(now),
        created: rfc3339(info.created_at),
        expires: info.expires_at.map(rfc3339),
        id: info.id,
        note: info.note,
        created_at: info.created_at,
        expires_at: info.expires_at,
        max_uses: info.max_uses,
        uses: info.uses,
        revoked_at: info.revoked_at,
        labels: info.labels,
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
    let now = rm_fleet::now();
    let new = NewToken::validated(request.uses, expires_in, request.note, request.labels, now)
        .map_err(ApiError::InvalidRequest)?;
    let (info, token) = state.fleet().call(move |c| rm_fleet::create_token(c, now, &new)).await?;
    Ok((StatusCode::CREATED, Json(TokenCreated { view: token_view(info, now), token })).into_response())
}

/// `GET /api/v1/tokens`
pub async fn list_tokens(_: Admin, State(state): State<AppState>) -> Result<Json<TokenList>, ApiError> {
    let now = rm_fleet::now();
    let tokens = state.fleet().call(rm_fleet::list_tokens).await?;
    Ok(Json(TokenList { tokens: tokens.into_iter().map(|t| token_view(t, now)).collect() }))
}

/// `DELETE /api/v1/tokens/{id}`: revoke.
pub async fn revoke_token(
    _: Admin,
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<TokenView>, ApiError> {
    // A rejection (`%ff` is not UTF-8) would otherwise answer axum's text/plain.
    let Path(id) = id?;
    let now = rm_fleet::now();
    let lookup = id.clone();
    let info = state.fleet().call(move |c| rm_fleet::revoke_token(c, now, &lookup)).await?;
    let info = info
        .ok_or_else(|| ApiError::NotFound(format!("enrollment token {:?}", id.chars().take(64).collect::<String>())))?;
    Ok(Json(token_view(info, now)))
}

/// `GET /api/v1/agents[?state=current|out_of_date|stale|unknown][&health=ok|warning|failed|overdue|never]`
pub async fn list_agents(
    _: Admin,
    State(state): State<AppState>,
    base: BaseUrl,
    filter: Result<Query<AgentFilter>, QueryRejection>,
) -> Result<Json<AgentList>, ApiError> {
    let Query(filter) = filter.map_err(|e| {
        // serde's message already names the valid states ("unknown variant `x`, expected one of …").
        ApiError::InvalidRequest(e.body_text())
    })?;
    Ok(Json(catalog::fleet_view_now(&state, base.or_relative(), &filter).await?))
}

/// `PUT /api/v1/agents/{id}/labels`: replaces the agent's labels (every plan selector is matched against them);
/// answers the stored labels.
pub async fn set_labels(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<SetLabels>, JsonRejection>,
) -> Result<Json<SetLabels>, ApiError> {
    let Path(id) = id?;
    let Json(request) = body?;
    rm_fleet::validate_labels("labels", &request.labels).map_err(ApiError::InvalidRequest)?;
    let event = super::audit_event("agent_labels", peer, &headers);
    let lookup = id.clone();
    let record = state.fleet().call(move |c| rm_fleet::set_labels(c, &lookup, &request.labels, event)).await?;
    let record =
        record.ok_or_else(|| ApiError::NotFound(format!("agent {:?}", id.chars().take(64).collect::<String>())))?;
    tracing::info!(agent_id = record.id, labels = rm_fleet::labels::describe(&record.labels), "agent labels set");
    Ok(Json(SetLabels { labels: record.labels }))
}

/// Revokes agent `id`'s credential (`agent_revoked` in the audit log); `revoked` is false when it already was.
pub(crate) async fn revoke_agent(state: &AppState, event: AuditEvent, id: &str) -> Result<bool, ApiError> {
    let lookup = id.to_owned();
    let now = rm_fleet::now();
    let revoked = state.fleet().call(move |c| rm_fleet::revoke_agent_credential(c, now, &lookup, event)).await?;
    let revoked =
        revoked.ok_or_else(|| ApiError::NotFound(format!("agent {:?}", id.chars().take(64).collect::<String>())))?;
    if revoked {
        state.tasks().wake(id);
        tracing::warn!(agent_id = id, "agent credential revoked");
    }
    Ok(revoked)
}

/// `POST /api/v1/agents/{id}/revoke`: the agent's credential stops working at once; the host must enroll again.
pub async fn revoke(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(id) = id?;
    let event = super::audit_event("agent_revoked", peer, &headers);
    let revoked = revoke_agent(&state, event, &id).await?;
    Ok(Json(serde_json::json!({"agent_id": id, "revoked": true, "already_revoked": !revoked})))
}

fn audit_entry(e: AuditEvent) -> AuditEntry {
    AuditEntry {
        id: e.id,
        at: e.at,
        kind: e.kind,
        remote_addr: e.remote_addr,
        user_agent: e.user_agent,
        agent_id: e.agent_id,
        platform: e.platform,
        sha256: e.sha256,
        source: e.source,
        detail: e.detail,
    }
}

/// `GET /api/v1/audit[?kind=&before=&limit=]`: newest first; follow `next_before` for the next page.
pub async fn list_audit(
    _: Admin,
    State(state): State<AppState>,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::InvalidRequest("limit must be between 1 and 1000".into()));
    }
    let events = state.fleet().call(move |c| rm_fleet::list_audit(c, q.kind.as_deref(), q.before, limit)).await?;
    let next_before = (events.len() == limit as usize).then(|| events.last().map(|e| e.id)).flatten();
    Ok(Json(AuditPage { events: events.into_iter().map(audit_entry).collect(), next_before }))
}
