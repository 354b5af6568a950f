//! `/api/v1/channels`, `/api/v1/rules`, `/api/v1/notifications` (admin): where notifications go, which events go
//! where, and what became of each queued message. Channel secrets (a webhook's `url` and `token`, the SMTP
//! `password`) go in sealed and never come out: views say `secrets_set` and show a webhook's origin only. Creations
//! and deletions are audited (kinds `notify_channel`, `notify_rule`) in the same transaction; `test` sends a sample
//! at once (not queued) and answers with what the SMTP server or webhook said, audited as `notify_channel_test`.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use rm_fleet::notify::{ChannelRow, RuleRefused};
use rm_protocol::notify::{
    ChannelList, ChannelSpec, ChannelView, DeliveryStatus, NotificationList, RuleList, RuleSpec, RuleView, TestResult,
};
use serde::Deserialize;

use crate::auth::{Admin, Peer};
use crate::{ApiError, AppState};

pub fn channel_view(row: ChannelRow, url_origin: Option<String>) -> ChannelView {
    let spec = row.spec;
    ChannelView {
        kind: spec.kind(),
        name: spec.name,
        url_origin,
        smtp_host: spec.smtp_host,
        smtp_port: spec.smtp_port,
        smtp_tls: spec.smtp_tls,
        username: spec.username,
        from: spec.from,
        to: spec.to,
        secrets_set: row.secrets_set,
        created_at: row.created_at,
    }
}

fn name_param(path: Result<Path<String>, PathRejection>, what: &str) -> Result<String, ApiError> {
    let Path(name) = path?;
    rm_protocol::validate::name("name", &name)
        .map_err(|_| ApiError::NotFound(format!("{what} {:?}", name.chars().take(64).collect::<String>())))?;
    Ok(name)
}

/// Checks, seals, stores and audits a channel (the API and the command line's shape): 400 for invalid input, 409
/// for a taken name.
pub(crate) async fn create_channel(
    state: &AppState,
    event: rm_fleet::AuditEvent,
    spec: ChannelSpec,
) -> Result<ChannelView, ApiError> {
    spec.validate().map_err(ApiError::InvalidRequest)?;
    let origin = spec.url.as_deref().map(rm_protocol::notify::url_origin);
    let key = state.secret_key().clone();
    let now = rm_fleet::now();
    let row = state
        .fleet()
        .call(move |c| Ok(rm_fleet::notify::create_channel(c, &key, now, &spec, event)?.map_err(|_| spec.name)))
        .await?
        .map_err(|name| ApiError::Conflict(format!("a channel named {name:?} already exists")))?;
    tracing::info!(name = row.spec.name, kind = row.spec.kind().as_str(), "notification channel created");
    Ok(channel_view(row, origin))
}

/// `POST /api/v1/channels`
pub async fn create(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Result<Json<ChannelSpec>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(spec) = body?;
    let view = create_channel(&state, super::audit_event("notify_channel", peer, &headers), spec).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// Every channel, with the origin of each webhook URL (opened from the sealed secrets, never shown whole).
pub(crate) async fn list_channels(state: &AppState) -> Result<Vec<ChannelView>, ApiError> {
    let key = state.secret_key().clone();
    let rows = state
        .fleet()
        .call(move |c| {
            let rows = rm_fleet::notify::list_channels(c, &key)?;
            let mut out = Vec::new();
            for row in rows {
                let origin = match rm_fleet::notify::channel_for_send(c, &key, &row.spec.name)? {
                    Some(Ok(full)) => full.url.as_deref().map(rm_protocol::notify::url_origin),
                    _ => None,
                };
                out.push((row, origin));
            }
            Ok(out)
        })
        .await?;
    Ok(rows.into_iter().map(|(row, origin)| channel_view(row, origin)).collect())
}

/// `GET /api/v1/channels`
pub async fn list(_: Admin, State(state): State<AppState>) -> Result<Json<ChannelList>, ApiError> {
    Ok(Json(ChannelList { channels: list_channels(&state).await? }))
}

/// `DELETE /api/v1/channels/{name}`: its rules and queued messages go with it.
pub async fn delete(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    delete_named(&state, "channel", name_param(path, "channel")?, peer, &headers, rm_fleet::notify::delete_channel)
        .await
}

/// Deletes what `delete` names (a channel or a rule) with its audit event: 204, or 404 when there was none.
async fn delete_named(
    state: &AppState,
    what: &'static str,
    name: String,
    peer: Option<std::net::SocketAddr>,
    headers: &HeaderMap,
    delete: fn(&rm_fleet::Connection, &str, rm_fleet::AuditEvent) -> Result<bool, rm_fleet::DbError>,
) -> Result<StatusCode, ApiError> {
    let event = super::audit_event(&format!("notify_{what}"), peer, headers);
    let target = name.clone();
    if state.fleet().call(move |c| delete(c, &target, event)).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("{what} {name:?}")))
    }
}

