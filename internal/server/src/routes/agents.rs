//! `/api/v1/agents/enroll`, `/api/v1/agents/heartbeat` and `/api/v1/agents/config`: what agents call. The bodies
//! are `rm_protocol`'s, read leniently (unknown fields from newer agents are ignored) and validated here before
//! anything is stored.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use rm_fleet::{AuditEvent, DbError};
use rm_protocol::backup::{AgentConfigBody, AgentPlan, AgentRepository, ResticInfo, RunNow};
use rm_protocol::validate::{MAX_HOSTNAME_LEN, clean_text, is_hostname, is_printable, is_sha256_hex};
use rm_protocol::{
    EnrollRequest, EnrollResponse, HeartbeatRequest, HeartbeatResponse, HostFacts, PROTOCOL_VERSION, Platform,
};
use tracing::warn;

use crate::auth::{Peer, SecretsAllowed, bearer};
use crate::public_url::BaseUrl;
use crate::{ApiError, AppState, catalog};

/// Longest version or commit string stored.
const MAX_BUILD_TEXT: usize = 128;
/// Longest `last_update_error` stored (longer ones are cut).
const MAX_UPDATE_ERROR: usize = 1024;
/// Longest restic version, path and error stored (longer ones are cut).
const MAX_RESTIC_VERSION: usize = 128;
const MAX_RESTIC_PATH: usize = 4096;
const MAX_RESTIC_ERROR: usize = 1024;

fn text(field: &str, value: String, max: usize) -> Result<String, ApiError> {
    if is_printable(&value, max) {
        Ok(value)
    } else {
        Err(ApiError::InvalidRequest(format!("{field} must be 1..={max} printable characters")))
    }
}

