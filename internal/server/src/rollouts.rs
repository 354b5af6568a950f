//! The rollout task. Every `--rollout-tick` it
//! 1. looks at the build served for each platform (the catalog: data dir first, then bundled),
//! 2. archives a build not seen before under `<DataDir>/agent-builds/<sha256>` (copied from the open handle and
//!    checked against its digest, staged and renamed like an upload) and records it, so a rollout can still hand it
//!    out after the served file changed,
//! 3. lets `rm_fleet::rollouts::observe_published` turn a new build into a rollout, and
//! 4. moves the active rollouts on (`rm_fleet::rollouts::advance`).
//!
//! The heartbeat answer then names each agent's desired build ([`update_entry`]).

use std::collections::HashSet;
use std::io::{Read, Write};

use rm_assets::{AssetKind, AssetStore};
use rm_fleet::rollouts::{self, BuildRecord, Event, Published, Tuning};
use rm_protocol::{Platform, PlatformEntry};
use sha2::Digest as _;
use tracing::{info, warn};

use crate::{AppState, catalog};

/// The tuning of this process: deadlines count from its start.
pub(crate) fn tuning(state: &AppState) -> Tuning {
    let interval = state.settings().heartbeat_interval.as_secs().max(1);
    Tuning {
        booted_at: state.started_at(),
        stale_after_secs: state.settings().stale_after.as_secs(),
        default_lost_after_secs: (3 * interval).max(3),
    }
}

/// Starts the task; it runs until the runtime stops.
pub fn spawn(state: &AppState) -> tokio::task::JoinHandle<()> {
    let state = state.clone();
    tokio::spawn(async move {
        let mut archived = HashSet::new();
        let mut tick = tokio::time::interval(state.settings().rollout_tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error = String::new();
        loop {
            tick.tick().await;
            match tick_once(&state, &mut archived).await {
                Ok(()) => last_error.clear(),
                Err(e) => {
                    // Said once per distinct error, not every tick.
                    if e != last_error {
                        warn!(error = %e, "rollouts could not move on; retrying every tick");
                        last_error = e;
                    }
                }
            }
        }
    })
}

/// One pass: archive, observe, advance.
async fn tick_once(state: &AppState, archived: &mut HashSet<String>) -> Result<(), String> {
    let served = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || catalog::entries_blocking(state.store(), ""))
            .await
            .map_err(|e| e.to_string())?
    };
    let mut published = Vec::new();
    for (platform, entry) in served {
        let Ok(entry) = entry else { continue }; // the catalog logs unreadable builds
        let Some(sha) = entry.sha256.clone().filter(|_| entry.published) else { continue };
        if !archived.contains(&sha) {
            let record = {
                let state = state.clone();
                let sha = sha.clone();
                tokio::task::spawn_blocking(move || archive(state.store(), platform, &sha))
                    .await
                    .map_err(|e| e.to_string())?
            };
            let record = match record {
                Ok(Some(r)) => r,
                Ok(None) => continue, // replaced since the catalog looked: the next tick sees the new one
                Err(e) => return Err(format!("archiving the {platform} build {sha}: {e}")),
            };
            let now = rm_fleet::now();
            state.fleet().call(move |c| rollouts::record_build(c, now, &record)).await.map_err(|e| e.to_string())?;
            archived.insert(sha.clone());
        }
        published.push(Published { os: entry.os, arch: entry.arch, sha256: sha });
    }
    let default = state.settings().rollout_strategy.clone();
    let tuning = tuning(state);
    let (created, events) = state
        .fleet()
        .call(move |c| {
            let now = rm_fleet::now();
            let created = rollouts::observe_published(c, now, &published, default.as_ref(), tuning)?;
            Ok((created, rollouts::advance(c, now, tuning)?))
        })
        .await
        .map_err(|e| e.to_string())?;
    if let Some(id) = created {
        info!(rollout = id, "a new agent build was published; rollout created");
    }
    for event in events {
        match event {
            Event::WaveStarted { rollout, wave, hosts } => info!(rollout, wave, hosts, "rollout wave started"),
            Event::Halted { rollout, reason } => warn!(rollout, %reason, "rollout halted"),
            Event::Completed { rollout } => info!(rollout, "rollout completed"),
            Event::RolledBack { rollout } => info!(rollout, "rollout rolled back"),
        }
    }
    Ok(())
}

