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
use rm_protocol::restic_dist::{ResticDrift, ResticEntry, ResticSidecar, SIDECAR_NAME};
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
        blob_url: found.as_ref().map(|f| agent_blob_url(base, &f.digest.sha256_hex())),
        agent: found.and_then(|f| f.digest.build_info.clone()),
    }
}

/// The content-addressed URL of an agent build (`base` as for [`entry_from`]): the bytes with that SHA-256, whichever
/// name serves them or whether any still does (`routes::assets::agent_blob`).
pub fn agent_blob_url(base: &str, sha256: &str) -> String {
    format!("{base}/agent/blobs/sha256/{sha256}")
}

/// The content-addressed URL of a restic build (`routes::assets::restic_blob`).
pub fn restic_blob_url(base: &str, sha256: &str) -> String {
    format!("{base}/restic/blobs/sha256/{sha256}")
}

/// The remembered binary of a platform, if still current (one or two `stat`s: fine on an async worker).
fn remembered(store: &AssetStore, platform: Platform, base: &str) -> Option<PlatformEntry> {
    let k = store.known(AssetKind::AgentBinary, platform.file_name())?;
    Some(entry_from(
        platform,
        base,
        Some(Found { len: k.len, modified: k.modified, source: k.source, digest: k.digest.clone() }),
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
    let base_restic = base.clone();
    let served = entries(state, base).await?;
    let now = rm_fleet::now();
    let (agents, backups, repositories) = state
        .fleet()
        .call(move |c| {
            Ok((rm_fleet::list_agents(c)?, rm_fleet::backup_health(c, now)?, rm_fleet::repository_health(c)?))
        })
        .await?;
    let mut view = fleet_view(agents, &served, now, state.settings().stale_after, filter, backups);
    fill_restic_drift(&mut view, &restic_entries(state, base_restic).await?);
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
        restic_served: None,
        restic_drift: None,
        credential_revoked_at: record.credential_revoked_at,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// restic builds (`restic-binaries/`): the same lookup and digests as the agent's, plus the version from the sidecar
// ---------------------------------------------------------------------------------------------------------------

/// The sidecars read, by their SHA-256 (one per root at most in practice): the heartbeat path asks for them without
/// touching the disk.
static SIDECARS: std::sync::Mutex<Option<HashMap<String, Arc<ResticSidecar>>>> = std::sync::Mutex::new(None);

/// The largest sidecar read (it lists three files).
const MAX_SIDECAR: u64 = 64 * 1024;

fn sidecar_cached(sha256: &str) -> Option<Arc<ResticSidecar>> {
    let cached = SIDECARS.lock().unwrap_or_else(|p| p.into_inner());
    cached.as_ref()?.get(sha256).cloned()
}

/// Logs that an optional restic file (a build or the sidecar) cannot be read, at most once a minute for the same
/// message: heartbeats ask every second or so.
fn warn_unreadable(what: &str, error: &StoreError) {
    static LAST: std::sync::Mutex<Option<(String, std::time::Instant)>> = std::sync::Mutex::new(None);
    let text = format!("{what}: {error}");
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((said, at)) = last.as_ref()
        && *said == text
        && at.elapsed() < Duration::from_secs(60)
    {
        return;
    }
    tracing::warn!(error = %error, "restic-binaries/{what} cannot be read; treated as not published");
    *last = Some((text, std::time::Instant::now()));
}

/// The sidecar of one root (`source`), parsed; `None` when absent, unreadable, too large or not valid JSON (said in
/// the log: the versions it would give are then unknown, the builds are still served).
fn sidecar_blocking(store: &AssetStore, source: Source) -> Option<Arc<ResticSidecar>> {
    let asset = match store.open_from(source, AssetKind::ResticBinary, SIDECAR_NAME) {
        Ok(found) => found?,
        Err(e) => {
            warn_unreadable(SIDECAR_NAME, &e);
            return None;
        }
    };
    let sha = asset.digest.sha256_hex();
    if let Some(cached) = sidecar_cached(&sha) {
        return Some(cached);
    }
    if asset.len > MAX_SIDECAR {
        tracing::warn!(size = asset.len, "restic-binaries/{SIDECAR_NAME} is too large; restic versions unknown");
        return None;
    }
    let mut text = Vec::new();
    if let Err(e) = std::io::Read::read_to_end(&mut std::io::Read::take(&asset.file, MAX_SIDECAR), &mut text) {
        warn_unreadable(SIDECAR_NAME, &StoreError::Io { path: SIDECAR_NAME.into(), source: e });
        return None;
    }
    match serde_json::from_slice::<ResticSidecar>(&text) {
        Ok(sidecar) => {
            let sidecar = Arc::new(sidecar);
            let mut cached = SIDECARS.lock().unwrap_or_else(|p| p.into_inner());
            let map = cached.get_or_insert_with(HashMap::new);
            if map.len() >= 8 {
                map.clear(); // bounded: one per root in practice
            }
            map.insert(sha, sidecar.clone());
            Some(sidecar)
        }
        Err(e) => {
            tracing::warn!(error = %e, "restic-binaries/{SIDECAR_NAME} is not valid; restic versions unknown");
            None
        }
    }
}

/// `sidecars` in order (data dir first): the first that describes these bytes names their version.
fn restic_entry_from(platform: Platform, base: &str, found: Option<Found>, sidecars: &[&ResticSidecar]) -> ResticEntry {
    let file = platform.restic_file_name();
    let sha256 = found.as_ref().map(|f| f.digest.sha256_hex());
    let described = sha256.as_ref().and_then(|sha| sidecars.iter().find_map(|s| s.describe(file, sha)));
    ResticEntry {
        os: platform.os.as_str().into(),
        arch: platform.arch.as_str().into(),
        file: file.into(),
        published: found.is_some(),
        size: found.as_ref().map(|f| f.len),
        source: found.as_ref().map(|f| f.source.as_str().into()),
        last_modified: found.as_ref().map(|f| httpdate::fmt_http_date(f.modified)),
        url: format!("{base}/restic/binary?os={}&arch={}", platform.os.as_str(), platform.arch.as_str()),
        blob_url: sha256.as_deref().map(|sha| restic_blob_url(base, sha)),
        version: described.map(|d| d.version.clone()),
        package_version: described
            .and_then(|d| d.package_version.as_deref())
            .map(|p| rm_protocol::validate::clean_text(p.trim(), rm_protocol::restic_dist::MAX_PACKAGE_VERSION))
            .filter(|p| !p.trim().is_empty()),
        sha256,
    }
}

/// The remembered restic of a platform described by a remembered sidecar, if both are still current and no other
/// sidecar could change the answer (no blocking I/O): a bundled sidecar is remembered only while the data dir has
/// none; a data-dir sidecar answers here only when it describes the file (it comes first).
fn restic_remembered(store: &AssetStore, platform: Platform, base: &str) -> Option<ResticEntry> {
    let k = store.known(AssetKind::ResticBinary, platform.restic_file_name())?;
    // Absent or never looked at: only a full lookup can tell.
    let s = store.known(AssetKind::ResticBinary, SIDECAR_NAME)?;
    let sidecar = sidecar_cached(&s.digest.sha256_hex())?;
    if s.source == Source::DataDir && sidecar.describe(platform.restic_file_name(), &k.digest.sha256_hex()).is_none() {
        return None;
    }
    let found = Found { len: k.len, modified: k.modified, source: k.source, digest: k.digest.clone() };
    Some(restic_entry_from(platform, base, Some(found), &[&sidecar]))
}

/// One platform's restic entry. Blocking. Never fails: restic is optional, so an unreadable build is logged and
/// listed as not published, and an unreadable sidecar as absent (versions unknown); heartbeats, the manifest,
/// `SHA256SUMS`, the fleet view and `/metrics` go on. Each file is described by the sidecars of both roots, data
/// dir first (a description holds only for the bytes whose SHA-256 it names).
pub fn restic_entry_blocking(store: &AssetStore, platform: Platform, base: &str) -> ResticEntry {
    if let Some(entry) = restic_remembered(store, platform, base) {
        return entry;
    }
    let found = match store.open(AssetKind::ResticBinary, platform.restic_file_name()) {
        Ok(found) => found,
        Err(e) => {
            warn_unreadable(platform.restic_file_name(), &e);
            None
        }
    };
    let found = found.map(|a| Found { len: a.len, modified: a.modified, source: a.source, digest: a.digest });
    let sidecars: Vec<_> =
        [Source::DataDir, Source::Bundled].into_iter().filter_map(|source| sidecar_blocking(store, source)).collect();
    let sidecars: Vec<&ResticSidecar> = sidecars.iter().map(|s| s.as_ref()).collect();
    restic_entry_from(platform, base, found, &sidecars)
}

/// Every platform's restic entry, in manifest order (manifest, `SHA256SUMS`, fleet view).
pub async fn restic_entries(state: &AppState, base: String) -> Result<Vec<ResticEntry>, ApiError> {
    let state = state.clone();
    blocking(move || PLATFORMS.iter().map(|&p| restic_entry_blocking(state.store(), p, &base)).collect()).await
}

/// Entries found by a full lookup, reused by heartbeats for [`LOOKED_UP_FOR`]: with no restic or no sidecar
/// published there is nothing to remember, and a heartbeat should not cost a blocking lookup each.
/// One per server state (so in-process tests never see another server's entries).
#[derive(Default)]
pub(crate) struct ResticLookups(std::sync::Mutex<HashMap<(Platform, String), (std::time::Instant, ResticEntry)>>);
const LOOKED_UP_FOR: Duration = Duration::from_secs(1);

/// The restic entry for one platform (each heartbeat asks): inline when remembered (or looked up within the last
/// second), else on a blocking thread.
pub async fn restic_entry(state: &AppState, platform: Platform, base: String) -> Result<ResticEntry, ApiError> {
    if let Some(entry) = restic_remembered(state.store(), platform, &base) {
        return Ok(entry);
    }
    let key = (platform, base.clone());
    {
        let looked = state.restic_lookups().0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, entry)) = looked.get(&key)
            && at.elapsed() < LOOKED_UP_FOR
        {
            return Ok(entry.clone());
        }
    }
    let shared = state.clone();
    let entry = blocking(move || restic_entry_blocking(shared.store(), platform, &base)).await?;
    let mut map = state.restic_lookups().0.lock().unwrap_or_else(|p| p.into_inner());
    if map.len() > 64 {
        map.clear(); // bounded: one entry per platform and base URL in practice
    }
    map.insert(key, (std::time::Instant::now(), entry.clone()));
    Ok(entry)
}

/// Fills each view's served restic version and drift (the fleet view's restic columns).
pub fn fill_restic_drift(list: &mut AgentList, served: &[ResticEntry]) {
    for view in &mut list.agents {
        let Ok(platform) = Platform::parse(&view.os, &view.arch) else { continue };
        let entry = served.iter().find(|e| e.published && e.platform() == Some(platform));
        view.restic_served = entry.and_then(|e| e.version.clone());
        view.restic_drift = view.restic.as_ref().map(|r| {
            let host = r.version.as_deref().filter(|_| r.error.is_none());
            ResticDrift::of(host, view.restic_served.as_deref())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(bytes: &[u8]) -> (Found, String) {
        use sha2::Digest as _;
        let digest = Digest { sha256: sha2::Sha256::digest(bytes).into(), build_info: None };
        let sha = digest.sha256_hex();
        let found = Found {
            len: bytes.len() as u64,
            modified: SystemTime::UNIX_EPOCH,
            source: Source::Bundled,
            digest: Arc::new(digest),
        };
        (found, sha)
    }

    #[test]
    fn sidecar_facts_are_shown_only_when_plain() {
        let platform = Platform::parse("linux", "amd64").unwrap();
        let (f, sha) = found(b"restic");
        let sidecar = |version: &str, package: &str| ResticSidecar {
            origin: None,
            files: [(
                platform.restic_file_name().to_string(),
                rm_protocol::restic_dist::SidecarFile {
                    version: version.into(),
                    package_version: Some(package.into()),
                    sha256: sha.clone(),
                },
            )]
            .into(),
        };
        let good = sidecar("0.14.0", "0.14.0-1+b5\u{1b}[31m\n");
        let entry = restic_entry_from(platform, "", Some(f), &[&good]);
        assert_eq!(entry.version.as_deref(), Some("0.14.0"));
        assert_eq!(entry.package_version.as_deref(), Some("0.14.0-1+b5 [31m"));
        let (f, _) = found(b"restic");
        let bad = sidecar("0.14.0<script>", "x");
        let entry = restic_entry_from(platform, "", Some(f), &[&bad]);
        assert_eq!((entry.version, entry.package_version), (None, None));
    }
}