/// Checks what an agent says about itself; the platform must be a supported one.
fn checked(facts: HostFacts) -> Result<(HostFacts, Platform), ApiError> {
    let platform = Platform::parse(&facts.os, &facts.arch)?;
    if !is_hostname(&facts.hostname) {
        return Err(ApiError::InvalidRequest(format!("hostname must be 1..={MAX_HOSTNAME_LEN} of [A-Za-z0-9._-]")));
    }
    let facts = HostFacts {
        version: text("version", facts.version, MAX_BUILD_TEXT)?,
        commit: text("commit", facts.commit, MAX_BUILD_TEXT)?,
        ..facts
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
        .or_else(|| bearer(&headers).map(str::to_owned))
        .ok_or(ApiError::Unauthorized("an enrollment token is required"))?;
    let (facts, platform) = checked(request.facts)?;
    let mut audit = AuditEvent {
        platform: Some(platform.to_string()),
        detail: Some(format!("hostname={} version={} commit={}", facts.hostname, facts.version, facts.commit)),
        ..super::audit_event("enroll", peer, &headers)
    };
    let outcome = state
        .fleet()
        .call(move |c| {
            let now = rm_fleet::now();
            let outcome = rm_fleet::enroll(c, now, &token, &facts)?;
            if let Ok(enrolled) = &outcome {
                audit.at = now;
                audit.agent_id = Some(enrolled.agent_id.clone());
                rm_fleet::record_audit(c, &audit)?;
            }
            Ok(outcome)
        })
        .await?;
    match outcome {
        Ok(enrolled) => Ok((
            StatusCode::CREATED,
            Json(EnrollResponse {
                protocol: PROTOCOL_VERSION,
                agent_id: enrolled.agent_id,
                credential: enrolled.credential,
                heartbeat_interval_secs: state.settings().heartbeat_interval.as_secs(),
            }),
        )
            .into_response()),
        Err(refused) => {
            warn!(peer = %peer.map(|p| p.to_string()).unwrap_or_default(), reason = refused.code(), "enrollment refused");
            Err(ApiError::EnrollRefused(refused))
        }
    }
}

/// Heartbeats that could not be stored (full volume) are answered anyway; say so at most once a minute.
fn warn_unrecorded() {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = rm_fleet::now();
    if now - LAST.swap(now, Ordering::Relaxed) >= 60 {
        warn!("heartbeats are answered but not recorded: the data volume is full");
    }
}

/// What a heartbeat body says, checked.
fn checked_heartbeat(request: HeartbeatRequest) -> Result<(rm_fleet::Heartbeat, Platform), ApiError> {
    let (facts, platform) = checked(request.facts)?;
    let binary_sha256 = match request.binary_sha256 {
        Some(s) if is_sha256_hex(&s) => Some(s.to_ascii_lowercase()),
        Some(_) => return Err(ApiError::InvalidRequest("binary_sha256 must be 64 hex digits".into())),
        None => None,
    };
    let last_update_error = request.last_update_error.map(|e| clean_text(&e, MAX_UPDATE_ERROR));
    // Free text from a peer: a malformed one is dropped, not refused (the error itself is still stored).
    let last_update_sha256 = request.last_update_sha256.filter(|s| is_sha256_hex(s)).map(|s| s.to_ascii_lowercase());
    // What the agent says about restic is free text from a peer: stored cleaned and cut, never refused.
    let restic = request.restic.map(|r| ResticInfo {
        version: r.version.map(|v| clean_text(&v, MAX_RESTIC_VERSION)),
        path: r.path.map(|p| clean_text(&p, MAX_RESTIC_PATH)),
        error: r.error.map(|e| clean_text(&e, MAX_RESTIC_ERROR)),
        managed: r.managed,
        install_error: r.install_error.map(|e| clean_text(&e, MAX_RESTIC_ERROR)),
    });
    let hb = rm_fleet::Heartbeat {
        facts,
        binary_sha256,
        last_update_error,
        last_update_sha256,
        trial: request.trial,
        seq: request.seq,
        restic,
        config_revision: request.config_revision,
    };
    Ok((hb, platform))
}

/// The build agent `id` should run now (its rollout wave's, else its platform's released build) with its archive
/// record; `None`: nothing released yet (the served build).
fn desired_build(
    c: &rm_fleet::Connection,
    id: &str,
    platform: Platform,
) -> Result<Option<(String, Option<rm_fleet::rollouts::BuildRecord>)>, DbError> {
    let Some(sha) = rm_fleet::rollouts::desired_build(c, id, platform.os.as_str(), platform.arch.as_str())? else {
        return Ok(None);
    };
    let record = rm_fleet::rollouts::get_build(c, &sha)?;
    Ok(Some((sha, record)))
}

/// The agent's queued run-now requests as the heartbeat answer carries them.
fn run_now(runs: Vec<rm_fleet::QueuedRun>) -> Vec<RunNow> {
    runs.into_iter().map(|r| RunNow { operation_id: r.operation_id, plan: r.plan }).collect()
}

/// `POST /api/v1/agents/heartbeat` with `Authorization: Bearer <agent credential>`. The credential is checked
/// before the body: a caller without a valid one learns nothing about what the server accepts.
pub async fn heartbeat(
    State(state): State<AppState>,
    base: BaseUrl,
    headers: HeaderMap,
    body: Result<Json<HeartbeatRequest>, JsonRejection>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let credential = bearer(&headers).ok_or(ApiError::Unauthorized("an agent credential is required"))?.to_owned();
    let checked = json_body(body).and_then(checked_heartbeat);
    let fallback_platform = checked.as_ref().ok().map(|(_, p)| *p);
    let fallback_credential = credential.clone();
    let recorded = state
        .fleet()
        .call(move |c| {
            let Some(id) = rm_fleet::authenticate_agent(c, &credential)? else {
                return Ok(Err(ApiError::Unauthorized("the agent credential is not valid")));
            };
            match checked {
                Ok((hb, platform)) => {
                    if !hb.trial {
                        rm_fleet::record_heartbeat(c, rm_fleet::now(), &id, &hb)?;
                    }
                    let (revision, runs) = rm_fleet::plans::heartbeat_directives(c, &id)?;
                    rm_fleet::restores::expire_queued_restores(c, rm_fleet::now(), Some(&id))?;
                    let restores = rm_fleet::restores::queued_restores(c, &id)?;
                    let desired = desired_build(c, &id, platform)?;
                    Ok(Ok((id, platform, revision, runs, restores, desired)))
                }
                Err(refused) => Ok(Err(refused)),
            }
        })
        .await;
    let (agent_id, platform, revision, queued, restores, desired) = match (recorded, fallback_platform) {
        // A full data volume must not cut agents off from their updates: answer an authenticated agent anyway.
        (Err(DbError::Full), Some(platform)) => {
            let found = state
                .fleet()
                .call(move |c| {
                    let Some(id) = rm_fleet::authenticate_agent(c, &fallback_credential)? else { return Ok(None) };
                    let (revision, runs) = rm_fleet::plans::heartbeat_directives(c, &id)?;
                    let restores = rm_fleet::restores::queued_restores(c, &id)?;
                    let desired = desired_build(c, &id, platform)?;
                    Ok(Some((id, revision, runs, restores, desired)))
                })
                .await?;
            let (id, revision, runs, restores, desired) =
                found.ok_or(ApiError::Unauthorized("the agent credential is not valid"))?;
            warn_unrecorded();
            (id, platform, revision, runs, restores, desired)
        }
        (recorded, _) => recorded??,
    };
    let base = base.or_relative();
    let served = catalog::entry(&state, platform, base.clone()).await?;
    let update = crate::rollouts::update_entry(platform, &base, served, desired);
    let restic = catalog::restic_entry(&state, platform, base).await?;
    Ok(Json(HeartbeatResponse {
        protocol: PROTOCOL_VERSION,
        agent_id,
        heartbeat_interval_secs: state.settings().heartbeat_interval.as_secs(),
        server: Some(rm_buildinfo::current()),
        update,
        config_revision: Some(revision),
        run_now: run_now(queued),
        restore: restores,
        restic: Some(restic).filter(|e| e.published),
    }))
}

/// `GET /api/v1/agents/config` with `Authorization: Bearer <agent credential>`: every plan that applies to the
/// agent and the repositories they use, with decrypted secrets. Secrets go only over TLS, to a loopback peer, or
/// through a `--trusted-proxies` proxy that says the client used https (403 `secrets_need_tls` otherwise). The
/// revision and the plans are read in one transaction, so they match.
pub async fn config(
    State(state): State<AppState>,
    Peer(peer): Peer,
    SecretsAllowed(allowed): SecretsAllowed,
    headers: HeaderMap,
) -> Result<Json<AgentConfigBody>, ApiError> {
    let credential = bearer(&headers).ok_or(ApiError::Unauthorized("an agent credential is required"))?.to_owned();
    let key = state.secret_key().clone();
    let answer = state
        .fleet()
        .call(move |c| {
            let Some(id) = rm_fleet::authenticate_agent(c, &credential)? else {
                return Ok(Err(ApiError::Unauthorized("the agent credential is not valid")));
            };
            if !allowed {
                return Ok(Err(secrets_need_tls()));
            }
            let revision = rm_fleet::config_revision(c)?;
            let plans = rm_fleet::plans_for_agent(c, &id)?.unwrap_or_default();
            let mut repositories = Vec::new();
            for name in rm_fleet::plans::repositories_of(&plans) {
                let (Some(info), Some(secrets)) =
                    (rm_fleet::get_repository(c, &name)?, rm_fleet::repository_secrets(c, &key, &name)?)
                else {
                    return Ok(Err(ApiError::Internal(format!("repository {name:?} of a plan is missing"))));
                };
                let Ok(secrets) = secrets else {
                    return Ok(Err(ApiError::Internal(format!("the secrets of repository {name:?} do not decrypt"))));
                };
                let (prune, check) =
                    rm_fleet::maintenance::agent_policies(c, rm_fleet::now(), &info.name, &info.prune, &info.check)?;
                repositories.push(AgentRepository {
                    prune,
                    check,
                    name: info.name,
                    url: info.url,
                    password: secrets.password,
                    env: secrets.env,
                    ca_cert: info.ca_cert,
                    auto_init: info.auto_init,
                    min_restic_version: info.min_restic_version,
                });
            }
            let plans = plans.into_iter().map(|p| agent_plan(p.plan)).collect();
            Ok(Ok((id, AgentConfigBody { revision, plans, repositories })))
        })
        .await?;
    match answer {
        Ok((agent_id, body)) => {
            tracing::debug!(agent_id, revision = body.revision, plans = body.plans.len(), "configuration sent");
            Ok(Json(body))
        }
        Err(refused) => {
            if matches!(refused, ApiError::Refused { code: "secrets_need_tls", .. }) {
                let peer = peer.map(|p| p.to_string()).unwrap_or_default();
                warn!(%peer, "refused to send repository secrets over plain HTTP");
            }
            Err(refused)
        }
    }
}

fn secrets_need_tls() -> ApiError {
    ApiError::refused(
        StatusCode::FORBIDDEN,
        "secrets_need_tls",
        "repository secrets are sent only over TLS or to a loopback address: enable TLS on the server (--tls, see \
         README \"TLS\") or put it behind a TLS-terminating proxy listed in --trusted-proxies (RM_TRUSTED_PROXIES) \
         that sets X-Forwarded-Proto: https",
    )
}

fn agent_plan(p: rm_fleet::NewPlan) -> AgentPlan {
    AgentPlan {
        name: p.name,
        repository: p.repository,
        paths: p.paths,
        excludes: p.excludes,
        schedule: p.schedule,
        timezone: p.timezone,
        tags: p.tags,
        one_file_system: p.one_file_system,
        exclude_caches: p.exclude_caches,
        timeout_secs: p.timeout_secs,
        jitter_secs: p.jitter_secs,
        retention: p.retention,
    }
}