/// Sends the sample message to a channel now and reports the answer (the API and the command line).
pub(crate) async fn test_channel(
    state: &AppState,
    name: String,
    event: rm_fleet::AuditEvent,
) -> Result<TestResult, ApiError> {
    let key = state.secret_key().clone();
    let what = name.clone();
    let channel = state
        .fleet()
        .call(move |c| rm_fleet::notify::channel_for_send(c, &key, &what))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("channel {name:?}")))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let sample = crate::notify::sample(state.public_url().map(|u| u.to_string()));
    let outcome = tokio::task::spawn_blocking(move || crate::notify::send(&channel, &sample))
        .await
        .map_err(|e| ApiError::Internal(format!("the sender panicked: {e}")))?;
    let detail = format!("tested {name}: ok={} {}", outcome.ok, outcome.answer);
    let event = rm_fleet::AuditEvent { kind: "notify_channel_test".into(), detail: Some(detail), ..event };
    state.fleet().call(move |c| rm_fleet::record_audit(c, &event)).await?;
    Ok(TestResult { ok: outcome.ok, answer: outcome.answer })
}

/// `POST /api/v1/channels/{name}/test`: 200 with `ok` and the receiver's answer, whatever it was.
pub async fn test(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<TestResult>, ApiError> {
    let name = name_param(path, "channel")?;
    let event = super::audit_event("notify_channel_test", peer, &headers);
    Ok(Json(test_channel(&state, name, event).await?))
}

/// Checks, stores and audits a rule: 400 for invalid input or an unknown channel, 409 for a taken name.
pub(crate) async fn create_rule(
    state: &AppState,
    event: rm_fleet::AuditEvent,
    rule: RuleSpec,
) -> Result<RuleView, ApiError> {
    rule.validate().map_err(ApiError::InvalidRequest)?;
    let now = rm_fleet::now();
    let stored = rule.clone();
    state.fleet().call(move |c| rm_fleet::notify::create_rule(c, now, &stored, event)).await?.map_err(|e| match e {
        RuleRefused::NameTaken(_) => ApiError::Conflict(e.to_string()),
        RuleRefused::UnknownChannel(_) => ApiError::InvalidRequest(e.to_string()),
    })?;
    Ok(RuleView { rule, created_at: now })
}

/// `POST /api/v1/rules`
pub async fn create_rule_route(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Result<Json<RuleSpec>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(rule) = body?;
    let view = create_rule(&state, super::audit_event("notify_rule", peer, &headers), rule).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// `GET /api/v1/rules`
pub async fn list_rules(_: Admin, State(state): State<AppState>) -> Result<Json<RuleList>, ApiError> {
    let rules = state.fleet().call(rm_fleet::notify::list_rules).await?;
    Ok(Json(RuleList { rules: rules.into_iter().map(|(rule, created_at)| RuleView { rule, created_at }).collect() }))
}

/// `DELETE /api/v1/rules/{name}`
pub async fn delete_rule(
    _: Admin,
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    delete_named(&state, "rule", name_param(path, "rule")?, peer, &headers, rm_fleet::notify::delete_rule).await
}

/// `GET /api/v1/notifications?status=&limit=`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationQuery {
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub limit: Option<u32>,
}

/// `GET /api/v1/notifications`: the newest messages first, each with its attempts.
pub async fn notifications(
    _: Admin,
    State(state): State<AppState>,
    query: Result<Query<NotificationQuery>, QueryRejection>,
) -> Result<Json<NotificationList>, ApiError> {
    let Query(q) = query?;
    let status = q
        .status
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<DeliveryStatus>())
        .transpose()
        .map_err(ApiError::InvalidRequest)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::InvalidRequest("limit must be 1-1000".into()));
    }
    let list = state.fleet().call(move |c| rm_fleet::notify::list_notifications(c, status, limit)).await?;
    Ok(Json(NotificationList { notifications: list }))
}