/// Copies the served build of `platform` into the archive unless an intact copy is there; `Ok(None)` when the served
/// file no longer has that digest. Blocking.
fn archive(store: &AssetStore, platform: Platform, sha: &str) -> Result<Option<BuildRecord>, String> {
    let record = |len: u64, build: Option<&rm_buildinfo::BuildInfo>| BuildRecord {
        sha256: sha.to_string(),
        os: platform.os.as_str().into(),
        arch: platform.arch.as_str().into(),
        size: len,
        version: build.map(|b| b.version.clone()),
        commit: build.map(|b| b.commit.clone()),
    };
    if let Ok(Some(kept)) = store.open(AssetKind::AgentBuild, sha)
        && kept.digest.sha256_hex() == sha
    {
        return Ok(Some(record(kept.len, kept.digest.build_info.as_ref())));
    }
    let Some(mut source) = store.open(AssetKind::AgentBinary, platform.file_name()).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    if source.digest.sha256_hex() != sha {
        return Ok(None);
    }
    let staged = store.stage(AssetKind::AgentBuild, sha).map_err(|e| e.to_string())?;
    let mut out = staged.file().map_err(|e| e.to_string())?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut copied = 0u64;
    loop {
        let n = source.file.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        copied += n as u64;
    }
    if hex::encode(hasher.finalize()) != sha || copied != source.len {
        return Ok(None); // rewritten in place while copied: the staged file is deleted with `staged`
    }
    staged.commit().map_err(|e| e.to_string())?;
    info!(%platform, sha256 = sha, "agent build archived");
    Ok(Some(record(source.len, source.digest.build_info.as_ref())))
}

/// The heartbeat's `update`: the build `desired` names (`None`: the served one). When that is the served build the
/// catalog's entry is used as is; otherwise the archived build, downloaded by digest. A desired build that is not
/// archived names nothing: an agent is never told to run a build it cannot fetch, and never the newest one instead.
pub(crate) fn update_entry(
    platform: Platform,
    base: &str,
    served: PlatformEntry,
    desired: Option<(String, Option<BuildRecord>)>,
) -> Option<PlatformEntry> {
    let Some((sha, record)) = desired else { return Some(served).filter(|e| e.published) };
    if served.published && served.sha256.as_deref() == Some(sha.as_str()) {
        return Some(served);
    }
    let record = record?;
    Some(PlatformEntry {
        os: platform.os.as_str().into(),
        arch: platform.arch.as_str().into(),
        file: platform.file_name().into(),
        published: true,
        size: Some(record.size),
        sha256: Some(sha.clone()),
        source: Some("archive".into()),
        last_modified: None,
        url: crate::catalog::agent_blob_url(base, &sha),
        blob_url: Some(crate::catalog::agent_blob_url(base, &sha)),
        agent: record.version.map(|version| rm_buildinfo::BuildInfo {
            version,
            commit: record.commit.unwrap_or_default(),
            date: String::new(),
        }),
    })
}

