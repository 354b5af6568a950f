//! The catalog of published builds: what this server serves for each platform (found through the asset store, data
//! dir first) and how an agent compares with it. The manifest, `SHA256SUMS`, heartbeat answers, the fleet view and
//! the start-up warm-up all ask here; nothing else decides what "published" or "current" means.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rm_assets::store::StoreError;
use rm_assets::{AssetKind, AssetStore, Digest, Source};
use rm_fleet::{AgentRecord, Timestamp};
use rm_protocol::admin::{AgentFilter, AgentList, AgentState, AgentView};
use rm_protocol::backup::PlanHealth;
use rm_protocol::{PLATFORMS, Platform, PlatformEntry};

use crate::{ApiError, AppState};

/// What the store found for a platform's binary.
struct Found {
    len: u64,
    modified: SystemTime,
    source: Source,
    digest: Arc<Digest>,
}

/// A platform's entry; `base` prefixes the download URL (empty for a relative one).
fn entry_from(platform: Platform, base: &str, found: Option<Found>) -> PlatformEntry {
    PlatformEntry {
        os: platform.os.as_str().into(),
        arch: platform.arch.as_str().into(),
        file: platform.file_name().into(),
        published: found.is_some(),
        size: found.as_ref().map(|f| f.len),
        sha256: found.as_ref().map(|f| f.digest.sha256_hex()),
        source: found.as_ref().map(|f| f.source.as_str().into()),
        last_modified: found.as_ref().map(|f| httpdate::fmt_http_date(f.modified)),
        url: format!("{base}/agent/binary?os={}&arch={}", platform.os.as_str(), platform.arch.as_str()),
        agent: found.and_then(|f| f.digest.build_info.clone()),
    }
}

/// The remembered binary of a platform, if still current (one or two `stat`s: fine on an async worker).
fn remembered(store: &AssetStore, platform: Platform, base: &str) -> Option<PlatformEntry> {
    let k = store.known(AssetKind::AgentBinary, platform.file_name())?;
    Some(entry_from(
        platform,
        base,
        Some(Found { len: k.len, modified: k.modified, source: k.source, digest: k.digest }),
    ))
}

/// One platform's entry. Blocking: a file not looked at before is opened and hashed.
pub fn entry_blocking(store: &AssetStore, platform: Platform, base: &str) -> Result<PlatformEntry, StoreError> {
    if let Some(entry) = remembered(store, platform, base) {
        return Ok(entry);
    }
    let found = store.open(AssetKind::AgentBinary, platform.file_name())?;
    let found = found.map(|a| Found { len: a.len, modified: a.modified, source: a.source, digest: a.digest });
    Ok(entry_from(platform, base, found))
}

/// Every platform's entry, in manifest order (blocking). Each platform fails or succeeds alone.
pub fn entries_blocking(store: &AssetStore, base: &str) -> Vec<(Platform, Result<PlatformEntry, StoreError>)> {
    PLATFORMS.iter().map(|&platform| (platform, entry_blocking(store, platform, base))).collect()
}

/// The entry for one platform (each heartbeat asks): inline when the binary is remembered, otherwise on a blocking
/// thread.
pub async fn entry(state: &AppState, platform: Platform, base: String) -> Result<PlatformEntry, ApiError> {
    if let Some(entry) = remembered(state.store(), platform, &base) {
        return Ok(entry);
    }
    let state = state.clone();
    Ok(blocking(move || entry_blocking(state.store(), platform, &base)).await??)
}

/// Every platform's entry (manifest, `SHA256SUMS`, fleet view).
pub async fn entries(state: &AppState, base: String) -> Result<Vec<PlatformEntry>, ApiError> {
    let state = state.clone();
    blocking(move || entries_blocking(state.store(), &base))
        .await?
        .into_iter()
        .map(|(_, entry)| entry.map_err(ApiError::from))
        .collect()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(format!("catalog lookup failed: {e}")))
}

/// The published entry for an agent's platform, if any.
pub fn served_for<'a>(agent: &AgentRecord, served: &'a [PlatformEntry]) -> Option<&'a PlatformEntry> {
    let platform = Platform::parse(&agent.os, &agent.arch).ok()?;
    served.iter().find(|e| e.published && e.platform() == Some(platform))
}

