//! `/api/v1/agents/enroll` and `/api/v1/agents/heartbeat`: what agents call.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use rm_assets::Platform;
use rm_fleet::model::{self, AuditEvent, HostFacts};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::auth::{Peer, bearer};
use crate::public_url::base_url;
use crate::routes::assets::{PlatformEntry, served_entry};
use crate::{ApiError, AppState};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// May also be sent as `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token: Option<String>,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub version: String,
    pub commit: String,
}

#[derive(Debug, Serialize)]
pub struct EnrollResponse {
    pub agent_id: String,
    /// `rmagt_<id>_<secret>`: the agent's bearer credential, returned this once.
    pub credential: String,
    pub heartbeat_interval_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub version: String,
    pub commit: String,
    #[serde(default)]
    pub binary_sha256: Option<String>,
    #[serde(default)]
    pub last_update_error: Option<String>,
    #[serde(default)]
    pub seq: u64,
}

#[derive(Debug, Serialize)]
pub struct HeartbeatResponse {
    pub agent_id: String,
    pub heartbeat_interval_secs: u64,
    pub server: rm_buildinfo::BuildInfo,
    /// The agent build this server serves for the agent's platform (`null` when none is published).
    pub update: Option<PlatformEntry>,
}

fn text(field: &str, value: &str, max: usize) -> Result<String, ApiError> {
    let ok = !value.is_empty() && value.len() <= max && value.chars().all(|c| !c.is_control());
    if ok {
        Ok(value.to_string())
    } else {
        Err(ApiError::InvalidRequest(format!("{field} must be 1..={max} printable characters")))
    }
}

fn hostname(value: &str) -> Result<String, ApiError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(value.to_string())
    } else {
        Err(ApiError::InvalidRequest("hostname must be 1..=253 of [A-Za-z0-9._-]".into()))
    }
}

fn facts(
    hostname_: &str,
    os: &str,
    arch: &str,
    version: &str,
    commit: &str,
) -> Result<(HostFacts, Platform), ApiError> {
    let platform = Platform::parse(os, arch)?;
    let facts = HostFacts {
        hostname: hostname(hostname_)?,
        os: platform.os.as_str().into(),
        arch: platform.arch.as_str().into(),
        agent_version: text("version", version, 128)?,
        agent_commit: text("commit", commit, 128)?,
    };
    Ok((facts, platform))
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(v)| v).map_err(ApiError::from)
}

/// `POST /api/v1/agents/enroll`
pub async fn enroll(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_body(body)?;
    let token = request
        .token
        .clone()
        .or_else(|| bearer(&headers).map(str::to_owned))
        .ok_or(ApiError::Unauthorized("an enrollment token is required"))?;
    let (facts, platform) = facts(&request.hostname, &request.os, &request.arch, &request.version, &request.commit)?;
    let mut audit = AuditEvent {
        platform: Some(platform.to_string()),
        detail: Some(format!(
            "hostname={} version={} commit={}",
            facts.hostname, facts.agent_version, facts.agent_commit
        )),
        ..super::audit_event("enroll", peer, &headers)
    };
    let outcome = state
        .fleet()
        .call(move |c| {
            let now = model::now();
            let outcome = model::enroll(c, now, &token, &facts)?;
            if let Ok(enrolled) = &outcome {
                audit.at = now;
                audit.agent_id = Some(enrolled.agent_id.clone());
                model::record_audit(c, &audit)?;
            }
            Ok(outcome)
        })
        .await?;
    match outcome {
        Ok(enrolled) => Ok((
            StatusCode::CREATED,
            Json(EnrollResponse {
                agent_id: enrolled.agent_id,
                credential: enrolled.credential,
                heartbeat_interval_secs: state.settings().heartbeat_interval.as_secs(),
            }),
        )
            .into_response()),
        Err(refused) => {
            warn!(peer = ?peer, reason = refused.code(), "enrollment refused");
            Err(ApiError::EnrollRefused(refused))
        }
    }
}

/// `POST /api/v1/agents/heartbeat` with `Authorization: Bearer <agent credential>`.
pub async fn heartbeat(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<HeartbeatRequest>, JsonRejection>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let credential = bearer(&headers).ok_or(ApiError::Unauthorized("an agent credential is required"))?.to_owned();
    let request = json_body(body)?;
    let (facts, platform) = facts(&request.hostname, &request.os, &request.arch, &request.version, &request.commit)?;
    let binary_sha256 = match request.binary_sha256 {
        Some(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => Some(s.to_ascii_lowercase()),
        Some(_) => return Err(ApiError::InvalidRequest("binary_sha256 must be 64 hex digits".into())),
        None => None,
    };
    let last_update_error = request.last_update_error.map(|e| e.chars().take(1024).collect());
    let hb = model::Heartbeat { facts, binary_sha256, last_update_error, seq: request.seq };
    let agent_id = state
        .fleet()
        .call(move |c| model::heartbeat(c, model::now(), &credential, &hb))
        .await?
        .ok_or(ApiError::Unauthorized("the agent credential is not valid"))?;
    let base = base_url(state.public_url(), &headers).unwrap_or_default();
    let update = served_entry(&state, platform, base).await?;
    Ok(Json(HeartbeatResponse {
        agent_id,
        heartbeat_interval_secs: state.settings().heartbeat_interval.as_secs(),
        server: rm_buildinfo::current(),
        update: Some(update).filter(|e| e.published),
    }))
}