/// The API shape of a rollout (`with_hosts`: every host's row too).
pub fn view(
    r: rollouts::Rollout,
    hosts: Vec<rollouts::RolloutHost>,
    with_hosts: bool,
) -> rm_protocol::rollout::RolloutView {
    use rm_fleet::rfc3339;
    use rm_protocol::rollout::{FailedHost, Halt, HostState, RolloutHostView, RolloutView, TargetView, WaveView};
    let mut counts = std::collections::BTreeMap::new();
    for h in &hosts {
        *counts.entry(h.state).or_insert(0u32) += 1;
    }
    let waves = r
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let members: Vec<_> = hosts.iter().filter(|h| h.wave == i as u32 && !h.rollback).collect();
            let mut wave_counts = std::collections::BTreeMap::<HostState, u32>::new();
            for h in &members {
                *wave_counts.entry(h.state).or_insert(0) += 1;
            }
            WaveView {
                index: i as u32,
                name: w.name.clone(),
                hosts: members.len() as u32,
                budget: rollouts::wave_budget(&r, i as u32, members.len()) as u32,
                counts: wave_counts,
                started_at: w.started_at.map(rfc3339),
                finished_at: w.finished_at.map(rfc3339),
            }
        })
        .collect();
    RolloutView {
        id: r.id,
        state: r.state,
        targets: r
            .targets
            .iter()
            .map(|t| TargetView {
                os: t.os.clone(),
                arch: t.arch.clone(),
                from_sha256: t.from_sha256.clone(),
                to_sha256: t.to_sha256.clone(),
                to_version: t.to_version.clone(),
            })
            .collect(),
        current_wave: r.current_wave,
        waves,
        counts,
        halt: r.halt.as_ref().map(|h| Halt {
            at: rfc3339(h.at),
            wave: h.wave,
            reason: h.reason.clone(),
            hosts: h
                .hosts
                .iter()
                .map(|f| FailedHost {
                    agent_id: f.agent_id.clone(),
                    hostname: f.hostname.clone(),
                    error: f.error.clone(),
                })
                .collect(),
        }),
        created_at: rfc3339(r.created_at),
        started_at: r.started_at.map(rfc3339),
        finished_at: r.finished_at.map(rfc3339),
        created_by: r.created_by.clone(),
        hosts: if with_hosts {
            hosts
                .into_iter()
                .map(|h| RolloutHostView {
                    agent_id: h.agent_id,
                    hostname: h.hostname,
                    wave: h.wave,
                    state: h.state,
                    from_sha256: h.from_sha256,
                    target_sha256: h.target_sha256,
                    rollback: h.rollback,
                    told_at: h.told_at.map(rfc3339),
                    reported_at: h.reported_at.map(rfc3339),
                    verified_at: h.verified_at.map(rfc3339),
                    error: h.error,
                })
                .collect()
        } else {
            Vec::new()
        },
        strategy: r.strategy,
    }
}

/// One rollout with its hosts, as the API shows it.
pub fn load_view(
    c: &rm_fleet::Connection,
    id: u64,
    with_hosts: bool,
) -> Result<Option<rm_protocol::rollout::RolloutView>, rm_fleet::DbError> {
    let Some(r) = rollouts::get_rollout(c, id)? else { return Ok(None) };
    let hosts = rollouts::rollout_hosts(c, id)?;
    Ok(Some(view(r, hosts, with_hosts)))
}

/// The newest rollouts (without their hosts' rows).
pub fn list_views(
    c: &rm_fleet::Connection,
    limit: usize,
) -> Result<Vec<rm_protocol::rollout::RolloutView>, rm_fleet::DbError> {
    let mut out = Vec::new();
    for r in rollouts::list_rollouts(c, limit)? {
        let hosts = rollouts::rollout_hosts(c, r.id)?;
        out.push(view(r, hosts, false));
    }
    Ok(out)
}

/// The targets of a rollout created without any: every platform whose served build differs from its released one.
pub fn default_targets(
    c: &rm_fleet::Connection,
    served: &[PlatformEntry],
) -> Result<Vec<(String, String, String)>, rm_fleet::DbError> {
    let mut targets = Vec::new();
    for e in served.iter().filter(|e| e.published) {
        let Some(sha) = &e.sha256 else { continue };
        if rollouts::released(c, &e.os, &e.arch)?.as_deref() != Some(sha.as_str()) {
            targets.push((e.os.clone(), e.arch.clone(), sha.clone()));
        }
    }
    Ok(targets)
}