/// How an agent compares with the served builds: stale beats everything; otherwise the running binary's SHA-256
/// against the served one, or, when the agent reports none, the version and commit embedded in the served binary.
pub fn classify(agent: &AgentRecord, served: &[PlatformEntry], now: Timestamp, stale_after: Duration) -> AgentState {
    if now.saturating_sub(agent.last_seen_at) > stale_after.as_secs() as i64 {
        return AgentState::Stale;
    }
    let Some(entry) = served_for(agent, served) else { return AgentState::Unknown };
    let same = match (&agent.binary_sha256, &entry.sha256, &entry.agent) {
        (Some(running), Some(served), _) => running == served,
        (None, _, Some(build)) => build.version == agent.agent_version && build.commit == agent.agent_commit,
        _ => return AgentState::Unknown,
    };
    if same { AgentState::Current } else { AgentState::OutOfDate }
}

/// The fleet view: every agent classified against the served builds and with its backup health (`backups`, from
/// `rm_fleet::backup_health`), with counts per state and per health, optionally filtered by both. The admin API,
/// `/metrics` and `restic-manager-server agents list` all build it here.
pub fn fleet_view(
    agents: Vec<AgentRecord>,
    served: &[PlatformEntry],
    now: Timestamp,
    stale_after: Duration,
    filter: &AgentFilter,
    mut backups: HashMap<String, Vec<PlanHealth>>,
) -> AgentList {
    let mut counts = std::collections::BTreeMap::new();
    let mut health_counts = std::collections::BTreeMap::new();
    let views = agents
        .into_iter()
        .map(|record| {
            let state = classify(&record, served, now, stale_after);
            *counts.entry(state).or_default() += 1;
            let served_sha256 = served_for(&record, served).and_then(|e| e.sha256.clone());
            let plans = backups.remove(&record.id).unwrap_or_default();
            let health = rm_fleet::worst_health(&plans);
            if let Some(h) = health {
                *health_counts.entry(h).or_default() += 1;
            }
            AgentView { health, backups: plans, ..agent_view(record, state, served_sha256) }
        })
        .filter(|v| filter.state.is_none_or(|s| s == v.state) && filter.health.is_none_or(|h| v.health == Some(h)))
        .collect();
    AgentList {
        agents: views,
        counts,
        health_counts,
        stale_after_secs: stale_after.as_secs(),
        repositories: Vec::new(),
    }
}

/// The fleet view as of now: the served builds, then the agents and their backup health in one database read.
pub async fn fleet_view_now(state: &AppState, base: String, filter: &AgentFilter) -> Result<AgentList, ApiError> {
    let served = entries(state, base).await?;
    let now = rm_fleet::now();
    let (agents, backups, repositories) = state
        .fleet()
        .call(move |c| {
            Ok((rm_fleet::list_agents(c)?, rm_fleet::backup_health(c, now)?, rm_fleet::repository_health(c)?))
        })
        .await?;
    let view = fleet_view(agents, &served, now, state.settings().stale_after, filter, backups);
    Ok(AgentList { repositories: sorted_repositories(repositories), ..view })
}

/// The repositories' maintenance health in name order, for the fleet view.
pub fn sorted_repositories(
    health: std::collections::HashMap<String, rm_protocol::maintenance::RepositoryHealth>,
) -> Vec<rm_protocol::maintenance::RepositoryHealth> {
    let mut list: Vec<_> = health.into_values().collect();
    list.sort_by(|a, b| a.repository.cmp(&b.repository));
    list
}

fn agent_view(record: AgentRecord, state: AgentState, served_sha256: Option<String>) -> AgentView {
    AgentView {
        last_seen: rm_fleet::rfc3339(record.last_seen_at),
        id: record.id,
        hostname: record.hostname,
        os: record.os,
        arch: record.arch,
        agent_version: record.agent_version,
        agent_commit: record.agent_commit,
        binary_sha256: record.binary_sha256,
        last_update_error: record.last_update_error,
        enrolled_at: record.enrolled_at,
        last_seen_at: record.last_seen_at,
        heartbeats: record.heartbeats,
        last_seq: record.last_seq,
        state,
        served_sha256,
        labels: record.labels,
        restic: record.restic,
        health: None,
        backups: Vec::new(),
    }
}
